"""What every family adapter provides, and how a pipeline finds its adapter."""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

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


class Adapter:
    """Base of the family adapters. Subclasses fill the layer tables in `__init__` and implement the hooks below."""

    family: str = "?"
    text_max_length: int = 77
    # Whether the cross-attention masks the text's padding (PixArt's T5 mask): then the keys past a prompt's tokens
    # carry no probability, and the capture reads only the prompt's (`Capture.start`'s text_keys).
    text_padding_masked: bool = False
    segment_timestep: int | None = 100  # docs/official_code.md: t = 100 of 1000 for SD / SDXL / PixArt; None: the family's rule
    flow_matching: bool = False  # noised by `flow_noised` at any t in [0, T] (SD3, Flux), else by DDPM at t in 0…T−1
    shared_clip_positions: bool = False  # two CLIP encoders' tokens at the same positions (see `check_mask_prompt`)

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

    # -- tables -------------------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def cross_layers(self) -> list[str]:
        return [n for n, i in self.layers.items() if i.role in ("cross", "joint")]

    # Whether the pipeline's classifier-free guidance runs as one [uncond, cond] denoiser batch (what S-CFG rescales).
    cfg_batch = True

    @property
    def scfg_layers(self) -> list[str]:
        """The cross layers S-CFG's own segmenter reads: by default those of the refinement blocks."""
        blocks = {self.layers[n].block for n in self.refinement_layers}
        return [n for n in self.cross_layers if self.layers[n].block in blocks]

    @property
    def joint(self) -> bool:
        """Whether the image attends to the text in joint attention (SD3, Flux) rather than in cross-attention."""
        return any(i.role == "joint" for i in self.layers.values())

    # guidance-distilled families: the guidance embedding's value in `segment` (None: the family has no such input)
    segment_guidance: float | None = None

    def check_segment_guidance(self, guidance_scale) -> None:
        if guidance_scale is None:
            return
        if self.segment_guidance is None or not self.denoiser.config.get("guidance_embeds", False):
            raise ValueError(f"guidance_scale: segment runs {self.family} models without guidance (one forward, no "
                             f"CFG); it applies to guidance-distilled models (Flux dev) only")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")

    @property
    def self_layers(self) -> list[str]:
        return [n for n, i in self.layers.items() if i.role in ("self", "joint")]

    LAYER_SETS = ("all", "subset", "manual")

    def layer_set(self, name) -> tuple[list[str], list[str]]:
        """(cross layers of the maps, self layers of the refinement) of a `GoCAOptions.layers` value: "all",
        "subset" (the official vanilla's), "manual" (SD 1.5's hand-picked maps), or a sequence of cross layer names
        (refined as "all")."""
        if not isinstance(name, str):
            names = list(name)
            unknown = [n for n in names if n not in self.cross_layers]
            if not names or unknown:
                raise ValueError(f"layers: {unknown or 'an empty list'} are not cross-attention layers of this "
                                 f"{self.family} model; it has {self.cross_layers}")
            return names, self.refinement_layers
        if name not in self.LAYER_SETS:
            raise ValueError(f"layers must be one of {self.LAYER_SETS}, got {name!r}")
        if name == "manual":
            if self.manual_layers is None:
                raise ValueError(f"layers='manual' (SD 1.5's hand-picked layers) is not defined for {self.family} "
                                 f"models; use 'all' or 'subset'")
            return self.manual_layers, self.refinement_layers
        if name == "subset" and self.vanilla_layers is not None:
            return self.vanilla_layers, self.vanilla_refinement_layers or self.refinement_layers
        return self.cross_layers, self.refinement_layers

    def self_of(self, cross_layer: str) -> str:
        """The self-attention layer of the same transformer block as `cross_layer`."""
        block = self.layers[cross_layer].block
        if self.layers[cross_layer].role == "joint":
            return cross_layer
        for name, info in self.layers.items():
            if info.role == "self" and info.block == block:
                return name
        raise KeyError(f"no self-attention layer in the block of {cross_layer}")

    def on_reference_grid(self, layer: str) -> bool:
        """Whether `layer`'s token grid is the reference layer's (then its layer-weight call reads every query)."""
        return self.layers[layer].factor == self.layers[self.reference_layer].factor

    def layer_hw(self, layer: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) of `layer` for a latent of size `latent_hw` (each side divided by the layer's factor,
        rounded up)."""
        f = self.layers[layer].factor
        return -(-latent_hw[0] // f), -(-latent_hw[1] // f)

    def grid(self, layer: str, n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """`layer_hw`, checked against the tokens the layer received: from the latent shape, never from sqrt(N)."""
        h, w = self.layer_hw(layer, latent_hw)
        if h * w != n_tokens:
            raise RuntimeError(f"{layer}: {n_tokens} tokens do not match a {h}×{w} grid (latent {latent_hw}, "
                               f"factor {self.layers[layer].factor})")
        return h, w

    def image_hw(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Pixel size of a generated image whose denoiser input has spatial size `latent_hw`."""
        return tuple(s * self.pipe.vae_scale_factor for s in latent_hw)

    def checked_resolution(self, resolution) -> int:
        """`segment`'s square size: the native resolution for None, else a positive multiple of the pixels one token
        covers (the VAE's factor times the patch or packing size); other sizes would cut a token, which the
        denoiser's patching drops."""
        if resolution is None:
            return self.native_resolution
        step = self.image_hw((1, 1))[0] * self.map_factor
        if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution <= 0 or resolution % step:
            raise ValueError(f"resolution must be a positive multiple of {step} for this {self.family} model (its VAE "
                             f"and patch size), e.g. {self.native_resolution}; got {resolution!r}")
        return int(resolution)

    def scheduler_timestep(self, t: float) -> float:
        """The timestep the denoiser was called with, in the scheduler's units (what `callback_on_step_end` sees)."""
        return t

    def map_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        f = self.map_factor
        return -(-latent_hw[0] // f), -(-latent_hw[1] // f)

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

    def denoiser_text_len(self, args, kwargs) -> int | None:
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        return None if ehs is None else int(ehs.shape[1])

    def steps_run(self, call_kwargs: dict, steps: int) -> int:
        """The denoising steps a call of the pipeline runs, of the `steps` it is asked for: img2img and inpainting
        pipelines start late by their `strength`."""
        strength = call_kwargs.get("strength", call_default(type(self.pipe), "strength", None))
        if strength is None or call_kwargs.get("denoising_start") is not None:
            return steps
        if not self.flow_matching:  # SD / SDXL floor the steps kept, SD3 / Flux the steps skipped
            return min(int(steps * strength), steps)
        return steps - int(max(steps - min(steps * strength, steps), 0))

    def forwards_per_step(self, call_kwargs: dict) -> int:
        """Denoiser calls per denoising step; the first is the one segmented (Flux's true CFG adds an uncond call)."""
        return 1

    def output_resize(self, call_kwargs: dict):
        """What the pipeline does to the generated image before returning it, as a function of scores [C, H, W] at the
        generated size (labels follow by argmax), or None when it returns the image at that size."""
        return None

    def guidance_forward(self, args, kwargs) -> bool:
        """Whether this denoiser call is an extra one that some steps add for a guidance (SD3's skip-layer guidance),
        neither segmented nor counted as a step's call."""
        return False

    def token_index(self, prompt: str, classes, extra_entities=(), max_length: int | None = None, require_classes=True,
                    part_texts: Sequence[str] = ()):
        """Where each class sits in the text tokens the denoiser attends to. part_texts: `part_texts(...)` of the
        call, the texts of later text parts that differ from `prompt` (none for a family with one text part)."""
        from ..tokens import token_index

        tokenizer = self.tokenizer()
        names = list(classes) + [e for e in extra_entities if e not in classes]
        return token_index(tokenizer, self.textual_inversion_text(prompt, tokenizer), classes,
                           max_length=max_length or self.text_max_length, extra_entities=extra_entities,
                           require_classes=require_classes,
                           phrases={n: self.textual_inversion_text(n, tokenizer) for n in names})

    def textual_inversion_text(self, text: str, tokenizer) -> str:
        """`text` as the pipeline tokenizes it: a multi-vector textual-inversion token ("<cat-toy>") spelled out as its
        vectors' tokens ("<cat-toy> <cat-toy>_1 <cat-toy>_2"), which shifts the positions of every token after it."""
        from diffusers.loaders import TextualInversionLoaderMixin

        if not isinstance(self.pipe, TextualInversionLoaderMixin):
            return text
        return self.pipe.maybe_convert_prompt(text, tokenizer)

    # -- pipeline specifics -------------------------------------------------------------------------------------------
    def tokenizer(self):
        return self.pipe.tokenizer

    def call_prompt(self, args, call_kwargs: dict):
        """The prompt (a string or a list) of a pipeline call whose tokens the denoiser's text keys hold."""
        return call_kwargs.get("prompt", args[0] if args else None)

    def check_mask_prompt(self, call_kwargs: dict, prompt) -> None:
        """Refuse a call whose masks could not be read by class: where a second CLIP encoder lays its text's tokens
        at the first's positions (SDXL, SD3), a `prompt_2` that differs from `prompt` would mix two texts' words at
        each position. S-CFG's regions, which are per position, not per class, do not ask this."""
        if not self.shared_clip_positions:
            return
        other = call_kwargs.get("prompt_2")
        if other is not None and other != prompt:
            raise ValueError("GoCA reads both CLIP encoders' tokens at the same positions, from `prompt`: masks for a "
                             "prompt_2 that differs from it are not supported")

    def part_texts(self, call_kwargs: dict, i: int, n: int) -> tuple[str, ...]:
        """For the i-th of the call's n prompts, the texts that later parts of the text sequence encode instead of the
        prompt (SD3: `prompt_3` for its T5 part); () where every part encodes the prompt."""
        return ()

    def prompt_text(self, prompt: str, call_kwargs: dict) -> str:
        """The text the pipeline actually tokenizes for `prompt` (token positions are read from it)."""
        return prompt

    def segment_text(self, prompt: str) -> str:
        """The text `segment_forward` tokenizes for `prompt`."""
        return self.prompt_text(prompt, {})

    def denoiser_latent_hw(self, args, kwargs) -> tuple[int, int]:
        sample = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        return tuple(sample.shape[-2:])

    def denoiser_batch(self, args, kwargs) -> int:
        sample = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        return sample.shape[0]

    def checked_timestep(self, timestep):
        """`timestep` for `segment_forward`, or ValueError: DDPM's an integer in 0…T−1 (an index into its noise
        schedule, where a negative one would wrap around), flow matching's a number in [0, T]."""
        n = self.pipe.scheduler.config.get("num_train_timesteps", 1000)
        try:
            value = float(timestep)
        except (TypeError, ValueError, RuntimeError):
            value = None
        if self.flow_matching:
            if value is None or not 0 <= value <= n:
                raise ValueError(f"timestep must be a number in [0, {n}] (σ = t / {n}), got {timestep!r}")
            return value
        if value is None or not 0 <= value < n or value != int(value):  # the range first: int(nan) would raise
            raise ValueError(f"timestep must be an integer in 0…{n - 1} (a step of the DDPM noise schedule), "
                             f"got {timestep!r}")
        return int(value)

    def flow_noised(self, latents: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
        """The flow-matching forward process at any timestep t (SD3, Flux): σ = t / num_train_timesteps,
        x_t = σ·noise + (1 − σ)·x_0. The scheduler's `scale_noise` computes the same, but only for a timestep of its
        schedule."""
        sigma = float(timestep) / self.pipe.scheduler.config.num_train_timesteps
        return sigma * noise + (1 - sigma) * latents

    def ddpm_noised(self, latents: torch.Tensor, timestep: int, generator: torch.Generator):
        """(x_t, t, target) for DDPM-family models: seeded noise at `timestep` with the pipeline scheduler's betas,
        and what the denoiser is trained to predict there (the noise, the velocity or the sample, as the scheduler's
        `prediction_type` says)."""
        from diffusers import DDPMScheduler

        noising = DDPMScheduler.from_config(self.pipe.scheduler.config)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        t = torch.tensor([timestep], device=latents.device)
        kind = noising.config.prediction_type
        target = {"epsilon": lambda: noise, "v_prediction": lambda: noising.get_velocity(latents, noise, t),
                  "sample": lambda: latents}[kind]()
        return noising.add_noise(latents, noise, t), t, target

    def segment_forward(self, latents: torch.Tensor, prompt: str, timestep: int, generator: torch.Generator,
                        guidance_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise `latents` (clean, scaled) to `timestep` and run the denoiser once on `prompt`, without CFG.

        Returns (prediction, target): the denoiser's output and what it is trained to output there (noise,
        velocity or flow), in the same layout; their distance is the denoising error (`presence.denoiser_presence`).
        """
        raise NotImplementedError


# Pipelines whose denoising step is not one denoiser call on [uncond, cond] rows of the images: SAG and Pix2Pix-Zero
# add guidance calls, Attend-and-Excite refines the latents with calls of its own, Panorama and Paradigms run windows
# or several timesteps per call, Semantic SD adds edit-concept rows. Their masks per step could not be labelled.
MULTI_CALL_PIPELINES = frozenset({
    "StableDiffusionSAGPipeline", "StableDiffusionAttendAndExcitePipeline", "StableDiffusionPanoramaPipeline",
    "StableDiffusionPix2PixZeroPipeline", "StableDiffusionParadigmsPipeline", "SemanticStableDiffusionPipeline",
})


def check_one_call_per_step(pipe, what: str) -> None:
    """ValueError naming the pipeline if it is one of `MULTI_CALL_PIPELINES` (`what`: the feature refused)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in MULTI_CALL_PIPELINES:
            raise ValueError(f"{what} is not supported on {cls.__name__}: its denoising steps are not one denoiser "
                             f"call on the images' [uncond, cond] rows, so a call's masks could not be tied to its "
                             f"steps; segment its images with pipe.segment(image, classes) instead")


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
            raise ValueError(f"the pipeline's {name} is wrapped by torch.compile, which hides its layers from GoCA: "
                             f"compile it in place instead (`pipe.{name}.compile()`), which GoCA supports")
    for cls in _ADAPTERS:
        if cls.supports(pipe):
            return cls(pipe)
    raise ValueError(
        f"GoCA does not support {type(pipe).__name__}: supported are pipelines whose denoiser is a "
        "UNet2DConditionModel with CLIP text encoders (Stable Diffusion 1.x/2.x, SDXL), a PixArtTransformer2DModel "
        "(PixArt-α/Σ), an SD3Transformer2DModel (SD3/3.5) or a FluxTransformer2DModel (Flux.1)"
    )
