"""How the presence test decides, on the toy world's validation split: the settings of `segment(..., presence=True)`
were chosen from this table, never from the test scenes.

    python benchmarks/presence_validation.py --limit 60
    python benchmarks/presence_validation.py --limit 40 --model diffusers_goca/toyworld/dit_model

Each validation scene is segmented three times without the test, as in `bench.protocols`: with its own classes
(oracle), with them plus two absent world classes, shuffled (distractors-2), and with its objects alone and the
background channel on, which must take the surface (objects-only), named in the order `--class-order` gives.
The leave-one-out denoising errors of each class list (with "background" in the prompt where the channel is on) are
taken at every noise of the library's setting
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
the share of pixels the absent classes take, and objects-only mIoU (the background channel, weight 1, counted as
the surface).
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
    PRESENCE_THRESHOLD,
    PRESENCE_TIMESTEPS,
    class_regions,
    elimination_rounds,
    elimination_weights,
    leave_one_out_errors,
    leave_one_out_gain,
    presence_weights,
    round_weights,
)
from diffusers_goca.segmenting import encoded_latents
from diffusers_goca.toyworld import BACKGROUNDS, CLASS_NAMES, make_scene, scene_seeds

TEMPERATURES = (0.01, 0.02, 0.03, 0.05)
IMAGE_THRESHOLDS = (0.0, 0.01)
REGION_THRESHOLDS = (-0.02, 0.0, 0.01, 0.02, 0.03, 0.05)
FIRST_SETTING = [PRESENCE_TIMESTEPS.index(t) for t in (250, 500, 750)]  # draw 0 of each


def first_round(rule):
    """A rule on the first round's errors (without [K, S], full [S]) as a rule on a record's list (see `collect`)."""
    return lambda run: rule(*run["first_round"])


def elimination(threshold: float, temperature: float, where: str | None = None):
    """The library's rule at this threshold and τ, read from the elimination path whose gains are taken `where`:
    "region", in each class's region; "image", over the whole image; None, as the library does (in the regions
    where the background channel is on, else over the image)."""

    def rule(run):
        path = where or ("region" if run["background"] else "image")
        return elimination_weights(run["paths"][path], run["named"], threshold, temperature)

    return rule


def first_stop(threshold: float, temperature: float):
    """The elimination over the whole image stopped at its first round whose every gain is above the threshold (none:
    every class out)."""

    def rule(run):
        rounds = run["paths"]["image"]
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
        f"elimination over the image, threshold {theta}, τ = {PRESENCE_TEMPERATURE}": elimination(
            theta, PRESENCE_TEMPERATURE, "image"
        )
        for theta in IMAGE_THRESHOLDS
    },
    **{
        f"elimination in the regions, threshold {theta}, τ = {PRESENCE_TEMPERATURE}": elimination(
            theta, PRESENCE_TEMPERATURE, "region"
        )
        for theta in REGION_THRESHOLDS
    },
    "elimination in the regions, threshold 0.0, τ = 0.1": elimination(0.0, 0.1, "region"),
    f"elimination in the regions with the background channel, else over the image, threshold {PRESENCE_THRESHOLD}, "
    f"τ = {PRESENCE_TEMPERATURE}": elimination(PRESENCE_THRESHOLD, PRESENCE_TEMPERATURE),
}


def collect(pipe, n: int, split: str, class_order: str, methods=("goca", "vanilla")) -> list[dict]:
    """Per scene and class list: the unweighted scores of each method (the background channel last where it is
    on), the classes in prompt order, the first round's leave-one-out errors, and every round of the elimination run
    to the end with the gains over the whole image and in each class's region (`presence.class_regions` of the
    first method's scores)."""
    adapter = pipe.goca_adapter
    records = []
    for seed in tqdm(scene_seeds(split, n), desc="scenes"):
        scene = make_scene(seed)
        rng = random.Random(seed)
        absent = rng.sample([c for c in CLASS_NAMES if c not in scene.classes], 2)
        lists = {
            "oracle": (list(scene.classes), False),
            "distractors-2": (rng.sample(scene.classes + absent, len(scene.classes) + 2), False),
            "objects-only": ([c for c in scene.classes if c not in BACKGROUNDS], True),
        }
        image = Image.fromarray(scene.image)
        latents = encoded_latents(pipe, image, adapter.native_resolution, adapter)
        record = {"truth": torch.from_numpy(scene.labels), "present": set(scene.classes), "surface": scene.background}
        for name, (classes, background) in lists.items():
            got = pipe.segment(image, classes, method=list(methods), class_order=class_order, background=background)
            named = prompt_orders(classes, class_order)[0]
            forward = adapter.presence_forward(latents)
            channels = [classes.index(c) for c in named] + ([len(classes)] if background else [])
            scores = {m: got[m].scores[channels] for m in methods}
            regions = class_regions(scores[methods[0]][: len(named)], adapter.error_map_grid(latents))
            cache = {}  # both paths share each prompt's errors
            with adapter.encodings_kept():
                paths = {
                    where: elimination_rounds(forward, named, background, 0, cache=cache, regions=r)
                    for where, r in (("image", None), ("region", regions))
                }
            first = leave_one_out_errors(forward, named, background, 0, errors=cache.__getitem__)
            record[name] = dict(named=named, scores=scores, first_round=first, paths=paths, background=background)
        records.append(record)
    return records


def evaluate(records: list[dict], protocol: str, method: str, rule) -> tuple[float, float]:
    """(mIoU over the world's classes present, % of pixels given to absent classes) under `rule`; the background
    channel, where it is on, weighs 1 and counts as the scene's surface."""
    k = len(CLASS_NAMES)
    conf = torch.zeros(k, k, dtype=torch.long)
    absent_pixels = pixels = 0
    for rec in records:
        run = rec[protocol]
        background = [rec["surface"]] if run["background"] else []
        weights = rule(run).tolist() + [1.0] * len(background)
        ids = torch.tensor([CLASS_NAMES.index(c) for c in run["named"] + background])
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
    print(
        "| rule | method | oracle mIoU | distractors-2 mIoU (of oracle without the test) | absent % | objects-only mIoU |"
    )
    print("|---|---|---|---|---|---|")
    table = {}
    for method in ("goca", "vanilla"):
        base = evaluate(records, "oracle", method, RULES["none"])[0]
        for name, rule in RULES.items():
            oracle, _ = evaluate(records, "oracle", method, rule)
            d2, absent = evaluate(records, "distractors-2", method, rule)
            objects, _ = evaluate(records, "objects-only", method, rule)
            table[f"{name} / {method}"] = dict(
                oracle=oracle, distractors_2=d2, absent_share=absent, objects_only=objects
            )
            cells = f"{oracle:.1f} | {d2:.1f} ({100 * d2 / base:.0f} %) | {absent:.1f} | {objects:.1f}"
            print(f"| {name} | {method} | {cells} |")
    write_table(args.out, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
