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
    python benchmarks/coco30k.py --toy --limit 8 --steps 10 --no-fid       # offline, on CPU
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

from .generation import ClipScorer, clean_fid_extractor, fid_from_folders
from .runlog import ResultLog, Shard, wait_for_everyone, write_table, writes_table

CONFIGS = {"cfg": {"scfg": False}, "scfg": {"scfg": True, "segmentor": "original"},
           "goca-scfg": {"scfg": True, "segmentor": "goca"}}
CONFIG_NAMES = {"cfg": "CFG", "scfg": "S-CFG", "goca-scfg": "GoCA+S-CFG"}
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", default=None, help="captions_val2014.json or a CSV with image_id,text")
    p.add_argument("--n", type=int, default=30_000, help="captions sampled (json)")
    p.add_argument("--sample-seed", type=int, default=2023)
    p.add_argument("--limit", type=int, default=None, help="first N captions only (quick runs)")
    p.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="hub id or local folder")
    p.add_argument("--toy", action="store_true", help="the embedded toy model, captions from held-out toy scenes")
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
    p.add_argument("--out", default="outputs/coco30k")
    p.add_argument("--shard", default=None, help="'i/n': this machine's share (accelerate launch sets it itself)")
    return p.parse_args(argv)


def load_pipeline(args, device: str):
    from ..cli import DTYPES, pretrained
    from ..pipelines import scfg_from_pipe
    from ..toyworld import TOY_MODEL_DIR

    dtype = DTYPES[args.dtype] if device.startswith("cuda") else torch.float32
    pipe = scfg_from_pipe(pretrained(TOY_MODEL_DIR if args.toy else args.model, dtype).to(device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_captions(n: int) -> list[tuple[str, str]]:
    from ..toyworld.scenes import make_scene, scene_seeds

    return [(f"scene-{s}", make_scene(s).caption) for s in scene_seeds("test", n)]


def run(args: argparse.Namespace, pipe=None, clip: ClipScorer | None = None, extractor=None,
        progress: bool = True) -> dict | None:
    """The benchmark; `pipe` (an S-CFG pipeline), `clip` and the FID `extractor` may be passed in. Returns the summary
    on the main process, None on the others."""
    shard = Shard.from_environment(args.shard)
    if args.captions:
        captions = load_captions(args.captions, args.n, args.sample_seed)
    elif args.toy:
        captions = toy_captions(args.n if args.n < 30_000 else 100)
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
        pipe = load_pipeline(args, device)
    if clip is None and not args.no_clip:
        clip = ClipScorer.load(args.clip_model, args.clip_pretrained, device)
    settings = {"captions": str(args.captions or "toy"), "n": len(captions), "sample_seed": args.sample_seed,
                "model": "toy" if args.toy else args.model, "dtype": args.dtype, "steps": args.steps, "size": args.size,
                "seed": args.seed, "clip": None if args.no_clip else [args.clip_model, str(args.clip_pretrained)]}
    out = Path(args.out)
    log = ResultLog(out, settings, shard)
    seeds = {image_id: args.seed + i for i, (image_id, _) in enumerate(captions)}
    text = dict(captions)
    keys = [f"{c}-w{w:g}/{image_id}" for w in scales for c in configs for image_id, _ in captions]
    pending = log.pending(keys)
    mine = len(shard.select(keys))
    bar = tqdm(pending, desc=f"coco30k shard {shard.index + 1}/{shard.count}", initial=mine - len(pending), total=mine,
               disable=not progress, dynamic_ncols=True)
    for key in bar:
        folder, image_id = key.split("/")
        config, scale = folder.rsplit("-w", 1)
        start = time.perf_counter()
        kwargs = {"height": args.size, "width": args.size} if args.size else {}
        image = pipe(text[image_id], num_inference_steps=args.steps, guidance_scale=float(scale),
                     generator=torch.Generator("cpu").manual_seed(seeds[image_id]), **CONFIGS[config], **kwargs).images[0]
        seconds = time.perf_counter() - start
        path = out / "images" / folder / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        record = {"config": config, "scale": float(scale), "image_id": image_id, "caption": text[image_id],
                  "seconds": round(seconds, 3)}
        if clip is not None:
            record["clip"] = clip.score([image], [text[image_id]])[0]
        log.append(key, record)
    wait_for_everyone()
    if not writes_table(shard, len(set(log.records()) & set(keys)), len(keys)):
        return None
    return summarize(args, log, keys, configs, scales, extractor, progress)


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
            row = {"config": c, "scale": w, "images": len(mine),
                   "clip": float(np.mean([r["clip"] for r in mine])) if mine and "clip" in mine[0] else None,
                   "fid": None}
            if not args.no_fid and args.fid_ref and len(mine) >= 2:
                row["fid"] = fid_from_folders(out / "images" / folder, args.fid_ref, extractor,
                                              cache=out / "reference_stats.npz", progress=progress)
            row["paper_fid"], row["paper_clip"] = PAPER[c] if w == 5 else (None, None)
            rows.append(row)
    lines = ["| config | w | images | FID | CLIP | paper FID / CLIP (SD 1.5, w = 5) |", "|---|---|---|---|---|---|"]
    for r in rows:
        fid = f"{r['fid']:.2f}" if r["fid"] is not None else "–"
        clip = f"{r['clip']:.2f}" if r["clip"] is not None else "–"
        paper = f"{r['paper_fid']} / {r['paper_clip']}" if r["paper_fid"] is not None else "–"
        lines.append(f"| {CONFIG_NAMES[r['config']]} | {r['scale']:g} | {r['images']} | {fid} | {clip} | {paper} |")
    text = "\n".join(lines) + "\n"
    summary = {"settings": json.loads((out / "settings.json").read_text()), "rows": rows,
               "done": len(records), "of": len(keys)}
    write_table(out, summary, text, len(records), len(keys))
    return summary


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0
