"""Defects of the public API (issue #19): inputs read wrongly, invalid arguments accepted or refused deep inside, the
shipped toy model with the stock pipeline, and the command line's errors and notes."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_goca as goca
from diffusers_goca.image_input import as_rgb
from diffusers_goca.testing import make_tiny_flux, make_tiny_pixart, make_tiny_sd, make_tiny_sdxl
from diffusers_goca.toyworld import TOY_MODEL_DIR

IMAGE = Image.fromarray((np.random.RandomState(5).rand(32, 32, 3) * 255).astype(np.uint8))


def run(pipe, prompt, **kw):
    """One seeded 32×32 step of `pipe`."""
    return pipe(prompt, num_inference_steps=1, height=32, width=32, generator=torch.Generator().manual_seed(0), **kw)


@contextmanager
def no_denoising(pipe):
    """Asserts that the denoiser did not run in the block: a refusal comes before any denoising work."""
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        yield
    finally:
        handle.remove()
    assert not calls, "the denoiser ran before the refusal"


def test_wide_grey_pil_images_are_read_in_their_range(tmp_path):
    """A 16-bit grey PNG (mode I;16), mode I and mode F were converted by PIL's clipping `convert("RGB")`: a dark
    16-bit image came out white. Integers are 16-bit values, floats values in [0, 1], as for arrays."""
    grey = np.random.RandomState(1).randint(0, 256, (6, 5)).astype(np.uint8)
    expected = np.repeat(grey[..., None], 3, -1)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    for image in (
        str(tmp_path / "grey16.png"),
        Image.fromarray(grey.astype(np.int32) * 257, mode="I"),
        Image.fromarray(grey.astype(np.float32) / 255, mode="F"),
    ):
        assert np.array_equal(np.asarray(as_rgb(image)), expected)
    with pytest.raises(ValueError, match="mode I must hold values in 0–65535"):
        as_rgb(Image.fromarray(np.full((4, 4), 70000, np.int32), mode="I"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_rgb(Image.fromarray(np.full((4, 4), 3.0, np.float32), mode="F"))


def test_case_duplicate_classes_are_refused_or_merged(tiny_sd):
    """Names that differ in case read the same tokens, so one of them never got a pixel: refused when given, merged
    when taken from the prompt; a class "Background" is the background channel, as "background" is."""
    pipe = goca.from_pipe(tiny_sd)
    with no_denoising(pipe):
        with pytest.raises(ValueError, match="unique, compared case-insensitively"):
            pipe.segment(IMAGE, ["cat", "Cat"], resolution=32)
        with pytest.raises(ValueError, match="unique, compared case-insensitively"):
            run(pipe, "a cat and a Cat on grass", goca_masks="last", goca_classes=["cat", "Cat"])
    assert pipe.segment(IMAGE, ["cat", "Background"], resolution=32).classes == ["cat", "Background"]
    assert goca.entities_from_prompt("a cat and a Cat on grass") == ["cat", "grass"]
    run(pipe, "a cat and a Cat on grass", goca_masks="last")
    assert pipe.goca_masks[0].results[0].classes == ["cat", "grass"]
    run(pipe, "a cat on a Background", goca_masks="last", goca_background=True)
    assert pipe.goca_masks[0].results[0].classes == ["cat", "Background"]


def test_the_shipped_toy_model_runs_in_the_stock_pipeline_without_a_dtype():
    """Its text encoder was stored in fp16, which transformers keeps and diffusers casts away for the other
    components: "mat1 and mat2 must have the same dtype" at the first step."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float32}
    image = pipe(
        "a red circle on grass", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_invalid_numbers_are_refused_before_denoising(tiny_sd):
    """A NaN or infinite background offset labelled every pixel background; refine_order -1 was taken as 0 and 2.5
    failed deep inside; a numpy integer seed was refused."""
    pipe = goca.from_pipe(tiny_sd)
    with no_denoising(pipe):
        for offset in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="background_offset must be a finite number"):
                pipe.segment(IMAGE, ["cat"], background_offset=offset, resolution=32)
            with pytest.raises(ValueError, match="goca_background_offset must be a finite number"):
                run(pipe, "a cat on grass", goca_masks="last", goca_background_offset=offset)
        for order in (-1, 2.5, True):
            with pytest.raises(ValueError, match="refine_order must be None .* or an integer ≥ 0"):
                pipe.segment(IMAGE, ["cat"], refine_order=order, resolution=32)
            with pytest.raises(ValueError, match="refine_order must be"):
                run(pipe, "a cat on grass", goca_masks="last", goca_options={"refine_order": order})
    assert torch.equal(
        pipe.segment(IMAGE, ["cat"], seed=np.int64(3), resolution=32).scores,
        pipe.segment(IMAGE, ["cat"], seed=3, resolution=32).scores,
    )
    assert pipe.segment(IMAGE, ["cat"], refine_order=np.int64(0), resolution=32).scores.isfinite().all()


def test_scfg_refuses_a_max_guidance_that_is_not_a_finite_positive_number():
    """NaN gave a NaN image, 0 unconditional sampling and a negative one negative guidance."""
    pipe = goca.scfg_from_pipe(make_tiny_sd())
    with no_denoising(pipe):
        for bad in (float("nan"), 0, -1.0, float("inf"), "15"):
            with pytest.raises(ValueError, match="max_guidance must be a finite number > 0"):
                run(pipe, "a cat on grass", guidance_scale=5.0, max_guidance=bad)
        for bad in ((0.8, float("inf")), (float("nan"), 3.0), (3.0, 0.8), (0, 3.0), ("1", 3.0)):
            with pytest.raises(ValueError, match="rate_bounds must be finite numbers"):
                run(pipe, "a cat on grass", guidance_scale=5.0, rate_bounds=bad)
        for bad in (0, -2, 1.5, float("inf"), float("nan"), True, "2"):
            with pytest.raises(ValueError, match="layer_weights_every must be an integer ≥ 1"):
                run(pipe, "a cat on grass", guidance_scale=5.0, layer_weights_every=bad)
            with pytest.raises(ValueError, match="regions_every must be an integer ≥ 1"):
                run(pipe, "a cat on grass", guidance_scale=5.0, regions_every=bad)
            with pytest.raises(ValueError, match="goca_layer_weights_every must be an integer ≥ 1"):
                run(pipe, "a cat on grass", scfg=False, goca_masks=True, goca_layer_weights_every=bad)


def test_result_pictures_take_generated_images_of_every_output_type(tiny_sd):
    """overlay(image) and heatmaps(image) read an image as `segment` does (they called PIL's `convert` on arrays and
    tensors); columns < 1 is refused; an [H, W, C] tensor is read as the same array is."""
    pipe = goca.from_pipe(tiny_sd)
    pictures = {}
    for output_type in ("pil", "np", "pt"):
        image = run(pipe, "a cat on grass", goca_masks="last", output_type=output_type).images[0]
        result = pipe.goca_masks[0].results[0]
        pictures[output_type] = (np.asarray(result.overlay(image)), np.asarray(result.heatmaps(image, columns=1)))
    for output_type in ("np", "pt"):
        for got, expected in zip(pictures[output_type], pictures["pil"]):
            assert np.abs(got.astype(int) - expected).max() <= 1
    with pytest.raises(ValueError, match="columns must be an integer ≥ 1, got 0"):
        result.heatmaps(columns=0)
    pixels = np.asarray(IMAGE)
    assert torch.equal(
        pipe.segment(torch.from_numpy(pixels), ["cat"], resolution=32).scores,
        pipe.segment(pixels, ["cat"], resolution=32).scores,
    )
    assert np.array_equal(np.asarray(as_rgb(torch.from_numpy(pixels)[None])), pixels)
    square = torch.arange(3 * 4 * 4, dtype=torch.uint8).reshape(3, 4, 4)  # [3, 4, 4]: channels first, as in torch
    assert np.array_equal(np.asarray(as_rgb(square)), square.permute(1, 2, 0).numpy())


def test_cli_mistakes_end_in_one_line_and_the_toy_model_is_announced(tmp_path, capsys):
    """A timestep or method the model refuses, a missing image, a hub id not reachable offline: `goca: error: ...`
    and a non-zero exit instead of a traceback. Without --model a note says the toy model is used."""
    from diffusers_goca.cli import main

    IMAGE.save(tmp_path / "in.png")
    image, out = str(tmp_path / "in.png"), str(tmp_path / "overlay.png")
    assert main(["segment", image, "--classes", "grass", "--out", out]) == 0
    note = capsys.readouterr().err
    assert "toy model (32 px" in note and "--model" in note
    for args, message in (
        (["--timestep", "100.5"], "timestep must be an integer"),
        (["--method", "seg4diff"], "'seg4diff' is not defined for unet"),
        (["--model", "someone/not-cached-model"], "model_index.json"),
    ):
        with pytest.raises(SystemExit, match=f"^goca: error: .*{message}"):
            main(["segment", image, "--classes", "grass", "--out", out, *args])
    with pytest.raises(SystemExit, match="^goca: error: image file not found"):
        main(["segment", str(tmp_path / "missing.png"), "--classes", "grass"])


def test_enable_goca_refuses_an_unknown_head_weighting():
    pipe = goca.from_pipe(make_tiny_sd(), enable=False)
    with pytest.raises(ValueError, match="head_weighting must be one of"):
        pipe.enable_goca(head_weighting="bogus")
    assert not pipe.goca_enabled


def test_segment_refuses_a_resolution_that_cuts_a_token():
    pipe = goca.from_pipe(make_tiny_pixart())  # VAE factor 2, patch 2: multiples of 4
    for bad in (34, 30, 6, 0, 32.0, True):
        with pytest.raises(ValueError, match="resolution must be a positive multiple of 4"):
            pipe.segment(IMAGE, ["cat"], resolution=bad)
    assert pipe.segment(IMAGE, ["cat"], resolution=np.int64(36)).labels.shape == (32, 32)


def test_flux_masks_report_the_schedulers_timesteps():
    pipe = goca.from_pipe(make_tiny_flux())
    seen = []
    pipe(
        "a cat on grass",
        num_inference_steps=3,
        height=32,
        width=32,
        max_sequence_length=32,
        goca_masks="all",
        goca_classes=["cat"],
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=lambda p, i, t, kw: seen.append(float(t)) or {},
    )
    assert [m.timestep for m in pipe.goca_masks] == pytest.approx(seen) and seen[0] > 1


def test_a_refused_call_leaves_a_disabled_pipeline_as_it_was():
    pipe = goca.from_pipe(make_tiny_sd(), enable=False)
    before = dict(pipe.unet.attn_processors)
    with no_denoising(pipe), pytest.raises(ValueError, match="dog"):
        run(pipe, "a cat on grass", goca_masks="last", goca_classes=["dog"])
    scfg = goca.scfg_from_pipe(pipe, enable=False)
    with no_denoising(scfg), pytest.raises(ValueError):
        run(scfg, "a cat on grass", guidance_scale=5.0, pseudo_attention="bogus")
    assert not pipe.goca_enabled and not scfg.goca_enabled
    assert all(pipe.unet.attn_processors[k] is p for k, p in before.items())
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks


@pytest.mark.slow
def test_goca_masks_steps_are_integers_of_the_call_checked_before_it_runs():
    pipe = goca.from_pipe(make_tiny_sd())
    for steps in ([0], np.array([0]), torch.tensor([0]), [np.int64(0)]):
        run(pipe, "a cat on grass", goca_masks=steps, goca_classes=["cat"])
        assert [m.step for m in pipe.goca_masks] == [0], steps
    for bad in ([5], [-2], [1.5], [True], 0):
        with no_denoising(pipe), pytest.raises(ValueError, match="goca_masks"):
            run(pipe, "a cat on grass", goca_masks=bad, goca_classes=["cat"])


@pytest.mark.parametrize("cut", [pytest.param("strength", marks=pytest.mark.slow), "denoising_end", "denoising_start"])
def test_goca_masks_steps_are_those_the_call_runs(cut):
    """img2img's strength and SDXL's denoising_start / denoising_end run fewer steps than num_inference_steps: a step
    past them gave no mask, silently; now it is refused before the call, and "all" / -1 count the steps run."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if cut == "strength":
        pipe = goca.from_pipe(make_tiny_sd(StableDiffusionImg2ImgPipeline))
        kw = dict(image=IMAGE, strength=0.5)
    else:
        make = StableDiffusionXLImg2ImgPipeline if cut == "denoising_start" else StableDiffusionXLPipeline
        pipe = goca.from_pipe(make_tiny_sdxl(make))
        kw = {cut: 0.5, **({"image": IMAGE} if cut == "denoising_start" else {"height": 32, "width": 32})}
    call = dict(prompt="a cat on grass", num_inference_steps=4, generator=_gen(), output_type="np", **kw)
    with no_denoising(pipe), pytest.raises(ValueError, match="this call runs 2 steps of num_inference_steps=4"):
        pipe(goca_masks=[3], **call)
    pipe(goca_masks="all", **call)
    assert [m.step for m in pipe.goca_masks] == [0, 1]
    pipe(goca_masks=[-1], **call)
    assert [m.step for m in pipe.goca_masks] == [1]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


STEPS = dict(num_inference_steps=3, height=32, width=32, output_type="np")


@pytest.mark.slow
def test_segment_inside_a_generation_callback_keeps_the_outer_masks(tiny_sd):
    """A segmentation asked for inside `goca_callback` or `callback_on_step_end` ran as a nested request that
    replaced the outer one: the outer call kept masks for step 0 only."""
    pipe = goca.from_pipe(tiny_sd)
    plain = pipe("a cat on grass", goca_masks="all", generator=_gen(), **STEPS)
    reference = [m.results[0].scores for m in pipe.goca_masks]
    inner = []

    def on_masks(p, step, t, masks):
        inner.append(p.segment(IMAGE, ["cat"], resolution=32))

    def on_step_end(p, i, t, kwargs):
        inner.append(p.segment(IMAGE, ["cat"], resolution=32))
        return kwargs

    for callbacks in ({"goca_callback": on_masks}, {"callback_on_step_end": on_step_end}):
        out = pipe("a cat on grass", goca_masks="all", generator=_gen(), **STEPS, **callbacks)
        assert len(pipe.goca_masks) == 3, callbacks
        assert all(torch.equal(a, m.results[0].scores) for a, m in zip(reference, pipe.goca_masks))
        assert np.array_equal(out.images, plain.images)
    assert len(inner) == 6 and all(torch.equal(r.scores, inner[0].scores) for r in inner)


@pytest.mark.slow
def test_segment_inside_an_scfg_callback_leaves_scfg_on(tiny_sd):
    pipe = goca.scfg_from_pipe(tiny_sd)
    kw = dict(STEPS, guidance_scale=5.0)
    reference = pipe("a cat on grass", generator=_gen(), **kw).images

    def on_step_end(p, i, t, kwargs):
        p.segment(IMAGE, ["cat"], resolution=32)
        return kwargs

    nested = pipe("a cat on grass", generator=_gen(), callback_on_step_end=on_step_end, **kw).images
    assert np.array_equal(nested, reference)
    assert not np.array_equal(reference, pipe("a cat on grass", generator=_gen(), scfg=False, **kw).images)


@pytest.mark.slow
def test_a_second_pipeline_on_the_same_denoiser_segmenting_inside_a_callback():
    """Two GoCA pipelines sharing one UNet: the second one's forward, run inside the first one's callback, was taken
    by the first one's hooks as a step of its own (8 masks for 4 steps)."""
    first = goca.from_pipe(make_tiny_sd())
    second = goca.from_pipe(first)
    plain = first("a cat on grass", goca_masks="all", generator=_gen(), **STEPS)
    reference = [m.results[0].scores for m in first.goca_masks]
    inner = []
    out = first(
        "a cat on grass",
        goca_masks="all",
        generator=_gen(),
        **STEPS,
        goca_callback=lambda p, step, t, masks: inner.append(second.segment(IMAGE, ["cat"], resolution=32)),
    )
    assert len(first.goca_masks) == 3 and [m.step for m in first.goca_masks] == [0, 1, 2]
    assert all(torch.equal(a, m.results[0].scores) for a, m in zip(reference, first.goca_masks))
    assert np.array_equal(out.images, plain.images) and len(inner) == 3


@pytest.mark.parametrize(
    "name",
    [pytest.param("StableDiffusionSAGPipeline", marks=pytest.mark.slow), "StableDiffusionAttendAndExcitePipeline"],
)
def test_pipelines_with_several_denoiser_calls_per_step_are_refused_masks(name):
    """SAG gave masks labelled steps 0–5 for 3 steps, Attend-and-Excite 27: the per-step masks of a pipeline whose
    step is not one denoiser call are refused by name, before any denoising; `segment` still works on it."""
    import diffusers

    pipe = goca.from_pipe(make_tiny_sd(getattr(diffusers, name)))
    with no_denoising(pipe), pytest.raises(ValueError, match=f"goca_masks is not supported on {name}"):
        run(pipe, "a cat on grass", goca_masks="all")
    scfg = goca.scfg_from_pipe(pipe)
    with no_denoising(scfg), pytest.raises(ValueError, match=f"S-CFG is not supported on {name}"):
        run(scfg, "a cat on grass", guidance_scale=5.0)
    assert pipe.segment(IMAGE, ["cat"], resolution=32).labels.shape == (32, 32)
