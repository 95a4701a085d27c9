"""The shipped toy models: a stock `StableDiffusionPipeline` folder and a `PixArtSigmaPipeline` one, inside the package."""

from __future__ import annotations

import os

import torch

from ..loading import TOY_DIT_MODEL_DIR, TOY_MODEL_DIR, pretrained

__all__ = ["TOY_MODEL_DIR", "TOY_DIT_MODEL_DIR", "load_toy_pipeline"]


def load_toy_pipeline(
    path: str | None = None,
    pipeline_class=None,
    dtype: torch.dtype | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
):
    """Load the toy model (or a toy model folder at `path`: the PixArt, Flux and SD3 layouts that
    `python -m diffusers_goca.toyworld.train --arch ...` makes) with `from_pretrained`, as any diffusers model folder
    (`loading.pretrained`: no safety checker, the dtype by the keyword the installed diffusers reads).

    pipeline_class: default, the class the folder names (`DiffusionPipeline.from_pretrained`); pass a GoCA pipeline
    class to get the mixin. dtype: default float32 (`torch_dtype`, its former name, is still read).
    """
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree: pass dtype only")
    dtype = dtype or torch_dtype or torch.float32
    path = path or TOY_MODEL_DIR
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"no toy model at {path}: train one with `python -m diffusers_goca.toyworld.train --out {path}`"
        )
    pipe = pretrained(path, dtype, pipeline_class)
    pipe.set_progress_bar_config(disable=True)
    return pipe
