"""How the presence test decides, on the toy world's validation split: the settings of `segment(..., presence=True)`
were chosen from this table, never from the test scenes.

    python benchmarks/presence_validation.py --limit 60
    python benchmarks/presence_validation.py --limit 40 --model diffusers_goca/toyworld/dit_model

Each validation scene is segmented twice without the test: with its own classes (oracle) and with them plus two
absent world classes, shuffled (distractors-2, as in `bench.protocols`). The leave-one-out denoising errors of both
class lists are taken once, at every noise of the library's setting (`presence.PRESENCE_TIMESTEPS` × `PRESENCE_DRAWS`);
each rule below then decides from them which classes take part in the argmax and with what weight:
- `none`: no presence test;
- `threshold, 3 noises`: gain > 0 over t = 250, 500, 750 with one noise each (the first setting shipped);
- `threshold, 14 noises`: gain > 0 over every noise;
- `threshold + sigmoid τ`: the same, and each kept class's scores weighted by sigmoid(gain / τ).
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
from diffusers_goca.functional.maps import weighted_labels
from diffusers_goca.functional.metrics import confusion_matrix, miou
from diffusers_goca.presence import (
    PRESENCE_DRAWS,
    PRESENCE_TIMESTEPS,
    leave_one_out_errors,
    leave_one_out_gain,
    presence_weights,
)
from diffusers_goca.segmenting import encoded_latents
from diffusers_goca.toyworld import CLASS_NAMES, make_scene, scene_seeds

TEMPERATURES = (0.01, 0.02, 0.03, 0.05)
FIRST_SETTING = [PRESENCE_TIMESTEPS.index(t) for t in (250, 500, 750)]  # draw 0 of each


# rule name → weights [K] from the leave-one-out errors (without [K, S], full [S]); τ = ∞ makes every kept weight
# equal (sigmoid(0)): the plain threshold.
RULES = {
    "none": lambda w, f: torch.ones(w.shape[0]),
    "threshold, 3 noises": lambda w, f: presence_weights(
        leave_one_out_gain(w[:, FIRST_SETTING], f[FIRST_SETTING]), temperature=float("inf")
    ),
    "threshold, 14 noises": lambda w, f: presence_weights(leave_one_out_gain(w, f), temperature=float("inf")),
    **{
        f"threshold + sigmoid τ = {tau}": lambda w, f, tau=tau: presence_weights(
            leave_one_out_gain(w, f), temperature=tau
        )
        for tau in TEMPERATURES
    },
}


def collect(pipe, n: int, split: str, methods=("goca", "vanilla")) -> list[dict]:
    """Per scene and class list: the unweighted scores of each method and the leave-one-out errors."""
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
            got = pipe.segment(image, classes, method=list(methods))
            with adapter.encodings_kept():
                without, full = leave_one_out_errors(
                    lambda text, t, g: adapter.segment_forward(latents, text, t, g), classes, False, 0
                )
            record[name] = dict(classes=classes, scores={m: got[m].scores for m in methods}, errors=(without, full))
        records.append(record)
    return records


def evaluate(records: list[dict], protocol: str, method: str, rule) -> tuple[float, float]:
    """(mIoU over the world's classes present, % of pixels given to absent classes) under `rule`."""
    k = len(CLASS_NAMES)
    conf = torch.zeros(k, k, dtype=torch.long)
    absent_pixels = pixels = 0
    for rec in records:
        run = rec[protocol]
        weights = rule(*run["errors"]).tolist()
        ids = torch.tensor([CLASS_NAMES.index(c) for c in run["classes"]])
        pred = ids[weighted_labels(run["scores"][method], weights)]
        conf += confusion_matrix(pred, rec["truth"], k)
        absent_ids = [CLASS_NAMES.index(c) for c in run["classes"] if c not in rec["present"]]
        absent_pixels += int(np.isin(pred.numpy(), absent_ids).sum())
        pixels += pred.numel()
    return 100 * miou(conf, over="truth")[0], 100 * absent_pixels / pixels


def main(argv=None) -> int:
    args, pipe = toy_study(__doc__, argv, limit=60, split="validation")
    records = collect(pipe, args.limit, args.split)
    noises = f"{len(PRESENCE_TIMESTEPS)} levels × {PRESENCE_DRAWS} noises"
    print(f"{args.limit} {args.split} scenes, {args.model or 'UNet toy'}; errors at {noises}\n")
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
