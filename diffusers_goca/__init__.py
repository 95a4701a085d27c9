"""diffusers-goca: training-free open-vocabulary segmentation from the attention of diffusers pipelines (GoCA).

    import diffusers_goca as goca
    pipe = goca.from_pipe(pipe)          # same components, class gains GoCAMixin, capture enabled
    result = pipe.segment(image, classes=["cat", "grass"])
"""
from .capture import Capture, StepCapture
from .methods import METHODS, GoCAOptions
from .mixin import GoCAMixin, GoCAStepMasks
from .models import Adapter, LayerInfo, UNetAdapter, adapter_for
from .pipelines import (
    GoCAFluxPipeline, GoCAPixArtAlphaPipeline, GoCAPixArtSigmaPipeline, GoCAStableDiffusion3Pipeline,
    GoCAStableDiffusionPipeline, GoCAStableDiffusionXLPipeline, SCFGGoCAPipeline, SCFGGoCAPixArtSigmaPipeline,
    SCFGGoCAStableDiffusion3Pipeline, SCFGGoCAXLPipeline, from_pipe, goca_class, scfg_from_pipe,
)
from .scfg import SCFGMixin, SCFGStepMaps, save_scfg_maps
from .processors import GoCAAttnProcessor2_0, GoCAWrappedProcessor
from .result import GoCASegmentation
from .prompt_classes import entities_from_prompt
from .tokens import TokenIndex, token_index

__version__ = "0.1.0"

__all__ = [
    "Adapter", "Capture", "GoCAAttnProcessor2_0", "GoCAMixin", "GoCAOptions", "GoCASegmentation",
    "GoCAFluxPipeline", "GoCAStableDiffusion3Pipeline", "GoCAPixArtAlphaPipeline", "GoCAPixArtSigmaPipeline", "GoCAStableDiffusionPipeline", "GoCAStableDiffusionXLPipeline", "GoCAStepMasks", "GoCAWrappedProcessor", "LayerInfo",
    "METHODS", "StepCapture", "TokenIndex", "UNetAdapter", "adapter_for", "entities_from_prompt", "from_pipe", "goca_class",
    "token_index", "SCFGGoCAPipeline", "SCFGGoCAXLPipeline", "SCFGGoCAPixArtSigmaPipeline",
    "SCFGGoCAStableDiffusion3Pipeline", "SCFGMixin", "SCFGStepMaps", "save_scfg_maps", "scfg_from_pipe",
]
