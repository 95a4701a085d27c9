"""COCO-30k generation benchmark: FID and CLIP score of CFG, S-CFG and GoCA+S-CFG (docs/official_code.md).

Captions: 30,000 of COCO 2014 val, one per image (sampled with a fixed seed from `captions_val2014.json`, or the
official list as a CSV `image_id,text`). Every (config, scale, caption) is one work item: the image is saved under
`<out>/images/<config>-w<scale>/<image_id>.png` and its CLIP score appended to the run's JSONL log, so a rerun resumes
and `accelerate launch --num_processes K` (or `--shard i/n` per machine) splits the items. The seed is fixed per
caption, so every config starts one caption from the same noise. The main process then computes FID per config
against the reference (a folder of COCO val2014 images or precomputed statistics) and prints the table beside the
paper's numbers.

    python benchmarks/coco30k.py --captions coco/annotations/captions_val2014.json --fid-ref coco/val2014 --out runs/coco30k
    accelerate launch --num_processes 8 benchmarks/coco30k.py --captions ... --fid-ref stats/coco_val2014_clean.npz
    python benchmarks/coco30k.py --toy --scales 3,5,7.5 --steps 25 --batch 50   # the toy analogue, offline on CPU

With `--toy` the model is the shipped toy model, the captions those of 1000 held-out toy scenes, and the toy scene
classifier (`toyworld.classifier`) stands in for Inception (its pooled features, through the same FID code, against
the real scenes of those captions) and for CLIP (the caption checks it finds true in the image, 0–100).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..loading import load_pipeline, pipeline_dtype
from .generation import (
    ClipScorer,
    bootstrap_interval,
    clean_fid_extractor,
    exact_size,
    feature_statistics,
    fid_with_interval,
    save_statistics,
)
from .runlog import ResultLog, Shard, wait_for_everyone, write_table, writes_table

CONFIGS = {
    "cfg": {"scfg": False},
    "scfg": {"scfg": True, "segmentor": "original"},
    "goca-scfg": {"scfg": True, "segmentor": "goca"},
    # the layer weights taken every 5 steps and reused in between (the per-step cost option)
    "goca-scfg-every5": {"scfg": True, "segmentor": "goca", "layer_weights_every": 5},
    "goca-scfg-regions5": {"scfg": True, "segmentor": "goca", "regions_every": 5},
    "goca-scfg-regions10": {"scfg": True, "segmentor": "goca", "regions_every": 10},
}
CONFIG_NAMES = {
    "cfg": "CFG",
    "scfg": "S-CFG",
    "goca-scfg": "GoCA+S-CFG",
    "goca-scfg-every5": "GoCA+S-CFG, layer weights every 5 steps",
    "goca-scfg-regions5": "GoCA+S-CFG, regions every 5 steps",
    "goca-scfg-regions10": "GoCA+S-CFG, regions every 10 steps",
}
# GoCA paper, SD 1.5, 512 px, fp16, 50 steps, w = 5: (FID, CLIP).
PAPER = {"cfg": (19.27, 31.34), "scfg": (19.15, 31.35), "goca-scfg": (18.82, 31.42)}


def load_captions(path: str | Path, n: int = 30_000, seed: int = 2023) -> list[tuple[str, str]]:
    """(image id, caption) pairs. A CSV (`image_id,text`) is taken as it is (its first `n` rows); a COCO captions json
    gives `n` images drawn with `seed` from its sorted image ids, each with its first caption (lowest annotation id)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(str(r["image_id"]), r["text"].strip()) for r in csv.DictReader(f)]
        return rows[:n]
    data = json.loads(path.read_text(encoding="utf-8"))
    first: dict[int, tuple[int, str]] = {}
    for a in data["annotations"]:
        if a["image_id"] not in first or a["id"] < first[a["image_id"]][0]:
            first[a["image_id"]] = (a["id"], a["caption"].strip())
    ids = sorted(first)
    chosen = np.random.RandomState(seed).choice(len(ids), size=min(n, len(ids)), replace=False)
    return [(str(ids[i]), first[ids[i]][1]) for i in sorted(chosen)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--captions", default=None, help="captions_val2014.json or a CSV with image_id,text")
    p.add_argument("--n", type=int, default=30_000, help="captions sampled (json)")
    p.add_argument("--sample-seed", type=int, default=2023)
    p.add_argument("--limit", type=int, default=None, help="first N captions only (quick runs)")
    p.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="hub id or local folder")
    p.add_argument(
        "--toy",
        action="store_true",
        help="the embedded toy model, captions of 1000 held-out toy scenes, "
        "the toy scene classifier for FID features and the caption score",
    )
    p.add_argument(
        "--toy-model",
        default=None,
        help="with --toy: another toy model folder, e.g. diffusers_goca/toyworld/dit_model (the PixArt layout)",
    )
    p.add_argument("--configs", default="cfg,scfg,goca-scfg", help=f"comma-separated of {', '.join(CONFIGS)}")
    p.add_argument("--scales", default="5", help="guidance scales, comma-separated")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=None, help="default: the model's native size")
    p.add_argument("--seed", type=int, default=0, help="base seed; caption i uses seed + i")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--clip-model", default="ViT-B-32")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip tag or a local checkpoint file")
    p.add_argument("--no-clip", action="store_true")
    p.add_argument("--fid-ref", default=None, help="folder of reference images, or an .npz with mu/sigma")
    p.add_argument("--inception", default=None, help="local inception-2015-12-05.pt for clean-fid (offline)")
    p.add_argument("--no-fid", action="store_true")
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="captions per pipeline call (same config and scale; each keeps its own seed)",
    )
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for the 95 %% intervals (0: none)")
    p.add_argument("--out", default="outputs/coco30k")
    p.add_argument("--shard", default=None, help="'i/n': this machine's share (accelerate launch sets it itself)")
    return p.parse_args(argv)


def load_scfg_pipeline(args, device: str):
    """The S-CFG pipeline of --model (with --toy: --toy-model, default the shipped toy model) on `device`, in --dtype
    (float32 on the CPU: `loading.pipeline_dtype`)."""
    model = args.toy_model if args.toy else args.model
    return load_pipeline(model, device, pipeline_dtype(args.dtype, device), scfg=True)


def toy_captions(n: int) -> list[tuple[str, str]]:
    from ..toyworld.scenes import make_scene, scene_seeds

    return [(f"scene-{s}", make_scene(s).caption) for s in scene_seeds("test", n)]


def toy_reference(captions: list[tuple[str, str]], extractor, path: Path) -> Path:
    """Statistics of the real toy scenes whose captions are generated (as COCO-30k's reference is COCO val), saved to
    `path`."""
    from PIL import Image

    from ..toyworld.scenes import make_scene

    if not path.exists():
        images = [Image.fromarray(make_scene(int(image_id.split("-")[1])).image) for image_id, _ in captions]
        features = np.concatenate([extractor(images[i : i + 256]) for i in range(0, len(images), 256)])
        path.parent.mkdir(parents=True, exist_ok=True)
        save_statistics(path, *feature_statistics(features))
    return path


def _batches(keys: list[str], size: int) -> list[list[str]]:
    """Consecutive work items of one config and scale (the folder before "/"), at most `size` per batch."""
    batches: list[list[str]] = []
    for key in keys:
        if batches and len(batches[-1]) < size and batches[-1][0].split("/")[0] == key.split("/")[0]:
            batches[-1].append(key)
        else:
            batches.append([key])
    return batches


def run(
    args: argparse.Namespace, pipe=None, clip: ClipScorer | None = None, extractor=None, progress: bool = True
) -> dict | None:
    """The benchmark; `pipe` (an S-CFG pipeline), `clip` and the FID `extractor` may be passed in. Returns the summary
    on the main process, None on the others."""
    shard = Shard.from_environment(args.shard)
    if args.captions:
        captions = load_captions(args.captions, args.n, args.sample_seed)
    elif args.toy:
        captions = toy_captions(args.n if args.n < 30_000 else 1000)
    else:
        raise SystemExit("--captions is required (or --toy)")
    captions = captions[: args.limit]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    scales = [float(s) for s in args.scales.split(",")]
    device = shard.device(args.device)
    if pipe is None:
        pipe = load_scfg_pipeline(args, device)
    toy_scorer = None
    if args.toy and (clip is None or extractor is None):
        from ..toyworld.classifier import ToySceneScorer

        toy_scorer = ToySceneScorer()
        clip = clip or (None if args.no_clip else toy_scorer)
        extractor = extractor or toy_scorer.features
    if clip is None and not args.no_clip:
        clip = ClipScorer.load(args.clip_model, args.clip_pretrained, device)
    score_name = (
        "toy classifier"
        if toy_scorer is not None and clip is toy_scorer
        else [args.clip_model, str(args.clip_pretrained)]
    )
    settings = {
        "captions": str(args.captions or "toy"),
        "n": len(captions),
        "sample_seed": args.sample_seed,
        "model": (args.toy_model or "toy") if args.toy else args.model,
        "dtype": args.dtype,
        "steps": args.steps,
        "size": args.size,
        "seed": args.seed,
        "clip": None if args.no_clip else score_name,
    }
    out = Path(args.out)
    if args.toy and not args.fid_ref and not args.no_fid:
        args.fid_ref = str(toy_reference(captions, extractor, out / "toy_reference_stats.npz"))
    log = ResultLog(out, settings, shard)
    seeds = {image_id: args.seed + i for i, (image_id, _) in enumerate(captions)}
    text = dict(captions)
    keys = [f"{c}-w{w:g}/{image_id}" for w in scales for c in configs for image_id, _ in captions]
    pending = log.pending(keys)
    mine = len(shard.select(keys))
    bar = tqdm(
        desc=f"coco30k shard {shard.index + 1}/{shard.count}",
        initial=mine - len(pending),
        total=mine,
        disable=not progress,
        dynamic_ncols=True,
    )
    kwargs = ({"height": args.size, "width": args.size} if args.size else {}) | exact_size(pipe)
    for batch in _batches(pending, args.batch):
        folder = batch[0].split("/")[0]
        config, scale = folder.rsplit("-w", 1)
        ids = [key.split("/")[1] for key in batch]
        start = time.perf_counter()
        images = pipe(
            [text[i] for i in ids],
            num_inference_steps=args.steps,
            guidance_scale=float(scale),
            generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in ids],
            **CONFIGS[config],
            **kwargs,
        ).images
        seconds = (time.perf_counter() - start) / len(batch)
        scores = clip.score(images, [text[i] for i in ids]) if clip is not None else [None] * len(batch)
        for key, image_id, image, score in zip(batch, ids, images, scores):
            path = out / "images" / folder / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            record = {
                "config": config,
                "scale": float(scale),
                "image_id": image_id,
                "caption": text[image_id],
                "seconds": round(seconds, 3),
            }
            if score is not None:
                record["clip"] = score
            log.append(key, record)
        bar.update(len(batch))
    wait_for_everyone()
    if not writes_table(shard, len(set(log.records()) & set(keys)), len(keys)):
        return None
    return summarize(args, log, keys, configs, scales, extractor, progress)


def made_lines(rows: list[dict], images: Path) -> list[str]:
    """The summary without a metric (--no-fid and --no-clip): the images made per config and scale, and where."""
    lines = [
        f"--no-fid and --no-clip: images made, no metric; they are in {images}/<config>-w<scale>/",
        "",
        "| config | w | images | folder |",
        "|---|---|---|---|",
    ]
    for r in rows:
        folder = images / f"{r['config']}-w{r['scale']:g}"
        lines.append(f"| {CONFIG_NAMES[r['config']]} | {r['scale']:g} | {r['images']} | {folder} |")
    lines.append(
        f"\n{sum(r['images'] for r in rows)} images in all. The same command with the same --out and "
        f"without --no-fid adds FID from these images (nothing is generated again); the CLIP score is taken "
        f"while generating, so it needs a run of its own."
    )
    return lines


def summarize(args, log: ResultLog, keys, configs, scales, extractor, progress) -> dict:
    records = {k: r for k, r in log.records().items() if k in set(keys)}
    out = Path(args.out)
    if not args.no_fid and args.fid_ref and extractor is None:
        extractor = clean_fid_extractor(Shard().device(args.device), args.inception)
    rows = []
    for w in scales:
        for c in configs:
            folder = f"{c}-w{w:g}"
            mine = [r for r in records.values() if r["config"] == c and r["scale"] == w]
            row = {
                "config": c,
                "scale": w,
                "images": len(mine),
                "clip": None,
                "clip_ci": None,
                "fid": None,
                "fid_ci": None,
            }
            if mine and "clip" in mine[0]:
                values = np.array([r["clip"] for r in mine], np.float64)
                row["clip"] = float(np.nanmean(values))
                if args.bootstrap:
                    row["clip_ci"] = bootstrap_interval(
                        lambda i: float(np.nanmean(values[i])), len(values), args.bootstrap
                    )
            if not args.no_fid and args.fid_ref and len(mine) >= 2:
                row["fid"], row["fid_ci"] = fid_with_interval(
                    out / "images" / folder,
                    args.fid_ref,
                    extractor,
                    cache=out / "reference_stats.npz",
                    resamples=max(args.bootstrap, 2),
                    progress=progress,
                )
                row["fid_ci"] = row["fid_ci"] if args.bootstrap else None
            row["paper_fid"], row["paper_clip"] = PAPER.get(c, (None, None)) if w == 5 else (None, None)
            rows.append(row)
    score = "toy score" if args.toy and records and "clip" in next(iter(records.values())) else "CLIP"
    lines = [
        f"| config | w | images | FID (95 % CI) | {score} (95 % CI) | paper FID / CLIP (SD 1.5, w = 5) |",
        "|---|---|---|---|---|---|",
    ]

    def cell(value, interval):
        if value is None:
            return "–"
        return f"{value:.2f}" + (f" ({interval[0]:.2f}–{interval[1]:.2f})" if interval else "")

    for r in rows:
        paper = f"{r['paper_fid']} / {r['paper_clip']}" if r["paper_fid"] is not None else "–"
        lines.append(
            f"| {CONFIG_NAMES[r['config']]} | {r['scale']:g} | {r['images']} | {cell(r['fid'], r['fid_ci'])} "
            f"| {cell(r['clip'], r['clip_ci'])} | {paper} |"
        )
    if args.no_fid and args.no_clip:  # no metric: what was made, and where, instead of a table of dashes
        lines = made_lines(rows, out / "images")
    text = "\n".join(lines) + "\n"
    summary = {
        "settings": json.loads((out / "settings.json").read_text()),
        "rows": rows,
        "done": len(records),
        "of": len(keys),
    }
    write_table(out, summary, text, len(records), len(keys))
    return summary


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0
