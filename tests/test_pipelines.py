"""Tiny SD / SDXL pipelines: exactness with GoCA on, restoration, segmentation of odd inputs, clear errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image

import diffusers_goca as goca
from conftest import (PROMPTS, HostWaits, Running, generate, make_tiny_flux, make_tiny_pixart, make_tiny_sd, make_tiny_sd3,
                      make_tiny_sdxl)

FAMILIES = [make_tiny_sd, lambda: make_tiny_sd(sd2=True), make_tiny_sdxl, make_tiny_pixart, lambda: make_tiny_pixart(sigma=False),
            make_tiny_sd3, lambda: make_tiny_sd3(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,)),
            make_tiny_flux, lambda: make_tiny_flux(guidance_embeds=True)]
FAMILY_IDS = ["sd", "sd2", "sdxl", "pixart-sigma", "pixart-alpha", "sd3", "sd35", "flux-schnell", "flux-dev"]


@pytest.mark.parametrize("make", FAMILIES, ids=FAMILY_IDS)
def test_images_bit_identical_with_goca(make):
    pipe = make()
    reference = generate(pipe)
    gp = goca.from_pipe(pipe)
    assert np.array_equal(generate(gp), reference)
    masked = generate(gp, goca_masks=True)
    assert np.array_equal(masked, reference), "computing masks must not change the images"
    assert len(gp.goca_masks) == 3
    last = gp.goca_masks[-1].results
    assert len(last) == 2 and last[0].labels.shape == (32, 48) and last[1].classes == ["cat", "dog", "sand"]
    assert last[0].scores.shape == (2, 32, 48)
    gp.disable_goca()
    assert np.array_equal(generate(pipe), reference)


def test_generation_masks_reuse_layer_weights_every_k_steps(tiny_sd, monkeypatch):
    """goca_layer_weights_every=2 takes the layer weights at steps 0 and 2 of 3 (those steps' masks are the per-step
    method's exactly) and reuses step 0's at step 1; the images stay untouched."""
    from diffusers_goca import methods

    gp = goca.from_pipe(tiny_sd)
    reference = generate(gp, goca_masks=True)
    exact = [m.results for m in gp.goca_masks]
    taken = Running(monkeypatch, methods, "layer_weights")
    assert np.array_equal(generate(gp, goca_masks=True, goca_layer_weights_every=2), reference)
    assert taken.calls == 2 * 2  # two images, at steps 0 and 2
    reused = [m.results for m in gp.goca_masks]
    for step in (0, 2):
        assert all(torch.equal(a.scores, b.scores) for a, b in zip(reused[step], exact[step]))
    assert not all(torch.equal(a.scores, b.scores) for a, b in zip(reused[1], exact[1]))
    gp.disable_goca()


def test_disable_restores_identical_objects_and_custom_processors_run(tiny_sd):
    pipe = goca.from_pipe(tiny_sd, enable=False)
    unet = pipe.unet
    before = dict(unet.attn_processors)
    pipe.enable_goca()
    assert all(isinstance(p, (goca.GoCAAttnProcessor2_0, goca.GoCAWrappedProcessor)) for p in unet.attn_processors.values())
    pipe.disable_goca()
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)

    class Scaled(torch.nn.Module):  # a custom processor holding weights, as IP-Adapter's do
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.tensor(1.5))
            self.calls = 0

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, gain_scale=1.0):
            self.calls += 1
            return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask) * self.gain * gain_scale

    custom = {k: (Scaled() if k.endswith("attn2.processor") else AttnProcessor2_0()) for k in before}
    unet.set_attn_processor(dict(custom))
    # The attention module passes on only the cross-attention kwargs its processor's __call__ names.
    own_kwarg = dict(cross_attention_kwargs={"gain_scale": 0.5})
    reference, reference_own_kwarg = generate(pipe), generate(pipe, **own_kwarg)
    assert not np.array_equal(reference, reference_own_kwarg)
    pipe.enable_goca()
    wrapped = unet.attn_processors
    assert isinstance(wrapped[next(k for k in custom if k.endswith("attn2.processor"))], goca.GoCAWrappedProcessor)
    assert np.array_equal(generate(pipe, goca_masks="last"), reference)
    assert np.array_equal(generate(pipe, goca_masks="last", **own_kwarg), reference_own_kwarg)
    assert all(p.calls > 0 for k, p in custom.items() if k.endswith("attn2.processor"))
    pipe.disable_goca()
    assert all(unet.attn_processors[k] is custom[k] for k in custom)
    unet.set_attn_processor(dict(before))


def test_attention_backend_set_while_enabled_stays_after_disable():
    pipe = make_tiny_flux()
    original = pipe.transformer.transformer_blocks[0].attn.processor
    gp = goca.from_pipe(pipe)
    pipe.transformer.set_attention_backend("native")
    assert gp.transformer.transformer_blocks[0].attn.processor._attention_backend.value == "native"
    gp.disable_goca()
    assert pipe.transformer.transformer_blocks[0].attn.processor is original
    assert original._attention_backend.value == "native"
    pipe.transformer.reset_attention_backend()  # the active backend is global state


def test_steps_without_masks_capture_nothing(tiny_sd):
    pipe = goca.from_pipe(tiny_sd)
    seen = []
    generate(pipe, goca_masks=[1], goca_callback=lambda p, step, t, masks: seen.append((step, t, len(masks.results))))
    assert [s for s, _, _ in seen] == [1] and [m.step for m in pipe.goca_masks] == [1]
    assert seen[0][2] == 2
    assert not pipe._goca.capture.active
    generate(pipe, goca_masks=[-1, 0])  # negative indices count from the end
    assert [m.step for m in pipe.goca_masks] == [0, 2]
    pipe.disable_goca()


@pytest.mark.parametrize("size,mode", [((37, 53), "RGB"), ((64, 33), "RGBA"), ((29, 41), "L")])
@pytest.mark.parametrize("method", ["goca", "vanilla", "manual", "diffsegmenter"])
def test_segment_sizes_and_modes(tiny_sd, size, mode, method):
    pipe = goca.from_pipe(tiny_sd)
    rng = np.random.RandomState(0)
    arr = (rng.rand(size[1], size[0], len(mode)) * 255).astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
    r = pipe.segment(img, ["cat", "grass"], method=method, background=True)
    assert r.labels.shape == (size[1], size[0]) and r.labels.dtype == torch.long
    assert r.scores.shape == (3, size[1], size[0])
    assert r.classes == ["cat", "grass", "background"]
    assert int(r.labels.max()) < 3
    assert r.overlay().mode == "RGB"
    heat = r.heatmaps(cell=100)  # one row of three tiles under 16-pixel titles, at the image's aspect ratio
    tile_w, tile_h = heat.width / 3, heat.height - 16
    assert max(tile_w, tile_h) == 100 and abs(tile_w / tile_h - size[0] / size[1]) < 0.02
    pipe.disable_goca()


def test_a_photo_path_is_segmented_upright(tiny_sd, tmp_path):
    """A file's EXIF orientation is applied, as viewers (and diffusers' `load_image`) show the photo."""
    raw = Image.fromarray((np.random.RandomState(5).rand(30, 40, 3) * 255).astype(np.uint8))  # 40 wide, 30 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    raw.save(tmp_path / "photo.jpg", exif=exif)
    pipe = goca.from_pipe(tiny_sd)
    result = pipe.segment(tmp_path / "photo.jpg", ["cat"])
    assert result.labels.shape == (40, 30) and result.image.size == (30, 40)
    pipe.disable_goca()  # the fixture's UNet is shared with other tests


@pytest.mark.parametrize("make", FAMILIES[2:], ids=FAMILY_IDS[2:])
def test_segment_is_seeded_and_method_changes_result(make):
    pipe = goca.from_pipe(make())
    img = Image.fromarray((np.random.RandomState(1).rand(30, 41, 3) * 255).astype(np.uint8))
    a = pipe.segment(img, ["cat", "grass"], seed=3, resolution=64, background=True)
    b = pipe.segment(img, ["cat", "grass"], seed=3, resolution=64, background=True)
    v = pipe.segment(img, ["cat", "grass"], seed=3, method="vanilla", resolution=64)
    assert a.labels.shape == (30, 41) and a.classes == ["cat", "grass", "background"]
    assert torch.equal(a.scores, b.scores)
    assert not torch.equal(a.scores, v.scores)
    pipe.disable_goca()


def test_image_values_are_read_in_their_dtypes_range():
    """uint8 and other integers are 0–255, floats 0–1, for arrays and tensors alike; a range that fits neither raises
    instead of being clipped into a white or black image."""
    from diffusers_goca.image_input import as_rgb

    pixels = np.random.RandomState(2).randint(0, 256, (5, 7, 3)).astype(np.uint8)
    expected = np.asarray(Image.fromarray(pixels))
    for image in (pixels.astype(np.int64), pixels / 255.0, pixels.astype(np.float16) / 255,
                  torch.from_numpy(pixels).permute(2, 0, 1), torch.from_numpy(pixels / 255.0).permute(2, 0, 1)[None],
                  torch.from_numpy(pixels).permute(2, 0, 1).bfloat16() / 255):
        got = np.asarray(as_rgb(image)).astype(int)
        assert np.abs(got - expected).max() <= (1 if getattr(image, "dtype", None) == torch.bfloat16 else 0)
    assert np.asarray(as_rgb(np.eye(3, dtype=bool)))[0, 0].tolist() == [255] * 3
    for image, message in ((pixels.astype(np.float32), r"\[0, 1\], got \d"),
                           (torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1), r"\(x \+ 1\) / 2"),
                           (pixels.astype(np.int32) * 257, "16-bit"),
                           (np.full((4, 4), np.nan), "finite")):
        with pytest.raises(ValueError, match=message):
            as_rgb(image)


def test_bad_inputs_raise_and_leave_nothing_patched(tiny_sd):
    pipe = goca.goca_class(type(tiny_sd)).from_pipe(tiny_sd)
    before = dict(pipe.unet.attn_processors)
    img = Image.new("RGB", (20, 20))
    with pytest.raises(ValueError, match="empty"):
        pipe.segment(img, [])
    with pytest.raises(ValueError, match="cut off"):
        pipe.segment(img, [f"thing{i} object" for i in range(40)])
    with pytest.raises(ValueError, match="image must be"):
        pipe.segment({"not": "an image"}, ["cat"])
    with pytest.raises(ValueError, match="method"):
        pipe.segment(img, ["cat"], method="nope")
    with pytest.raises(ValueError, match="'seg4diff' is not defined for unet"):
        pipe.segment(img, ["cat"], method="seg4diff")
    assert all(pipe.unet.attn_processors[k] is before[k] for k in before)
    assert not pipe.goca_enabled

    class NotSupported:
        pass

    with pytest.raises(ValueError, match="does not support NotSupported"):
        goca.from_pipe(NotSupported())

    # A UNet whose attention is DeepFloyd IF's added-KV kind (no transformer blocks): refused by name.
    from diffusers import UNet2DConditionModel

    if_like = NotSupported()
    if_like.unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=16, attention_head_dim=8, encoder_hid_dim=16, encoder_hid_dim_type="text_proj",
        resnet_time_scale_shift="scale_shift", norm_num_groups=8)
    if_like.tokenizer = pipe.tokenizer
    with pytest.raises(ValueError, match="AttnAddedKVProcessor2_0.*added-KV attention are not supported"):
        goca.from_pipe(if_like)


def test_adapter_layers_follow_the_algorithm(tiny_sd, tiny_sdxl):
    sd = goca.adapter_for(tiny_sd)
    assert sd.reference_layer == "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
    assert sd.refinement_layers == [
        "up_blocks.3.attentions.0.transformer_blocks.0.attn1", "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1",
    ]
    manual_blocks = sorted({n.split(".transformer_blocks")[0] for n in sd.manual_layers})
    assert manual_blocks == [
        "down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1", "up_blocks.1.attentions.2", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1",
    ]  # SD 1.5's hand-picked set: down_blocks.2, mid, up_blocks.1, up_blocks.2 attentions 0–1
    assert len(sd.cross_layers) == 16 and sd.map_factor == 1
    xl = goca.adapter_for(tiny_sdxl)
    assert xl.reference_layer == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert xl.map_factor == 2 and len(xl.refinement_layers) == 7
    assert all(xl.layers[n].factor == 2 for n in xl.refinement_layers)


def test_cli_segments_with_a_saved_pipeline(tmp_path):
    from diffusers_goca.cli import main

    make_tiny_sd().save_pretrained(tmp_path / "model")
    Image.fromarray((np.random.RandomState(0).rand(40, 30, 3) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "overlay.png"
    assert main(["segment", str(tmp_path / "in.png"), "--classes", "cat,grass", "--model", str(tmp_path / "model"),
                 "--out", str(out), "--heatmaps", str(tmp_path / "heat.png"), "--method", "vanilla"]) == 0
    assert Image.open(out).mode == "RGB" and (tmp_path / "heat.png").exists()
    assert main(["segment", str(tmp_path / "in.png"), "--classes", "cat", "--model", str(tmp_path / "model"),
                 "--out", str(out), "--layer-weight-stride", "2"]) == 0


def test_from_pipe_of_an_enabled_pipeline_shares_without_double_wrapping(tiny_sd):
    before = dict(tiny_sd.unet.attn_processors)
    first = goca.from_pipe(tiny_sd)
    second = goca.from_pipe(first)
    procs = second.unet.attn_processors
    assert all(not isinstance(getattr(p, "inner", None), (goca.GoCAAttnProcessor2_0, goca.GoCAWrappedProcessor))
               for p in procs.values())
    img = Image.new("RGB", (24, 24), "green")
    assert first.segment(img, ["cat"]).labels.shape == (24, 24)  # re-attaches its own capture
    second.disable_goca()
    first.disable_goca()
    assert all(tiny_sd.unet.attn_processors[k] is before[k] for k in before)


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_flux], ids=["sd", "flux"])
def test_from_pipe_casts_nothing_in_a_half_precision_pipeline(make):
    pipe = make().to(torch.bfloat16)
    reference = generate(pipe)
    gp = goca.from_pipe(pipe)
    assert all(p.dtype == torch.bfloat16 for m in pipe.components.values() if isinstance(m, torch.nn.Module)
               for p in m.parameters())
    assert all(gp.components[k] is v for k, v in pipe.components.items())
    assert dict(gp.config) == dict(pipe.config)
    assert np.array_equal(generate(gp, goca_masks=True), reference)
    gp.disable_goca()
    pipe.vae.float()  # components of different dtypes stay as they are
    goca.from_pipe(pipe, enable=False)
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder.dtype == torch.bfloat16


def test_reattaches_after_attention_slicing(tiny_sd):
    """Processors set after `enable_goca` (attention slicing replaces every one) are wrapped anew on the next call,
    with the capture's own settings, not put back to those from before: the images are the sliced pipeline's, and
    `disable_goca` leaves the sliced processors."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    tiny_sd.enable_attention_slicing(1)
    reference = generate(tiny_sd)
    tiny_sd.disable_attention_slicing()
    pipe = goca.from_pipe(tiny_sd, enable=False).enable_goca(head_weighting="average", offload_above_mib=None)
    capture = pipe._goca.capture
    pipe.enable_attention_slicing(1)
    assert np.array_equal(generate(pipe, goca_masks="last"), reference)
    result = pipe.segment(Image.new("RGB", (24, 24), "green"), ["cat"])
    assert result.labels.shape == (24, 24)
    assert pipe._goca.capture is capture and capture.offload_above is None  # re-attached with its own settings
    pipe.disable_goca()
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {SlicedAttnProcessor}
    pipe.disable_attention_slicing()


def test_ip_adapter_loaded_after_enable_goca():
    """What `load_ip_adapter` does, after `enable_goca`: the IP-Adapter processors are wrapped on the next call, the
    images are the IP-Adapter pipeline's, and `disable_goca` leaves its processors."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    embeds = dict(ip_adapter_image_embeds=[torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))])
    reference = generate(with_ip_adapter(), **embeds)
    pipe = goca.from_pipe(make_tiny_sd())
    install_ip_adapter(pipe.unet)
    assert np.array_equal(generate(pipe, goca_masks="last", **embeds), reference)
    pipe.disable_goca()
    assert sum(isinstance(p, IPAdapterAttnProcessor2_0) for p in pipe.unet.attn_processors.values()) > 0


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
            extra["controlnet"] = diffusers.ControlNetModel.from_unet(base.unet,
                                                                      conditioning_embedding_out_channels=(16, 16))
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
        procs[key] = proc if not attn.is_cross_attention else IPAdapterAttnProcessor2_0(
            hidden_size=attn.to_q.out_features, cross_attention_dim=32, num_tokens=(4,), scale=1.0)
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(16, 32, 4)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"


IMAGE_48x32 = Image.fromarray((np.random.RandomState(0).rand(32, 48, 3) * 255).astype(np.uint8))
DERIVED = {
    "sd-img2img": (derived(make_tiny_sd, "StableDiffusionImg2ImgPipeline"), dict(image=IMAGE_48x32, strength=0.9)),
    "sd-inpaint": (derived(make_tiny_sd, "StableDiffusionInpaintPipeline"),
                   dict(image=IMAGE_48x32, mask_image=IMAGE_48x32.convert("L"))),
    "sd-controlnet": (derived(make_tiny_sd, "StableDiffusionControlNetPipeline"), dict(image=IMAGE_48x32)),
    "sd3-img2img": (derived(make_tiny_sd3, "StableDiffusion3Img2ImgPipeline"), dict(image=IMAGE_48x32, strength=0.9)),
    "flux-img2img": (derived(make_tiny_flux, "FluxImg2ImgPipeline"), dict(image=IMAGE_48x32, strength=0.9)),
    "flux-inpaint": (derived(make_tiny_flux, "FluxInpaintPipeline"),
                     dict(image=IMAGE_48x32, mask_image=IMAGE_48x32.convert("L"), strength=0.9)),
    # One image embedding each for the unconditional and the conditional half.
    "sd-ip-adapter": (with_ip_adapter, dict(ip_adapter_image_embeds=[
        torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))])),
    # Its masks reach the processors through cross_attention_kwargs, which pass on only the parameters they name.
    "sd-ip-adapter-masks": (with_ip_adapter, dict(
        ip_adapter_image_embeds=[torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))],
        cross_attention_kwargs={"ip_adapter_masks": [(torch.arange(48) < 24).float().expand(1, 1, 32, 48)]})),
}


@pytest.mark.parametrize("name", list(DERIVED))
def test_derived_pipelines_keep_their_images(name):
    """`from_pipe` on other pipeline classes with a supported denoiser: the images stay bit-identical while masks are
    computed, and the masks have the generated image's size."""
    make, kw = DERIVED[name]
    pipe = make()
    reference = generate(pipe, **kw)
    gp = goca.from_pipe(pipe)
    assert type(gp).__name__ == "GoCA" + type(pipe).__name__
    assert np.array_equal(generate(gp, goca_masks="last", **kw), reference)
    (masks,) = gp.goca_masks
    assert [r.labels.shape for r in masks.results] == [reference.shape[1:3]] * 2
    gp.disable_goca()


@pytest.mark.parametrize("class_name", ["StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"])
def test_sdxl_pipeline_classes_segment_alike(tiny_sdxl, class_name):
    """`segment` builds SDXL's micro-conditioning itself (the pipeline classes' `_get_add_time_ids` differ): every
    SDXL pipeline class on the same components gives the same segmentation."""
    base, other = goca.from_pipe(tiny_sdxl, enable=False), goca.from_pipe(derived(lambda: tiny_sdxl, class_name)(),
                                                                       enable=False)
    # Not enabled: each `segment` enables GoCA for its forward and leaves the shared UNet as it was.
    want, got = base.segment(IMAGE_48x32, ["cat", "dog"]), other.segment(IMAGE_48x32, ["cat", "dog"])
    assert torch.equal(got.scores, want.scores)
    assert not any(goca.processors.is_goca_processor(p) for p in tiny_sdxl.unet.attn_processors.values())


def test_sdxl_refiner_with_only_the_second_text_encoder():
    """The refiner layout: no first tokenizer or text encoder (the second one's tokens sit at the same positions),
    time ids with the aesthetic score. Its encoder reads `prompt` (a prompt_2 goes unread), while SDXL's two encoders
    lay `prompt` and `prompt_2` at the same positions, so a differing prompt_2 is refused there."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=16,
        block_out_channels=(16, 32, 32), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=5 * 8 + 32, cross_attention_dim=32,
    ).eval()
    sdxl = make_tiny_sdxl()
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=sdxl.vae, unet=unet, text_encoder=None, tokenizer=None, text_encoder_2=sdxl.text_encoder_2,
        tokenizer_2=sdxl.tokenizer_2, scheduler=sdxl.scheduler, requires_aesthetics_score=True)
    refiner.set_progress_bar_config(disable=True)
    kw = dict(image=IMAGE_48x32, strength=0.5)
    reference = generate(refiner, **kw)
    gp = goca.from_pipe(refiner)
    assert np.array_equal(generate(gp, goca_masks="last", **kw), reference)
    assert gp.goca_masks[0].results[1].classes == ["cat", "dog", "sand"]
    assert np.array_equal(generate(gp, goca_masks="last", prompt_2="a bird", **kw), reference)
    assert gp.goca_masks[0].results[1].classes == ["cat", "dog", "sand"]
    assert gp.segment(IMAGE_48x32, ["cat", "dog"]).labels.shape == (32, 48)
    with pytest.raises(ValueError, match="prompt_2 that differs"):
        generate(goca.from_pipe(sdxl), goca_masks="last", prompt_2="a bird")


def test_flux_kontext_masks_are_the_generated_images():
    """Flux Kontext appends a reference image's tokens to the generated image's, in one softmax. With masks on, the
    images stay the pipeline's own, and the masks cover the generated image (32×48, from a 16×24 reference)."""
    pipe = derived(make_tiny_flux, "FluxKontextPipeline")()
    reference = Image.fromarray((np.random.RandomState(5).rand(16, 24, 3) * 255).astype(np.uint8))

    def generate_from_reference(p, **kw):  # as `generate`, but Kontext's first parameter is the image
        return p(image=reference, prompt=PROMPTS, num_inference_steps=3, height=32, width=48, output_type="np",
                 max_sequence_length=32, _auto_resize=False, max_area=32 * 48, generator=torch.Generator().manual_seed(0),
                 **kw).images

    plain = generate_from_reference(pipe)
    gp = goca.from_pipe(pipe)
    assert np.array_equal(generate_from_reference(gp, goca_masks="last"), plain)
    result = gp.goca_masks[0].results[1]
    assert result.classes == ["cat", "dog", "sand"] and result.labels.shape == (32, 48)
    assert gp.segment(IMAGE_48x32, ["cat"], resolution=32).labels.shape == (32, 48)
    gp.disable_goca()


@pytest.mark.parametrize("family", ["sd", "sd3"])
@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg+pag", "pag-only"])
def test_pag_pipelines_segment_their_conditional_rows(family, guidance):
    """PAG batches [uncond, cond, perturbed] (or [cond, perturbed] without CFG) and swaps its own processors in for
    the call: the images stay the PAG pipeline's own, and the first step's masks are those of the same pipeline
    without PAG (the perturbed rows' maps would differ). The perturbed layer is not the pipeline class's default, so
    `from_pipe` must carry `pag_applied_layers` over."""
    make, class_name, layers = ((make_tiny_sd, "StableDiffusionPAGPipeline", ["down_blocks.1"]) if family == "sd" else
                                (make_tiny_sd3, "StableDiffusion3PAGPipeline", ["blocks.0"]))
    base = make()
    pipe = derived(lambda: base, class_name, pag_applied_layers=layers)()
    kw = dict(guidance_scale=guidance, pag_scale=3.0)
    reference = generate(pipe, **kw)
    gp = goca.from_pipe(pipe)
    assert gp.pag_applied_layers == layers
    assert np.array_equal(generate(gp, goca_masks=[0], **kw), reference)
    assert np.array_equal(generate(pipe, **kw), reference)  # PAG put our processors back after the call
    plain = goca.from_pipe(base)
    generate(plain, goca_masks=[0], guidance_scale=guidance)
    for got, want in zip(gp.goca_masks[0].results, plain.goca_masks[0].results):
        assert torch.allclose(got.scores, want.scores, atol=0.02)  # the batch sizes differ: float noise only
    gp.disable_goca()
    plain.disable_goca()


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_pixart, make_tiny_sd3, make_tiny_flux],
                         ids=["sd", "pixart", "sd3", "flux"])
def test_fused_projections_are_read(make):
    """After `fuse_qkv_projections()` the processors project through to_qkv / to_kv / to_added_qkv: the images stay
    identical, and the masks are those of the unfused pipeline."""
    plain = goca.from_pipe(make())
    generate(plain, goca_masks=[2])
    pipe = make()
    (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).fuse_qkv_projections()
    reference = generate(pipe)
    gp = goca.from_pipe(pipe)
    assert np.array_equal(generate(gp, goca_masks=[2]), reference)
    for got, want in zip(gp.goca_masks[0].results, plain.goca_masks[0].results):
        assert torch.allclose(got.scores, want.scores, atol=1e-4)
    gp.disable_goca()


def test_from_pipe_adds_no_watermark(tiny_sdxl, monkeypatch):
    """SDXL pipelines watermark by default where the package is installed; a pipeline built without must not gain one."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl as sdxl

    assert tiny_sdxl.watermark is None
    monkeypatch.setattr(sdxl, "is_invisible_watermark_available", lambda: True)
    assert goca.from_pipe(tiny_sdxl, enable=False).watermark is None


def test_pixart_resolution_binning_masks_have_the_returned_size():
    """PixArt's pipelines generate at the nearest aspect-ratio bin, then resize and centre-crop to the requested size
    (and keep no `_num_timesteps`): the "last" step's masks are those of the binned image, resized and cropped alike."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN

    pipe = make_tiny_pixart()
    pipe.transformer.register_to_config(sample_size=32)  # the 256 px bins
    call = dict(num_inference_steps=2, output_type="np")
    reference = pipe(PROMPTS, height=100, width=150, generator=torch.Generator().manual_seed(0), **call).images
    gp = goca.from_pipe(pipe)
    images = gp(PROMPTS, height=100, width=150, goca_masks="last", generator=torch.Generator().manual_seed(0),
                **call).images
    assert np.array_equal(images, reference) and images.shape[1:3] == (100, 150)
    (binned,) = gp.goca_masks
    assert binned.step == 1 and binned.results[0].labels.shape == (100, 150)
    h, w = pipe.image_processor.classify_height_width_bin(100, 150, ASPECT_RATIO_256_BIN)
    gp(PROMPTS, height=h, width=w, use_resolution_binning=False, goca_masks="last",
       generator=torch.Generator().manual_seed(0), **call)
    for got, at_bin in zip(binned.results, gp.goca_masks[0].results):
        want = pipe.image_processor.resize_and_crop_tensor(at_bin.scores[None], 150, 100)[0]
        assert torch.allclose(got.scores, want) and torch.equal(got.labels, want.argmax(0))
    # Latents are returned at the bin's size, not resized: so are their masks (they were at the requested size).
    latents = gp(PROMPTS, height=100, width=150, goca_masks="last", generator=torch.Generator().manual_seed(0),
                 num_inference_steps=2, output_type="latent").images
    scale = pipe.vae_scale_factor
    assert gp.goca_masks[0].results[0].labels.shape == (latents.shape[-2] * scale, latents.shape[-1] * scale) == (h, w)
    gp.disable_goca()


@pytest.mark.parametrize("sigma", [True, False], ids=["sigma", "alpha"])
def test_pixart_maps_read_only_the_prompts_text_keys(sigma, monkeypatch):
    """PixArt masks the T5 padding (300 / 120 keys, most of them padding): its cross maps are computed over the
    prompt's tokens only (`segment` and generation pass their count), and equal those over every key. A mask that
    leaves a key past them open is an error."""
    from diffusers_goca.capture import Capture
    from diffusers_goca.tokens import segmentation_prompt

    pipe = goca.from_pipe(make_tiny_pixart(sigma=sigma))
    adapter = pipe._goca.adapter
    prompt = segmentation_prompt(["cat", "grass"], True)
    index = adapter.token_index(prompt, ["cat", "grass"], extra_entities=["background"])
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    forward = lambda text: lambda: adapter.segment_forward(latents, text, 100, torch.Generator().manual_seed(1))
    short = pipe.capture_forward(forward(prompt), columns=index.needed(), text_keys=index.length)
    full = pipe.capture_forward(forward(prompt), columns=index.needed())
    assert index.length < adapter.text_max_length
    for name, maps in short.cross.items():
        for kind, m in maps.items():
            assert torch.allclose(m, full.cross[name][kind], atol=1e-6), (name, kind)
    short.check_text_keys()

    read = []
    start = Capture.start
    monkeypatch.setattr(Capture, "start", lambda self, *a: read.append(a[4]) or start(self, *a))  # text_keys
    pipe.segment(Image.new("RGB", (32, 32), "green"), ["cat", "grass"], background=True)
    generate(pipe, goca_masks=[1])
    lengths = [adapter.token_index(adapter.prompt_text(p, {}), [], require_classes=False).length for p in PROMPTS]
    assert read == [index.length, max(lengths)]

    cut = pipe.capture_forward(forward("a cat on green grass"), text_keys=2)
    assert next(iter(cut.cross.values()))["auto"].shape[-1] == 2
    with pytest.raises(RuntimeError, match="unmasked"):
        cut.check_text_keys()
    text = torch.randn(1, 12, adapter.denoiser.config.caption_channels)
    unmasked = pipe.capture_forward(lambda: adapter.denoiser(  # no mask at all: every key is read
        torch.randn(1, 4, 16, 16), encoder_hidden_states=text, timestep=torch.tensor([100]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}), text_keys=2)
    assert next(iter(unmasked.cross.values()))["auto"].shape[-1] == 12
    pipe.disable_goca()


def test_pixart_adapter_scales_reference_and_refinement_with_depth():
    full = goca.adapter_for(make_tiny_pixart(num_layers=28))
    assert full.reference_layer == "transformer_blocks.13.attn2"
    assert full.refinement_layers == [f"transformer_blocks.{i}.attn1" for i in range(10, 18)]
    assert full.refine_order == 5 and full.text_max_length == 300 and full.map_factor == 2
    assert goca.adapter_for(make_tiny_pixart(sigma=False)).text_max_length == 120


def test_flux_true_cfg_segments_the_conditional_call_once_per_step():
    pipe = goca.from_pipe(make_tiny_flux())
    kw = dict(num_inference_steps=3, height=32, width=32, output_type="np", max_sequence_length=32)
    reference = pipe(["a cat on grass"], negative_prompt=["blurry"], true_cfg_scale=2.0,
                     generator=torch.Generator().manual_seed(0), **kw).images
    images = pipe(["a cat on grass"], negative_prompt=["blurry"], true_cfg_scale=2.0,
                  generator=torch.Generator().manual_seed(0), goca_masks=True, **kw).images
    assert np.array_equal(images, reference)
    assert [m.step for m in pipe.goca_masks] == [0, 1, 2]


def test_sd3_skip_layer_guidance_calls_are_neither_segmented_nor_counted():
    """Skip-layer guidance adds a conditional call with blocks left out on some steps: the masks are still one per
    step, from the step's own call."""
    pipe = make_tiny_sd3(num_layers=3)
    kw = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    reference = generate(pipe, **kw)
    gp = goca.from_pipe(pipe)
    assert np.array_equal(generate(gp, goca_masks=True, **kw), reference)
    assert [m.step for m in gp.goca_masks] == [0, 1, 2]
    plain = goca.from_pipe(make_tiny_sd3(num_layers=3))
    generate(plain, goca_masks=[0])  # the first step skips no layer: its masks are those of plain CFG
    assert torch.equal(gp.goca_masks[0].results[0].scores, plain.goca_masks[0].results[0].scores)


def test_capture_runs_outside_a_compiled_denoiser(monkeypatch):
    """With the denoiser compiled in place, the capture's hooks and bookkeeping run eagerly (not traced into the
    graph), and the images stay those of the compiled pipeline; a `torch.compile` wrapper is refused clearly."""
    from diffusers_goca.capture import Capture

    pipe = make_tiny_sd3()
    pipe.transformer.compile(backend="eager")
    try:
        reference = generate(pipe)
        gp = goca.from_pipe(pipe)
        traced, record = [], Capture.record

        def recording(self, *args, **kwargs):
            traced.append(torch.compiler.is_compiling())
            return record(self, *args, **kwargs)

        monkeypatch.setattr(Capture, "record", recording)
        assert np.array_equal(generate(gp, goca_masks=True), reference)
        assert traced and not any(traced)
        gp.disable_goca()
        pipe.transformer = torch.compile(pipe.transformer, backend="eager")  # a wrapper: the layers are hidden
        with pytest.raises(ValueError, match=r"compile it in place"):
            goca.from_pipe(pipe)
    finally:
        torch._dynamo.reset()


def test_head_weighting_ablation_needs_its_capture(tiny_sd):
    img = Image.fromarray((np.random.RandomState(2).rand(32, 32, 3) * 255).astype(np.uint8))
    pipe = goca.from_pipe(tiny_sd)
    with pytest.raises(ValueError, match="enable_goca\\(head_weighting='dot-product'\\)"):
        pipe.segment(img, ["cat"], head_weighting="dot-product")
    pipe.enable_goca(head_weighting="dot-product")
    clamped = pipe.segment(img, ["cat"], head_weighting="dot-product", background=True)
    pipe.enable_goca()
    assert not torch.equal(clamped.scores, pipe.segment(img, ["cat"], background=True).scores)
    pipe.disable_goca()


def test_strided_layer_weights_option():
    """`layer_weight_stride`: the reference rows the layer weights read (cross-attention families only); 1 is the
    official method."""
    img = Image.fromarray((np.random.RandomState(2).rand(32, 32, 3) * 255).astype(np.uint8))
    for make in (make_tiny_sd, make_tiny_pixart):
        pipe = goca.from_pipe(make())
        out = pipe.segment(img, ["cat", "dog"], method=["goca", "vanilla"], layer_weight_stride=2, background=True)
        assert out["goca"].scores.shape == (3, 32, 32)
        assert torch.equal(pipe.segment(img, ["cat", "dog"], layer_weight_stride=1).scores,
                           pipe.segment(img, ["cat", "dog"]).scores)
        with pytest.raises(ValueError, match="integer ≥ 1"):
            pipe.segment(img, ["cat"], layer_weight_stride=0)
    with pytest.raises(ValueError, match="joint attention"):
        goca.from_pipe(make_tiny_sd3()).segment(img, ["cat"], layer_weight_stride=2)


def _full_and_needed_captures(pipe, classes):
    from diffusers_goca.tokens import segmentation_prompt

    adapter = pipe._goca.adapter
    prompt = segmentation_prompt(classes, True)
    index = adapter.token_index(prompt, classes, extra_entities=["background"])
    latents = torch.randn(1, pipe.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    forward = lambda: adapter.segment_forward(latents, prompt, adapter.segment_timestep, torch.Generator().manual_seed(1))
    return index, pipe.capture_forward(forward), pipe.capture_forward(forward, columns=index.needed())


@pytest.mark.parametrize("make", [make_tiny_sd3, make_tiny_flux], ids=["sd3", "flux"])
def test_maps_of_only_the_needed_tokens_are_the_full_maps_columns(make):
    """Joint families keep only the token columns the methods read (333 / 512 text keys at every layer): they are the
    full capture's columns, the text masses give the L1 sum over every token, and the methods give the scores of
    the full capture."""
    from diffusers_goca.methods import available_methods, method_scores
    from diffusers_goca.mixin import kept_columns

    pipe = goca.from_pipe(make())
    adapter = pipe._goca.adapter
    index, full, kept = _full_and_needed_captures(pipe, ["cat", "green grass"])
    needed = index.needed()
    assert kept_columns(adapter, [index]) == needed
    assert kept.columns == needed and len(needed) < index.length
    for layer, maps in kept.cross.items():
        for kind in ("auto", "average"):
            assert torch.allclose(maps[kind], full.cross[layer][kind][..., needed], atol=1e-6), (layer, kind)
            mass = full.cross[layer][f"{kind} mass"]
            assert torch.allclose(mass, full.cross[layer][kind].sum(-1), atol=1e-5), (layer, kind)
            assert torch.allclose(maps[f"{kind} mass"], mass, atol=1e-6)
    assert kept.nbytes() < full.nbytes()
    # GoCA's min-max stages amplify the rounding on a random model's near-constant maps: compared on the toy below.
    for method in [m for m in available_methods(adapter) if m != "goca"]:
        a, a_bg = method_scores(full, 0, index, adapter, method, "background")
        b, b_bg = method_scores(kept, 0, index, adapter, method, "background")
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a_bg, b_bg, atol=1e-5), method
    pipe.disable_goca()


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_pixart], ids=["sd", "pixart-sigma"])
def test_cross_attention_families_keep_every_text_column(make):
    """Cross-attention families keep every column their softmax reads (the per-pixel clamp and L1 sum run over all
    text tokens): segment's capture holds CLIP's 77 columns, or PixArt's unmasked prompt tokens."""
    from diffusers_goca.mixin import kept_columns

    pipe = goca.from_pipe(make())
    adapter = pipe._goca.adapter
    index, full, _ = _full_and_needed_captures(pipe, ["cat", "green grass"])
    assert kept_columns(adapter, [index]) is None
    steps = []
    pipe.capture_forward = lambda run, **kw: steps.append(type(pipe).capture_forward(pipe, run, **kw)) or steps[-1]
    pipe.segment(Image.new("RGB", (32, 32), "green"), ["cat", "green grass"], background=True)
    del pipe.capture_forward
    width = index.length if adapter.text_padding_masked else 77
    assert all(m["auto"].shape[-1] == width for m in steps[0].cross.values())
    pipe.disable_goca()


def test_goca_scores_of_the_needed_tokens_equal_the_full_capture_on_the_toy_model():
    from diffusers_goca.methods import method_scores
    from diffusers_goca.toyworld import load_toy_pipeline

    pipe = goca.from_pipe(load_toy_pipeline())
    index, full, kept = _full_and_needed_captures(pipe, ["red circle", "grass"])
    a, a_bg = method_scores(full, 0, index, pipe._goca.adapter, "goca", "background")
    b, b_bg = method_scores(kept, 0, index, pipe._goca.adapter, "goca", "background")
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a_bg, b_bg, atol=1e-4)


def test_iseg_runs_its_own_forward_with_scaled_class_embeddings(tiny_sd):
    from diffusers_goca.methods import ISEG_EMBEDDING_SCALE, available_methods

    pipe = goca.from_pipe(tiny_sd)
    assert "iseg" in available_methods(pipe._goca.adapter)
    seen = []  # the text the first cross-attention layer sees, per forward
    attn2 = pipe.unet.get_submodule(pipe._goca.adapter.cross_layers[0])
    handle = attn2.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True)
    img = Image.fromarray((np.random.RandomState(2).rand(24, 20, 3) * 255).astype(np.uint8))
    try:
        out = pipe.segment(img, ["cat", "grass"], method=["goca", "iseg"], resolution=64, background=True)
    finally:
        handle.remove()
    plain, scaled = seen  # one forward for goca, one for iseg
    index = pipe._goca.adapter.token_index("cat, grass, background", ["cat", "grass"], extra_entities=["background"])
    classes = sorted(p for ps in index.class_tokens for p in ps)
    others = [i for i in range(plain.shape[1]) if i not in classes]
    assert torch.allclose(scaled[:, classes], ISEG_EMBEDDING_SCALE * plain[:, classes])
    assert torch.equal(scaled[:, others], plain[:, others])
    r = out["iseg"]
    assert r.labels.shape == (24, 20) and r.classes == ["cat", "grass", "background"]
    assert 0 <= r.scores.min() and r.scores.max() <= 1 + 1e-6
    assert not torch.equal(r.scores, out["goca"].scores)
    pipe.disable_goca()
    for make in (make_tiny_pixart, make_tiny_sd3):  # one grid only: not available, with a clear error
        other = goca.from_pipe(make())
        with pytest.raises(ValueError, match="iseg"):
            other.segment(img, ["cat"], method="iseg", resolution=64)


def literal_cross_maps(attn, hidden_states, context, bias):
    """Head-weighted and head-mean image→text maps of one cross-attention call, by the book (docs/official_code.md), from the
    layer's inputs: per head softmax(q kᵀ·scale + bias), o_h = (A_h V_h) W_hᵀ, w_h = ⟨o_h, Σ o⟩ / Σ_h' ⟨o_h', Σ o⟩."""
    q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    heads, w_out = attn.heads, attn.to_out[0].weight
    d = q.shape[-1] // heads
    probs, outs = [], []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        a = (q[..., cols] @ k[..., cols].transpose(-1, -2) * attn.scale + bias).softmax(-1)
        probs.append(a)
        outs.append(a @ v[..., cols] @ w_out[:, cols].T)
    total = sum(outs)
    dots = torch.stack([(o * total).sum(-1) for o in outs], 1)  # [B, heads, N]
    probs = torch.stack(probs, 1)  # [B, heads, N, T]
    return (probs * (dots / dots.sum(1, keepdim=True))[..., None]).sum(1), probs.mean(1)


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_captured_cross_maps_are_the_formula_on_the_layers_inputs(family):
    """The capture reads the forward's own projections (q, k, the attention output and its `to_out` projection): its
    maps equal the formula recomputed from each layer's inputs, padding mask included."""
    pipe = goca.from_pipe(make_tiny_sd() if family == "sd" else make_tiny_pixart())
    model = pipe.unet if family == "sd" else pipe.transformer
    torch.manual_seed(0)
    text = torch.randn(2, 12, 32 if family == "sd" else model.config.caption_channels)
    keep = torch.ones(2, 12)
    keep[1, 7:] = 0  # padding of the second prompt, masked in PixArt's cross-attention
    if family == "sd":
        run = lambda: model(torch.randn(2, 4, 8, 12), torch.tensor([100]), encoder_hidden_states=text)
    else:
        run = lambda: model(torch.randn(2, 4, 8, 12), encoder_hidden_states=text, encoder_attention_mask=keep,
                            timestep=torch.tensor([100, 100]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    inputs = {}

    def record(name):
        def hook(module, args, kwargs):
            inputs.setdefault(name, (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]))
        return hook

    cross = pipe._goca.adapter.cross_layers
    handles = [model.get_submodule(n).register_forward_pre_hook(record(n), with_kwargs=True) for n in cross]
    with torch.no_grad():
        step = pipe.capture_forward(run, n_images=2)
        for h in handles:
            h.remove()
        for name in cross:
            bias = 0.0 if family == "sd" else ((1 - keep) * -10000.0)[:, None, :]
            auto, mean = literal_cross_maps(model.get_submodule(name), *inputs[name], bias)
            assert torch.allclose(step.cross[name]["auto"], auto, atol=1e-5), name
            assert torch.allclose(step.cross[name]["average"], mean, atol=1e-6), name
    pipe.disable_goca()


def test_cli_loader_takes_a_saved_sd3_without_t5(tmp_path):
    """SD3 saved without T5 lists text_encoder_3 / tokenizer_3 as [null, null]; the loader of the CLI and the
    benchmarks passes them as None (plain `from_pretrained` refuses), and GoCA segments with CLIP tokens only."""
    from diffusers import StableDiffusion3Pipeline

    from diffusers_goca.loading import load_pipeline

    full = make_tiny_sd3()
    parts = {**full.components, "text_encoder_3": None, "tokenizer_3": None}
    StableDiffusion3Pipeline(**parts).save_pretrained(tmp_path / "sd3")
    with pytest.raises(ValueError, match="text_encoder_3"):
        StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3")
    pipe = load_pipeline(str(tmp_path / "sd3"), "cpu", torch.float32)
    assert isinstance(pipe, goca.GoCAStableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    image = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    result = pipe.segment(image, ["cat", "grass"], seed=0)
    assert result.labels.shape == (32, 32)


@pytest.mark.parametrize("make", FAMILIES, ids=FAMILY_IDS)
def test_capture_and_reductions_never_wait_for_the_device(make, monkeypatch):
    import diffusers_goca.mixin as mixin

    pipe = goca.from_pipe(make())
    reducing = Running(monkeypatch, mixin, "method_scores")
    img = Image.fromarray((np.random.RandomState(2).rand(40, 56, 3) * 255).astype(np.uint8))
    with HostWaits(lambda: pipe._goca.capture.active or bool(reducing)) as waits:
        result = pipe.segment(img, ["cat", "grass"], resolution=64)
    assert result.labels.shape == (40, 56)
    assert waits.ops == [], f"the capture forward or the reductions read device values on the host: {waits.ops}"


def test_pixels_with_a_zero_attention_output_are_reported(caplog):
    pipe = goca.from_pipe(make_tiny_sd())
    img = Image.fromarray((np.random.RandomState(3).rand(32, 32, 3) * 255).astype(np.uint8))
    with caplog.at_level("WARNING", logger="diffusers_goca"):
        pipe.segment(img, ["cat", "grass"], resolution=64)
    assert "norm ≈ 0" not in caplog.text
    layer = pipe._goca.adapter.cross_layers[0]
    with torch.no_grad():  # its output is then the bias alone: out(p) = 0 for the head weights at every pixel
        pipe.unet.get_submodule(layer).to_out[0].weight.zero_()
    with caplog.at_level("WARNING", logger="diffusers_goca"):
        pipe.segment(img, ["cat", "grass"], resolution=64)
        pipe.segment(img, ["cat", "grass"], resolution=64, method="vanilla")  # reads the head-mean maps: no report
    side = 64 // pipe.vae_scale_factor
    h, w = pipe._goca.adapter.layer_hw(layer, (side, side))
    assert caplog.text.count("norm ≈ 0") == 1 and f"GoCA: {h * w} pixel(s)" in caplog.text


def literal_joint_maps(attn, hidden_states, context, rope, text_len, family, out_weight, n_image):
    """Image→text maps of one joint attention call by the book, from the layer's inputs: the projections, the per-head
    norms and RoPE as the processor applies them, one softmax over all keys per head; the head weights from each
    head's text output o_h = (A_h V_h) W_hᵀ against their sum (docs/official_code.md, our extension). The image is the first
    `n_image` image tokens (Flux Kontext: then the reference image's). Returns (auto [B, N, T], head-mean [B, N, T],
    image mass [B, heads, N])."""
    from diffusers.models.embeddings import apply_rotary_emb

    heads = attn.heads

    def split(x):  # [B, n, heads, d]
        return x.unflatten(-1, (heads, -1))

    def norm(module, x):
        return x if module is None else module(x)

    q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
    q, k = norm(attn.norm_q, q), norm(attn.norm_k, k)
    if context is not None:
        eq, ek, ev = split(attn.add_q_proj(context)), split(attn.add_k_proj(context)), split(attn.add_v_proj(context))
        eq, ek = norm(attn.norm_added_q, eq), norm(attn.norm_added_k, ek)
        first, second = ((eq, ek, ev), (q, k, v)) if family == "flux" else ((q, k, v), (eq, ek, ev))
        q, k, v = (torch.cat(pair, 1) for pair in zip(first, second))
    if rope is not None:
        q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    d = q.shape[-1]
    probs = (torch.einsum("bihd,bjhd->bhij", q, k) * d**-0.5).softmax(-1)  # [B, heads, S, S]
    image_start = text_len if family == "flux" else 0
    image = slice(image_start, image_start + n_image)
    text = slice(0, text_len) if family == "flux" else slice(q.shape[1] - text_len, None)
    a = probs[:, :, image, text]  # [B, heads, N, T]
    outs = [a[:, h] @ v[:, text, h] @ out_weight[:, h * d:(h + 1) * d].T for h in range(heads)]
    total = sum(outs)
    dots = torch.stack([(o * total).sum(-1) for o in outs], 1)  # [B, heads, N]
    auto = (a * (dots / dots.sum(1, keepdim=True))[..., None]).sum(1)
    return auto, a.mean(1), probs[:, :, image, image].sum(-1)


def grid_ids(first: float, h: int, w: int) -> torch.Tensor:
    """Flux's position ids [h·w, 3] of an h×w token grid: (first, row, column)."""
    axes = torch.meshgrid(torch.full((1,), float(first)), torch.arange(h) * 1.0, torch.arange(w) * 1.0, indexing="ij")
    return torch.stack(axes, -1).reshape(-1, 3)


@pytest.mark.parametrize("family", ["sd35", "flux", "flux-kontext"])
def test_captured_joint_maps_are_the_formula_on_the_layers_inputs(family):
    """The capture reads the forward's own projections and per-head norms and applies the forward's RoPE: for the
    conditional half of a CFG batch, its maps and image shares equal the joint softmax recomputed from each layer's
    inputs (SD 3.5 with q/k norms and a dual-attention block; Flux's double- and single-stream blocks; Flux Kontext,
    whose reference image's tokens follow the generated image's and share its softmax)."""
    torch.manual_seed(0)
    n_reference = 0
    if family == "sd35":
        pipe = goca.from_pipe(make_tiny_sd3(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,)))
        model, t, n = pipe.transformer, 10, (8 // 2) * (12 // 2)  # patch 2
        args = dict(hidden_states=torch.randn(2, 4, 8, 12), encoder_hidden_states=torch.randn(2, t, 64),
                    pooled_projections=torch.randn(2, 64), timestep=torch.tensor([500.0, 500.0]))
    else:
        pipe = goca.from_pipe(make_tiny_flux())
        model, t, (h, w) = pipe.transformer, 10, (4, 6)
        ids = grid_ids(0, h, w)
        if family == "flux-kontext":  # a 3×5 reference image
            ids = torch.cat([ids, grid_ids(1, 3, 5)])
            n_reference = 15
        n = h * w
        args = dict(hidden_states=torch.randn(2, n + n_reference, 16) * 3, encoder_hidden_states=torch.randn(2, t, 32),
                    pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.5, 0.5]), img_ids=ids,
                    txt_ids=torch.zeros(t, 3))
    inputs = {}

    def record(name):
        def hook(module, args_, kwargs):
            hs = args_[0] if args_ else kwargs["hidden_states"]
            inputs.setdefault(name, (hs, kwargs.get("encoder_hidden_states"), kwargs.get("image_rotary_emb")))
        return hook

    pipe.enable_goca()
    adapter = pipe._goca.adapter
    handles = [model.get_submodule(n).register_forward_pre_hook(record(n), with_kwargs=True) for n in adapter.layers]
    with torch.no_grad():
        step = pipe.capture_forward(lambda: model(**args, return_dict=False), n_images=1)  # rows: the second half
        for handle in handles:
            handle.remove()
        assert step.rows == [1] and len(adapter.layers) >= 3
        for name in adapter.layers:
            attn = model.get_submodule(name)
            auto, mean, mass = literal_joint_maps(attn, *inputs[name], t, "sd3" if family == "sd35" else "flux",
                                                  adapter.output_projection(name, attn).weight(like=attn.to_q.weight), n)
            assert torch.allclose(step.cross[name]["average"], mean[1:], atol=1e-6), name
            assert torch.allclose(step.cross[name]["auto"], auto[1:], atol=1e-5), name
            assert torch.allclose(step.selfs[name].image_mass, mass[1:], atol=1e-5), name
            if n_reference:  # the reference image takes a share of the softmax that the test can see
                assert (1 - mass[1:] - mean[1:].sum(-1)[:, None]).min() > 0.01, name
    pipe.disable_goca()


def test_pixart_segment_reads_the_lower_cased_text_it_encodes():
    """PixArt's pipelines lower-case the prompt before T5 tokenizes it: the class names' case changes nothing."""
    pipe = goca.from_pipe(make_tiny_pixart(sigma=True))
    upper = pipe.segment(IMAGE_48x32, ["CAT", "Grass"], resolution=32, background=True)
    lower = pipe.segment(IMAGE_48x32, ["cat", "grass"], resolution=32, background=True)
    assert upper.classes == ["CAT", "Grass", "background"]
    assert torch.equal(upper.scores, lower.scores)


@pytest.mark.parametrize("make", [make_tiny_sd3, make_tiny_flux], ids=["sd3", "flux"])
def test_flow_matching_segment_takes_any_timestep(make):
    """`segment(timestep=t)` on the flow-matching families noises at σ = t / 1000 for any t, not only at the steps of
    the scheduler's schedule; the default step's own timestep gives the default's scores."""
    pipe = goca.from_pipe(make())
    default = pipe.segment(IMAGE_48x32, ["cat"], resolution=32)
    for t in (100, 537.5):
        assert pipe.segment(IMAGE_48x32, ["cat"], resolution=32, timestep=t).labels.shape == (32, 48)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    pipe.segment(IMAGE_48x32, ["cat"], resolution=32)
    hook.remove()
    t_default = float(seen[0].flatten()[0]) * (1000 if make is make_tiny_flux else 1)
    at_default = pipe.segment(IMAGE_48x32, ["cat"], resolution=32, timestep=t_default)
    assert torch.allclose(at_default.scores, default.scores, atol=1e-5)


def test_generation_and_options_refuse_clearly(tiny_sd):
    """Misuses get an error that says what to do, before any denoising; a call without masks leaves none behind."""
    pipe = goca.from_pipe(tiny_sd)
    generate(pipe, goca_masks="last")
    assert len(pipe.goca_masks) == 1
    generate(pipe)
    assert pipe.goca_masks == []
    with pytest.raises(ValueError, match=r"one step: \[i\]"):
        generate(pipe, goca_masks=1)
    with pytest.raises(ValueError, match="method='iseg'"):
        generate(pipe, goca_masks=True, goca_method="iseg")
    pipe.disable_goca()
    pixart = goca.from_pipe(make_tiny_pixart())
    with pytest.raises(ValueError, match="layers='manual'.*pixart"):
        pixart.segment(IMAGE_48x32, ["cat"], resolution=32, layers="manual")


def test_masks_read_the_prompt_the_text_keys_hold():
    """Flux's transformer attends to the T5 tokens of `prompt_2` when given (`prompt` gives CLIP's pooled vector
    only): a class in `prompt_2` alone is found there. SD3 reads `prompt` in its CLIP and T5 parts: a class past the
    77 CLIP tokens comes from the T5 part; a `prompt_3` of its own (what T5 encodes) is read in the T5 part, and a
    differing `prompt_2` (CLIP-G, at CLIP-L's positions) is refused."""
    flux = goca.from_pipe(make_tiny_flux())
    flux(prompt="a photo", prompt_2="a cat on grass", goca_classes=["cat"], goca_masks="last", num_inference_steps=2,
         height=32, width=32, max_sequence_length=32)
    assert flux.goca_masks[0].results[0].classes == ["cat"]
    sd3 = goca.from_pipe(make_tiny_sd3())
    long = ", ".join(["a cat on the grass"] * 14) + ", a dog on sand"
    index = sd3._goca.adapter.token_index(long, ["dog"], max_length=256)
    assert index.class_tokens[0] and min(index.class_tokens[0]) >= 77  # the T5 part only
    with pytest.raises(ValueError, match="every text encoder"):  # past the 77 CLIP and the 64 T5 tokens
        sd3._goca.adapter.token_index(long, ["dog"], max_length=64)
    call = dict(num_inference_steps=2, height=32, width=32, goca_masks="last", max_sequence_length=256)
    sd3(long, goca_classes=["dog"], **call)
    assert sd3.goca_masks[0].results[0].classes == ["dog"]
    adapter = sd3._goca.adapter
    index = adapter.token_index("a cat", ["cat", "grass"], part_texts=("a dog on grass",), max_length=256)
    t5_ids = sd3.tokenizer_3("a dog on grass")["input_ids"]
    cat, grass = index.class_tokens
    assert cat and max(cat) < 77 and sd3.tokenizer.decode([sd3.tokenizer("a cat")["input_ids"][p] for p in cat]) == "cat"
    assert grass and min(grass) >= 77 and sd3.tokenizer_3.decode([t5_ids[p - 77] for p in grass]) == "grass"
    with pytest.raises(ValueError, match="no tokens in any text encoder's part"):
        adapter.token_index("a cat", ["sky"], part_texts=("a dog on grass",))
    sd3(["a cat", "a cow"], prompt_3=["a dog on grass", "a cow on grass"], goca_classes=["grass"], **call)
    assert [r.classes for r in sd3.goca_masks[0].results] == [["grass"]] * 2
    with pytest.raises(ValueError, match="prompt_2"):
        sd3("a cat", prompt_2="a dog", goca_classes=["cat"], **call)


def test_multi_vector_textual_inversion_tokens_are_read_where_the_encoder_puts_them():
    """The pipeline spells a multi-vector textual-inversion token out as one token per vector before tokenizing, which
    moves every later token: the class positions follow, the token as a class reads all its vectors, and the default
    classes keep the name the prompt uses."""
    pipe = make_tiny_sd()
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    pipe.load_textual_inversion({"<cat-toy>": torch.randn(3, width, generator=torch.Generator().manual_seed(0))},
                                token="<cat-toy>")
    prompt = "a <cat-toy> on grass"
    reference = generate(pipe)
    gp = goca.from_pipe(pipe)
    index = gp._goca.adapter.token_index(prompt, ["<cat-toy>", "grass"])
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer))["input_ids"]
    assert [pipe.tokenizer.convert_ids_to_tokens([ids[p] for p in ps]) for ps in index.class_tokens] == [
        ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"], ["grass</w>"]]
    assert np.array_equal(generate(gp, goca_masks="last"), reference)
    gp([prompt], num_inference_steps=2, height=32, width=32, goca_masks="last", output_type="np")
    assert gp.goca_masks[0].results[0].classes == ["<cat-toy>", "grass"]
    assert gp.segment(IMAGE_48x32, ["<cat-toy>", "grass"]).labels.shape == (32, 48)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_forward_under_grad_leaves_no_graph_in_the_capture(family):
    """A denoiser called with gradients on (a training loop, gradient guidance): the capture holds no tensor that
    requires grad, so it keeps no part of the forward's graph alive."""
    pipe = goca.from_pipe(make_tiny_sd() if family == "sd" else make_tiny_sd3())
    denoiser = pipe._goca.adapter.denoiser
    if family == "sd":
        x = torch.randn(1, 4, 8, 8)
        embeds = pipe.encode_prompt("a cat", "cpu", 1, False)[0]
        run = lambda: denoiser(x, torch.tensor([10]), encoder_hidden_states=embeds)  # noqa: E731
    else:
        x = torch.randn(1, denoiser.config.in_channels, 8, 8)
        embeds, _, pooled, _ = pipe.encode_prompt("a cat", None, None, device="cpu", do_classifier_free_guidance=False,
                                                  max_sequence_length=32)
        run = lambda: denoiser(hidden_states=x, timestep=torch.tensor([10.0]), encoder_hidden_states=embeds,  # noqa: E731
                               pooled_projections=pooled)
    with torch.enable_grad():
        step = pipe.capture_forward(run)
    held, seen = [], set()

    def walk(obj, path):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            held.append((path, obj.requires_grad))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
            for k, v in vars(obj).items():
                walk(v, f"{path}.{k}")

    walk(step, "step")
    assert any(p.startswith("step.cross") for p, _ in held)
    assert [p for p, grad in held if grad] == []
    pipe.disable_goca()


class Int8Linear(torch.nn.Linear):
    """Weight-only int8 quantization as torchao, bitsandbytes or GGUF keep it: the weight is not a float tensor, and
    the forward dequantizes it (per-row scale). No bias, so that the weight read off the forward is exact (a bias
    added and taken away again would round it by an ulp, which the unclamped head weights of a tiny random model
    can amplify to 1e-3 in the scores)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
        del self.weight
        self.register_buffer("weight", (linear.weight.detach() / scale).round().to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantized(self) -> torch.nn.Linear:
        plain = torch.nn.Linear(self.in_features, self.out_features, bias=False)
        plain.weight.data = self.weight.float() * self.scale
        return plain

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale, self.bias)


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_flux], ids=["sd", "flux"])
def test_quantized_output_projections_give_the_dequantized_models_scores(make):
    """The head weights read the weight that an attention output's projection applies. Quantized, it is no float
    tensor (it was read as raw integers, or failed); it is read off the layer's own forward, so the scores equal those
    of the same model with the dequantized weights as plain layers."""
    quantized, plain = make(), make()
    denoiser = goca.adapter_for(quantized).denoiser
    names = [n for n, m in denoiser.named_modules()
             if type(m) is torch.nn.Linear and (n.endswith("to_out.0") or n.endswith("proj_out"))]
    assert len(names) >= 3
    for name in names:
        parent, attr = name.rsplit(".", 1) if "." in name else ("", name)
        q = Int8Linear(denoiser.get_submodule(name))
        setattr(denoiser.get_submodule(parent), attr, q)
        other = goca.adapter_for(plain).denoiser
        setattr(other.get_submodule(parent), attr, q.dequantized())
    image = Image.fromarray((np.random.RandomState(3).rand(32, 32, 3) * 255).astype(np.uint8))
    a = goca.from_pipe(quantized).segment(image, ["cat", "grass"], resolution=32)
    b = goca.from_pipe(plain).segment(image, ["cat", "grass"], resolution=32)
    assert torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_flux], ids=["sd", "flux"])
def test_sequential_cpu_offload_gives_the_resident_models_scores(make):
    """Under sequential offload (accelerate's `cpu_offload`, what `enable_sequential_cpu_offload` puts on each
    model) the parameters wait on the meta device outside their forward: the output projections' weights and biases
    are read off their forward. The images stay the same and the scores are the resident model's, up to the
    rounding of the bias taken off that forward again (which the tiny random SD amplifies to about 1e-3)."""
    from accelerate import cpu_offload

    image = Image.fromarray((np.random.RandomState(3).rand(32, 32, 3) * 255).astype(np.uint8))
    resident = goca.from_pipe(make()).segment(image, ["cat", "grass"], resolution=32)
    pipe = make()
    reference = generate(pipe)
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "vae"):
        if getattr(pipe, name, None) is not None:
            cpu_offload(getattr(pipe, name), execution_device=torch.device("cpu"))
    gp = goca.from_pipe(pipe)
    assert gp._goca.adapter.denoiser.get_submodule(gp._goca.adapter.cross_layers[0]).to_q.weight.device.type == "meta"
    offloaded = gp.segment(image, ["cat", "grass"], resolution=32)
    assert torch.allclose(offloaded.scores, resident.scores, atol=5e-3)
    assert np.array_equal(generate(gp, goca_masks="last"), reference)


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_flux], ids=["sd", "flux"])
def test_segment_checks_its_timestep_and_takes_an_unseeded_call(make):
    """DDPM's timestep indexes its noise schedule (a negative one wrapped around to t ≈ 1000, 1000 or 100.5 failed
    deep inside); flow matching takes any t in [0, 1000]. seed=None draws unseeded noise."""
    pipe = goca.from_pipe(make())
    image = Image.fromarray((np.random.RandomState(4).rand(32, 32, 3) * 255).astype(np.uint8))
    flow = make is make_tiny_flux
    for bad in ([-5, 1000.5, "soon", float("nan")] if flow else [-5, 1000, 100.5, "soon", float("nan"), float("inf")]):
        with pytest.raises(ValueError, match="timestep must be"):
            pipe.segment(image, ["cat"], timestep=bad, resolution=32)
    assert torch.equal(pipe.segment(image, ["cat"], timestep=torch.tensor(100), resolution=32).scores,
                       pipe.segment(image, ["cat"], timestep=100, resolution=32).scores)
    assert pipe.segment(image, ["cat"], seed=None, resolution=32).scores.isfinite().all()
    with pytest.raises(ValueError, match="seed must be"):
        pipe.segment(image, ["cat"], seed="0", resolution=32)
    pipe.disable_goca()


def test_goca_classes_per_prompt(tiny_sd):
    """One class list for every prompt, or one per prompt (repeated for num_images_per_prompt); anything else raises
    before the generation starts."""
    pipe = goca.from_pipe(tiny_sd)
    generate(pipe, goca_masks="last", goca_classes=[["red circle", "grass"], ["dog"]], num_images_per_prompt=2)
    assert [r.classes for r in pipe.goca_masks[0].results] == [["red circle", "grass"]] * 2 + [["dog"]] * 2
    for bad in ("cat", [["grass"]], [["grass"], "sand"]):
        with pytest.raises(ValueError, match="goca_classes must be"):
            generate(pipe, goca_masks="last", goca_classes=bad)
    pipe.disable_goca()
