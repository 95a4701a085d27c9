"""Segmentation benchmark: mIoU of every aggregation method on a dataset, resumable and shardable (docs/official_code.md).

One denoiser forward per image (per class chunk with open prompts) serves every method. Each finished image appends
its sparse confusion counts (both protocols, every background offset of the sweep) to the run's JSONL log, so a rerun
resumes, and totals are summed over the merged log, so `accelerate launch --num_processes K` (or `--shard i/n` on
separate machines sharing the output folder) gives the same table as one process.

    python benchmarks/segmentation.py --dataset voc --root data/VOCdevkit --model stable-diffusion-v1-5/stable-diffusion-v1-5
    accelerate launch --num_processes 8 benchmarks/segmentation.py --dataset ade20k --root data/ade --model ...
    python benchmarks/segmentation.py --toy --dataset toyworld --limit 100        # offline, on CPU
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..class_order import CLASS_ORDERS
from ..functional.metrics import miou
from ..loading import load_pipeline, pipeline_dtype
from ..tokens import segmentation_prompt
from .runlog import ResultLog, Shard, wait_for_everyone, write_table, writes_table

PROTOCOLS = ("official", "standard")

# GoCA paper, official protocol (docs/official_code.md): model → method → dataset → mIoU.
PAPER_MIOU = {
    "sd15": {
        "goca": {"voc": 60.7, "context": 40.4, "coco-object": 39.2, "cityscapes": 16.1, "ade20k": 22.0},
        "vanilla": {"voc": 44.3, "context": 32.3, "coco-object": 32.3, "cityscapes": 11.8, "ade20k": 18.0},
    },
    "sdxl": {"goca": {"voc": 65.6, "context": 42.3, "coco-object": 44.3, "cityscapes": 21.2, "ade20k": 23.2}},
    "pixart-sigma": {"goca": {"voc": 63.6, "context": 43.2, "coco-object": 39.8, "cityscapes": 22.6, "ade20k": 23.8}},
    "flux": {"goca": {"voc": 70.7, "context": 51.1, "coco-object": 48.1, "cityscapes": 27.1, "ade20k": 29.3}},
}


def paper_model_key(pipe) -> str | None:
    """Which paper row a pipeline corresponds to, from its class and text width (None for other models)."""
    name = type(pipe).__name__
    if "Flux" in name:
        return "flux"
    if "PixArtSigma" in name:
        return "pixart-sigma"
    if "XL" in name:
        return "sdxl"
    unet = getattr(pipe, "unet", None)
    if unet is not None and unet.config.cross_attention_dim == 768:
        return "sd15"
    return None


# -- confusion counts, stored sparse ----------------------------------------------------------------------------------
def sparse_confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> list[list[int]]:
    """[[target, prediction, count], ...] over pixels whose target is a class (255 = ignore is skipped).

    pred may hold `num_classes` for "no class" (the background channel where the protocol has no background class).
    """
    keep = target != 255
    t, p = target[keep].astype(np.int64), pred[keep].astype(np.int64)
    codes, counts = np.unique(t * (num_classes + 1) + p, return_counts=True)
    return [[int(c // (num_classes + 1)), int(c % (num_classes + 1)), int(n)] for c, n in zip(codes, counts)]


def dense_confusion(entries: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """[C+1, C+1] counts from sparse entries; the last column counts pixels predicted as no class."""
    out = torch.zeros(num_classes + 1, num_classes + 1, dtype=torch.long)
    for t, p, n in entries:
        out[t, p] += n
    return out


def protocol_miou(confusion: torch.Tensor, protocol: str) -> float:
    """mIoU of a [C+1, C+1] confusion (last row/column = no class): `official` averages over every class, absent
    ones counting 0; `standard` over the classes present in ground truth or prediction."""
    _, iou = miou(confusion, over="all" if protocol == "official" else "present")
    iou = iou[:-1]
    if protocol == "official":
        return float(torch.nan_to_num(iou, nan=0.0).mean())
    return float(iou[~iou.isnan()].mean()) if (~iou.isnan()).any() else float("nan")


# -- prompts ----------------------------------------------------------------------------------------------------------
def class_chunks(adapter, classes: Sequence[str], background: bool, max_classes: int | None = None) -> list[list[str]]:
    """Split `classes` into consecutive prompts "c1, c2, ..., background" that fit the text encoder's token limit."""
    chunks: list[list[str]] = []
    current: list[str] = []
    for name in classes:
        trial = current + [name]
        if max_classes is not None and len(trial) > max_classes:
            fits = False
        else:
            try:
                adapter.token_index(
                    segmentation_prompt(trial, background), trial, extra_entities=["background"] if background else []
                )
                fits = True
            except ValueError:
                fits = False
        if fits:
            current = trial
        elif current:
            chunks.append(current)
            current = [name]
        else:
            raise ValueError(f"class {name!r} alone does not fit the text encoder's token limit")
    if current:
        chunks.append(current)
    return chunks


class ClipClassFilter:
    """Open-vocabulary prompt filter: keep the `top_k` dataset classes an open_clip zero-shot classifier ranks
    highest for the image ("a photo of a {class}.")."""

    def __init__(self, model, preprocess, tokenizer, classes: Sequence[str], top_k: int, device="cpu"):
        self.model, self.preprocess, self.top_k, self.device = model.eval().to(device), preprocess, top_k, device
        with torch.no_grad():
            text = model.encode_text(tokenizer([f"a photo of a {c}." for c in classes]).to(device)).float()
        self.text = torch.nn.functional.normalize(text, dim=-1)
        self.classes = list(classes)

    @classmethod
    def load(cls, classes, top_k: int, model_name: str = "ViT-B-32", pretrained: str = "openai", device="cpu"):
        """The model as the CLIP score loads it (an open_clip tag, or a local checkpoint offline)."""
        from .generation import ClipScorer

        clip = ClipScorer.load(model_name, pretrained, device)
        return cls(clip.model, clip.preprocess, clip.tokenizer, classes, top_k, device)

    @torch.no_grad()
    def __call__(self, image) -> list[str]:
        feature = self.model.encode_image(self.preprocess(image)[None].to(self.device)).float()
        logits = torch.nn.functional.normalize(feature, dim=-1) @ self.text.T
        keep = logits[0].topk(min(self.top_k, len(self.classes))).indices.sort().values
        return [self.classes[i] for i in keep.tolist()]


def chunked_scores(
    pipe,
    image,
    chunks: list[list[str]],
    methods: Sequence[str],
    background: bool,
    timestep,
    seed,
    resolution,
    **options,
) -> dict[str, torch.Tensor]:
    """Per method, scores [K (+1 background), H, W] over all chunks' classes in order: one forward per chunk; the
    background channel is the mean of the chunks' background channels (at offset 0). options: GoCAOptions fields
    for the methods that take them."""
    parts = [
        pipe.segment(
            image,
            chunk,
            method=list(methods),
            timestep=timestep,
            seed=seed,
            background=background,
            resolution=resolution,
            **options,
        )
        for chunk in chunks
    ]
    out = {}
    for m in methods:
        scores = [p[m].scores for p in parts]
        if background:
            out[m] = torch.cat([s[:-1] for s in scores] + [torch.stack([s[-1] for s in scores]).mean(0, keepdim=True)])
        else:
            out[m] = torch.cat(scores)
    return out


def labels_for_offset(scores: torch.Tensor, background: bool, offset: float) -> torch.Tensor:
    """Argmax after shifting the background channel (the last) by `offset`; upsampling commutes with the shift."""
    if not background or offset == 0:
        return scores.argmax(0)
    return torch.cat([scores[:-1], scores[-1:] + offset]).argmax(0)


# -- one image --------------------------------------------------------------------------------------------------------
def evaluate_item(
    pipe,
    views: dict,
    key: str,
    methods,
    prompts: str,
    background: bool,
    offsets: Sequence[float],
    timestep,
    seed,
    resolution,
    clip_filter=None,
    max_classes=None,
    options: dict | None = None,
) -> dict:
    """Segment one image and return its JSON record: per protocol, method and offset, sparse confusion counts."""
    official = views["official"].sample(key)
    image = official.image
    names = views["official"].classes
    bg_name = "background" if views["official"].background is not None else None
    if prompts == "oracle":
        chosen = [names[i] for i in views["official"].present_classes(official.label) if names[i] != bg_name]
    else:
        vocabulary = [c for c in names if c != bg_name]
        chosen = clip_filter(image) if clip_filter is not None else vocabulary
    adapter = pipe.goca_adapter
    h, w = official.label.shape
    if chosen:
        chunks = class_chunks(adapter, chosen, background, max_classes)
        scores = chunked_scores(pipe, image, chunks, methods, background, timestep, seed, resolution, **(options or {}))
    else:  # nothing but background in the ground truth: the prediction is all background
        scores = {m: torch.zeros(1, h, w) for m in methods}
    record = {"classes": chosen, "confusion": {}}
    for protocol, view in views.items():
        sample = official if protocol == "official" else view.sample(key)
        k = len(view.classes)
        # predicted channel → this protocol's class id (k = no class: the background where the protocol has none)
        ids = [view.classes.index(c) for c in chosen] if chosen else []
        bg_id = view.background if view.background is not None else k
        lookup = torch.tensor(ids + ([bg_id] if background or not chosen else []), dtype=torch.long)
        per_method = {}
        for m in methods:
            per_offset = {}
            for off in offsets:
                pred = lookup[labels_for_offset(scores[m], background and bool(chosen), off)].numpy()
                per_offset[f"{off:g}"] = sparse_confusion(pred, np.asarray(sample.label), k)
            per_method[m] = per_offset
        record["confusion"][protocol] = per_method
    return record


# -- totals -----------------------------------------------------------------------------------------------------------
def totals(records: dict[str, dict], views: dict, methods, offsets, default_offset: float) -> dict:
    """mIoU per protocol and method at the default offset, and the oracle sweep (best offset, chosen on the results)."""
    table = {}
    for protocol, view in views.items():
        k = len(view.classes)
        rows = {}
        for m in methods:
            by_offset = {}
            for off in offsets:
                conf = torch.zeros(k + 1, k + 1, dtype=torch.long)
                for r in records.values():
                    conf += dense_confusion(r["confusion"][protocol][m][f"{off:g}"], k)
                by_offset[f"{off:g}"] = 100 * protocol_miou(conf, protocol)
            best = max(by_offset, key=lambda o: by_offset[o])
            rows[m] = {
                "miou": by_offset[f"{default_offset:g}"],
                "sweep": by_offset,
                "oracle_offset": float(best),
                "oracle_miou": by_offset[best],
            }
        table[protocol] = rows
    return table


def markdown(table: dict, dataset: str, n: int, paper: dict | None, sweep: bool) -> str:
    lines = []
    for protocol, rows in table.items():
        head = f"| method | {dataset} mIoU ({protocol}, {n} images) |"
        sep = "|---|---|"
        if sweep:
            head += " oracle background offset (sweep) |"
            sep += "---|"
        if protocol == "official" and paper:
            head += " paper |"
            sep += "---|"
        lines += [head, sep]
        for m, row in rows.items():
            line = f"| {m} | {row['miou']:.1f} |"
            if sweep:
                line += f" {row['oracle_miou']:.1f} at {row['oracle_offset']:g} |"
            if protocol == "official" and paper:
                value = paper.get(m, {}).get("context" if dataset.startswith("context") else dataset)
                line += f" {value:.1f} |" if value is not None else " – |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="voc, context, context59, context60, coco-object, cityscapes, ade20k or toyworld",
    )
    p.add_argument("--root", default=None, help="the dataset's folder in its standard layout")
    p.add_argument("--split", default=None, help="default: the dataset's evaluation split (VOC official: train)")
    p.add_argument("--limit", type=int, default=None, help="first N images (sorted keys)")
    p.add_argument("--model", default=None, help="hub id or local pipeline folder")
    p.add_argument("--toy", action="store_true", help="the embedded toy model (the default when no --model)")
    p.add_argument("--methods", default="all", help="comma-separated, or 'all' (every method the model has)")
    p.add_argument(
        "--prompts",
        default="oracle",
        choices=("oracle", "open"),
        help="oracle: ground-truth classes of the image (official protocol); open: all dataset classes",
    )
    p.add_argument("--open-max-classes", type=int, default=None, help="open prompts: at most this many per chunk")
    p.add_argument(
        "--open-clip-filter",
        type=int,
        default=0,
        metavar="K",
        help="open prompts: keep the top K classes of an open_clip zero-shot classifier",
    )
    p.add_argument("--clip-model", default="ViT-B-32")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip tag or a local checkpoint path")
    p.add_argument(
        "--background",
        default="auto",
        choices=("auto", "on", "off"),
        help="background channel; auto: on when the dataset has a background class",
    )
    p.add_argument("--background-offset", type=float, default=0.0, help="the fixed default offset")
    p.add_argument(
        "--offset-sweep", default="", help="extra offsets, e.g. -0.2:0.4:0.05 or 0.1,0.2 (reported as oracle)"
    )
    p.add_argument(
        "--pseudo-attention",
        default=None,
        choices=("paper", "official-code"),
        help="GoCA's A_p (GoCAOptions.pseudo_attention); default: 'official-code' on the real datasets, "
        "what the released code computes and its published numbers come from; the library default on "
        "toyworld",
    )
    p.add_argument("--timestep", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float16", help="float16, bfloat16 or float32 (CPU: float32)")
    p.add_argument("--out", default=None, help="output folder (default outputs/seg-<dataset>-<model>)")
    p.add_argument("--shard", default=None, help="'i/n': this machine's share (accelerate launch sets it itself)")
    p.add_argument("--paper-model", default=None, help="paper row to print beside: sd15, sdxl, pixart-sigma, flux")
    p.add_argument(
        "--protocols",
        default=None,
        help="toyworld only: comma-separated protocols without oracle "
        "classes, or 'all' (see diffusers_goca.bench.protocols): oracle, shuffled, distractors-1, "
        "distractors-2, objects-only",
    )
    p.add_argument(
        "--presence",
        action="store_true",
        help="segment(presence=True): the denoiser's presence test drops classes it judges absent",
    )
    p.add_argument("--presence-threshold", type=float, default=None, help="default: the library's")
    p.add_argument(
        "--class-encoding",
        default="prompt",
        choices=("prompt", "separate"),
        help="segment(class_encoding=...): 'separate' encodes each class on its own (order-free)",
    )
    p.add_argument(
        "--class-order",
        default="given",
        choices=CLASS_ORDERS,
        help="segment(class_order=...): 'stuff-first' names stuff classes (sky, grass, ...) first, the others in "
        "several orders whose maps are averaged (order-free)",
    )
    args = p.parse_args(argv)
    if args.protocols and args.dataset != "toyworld":
        p.error("--protocols needs --dataset toyworld (its scenes know every class, present or not)")
    return args


def parse_offsets(default: float, sweep: str) -> list[float]:
    values = {round(default, 6)}
    for part in filter(None, (s.strip() for s in sweep.split(","))):
        if ":" in part:
            lo, hi, step = (float(x) for x in part.split(":"))
            values.update(round(v, 6) for v in np.arange(lo, hi + step / 2, step))
        else:
            values.add(round(float(part), 6))
    return sorted(values)


def run(args: argparse.Namespace, pipe=None, clip_filter=None, progress: bool = True) -> dict | None:
    """The benchmark. `pipe` (a GoCA pipeline) and `clip_filter` may be passed in; else they are loaded from args.
    Returns the table on the main process (None on the others)."""
    from .datasets import load_dataset

    if args.protocols:
        return run_protocols(args, pipe, progress)
    shard = Shard.from_environment(args.shard)
    views = {p: load_dataset(args.dataset, args.root, args.split, protocol=p, limit=args.limit) for p in PROTOCOLS}
    keys = views["official"].keys()
    if pipe is None:
        pipe = _load(args, shard)
    methods = pipe.goca_methods if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    background = {"on": True, "off": False}.get(args.background, views["official"].background is not None)
    offsets = parse_offsets(args.background_offset, args.offset_sweep) if background else [0.0]
    if args.prompts == "open" and args.open_clip_filter and clip_filter is None:
        vocabulary = [c for c in views["official"].classes if c != "background"]
        clip_filter = ClipClassFilter.load(
            vocabulary, args.open_clip_filter, args.clip_model, args.clip_pretrained, str(pipe.device)
        )
    pseudo_attention = args.pseudo_attention or ("official-code" if args.dataset != "toyworld" else None)
    options = (
        {}
        if pseudo_attention is None or not set(methods) & {"goca", "vanilla", "manual"}
        else {"pseudo_attention": pseudo_attention}
    )
    model_name = args.model or "toy"
    settings = {
        "dataset": args.dataset,
        "root": str(args.root),
        "split": args.split,
        "model": model_name,
        "dtype": args.dtype,
        "methods": methods,
        "prompts": args.prompts,
        "background": background,
        "offsets": offsets,
        "timestep": args.timestep,
        "resolution": args.resolution,
        "seed": args.seed,
        "open_max_classes": args.open_max_classes,
        "open_clip_filter": args.open_clip_filter,
        "clip_model": args.clip_model if args.open_clip_filter else None,
        "options": options,
    }
    out = Path(args.out or f"outputs/seg-{args.dataset}-{Path(model_name).name}")
    log = ResultLog(out, settings, shard)
    pending = log.pending(keys)
    mine = len(shard.select(keys))
    bar = tqdm(
        pending,
        desc=f"{args.dataset} shard {shard.index + 1}/{shard.count}",
        initial=mine - len(pending),
        total=mine,
        disable=not progress,
        dynamic_ncols=True,
    )
    for key in bar:
        start = time.perf_counter()
        record = evaluate_item(
            pipe,
            views,
            key,
            methods,
            args.prompts,
            background,
            offsets,
            args.timestep,
            args.seed,
            args.resolution,
            clip_filter,
            args.open_max_classes,
            options,
        )
        record["seconds"] = round(time.perf_counter() - start, 3)
        log.append(key, record)
    wait_for_everyone()
    records = {k: r for k, r in log.records().items() if k in set(keys)}
    if not writes_table(shard, len(records), len(keys)):
        return None
    table = totals(records, views, methods, offsets, args.background_offset)
    paper_key = args.paper_model or paper_model_key(pipe)
    paper = PAPER_MIOU.get(paper_key) if args.prompts == "oracle" else None
    summary = {
        "settings": settings,
        "images": len(records),
        "of": len(keys),
        "table": table,
        "paper_model": paper_key if paper else None,
        "paper": paper,
    }
    text = markdown(table, args.dataset, len(records), paper, len(offsets) > 1)
    write_table(out, summary, text, len(records), len(keys))
    return summary


def run_protocols(args: argparse.Namespace, pipe=None, progress: bool = True) -> dict:
    """The toy-world protocols (`bench.protocols`) on `--limit` scenes of `--split`; writes table.md / table.json."""
    from .protocols import PROTOCOLS, evaluate_protocols, protocol_markdown

    protocols = PROTOCOLS if args.protocols == "all" else tuple(p.strip() for p in args.protocols.split(","))
    if pipe is None:
        pipe = _load(args, Shard.from_environment(args.shard))
    methods = ["goca", "vanilla"] if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    for m in methods:
        if m not in pipe.goca_methods:
            raise SystemExit(f"segmentation: error: method {m!r} is not available for this model")
    segment_kwargs = {
        "presence": args.presence,
        "class_encoding": args.class_encoding,
        "class_order": args.class_order,
    }
    if args.presence_threshold is not None:
        segment_kwargs["presence_threshold"] = args.presence_threshold
    if args.timestep is not None:
        segment_kwargs["timestep"] = args.timestep
    background = {"on": True, "off": False}.get(args.background)
    n = args.limit or 100
    result = evaluate_protocols(
        pipe,
        n=n,
        split=args.split or "test",
        methods=methods,
        protocols=protocols,
        background=background,
        progress=progress,
        seed=args.seed,
        **segment_kwargs,
    )
    model_name = args.model or "toy"
    out = Path(args.out or f"outputs/protocols-{Path(model_name).name}")
    out.mkdir(parents=True, exist_ok=True)
    result["settings"] = {"model": model_name, "segment": segment_kwargs, "background": background}
    text = f"{n} {result['split']} scenes, {model_name}, segment({segment_kwargs})\n\n" + protocol_markdown(result)
    write_table(out, result, text + "\n", n, n)
    return result


def _load(args, shard: Shard):
    """The GoCA pipeline of --model (the toy model with --toy or without --model) on this shard's device, in --dtype
    (float32 on the CPU: `loading.pipeline_dtype`)."""
    device = shard.device(args.device)
    return load_pipeline(None if args.toy or not args.model else args.model, device, pipeline_dtype(args.dtype, device))


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0
