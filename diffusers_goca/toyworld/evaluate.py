"""Segmentation quality on held-out toy scenes: the same scenes, the same capture, every method."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..functional.metrics import confusion_matrix, miou
from .scenes import CLASS_NAMES, make_scene, scene_seeds


def evaluate_segmentation(
    pipe,
    n: int = 100,
    methods: Sequence[str] = ("goca", "vanilla", "manual", "diffsegmenter"),
    timestep: int | None = 100,
    seed: int = 0,
    start: int = 0,
    progress: bool = True,
    keep: int = 0,
    configs: dict | None = None,
    **options,
) -> dict:
    """mIoU (standard protocol over the world's classes) of each method on test scenes `start`..`start+n`.

    Oracle classes as a user names them (the background, then "colour shape" for each visible object), no extra
    background channel (the scene's background is a class). Also reports the all-background baseline (chance level).
    configs: name → (method, options) to compare settings (default: each of `methods` with `options`); the configs
    that share their options share one forward per scene. timestep None: each family's own rule.
    keep: return the first `keep` scenes with their predictions, for pictures.
    """
    configs = configs or {m: (m, options) for m in methods}
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for name, (method, opts) in configs.items():
        groups.setdefault(tuple(sorted(opts.items())), []).append((name, method))
    k = len(CLASS_NAMES)
    conf = {m: torch.zeros(k, k, dtype=torch.long) for m in list(configs) + ["all-background"]}
    examples = []
    for s in tqdm(scene_seeds("test", n, start), desc="held-out scenes", disable=not progress):
        scene = make_scene(s)
        target = torch.from_numpy(scene.labels)
        ids = torch.tensor([CLASS_NAMES.index(c) for c in scene.classes])
        results = {}
        for opts, members in groups.items():
            got = pipe.segment(
                Image.fromarray(scene.image),
                scene.classes,
                method=[m for _, m in members],
                timestep=timestep,
                seed=seed,
                background=False,
                **dict(opts),
            )
            results.update({name: got[method] for name, method in members})
        for m, r in results.items():
            conf[m] += confusion_matrix(ids[r.labels], target, k)
        conf["all-background"] += confusion_matrix(
            torch.full_like(target, CLASS_NAMES.index(scene.background)), target, k
        )
        if len(examples) < keep:
            examples.append((scene, results))
    table = {m: miou(c)[0] for m, c in conf.items()}
    return {"miou": table, "n": n, "timestep": timestep, "examples": examples}


def markdown_table(table: dict[str, float], n: int) -> str:
    rows = [f"| method | mIoU on {n} held-out scenes |", "|---|---|"]
    rows += [f"| {m} | {100 * v:.1f} |" for m, v in table.items()]
    return "\n".join(rows)


def upscale(img: np.ndarray | Image.Image, factor: int = 4) -> Image.Image:
    img = img if isinstance(img, Image.Image) else Image.fromarray(img)
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST)
