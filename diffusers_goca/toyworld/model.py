"""The shipped toy models: a stock `StableDiffusionPipeline` folder and a `PixArtSigmaPipeline` one, inside the package."""
from __future__ import annotations

import os

import torch

TOY_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
# The transformer toy: a `PixArtSigmaPipeline` folder (cross-attention DiT, T5-style text), trained on the same world.
TOY_DIT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dit_model")


def load_toy_pipeline(path: str | None = None, pipeline_class=None, torch_dtype: torch.dtype = torch.float32):
    """Load the toy model (or a toy model folder at `path`: the PixArt, Flux and SD3 layouts that
    `python -m diffusers_goca.toyworld.train --arch ...` makes) with `from_pretrained`, as any diffusers model folder.

    pipeline_class: default, the class the folder names (`DiffusionPipeline.from_pretrained`); pass a GoCA pipeline
    class to get the mixin.
    """
    from ..cli import pretrained

    path = path or TOY_MODEL_DIR
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"no toy model at {path}: train one with `python -m diffusers_goca.toyworld.train --out {path}`"
        )
    if pipeline_class is None:
        pipe = pretrained(path, torch_dtype)
    else:
        pipe = pipeline_class.from_pretrained(path, torch_dtype=torch_dtype, safety_checker=None,
                                              requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
