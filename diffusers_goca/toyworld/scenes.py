"""Seeded synthetic scenes: a textured background and 1–3 coloured shapes, a caption naming them, pixel ground truth.

Classes are named as a user would name them: the background ("grass") and each object as "colour shape" ("red circle").
`CLASS_NAMES` fixes one id per class for the whole world, so ground truth of different scenes can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BACKGROUNDS = ("grass", "sky", "sand", "water", "wall")
COLOURS = {
    "red": (220, 30, 30),
    "yellow": (250, 220, 20),
    "purple": (140, 40, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# A pixel within this RGB distance of an object colour is drawn in it: the backgrounds' colours lie farther.
OBJECT_COLOUR_DISTANCE = 60
CLASS_NAMES = list(BACKGROUNDS) + [f"{c} {s}" for c in COLOURS for s in SHAPES]

# Train, test and validation seeds come from disjoint ranges, so the splits never share a scene. Settings are tuned
# on "validation", never on "test".
_SPLIT_OFFSET = {"train": 0, "test": 1_000_000_000, "validation": 2_000_000_000}
_SPLIT_SIZE = 1_000_000_000


def scene_seeds(split: str, n: int, start: int = 0) -> list[int]:
    """The first `n` seeds (after `start`) of a split: "train", "test" or "validation"."""
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"split must be one of {sorted(_SPLIT_OFFSET)}, got {split!r}")
    if start + n > _SPLIT_SIZE:
        raise ValueError("a split holds at most 1e9 scenes")
    return [_SPLIT_OFFSET[split] + start + i for i in range(n)]


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    labels: np.ndarray  # int64 [H, W], ids into CLASS_NAMES
    caption: str
    background: str
    objects: list[str] = field(default_factory=list)  # "colour shape", in drawing order

    @property
    def classes(self) -> list[str]:
        """Classes present in the ground truth: the background first, then objects in caption order, no repeats."""
        present = set(np.unique(self.labels).tolist())
        ordered = [self.background] + list(dict.fromkeys(self.objects))
        return [c for c in ordered if CLASS_NAMES.index(c) in present]


def colour_labels(images: np.ndarray, colours: list[str]) -> np.ndarray:
    """Pixels read off their colour: images [..., 3] in [0, 1] (generated ones, too) → int64 [...], i + 1 where the
    nearest of `colours` (names of COLOURS) is colours[i] within OBJECT_COLOUR_DISTANCE, else 0."""
    rgb = np.array([COLOURS[c] for c in colours], np.float32)
    distance = np.linalg.norm(images[..., None, :] * 255 - rgb, axis=-1)
    return np.where(distance.min(-1) < OBJECT_COLOUR_DISTANCE, distance.argmin(-1) + 1, 0)


def _background(name: str, size: int, rng: np.random.RandomState) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.rand(size, size).astype(np.float32)
    if name == "grass":
        base = np.array([40, 150, 50], np.float32)
        img = base + (noise[..., None] - 0.5) * np.array([30, 60, 30], np.float32)
        blades = (rng.rand(size, size) < 0.12)[..., None]
        img = np.where(blades, img * 0.7, img)
    elif name == "sky":
        top, bottom = np.array([70, 130, 230], np.float32), np.array([170, 210, 250], np.float32)
        img = top + (bottom - top) * yy[..., None] + (noise[..., None] - 0.5) * 8
    elif name == "sand":
        base = np.array([215, 185, 130], np.float32)
        img = base + (noise[..., None] - 0.5) * 40
    elif name == "water":
        phase = rng.rand() * 6.28
        waves = np.sin(yy * 25 + np.sin(xx * 6 + phase) * 1.5)
        img = np.array([20, 80, 150], np.float32) + waves[..., None] * np.array([10, 25, 30], np.float32)
    elif name == "wall":
        img = np.full((size, size, 3), 150, np.float32) + (noise[..., None] - 0.5) * 16
        brick_h = max(size // 8, 2)
        row = (np.arange(size) // brick_h)[:, None]
        col = (np.arange(size)[None, :] + (row % 2) * brick_h) % (2 * brick_h)
        mortar = ((np.arange(size)[:, None] % brick_h) == 0) | (col == 0)
        img = np.where(mortar[..., None], 95.0, img) * np.array([1.0, 0.9, 0.85], np.float32)
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.clip(img, 0, 255)


def _shape_mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    if shape == "triangle":  # apex up; width grows linearly down to the base
        top, bottom = cy - r, cy + r * 0.8
        frac = (yy - top) / (bottom - top)
        return (frac >= 0) & (frac <= 1) & (np.abs(xx - cx) <= frac * r)
    raise ValueError(f"unknown shape {shape!r}")


def make_scene(seed: int, size: int = 32) -> Scene:
    """Draw one scene, deterministically from `seed`."""
    rng = np.random.RandomState(seed % (2**32))
    background = BACKGROUNDS[rng.randint(len(BACKGROUNDS))]
    image = _background(background, size, rng)
    labels = np.full((size, size), CLASS_NAMES.index(background), np.int64)
    objects = []
    for _ in range(rng.randint(1, 4)):
        colour = list(COLOURS)[rng.randint(len(COLOURS))]
        shape = SHAPES[rng.randint(len(SHAPES))]
        r = size * rng.uniform(0.15, 0.26)
        cy, cx = rng.uniform(r, size - r, size=2)
        mask = _shape_mask(shape, size, cy, cx, r)
        shade = rng.uniform(0.85, 1.05)
        image[mask] = np.clip(np.array(COLOURS[colour], np.float32) * shade, 0, 255)
        labels[mask] = CLASS_NAMES.index(f"{colour} {shape}")
        objects.append(f"{colour} {shape}")
    return Scene(image.astype(np.uint8), labels, _caption(objects, background, rng), background, objects)


def _caption(objects: list[str], background: str, rng: np.random.RandomState) -> str:
    named = [f"a {o}" for o in objects]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    template = rng.randint(3)
    if template == 0:
        return f"{listed} on {background}"
    if template == 1:
        return f"{background} with {listed}"
    return f"{listed}, {background}"
