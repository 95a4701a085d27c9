"""Segmentation results and their pictures."""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .image_input import as_rgb

# A fixed, distinct palette (class k gets colour k), the background a neutral grey.
_PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
        (220, 190, 255),
        (170, 110, 40),
        (255, 250, 200),
        (128, 0, 0),
        (170, 255, 195),
        (128, 128, 0),
        (255, 215, 180),
        (0, 0, 128),
        (128, 128, 128),
    ],
    dtype=np.uint8,
)
_BACKGROUND_COLOUR = np.array((40, 40, 40), dtype=np.uint8)
# Pictures of small label maps (the toy world's are 32 px) are enlarged to about this many pixels on their longer
# side (by an integer factor, nearest neighbour), so that outlines and legends are drawn at a readable size.
_DISPLAY_SIDE = 256
OVERLAY_STYLES = ("side-by-side", "outline", "blend")


def _picture(image) -> Image.Image | None:
    """`image` as a PIL RGB image, read as `segment` reads its input: a PIL image, a path, or an array / tensor (the
    images of `output_type="np"` or `"pt"`: floats in [0, 1])."""
    return None if image is None else as_rgb(image)


def palette(classes: list[str]) -> np.ndarray:
    colours = np.stack([_PALETTE[i % len(_PALETTE)] for i in range(len(classes))])
    for i, name in enumerate(classes):
        if name == "background":
            colours[i] = _BACKGROUND_COLOUR
    return colours


@functools.lru_cache(maxsize=None)
def legend_font(size: int) -> ImageFont.ImageFont:
    """Pillow's own font at `size` pixels (scalable since Pillow 10.1; older Pillow: its fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_middle_left(draw: ImageDraw.ImageDraw, x: int, y: int, text: str, font) -> None:
    """`text` with its left edge at x, vertically centred on y (any font: anchors need FreeType)."""
    top, bottom = font.getbbox(text)[1::2]
    draw.text((x, y - (top + bottom) // 2), text, fill="black", font=font)


def draw_legend(names: list[str], colours, width: int = 0, font_size: int = 14, vertical: bool = False) -> Image.Image:
    """A legend block `width` pixels wide (wider if one entry needs it): each of `names` beside a square swatch
    filled with exactly its colour (`colours`: one RGB triple per name), entries flowing left to right and wrapping
    (vertical: one per line). Put it under or beside a picture drawn at its final size, so the text is never
    shrunk."""
    font = legend_font(font_size)
    pad, gap, swatch = max(4, font_size // 3), max(6, font_size // 2), font_size
    row_h = font_size + max(4, font_size // 3)
    entries = [(name, swatch + gap // 2 + int(np.ceil(font.getlength(name)))) for name in names]
    width = max(width, max((w for _, w in entries), default=0) + 2 * pad)
    rows, x = [[]], pad
    for k, (_, w) in enumerate(entries):
        if rows[-1] and (vertical or x + w > width - pad):
            rows.append([])
            x = pad
        rows[-1].append((k, x))
        x += w + 2 * gap
    out = Image.new("RGB", (width, 2 * pad + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for i, row in enumerate(rows):
        y = pad + i * row_h + (row_h - swatch) // 2
        for k, x in row:
            colour = tuple(int(c) for c in colours[k])
            # A one-pixel grey frame (so pale colours show on white), then the exact colour inside it.
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=colour, outline=(150, 150, 150))
            draw.rectangle([x + 1, y + 1, x + swatch - 2, y + swatch - 2], fill=colour)
            _text_middle_left(draw, x + swatch + gap // 2, y + swatch // 2, names[k], font)
    return out


def _stack(top: Image.Image, bottom: Image.Image) -> Image.Image:
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out


def _window(labels: np.ndarray, radius: int, reduce) -> np.ndarray:
    """`reduce` (np.minimum / np.maximum) of `labels` over a (2·radius + 1)² square around each pixel, edges repeated."""
    out = labels
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        n = out.shape[axis]
        acc = padded.take(range(0, n), axis=axis)
        for shift in range(1, 2 * radius + 1):
            acc = reduce(acc, padded.take(range(shift, shift + n), axis=axis))
        out = acc
    return out


def boundaries(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """bool [H, W]: the pixels within `width` pixels (8-neighbourhood steps) of a pixel with another label: the rim
    of each region, `width` pixels thick on each side of a boundary; the picture's own edges are no boundary."""
    radius = max(1, int(width))
    labels = np.asarray(labels)
    if labels.size and 0 <= labels.min() and labels.max() < 2**15:
        labels = labels.astype(np.int16)  # a quarter of the memory traffic of int64 on large pictures
    return _window(labels, radius, np.minimum) != _window(labels, radius, np.maximum)


@dataclass
class GoCASegmentation:
    """labels: LongTensor [H, W] of indices into `classes`; scores: FloatTensor [len(classes), H, W];
    classes: the requested classes, plus "background" when a background channel is used; presence: after the
    presence test (`segment(..., presence=True)`), each named class's weight in the argmax (`presence_weights`: 0 for
    a class judged absent, which takes no pixel; the scores are kept unweighted), else empty."""

    labels: torch.Tensor
    scores: torch.Tensor
    classes: list[str]
    image: Image.Image | None = None
    presence: dict[str, float] = field(default_factory=dict)

    @property
    def absent(self) -> list[str]:
        """The classes the presence test judged absent (weight 0), in the order of `classes`."""
        return [c for c in self.classes if self.presence.get(c, 1.0) == 0]

    @property
    def palette(self) -> np.ndarray:
        """uint8 [len(classes), 3]: the colour of each class in every picture (`palette(classes)`)."""
        return palette(self.classes)

    def mask(self, name: str) -> torch.Tensor:
        """BoolTensor [H, W]: the pixels labelled `name` (all False for a class that took no pixel)."""
        if name not in self.classes:
            raise ValueError(f"no class {name!r} in this segmentation; its classes are {self.classes}")
        return self.labels == self.classes.index(name)

    def pixel_shares(self) -> dict[str, float | None]:
        """Each class's share of the pixels in percent, in the order of `classes`; None for a class the presence test
        ruled out and that took no pixel (with every class ruled out and no background channel, the labels are the
        plain argmax: those classes have their shares)."""
        counts = torch.bincount(self.labels.flatten().cpu(), minlength=len(self.classes)).tolist()
        total = max(1, self.labels.numel())
        absent = set(self.absent)
        return {name: None if name in absent and n == 0 else 100 * n / total for name, n in zip(self.classes, counts)}

    def _legend_names(self) -> list[str]:
        """Each class with its share of the pixels, or "(absent)" for those the presence test ruled out."""
        names = []
        for name, share in self.pixel_shares().items():
            text = "absent" if share is None else "<1%" if 0 < share < 1 else f"{share:.0f}%"
            names.append(f"{name} ({text})")
        return names

    def _display_scale(self) -> int:
        return max(1, _DISPLAY_SIDE // max(self.labels.shape[-2:]))

    def _with_legend(self, picture: Image.Image, legend: bool) -> Image.Image:
        if not legend:
            return picture
        font_size = max(14, round(picture.width / 40))
        return _stack(picture, draw_legend(self._legend_names(), self.palette, picture.width, font_size))

    def colorize(self, legend: bool = False) -> Image.Image:
        """The label map in the exact class colours (`palette`), one pixel per label. legend: enlarged as the overlay
        is (small maps to about 256 px, nearest neighbour) with each class's swatch, name and share of the pixels
        under it."""
        colours = Image.fromarray(self.palette[self.labels.cpu().numpy()])
        if not legend:
            return colours
        scale = self._display_scale()
        return self._with_legend(colours.resize((colours.width * scale, colours.height * scale), Image.NEAREST), True)

    def overlay(
        self,
        image=None,
        alpha: float = 0.5,
        legend: bool = True,
        style: str = "side-by-side",
        outline: int | None = None,
    ) -> Image.Image:
        """The segmentation over `image` (default: the segmented image; any image `segment` takes, such as a
        generated one of any `output_type`), in colours that match the legend exactly.

        style: "side-by-side" (default): the image with each region outlined in its class colour, beside the label
        map; "outline": the outlined image alone; "blend": the colours blended over the image with weight `alpha`
        (tints shift: yellow over blue reads teal), outlined in the exact colours. Without an image: the label map.
        legend: each class's swatch, name and share of the pixels, under the picture. outline: the outlines'
        thickness in pixels of the picture (None: one per 256 px of its longer side, at least 2; 0: none).
        Small label maps (the toy world's 32 px) are enlarged by an integer factor to about 256 px first.
        """
        if style not in OVERLAY_STYLES:
            raise ValueError(f"style must be one of {OVERLAY_STYLES}, got {style!r}")
        image = _picture(image if image is not None else self.image)
        scale = self._display_scale()
        h, w = self.labels.shape[-2:]
        labels = self.labels.cpu().numpy().repeat(scale, 0).repeat(scale, 1)
        colours = self.palette[labels]
        if image is None:
            return self._with_legend(Image.fromarray(colours), legend)
        base = np.asarray(image.resize((w, h), Image.BILINEAR).resize((w * scale, h * scale), Image.NEAREST))
        if style == "blend":
            base = np.asarray(Image.blend(Image.fromarray(base), Image.fromarray(colours), alpha))
        thickness = max(2, round(max(labels.shape) / 256)) if outline is None else int(outline)
        drawn = base.copy()
        if thickness > 0:
            rim = boundaries(labels, thickness)
            drawn[rim] = colours[rim]
        if style != "side-by-side":
            return self._with_legend(Image.fromarray(drawn), legend)
        gap = max(4, scale)
        both = Image.new("RGB", (2 * labels.shape[1] + gap, labels.shape[0]), "white")
        both.paste(Image.fromarray(drawn), (0, 0))
        both.paste(Image.fromarray(colours), (labels.shape[1] + gap, 0))
        return self._with_legend(both, legend)

    def heatmaps(self, image=None, columns: int = 4, cell: int = 192, legend: bool = False) -> Image.Image:
        """A grid with one heat map per class (scores in [0, 1] as a blue→red ramp over `image`, taken as in
        `overlay`), titled, `columns` (≥ 1) per row; each tile fits in `cell`×`cell` pixels at the image's aspect
        ratio. legend: a colour bar of the ramp (each tile's lowest score → its highest) under the grid."""
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
        font = legend_font(12)
        for k, name in enumerate(self.classes):
            s = self.scores[k].float()
            s = ((s - s.min()) / (s.max() - s.min()).clamp_min(1e-12)).cpu().numpy()
            tile = Image.fromarray(_ramp(s)).resize(tile_size, Image.BILINEAR)
            if image is not None:
                tile = Image.blend(image.resize(tile_size, Image.BILINEAR), tile, 0.6)
            x, y = (k % columns) * width, (k // columns) * (height + 16)
            grid.paste(tile, (x, y + 16))
            draw.text((x + 4, y + 1), name, fill="black", font=font)
        return _stack(grid, _colour_bar(grid.width)) if legend else grid


def _ramp(s: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] → uint8 RGB: blue (0) → green (0.5) → red (1)."""
    return (np.stack([s, 1 - np.abs(2 * s - 1), 1 - s], -1) * 255).astype(np.uint8)


def _colour_bar(width: int, font_size: int = 14) -> Image.Image:
    font = legend_font(font_size)
    low, high = "lowest score", "highest score"
    pad = 6
    bar_w = max(32, width - 2 * pad - int(font.getlength(low)) - int(font.getlength(high)) - 4 * pad)
    out = Image.new(
        "RGB", (max(width, bar_w + int(font.getlength(low + high)) + 6 * pad), font_size + 2 * pad), "white"
    )
    draw = ImageDraw.Draw(out)
    x = pad
    _text_middle_left(draw, x, out.height // 2, low, font)
    x += int(font.getlength(low)) + 2 * pad
    bar = _ramp(np.linspace(0, 1, bar_w)[None].repeat(font_size, 0))
    out.paste(Image.fromarray(bar), (x, pad))
    _text_middle_left(draw, x + bar_w + 2 * pad, out.height // 2, high, font)
    return out
