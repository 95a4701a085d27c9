"""A small attribute classifier of toy scenes: the toy world's Inception and CLIP.

It reads a 32×32 scene and says which background it has, which of the 15 "colour shape" classes it shows and how
many objects it holds. Its pooled features stand in for Inception's in a *toy FID* (the same Fréchet distance code
as the real benchmark), and its predictions give a *toy CLIP score*: how faithful an image is to its caption.

    python -m diffusers_goca.toyworld.classifier --out diffusers_goca/toyworld/classifier   # trains it (CPU, minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .scenes import BACKGROUNDS, CLASS_NAMES, COLOURS, SHAPES, make_scene, scene_seeds

TOY_CLASSIFIER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classifier")
OBJECTS = CLASS_NAMES[len(BACKGROUNDS) :]  # the 15 "colour shape" classes
MAX_OBJECTS = 3
_OBJECT_PATTERN = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")\b")


class ToySceneClassifier(nn.Module):
    """[B, 3, 32, 32] in [0, 1] → pooled features [B, width·8] (mean and max over the 8×8 grid: the max keeps an
    object's colour bound to its shape) and three heads: background logits [B, 5], object presence logits [B, 15],
    object count logits [B, 3] (1, 2 or 3 objects drawn)."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.config = {"width": width}

        def block(i, o, stride):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.BatchNorm2d(o), nn.ReLU())

        self.body = nn.Sequential(
            block(3, width, 1),
            block(width, width * 2, 2),
            block(width * 2, width * 2, 1),
            block(width * 2, width * 4, 2),
            block(width * 4, width * 4, 1),
        )
        self.background = nn.Linear(width * 8, len(BACKGROUNDS))
        self.objects = nn.Linear(width * 8, len(OBJECTS))
        self.count = nn.Linear(width * 8, MAX_OBJECTS)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.body(x * 2 - 1).flatten(2)
        return torch.cat([grid.mean(-1), grid.amax(-1)], -1)

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return self.background(f), self.objects(f), self.count(f)


def scene_targets(scene) -> tuple[int, np.ndarray, int]:
    """(background id, presence [15] of the object classes visible in the pixels, objects drawn − 1)."""
    visible = {CLASS_NAMES[i] for i in np.unique(scene.labels)}
    return (
        BACKGROUNDS.index(scene.background),
        np.array([o in visible for o in OBJECTS], np.float32),
        len(scene.objects) - 1,
    )


def _batch(seeds: Sequence[int]):
    scenes = [make_scene(s) for s in seeds]
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    targets = [scene_targets(s) for s in scenes]
    return (
        x,
        torch.tensor([t[0] for t in targets]),
        torch.from_numpy(np.stack([t[1] for t in targets])),
        torch.tensor([t[2] for t in targets]),
    )


def _pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR), np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def train_classifier(
    out: str, steps: int = 2000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, progress: bool = True
) -> dict:
    """Train on fresh train-split scenes (each seed seen once), then measure on 1000 held-out test scenes; save the
    weights and a config / accuracy JSON to `out`."""
    torch.manual_seed(seed)
    model = ToySceneClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    bce, ce = nn.BCEWithLogitsLoss(), nn.CrossEntropyLoss()
    start = time.time()
    for step in tqdm(range(steps), desc="toy classifier", disable=not progress):
        x, bg, obj, count = _batch(scene_seeds("train", batch_size, start=step * batch_size))
        lb, lo, lc = model(x)
        loss = ce(lb, bg) + bce(lo, obj) + ce(lc, count)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    accuracy = measure(model, scene_seeds("test", 1000))
    os.makedirs(out, exist_ok=True)
    from safetensors.torch import save_file

    save_file(model.state_dict(), os.path.join(out, "model.safetensors"))
    info = {
        "config": model.config,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(time.time() - start),
        "test_accuracy_1000_scenes": accuracy,
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


@torch.no_grad()
def measure(model: ToySceneClassifier, seeds: Sequence[int]) -> dict:
    """Accuracy on real scenes: background, every object class's presence, the count, and all of them at once."""
    x, bg, obj, count = _batch(seeds)
    lb, lo, lc = model(x)
    bg_ok, obj_ok, count_ok = lb.argmax(-1) == bg, ((lo > 0).float() == obj).all(-1), lc.argmax(-1) == count
    return {
        "background": float(bg_ok.float().mean()),
        "objects (all 15 right)": float(obj_ok.float().mean()),
        "object presence (per class)": float(((lo > 0).float() == obj).float().mean()),
        "count": float(count_ok.float().mean()),
        "all": float((bg_ok & obj_ok & count_ok).float().mean()),
    }


def load_classifier(path: str | None = None) -> ToySceneClassifier:
    """The shipped classifier (or one trained to `path`), in eval mode."""
    from safetensors.torch import load_file

    path = path or TOY_CLASSIFIER_DIR
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)["config"]
    model = ToySceneClassifier(**config)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model.eval()


def caption_contents(caption: str) -> tuple[str | None, list[str], int]:
    """(background, distinct object classes, objects named) of a toy caption."""
    named = [f"{c} {s}" for c, s in _OBJECT_PATTERN.findall(caption.lower())]
    background = next((b for b in BACKGROUNDS if re.search(rf"\b{b}\b", caption.lower())), None)
    return background, list(dict.fromkeys(named)), len(named)


class ToySceneScorer:
    """The toy world's stand-ins for Inception features and the CLIP score, from one `ToySceneClassifier`."""

    def __init__(self, model: ToySceneClassifier | None = None):
        self.model = model or load_classifier()

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> np.ndarray:
        """Pooled features [B, D]: the FID `Extractor` of the toy world."""
        return self.model.features(_pixels(images)).numpy()

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        """Caption faithfulness per image, 0…100: the share of the caption's checks the classifier finds true (the
        background; each named object class present; the number of objects named)."""
        lb, lo, lc = self.model(_pixels(images))
        out = []
        for b_logits, o_logits, c_logits, caption in zip(lb, lo, lc, captions):
            background, objects, count = caption_contents(caption)
            checks = [] if background is None else [BACKGROUNDS[int(b_logits.argmax())] == background]
            checks += [bool(o_logits[OBJECTS.index(o)] > 0) for o in objects]
            if 1 <= count <= MAX_OBJECTS:
                checks.append(int(c_logits.argmax()) + 1 == count)
            out.append(100.0 * float(np.mean(checks)) if checks else float("nan"))
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=TOY_CLASSIFIER_DIR)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    info = train_classifier(args.out, args.steps, args.batch_size, seed=args.seed)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
