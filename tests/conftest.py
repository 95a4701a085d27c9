"""Tiny pipelines built from configs (random weights), with the real CLIP tokenizer from open_clip's BPE file."""
from __future__ import annotations

import functools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_goca.clip_bpe import CLIP_VOCAB_SIZE, build_clip_tokenizer
from diffusers_goca.t5_spm import build_t5_tokenizer

torch.set_num_threads(int(os.environ.get("GOCA_TEST_THREADS", "2")))


@functools.lru_cache(maxsize=None)
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    return build_clip_tokenizer(pad_token=pad_token)


def tiny_clip_text(hidden=32, with_projection=False, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32),
    ).eval()


def tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def make_tiny_sd(pipeline_class=None, seed=0, sd2=False):
    """SD 1.x layout in miniature: four levels, cross-attention in the first three down and last three up blocks.

    sd2: the SD 2.x variant (768-v): linear projections, per-level head counts, upcast attention, v-prediction,
    the OpenCLIP tokenizer's pad token "!".
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    variant = dict(attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, upcast_attention=True) if sd2 else dict(
        attention_head_dim=4)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=16,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, **variant,
    ).eval()
    scheduler = tiny_scheduler()
    if sd2:
        scheduler.register_to_config(prediction_type="v_prediction")
    pipe = (pipeline_class or StableDiffusionPipeline)(
        vae=tiny_vae(seed), unet=unet, text_encoder=tiny_clip_text(seed=seed), tokenizer=clip_tokenizer("!" if sd2 else "<|endoftext|>"),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_sdxl(pipeline_class=None, seed=0):
    """SDXL layout in miniature: no attention at the finest level, transformer depth (1, 2), layers_per_block 2."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=16,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    ).eval()
    cls = pipeline_class or StableDiffusionXLPipeline
    pipe = cls(
        vae=tiny_vae(seed), unet=unet, text_encoder=tiny_clip_text(seed=seed),
        text_encoder_2=tiny_clip_text(with_projection=True, seed=seed + 1), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer("!"),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=None)
def t5_tokenizer(model_max_length: int = 300):
    """A T5 tokenizer built in memory: a small SentencePiece unigram model, `</s>` appended, no extra ids."""
    words = ("a photo of the traffic light and person background cat dog grass sand water sky wall red yellow purple "
             "white black circle square triangle on in with car carpet next to another").split()
    return build_t5_tokenizer(words, model_max_length)


def tiny_t5(seed=0, d_model=32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(t5_tokenizer()), d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def make_tiny_pixart(sigma=True, seed=0, num_layers=4):
    """PixArt in miniature: patch 2, 3 heads, T5 text with a padding mask."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(tokenizer=t5_tokenizer(), text_encoder=tiny_t5(seed), vae=tiny_vae(seed), transformer=transformer,
               scheduler=tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_sd3(seed=0, num_layers=2, qk_norm=None, dual_attention_layers=()):
    """SD3 in miniature: joint attention, CLIP-L + CLIP-G + T5 text, FlowMatch scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4, qk_norm=qk_norm,
        dual_attention_layers=dual_attention_layers,
    ).eval()
    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5305)  # SD3's VAE has a shift
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=tiny_clip_text(with_projection=True, seed=seed), tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_clip_text(with_projection=True, seed=seed + 1), tokenizer_2=clip_tokenizer("!"),
        text_encoder_3=tiny_t5(seed, d_model=64), tokenizer_3=t5_tokenizer(256),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_flux(seed=0, num_layers=2, num_single_layers=2, guidance_embeds=False):
    """Flux in miniature: double- and single-stream blocks, RoPE, packed latents, CLIP pooled + T5 text."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    ).eval()
    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)  # Flux's VAE has a shift
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=tiny_clip_text(seed=seed),
        tokenizer=clip_tokenizer(), text_encoder_2=tiny_t5(seed), tokenizer_2=t5_tokenizer(512), transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPTS = ["a red circle on grass", "a cat and a dog on sand"]


def generate(pipe, **kw):
    """Three seeded steps of `pipe` on PROMPTS at a non-square 32×48, as numpy images."""
    if "PixArt" in type(pipe).__name__:
        kw["use_resolution_binning"] = False  # keep the non-square test size
    if "3" in type(pipe).__name__ or "Flux" in type(pipe).__name__:
        kw["max_sequence_length"] = 32
    return pipe(PROMPTS, num_inference_steps=3, height=32, width=48, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.fixture(scope="session")
def tiny_sd():
    return make_tiny_sd()


@pytest.fixture(scope="session")
def tiny_sdxl():
    return make_tiny_sdxl()


class HostWaits(TorchDispatchMode):
    """Counts, while `counting()` holds, the ops after which the host waits for the device: a value read on the host
    (`.item()`, `int(t)`, `if t:`) or an output whose size depends on values (nonzero, unique, boolean indexing).
    On CUDA each one drains the queue, so that the host and the device no longer work ahead of each other."""

    WAITING = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
               "equal", "is_nonzero"}

    def __init__(self, counting):
        super().__init__()
        self.counting, self.ops = counting, []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        by_mask = name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        if (name in self.WAITING or by_mask) and self.counting():
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class Running:
    """Replaces `owner.name` (through `monkeypatch`) by a wrapper, so that `bool(self)` says whether a call to it
    is under way; `calls` counts the calls so far."""

    def __init__(self, monkeypatch, owner, name: str):
        self.depth = self.calls = 0
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.depth += 1
            self.calls += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1

        monkeypatch.setattr(owner, name, wrapped)

    def __bool__(self) -> bool:
        return self.depth > 0


def with_kernel(kernel: str, fn):
    """(fn(), the normalised layer weights its `goca` reductions used, concatenated), with the layer weights by
    `kernel` ("torch": the fused attention call, or "triton")."""
    from diffusers_goca import methods
    from diffusers_goca.functional.frobenius_kernel import layer_weight_kernel

    weights, original = [], methods.layer_weights
    methods.layer_weights = lambda *args: weights.append(original(*args)) or weights[-1]
    try:
        with layer_weight_kernel(kernel):
            return fn(), torch.cat(weights).float().cpu()
    finally:
        methods.layer_weights = original
