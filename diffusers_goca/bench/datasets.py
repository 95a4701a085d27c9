"""Segmentation datasets over their standard on-disk layouts, under two label protocols (docs/official_code.md).

standard: the benchmark's usual convention, 255 = ignore. official: the GoCA code's own, a "background" class at
index 0 that takes every ignore / void / unlabelled / "other" pixel (no 255 is left).

    ds = load_dataset("voc", "data/VOCdevkit", protocol="official")    # split defaults to the protocol's
    sample = ds[0]      # SegSample(key, image: PIL RGB, label: uint8 [H, W])
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

PROTOCOLS = ("standard", "official")
IGNORE = 255

VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dining table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "potted plant",
    "sheep",
    "sofa",
    "train",
    "tv monitor",
]
CONTEXT59_CLASSES = [
    "aeroplane",
    "bag",
    "bed",
    "bedclothes",
    "bench",
    "bicycle",
    "bird",
    "boat",
    "book",
    "bottle",
    "building",
    "bus",
    "cabinet",
    "car",
    "cat",
    "ceiling",
    "chair",
    "cloth",
    "computer",
    "cow",
    "cup",
    "curtain",
    "dog",
    "door",
    "fence",
    "floor",
    "flower",
    "food",
    "grass",
    "ground",
    "horse",
    "keyboard",
    "light",
    "motorbike",
    "mountain",
    "mouse",
    "person",
    "plate",
    "platform",
    "potted plant",
    "road",
    "rock",
    "sheep",
    "shelves",
    "sidewalk",
    "sign",
    "sky",
    "snow",
    "sofa",
    "table",
    "track",
    "train",
    "tree",
    "truck",
    "tv monitor",
    "wall",
    "water",
    "window",
    "wood",
]
# The 59 classes' ids in the full 459-class Pascal Context labels (the .mat `LabelMap` of the official layout).
CONTEXT459_IDS = [
    2,
    9,
    18,
    19,
    22,
    23,
    25,
    31,
    33,
    34,
    44,
    45,
    46,
    59,
    65,
    68,
    72,
    80,
    85,
    98,
    104,
    105,
    113,
    115,
    144,
    158,
    159,
    162,
    187,
    189,
    207,
    220,
    232,
    258,
    259,
    260,
    284,
    295,
    296,
    308,
    324,
    326,
    347,
    349,
    354,
    355,
    360,
    366,
    368,
    397,
    415,
    416,
    420,
    424,
    427,
    440,
    445,
    454,
    458,
]
CITYSCAPES_CLASSES = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]
CITYSCAPES_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]  # → train ids 0..18
ADE20K_CLASSES = [
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
]
assert len(CONTEXT59_CLASSES) == len(CONTEXT459_IDS) == 59 and len(ADE20K_CLASSES) == 150


@dataclass
class SegSample:
    key: str  # unique and stable within the dataset: what a resumed run skips by
    image: Image.Image  # RGB
    label: np.ndarray  # uint8 [H, W]: indices into the dataset's classes, 255 = ignore


def lookup_table(pairs: dict[int, int], default: int, size: int = 65536) -> np.ndarray:
    """Raw label value → class id as one array (vectorised remapping); unlisted values → `default`."""
    table = np.full(size, default, dtype=np.uint8)
    for raw, cls in pairs.items():
        table[raw] = cls
    return table


def _first_existing(root: Path, candidates: list[str], what: str) -> Path:
    for c in candidates:
        if (root / c).exists():
            return root / c
    raise FileNotFoundError(f"{what}: none of {[str(root / c) for c in candidates]} exists")


def _split_ids(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"split list {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class SegDataset:
    """A list of samples, decoded lazily. Subclasses set `classes`, `background` and fill `self._items` with
    (key, image path, label loader) in `__init__`."""

    name = "?"

    def __init__(self, protocol: str = "standard", limit: int | None = None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        self.limit = limit
        self.classes: list[str] = []
        self.background: int | None = None
        self._items: dict[str, tuple[Callable[[], Image.Image], Callable[[], np.ndarray]]] = {}

    def _finish(self, items: dict) -> None:
        keys = sorted(items)[: self.limit]
        if not keys:
            raise FileNotFoundError(f"{self.name}: no samples found")
        self._items = {k: items[k] for k in keys}

    def keys(self) -> list[str]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> SegSample:
        return self.sample(self.keys()[i])

    def sample(self, key: str) -> SegSample:
        image, label = self._items[key]
        return SegSample(key, image(), np.ascontiguousarray(label(), dtype=np.uint8))

    def present_classes(self, label: np.ndarray) -> list[int]:
        values = np.unique(label)
        return [int(v) for v in values if v != IGNORE]


def _rgb(path: Path) -> Callable[[], Image.Image]:
    return lambda: Image.open(path).convert("RGB")


def _png(path: Path, table: np.ndarray | None = None) -> Callable[[], np.ndarray]:
    def load():
        raw = np.array(Image.open(path))
        return raw if table is None else table[raw]

    return load


class VOC(SegDataset):
    """PASCAL VOC 2012: `VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/<split>.txt}`
    under root (root may also be `VOCdevkit` or `VOC2012` itself). 21 classes with background; 255 = boundary
    (official: background). The official GoCA table evaluates VOC on `train`."""

    name = "voc"

    def __init__(self, root, split=None, protocol="standard", limit=None):
        super().__init__(protocol, limit)
        base = _first_existing(Path(root), ["VOCdevkit/VOC2012", "VOC2012", "."], "VOC2012 folder")
        if not (base / "SegmentationClass").exists():
            raise FileNotFoundError(f"{base / 'SegmentationClass'} not found (expected the VOC2012 layout)")
        split = split or ("train" if protocol == "official" else "val")
        self.classes, self.background = list(VOC_CLASSES), 0
        table = lookup_table({i: i for i in range(21)}, 0 if protocol == "official" else IGNORE, 256)
        self._finish(
            {
                i: (_rgb(base / "JPEGImages" / f"{i}.jpg"), _png(base / "SegmentationClass" / f"{i}.png", table))
                for i in _split_ids(base / "ImageSets" / "Segmentation" / f"{split}.txt")
            }
        )


class Context(SegDataset):
    """PASCAL Context on VOC2010, 59 classes (+ background as class 0 for `context60` and the official protocol).

    Layouts: mmsegmentation's converted `VOC2010/SegmentationClassContext/<id>.png` (0 = background, 1..59) with
    `VOC2010/ImageSets/SegmentationContext/<split>.txt`; or the official raw `trainval/<id>.mat` (`LabelMap` over the
    full 459 classes; needs scipy) with images in `VOC2010/JPEGImages`."""

    name = "context"

    def __init__(self, root, split=None, protocol="standard", limit=None, with_background: bool | None = None):
        super().__init__(protocol, limit)
        root = Path(root)
        with_background = protocol == "official" if with_background is None else with_background
        if protocol == "official":
            with_background = True
        self.classes = (["background"] if with_background else []) + list(CONTEXT59_CLASSES)
        self.background = 0 if with_background else None
        shift = 0 if with_background else -1  # converted value v (0 = background) → class id v + shift
        split = split or "val"
        voc = _first_existing(root, ["VOCdevkit/VOC2010", "VOC2010", "."], "VOC2010 folder")
        if (voc / "SegmentationClassContext").exists():
            table = lookup_table({v: v + shift for v in range(1 if shift else 0, 60)}, IGNORE, 256)
            ids = _split_ids(voc / "ImageSets" / "SegmentationContext" / f"{split}.txt")
            self._finish(
                {
                    i: (
                        _rgb(voc / "JPEGImages" / f"{i}.jpg"),
                        _png(voc / "SegmentationClassContext" / f"{i}.png", table),
                    )
                    for i in ids
                }
            )
            return
        mats = _first_existing(
            root,
            ["trainval", "VOCdevkit/trainval"],
            "Pascal Context labels (SegmentationClassContext PNGs or trainval/*.mat)",
        )
        table = lookup_table(
            {raw: k + 1 + shift for k, raw in enumerate(CONTEXT459_IDS)}, 0 if with_background else IGNORE
        )
        listed = voc / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        ids = _split_ids(listed) if listed.exists() else [p.stem for p in mats.glob("*.mat")]
        self._finish(
            {
                i: (_rgb(voc / "JPEGImages" / f"{i}.jpg"), _mat(mats / f"{i}.mat", table))
                for i in ids
                if (mats / f"{i}.mat").exists()
            }
        )


def _mat(path: Path, table: np.ndarray) -> Callable[[], np.ndarray]:
    def load():
        try:
            from scipy.io import loadmat
        except ImportError:
            raise ImportError("reading Pascal Context .mat labels needs scipy: pip install scipy") from None
        return table[loadmat(str(path))["LabelMap"].astype(np.int64)]

    return load


class COCOObject(SegDataset):
    """COCO-Object: COCO val2017's 80 thing classes + background. Images `val2017/<name>.jpg`; labels from the
    panoptic annotations (`annotations/panoptic_val2017.json` + `panoptic_val2017/<name>.png`, preferred: what the
    paper used; stuff and unlabelled → background) or from the instance annotations (`annotations/instances_val2017.json`,
    polygons and RLE; crowd regions are ignored under the standard protocol, their class under the official)."""

    name = "coco-object"

    def __init__(self, root, split=None, protocol="standard", limit=None):
        super().__init__(protocol, limit)
        root = Path(root)
        split = split or "val2017"
        ann = root / "annotations"
        panoptic, instances = ann / f"panoptic_{split}.json", ann / f"instances_{split}.json"
        source = panoptic if panoptic.exists() else instances
        if not source.exists():
            raise FileNotFoundError(f"neither {panoptic} nor {instances} found (COCO annotations layout)")
        data = json.loads(source.read_text())
        things = sorted((c for c in data["categories"] if c.get("isthing", 1)), key=lambda c: c["id"])
        self.classes = ["background"] + [c["name"] for c in things]
        self.background = 0
        to_class = {c["id"]: k + 1 for k, c in enumerate(things)}
        images = root / split
        if source == panoptic:
            pngs = _first_existing(root, [f"annotations/panoptic_{split}", f"panoptic_{split}"], "panoptic PNG folder")
            items = {}
            for a in data["annotations"]:
                stem = Path(a["file_name"]).stem
                segments = {s["id"]: to_class.get(s["category_id"], 0) for s in a["segments_info"]}
                items[stem] = (_rgb(images / f"{stem}.jpg"), _panoptic(pngs / a["file_name"], segments))
            self._finish(items)
            return
        by_image: dict[int, list] = {}
        for a in data["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        crowd = 0 if protocol == "official" else IGNORE
        self._finish(
            {
                Path(im["file_name"]).stem: (
                    _rgb(images / im["file_name"]),
                    _instances(
                        by_image.get(im["id"], []), im["height"], im["width"], to_class, crowd, protocol == "official"
                    ),
                )
                for im in data["images"]
            }
        )


def _panoptic(path: Path, segments: dict[int, int]) -> Callable[[], np.ndarray]:
    def load():
        rgb = np.array(Image.open(path).convert("RGB")).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        out = np.zeros(ids.shape, np.uint8)
        for seg_id, cls in segments.items():
            out[ids == seg_id] = cls
        return out

    return load


def _instances(anns, h, w, to_class, crowd_value, crowd_as_class) -> Callable[[], np.ndarray]:
    def load():
        out = np.zeros((h, w), np.uint8)
        # Larger instances first, so a smaller one lying on top of a larger one keeps its pixels.
        for a in sorted(anns, key=lambda a: -a.get("area", 0)):
            if a["category_id"] not in to_class:
                continue
            mask = decode_segmentation(a["segmentation"], h, w)
            out[mask] = to_class[a["category_id"]] if (not a.get("iscrowd") or crowd_as_class) else crowd_value
        return out

    return load


def decode_segmentation(segmentation, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed RLE or compressed RLE string) as a bool mask [h, w]."""
    if isinstance(segmentation, list):
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        for poly in segmentation:
            if len(poly) >= 6:
                draw.polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)], fill=1)
        return np.array(img, dtype=bool)
    counts = segmentation["counts"]
    rh, rw = segmentation.get("size", (h, w))
    if isinstance(counts, str):
        counts = rle_counts_from_string(counts)
    flat = np.zeros(rh * rw, dtype=bool)
    pos, value = 0, False
    for c in counts:
        flat[pos : pos + c] = value
        pos, value = pos + c, not value
    return flat.reshape(rw, rh).T  # column-major (Fortran order)


def rle_counts_from_string(s: str) -> list[int]:
    """COCO's compressed RLE: each count in 5-bit groups of chars (value + 48), 0x20 = more groups follow, the last
    group's 0x10 bit = negative; counts after the second are stored as differences to the one two places before."""
    counts, i = [], 0
    while i < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[i]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i, k = i + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


class Cityscapes(SegDataset):
    """Cityscapes: `leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`, `gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`;
    label ids → the 19 train ids (void → 255; official: background 0 and the 19 shifted by one)."""

    name = "cityscapes"

    def __init__(self, root, split=None, protocol="standard", limit=None):
        super().__init__(protocol, limit)
        root = Path(root)
        split = split or "val"
        official = protocol == "official"
        self.classes = (["background"] if official else []) + list(CITYSCAPES_CLASSES)
        self.background = 0 if official else None
        table = lookup_table(
            {raw: k + official for k, raw in enumerate(CITYSCAPES_LABEL_IDS)}, 0 if official else IGNORE, 256
        )
        gt = root / "gtFine" / split
        if not gt.exists():
            raise FileNotFoundError(f"{gt} not found (expected the Cityscapes gtFine / leftImg8bit layout)")
        items = {}
        for path in gt.glob("*/*_gtFine_labelIds.png"):
            stem = path.name[: -len("_gtFine_labelIds.png")]
            key = f"{path.parent.name}/{stem}"
            items[key] = (
                _rgb(root / "leftImg8bit" / split / path.parent.name / f"{stem}_leftImg8bit.png"),
                _png(path, table),
            )
        self._finish(items)


class ADE20K(SegDataset):
    """ADE20K SceneParsing: `ADEChallengeData2016/{images,annotations}/<split>/<stem>.{jpg,png}`, values 0 = other,
    1..150 the classes (standard: 150 classes, other → 255; official: background 0 + the 150)."""

    name = "ade20k"

    def __init__(self, root, split=None, protocol="standard", limit=None):
        super().__init__(protocol, limit)
        base = _first_existing(Path(root), ["ADEChallengeData2016", "."], "ADEChallengeData2016 folder")
        split = split or "validation"
        official = protocol == "official"
        self.classes = (["background"] if official else []) + list(ADE20K_CLASSES)
        self.background = 0 if official else None
        table = lookup_table({v: v - 1 + official for v in range(1, 151)}, 0 if official else IGNORE, 256)
        ann = base / "annotations" / split
        if not ann.exists():
            raise FileNotFoundError(f"{ann} not found (expected the ADEChallengeData2016 layout)")
        self._finish(
            {p.stem: (_rgb(base / "images" / split / f"{p.stem}.jpg"), _png(p, table)) for p in ann.glob("*.png")}
        )


class ToyWorld(SegDataset):
    """The project's synthetic scenes (`diffusers_goca.toyworld`): every pixel labelled with one of its 20 classes
    (the scene's background among them), so both protocols are the same and there is no background class. `root`
    is unused; split "test" (held out, default), "validation" (held out, for tuning) or "train"; `limit` scenes (default 100)."""

    name = "toyworld"

    def __init__(self, root=None, split=None, protocol="standard", limit=None):
        super().__init__(protocol, limit)
        from ..toyworld.scenes import CLASS_NAMES, make_scene, scene_seeds

        split = split or "test"
        if split not in ("test", "train", "validation"):
            raise ValueError(f"toyworld split must be 'test', 'validation' or 'train', got {split!r}")
        self.classes = list(CLASS_NAMES)
        scenes = {f"scene-{s:07d}": s for s in scene_seeds(split, limit or 100)}
        self._finish(
            {
                k: (lambda s=s: Image.fromarray(make_scene(s).image), lambda s=s: make_scene(s).labels)
                for k, s in scenes.items()
            }
        )


DATASETS = {
    "voc": VOC,
    "context": Context,
    "context59": Context,
    "context60": Context,
    "coco-object": COCOObject,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "toyworld": ToyWorld,
}


def load_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str | None = None,
    protocol: str = "standard",
    limit: int | None = None,
) -> SegDataset:
    """A dataset by name (see `DATASETS`) over its standard layout under `root`."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if root is None and name != "toyworld":
        raise ValueError(f"{name} needs --root, the folder holding its standard layout")
    if name in ("context59", "context60"):
        return Context(root, split, protocol, limit, with_background=name == "context60")
    return DATASETS[name](root, split, protocol, limit)
