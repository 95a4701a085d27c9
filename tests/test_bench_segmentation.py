"""The segmentation benchmark: protocols against torchmetrics and hand counts, prompt chunking, resume after an
interruption, sharding (two processes give the one-process totals), and the end-to-end table on the toy world."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusers_goca as goca
from diffusers_goca.bench.segmentation import (
    class_chunks,
    dense_confusion,
    main,
    parse_args,
    protocol_miou,
    run,
    sparse_confusion,
)

ROOT = Path(__file__).resolve().parents[1]


def test_protocols_by_hand():
    # 3 classes; class 2 never appears; one pixel ignored (255); one pixel predicted "no class" (3).
    target = np.array([0, 0, 1, 1, 1, 255])
    pred = np.array([0, 1, 1, 1, 3, 0])
    conf = dense_confusion(sparse_confusion(pred, target, 3), 3)
    # class 0: tp 1, fp 0, fn 1 → 1/2; class 1: tp 2, fp 1, fn 1 → 2/4; class 2: absent.
    assert protocol_miou(conf, "standard") == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert protocol_miou(conf, "official") == pytest.approx((1 / 2 + 2 / 4 + 0) / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_protocols_equal_torchmetrics_on_random_labels(seed):
    from torchmetrics.classification import MulticlassJaccardIndex

    rng = np.random.RandomState(seed)
    k = 6
    target = rng.randint(0, k - 1, size=(40, 30))  # the last class never occurs in the ground truth
    target[rng.rand(40, 30) < 0.1] = 255
    pred = rng.randint(0, k - 2, size=(40, 30))
    conf = dense_confusion(sparse_confusion(pred, target, k), k)
    standard = MulticlassJaccardIndex(num_classes=k, average="macro", ignore_index=255)
    assert protocol_miou(conf, "standard") == pytest.approx(
        float(standard(torch.from_numpy(pred), torch.from_numpy(target)))
    )
    # Official: no ignore index (255 → class 0), every class in the mean, absent ones counting 0.
    official_target = np.where(target == 255, 0, target)
    conf = dense_confusion(sparse_confusion(pred, official_target, k), k)
    per_class = MulticlassJaccardIndex(num_classes=k, average="none", zero_division=0)
    expected = float(per_class(torch.from_numpy(pred), torch.from_numpy(official_target)).mean())
    assert protocol_miou(conf, "official") == pytest.approx(expected)


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers_goca.toyworld import load_toy_pipeline

    return goca.from_pipe(load_toy_pipeline())


def test_open_vocabulary_chunks_fit_the_token_limit(toy_pipe):
    from diffusers_goca.bench.datasets import ADE20K_CLASSES as names
    from diffusers_goca.tokens import segmentation_prompt

    adapter = toy_pipe._goca.adapter
    chunks = class_chunks(adapter, names, background=True)
    assert [c for chunk in chunks for c in chunk] == list(names) and len(chunks) > 1
    tok = adapter.tokenizer()
    for chunk in chunks:
        assert len(tok(segmentation_prompt(chunk, True)).input_ids) <= tok.model_max_length
    assert all(len(c) <= 5 for c in class_chunks(adapter, names, True, max_classes=5))


def _argv(out, *extra) -> list[str]:
    """The benchmark's command line of these tests: 4 toy scenes, goca and vanilla, an offset sweep, background on."""
    return [
        "--dataset",
        "toyworld",
        "--limit",
        "4",
        "--methods",
        "goca,vanilla",
        "--out",
        str(out),
        "--offset-sweep",
        "0.1,0.2",
        "--background",
        "on",
        *extra,
    ]


def _args(out, *extra):
    return parse_args(_argv(out, *extra))


def test_resume_after_an_interruption_gives_the_same_table(toy_pipe, tmp_path):
    full = run(_args(tmp_path / "full"), pipe=toy_pipe, progress=False)
    calls = {"n": 0}
    segment = toy_pipe.segment

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return segment(*a, **kw)

    toy_pipe.segment = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run(_args(tmp_path / "resumed"), pipe=toy_pipe, progress=False)
    finally:
        del toy_pipe.segment
    log = next((tmp_path / "resumed").glob("results.*.jsonl"))
    assert len(log.read_text().splitlines()) == 2
    with open(log, "a") as f:
        f.write('{"key": "torn')  # a write cut by the interruption: that item is redone
    calls["n"] = 0
    toy_pipe.segment = lambda *a, **kw: (calls.__setitem__("n", calls["n"] + 1), segment(*a, **kw))[1]
    try:
        resumed = run(_args(tmp_path / "resumed"), pipe=toy_pipe, progress=False)
    finally:
        del toy_pipe.segment
    assert calls["n"] == 2  # only the two images not done
    assert resumed["table"] == full["table"] and resumed["images"] == 4
    assert set(full["table"]) == {"official", "standard"}
    assert set(full["table"]["official"]["goca"]["sweep"]) == {"0", "0.1", "0.2"}


def test_a_folder_of_other_settings_is_refused(toy_pipe, tmp_path):
    run(_args(tmp_path, "--limit", "1"), pipe=toy_pipe, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        run(_args(tmp_path, "--limit", "1", "--methods", "goca"), pipe=toy_pipe, progress=False)


@pytest.mark.parametrize("order", [("1/2", "0/2"), ("0/2", "1/2")], ids=["main-last", "main-first"])
def test_two_shards_give_the_one_process_totals(toy_pipe, tmp_path, order):
    """Shards run apart (separate machines, one folder): whichever finishes last writes the full table; the main
    shard finishing first writes a partial one."""
    one = run(_args(tmp_path / "one"), pipe=toy_pipe, progress=False)
    first = run(_args(tmp_path / "two", "--shard", order[0]), pipe=toy_pipe, progress=False)
    assert first is None if order[0] != "0/2" else first["images"] == 2
    two = run(_args(tmp_path / "two", "--shard", order[1]), pipe=toy_pipe, progress=False)
    assert two["table"] == one["table"] and two["images"] == 4
    assert json.loads((tmp_path / "two" / "table.json").read_text())["images"] == 4
    assert len(list((tmp_path / "two").glob("results.*-of-2.jsonl"))) == 2


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes(tmp_path):
    """`accelerate launch --num_processes 2` on CPU: each process takes its share, the main one merges. (`--cpu`
    would start one process; the multi-process launcher runs on CPU with the gloo backend.)"""
    env = dict(
        os.environ,
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "benchmarks" / "segmentation.py"),
        *_argv(tmp_path / "acc"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = sorted(p.name for p in (tmp_path / "acc").glob("results.*.jsonl"))
    assert logs == ["results.0-of-2.jsonl", "results.1-of-2.jsonl"]
    merged = json.loads((tmp_path / "acc" / "table.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes: CPU kernels split their sums by thread count
    try:
        main(_argv(tmp_path / "single"))
    finally:
        torch.set_num_threads(threads)
    single = json.loads((tmp_path / "single" / "table.json").read_text())
    assert merged["images"] == 4
    for protocol in ("official", "standard"):
        for m in ("goca", "vanilla"):
            assert merged["table"][protocol][m]["miou"] == pytest.approx(single["table"][protocol][m]["miou"], abs=1e-6)


def test_open_prompts_with_a_clip_filter(toy_pipe, tmp_path):
    import open_clip

    from diffusers_goca.bench.segmentation import ClipClassFilter
    from diffusers_goca.toyworld.scenes import CLASS_NAMES

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    clip = ClipClassFilter(
        model, open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-32"), CLASS_NAMES, top_k=4
    )
    table = run(
        parse_args(
            [
                "--dataset",
                "toyworld",
                "--limit",
                "2",
                "--methods",
                "goca",
                "--prompts",
                "open",
                "--open-clip-filter",
                "4",
                "--out",
                str(tmp_path),
            ]
        ),
        pipe=toy_pipe,
        clip_filter=clip,
        progress=False,
    )
    records = [json.loads(line) for p in tmp_path.glob("results.*.jsonl") for line in p.read_text().splitlines()]
    assert all(len(r["classes"]) == 4 and set(r["classes"]) <= set(CLASS_NAMES) for r in records)
    assert 0 <= table["table"]["standard"]["goca"]["miou"] <= 100


def test_end_to_end_table_on_the_toy_world(toy_pipe, tmp_path, capsys):
    """Oracle prompts on 12 held-out scenes, every method the toy model has: GoCA above the all-background level
    and above vanilla, the Markdown table printed."""
    summary = run(
        parse_args(["--dataset", "toyworld", "--limit", "12", "--out", str(tmp_path)]), pipe=toy_pipe, progress=False
    )
    printed = capsys.readouterr().out
    assert "| goca |" in printed and "| vanilla |" in printed and "standard" in printed
    rows = summary["table"]["standard"]
    assert set(rows) == {"goca", "vanilla", "manual", "diffsegmenter", "iseg"}
    assert rows["goca"]["miou"] > 30 and rows["goca"]["miou"] > rows["vanilla"]["miou"]
    assert (tmp_path / "table.md").read_text().startswith("| method |")


def test_protocols_from_the_command_line(toy_pipe, tmp_path, capsys):
    """`--protocols` runs the toy-world protocols through the same entry point; it needs the toy world."""
    summary = run(
        parse_args(
            [
                "--dataset",
                "toyworld",
                "--protocols",
                "oracle,shuffled",
                "--limit",
                "3",
                "--methods",
                "goca",
                "--out",
                str(tmp_path),
            ]
        ),
        pipe=toy_pipe,
        progress=False,
    )
    assert set(summary["table"]) == {"oracle", "shuffled"} and summary["methods"] == ["goca"]
    assert 0 <= summary["table"]["shuffled"]["goca"]["agreement"] <= 100
    assert "| shuffled |" in (tmp_path / "table.md").read_text() and "| oracle |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "voc", "--root", str(tmp_path), "--protocols", "all"])
