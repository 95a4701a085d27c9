"""diffusers-goca: training-free open-vocabulary segmentation from the attention of diffusers pipelines (GoCA).

import diffusers_goca as goca
pipe = goca.from_pipe(pipe)          # same components, class gains GoCAMixin, capture enabled
result = pipe.segment(image, classes=["cat", "grass"])
"""

from .capture import Capture, StepCapture
from .functional.frobenius_kernel import get_layer_weight_kernel, layer_weight_kernel, set_layer_weight_kernel
from .methods import METHODS, GoCAOptions
from .mixin import GoCAMixin, GoCAStepMasks
from .models import Adapter, LayerInfo, UNetAdapter, adapter_for
from .pipelines import (
    GoCAFluxPipeline,
    GoCAPixArtAlphaPipeline,
    GoCAPixArtSigmaPipeline,
    GoCAStableDiffusion3Pipeline,
    GoCAStableDiffusionPipeline,
    GoCAStableDiffusionXLPipeline,
    SCFGGoCAPixArtSigmaPipeline,
    SCFGGoCAStableDiffusion3Pipeline,
    SCFGGoCAStableDiffusionPipeline,
    SCFGGoCAStableDiffusionXLPipeline,
    deprecated_alias,
    from_pipe,
    goca_class,
    scfg_from_pipe,
)
from .processors import GoCAAttnProcessor2_0, GoCAWrappedProcessor
from .prompt_classes import entities_from_prompt
from .result import GoCASegmentation
from .scfg import SCFGMixin, SCFGStepMaps, save_scfg_maps
from .tokens import TokenIndex, token_index

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "Capture",
    "GoCAAttnProcessor2_0",
    "GoCAMixin",
    "GoCAOptions",
    "GoCASegmentation",
    "GoCAStepMasks",
    "GoCAWrappedProcessor",
    "LayerInfo",
    "METHODS",
    "StepCapture",
    "TokenIndex",
    "UNetAdapter",
    "GoCAFluxPipeline",
    "GoCAStableDiffusion3Pipeline",
    "GoCAPixArtAlphaPipeline",
    "GoCAPixArtSigmaPipeline",
    "GoCAStableDiffusionPipeline",
    "GoCAStableDiffusionXLPipeline",
    "SCFGGoCAStableDiffusionPipeline",
    "SCFGGoCAStableDiffusionXLPipeline",
    "SCFGGoCAPixArtSigmaPipeline",
    "SCFGGoCAStableDiffusion3Pipeline",
    "SCFGMixin",
    "SCFGStepMaps",
    "save_scfg_maps",
    "scfg_from_pipe",
    "adapter_for",
    "entities_from_prompt",
    "from_pipe",
    "goca_class",
    "token_index",
    "get_layer_weight_kernel",
    "layer_weight_kernel",
    "set_layer_weight_kernel",
]


def __getattr__(name: str):
    """The deprecated aliases of renamed classes (`pipelines.DEPRECATED_ALIASES`: `SCFGGoCAPipeline`,
    `SCFGGoCAXLPipeline`), with a FutureWarning; removed in the next release."""
    return deprecated_alias(name, __name__)
