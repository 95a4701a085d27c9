"""GoCA, its parts and the baselines on toy models of each family's layout, on the same held-out toy scenes.

    python benchmarks/toy_families.py                                  # the shipped toys
    python benchmarks/toy_families.py --model toy --model toy_runs/pixart6 --model toy_runs/flux6 --n 100

    python benchmarks/toy_families.py --model toy_runs/flux6 --layers --n 40   # per layer: why a part helps or not

Each --model is a toy folder (`python -m diffusers_goca.toyworld.train --arch sd|sd3|pixart|flux ...` makes them;
"toy" is the shipped UNet toy). Oracle classes, no background channel, each family's own segmentation timestep, one
seed; mIoU in the standard protocol over the world's classes (`toyworld.evaluate_segmentation`). Writes a markdown
table (one column per model) and its JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import diffusers_goca as goca  # noqa: E402
from diffusers_goca.methods import available_methods  # noqa: E402
from diffusers_goca.segmenting import encoded_latents  # noqa: E402
from diffusers_goca.toyworld import TOY_MODEL_DIR, load_toy_pipeline  # noqa: E402
from diffusers_goca.toyworld.evaluate import evaluate_segmentation  # noqa: E402

PARTS = {  # vanilla plus one part, over every layer
    "head-wise only": ("goca", {"layer_weighting": "uniform", "rescale": False}),
    "layer-wise only (paper A_p)": (
        "goca",
        {"head_weighting": "average", "rescale": False, "pseudo_attention": "paper"},
    ),
    "layer-wise only (official-code A_p)": (
        "goca",
        {"head_weighting": "average", "rescale": False, "pseudo_attention": "official-code"},
    ),
    "rescaling only": ("goca", {"head_weighting": "average", "layer_weighting": "uniform"}),
}


def configs_for(pipe) -> dict:
    adapter = pipe._goca.adapter
    configs = {
        "goca (paper A_p)": ("goca", {"pseudo_attention": "paper"}),
        "goca (official-code A_p)": ("goca", {"pseudo_attention": "official-code"}),
        "goca (official-code A_p, S̃ rows renormalised)": (
            "goca",
            {"pseudo_attention": "official-code", "renormalize_rows": True},
        ),
    }
    if adapter.joint:  # Flux's official config averages the heads (its captured output mixes text and image keys)
        configs["goca, heads averaged (official-code A_p)"] = (
            "goca",
            {"pseudo_attention": "official-code", "head_weighting": "average"},
        )
    configs["vanilla (official layers)"] = ("vanilla", {})
    if adapter.vanilla_layers is not None:
        configs["vanilla (all layers)"] = ("vanilla", {"layers": "all"})
    configs.update(PARTS)
    for method in ("diffsegmenter", "seg4diff"):
        if method in available_methods(adapter):
            configs[method] = (method, {})
    return configs


def describe(pipe) -> str:
    adapter = pipe._goca.adapter
    params = sum(p.numel() for p in adapter.denoiser.parameters()) / 1e6
    return f"{adapter.family}, {len(adapter.cross_layers)} text-attention layers, {params:.1f} M"


def layer_report(pipe, n: int, start: int) -> str:
    """Per cross layer: vanilla on that layer alone (mIoU), and its mean layer weight under each A_p formula, on
    held-out scenes: whether the layer weights favour the layers whose maps segment best."""
    from PIL import Image

    from diffusers_goca.capture_request import kept_columns
    from diffusers_goca.methods import layer_weights
    from diffusers_goca.tokens import segmentation_prompt
    from diffusers_goca.toyworld import make_scene, scene_seeds

    adapter = pipe._goca.adapter
    layers = adapter.cross_layers
    configs = {name: ("vanilla", {"layers": (name,)}) for name in layers}
    single = evaluate_segmentation(pipe, n=n, start=start, timestep=None, configs=configs, progress=False)["miou"]
    weights = {mode: torch.zeros(len(layers)) for mode in ("paper", "official-code")}
    for seed in scene_seeds("test", n, start):
        scene = make_scene(seed)
        prompt = segmentation_prompt(scene.classes, False)
        index = adapter.token_index(adapter.segment_text(prompt), scene.classes)
        latents = encoded_latents(pipe, Image.fromarray(scene.image), adapter.native_resolution, adapter)
        for mode in weights:
            step = pipe.capture_forward(
                lambda: adapter.segment_forward(
                    latents, prompt, adapter.segment_timestep, torch.Generator().manual_seed(0)
                ),
                columns=kept_columns(adapter, [index]),
                pseudo_attention=mode,
            )
            weights[mode] += layer_weights(step, 0, adapter, layers, False, pseudo_attention=mode).cpu() / n
    rows = [
        "| layer | vanilla on this layer alone, mIoU | mean w_l, paper A_p | mean w_l, official-code A_p |",
        "|---|---|---|---|",
    ]
    for i, name in enumerate(layers):
        rows.append(
            f"| {name} | {100 * single[name]:.1f} | {weights['paper'][i]:.3f} | {weights['official-code'][i]:.3f} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, help="toy folder, or 'toy' (repeatable)")
    p.add_argument("--n", type=int, default=100, help="held-out scenes")
    p.add_argument("--start", type=int, default=0, help="first held-out scene")
    p.add_argument("--layers", action="store_true", help="per-layer report instead of the method table")
    p.add_argument("--out", default="outputs/toy_families")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    models = args.model or ["toy"]
    columns, results = {}, {}
    for model in models:
        pipe = goca.from_pipe(load_toy_pipeline(TOY_MODEL_DIR if model == "toy" else model)).enable_goca()
        name = f"{model} ({describe(pipe)})"
        if args.layers:
            print(f"{name}\n{layer_report(pipe, args.n, args.start)}\n", flush=True)
            continue
        out = evaluate_segmentation(pipe, n=args.n, start=args.start, timestep=None, configs=configs_for(pipe))
        columns[name] = out["miou"]
        results[model] = {"description": describe(pipe), "miou": out["miou"], "n": args.n, "start": args.start}
        print(name, {k: round(100 * v, 1) for k, v in out["miou"].items()}, flush=True)
    if args.layers:
        return 0
    rows = list(dict.fromkeys(r for table in columns.values() for r in table))
    lines = [f"| mIoU, {args.n} held-out scenes | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{100 * t[row]:.1f}" if row in t else "–" for t in columns.values()]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
