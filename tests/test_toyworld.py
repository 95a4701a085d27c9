"""The toy world: deterministic scenes, the shipped model, and segmentation quality measured on held-out scenes."""

import numpy as np
import pytest
import torch

import diffusers_goca as goca
from diffusers_goca.loading import dtype_kwargs
from diffusers_goca.testing import restoring
from diffusers_goca.toyworld import (
    BACKGROUNDS,
    CLASS_NAMES,
    TOY_DIT_MODEL_DIR,
    TOY_MODEL_DIR,
    load_toy_pipeline,
    make_scene,
    scene_seeds,
)
from diffusers_goca.toyworld.evaluate import evaluate_segmentation

# Measured on the shipped model (60 held-out scenes, t = 100, seed 0): goca 0.414, vanilla 0.367, all-background 0.201.
GOCA_FLOOR = 0.37
# Measured on the shipped transformer toy (PixArt layout; 40 held-out scenes, t = 100, seed 0): goca 0.564, vanilla
# 0.583, all-background 0.199. GoCA does not beat vanilla there (docs/toy_families.md says why): the floors hold both.
DIT_GOCA_FLOOR, DIT_VANILLA_FLOOR = 0.53, 0.55


def test_scenes_are_deterministic_and_splits_disjoint():
    a, b = make_scene(123), make_scene(123)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels) and a.caption == b.caption
    assert set(scene_seeds("train", 1000)).isdisjoint(scene_seeds("test", 1000))
    for s in scene_seeds("test", 50):
        scene = make_scene(s)
        present = {CLASS_NAMES[i] for i in np.unique(scene.labels)}
        assert present == set(scene.classes)
        assert scene.background in scene.caption and all(o in scene.caption for o in scene.objects)


@pytest.fixture(scope="module")
def shared_toy():
    pipe = load_toy_pipeline(pipeline_class=goca.GoCAStableDiffusionPipeline)
    pipe.enable_goca()
    yield pipe
    pipe.disable_goca()


@pytest.fixture
def toy(shared_toy):
    """The module's toy pipeline, GoCA enabled, put back as it was after each test (another pipeline made from it
    with `from_pipe` wraps and hooks its UNet)."""
    with restoring(shared_toy):
        yield shared_toy


def test_colour_labels_read_the_ground_truth_of_real_scenes():
    """Reading a scene off its colours (what the benchmarks do with generated toy images) gives its pixel ground truth
    where the objects' colours differ."""
    from diffusers_goca.toyworld.scenes import colour_labels, make_scene, scene_seeds

    agreement = []
    for seed in scene_seeds("test", 60):
        scene = make_scene(seed)
        objects = scene.classes[1:]
        if len({c.split()[0] for c in objects}) < len(objects):
            continue
        world = np.array([CLASS_NAMES.index(c) for c in scene.classes])
        agreement.append(
            (world[colour_labels(scene.image / 255.0, [c.split()[0] for c in objects])] == scene.labels).mean()
        )
    assert len(agreement) > 30 and np.mean(agreement) > 0.98


def test_loads_with_the_stock_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR, **dtype_kwargs(torch.float32))
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]  # the real CLIP ids
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def _background_means():
    means = {b: [] for b in BACKGROUNDS}
    for s in scene_seeds("train", 200):
        sc = make_scene(s)
        mask = sc.labels == CLASS_NAMES.index(sc.background)
        means[sc.background].append(sc.image[mask].mean(0))
    return {b: np.mean(v, 0) for b, v in means.items()}


@pytest.mark.slow
def test_generated_background_matches_caption(toy):
    means = _background_means()
    captions = [
        f"a {c} {s} on {b}"
        for b, c, s in zip(
            BACKGROUNDS * 2,
            ["red", "yellow", "white", "black", "purple"] * 2,
            ["circle", "square", "triangle", "circle", "square"] * 2,
        )
    ]
    images = toy(
        captions,
        num_inference_steps=20,
        guidance_scale=4.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    hits = 0
    for caption, img in zip(captions, images):
        border = (
            np.concatenate(
                [img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3), img[:, -3:].reshape(-1, 3)]
            )
            * 255
        )
        colour = np.median(border, 0)
        guess = min(means, key=lambda b: np.linalg.norm(means[b] - colour))
        hits += caption.endswith(guess)
    assert hits >= 7, f"only {hits}/10 generated backgrounds match their caption"


@pytest.mark.slow
def test_goca_miou_floor_on_held_out_scenes(toy):
    report = evaluate_segmentation(toy, n=60, methods=("goca", "vanilla"), progress=False)
    table = report["miou"]
    assert table["goca"] >= GOCA_FLOOR, table
    assert table["goca"] > table["vanilla"], table
    assert table["goca"] > table["all-background"] + 0.1, table


def test_transformer_toy_loads_with_the_stock_pipeline_and_generates():
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(TOY_DIT_MODEL_DIR)  # no dtype: as any diffusers user loads a folder
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a red circle, grass").input_ids) == [
        "▁a",
        "▁red",
        "▁circle",
        ",",
        "▁grass",
        "</s>",
    ]
    image = pipe(
        "a red circle on grass",
        num_inference_steps=2,
        height=32,
        width=32,
        use_resolution_binning=False,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("arch", ["sd", "pixart", "sd3", "flux"])
def test_training_saves_a_pipeline_that_loads_generates_and_segments(arch, tmp_path):
    """Ten steps of each layout's training: the folder loads with its stock pipeline, decodes an image and segments."""
    from diffusers_goca.toyworld import train

    out = str(tmp_path / arch)
    train.main(
        ["--out", out, "--arch", arch, "--blocks", "3", "--steps", "10", "--batch", "2", "--n-scenes", "4"]
        + ["--vae-from", TOY_MODEL_DIR, "--threads", "1"]
    )
    pipe = goca.from_pipe(load_toy_pipeline(out))
    kwargs = {"use_resolution_binning": False} if arch == "pixart" else {}
    image = pipe(
        "a red circle on grass",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    scene = make_scene(scene_seeds("test", 1)[0])
    result = pipe.segment(scene.image, scene.classes)
    assert result.labels.shape == (32, 32) and result.classes == list(scene.classes)


@pytest.mark.slow
def test_transformer_toy_miou_floors_on_held_out_scenes():
    pipe = goca.from_pipe(load_toy_pipeline(TOY_DIT_MODEL_DIR))
    table = evaluate_segmentation(pipe, n=40, methods=("goca", "vanilla"), timestep=None, progress=False)["miou"]
    assert table["goca"] >= DIT_GOCA_FLOOR and table["vanilla"] >= DIT_VANILLA_FLOOR, table
    assert table["goca"] > table["all-background"] + 0.3, table


@pytest.mark.slow
def test_scfg_runs_on_the_toy_model_with_both_segmenters(toy):
    pipe = goca.scfg_from_pipe(toy)
    captions = ["a red circle and a white square on grass", "sky with a yellow triangle"]

    def sample(**kw):
        return pipe(
            captions,
            num_inference_steps=15,
            guidance_scale=5.0,
            output_type="np",
            generator=torch.Generator().manual_seed(1),
            **kw,
        ).images

    cfg = sample(scfg=False)
    assert np.array_equal(
        cfg,
        toy(
            captions,
            num_inference_steps=15,
            guidance_scale=5.0,
            output_type="np",
            generator=torch.Generator().manual_seed(1),
        ).images,
    )
    for segmentor in ("goca", "original"):
        images = sample(segmentor=segmentor, scfg_keep_maps=True)
        assert np.isfinite(images).all() and np.abs(images - cfg).mean() > 1e-3, segmentor
        rates = torch.stack([m.rates for m in pipe.scfg_maps])
        assert rates.min() >= 0.8 - 1e-5 and rates.max() <= 3.0 + 1e-5 and rates.std() > 0


@pytest.mark.slow
def test_examples_run_on_the_toy_model(tmp_path):
    """The two example scripts, with their defaults (the toy model), write what they say; generation also on the
    transformer toy, whose pipeline bins sizes unless told not to."""
    import runpy

    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"
    segment = runpy.run_path(str(root / "segment_image.py"))["main"]
    results = segment(["--out", str(tmp_path / "seg")])
    assert {"goca", "vanilla", "iseg"} <= set(results) and (tmp_path / "seg" / "goca.png").exists()
    generate = runpy.run_path(str(root / "generate_with_masks.py"))["main"]
    cfg, scfg = generate(["--steps", "4", "--out", str(tmp_path / "gen")])
    assert cfg.size == scfg.size and (tmp_path / "gen" / "scfg_maps.gif").exists()
    cfg, scfg = generate(["--steps", "4", "--model", TOY_DIT_MODEL_DIR, "--out", str(tmp_path / "dit")])
    assert cfg.size == scfg.size == (32, 32) and (tmp_path / "dit" / "scfg_maps.gif").exists()
