"""Ready GoCA pipelines, and `from_pipe` for any supported pipeline.

Every class is named as `goca_class` derives it for other pipelines: `GoCA` + the diffusers class's name, or
`SCFGGoCA` + it for S-CFG (`SCFGGoCAStableDiffusionPipeline`, ...).
"""

from __future__ import annotations

import inspect
import warnings

from diffusers import (
    FluxPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from .mixin import GoCAMixin
from .models.base import adapter_for
from .scfg import SCFGMixin


class GoCAStableDiffusionPipeline(GoCAMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` (SD 1.x / 2.x) with GoCA."""


class GoCAStableDiffusionXLPipeline(GoCAMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` with GoCA."""


class GoCAPixArtAlphaPipeline(GoCAMixin, PixArtAlphaPipeline):
    """`PixArtAlphaPipeline` with GoCA (masks during generation through the denoiser hooks: no step callback needed)."""


class GoCAPixArtSigmaPipeline(GoCAMixin, PixArtSigmaPipeline):
    """`PixArtSigmaPipeline` with GoCA (masks during generation through the denoiser hooks: no step callback needed)."""


class GoCAStableDiffusion3Pipeline(GoCAMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` (SD3 / 3.5) with GoCA."""


class GoCAFluxPipeline(GoCAMixin, FluxPipeline):
    """`FluxPipeline` (Flux.1 dev / schnell) with GoCA."""


class SCFGGoCAStableDiffusionPipeline(SCFGMixin, StableDiffusionPipeline):
    """SD 1.x / 2.x with S-CFG driven by GoCA masks (`from_pretrained` or `from_pipe`); see `SCFGMixin`. Formerly
    `SCFGGoCAPipeline` (a deprecated alias for one release)."""


class SCFGGoCAStableDiffusionXLPipeline(SCFGMixin, StableDiffusionXLPipeline):
    """SDXL with S-CFG driven by GoCA masks; see `SCFGMixin`. Formerly `SCFGGoCAXLPipeline` (a deprecated alias for
    one release)."""


class SCFGGoCAPixArtSigmaPipeline(SCFGMixin, PixArtSigmaPipeline):
    """PixArt-Σ with S-CFG driven by GoCA masks; see `SCFGMixin`."""


class SCFGGoCAStableDiffusion3Pipeline(SCFGMixin, StableDiffusion3Pipeline):
    """SD3 / 3.5 with S-CFG driven by GoCA masks; see `SCFGMixin`."""


_READY = {
    StableDiffusionPipeline: GoCAStableDiffusionPipeline,
    StableDiffusionXLPipeline: GoCAStableDiffusionXLPipeline,
    PixArtAlphaPipeline: GoCAPixArtAlphaPipeline,
    PixArtSigmaPipeline: GoCAPixArtSigmaPipeline,
    StableDiffusion3Pipeline: GoCAStableDiffusion3Pipeline,
    FluxPipeline: GoCAFluxPipeline,
}
_READY_SCFG = {
    StableDiffusionPipeline: SCFGGoCAStableDiffusionPipeline,
    StableDiffusionXLPipeline: SCFGGoCAStableDiffusionXLPipeline,
    PixArtSigmaPipeline: SCFGGoCAPixArtSigmaPipeline,
    StableDiffusion3Pipeline: SCFGGoCAStableDiffusion3Pipeline,
}
_DERIVED: dict[tuple[type, type], type] = {}


def _diffusers_base(pipeline_class: type) -> type:
    return next(c for c in pipeline_class.__mro__ if not issubclass(c, GoCAMixin))


def goca_class(pipeline_class: type, mixin: type = GoCAMixin) -> type:
    """The subclass of a pipeline class with `mixin` (GoCAMixin or SCFGMixin): a ready one, or one derived once."""
    if issubclass(pipeline_class, mixin):
        return pipeline_class
    base = _diffusers_base(pipeline_class)
    ready = (_READY if mixin is GoCAMixin else _READY_SCFG).get(base)
    if ready is not None:
        return ready
    if (mixin, base) not in _DERIVED:
        prefix = "GoCA" if mixin is GoCAMixin else "SCFGGoCA"
        _DERIVED[(mixin, base)] = type(f"{prefix}{base.__name__}", (mixin, base), {})
    return _DERIVED[(mixin, base)]


def from_pipe(pipe, enable: bool = True, mixin: type = GoCAMixin):
    """A pipeline of `pipe`'s class plus `GoCAMixin` (or `SCFGMixin`), sharing `pipe`'s components (no copy, no
    reload). enable: call `enable_goca()` on the result. Raises ValueError for a pipeline GoCA does not support.
    """
    adapter_for(pipe)  # fails early, before anything is built, for an unsupported pipeline
    new = _sharing_components(goca_class(type(pipe), mixin), pipe)
    new.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    if enable:
        new.enable_goca()
    return new


def _sharing_components(cls: type, pipe):
    """An instance of `cls` built on `pipe`'s own component objects and constructor settings, nothing cast or moved.

    Not `DiffusionPipeline.from_pipe`: since diffusers 0.36 it casts every (shared) component to float32 unless given
    a single dtype, which would double a half-precision pipeline's memory and change its images, and which no single
    dtype avoids for a pipeline whose components differ in dtype (an fp32 VAE beside an fp16 UNet).
    """
    params = inspect.signature(cls.__init__).parameters
    components = pipe.components
    kwargs = {name: components[name] for name in params if name in components}
    kwargs.update({name: pipe.config[name] for name in params if name not in kwargs and name in pipe.config})
    # Settings kept as attributes, not in the config (a PAG pipeline's `pag_applied_layers`).
    kwargs.update(
        {
            name: getattr(pipe, name)
            for name in params
            if name not in kwargs and name != "self" and not name.startswith("_") and hasattr(pipe, name)
        }
    )
    if "add_watermarker" in params:  # SDXL-family: a watermark `pipe` was built without would change the images
        kwargs["add_watermarker"] = getattr(pipe, "watermark", None) is not None
    new = cls(**kwargs)
    if "_name_or_path" in pipe.config:
        new.register_to_config(_name_or_path=pipe.config["_name_or_path"])
    return new


def scfg_from_pipe(pipe, enable: bool = True):
    """`pipe` with S-CFG driven by GoCA masks: same components; the call gains `scfg`, `segmentor`, `rate_bounds`."""
    adapter = adapter_for(pipe)
    if not adapter.cfg_batch:
        raise ValueError(
            f"S-CFG sets the guidance region by region in the [uncond, cond] batch of classifier-free "
            f"guidance; {type(pipe).__name__} ({adapter.family}) runs none"
        )
    return from_pipe(pipe, enable, SCFGMixin)


# Former names of ready classes, kept as deprecated aliases for one release: old name → the class's name now.
DEPRECATED_ALIASES = {
    "SCFGGoCAPipeline": "SCFGGoCAStableDiffusionPipeline",
    "SCFGGoCAXLPipeline": "SCFGGoCAStableDiffusionXLPipeline",
}


def deprecated_alias(name: str, module: str = __name__):
    """The class a deprecated alias (`DEPRECATED_ALIASES`) names, with a FutureWarning that names its new name (at the
    caller's caller: the line that read `module.name`); an AttributeError for any other name."""
    if name not in DEPRECATED_ALIASES:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new = DEPRECATED_ALIASES[name]
    warnings.warn(
        f"{module}.{name} is deprecated and will be removed in the next release: use {new}, the name that "
        f"`scfg_from_pipe` / `goca_class` derive (SCFGGoCA + the diffusers class's name)",
        FutureWarning,
        stacklevel=3,
    )
    return globals()[new]


def __getattr__(name: str):
    return deprecated_alias(name)
