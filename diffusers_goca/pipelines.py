"""Ready GoCA pipelines, and `from_pipe` for any supported pipeline."""
from __future__ import annotations

from diffusers import (
    FluxPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from .mixin import GoCAMixin
from .models.base import adapter_for


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


_READY = {
    StableDiffusionPipeline: GoCAStableDiffusionPipeline, StableDiffusionXLPipeline: GoCAStableDiffusionXLPipeline,
    PixArtAlphaPipeline: GoCAPixArtAlphaPipeline, PixArtSigmaPipeline: GoCAPixArtSigmaPipeline,
    StableDiffusion3Pipeline: GoCAStableDiffusion3Pipeline, FluxPipeline: GoCAFluxPipeline,
}
_DERIVED: dict[type, type] = {}


def goca_class(pipeline_class: type) -> type:
    """The GoCA subclass of a pipeline class: a ready one, or one derived once and cached."""
    if issubclass(pipeline_class, GoCAMixin):
        return pipeline_class
    if pipeline_class in _READY:
        return _READY[pipeline_class]
    if pipeline_class not in _DERIVED:
        _DERIVED[pipeline_class] = type(f"GoCA{pipeline_class.__name__}", (GoCAMixin, pipeline_class), {})
    return _DERIVED[pipeline_class]


def from_pipe(pipe, enable: bool = True):
    """A pipeline of `pipe`'s class plus `GoCAMixin`, sharing `pipe`'s components (no copy, no reload).

    enable: call `enable_goca()` on the result. Raises ValueError for a pipeline GoCA does not support.
    """
    adapter_for(pipe)  # fails early, before anything is built, for an unsupported pipeline
    new = goca_class(type(pipe)).from_pipe(pipe)
    new.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    if enable:
        new.enable_goca()
    return new
