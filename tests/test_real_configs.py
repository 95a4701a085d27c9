"""The real model configs (public layer counts, widths, heads) with random weights.

Full depth on the meta device: the adapters find the layers docs/official_code.md names. Full width at reduced depth: the
captured maps have the right shapes at the real head counts. And the chunked reductions never form a [heads, N, N]
tensor, checked on every tensor any op creates during a capture step.
"""

import pytest
import torch
from accelerate import init_empty_weights
from torch.utils._python_dispatch import TorchDispatchMode

import diffusers_goca as goca
from benchmarks.real_configs import FLUX_DEV, PIXART_SIGMA, SD3_MEDIUM, SD15, SDXL
from diffusers_goca.mixin import GoCAMixin
from diffusers_goca.testing import clip_tokenizer, make_tiny_flux, make_tiny_pixart, make_tiny_sd, make_tiny_sd3


class Host(GoCAMixin):
    """Just the parts of a pipeline the adapters read."""

    def __init__(self, **parts):
        self.__dict__.update(parts)


def unet_host(config):
    from diffusers import UNet2DConditionModel

    return Host(unet=UNet2DConditionModel(**config), tokenizer=clip_tokenizer(), vae_scale_factor=8)


def transformer_host(cls_name, config):
    import diffusers

    return Host(transformer=getattr(diffusers, cls_name)(**config), vae_scale_factor=8, default_sample_size=128)


def test_full_depth_layers():
    with init_empty_weights():
        sd = goca.adapter_for(unet_host(SD15))
        xl = goca.adapter_for(unet_host(SDXL))
        pixart = goca.adapter_for(transformer_host("PixArtTransformer2DModel", PIXART_SIGMA))
        sd3 = goca.adapter_for(transformer_host("SD3Transformer2DModel", SD3_MEDIUM))
        flux = goca.adapter_for(transformer_host("FluxTransformer2DModel", FLUX_DEV))
    assert len(sd.cross_layers) == 16 and sd.native_resolution == 512
    assert sd.reference_layer == "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
    assert sorted(n.split(".transformer_blocks")[0] for n in sd.refinement_layers) == [
        "down_blocks.0.attentions.1",
        "up_blocks.3.attentions.0",
        "up_blocks.3.attentions.1",
    ]
    assert len(xl.cross_layers) == 70 and xl.native_resolution == 1024 and xl.map_factor == 2
    assert xl.reference_layer == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert xl.refinement_layers == [
        f"up_blocks.1.attentions.{a}.transformer_blocks.{b}.attn1" for a, b in ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0))
    ] + [f"down_blocks.1.attentions.0.transformer_blocks.{b}.attn1" for b in (0, 1)]
    assert pixart.reference_layer == "transformer_blocks.13.attn2" and pixart.refine_order == 5
    assert pixart.refinement_layers == [f"transformer_blocks.{i}.attn1" for i in range(10, 18)]
    assert len(pixart.cross_layers) == 28 and pixart.native_resolution == 1024
    assert len(sd3.cross_layers) == 24 and sd3.seg4diff_layer == "transformer_blocks.9.attn"
    assert sd3.reference_layer == "transformer_blocks.11.attn"
    assert len(flux.cross_layers) == 57 and flux.native_resolution == 1024
    # The official `vit-block27` counts on from the 19 double blocks: single block 8.
    assert flux.reference_layer == "single_transformer_blocks.8.attn"
    assert flux.refinement_layers == ["transformer_blocks.12.attn", "transformer_blocks.18.attn"]
    # The official vanilla's layers: PixArt-Σ cross blocks 10–17; Flux blocks 8, 28 and 47 of the running numbering.
    assert pixart.layer_set("subset") == (
        [f"transformer_blocks.{i}.attn2" for i in range(10, 18)],
        pixart.refinement_layers,
    )
    flux_vanilla = [
        "transformer_blocks.8.attn",
        "single_transformer_blocks.9.attn",
        "single_transformer_blocks.28.attn",
    ]
    assert flux.layer_set("subset") == (flux_vanilla, flux_vanilla)
    assert flux.layer_set("all") == (flux.cross_layers, flux.refinement_layers)
    assert sd.layer_set("subset") == (sd.cross_layers, sd.refinement_layers)


def _shapes(step, layer, adapter):
    return tuple(step.cross[layer]["auto"].shape), step.selfs[adapter.self_of(layer)].heads


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_full_width_shapes_at_real_head_counts(family):
    torch.manual_seed(0)
    h, w, t = 6, 10, 12  # a non-square token grid
    if family == "pixart":
        host = transformer_host("PixArtTransformer2DModel", {**PIXART_SIGMA, "num_layers": 1})
        model = host.transformer.eval()
        run = lambda: model(
            torch.randn(1, 4, 2 * h, 2 * w),
            encoder_hidden_states=torch.randn(1, t, 4096),
            timestep=torch.tensor([100]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
        layer, heads, width = "transformer_blocks.0.attn2", 16, 1152
    elif family == "sd3":
        host = transformer_host("SD3Transformer2DModel", {**SD3_MEDIUM, "num_layers": 1})
        model = host.transformer.eval()
        run = lambda: model(
            torch.randn(1, 16, 2 * h, 2 * w),
            encoder_hidden_states=torch.randn(1, t, 4096),
            pooled_projections=torch.randn(1, 2048),
            timestep=torch.tensor([500.0]),
        )
        layer, heads, width = "transformer_blocks.0.attn", 24, 1536
    else:
        host = transformer_host("FluxTransformer2DModel", {**FLUX_DEV, "num_layers": 1, "num_single_layers": 1})
        model = host.transformer.eval()
        ids = torch.zeros(h, w, 3)
        ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
        run = lambda: model(
            torch.randn(1, h * w, 64),
            encoder_hidden_states=torch.randn(1, t, 4096),
            pooled_projections=torch.randn(1, 768),
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([3.5]),
            txt_ids=torch.zeros(t, 3),
            img_ids=ids.reshape(-1, 3),
        )
        layer, heads, width = "single_transformer_blocks.0.attn", 24, 3072
    with torch.no_grad():
        step = host.capture_forward(run)
    assert _shapes(step, layer, goca.adapter_for(host)) == ((1, h * w, t), heads)
    assert step.grids[layer] == (h, w)
    assert step.reference.shape == (1, h * w, width)
    if family != "pixart":
        assert step.selfs[layer].image_mass.shape == (1, heads, h * w)
    else:
        assert step.selfs["transformer_blocks.0.attn1"].image_mass is None
    assert all(maps[kind].shape[-1] == t for maps in step.cross.values() for kind in ("auto", "average"))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_heads_by_n_by_n_tensor(monkeypatch):
    import diffusers_goca.functional.self_attention as sa
    from diffusers_goca.methods import method_scores

    pipe = goca.from_pipe(make_tiny_sd3(num_layers=2))
    heads, n = 4, 24 * 24  # patch 2 over a 48×48 latent
    monkeypatch.setattr(sa, "CHUNK_ELEMENTS", heads * n * n // 16)
    index = pipe._goca.adapter.token_index("cat, grass", ["cat", "grass"], max_length=32)
    model = pipe.transformer
    run = lambda: model(
        torch.randn(1, 4, 48, 48),
        encoder_hidden_states=torch.randn(1, 77 + 32, 64),
        pooled_projections=torch.randn(1, 64),
        timestep=torch.tensor([500.0]),
    )
    with torch.no_grad(), LargestTensor() as plain:
        run()
    with torch.no_grad(), LargestTensor() as captured:
        step = pipe.capture_forward(run)
        for method in ("goca", "vanilla", "diffsegmenter", "seg4diff"):
            method_scores(step, 0, index, pipe._goca.adapter, method)
    assert captured.largest < heads * n * n // 2, (captured.largest, heads * n * n)
    assert captured.largest <= max(plain.largest, n * n)  # at most the head-mean S at the map grid
    # What it holds is the memory plan's formula, O(N·(C + T)), not O(N²): per joint layer two fp32 maps [N, T] and
    # their text masses [N], the queries and keys [N, C] and the image-key shares [heads, N]; plus the reference
    # feature [N, C].
    layers, t, c = 2, 77 + 32, 32
    assert step.nbytes() == layers * (2 * n * (t + 1) * 4 + 2 * n * c * 4 + heads * n * 4) + n * c * 4


@pytest.mark.parametrize("family", ["sd", "pixart", "sd3", "flux"])
def test_memory_plan_is_the_capture_accounting(family):
    """`memory_plan` (what docs/performance.md's table comes from) equals what a capture step actually holds."""
    from diffusers_goca.capture import memory_plan
    from diffusers_goca.tokens import segmentation_prompt

    make = {"sd": make_tiny_sd, "pixart": make_tiny_pixart, "sd3": make_tiny_sd3, "flux": make_tiny_flux}[family]
    pipe = goca.from_pipe(make())
    adapter = pipe._goca.adapter
    classes = ["cat", "grass"]
    prompt = segmentation_prompt(classes, True)
    index = adapter.token_index(prompt, classes, extra_entities=["background"])
    latents = torch.randn(1, pipe.vae.config.latent_channels, 8, 12)
    step = pipe.capture_forward(
        lambda: adapter.segment_forward(latents, prompt, adapter.segment_timestep, torch.Generator().manual_seed(0)),
        columns=index.needed(),
    )
    plan = memory_plan(
        adapter, step.latent_hw, len(index.needed()), step.text_len or 0, dtype_bytes=4, accelerator=False
    )
    assert plan["offloaded"] == 0 and plan["held"] == step.nbytes() > 0


def test_memory_plan_at_1024_px_meets_the_bounds():
    """Full-depth PixArt-Σ and Flux.1-dev on the meta device, bf16, 1024 px, 16 token columns: the accelerator-side
    capture plus its largest transient stays within 1 GiB and 1.5 GiB (issue #3); Flux offloads most q/k."""
    from diffusers_goca.capture import memory_plan

    with init_empty_weights():
        pixart = goca.adapter_for(transformer_host("PixArtTransformer2DModel", PIXART_SIGMA))
        flux = goca.adapter_for(transformer_host("FluxTransformer2DModel", FLUX_DEV))
    p = memory_plan(pixart, (128, 128), 16, 300)
    f = memory_plan(flux, (64, 64), 16, 512)
    assert p["held"] + p["transient"] <= 2**30
    assert f["held"] + f["transient"] <= 1.5 * 2**30 and f["offloaded"] > 2 * 2**30
    unbounded = memory_plan(flux, (64, 64), 16, 512, offload_above=None)
    assert unbounded["held"] > 2.5 * 2**30  # what offloading saves
