"""Segmentation results and their pictures."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

# A fixed, distinct palette (class k gets colour k), the background a neutral grey.
_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200),
    (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
], dtype=np.uint8)
_BACKGROUND_COLOUR = np.array((40, 40, 40), dtype=np.uint8)


def _picture(image) -> Image.Image | None:
    """`image` as a PIL RGB image, read as `segment` reads its input: a PIL image, a path, or an array / tensor (the
    images of `output_type="np"` or `"pt"`: floats in [0, 1])."""
    from .mixin import _as_rgb  # the mixin imports this module

    return None if image is None else _as_rgb(image)


def palette(classes: list[str]) -> np.ndarray:
    colours = np.stack([_PALETTE[i % len(_PALETTE)] for i in range(len(classes))])
    for i, name in enumerate(classes):
        if name == "background":
            colours[i] = _BACKGROUND_COLOUR
    return colours


@dataclass
class GoCASegmentation:
    """labels: LongTensor [H, W] of indices into `classes`; scores: FloatTensor [len(classes), H, W];
    classes: the requested classes, plus "background" when a background channel is used; absent: the classes that
    the presence test (`segment(..., presence=True)`) judged absent, which take no pixel (their scores are kept)."""

    labels: torch.Tensor
    scores: torch.Tensor
    classes: list[str]
    image: Image.Image | None = None
    absent: list[str] = field(default_factory=list)

    def colorize(self) -> Image.Image:
        """The label map in the class palette."""
        return Image.fromarray(palette(self.classes)[self.labels.cpu().numpy()])

    def overlay(self, image=None, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        """The labels blended over `image` (default: the segmented image; any image `segment` takes, such as a
        generated one of any `output_type`), with a legend of the classes present."""
        image = _picture(image if image is not None else self.image)
        colours = self.colorize()
        if image is None:
            out = colours
        else:
            base = image.resize(colours.size, Image.BILINEAR)
            out = Image.blend(base, colours, alpha)
        return _with_legend(out, self.classes, self.labels) if legend else out

    def heatmaps(self, image=None, columns: int = 4, cell: int = 192) -> Image.Image:
        """A grid with one heat map per class (scores in [0, 1] as a blue→red ramp over `image`, taken as in
        `overlay`), titled, `columns` (≥ 1) per row; each tile fits in `cell`×`cell` pixels at the image's aspect
        ratio."""
        if not isinstance(columns, numbers.Integral) or columns < 1:
            raise ValueError(f"columns must be an integer ≥ 1, got {columns!r}")
        image = _picture(image if image is not None else self.image)
        n = len(self.classes)
        columns = min(columns, n)
        rows = -(-n // columns)
        h, w = self.scores.shape[-2:]
        tile_size = (max(1, round(cell * min(1, w / h))), max(1, round(cell * min(1, h / w))))
        width, height = tile_size
        grid = Image.new("RGB", (columns * width, rows * (height + 16)), "white")
        draw = ImageDraw.Draw(grid)
        for k, name in enumerate(self.classes):
            s = self.scores[k].float()
            s = ((s - s.min()) / (s.max() - s.min()).clamp_min(1e-12)).cpu().numpy()
            heat = np.stack([s, 1 - np.abs(2 * s - 1), 1 - s], -1) * 255
            tile = Image.fromarray(heat.astype(np.uint8)).resize(tile_size, Image.BILINEAR)
            if image is not None:
                tile = Image.blend(image.resize(tile_size, Image.BILINEAR), tile, 0.6)
            x, y = (k % columns) * width, (k // columns) * (height + 16)
            grid.paste(tile, (x, y + 16))
            draw.text((x + 4, y + 2), name, fill="black")
        return grid


def _with_legend(img: Image.Image, classes: list[str], labels: torch.Tensor) -> Image.Image:
    present = sorted(set(labels.unique().tolist()))
    colours = palette(classes)
    row_h = 14
    scale = max(1, 256 // max(img.size))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    out = Image.new("RGB", (max(img.width, 160), img.height + row_h * len(present) + 4), "white")
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for j, k in enumerate(present):
        y = img.height + 2 + j * row_h
        draw.rectangle([2, y + 2, 12, y + 11], fill=tuple(int(c) for c in colours[k]))
        draw.text((16, y), classes[k], fill="black")
    return out
