"""How the presence test decides, on the toy world's validation split: the settings of `segment(..., presence=True)`
were chosen from this table, never from the test scenes.

    python benchmarks/presence_validation.py --limit 60
    python benchmarks/presence_validation.py --limit 40 --model diffusers_goca/toyworld/dit_model

Each validation scene is segmented twice without the test: with its own classes (oracle) and with them plus two
absent world classes, shuffled (distractors-2, as in `bench.protocols`), named in the order `--class-order` gives.
The leave-one-out denoising errors of both class lists are taken at every noise of the library's setting
(`presence.PRESENCE_TIMESTEPS` × `PRESENCE_DRAWS`) in a backward elimination run to the end (`presence.
elimination_rounds`: each round leaves out the class of the lowest gain); each rule below then decides from them
which classes take part in the argmax and with what weight:
- `none`: no presence test;
- `threshold, 3 noises`: gain > 0 in the first round over t = 250, 500, 750 with one noise each (the first setting
  shipped);
- `threshold, 14 noises`: gain > 0 in the first round over every noise;
- `threshold + sigmoid τ`: the same, and each kept class's scores weighted by sigmoid(gain / τ);
- `elimination to the first stop, threshold θ, τ`: the classes of the first round whose every gain is above θ, each
  weighted by its gain there as above, 0 for those left out before (the rule shipped before the whole path);
- `elimination, threshold θ, τ`: the library's rule (`presence.elimination_weights`): the classes of the round whose
  prompt explains the image best along the whole path, with θ the fraction by which each class must lower the
  error (`presence.kept_round`), weighted as above.
Reported per rule and method: oracle mIoU, distractors-2 mIoU (and its share of the oracle mIoU without the test),
and the share of pixels the absent classes take.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusers_goca.bench.toy_script import toy_study, write_table
from diffusers_goca.class_order import prompt_orders
from diffusers_goca.functional.maps import weighted_labels
from diffusers_goca.functional.metrics import confusion_matrix, miou
from diffusers_goca.presence import (
    PRESENCE_DRAWS,
    PRESENCE_TEMPERATURE,
    PRESENCE_TIMESTEPS,
    elimination_rounds,
    elimination_weights,
    leave_one_out_errors,
    leave_one_out_gain,
    presence_weights,
    round_weights,
)
from diffusers_goca.segmenting import encoded_latents
from diffusers_goca.toyworld import CLASS_NAMES, make_scene, scene_seeds

TEMPERATURES = (0.01, 0.02, 0.03, 0.05)
ELIMINATION_THRESHOLDS = (-0.02, 0.0, 0.01, 0.02, 0.03, 0.04)
FIRST_SETTING = [PRESENCE_TIMESTEPS.index(t) for t in (250, 500, 750)]  # draw 0 of each


def first_round(rule):
    """A rule on the first round's errors (without [K, S], full [S]) as a rule on a record's list (see `collect`)."""
    return lambda run: rule(*run["first_round"])


def elimination(threshold: float, temperature: float):
    """The library's rule at this threshold and τ, read from the elimination path."""
    return lambda run: elimination_weights(run["rounds"], run["named"], threshold, temperature)


def first_stop(threshold: float, temperature: float):
    """The elimination stopped at its first round whose every gain is above the threshold (none: every class out)."""

    def rule(run):
        rounds = run["rounds"]
        stop = next((i for i, (_, gains) in enumerate(rounds) if bool((gains > threshold).all())), len(rounds))
        return round_weights(rounds, stop, run["named"], threshold, temperature)

    return rule


# rule name → weights [K] of the classes in prompt order; τ = ∞ makes every kept weight equal (sigmoid(0)): the plain
# threshold.
RULES = {
    "none": lambda run: torch.ones(len(run["named"])),
    "threshold, 3 noises": first_round(
        lambda w, f: presence_weights(leave_one_out_gain(w[:, FIRST_SETTING], f[FIRST_SETTING]), 0.0, float("inf"))
    ),
    "threshold, 14 noises": first_round(lambda w, f: presence_weights(leave_one_out_gain(w, f), 0.0, float("inf"))),
    **{
        f"threshold + sigmoid τ = {tau}": first_round(
            lambda w, f, tau=tau: presence_weights(leave_one_out_gain(w, f), 0.0, tau)
        )
        for tau in TEMPERATURES
    },
    f"elimination to the first stop, threshold 0.0, τ = {PRESENCE_TEMPERATURE}": first_stop(0.0, PRESENCE_TEMPERATURE),
    **{
        f"elimination, threshold {theta}, τ = {PRESENCE_TEMPERATURE}": elimination(theta, PRESENCE_TEMPERATURE)
        for theta in ELIMINATION_THRESHOLDS
    },
    "elimination, threshold 0.0, τ = 0.1": elimination(0.0, 0.1),
}


def collect(pipe, n: int, split: str, class_order: str, methods=("goca", "vanilla")) -> list[dict]:
    """Per scene and class list: the unweighted scores of each method, the classes in prompt order, the first
    round's leave-one-out errors and every round of the elimination run to the end."""
    adapter = pipe.goca_adapter
    records = []
    for seed in tqdm(scene_seeds(split, n), desc="scenes"):
        scene = make_scene(seed)
        rng = random.Random(seed)
        absent = rng.sample([c for c in CLASS_NAMES if c not in scene.classes], 2)
        lists = {
            "oracle": list(scene.classes),
            "distractors-2": rng.sample(scene.classes + absent, len(scene.classes) + 2),
        }
        image = Image.fromarray(scene.image)
        latents = encoded_latents(pipe, image, adapter.native_resolution, adapter)
        record = {"truth": torch.from_numpy(scene.labels), "present": set(scene.classes)}
        for name, classes in lists.items():
            got = pipe.segment(image, classes, method=list(methods), class_order=class_order)
            named = prompt_orders(classes, class_order)[0]
            forward = lambda text, t, g: adapter.segment_forward(latents, text, t, g)  # noqa: E731
            cache = {}
            with adapter.encodings_kept():
                rounds = elimination_rounds(forward, named, False, 0, cache=cache)
            first = leave_one_out_errors(forward, named, False, 0, errors=cache.__getitem__)
            scores = {m: got[m].scores[[classes.index(c) for c in named]] for m in methods}
            record[name] = dict(named=named, scores=scores, first_round=first, rounds=rounds)
        records.append(record)
    return records


def evaluate(records: list[dict], protocol: str, method: str, rule) -> tuple[float, float]:
    """(mIoU over the world's classes present, % of pixels given to absent classes) under `rule`."""
    k = len(CLASS_NAMES)
    conf = torch.zeros(k, k, dtype=torch.long)
    absent_pixels = pixels = 0
    for rec in records:
        run = rec[protocol]
        weights = rule(run).tolist()
        ids = torch.tensor([CLASS_NAMES.index(c) for c in run["named"]])
        pred = ids[weighted_labels(run["scores"][method], weights)]
        conf += confusion_matrix(pred, rec["truth"], k)
        absent_ids = [CLASS_NAMES.index(c) for c in run["named"] if c not in rec["present"]]
        absent_pixels += int(np.isin(pred.numpy(), absent_ids).sum())
        pixels += pred.numel()
    return 100 * miou(conf, over="truth")[0], 100 * absent_pixels / pixels


def main(argv=None) -> int:
    args, pipe = toy_study(__doc__, argv, limit=60, split="validation", class_order=True)
    records = collect(pipe, args.limit, args.split, args.class_order)
    noises = f"{len(PRESENCE_TIMESTEPS)} levels × {PRESENCE_DRAWS} noises"
    print(f"{args.limit} {args.split} scenes, {args.model or 'UNet toy'}, class order {args.class_order}; {noises}\n")
    print("| rule | method | oracle mIoU | distractors-2 mIoU (of oracle without the test) | absent % |")
    print("|---|---|---|---|---|")
    table = {}
    for method in ("goca", "vanilla"):
        base = evaluate(records, "oracle", method, RULES["none"])[0]
        for name, rule in RULES.items():
            oracle, _ = evaluate(records, "oracle", method, rule)
            d2, absent = evaluate(records, "distractors-2", method, rule)
            table[f"{name} / {method}"] = dict(oracle=oracle, distractors_2=d2, absent_share=absent)
            print(f"| {name} | {method} | {oracle:.1f} | {d2:.1f} ({100 * d2 / base:.0f} %) | {absent:.1f} |")
    write_table(args.out, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
