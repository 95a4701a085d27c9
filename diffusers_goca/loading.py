"""Loading pipelines: the one place for the dtype names, the dtype rule (float32 on the CPU), `from_pretrained` of a
hub id or a local folder, and the shipped toy models as the default. The command line (`cli`), both benchmarks
(`bench.segmentation`, `bench.coco30k`) and `toyworld.load_toy_pipeline` load through it.

    from diffusers_goca.loading import load_pipeline, pipeline_dtype
    pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", "cuda", pipeline_dtype("float16", "cuda"))

This module imports no other module of the package at import time (the pipelines only when a pipeline is built),
so anything in the package may import it.
"""

from __future__ import annotations

import functools
import inspect
import os
import re

import torch

# Names the command lines take for --dtype.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_HERE = os.path.dirname(os.path.abspath(__file__))
# The shipped toy models: a stock `StableDiffusionPipeline` folder (the default model of every loader here) and a
# `PixArtSigmaPipeline` one (cross-attention DiT, T5-style text), trained on the same toy world.
TOY_MODEL_DIR = os.path.join(_HERE, "toyworld", "model")
TOY_DIT_MODEL_DIR = os.path.join(_HERE, "toyworld", "dit_model")


def pipeline_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype to load a pipeline in on `device`: `dtype` (a name of `DTYPES`, or a torch.dtype) on an accelerator,
    float32 on the CPU, where half precision is slow and not every operation has a half kernel (the benchmarks'
    rule: their `--dtype float16` default holds on a GPU)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(sorted(DTYPES))}, got {dtype!r}")
        dtype = DTYPES[dtype]
    return torch.float32 if torch.device(device).type == "cpu" else dtype


@functools.lru_cache(maxsize=None)
def dtype_keyword() -> str:
    """The keyword by which the installed diffusers' `from_pretrained` takes the dtype: "dtype" where it reads it
    (the releases that deprecate `torch_dtype` for it, with a FutureWarning on every load: 0.42.1 does), else
    "torch_dtype" (the older releases, which know no `dtype`). Read from `DiffusionPipeline.from_pretrained`'s code,
    since its signature is `(path, **kwargs)`."""
    from diffusers import DiffusionPipeline

    try:
        source = inspect.getsource(DiffusionPipeline.from_pretrained)
    except (OSError, TypeError):  # no source shipped: the keyword every supported release reads
        return "torch_dtype"
    return "dtype" if re.search(r"""kwargs\.pop\(\s*["']dtype["']""", source) else "torch_dtype"


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """`{"dtype": dtype}` or `{"torch_dtype": dtype}` (see `dtype_keyword`), to pass to a diffusers `from_pretrained`
    call that should work, without a deprecation warning, on every diffusers release the package supports;
    `{}` for None (the components' saved dtypes)."""
    return {} if dtype is None else {dtype_keyword(): dtype}


def pretrained(
    path: str | os.PathLike, dtype: torch.dtype | None = torch.float32, pipeline_class: type | None = None, **kwargs
):
    """`from_pretrained(path)` of a hub id or a local pipeline folder, as the loaders here need it: no safety checker
    (nor the warning about its absence), and the components the saved pipeline lists as absent (`[null, null]` in
    model_index.json, e.g. SD3 saved without T5) passed as None, which diffusers otherwise refuses for required
    components. dtype: passed by the keyword the installed diffusers reads (`dtype_kwargs`); None keeps the saved
    dtypes. pipeline_class: default, the class the folder names (`DiffusionPipeline.from_pretrained`); a GoCA
    pipeline class gives the mixin. kwargs go to `from_pretrained` and win over the above."""
    import diffusers
    from diffusers import DiffusionPipeline

    path = os.fspath(path)
    config = DiffusionPipeline.load_config(path)
    options = {name: None for name, entry in config.items() if entry == [None, None]}
    cls = pipeline_class or getattr(diffusers, config.get("_class_name", ""), None)
    params = inspect.signature(cls.__init__).parameters if cls is not None else {}
    if "safety_checker" in params:
        options["safety_checker"] = None
    if "requires_safety_checker" in params:
        options["requires_safety_checker"] = False
    options.update(dtype_kwargs(dtype))
    options.update(kwargs)
    return (pipeline_class or DiffusionPipeline).from_pretrained(path, **options)


def load_pipeline(
    model: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scfg: bool = False,
):
    """A GoCA pipeline (`from_pipe`; with `scfg=True` an S-CFG one, `scfg_from_pipe`) from a hub id or a local
    folder (`pretrained`), on `device`, in `dtype` as given (`pipeline_dtype` applies the float32-on-CPU rule);
    model None = the shipped toy model (`TOY_MODEL_DIR`). Its progress bar is off."""
    from .pipelines import from_pipe, scfg_from_pipe

    pipe = pretrained(TOY_MODEL_DIR if model is None else model, dtype).to(device)
    pipe = (scfg_from_pipe if scfg else from_pipe)(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe
