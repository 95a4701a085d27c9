"""What every family adapter provides, and how a pipeline finds its adapter."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .denoiser_calls import DenoiserCalls
from .layer_tables import LayerTables
from .prompts import PromptTokens
from .segment_forward import SegmentForward

_ADAPTERS: list[type["Adapter"]] = []


@dataclass(frozen=True)
class LayerInfo:
    """One attention module the capture listens to.

    name: module path inside the denoiser ("up_blocks.2.attentions.1.transformer_blocks.0.attn2");
    role: "cross" (image→text) or "self" (image→image); block: the transformer block it belongs to (pairs attn1 with attn2);
    factor: downsampling of its token grid relative to the latent grid (1, 2, 4, ...).
    """

    name: str
    role: str  # "cross", "self" or "joint" (one softmax over image and text keys: both at once)
    block: str
    factor: int


class OutputProjection(NamedTuple):
    """The linear layer that an attention output goes through, and how many of its inputs that output fills (all, or
    the first `inputs`: Flux's single blocks feed [attention, MLP] to one `proj_out`).

    Its weight and bias are read as they are where they are plain float tensors (brought to the attention output's
    device, where group offloading keeps them on the host between forwards). Otherwise they are read off the
    layer's own forward: quantized (torchao, bitsandbytes, GGUF), the weight is no float tensor; under sequential CPU
    offload, the parameters wait on the meta device and only the forward's hook brings them in."""

    linear: torch.nn.Module
    inputs: int | None = None

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def weight(self, like: torch.Tensor) -> torch.Tensor:
        """[out, inputs]: the weight the layer applies to those inputs, read off its forward on unit vectors in
        `like`'s dtype and device where it is not plain (a transient [out, inputs])."""
        w = getattr(self.linear, "weight", None)
        if _plain(w):
            return (w if self.inputs is None else w[:, : self.inputs]).to(like.device)
        width = self.linear.in_features
        units = torch.eye(self.inputs or width, width, dtype=like.dtype, device=like.device)
        return (self.linear(units) - self.linear(units[:1] * 0)).T  # less the bias: the formula excludes it

    def bias(self, like: torch.Tensor) -> torch.Tensor | None:
        """[out]: the layer's bias (None without one), read off its forward on zeros where it is not plain."""
        b = getattr(self.linear, "bias", None)
        if b is None or _plain(b):
            return None if b is None else b.to(like.device)
        return self.linear(like.new_zeros(1, self.linear.in_features))[0]


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_floating_point() and t.device.type != "meta"


class JointInputs(NamedTuple):
    """One joint attention call's inputs as the capture reads them, each [B, n, heads·d] after the model's per-head
    norms and RoPE."""

    query: torch.Tensor  # the image's queries
    key: torch.Tensor  # the image's keys
    text_key: torch.Tensor
    text_value: torch.Tensor
    other_key: torch.Tensor | None = None  # keys of neither (Flux Kontext's reference image): in the softmax only


class Adapter(LayerTables, PromptTokens, DenoiserCalls, SegmentForward):
    """Base of the family adapters. Subclasses fill the layer tables in `__init__` and implement the hooks of its
    parts: the layer tables and grids (`LayerTables`), the prompt's tokens (`PromptTokens`), the denoiser's call
    arguments (`DenoiserCalls`), `segment`'s noising and forward (`SegmentForward`), and the joint-attention reads
    below."""

    family: str = "?"

    def __init__(self, pipe):
        self.pipe = pipe
        self.layers: dict[str, LayerInfo] = {}
        self.reference_layer: str = ""
        self.refinement_layers: list[str] = []
        self.refine_order: int = 2
        self.manual_layers: list[str] | None = None
        # The official vanilla baseline's layers, for its maps and its refinement (None: every cross layer, and the
        # refinement layers of goca).
        self.vanilla_layers: list[str] | None = None
        self.vanilla_refinement_layers: list[str] | None = None
        self.map_factor: int = 1
        self.native_resolution: int = 512
        self._submodules: dict[str, torch.nn.Module] = {}

    def submodule(self, name: str) -> torch.nn.Module:
        """The denoiser's submodule `name`, looked up once: the forward hooks ask for their layers' modules at every
        captured forward, where walking the module tree (a few ms for SDXL's 140 layers) would cost time."""
        if name not in self._submodules:
            self._submodules[name] = self.denoiser.get_submodule(name)
        return self._submodules[name]

    # -- registration -------------------------------------------------------------------------------------------------
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _ADAPTERS.append(cls)

    # The denoiser this family reads: the pipeline attribute and the diffusers class name.
    denoiser_attr: str = "transformer"
    denoiser_class: str = ""

    @classmethod
    def supports(cls, pipe) -> bool:
        import diffusers

        return isinstance(getattr(pipe, cls.denoiser_attr, None), getattr(diffusers, cls.denoiser_class))

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    # -- joint attention (SD3, Flux) ----------------------------------------------------------------------------------
    def joint_inputs(self, layer: str, attn, tap, call_kwargs: dict, step) -> JointInputs:
        """The image queries and keys, text keys and values (and other keys) of `layer`'s attention call."""
        raise NotImplementedError(f"{self.family} has no joint attention")

    def output_projection(self, layer: str, attn) -> OutputProjection:
        """The linear layer applied to the attention output of `layer`, for the head weights."""
        return OutputProjection(attn.to_out[0])

    def attention_scale(self, attn) -> float:
        return attn.scale

    def reference_feature(self, layer: str, tap, output, step) -> torch.Tensor:
        """F [B, N_ref, C] of the reference layer: its `to_q` output unless the family says otherwise."""
        return tap.query

    # -- the pipeline call ----------------------------------------------------------------------------------------------
    def steps_run(self, call_kwargs: dict, steps: int) -> int:
        """The denoising steps a call of the pipeline runs, of the `steps` it is asked for: img2img and inpainting
        pipelines start late by their `strength`."""
        strength = call_kwargs.get("strength", call_default(type(self.pipe), "strength", None))
        if strength is None or call_kwargs.get("denoising_start") is not None:
            return steps
        if not self.flow_matching:  # SD / SDXL floor the steps kept, SD3 / Flux the steps skipped
            return min(int(steps * strength), steps)
        return steps - int(max(steps - min(steps * strength, steps), 0))


# Pipelines whose denoising step is not one denoiser call on [uncond, cond] rows of the images: SAG and Pix2Pix-Zero
# add guidance calls, Attend-and-Excite refines the latents with calls of its own, Panorama and Paradigms run windows
# or several timesteps per call, Semantic SD adds edit-concept rows. Their masks per step could not be labelled.
MULTI_CALL_PIPELINES = frozenset(
    {
        "StableDiffusionSAGPipeline",
        "StableDiffusionAttendAndExcitePipeline",
        "StableDiffusionPanoramaPipeline",
        "StableDiffusionPix2PixZeroPipeline",
        "StableDiffusionParadigmsPipeline",
        "SemanticStableDiffusionPipeline",
    }
)


def check_one_call_per_step(pipe, what: str) -> None:
    """ValueError naming the pipeline if it is one of `MULTI_CALL_PIPELINES` (`what`: the feature refused)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in MULTI_CALL_PIPELINES:
            raise ValueError(
                f"{what} is not supported on {cls.__name__}: its denoising steps are not one denoiser "
                f"call on the images' [uncond, cond] rows, so a call's masks could not be tied to its "
                f"steps; segment its images with pipe.segment(image, classes) instead"
            )


def call_default(pipeline_class: type, name: str, fallback):
    """The default of `name` in the pipeline's own `__call__` (the first class in the MRO that declares it)."""
    for cls in pipeline_class.__mro__:
        call = cls.__dict__.get("__call__")
        if call is not None and name in inspect.signature(call).parameters:
            return inspect.signature(call).parameters[name].default
    return fallback


def relative_block(i: int, depth: int, of: int) -> int:
    """Block `i` of a model `of` blocks deep, at the same relative depth in a model `depth` blocks deep."""
    return min(depth - 1, round(i * depth / of))


def adapter_for(pipe) -> Adapter:
    """The adapter of the first family that supports `pipe`; ValueError naming the pipeline otherwise."""
    for name in ("unet", "transformer"):
        if isinstance(getattr(pipe, name, None), torch._dynamo.eval_frame.OptimizedModule):
            raise ValueError(
                f"the pipeline's {name} is wrapped by torch.compile, which hides its layers from GoCA: "
                f"compile it in place instead (`pipe.{name}.compile()`), which GoCA supports"
            )
    for cls in _ADAPTERS:
        if cls.supports(pipe):
            return cls(pipe)
    raise ValueError(
        f"GoCA does not support {type(pipe).__name__}: supported are pipelines whose denoiser is a "
        "UNet2DConditionModel with CLIP text encoders (Stable Diffusion 1.x/2.x, SDXL), a PixArtTransformer2DModel "
        "(PixArt-α/Σ), an SD3Transformer2DModel (SD3/3.5) or a FluxTransformer2DModel (Flux.1)"
    )
