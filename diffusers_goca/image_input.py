"""Image input: what `segment` and the pictures accept as an image, read as a PIL RGB image."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps


def _pixels_uint8(a: np.ndarray) -> np.ndarray:
    """Pixel values as uint8: uint8 as they are, other integers (and bools) as values in 0–255, floats as values in
    [0, 1]. Values outside those ranges raise: guessing the range from the values would misread dark images."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    lo, hi = a.min(), a.max()
    if np.issubdtype(a.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise ValueError(f"an integer image must hold values in 0–255, got {lo}…{hi} (16-bit: divide by 257)")
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
        raise ValueError(f"an image's values must be finite integers or floats, got dtype {a.dtype}")
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"a float image must hold values in [0, 1], got {lo:.4g}…{hi:.4g} "
            "(from [-1, 1]: (x + 1) / 2; from 0–255: pass it as uint8)"
        )
    return (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)


def _wide_grey(image: Image.Image) -> np.ndarray:
    """A 16- or 32-bit grey PIL image (modes I;16*, I, F) as an array `as_rgb` reads: integers as 16-bit values
    (0–65535, what a 16-bit PNG holds) scaled to uint8, floats as they are (values in [0, 1]). PIL's own
    `convert("RGB")` clips them to 0–255, which turns every such image (nearly) white."""
    a = np.asarray(image)
    if a.dtype.kind == "f":
        return a
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 65535:
        raise ValueError(f"a PIL image of mode {image.mode} must hold values in 0–65535 (16 bit), got {lo}…{hi}")
    return (a / 257).round().astype(np.uint8)


def as_rgb(image) -> Image.Image:
    """A PIL RGB image from a PIL image (any mode; alpha composited on white; 16-bit grey as 0–65535, mode F as
    [0, 1]), an array [H, W(, C)] or a tensor [C, H, W] / [1, C, H, W] / [H, W, C] / [1, H, W, C] (uint8 or integers
    in 0–255, floats in [0, 1]), or a file path (turned upright by its EXIF orientation, as viewers show it).

    A tensor is read as [H, W, C] only where that layout is unambiguous: C in (1, 3, 4) last and a first dimension
    that no channel count has (a [3, 4, 4] tensor stays [C, H, W], as torch and diffusers lay images out)."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.exists(image):
            raise ValueError(f"image path does not exist: {image}")
        image = ImageOps.exif_transpose(Image.open(image))
    if isinstance(image, Image.Image) and (image.mode == "F" or image.mode.startswith("I")):
        image = _wide_grey(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        channels_last = t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4)
        if t.ndim != 3 or not (channels_last or t.shape[0] in (1, 3, 4)):
            raise ValueError(
                f"a tensor image must be [C, H, W], [H, W, C] or either with a leading batch of 1, with "
                f"C in (1, 3, 4), got {tuple(image.shape)}"
            )
        t = t if channels_last else t.permute(1, 2, 0)
        image = (t.float() if t.is_floating_point() else t).numpy()  # numpy has no bfloat16
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or min(a.shape[:2]) < 1:
            raise ValueError(f"an array image must be [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")
        image = Image.fromarray(_pixels_uint8(a))
    if not isinstance(image, Image.Image):
        raise ValueError(
            f"image must be a PIL image, a numpy array, a torch tensor or a path, got {type(image).__name__}"
        )
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
