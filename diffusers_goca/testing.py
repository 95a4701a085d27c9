"""Tiny random pipelines of every supported family, built offline, for the tests and the benchmarks.

As diffusers' `testing_utils`: nothing here is needed to segment or generate. The builders make each family's
layout in miniature from configs, with random (seeded) weights, and no download:

- `make_tiny_sd` (SD 1.x, or 2.x with `sd2=True`), `make_tiny_sdxl`, `make_tiny_pixart` (Sigma or Alpha),
  `make_tiny_sd3` (also SD 3.5's q/k norms and dual attention), `make_tiny_flux`; `FAMILIES` names them all;
- `derived`: another diffusers pipeline class on a tiny pipeline's components (img2img, inpainting, ControlNet, PAG,
  Kontext, ...), and `with_ip_adapter` / `install_ip_adapter`: what `load_ip_adapter` installs, with random weights;
- `generate`: three seeded steps on `PROMPTS` at a non-square 32×48, as numpy images.

The text encoders read real token ids: the CLIP tokenizer is built from the BPE file that open-clip-torch ships
(`clip_bpe`; the `[test]` extra), the T5 one is a small SentencePiece model built in memory (`t5_spm`). Both are
built when a builder first asks for them, so importing this module (or the package) needs neither.

Test helpers that are plain Python live here too: `restoring` (puts a shared pipeline back as it was),
`HostWaits` (counts the ops after which the host waits for the device), `Running` (whether a function is being
called, through pytest's `monkeypatch`) and `with_kernel` (the layer weights of one layer-weight kernel).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from .clip_bpe import build_clip_tokenizer, small_clip_text_config
from .t5_spm import build_t5_tokenizer

__all__ = [
    "FAMILIES",
    "FAMILY_IDS",
    "IMAGE_48x32",
    "PROMPTS",
    "HostWaits",
    "Running",
    "clip_tokenizer",
    "derived",
    "generate",
    "install_ip_adapter",
    "make_tiny_flux",
    "make_tiny_pixart",
    "make_tiny_sd",
    "make_tiny_sd3",
    "make_tiny_sdxl",
    "restoring",
    "t5_tokenizer",
    "tiny_clip_text",
    "tiny_scheduler",
    "tiny_t5",
    "tiny_vae",
    "with_ip_adapter",
    "with_kernel",
]


# -- text encoders, VAE, scheduler ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer (ids of `openai/clip-vit-large-patch14`), from open_clip's BPE file."""
    return build_clip_tokenizer(pad_token=pad_token)


def tiny_clip_text(hidden=32, with_projection=False, seed=0):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = small_clip_text_config(hidden)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=16,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
    ).eval()


def tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


@functools.lru_cache(maxsize=None)
def t5_tokenizer(model_max_length: int = 300):
    """A T5 tokenizer built in memory: a small SentencePiece unigram model, `</s>` appended, no extra ids."""
    words = (
        "a photo of the traffic light and person background cat dog grass sand water sky wall red yellow purple "
        "white black circle square triangle on in with car carpet next to another"
    ).split()
    return build_t5_tokenizer(words, model_max_length)


def tiny_t5(seed=0, d_model=32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(t5_tokenizer()),
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


# -- the families ---------------------------------------------------------------------------------------------------
def make_tiny_sd(pipeline_class=None, seed=0, sd2=False):
    """SD 1.x layout in miniature: four levels, cross-attention in the first three down and last three up blocks.

    sd2: the SD 2.x variant (768-v): linear projections, per-level head counts, upcast attention, v-prediction,
    the OpenCLIP tokenizer's pad token "!".
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    variant = (
        dict(attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, upcast_attention=True)
        if sd2
        else dict(attention_head_dim=4)
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        norm_num_groups=16,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        **variant,
    ).eval()
    scheduler = tiny_scheduler()
    if sd2:
        scheduler.register_to_config(prediction_type="v_prediction")
    pipe = (pipeline_class or StableDiffusionPipeline)(
        vae=tiny_vae(seed),
        unet=unet,
        text_encoder=tiny_clip_text(seed=seed),
        tokenizer=clip_tokenizer("!" if sd2 else "<|endoftext|>"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_sdxl(pipeline_class=None, seed=0):
    """SDXL layout in miniature: no attention at the finest level, transformer depth (1, 2), layers_per_block 2."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        norm_num_groups=16,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    ).eval()
    cls = pipeline_class or StableDiffusionXLPipeline
    pipe = cls(
        vae=tiny_vae(seed),
        unet=unet,
        text_encoder=tiny_clip_text(seed=seed),
        text_encoder_2=tiny_clip_text(with_projection=True, seed=seed + 1),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer("!"),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_pixart(sigma=True, seed=0, num_layers=4):
    """PixArt in miniature: patch 2, 3 heads, T5 text with a padding mask."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=num_layers,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(
        tokenizer=t5_tokenizer(),
        text_encoder=tiny_t5(seed),
        vae=tiny_vae(seed),
        transformer=transformer,
        scheduler=tiny_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_sd3(seed=0, num_layers=2, qk_norm=None, dual_attention_layers=()):
    """SD3 in miniature: joint attention, CLIP-L + CLIP-G + T5 text, FlowMatch scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        qk_norm=qk_norm,
        dual_attention_layers=dual_attention_layers,
    ).eval()
    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5305)  # SD3's VAE has a shift
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=tiny_clip_text(with_projection=True, seed=seed),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_clip_text(with_projection=True, seed=seed + 1),
        tokenizer_2=clip_tokenizer("!"),
        text_encoder_3=tiny_t5(seed, d_model=64),
        tokenizer_3=t5_tokenizer(256),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_flux(seed=0, num_layers=2, num_single_layers=2, guidance_embeds=False):
    """Flux in miniature: double- and single-stream blocks, RoPE, packed latents, CLIP pooled + T5 text."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    ).eval()
    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)  # Flux's VAE has a shift
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=tiny_clip_text(seed=seed),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_t5(seed),
        tokenizer_2=t5_tokenizer(512),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Every family and variant, as builders, with their test ids.
FAMILIES = [
    make_tiny_sd,
    lambda: make_tiny_sd(sd2=True),
    make_tiny_sdxl,
    make_tiny_pixart,
    lambda: make_tiny_pixart(sigma=False),
    make_tiny_sd3,
    lambda: make_tiny_sd3(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,)),
    make_tiny_flux,
    lambda: make_tiny_flux(guidance_embeds=True),
]
FAMILY_IDS = ["sd", "sd2", "sdxl", "pixart-sigma", "pixart-alpha", "sd3", "sd35", "flux-schnell", "flux-dev"]


# -- other pipeline classes on the same components --------------------------------------------------------------------
def derived(make, class_name, **settings):
    """A builder of the diffusers pipeline `class_name` on those components of `make()` it takes, with `settings`
    (plus a ControlNet made from the UNet, for the ControlNet pipeline)."""

    def build():
        import inspect

        import diffusers

        base = make()
        cls = getattr(diffusers, class_name)
        params = inspect.signature(cls.__init__).parameters
        extra = dict(settings)
        if class_name == "StableDiffusionControlNetPipeline":
            torch.manual_seed(0)
            extra["controlnet"] = diffusers.ControlNetModel.from_unet(
                base.unet, conditioning_embedding_out_channels=(16, 16)
            )
        pipe = cls(**{k: v for k, v in base.components.items() if k in params}, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return build


def with_ip_adapter():
    """Tiny SD with what `load_ip_adapter` installs: IP-Adapter processors (weights of their own) on the cross layers
    and an image projection, with random weights."""
    pipe = make_tiny_sd()
    install_ip_adapter(pipe.unet)
    return pipe


def install_ip_adapter(unet):
    """What `load_ip_adapter` installs on `unet`, with random weights (seeded)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    torch.manual_seed(0)
    procs = {}
    for key, proc in unet.attn_processors.items():
        attn = unet.get_submodule(key[: -len(".processor")])
        procs[key] = (
            proc
            if not attn.is_cross_attention
            else IPAdapterAttnProcessor2_0(
                hidden_size=attn.to_q.out_features, cross_attention_dim=32, num_tokens=(4,), scale=1.0
            )
        )
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(16, 32, 4)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"


# -- calls ----------------------------------------------------------------------------------------------------------
PROMPTS = ["a red circle on grass", "a cat and a dog on sand"]
# A random 48×32 picture (the size `generate` makes).
IMAGE_48x32 = Image.fromarray((np.random.RandomState(0).rand(32, 48, 3) * 255).astype(np.uint8))


def generate(pipe, **kw):
    """Three seeded steps of `pipe` on PROMPTS at a non-square 32×48, as numpy images."""
    if "PixArt" in type(pipe).__name__:
        kw["use_resolution_binning"] = False  # keep the non-square test size
    if "3" in type(pipe).__name__ or "Flux" in type(pipe).__name__:
        kw["max_sequence_length"] = 32
    return pipe(
        PROMPTS,
        num_inference_steps=3,
        height=32,
        width=48,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images


# -- test helpers ---------------------------------------------------------------------------------------------------
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
# Libraries whose hooks stay: they install some for themselves on first use (transformers' output capturing).
_LIBRARIES = ("transformers", "diffusers", "torch", "accelerate")


def _put_back_hooks(module: torch.nn.Module, saved: dict) -> None:
    """The forward hooks of `module` as `saved` had them, plus those the libraries added meanwhile for themselves."""
    hooks = {**module._forward_pre_hooks, **module._forward_hooks}  # handle id → hook (ids are unique)
    before = set(saved["_forward_pre_hooks"]) | set(saved["_forward_hooks"])
    kept = {
        k
        for k, hook in hooks.items()
        if k not in before and (getattr(hook, "__module__", None) or "").split(".")[0] in _LIBRARIES
    }
    for attr, entries in saved.items():
        current = getattr(module, attr)
        wanted = {**entries, **{k: v for k, v in current.items() if k in kept}}
        if current.keys() != wanted.keys():
            current.clear()
            current.update(wanted)


@contextmanager
def restoring(pipe):
    """While active, `pipe` may be changed as a test changes a pipeline that other tests share; on exit (also after an
    error) it is put back as it was: its components (the same objects), and on each of its torch modules the
    attention processors (the same objects: what `disable_goca` restores, and what attention slicing or
    `load_ip_adapter` replace) and the forward hooks (those GoCA or the test registered; those transformers installs
    for itself on a first call stay); its scheduler's config too."""
    components = dict(pipe.components)
    modules = {name: m for name, m in components.items() if isinstance(m, torch.nn.Module)}
    processors = {name: dict(m.attn_processors) for name, m in modules.items() if hasattr(m, "attn_processors")}
    hooks = [
        (sub, {attr: dict(getattr(sub, attr)) for attr in _HOOK_DICTS if hasattr(sub, attr)})
        for m in modules.values()
        for sub in m.modules()
    ]
    scheduler = components.get("scheduler")
    scheduler_config = dict(scheduler.config) if scheduler is not None else None
    try:
        yield pipe
    finally:
        for name, component in components.items():
            if getattr(pipe, name, None) is not component:
                setattr(pipe, name, component)
        for sub, saved in hooks:
            _put_back_hooks(sub, saved)
        for name, saved in processors.items():
            current = modules[name].attn_processors
            if current.keys() != saved.keys() or any(current[k] is not p for k, p in saved.items()):
                modules[name].set_attn_processor(dict(saved))
        if scheduler is not None and dict(scheduler.config) != scheduler_config:
            scheduler.register_to_config(**scheduler_config)


class HostWaits(TorchDispatchMode):
    """Counts, while `counting()` holds, the ops after which the host waits for the device: a value read on the host
    (`.item()`, `int(t)`, `if t:`) or an output whose size depends on values (nonzero, unique, boolean indexing).
    On CUDA each one drains the queue, so that the host and the device no longer work ahead of each other."""

    WAITING = {
        "_local_scalar_dense",
        "nonzero",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "masked_select",
        "equal",
        "is_nonzero",
    }

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
    """Replaces `owner.name` (through pytest's `monkeypatch`, which puts it back after the test) by a wrapper, so that
    `bool(self)` says whether a call to it is under way; `calls` counts the calls so far."""

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
    from . import methods
    from .functional.frobenius_kernel import layer_weight_kernel

    weights, original = [], methods.layer_weights
    methods.layer_weights = lambda *args: weights.append(original(*args)) or weights[-1]
    try:
        with layer_weight_kernel(kernel):
            return fn(), torch.cat(weights).float().cpu()
    finally:
        methods.layer_weights = original
