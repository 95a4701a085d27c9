"""Toy-world protocols that measure real use: no oracle list of the classes present.

    python benchmarks/segmentation.py --dataset toyworld --protocols all --limit 100
    python benchmarks/segmentation.py --dataset toyworld --protocols all --model diffusers_goca/toyworld/dit_model

Each held-out scene is segmented under every protocol, with the same `segment` arguments:
- `oracle`: the classes present, in the scene's order (the surface, then the objects);
- `shuffled`: the same classes in a random order (its labels are compared with `oracle`'s);
- `distractors-1`, `distractors-2`: the present classes plus 1 or 2 absent world classes, shuffled (two orders of
  `distractors-2` are compared);
- `objects-only`: only the objects are named, with the background channel on: it must take the surface.

Reported per protocol and method: mIoU over the world's classes present in the scenes (a pixel given to the
background channel counts as the scene's surface only under `objects-only`, where the surface is not named), the
share of pixels given to classes absent from the scene, and the label agreement between two orders.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..functional.metrics import confusion_matrix, miou
from ..toyworld.scenes import BACKGROUNDS, CLASS_NAMES, make_scene, scene_seeds

PROTOCOLS = ("oracle", "shuffled", "distractors-1", "distractors-2", "objects-only")
# protocol → the protocol whose labels it is compared with, for the agreement between two orders
ORDER_PAIRS = {"shuffled": "oracle", "distractors-2": "distractors-2 reordered"}
NO_CLASS = len(CLASS_NAMES)  # the background channel where the surface is named


def protocol_classes(scene, protocol: str, rng: random.Random) -> tuple[list[str], bool]:
    """(classes, background channel on) for `scene` under `protocol`; `rng` draws the orders and distractors."""
    present = list(scene.classes)
    if protocol == "oracle":
        return present, False
    if protocol == "objects-only":
        return [c for c in present if c not in BACKGROUNDS], True
    if protocol == "shuffled":
        return rng.sample(present, len(present)), False
    if protocol.startswith("distractors-"):
        count = int(protocol.split("-")[1].split()[0])
        absent = [c for c in CLASS_NAMES if c not in present]
        chosen = present + rng.sample(absent, count)
        return rng.sample(chosen, len(chosen)), False
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _runs(protocols: Sequence[str]) -> list[str]:
    """The segmentations each scene needs: the protocols, plus the second order of a compared pair."""
    runs = list(protocols)
    for name, other in ORDER_PAIRS.items():
        if name in protocols and other not in runs:
            runs.append(other)
    return runs


def evaluate_protocols(
    pipe,
    n: int = 100,
    start: int = 0,
    split: str = "test",
    methods: Sequence[str] = ("goca", "vanilla"),
    protocols: Sequence[str] = PROTOCOLS,
    background: bool | None = None,
    progress: bool = True,
    **segment_kwargs,
) -> dict:
    """Per protocol and method: {"miou", "absent_share", "agreement"} on scenes `start`..`start+n` of `split`.

    background: for the protocols that name the surface, whether `segment` adds its background channel (None: the
    protocol's own setting, off); `objects-only` always has it on. segment_kwargs: passed to every `segment` call.
    """
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"protocols must be among {PROTOCOLS}, got {p!r}")
    runs = _runs(protocols)
    k = NO_CLASS + 1
    conf = {(p, m): torch.zeros(k, k, dtype=torch.long) for p in runs for m in methods}
    absent = {(p, m): 0 for p in runs for m in methods}
    agree = {(p, m): 0 for p in ORDER_PAIRS for m in methods}
    pixels = 0
    for seed in tqdm(scene_seeds(split, n, start), desc="protocols", disable=not progress):
        scene = make_scene(seed)
        image = Image.fromarray(scene.image)
        target = torch.from_numpy(scene.labels)
        present = set(np.unique(scene.labels).tolist())
        rng = random.Random(seed)
        labels, named = {}, {}
        for run in runs:
            base = run.removesuffix(" reordered")
            if base != run:  # the same classes as the protocol's own run, in another order
                classes, bg = named[base]
                classes = rng.sample(classes, len(classes))
            else:
                classes, bg = protocol_classes(scene, run, rng)
                if background is not None and run != "objects-only":
                    bg = background
                named[run] = classes, bg
            got = pipe.segment(image, classes, method=list(methods), background=bg, **segment_kwargs)
            surface = CLASS_NAMES.index(scene.background)
            channel_ids = [CLASS_NAMES.index(c) for c in classes] + (
                [surface if run == "objects-only" else NO_CLASS] if bg else []
            )
            lookup = torch.tensor(channel_ids)
            for m in methods:
                pred = lookup[got[m].labels]
                labels[run, m] = pred
                conf[run, m] += confusion_matrix(pred, target, k)
                absent[run, m] += int(sum((pred == c).sum() for c in set(channel_ids) - present - {NO_CLASS}))
        for name, other in ORDER_PAIRS.items():
            if name in protocols:
                for m in methods:
                    agree[name, m] += int((labels[name, m] == labels[other, m]).sum())
        pixels += target.numel()
    table = {}
    for p in protocols:
        for m in methods:
            table.setdefault(p, {})[m] = {
                "miou": 100 * miou(conf[p, m], over="truth")[0],  # NO_CLASS is never the truth
                "absent_share": 100 * absent[p, m] / pixels,
                "agreement": 100 * agree[p, m] / pixels if p in ORDER_PAIRS else None,
            }
    return {"table": table, "n": n, "split": split, "methods": list(methods)}


def protocol_markdown(result: dict) -> str:
    methods = result["methods"]
    head = "| protocol | " + " | ".join(f"{m} mIoU | {m} absent % | {m} order agreement %" for m in methods) + " |"
    lines = [head, "|---|" + "---|" * (3 * len(methods))]
    for p, rows in result["table"].items():
        cells = []
        for m in methods:
            r = rows[m]
            cells += [
                f"{r['miou']:.1f}",
                f"{r['absent_share']:.1f}",
                "–" if r["agreement"] is None else f"{r['agreement']:.1f}",
            ]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
