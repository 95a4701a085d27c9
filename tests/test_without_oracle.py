"""Masks without oracle classes: the denoiser's presence test, the toy-world protocols, the background channel."""

import contextlib
import itertools
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_goca as goca
from diffusers_goca.bench.protocols import PROTOCOLS, evaluate_protocols, protocol_classes
from diffusers_goca.class_encoding import CLASS_TEMPLATE, separately_encoded
from diffusers_goca.class_order import is_stuff, prompt_orders
from diffusers_goca.functional.maps import weighted_labels
from diffusers_goca.presence import (
    class_regions,
    elimination_rounds,
    elimination_weights,
    kept_round,
    leave_one_out_gain,
    presence_weights,
)
from diffusers_goca.segmenting import encoded_latents
from diffusers_goca.testing import make_tiny_flux, make_tiny_pixart, make_tiny_sd, make_tiny_sd3, make_tiny_sdxl
from diffusers_goca.toyworld import (
    BACKGROUNDS,
    CLASS_NAMES,
    TOY_DIT_MODEL_DIR,
    load_toy_pipeline,
    make_scene,
    scene_seeds,
)

IMAGE = Image.fromarray((np.random.RandomState(5).rand(32, 32, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def toy():
    pipe = goca.from_pipe(load_toy_pipeline())
    yield pipe
    pipe.disable_goca()


def test_leave_one_out_gain_against_a_plain_loop():
    without, full = torch.tensor([[2.0, 3.0], [1.0, 1.5]]), torch.tensor([1.0, 2.0])
    expected = [np.mean([(2 - 1) / 1, (3 - 2) / 2]), np.mean([(1 - 1) / 1, (1.5 - 2) / 2])]
    assert torch.allclose(leave_one_out_gain(without, full), torch.tensor(expected, dtype=torch.float32))
    # error maps [K, S, h, w] read in each class's region, and over the whole image without regions
    g = torch.Generator().manual_seed(0)
    without, full, regions = (
        torch.rand(3, 2, 4, 5, generator=g),
        torch.rand(2, 4, 5, generator=g),
        torch.rand(3, 4, 5, generator=g),
    )
    plain = [
        np.mean(
            [float(((without[k, s] - full[s]) * regions[k]).sum() / (full[s] * regions[k]).sum()) for s in range(2)]
        )
        for k in range(3)
    ]
    whole = [np.mean([float(without[k, s].mean() / full[s].mean() - 1) for s in range(2)]) for k in range(3)]
    assert torch.allclose(leave_one_out_gain(without, full, regions), torch.tensor(plain, dtype=torch.float32))
    assert torch.allclose(leave_one_out_gain(without, full), torch.tensor(whole, dtype=torch.float32))


def test_class_regions_against_a_plain_loop():
    scores = torch.rand(2, 8, 12, generator=torch.Generator().manual_seed(0))
    regions = class_regions(scores, (2, 3))
    for k in range(2):
        normalised = (scores[k] - scores[k].min()) / (scores[k].max() - scores[k].min())
        for i in range(2):
            for j in range(3):
                cell = normalised[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                assert torch.isclose(regions[k, i, j], cell.mean())


def test_region_gains_keep_a_small_class_whole_image_gains_drop():
    """A made-up denoiser on a 2 × 2 latent grid: "cat" fills one cell and naming it halves the error there; the
    rest of the image (a surface that is not named) keeps a large error whatever the prompt. Over the whole image the
    cat's gain is under the threshold; in its region it is 1."""

    def forward(prompt, t, generator):
        return torch.tensor([[1.0 if "cat" in prompt else 2.0, 100.0], [100.0, 100.0]])

    regions = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    whole = elimination_rounds(forward, ["cat"], True, 0, timesteps=(100,), draws=1)
    local = elimination_rounds(forward, ["cat"], True, 0, timesteps=(100,), draws=1, regions=regions)
    assert torch.allclose(whole[0][1], torch.tensor([1 / 301])) and torch.allclose(local[0][1], torch.tensor([1.0]))
    assert elimination_weights(whole, ["cat"]).tolist() == [0.0] and elimination_weights(local, ["cat"]).item() > 0


def test_flux_error_map_is_the_error_on_the_latent_grid():
    pipe = goca.from_pipe(make_tiny_flux())
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 4, 6, 8, generator=g)
    pack = lambda x: pipe._pack_latents(x, 1, 4, 6, 8)  # noqa: E731
    expected = torch.nn.functional.avg_pool2d((a - b).pow(2).mean(1, keepdim=True), 2)[0, 0]
    assert pipe.goca_adapter.error_map_grid(a) == (3, 4)
    assert torch.allclose(pipe.goca_adapter.error_map(pack(a), pack(b), a), expected)


def test_presence_weights_and_weighted_labels_against_plain_loops():
    gains = torch.tensor([-0.1, 0.0, 0.03, 0.3])
    weights = presence_weights(gains, threshold=0.0, temperature=0.03)
    expected = [0.0, 0.0, 1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(-10.0))]
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float32))
    scores = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(0))
    labels = weighted_labels(scores, weights.tolist())
    for y in range(5):
        for x in range(6):
            best = max((weights[c] * scores[c, y, x], c) for c in range(4) if weights[c] > 0)[1]
            assert labels[y, x] == best
    assert torch.equal(weighted_labels(scores, [0.0] * 4), scores.argmax(0))  # every class absent: the plain argmax
    assert torch.equal(weighted_labels(scores, [0.0, 0.0, 0.0, 1.0]), torch.full((5, 6), 3))


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_pixart, make_tiny_flux], ids=["sd", "pixart", "flux"])
def test_presence_encodes_each_prompt_once(make, monkeypatch):
    """The presence test's 14 forwards per prompt share one encoding of it (T5 is the costly part on PixArt and
    Flux), and the presence gains are those of encoding at every forward."""
    pipe = goca.from_pipe(make())
    prompts = []
    encode = pipe.encode_prompt
    monkeypatch.setattr(
        pipe, "encode_prompt", lambda *a, **kw: prompts.append(a[0] if a else kw["prompt"]) or encode(*a, **kw)
    )
    kept = pipe.segment(IMAGE, ["cat", "grass", "dog"], presence=True, resolution=32)
    presence_prompts = prompts[1:]  # after the segmentation's forward, whose scores place each class
    assert len(presence_prompts) == len(set(presence_prompts)) == 7  # each of the elimination's 1 + K(K + 1)/2 once
    assert pipe.goca_adapter._encodings is None
    monkeypatch.setattr(type(pipe.goca_adapter), "encodings_kept", contextlib.nullcontext)
    prompts.clear()
    again = pipe.segment(IMAGE, ["cat", "grass", "dog"], presence=True, resolution=32)
    assert len(prompts) == 14 * len(presence_prompts) + 1 and again.presence == kept.presence


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_flux], ids=["sd", "flux"])
@pytest.mark.parametrize("background", [False, True], ids=["image", "regions"])
def test_segment_reads_the_gains_in_the_regions_with_a_background_channel(make, background):
    """The weights of `segment(..., presence=True)` restated from the public pieces: the elimination over the error
    maps of the adapter's forward, in each class's region (the first method's scores) where the background channel
    is on, over the whole image where it is off. Every class is kept (threshold −1), so each weight shows its gain:
    the random tiny models' gains are near 0, where the library's threshold would drop both classes on either path."""
    pipe = goca.from_pipe(make())
    classes = ["cat", "dog"]
    got = pipe.segment(
        IMAGE,
        classes,
        method=["vanilla", "goca"],
        presence=True,
        presence_threshold=-1.0,
        background=background,
        resolution=32,
    )
    adapter = pipe.goca_adapter
    latents = encoded_latents(pipe, IMAGE, 32, adapter)

    def weights(regions):
        rounds = elimination_rounds(
            lambda text, t, g: adapter.error_map(*adapter.segment_forward(latents, text, t, g), latents),
            classes,
            background,
            0,
            regions=regions,
        )
        return elimination_weights(rounds, classes, -1.0)

    regions = class_regions(got["vanilla"].scores[:2], adapter.error_map_grid(latents))
    expected = weights(regions if background else None)
    if background:
        assert not torch.equal(expected, weights(None))  # the regions change the gains
    for result in got.values():
        assert [result.presence[c] for c in classes] == expected.tolist()
        weights = expected.tolist() + [1.0] * background
        assert torch.equal(result.labels, weighted_labels(result.scores, weights))


def test_elimination_against_a_plain_loop():
    """A made-up denoiser whose error is a product of each named class's effect and a factor for how many classes the
    prompt names: "cat" is in the image, "dog" and "hat" are not, and three names lower the error by a fifth. Every
    gain of the first round is above 0, so stopping there would keep both absent classes; the whole path finds that
    the prompt naming "cat" alone explains the image best."""
    effect = {"cat": 0.7, "dog": 1.1, "hat": 1.2}

    def error(named):
        return float(np.prod([effect[c] for c in named])) * (0.8 if len(named) == 3 else 1.0)

    calls = []

    def forward(prompt, t, generator):
        named = [c for c in effect if c in prompt]
        calls.append(prompt)
        return torch.full((2, 2), error(named))

    def plain_gains(named):
        return [(error([n for n in named if n != c]) - error(named)) / error(named) for c in named]

    classes = ["cat", "dog", "hat"]
    rounds = elimination_rounds(forward, classes, False, 0, timesteps=(100, 500), draws=1)
    assert [named for named, _ in rounds] == [classes, ["cat", "dog"], ["cat"]]
    for named, gains in rounds:
        assert torch.allclose(gains, torch.tensor(plain_gains(named)))
    assert len(calls) == 2 * 7 and len(set(calls)) == 7  # 1 + K(K + 1)/2 prompts, each once
    assert bool((rounds[0][1] > 0).all())  # the first stop would keep "dog" and "hat"

    def plain_kept_round(threshold):
        path = [classes, ["cat", "dog"], ["cat"], []]
        phi = [sum(min(plain_gains(path[j])) - threshold for j in range(i)) for i in range(len(path))]
        return max(i for i in range(len(path)) if phi[i] == min(phi))

    for threshold, kept in ((-1.0, classes), (0.0, ["cat"]), (0.05, ["cat"]), (0.5, [])):
        assert kept_round(rounds, threshold) == plain_kept_round(threshold)
        weights = elimination_weights(rounds, classes, threshold)
        assert [c for c, w in zip(classes, weights.tolist()) if w > 0] == kept
        if kept:
            named, gains = rounds[kept_round(rounds, threshold)]
            assert bool((gains > threshold).all())
            assert torch.equal(weights[[classes.index(c) for c in named]], presence_weights(gains, threshold))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_segment_forward_returns_the_training_target(prediction_type):
    from diffusers import DDPMScheduler

    pipe = goca.from_pipe(make_tiny_sd())
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    adapter = pipe._goca.adapter
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    prediction, target = adapter.segment_forward(latents, "a cat", 500, torch.Generator().manual_seed(1))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    expected = (
        noise
        if prediction_type == "epsilon"
        else DDPMScheduler.from_config(pipe.scheduler.config).get_velocity(latents, noise, t)
    )
    assert prediction.shape == latents.shape and torch.equal(target, expected)


@pytest.mark.slow
def test_presence_test_tells_present_from_absent_classes_on_the_toy(toy):
    """Validation scenes (the split the threshold was chosen on is not the test split) with one absent world class
    named beside the present ones."""
    kept, rejected, n_present, n_absent = 0, 0, 0, 0
    for seed in scene_seeds("validation", 16, start=100):
        scene = make_scene(seed)
        rng = random.Random(seed)
        classes = scene.classes + rng.sample([c for c in CLASS_NAMES if c not in scene.classes], 1)
        absent = set(toy.segment(Image.fromarray(scene.image), classes, presence=True).absent)
        kept += len(set(scene.classes) - absent)
        rejected += len(absent - set(scene.classes))
        n_present += len(scene.classes)
        n_absent += 1
    # measured: 45 of 45 present classes kept, 15 of 16 absent ones rejected
    assert kept / n_present >= 0.85 and rejected / n_absent >= 0.5, (kept, n_present, rejected, n_absent)


@pytest.mark.slow
def test_presence_keeps_scores_and_handles_every_class_absent(toy, caplog):
    scene = make_scene(scene_seeds("validation", 1)[0])
    image = Image.fromarray(scene.image)
    plain = toy.segment(image, scene.classes)
    with caplog.at_level(logging.WARNING, logger="diffusers_goca"):
        off = toy.segment(image, scene.classes, presence=True, presence_threshold=1e9)
    assert off.absent == scene.classes and "judged every class absent" in caplog.text
    assert torch.equal(off.scores, plain.scores) and torch.equal(off.labels, plain.labels)  # the plain argmax
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusers_goca"):
        bg = toy.segment(image, scene.classes, presence=True, presence_threshold=1e9, background=True)
    assert "all pixels are background" in caplog.text
    assert bg.classes[-1] == "background" and bool((bg.labels == len(scene.classes)).all())
    assert bg.scores.shape[0] == len(scene.classes) + 1  # a dropped class keeps its scores
    kept = toy.segment(image, scene.classes, presence=True, presence_threshold=-1e9)
    assert kept.absent == [] and set(kept.presence) == set(scene.classes)
    weights = [kept.presence[c] for c in scene.classes]
    assert all(0 < w < 1 for w in weights)  # every class kept, each map weighted by its gain
    assert torch.equal(kept.scores, plain.scores) and torch.equal(kept.labels, weighted_labels(plain.scores, weights))
    with pytest.raises(ValueError, match="presence_threshold must be a finite number"):
        toy.segment(image, scene.classes, presence=True, presence_threshold=float("nan"))


def test_protocol_classes():
    scene = next(make_scene(s) for s in scene_seeds("validation", 50) if len(make_scene(s).classes) >= 3)
    rng = random.Random(0)
    assert protocol_classes(scene, "oracle", rng) == (scene.classes, False)
    shuffled, bg = protocol_classes(scene, "shuffled", rng)
    assert sorted(shuffled) == sorted(scene.classes) and not bg
    with_two, _ = protocol_classes(scene, "distractors-2", rng)
    assert len(with_two) == len(scene.classes) + 2 and set(scene.classes) < set(with_two)
    objects, bg = protocol_classes(scene, "objects-only", rng)
    assert bg and objects and not set(objects) & set(BACKGROUNDS)


# Measured on the shipped toy (24 test scenes, presence off): goca oracle 47.6, shuffled 28.5 (61.7 % order
# agreement), distractors-1 24.0, distractors-2 15.8 (absent classes take 31.8 % of the pixels), objects-only 18.4;
# docs/protocols.md has 100 scenes. The floors hold today's behaviour: the targets of a trustworthy default are not met.
PROTOCOL_FLOORS = {"oracle": 40, "shuffled": 24, "distractors-1": 18, "distractors-2": 12, "objects-only": 15}


@pytest.mark.slow
def test_protocol_floors_on_the_shipped_toy(toy, monkeypatch):
    named = []
    segment = toy.segment
    monkeypatch.setattr(
        toy, "segment", lambda image, classes, **kw: named.append(list(classes)) or segment(image, classes, **kw)
    )
    result = evaluate_protocols(toy, n=24, methods=("goca", "vanilla"), progress=False)
    runs = len(PROTOCOLS) + 1  # distractors-2 twice, in two orders of the same classes
    assert len(named) == 24 * runs
    for scene in range(24):
        calls = named[scene * runs : (scene + 1) * runs]
        assert sorted(calls[-1]) == sorted(calls[PROTOCOLS.index("distractors-2")])
        assert sorted(calls[PROTOCOLS.index("shuffled")]) == sorted(calls[PROTOCOLS.index("oracle")])
    table = result["table"]
    assert set(table) == set(PROTOCOLS)
    for protocol, floor in PROTOCOL_FLOORS.items():
        assert table[protocol]["goca"]["miou"] >= floor, (protocol, table[protocol])
    assert table["oracle"]["goca"]["absent_share"] == 0 and table["distractors-2"]["goca"]["absent_share"] > 0
    assert 0 < table["shuffled"]["goca"]["agreement"] < 100


# Measured on the shipped toy (8 test scenes, two absent classes named, goca): without the presence test mIoU 18.7,
# absent classes 37.0 % of the pixels; with it 29.6 and 0.4 % (docs/protocols.md has 100 scenes).
@pytest.mark.slow
def test_presence_floors_with_two_distractors_on_the_shipped_toy(toy):
    off, on = (
        evaluate_protocols(toy, n=8, methods=("goca",), protocols=("distractors-2",), progress=False, presence=p)[
            "table"
        ]["distractors-2"]["goca"]
        for p in (False, True)
    )
    assert off["absent_share"] > 20 and on["absent_share"] < 5, (off, on)
    assert on["miou"] >= off["miou"] + 8, (off, on)


# Measured on the shipped PixArt-layout toy (8 test scenes, the objects alone named, the background channel on, goca):
# without the presence test mIoU 55.3, with it 59.1 (docs/protocols.md has 40 scenes: 56.5 and 60.9). Over the whole
# image the gains dropped objects that are there; in their regions they keep them.
@pytest.mark.slow
def test_presence_keeps_the_objects_with_a_background_channel_on_the_transformer_toy():
    pipe = goca.from_pipe(load_toy_pipeline(TOY_DIT_MODEL_DIR))
    off, on = (
        evaluate_protocols(pipe, n=8, methods=("goca",), protocols=("objects-only",), progress=False, presence=p)[
            "table"
        ]["objects-only"]["goca"]["miou"]
        for p in (False, True)
    )
    assert on >= off + 2, (off, on)


# Measured on the shipped toy (8 test scenes, goca): class_order="stuff-first" reads 52.1 with the scene's classes in
# its order and shuffled alike (the order given: 51.3 and 33.8), two orders agree on every pixel; with presence=True
# too, two absent classes named: 33.0 mIoU, 0.0 % of the pixels to them (docs/protocols.md has 100 scenes).
@pytest.mark.slow
def test_stuff_first_floors_on_the_shipped_toy(toy):
    alone, with_presence = (
        evaluate_protocols(
            toy,
            n=8,
            methods=("goca",),
            protocols=("shuffled", "distractors-2"),
            progress=False,
            class_order="stuff-first",
            presence=presence,
        )["table"]
        for presence in (False, True)
    )
    shuffled, distractors = alone["shuffled"]["goca"], with_presence["distractors-2"]["goca"]
    assert shuffled["agreement"] == 100 and distractors["agreement"] == 100
    assert shuffled["miou"] >= 45, shuffled
    assert distractors["miou"] >= 28 and distractors["absent_share"] < 5, distractors


@pytest.mark.parametrize("make", [make_tiny_sd3, make_tiny_flux], ids=["sd3", "flux"])
def test_generation_background_without_the_word_reads_a_side_forward_on_joint_attention(make):
    """A joint block's text keys come from the text stream of the block before, so a word outside the prompt has
    none: the masks of a wanted step come from a side forward of that step's inputs (the conditional rows) on the
    prompt with the word added, as segment(..., background=True) words it. Restated here from the recorded inputs;
    the images stay those of the plain call."""
    from diffusers_goca.capture_request import kept_columns
    from diffusers_goca.step_results import step_segmentations

    base = make()
    cfg = make is make_tiny_sd3  # SD3 batches [uncond, cond]; the tiny Flux runs one conditional row

    def call(pipe, **kw):
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a cat on grass",
            num_inference_steps=2,
            height=32,
            width=32,
            guidance_scale=4.0 if cfg else 3.5,
            output_type="np",
            generator=generator,
            **kw,
        )

    plain = call(base).images
    pipe = goca.from_pipe(base)
    recorded = []

    def record(module, args, kwargs):
        if len(recorded) < 2:
            recorded.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    images = call(pipe, goca_masks=[1], goca_background=True).images
    handle.remove()
    assert np.array_equal(images, plain)
    (masks,) = pipe.goca_masks
    (result,) = masks.results
    assert result.classes == ["cat", "grass", "background"]

    adapter = pipe.goca_adapter
    text = "a cat on grass, background"
    encoding = adapter.encode_segment_prompt(text, "cpu")
    inputs = recorded[1]  # step 1's forward
    cond = slice(1, 2) if cfg else slice(0, 1)
    side = {
        **inputs,
        "hidden_states": inputs["hidden_states"][cond],
        "timestep": inputs["timestep"][cond],
        "encoder_hidden_states": encoding[0],
        "pooled_projections": encoding[1],
    }
    if not cfg:
        side["txt_ids"] = encoding[2]
        if inputs.get("guidance") is not None:
            side["guidance"] = inputs["guidance"][cond]
    index = adapter.token_index(text, ["cat", "grass"], ["background"])
    with torch.no_grad():
        step = pipe.capture_forward(lambda: pipe.transformer(**side), 1, kept_columns(adapter, [index]))
    (expected,) = step_segmentations(adapter, step, [index], "goca", "background", 0.0, {})
    assert torch.allclose(result.scores, expected.scores, atol=1e-5)
    assert result.scores[2].std() > 0


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_sdxl, make_tiny_pixart], ids=["sd", "sdxl", "pixart"])
def test_generation_background_without_the_word_keeps_the_images(make):
    """Cross-attention families: the word's keys are appended on the side path only; the images stay bit-identical
    and the masks get the channel, as `segment(..., background=True)` has it."""
    base = make()
    size = {} if make is make_tiny_pixart else dict(height=32, width=32)
    if make is make_tiny_pixart:
        size = dict(height=8 * base.transformer.config.sample_size, width=8 * base.transformer.config.sample_size)
        size["use_resolution_binning"] = False

    def call(pipe, **kw):
        generator = torch.Generator().manual_seed(0)
        return pipe("a cat on grass", num_inference_steps=2, output_type="np", generator=generator, **size, **kw)

    plain = call(base).images
    pipe = goca.from_pipe(base)
    assert np.array_equal(call(pipe, goca_masks="last", goca_background=True).images, plain)
    (result,) = pipe.goca_masks[0].results
    assert result.classes == ["cat", "grass", "background"] and result.scores.shape[0] == 3


def test_background_keys_are_the_words_keys_after_the_prompts():
    """On the side path a cross layer's maps are over [the prompt's keys; the word's keys]: the first cross layer's
    maps equal those of a forward whose text really is the prompt's states followed by the word's (the later layers
    see other hidden states there, so only the first can be compared), and the denoiser's output is the plain one."""
    from diffusers_goca.capture_request import CaptureRequest

    pipe = goca.from_pipe(make_tiny_sd())
    adapter = pipe.goca_adapter
    word = adapter.word_states("background")
    text = adapter.segment_text("background")
    at = adapter.token_index(text, ["background"]).class_tokens[0]
    assert torch.equal(word, pipe.encode_prompt(text, "cpu", 1, False)[0][:, at])
    prompt = adapter.cross_text_states("a cat")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def forward(states, extra):
        request = CaptureRequest(wants=lambda i: True, n_images=1, keep_capture=True, extra_text=extra)
        with torch.no_grad(), pipe._goca.serving(request):
            out = pipe.unet(latents, 500, encoder_hidden_states=states).sample
        return out, request.captured[0]

    out, side = forward(prompt, word)
    _, joined = forward(torch.cat([prompt, word], 1), None)
    with torch.no_grad():
        assert torch.equal(out, pipe.unet(latents, 500, encoder_hidden_states=prompt).sample)
    first = adapter.cross_layers[0]
    maps = side.cross[first]["average"]
    assert maps.shape[-1] == prompt.shape[1] + word.shape[1]
    assert torch.allclose(maps, joined.cross[first]["average"], atol=1e-6)


def test_segment_has_no_background_channel_by_default(toy):
    assert toy.segment(IMAGE, ["red circle", "grass"]).classes == ["red circle", "grass"]


@pytest.mark.parametrize(
    "make", [make_tiny_sdxl, make_tiny_pixart, make_tiny_sd3, make_tiny_flux], ids=["sdxl", "pixart", "sd3", "flux"]
)
def test_separate_class_encoding_gives_each_class_its_own_states(make):
    """Under `separately_encoded`, every text encoder of the pipeline (CLIP, both of SDXL's, T5) returns at a class's
    tokens, in every layer's states, what it returns for the class alone in CLASS_TEMPLATE, whatever the order."""
    pipe = make()
    pairs = [
        (getattr(pipe, f"text_encoder{s}"), getattr(pipe, f"tokenizer{s}"))
        for s in ("", "_2", "_3")
        if getattr(pipe, f"text_encoder{s}", None) is not None
    ]
    for encoder, tokenizer in pairs:
        special = set(tokenizer.all_special_ids)
        grass = [t for t in tokenizer("grass").input_ids if t not in special]
        phrase = tokenizer(CLASS_TEMPLATE.format("grass"), return_tensors="pt").input_ids
        start = next(i for i in range(phrase.shape[1]) if phrase[0, i : i + len(grass)].tolist() == grass)
        with torch.no_grad():
            alone = encoder(phrase, output_hidden_states=True).hidden_states[-2][0, start : start + len(grass)]
            seen = []
            for prompt in ("cat, grass", "grass, cat"):
                ids = tokenizer(prompt, return_tensors="pt").input_ids
                at = next(i for i in range(ids.shape[1]) if ids[0, i : i + len(grass)].tolist() == grass)
                with separately_encoded(pipe, ["cat", "grass"]) as missing:
                    out = encoder(ids, output_hidden_states=True)
                assert not missing
                seen.append(out.hidden_states[-2][0, at : at + len(grass)])
                plain = encoder(ids, output_hidden_states=True).hidden_states[-2][0, at : at + len(grass)]
        assert torch.equal(seen[0], alone) and torch.equal(seen[1], alone)
        assert not torch.equal(plain, alone)  # the hooks are gone after the block


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(make_tiny_sd, marks=pytest.mark.slow),
        make_tiny_sdxl,
        make_tiny_pixart,
        make_tiny_sd3,
        make_tiny_flux,
    ],
    ids=["sd", "sdxl", "pixart", "sd3", "flux"],
)
def test_segment_with_separate_class_encoding(make):
    pipe = goca.from_pipe(make())
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    hooks_before = [len(m._forward_hooks) for m in encoders]
    plain = pipe.segment(IMAGE, ["cat", "grass"], resolution=32)
    separate = pipe.segment(IMAGE, ["cat", "grass"], resolution=32, class_encoding="separate")
    assert separate.scores.shape == plain.scores.shape and not torch.equal(separate.scores, plain.scores)
    assert [len(m._forward_hooks) for m in encoders] == hooks_before
    with pytest.raises(ValueError, match="class_encoding must be one of"):
        pipe.segment(IMAGE, ["cat"], resolution=32, class_encoding="alone")


def test_separate_class_encoding_makes_orders_agree_on_the_toy(toy):
    """Measured on 40 validation scenes: two random orders agree on 57.2 % of the pixels with the prompt's encoding
    and on 94.1 % with each class encoded alone."""
    same = total = 0
    for seed in scene_seeds("validation", 12, start=200):
        scene = make_scene(seed)
        rng = random.Random(seed)
        image = Image.fromarray(scene.image)
        labels = []
        for _ in range(2):
            order = rng.sample(scene.classes, len(scene.classes))
            result = toy.segment(image, order, class_encoding="separate")
            labels.append(torch.tensor([CLASS_NAMES.index(c) for c in order])[result.labels])
        same += int((labels[0] == labels[1]).sum())
        total += labels[0].numel()
    assert same / total >= 0.9, same / total


def test_stuff_words_and_the_prompt_orders():
    assert [c for c in ["blue sky", "stone walls", "Trees", "sandy beach", "grass"] if not is_stuff(c)] == []
    assert [c for c in ["rock star", "sandwich", "cat", "red car", "skyline painting", ""] if is_stuff(c)] == []
    classes = ["purple circle", "sand", "Black square", "sky"]
    assert prompt_orders(classes, "given") == [classes]
    assert prompt_orders(classes, "stuff-first") == [
        ["sand", "sky", "Black square", "purple circle"],
        ["sand", "sky", "purple circle", "Black square"],
    ]
    three = prompt_orders(["c", "wall", "a", "b"], "stuff-first")
    assert three[0] == ["wall", "a", "b", "c"]
    assert sorted(map(tuple, three)) == sorted(("wall", *p) for p in itertools.permutations("abc"))
    four = prompt_orders(list("dcba"), "stuff-first")
    assert len(four) == 8 and len({tuple(o) for o in four}) == 8
    assert all(sorted(o[place] for o in four) == sorted("abcd" * 2) for place in range(4))  # each twice in each place
    assert prompt_orders(["cat"], "stuff-first") == [["cat"]]
    rng = random.Random(0)
    for _ in range(5):
        assert prompt_orders(rng.sample(classes, 4), "stuff-first") == prompt_orders(classes, "stuff-first")
    with pytest.raises(ValueError, match="class_order must be one of"):
        prompt_orders(classes, "largest-first")


def _by_name(result):
    """The labels as class names' ids in the world, and each class's scores by name: comparable across orders."""
    ids = torch.tensor([CLASS_NAMES.index(c) if c in CLASS_NAMES else -1 for c in result.classes])
    return ids[result.labels], dict(zip(result.classes, result.scores))


def test_stuff_first_order_does_not_depend_on_the_order_given(toy):
    """Two orders of the same classes give the same segmentation: each class's scores averaged over the
    segmentations with the classes given in each of `prompt_orders`' orders, the labels their argmax; the rows and
    labels in the caller's order."""
    scene = next(make_scene(s) for s in scene_seeds("validation", 50) if len(make_scene(s).classes) >= 3)
    image = Image.fromarray(scene.image)
    classes = scene.classes[::-1] + [c for c in CLASS_NAMES if c not in scene.classes + list(BACKGROUNDS)][:1]
    first = toy.segment(image, classes, class_order="stuff-first", method=["goca", "vanilla"])
    second = toy.segment(image, classes[::-1], class_order="stuff-first", method=["goca", "vanilla"])
    orders = prompt_orders(classes, "stuff-first")
    assert orders[0][0] == scene.background and len(orders) == 6
    runs = [toy.segment(image, order, method=["goca", "vanilla"]) for order in orders]
    for m in ("goca", "vanilla"):
        assert first[m].classes == classes and second[m].classes == classes[::-1]
        scores = torch.stack(
            [torch.stack([run[m].scores[order.index(c)] for c in classes]) for run, order in zip(runs, orders)]
        )
        scores = scores.mean(0)
        expected = torch.tensor([CLASS_NAMES.index(c) for c in classes])[scores.argmax(0)]
        for got in (first[m], second[m]):
            labels, by_name = _by_name(got)
            assert torch.equal(labels, expected)
            assert all(torch.equal(by_name[c], scores[k]) for k, c in enumerate(classes))
    assert not torch.equal(_by_name(toy.segment(image, classes))[0], _by_name(first["goca"])[0])


def test_cli_passes_presence_class_encoding_and_order_to_segment(toy, tmp_path, capsys):
    """`goca segment --presence --class-encoding separate --class-order stuff-first` prints what `segment` with those
    arguments gives: the classes it judges absent, the others' shares."""
    from diffusers_goca.cli import main

    for seed in scene_seeds("validation", 8):  # a scene where the test rules out one of two added absent classes
        scene = make_scene(seed)
        absent = random.Random(seed).sample([c for c in CLASS_NAMES if c not in scene.classes], 2)
        classes = list(scene.classes) + absent
        expected = toy.segment(
            scene.image, classes, presence=True, class_encoding="separate", class_order="stuff-first"
        )
        if expected.absent:
            break
    assert expected.absent, "no validation scene where the presence test rules out a class"
    image = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(image)
    capsys.readouterr()
    args = ["segment", str(image), "--classes", ",".join(classes), "--out", str(tmp_path / "o.png")]
    assert main([*args, "--presence", "--class-encoding", "separate", "--class-order", "stuff-first"]) == 0
    lines = {
        line.split(":")[0].strip(): line.split(":")[1].strip() for line in capsys.readouterr().out.splitlines()[1:]
    }
    for k, name in enumerate(classes):
        share = 100.0 * (expected.labels == k).sum().item() / expected.labels.numel()
        assert lines[name] == ("judged absent" if name in expected.absent else f"{share:5.1f}% of pixels".strip())
