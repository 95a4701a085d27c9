"""COCO-30k benchmark: the Fréchet distance against a slow reference, CLIP score with a tiny local open_clip model,
caption sampling, and the whole run on the toy model with tiny feature extractors: resume and sharding."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_goca.bench.coco30k import load_captions, parse_args, run
from diffusers_goca.bench.generation import (
    ClipScorer,
    feature_statistics,
    folder_features,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from diffusers_goca.toyworld import TOY_DIT_MODEL_DIR


def _slow_frechet(mu1, s1, mu2, s2):
    """With an explicit square root of the (non-symmetric) product from its eigen-decomposition."""
    w, v = np.linalg.eig(s1 @ s2)
    root = (v * np.sqrt(w.astype(complex))) @ np.linalg.inv(v)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def test_frechet_distance_matches_a_slow_reference():
    rng = np.random.RandomState(0)
    a, b = rng.randn(200, 5), rng.randn(150, 5) @ rng.randn(5, 5) + 0.5
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_slow_frechet(mu1, s1, mu2, s2), rel=1e-8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    # 1-D closed form: (μ1 − μ2)² + (σ1 − σ2)²
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_statistics_file_round_trip(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    save_statistics(tmp_path / "ref.npz", mu, sigma)
    m, s = load_statistics(tmp_path / "ref.npz")
    assert np.array_equal(m, mu) and np.array_equal(s, sigma)


def tiny_clip(tmp_path):
    """A tiny open_clip model with random weights, saved and loaded back as a local checkpoint."""
    import open_clip

    torch.manual_seed(0)
    cfg = dict(
        embed_dim=16,
        vision_cfg=dict(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "cfg" / "tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    model = open_clip.create_model("tiny-clip")
    torch.save(model.state_dict(), tmp_path / "tiny-clip.pt")
    return ClipScorer.load("tiny-clip", str(tmp_path / "tiny-clip.pt"))


def test_clip_score_is_100_cosine(tmp_path):
    scorer = tiny_clip(tmp_path)
    images = [Image.fromarray((np.random.RandomState(i).rand(32, 32, 3) * 255).astype(np.uint8)) for i in range(3)]
    captions = ["a red circle", "a cat on grass", "a blue square on sand"]
    scores = scorer.score(images, captions)
    assert len(scores) == 3 and all(0 <= s <= 100 for s in scores)
    with torch.no_grad():
        i = scorer.model.encode_image(scorer.preprocess(images[1])[None])[0]
        t = scorer.model.encode_text(scorer.tokenizer([captions[1]]))[0]
    assert scores[1] == pytest.approx(max(0.0, 100 * float(torch.cosine_similarity(i, t, dim=0))), abs=1e-4)


def test_caption_sampling(tmp_path):
    data = {
        "annotations": [
            {"id": 10 + i, "image_id": img, "caption": f"caption {img} {i}"}
            for i, img in enumerate([5, 3, 5, 9, 3, 7, 1])
        ]
    }
    (tmp_path / "captions_val2014.json").write_text(json.dumps(data))
    picked = load_captions(tmp_path / "captions_val2014.json", n=3, seed=1)
    assert picked == load_captions(tmp_path / "captions_val2014.json", n=3, seed=1)  # deterministic
    assert len(picked) == 3 and len({i for i, _ in picked}) == 3
    first = {"5": "caption 5 0", "3": "caption 3 1", "9": "caption 9 3", "7": "caption 7 5", "1": "caption 1 6"}
    assert all(first[i] == c for i, c in picked)  # each image's first caption
    assert len(load_captions(tmp_path / "captions_val2014.json", n=100)) == 5
    (tmp_path / "30k.csv").write_text("image_id,text\n521669,Someone holding a phone.\n116361,people at a meeting\n")
    assert load_captions(tmp_path / "30k.csv", n=1) == [("521669", "Someone holding a phone.")]


def tiny_extractor(images):
    """A fixed random conv net: images → 6 features."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
    x = torch.stack(
        [torch.from_numpy(np.asarray(i.resize((32, 32)), np.float32) / 255).permute(2, 0, 1) for i in images]
    )
    with torch.no_grad():
        return net(x).flatten(1).numpy()


@pytest.fixture(scope="module")
def toy_scfg():
    import diffusers_goca as goca
    from diffusers_goca.toyworld import load_toy_pipeline

    return goca.scfg_from_pipe(load_toy_pipeline())


@pytest.mark.slow
def test_end_to_end_on_the_toy_model_resumes_and_shards(toy_scfg, tmp_path):
    from diffusers_goca.toyworld.scenes import make_scene, scene_seeds

    ref = tmp_path / "reference"
    ref.mkdir()
    for s in scene_seeds("test", 6, start=500):
        Image.fromarray(make_scene(s).image).save(ref / f"{s}.png")
    scorer = tiny_clip(tmp_path)
    argv = [
        "--toy",
        "--limit",
        "3",
        "--steps",
        "4",
        "--configs",
        "cfg,goca-scfg",
        "--scales",
        "4",
        "--fid-ref",
        str(ref),
    ]
    calls = {"n": 0}
    original = type(toy_scfg).__call__

    def counting(self, *a, **kw):
        calls["n"] += 1
        return original(self, *a, **kw)

    summary = run(
        parse_args(argv + ["--out", str(tmp_path / "one")]),
        pipe=toy_scfg,
        clip=scorer,
        extractor=tiny_extractor,
        progress=False,
    )
    rows = {r["config"]: r for r in summary["rows"]}
    assert set(rows) == {"cfg", "goca-scfg"} and all(r["images"] == 3 for r in rows.values())
    assert all(r["fid"] is not None and r["fid"] >= 0 and 0 <= r["clip"] <= 100 for r in rows.values())
    assert len(list((tmp_path / "one" / "images" / "cfg-w4").glob("*.png"))) == 3
    cfg_img = np.asarray(Image.open(next((tmp_path / "one" / "images" / "cfg-w4").glob("*.png"))))
    goca_img = np.asarray(Image.open(next((tmp_path / "one" / "images" / "goca-scfg-w4").glob("*.png"))))
    assert not np.array_equal(cfg_img, goca_img)  # S-CFG changes the image from the same noise
    assert (tmp_path / "one" / "table.md").read_text().startswith("| config |")
    type(toy_scfg).__call__ = counting
    try:
        again = run(
            parse_args(argv + ["--out", str(tmp_path / "one")]),
            pipe=toy_scfg,
            clip=scorer,
            extractor=tiny_extractor,
            progress=False,
        )
        assert calls["n"] == 0 and again["rows"] == summary["rows"]  # resumed: nothing generated again
        for shard in ("1/2", "0/2"):  # the main shard (0) merges, so it runs last here
            two = run(
                parse_args(argv + ["--out", str(tmp_path / "two"), "--shard", shard]),
                pipe=toy_scfg,
                clip=scorer,
                extractor=tiny_extractor,
                progress=False,
            )
    finally:
        type(toy_scfg).__call__ = original
    assert calls["n"] == 6
    for a, b in zip(summary["rows"], two["rows"]):
        assert (
            a["images"] == b["images"] and a["clip"] == pytest.approx(b["clip"]) and a["fid"] == pytest.approx(b["fid"])
        )
    assert len(folder_features(tmp_path / "two" / "images" / "cfg-w4", tiny_extractor, progress=False)) == 3


def test_toy_classifier_reads_held_out_scenes_and_their_captions():
    """The shipped toy classifier (the toy FID's features and the toy caption score) on real held-out scenes."""
    from diffusers_goca.toyworld.classifier import ToySceneScorer, caption_contents, load_classifier, measure
    from diffusers_goca.toyworld.scenes import make_scene, scene_seeds

    accuracy = measure(load_classifier(), scene_seeds("validation", 300))
    assert accuracy["background"] >= 0.98 and accuracy["object presence (per class)"] >= 0.95, accuracy
    assert caption_contents("a red circle and a red circle, sand") == ("sand", ["red circle"], 2)
    scorer = ToySceneScorer()
    scenes = [make_scene(s) for s in scene_seeds("validation", 40, start=300)]
    images = [Image.fromarray(s.image) for s in scenes]
    own = scorer.score(images, [s.caption for s in scenes])
    swapped = scorer.score(images, [s.caption for s in scenes[1:] + scenes[:1]])
    assert np.mean(own) >= 85 and np.mean(own) > np.mean(swapped) + 30, (np.mean(own), np.mean(swapped))
    assert scorer.features(images[:3]).shape == (3, 192)


@pytest.mark.slow
def test_toy_run_uses_the_toy_classifier_with_intervals(toy_scfg, tmp_path):
    summary = run(
        parse_args(
            [
                "--toy",
                "--limit",
                "4",
                "--steps",
                "3",
                "--configs",
                "cfg,goca-scfg",
                "--scales",
                "4",
                "--batch",
                "3",
                "--bootstrap",
                "20",
                "--out",
                str(tmp_path),
            ]
        ),
        pipe=toy_scfg,
        progress=False,
    )
    assert summary["settings"]["clip"] == "toy classifier"
    for row in summary["rows"]:
        assert row["images"] == 4 and 0 <= row["clip"] <= 100 and row["fid"] >= 0
        assert row["clip_ci"][0] <= row["clip"] <= row["clip_ci"][1] and row["fid_ci"][0] <= row["fid_ci"][1]
    assert (tmp_path / "toy_reference_stats.npz").exists() and "toy score" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_toy_run_on_the_transformer_toy(tmp_path):
    """--toy-model: the PixArt-layout toy, generated at its own 32 px (no resolution bins for toy sizes)."""
    summary = run(
        parse_args(
            [
                "--toy",
                "--toy-model",
                TOY_DIT_MODEL_DIR,
                "--limit",
                "2",
                "--steps",
                "2",
                "--configs",
                "cfg,goca-scfg",
                "--scales",
                "4",
                "--batch",
                "2",
                "--bootstrap",
                "5",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        ),
        progress=False,
    )
    assert summary["settings"]["model"] == TOY_DIT_MODEL_DIR and [r["images"] for r in summary["rows"]] == [2, 2]
    assert Image.open(next((tmp_path / "images" / "cfg-w4").glob("*.png"))).size == (32, 32)
