"""What every family adapter provides, and how a pipeline finds its adapter."""
from __future__ import annotations

from dataclasses import dataclass

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
    role: str
    block: str
    factor: int


class Adapter:
    """Base of the family adapters. Subclasses fill the layer tables in `__init__` and implement the hooks below."""

    family: str = "?"
    text_max_length: int = 77
    segment_timestep: int = 100  # ALGORITHMS §5: t = 100 of 1000 for SD / SDXL / PixArt

    def __init__(self, pipe):
        self.pipe = pipe
        self.layers: dict[str, LayerInfo] = {}
        self.reference_layer: str = ""
        self.refinement_layers: list[str] = []
        self.refine_order: int = 2
        self.manual_layers: list[str] | None = None
        self.map_factor: int = 1
        self.native_resolution: int = 512

    # -- registration -------------------------------------------------------------------------------------------------
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _ADAPTERS.append(cls)

    @classmethod
    def supports(cls, pipe) -> bool:
        raise NotImplementedError

    # -- tables -------------------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def cross_layers(self) -> list[str]:
        return [n for n, i in self.layers.items() if i.role == "cross"]

    def self_of(self, cross_layer: str) -> str:
        """The self-attention layer of the same transformer block as `cross_layer`."""
        block = self.layers[cross_layer].block
        for name, info in self.layers.items():
            if info.role == "self" and info.block == block:
                return name
        raise KeyError(f"no self-attention layer in the block of {cross_layer}")

    def grid(self, layer: str, n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) of `layer` for a latent of size `latent_hw`, from the latent shape, never from sqrt(N)."""
        f = self.layers[layer].factor
        h, w = -(-latent_hw[0] // f), -(-latent_hw[1] // f)
        if h * w != n_tokens:
            raise RuntimeError(f"{layer}: {n_tokens} tokens do not match a {h}×{w} grid (latent {latent_hw}, factor {f})")
        return h, w

    def map_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        f = self.map_factor
        return -(-latent_hw[0] // f), -(-latent_hw[1] // f)

    # -- pipeline specifics -------------------------------------------------------------------------------------------
    def tokenizer(self):
        return self.pipe.tokenizer

    def prompt_text(self, prompt: str, call_kwargs: dict) -> str:
        """The text the pipeline actually tokenizes for `prompt` (token positions are read from it)."""
        return prompt

    def denoiser_latent_hw(self, args, kwargs) -> tuple[int, int]:
        sample = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        return tuple(sample.shape[-2:])

    def denoiser_batch(self, args, kwargs) -> int:
        sample = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        return sample.shape[0]

    def segment_forward(self, latents: torch.Tensor, prompt: str, timestep: int, generator: torch.Generator) -> None:
        """Noise `latents` (clean, scaled) to `timestep` and run the denoiser once on `prompt`, without CFG."""
        raise NotImplementedError


def adapter_for(pipe) -> Adapter:
    """The adapter of the first family that supports `pipe`; ValueError naming the pipeline otherwise."""
    for cls in _ADAPTERS:
        if cls.supports(pipe):
            return cls(pipe)
    raise ValueError(
        f"GoCA does not support {type(pipe).__name__}: supported are pipelines whose denoiser is a "
        "UNet2DConditionModel with CLIP text encoders (Stable Diffusion 1.x/2.x, SDXL) or a PixArtTransformer2DModel "
        "(PixArt-α/Σ)"
    )
