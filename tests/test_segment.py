"""`segment` on existing images: sizes, modes, files and value ranges of the input, seeds, methods and options,
timesteps, the command line, and clear errors for bad inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_goca as goca
from diffusers_goca.testing import (
    FAMILIES,
    FAMILY_IDS,
    IMAGE_48x32,
    make_tiny_flux,
    make_tiny_pixart,
    make_tiny_sd,
    make_tiny_sd3,
)


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


def test_a_photo_path_is_segmented_upright(tiny_sd, tmp_path):
    """A file's EXIF orientation is applied, as viewers (and diffusers' `load_image`) show the photo."""
    raw = Image.fromarray((np.random.RandomState(5).rand(30, 40, 3) * 255).astype(np.uint8))  # 40 wide, 30 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    raw.save(tmp_path / "photo.jpg", exif=exif)
    pipe = goca.from_pipe(tiny_sd)
    result = pipe.segment(tmp_path / "photo.jpg", ["cat"])
    assert result.labels.shape == (40, 30) and result.image.size == (30, 40)


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


def test_image_values_are_read_in_their_dtypes_range():
    """uint8 and other integers are 0–255, floats 0–1, for arrays and tensors alike; a range that fits neither raises
    instead of being clipped into a white or black image."""
    from diffusers_goca.image_input import as_rgb

    pixels = np.random.RandomState(2).randint(0, 256, (5, 7, 3)).astype(np.uint8)
    expected = np.asarray(Image.fromarray(pixels))
    for image in (
        pixels.astype(np.int64),
        pixels / 255.0,
        pixels.astype(np.float16) / 255,
        torch.from_numpy(pixels).permute(2, 0, 1),
        torch.from_numpy(pixels / 255.0).permute(2, 0, 1)[None],
        torch.from_numpy(pixels).permute(2, 0, 1).bfloat16() / 255,
    ):
        got = np.asarray(as_rgb(image)).astype(int)
        assert np.abs(got - expected).max() <= (1 if getattr(image, "dtype", None) == torch.bfloat16 else 0)
    assert np.asarray(as_rgb(np.eye(3, dtype=bool)))[0, 0].tolist() == [255] * 3
    for image, message in (
        (pixels.astype(np.float32), r"\[0, 1\], got \d"),
        (torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1), r"\(x \+ 1\) / 2"),
        (pixels.astype(np.int32) * 257, "16-bit"),
        (np.full((4, 4), np.nan), "finite"),
    ):
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
        sample_size=8,
        in_channels=3,
        out_channels=6,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=16,
        attention_head_dim=8,
        encoder_hid_dim=16,
        encoder_hid_dim_type="text_proj",
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=8,
    )
    if_like.tokenizer = pipe.tokenizer
    with pytest.raises(ValueError, match="AttnAddedKVProcessor2_0.*added-KV attention are not supported"):
        goca.from_pipe(if_like)


@pytest.mark.slow
def test_cli_segments_with_a_saved_pipeline(tmp_path):
    from diffusers_goca.cli import main

    make_tiny_sd().save_pretrained(tmp_path / "model")
    Image.fromarray((np.random.RandomState(0).rand(40, 30, 3) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "overlay.png"
    assert (
        main(
            [
                "segment",
                str(tmp_path / "in.png"),
                "--classes",
                "cat,grass",
                "--model",
                str(tmp_path / "model"),
                "--out",
                str(out),
                "--heatmaps",
                str(tmp_path / "heat.png"),
                "--method",
                "vanilla",
            ]
        )
        == 0
    )
    assert Image.open(out).mode == "RGB" and (tmp_path / "heat.png").exists()
    assert (
        main(
            [
                "segment",
                str(tmp_path / "in.png"),
                "--classes",
                "cat",
                "--model",
                str(tmp_path / "model"),
                "--out",
                str(out),
                "--layer-weight-stride",
                "2",
            ]
        )
        == 0
    )


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


def test_head_weighting_ablation_needs_its_capture(tiny_sd):
    img = Image.fromarray((np.random.RandomState(2).rand(32, 32, 3) * 255).astype(np.uint8))
    pipe = goca.from_pipe(tiny_sd)
    with pytest.raises(ValueError, match="enable_goca\\(head_weighting='dot-product'\\)"):
        pipe.segment(img, ["cat"], head_weighting="dot-product")
    pipe.enable_goca(head_weighting="dot-product")
    clamped = pipe.segment(img, ["cat"], head_weighting="dot-product", background=True)
    pipe.enable_goca()
    assert not torch.equal(clamped.scores, pipe.segment(img, ["cat"], background=True).scores)


@pytest.mark.slow
def test_strided_layer_weights_option():
    """`layer_weight_stride`: the reference rows the layer weights read (cross-attention families only); 1 is the
    official method."""
    img = Image.fromarray((np.random.RandomState(2).rand(32, 32, 3) * 255).astype(np.uint8))
    for make in (make_tiny_sd, make_tiny_pixart):
        pipe = goca.from_pipe(make())
        out = pipe.segment(img, ["cat", "dog"], method=["goca", "vanilla"], layer_weight_stride=2, background=True)
        assert out["goca"].scores.shape == (3, 32, 32)
        assert torch.equal(
            pipe.segment(img, ["cat", "dog"], layer_weight_stride=1).scores, pipe.segment(img, ["cat", "dog"]).scores
        )
        with pytest.raises(ValueError, match="integer ≥ 1"):
            pipe.segment(img, ["cat"], layer_weight_stride=0)
    with pytest.raises(ValueError, match="joint attention"):
        goca.from_pipe(make_tiny_sd3()).segment(img, ["cat"], layer_weight_stride=2)


def test_iseg_runs_its_own_forward_with_scaled_class_embeddings(tiny_sd):
    from diffusers_goca.methods import ISEG_EMBEDDING_SCALE, available_methods

    pipe = goca.from_pipe(tiny_sd)
    assert "iseg" in available_methods(pipe._goca.adapter)
    seen = []  # the text the first cross-attention layer sees, per forward
    attn2 = pipe.unet.get_submodule(pipe._goca.adapter.cross_layers[0])
    handle = attn2.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True
    )
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
    for make in (make_tiny_pixart, make_tiny_sd3):  # one grid only: not available, with a clear error
        other = goca.from_pipe(make())
        with pytest.raises(ValueError, match="iseg"):
            other.segment(img, ["cat"], method="iseg", resolution=64)


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


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_flux], ids=["sd", "flux"])
def test_segment_checks_its_timestep_and_takes_an_unseeded_call(make):
    """DDPM's timestep indexes its noise schedule (a negative one wrapped around to t ≈ 1000, 1000 or 100.5 failed
    deep inside); flow matching takes any t in [0, 1000]. seed=None draws unseeded noise."""
    pipe = goca.from_pipe(make())
    image = Image.fromarray((np.random.RandomState(4).rand(32, 32, 3) * 255).astype(np.uint8))
    flow = make is make_tiny_flux
    for bad in [-5, 1000.5, "soon", float("nan")] if flow else [-5, 1000, 100.5, "soon", float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="timestep must be"):
            pipe.segment(image, ["cat"], timestep=bad, resolution=32)
    assert torch.equal(
        pipe.segment(image, ["cat"], timestep=torch.tensor(100), resolution=32).scores,
        pipe.segment(image, ["cat"], timestep=100, resolution=32).scores,
    )
    assert pipe.segment(image, ["cat"], seed=None, resolution=32).scores.isfinite().all()
    with pytest.raises(ValueError, match="seed must be"):
        pipe.segment(image, ["cat"], seed="0", resolution=32)
