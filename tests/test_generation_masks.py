"""Masks during generation (`goca_masks`): the steps they are taken at, layer weights reused across steps, the
classes and prompts they read, guidance variants that add denoiser calls, PixArt's resolution binning, and clear
refusals before any denoising."""

import numpy as np
import pytest
import torch

import diffusers_goca as goca
from diffusers_goca.testing import (
    PROMPTS,
    IMAGE_48x32,
    Running,
    generate,
    make_tiny_flux,
    make_tiny_pixart,
    make_tiny_sd3,
)


@pytest.mark.slow
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


def test_steps_without_masks_capture_nothing(tiny_sd):
    pipe = goca.from_pipe(tiny_sd)
    seen = []
    generate(pipe, goca_masks=[1], goca_callback=lambda p, step, t, masks: seen.append((step, t, len(masks.results))))
    assert [s for s, _, _ in seen] == [1] and [m.step for m in pipe.goca_masks] == [1]
    assert seen[0][2] == 2
    assert not pipe._goca.capture.active
    generate(pipe, goca_masks=[-1, 0])  # negative indices count from the end
    assert [m.step for m in pipe.goca_masks] == [0, 2]


@pytest.mark.slow
def test_pixart_resolution_binning_masks_have_the_returned_size():
    """PixArt's pipelines generate at the nearest aspect-ratio bin, then resize and centre-crop to the requested size
    (and keep no `_num_timesteps`): the "last" step's masks are those of the binned image, resized and cropped alike."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN

    pipe = make_tiny_pixart()
    pipe.transformer.register_to_config(sample_size=32)  # the 256 px bins
    call = dict(num_inference_steps=2, output_type="np")
    reference = pipe(PROMPTS, height=100, width=150, generator=torch.Generator().manual_seed(0), **call).images
    gp = goca.from_pipe(pipe)
    images = gp(
        PROMPTS, height=100, width=150, goca_masks="last", generator=torch.Generator().manual_seed(0), **call
    ).images
    assert np.array_equal(images, reference) and images.shape[1:3] == (100, 150)
    (binned,) = gp.goca_masks
    assert binned.step == 1 and binned.results[0].labels.shape == (100, 150)
    h, w = pipe.image_processor.classify_height_width_bin(100, 150, ASPECT_RATIO_256_BIN)
    gp(
        PROMPTS,
        height=h,
        width=w,
        use_resolution_binning=False,
        goca_masks="last",
        generator=torch.Generator().manual_seed(0),
        **call,
    )
    for got, at_bin in zip(binned.results, gp.goca_masks[0].results):
        want = pipe.image_processor.resize_and_crop_tensor(at_bin.scores[None], 150, 100)[0]
        assert torch.allclose(got.scores, want) and torch.equal(got.labels, want.argmax(0))
    # Latents are returned at the bin's size, not resized: so are their masks (they were at the requested size).
    latents = gp(
        PROMPTS,
        height=100,
        width=150,
        goca_masks="last",
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=2,
        output_type="latent",
    ).images
    scale = pipe.vae_scale_factor
    assert gp.goca_masks[0].results[0].labels.shape == (latents.shape[-2] * scale, latents.shape[-1] * scale) == (h, w)


def test_flux_true_cfg_segments_the_conditional_call_once_per_step():
    pipe = goca.from_pipe(make_tiny_flux())
    kw = dict(num_inference_steps=3, height=32, width=32, output_type="np", max_sequence_length=32)
    reference = pipe(
        ["a cat on grass"],
        negative_prompt=["blurry"],
        true_cfg_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images
    images = pipe(
        ["a cat on grass"],
        negative_prompt=["blurry"],
        true_cfg_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        goca_masks=True,
        **kw,
    ).images
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


@pytest.mark.slow
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
    pixart = goca.from_pipe(make_tiny_pixart())
    with pytest.raises(ValueError, match="layers='manual'.*pixart"):
        pixart.segment(IMAGE_48x32, ["cat"], resolution=32, layers="manual")


def test_masks_read_the_prompt_the_text_keys_hold():
    """Flux's transformer attends to the T5 tokens of `prompt_2` when given (`prompt` gives CLIP's pooled vector
    only): a class in `prompt_2` alone is found there. SD3 reads `prompt` in its CLIP and T5 parts: a class past the
    77 CLIP tokens comes from the T5 part; a `prompt_3` of its own (what T5 encodes) is read in the T5 part, and a
    differing `prompt_2` (CLIP-G, at CLIP-L's positions) is refused."""
    flux = goca.from_pipe(make_tiny_flux())
    flux(
        prompt="a photo",
        prompt_2="a cat on grass",
        goca_classes=["cat"],
        goca_masks="last",
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=32,
    )
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
    assert (
        cat and max(cat) < 77 and sd3.tokenizer.decode([sd3.tokenizer("a cat")["input_ids"][p] for p in cat]) == "cat"
    )
    assert grass and min(grass) >= 77 and sd3.tokenizer_3.decode([t5_ids[p - 77] for p in grass]) == "grass"
    with pytest.raises(ValueError, match="no tokens in any text encoder's part"):
        adapter.token_index("a cat", ["sky"], part_texts=("a dog on grass",))
    sd3(["a cat", "a cow"], prompt_3=["a dog on grass", "a cow on grass"], goca_classes=["grass"], **call)
    assert [r.classes for r in sd3.goca_masks[0].results] == [["grass"]] * 2
    with pytest.raises(ValueError, match="prompt_2"):
        sd3("a cat", prompt_2="a dog", goca_classes=["cat"], **call)


def test_goca_classes_per_prompt(tiny_sd):
    """One class list for every prompt, or one per prompt (repeated for num_images_per_prompt); anything else raises
    before the generation starts."""
    pipe = goca.from_pipe(tiny_sd)
    generate(pipe, goca_masks="last", goca_classes=[["red circle", "grass"], ["dog"]], num_images_per_prompt=2)
    assert [r.classes for r in pipe.goca_masks[0].results] == [["red circle", "grass"]] * 2 + [["dog"]] * 2
    for bad in ("cat", [["grass"]], [["grass"], "sand"]):
        with pytest.raises(ValueError, match="goca_classes must be"):
            generate(pipe, goca_masks="last", goca_classes=bad)
