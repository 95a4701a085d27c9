"""The main job on the embedded default: the toy model, offline, on CPU.

1. generates a few scenes from held-out captions with masks at every step, and saves the images, the last-step
   overlays and the per-step masks; 2. compares CFG with S-CFG (GoCA masks, and S-CFG's own segmenter);
3. segments held-out scenes and prints the mIoU table of every method; 4. saves a grid of segmentations; 5. the same
table for the transformer toy (PixArt layout).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..pipelines import GoCAStableDiffusionPipeline, from_pipe
from ..result import draw_legend, legend_font, palette
from .evaluate import evaluate_segmentation, markdown_table, upscale
from .model import TOY_DIT_MODEL_DIR, load_toy_pipeline
from .scenes import CLASS_NAMES, make_scene, scene_seeds

METHODS = ("goca", "vanilla", "manual", "diffsegmenter")
DIT_METHODS = ("goca", "vanilla", "diffsegmenter")
FONT_SIZE = 14  # titles, row labels and legends, in pixels of the saved pictures


def _titled(
    rows: list[list[Image.Image]],
    titles: list[str],
    row_labels: list[str] | None = None,
    label_width: int = 170,
    legends: list[tuple[list[str], np.ndarray]] | None = None,
) -> Image.Image:
    """A grid of equal cells with a title over each column and, optionally, a (wrapped) label left of each row and a
    legend right of each row (legends: per row, its class names and their exact colours, drawn at the grid's size)."""
    cell = rows[0][0].width
    text_font = legend_font(FONT_SIZE)
    titles = [_wrap(t, text_font, cell - 8) for t in titles]  # long titles take lines, not the next column
    line_h = FONT_SIZE + 4
    title_h = line_h * max(t.count("\n") + 1 for t in titles) + 4
    left = label_width if row_labels else 0
    keys = [draw_legend(names, colours, font_size=FONT_SIZE, vertical=True) for names, colours in legends or []]
    right = max((k.width for k in keys), default=0)
    heights = [max(cell, keys[i].height if keys else 0) for i in range(len(rows))]
    out = Image.new("RGB", (left + cell * len(titles) + right, title_h + sum(heights)), "white")
    draw = ImageDraw.Draw(out)
    for j, t in enumerate(titles):
        draw.multiline_text((left + j * cell + 4, 3), t, fill="black", font=text_font, spacing=4)
    if keys:
        draw.text((left + cell * len(titles) + 4, 3), "classes", fill="black", font=text_font)
    y = title_h
    for i, row in enumerate(rows):
        if row_labels:
            draw.multiline_text(
                (4, y + 4), _wrap(row_labels[i], text_font, label_width - 8), fill="black", font=text_font, spacing=4
            )
        for j, img in enumerate(row):
            out.paste(img, (left + j * cell, y))
        if keys:
            out.paste(keys[i], (left + cell * len(titles), y))
        y += heights[i]
    return out


def _wrap(text: str, font, width: int) -> str:
    """`text` broken at spaces into lines at most `width` pixels wide in `font` (a longer word keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def generation_demo(pipe, out: str, n: int = 4, steps: int = 25) -> list[str]:
    captions = [make_scene(s).caption for s in scene_seeds("test", n, start=10_000)]
    gen = torch.Generator().manual_seed(0)
    images = pipe(captions, num_inference_steps=steps, guidance_scale=4.0, generator=gen, goca_masks=True).images
    rows = []
    for b, img in enumerate(images):
        per_step = [pipe.goca_masks[i].results[b] for i in range(0, steps, max(1, steps // 5))]
        rows.append(
            [upscale(img, 4)]
            + [upscale(r.colorize(), 4) for r in per_step]
            + [upscale(pipe.goca_masks[-1].results[b].colorize(), 4)]
        )
    titles = ["generated"] + [f"step {i}" for i in range(0, steps, max(1, steps // 5))] + ["last step"]
    legends = [(r.classes, r.palette) for r in (pipe.goca_masks[-1].results[b] for b in range(len(images)))]
    _titled(rows, titles, legends=legends).save(os.path.join(out, "generation_masks.png"))
    for b, img in enumerate(images):
        pipe.goca_masks[-1].results[b].overlay(img).save(os.path.join(out, f"generated_{b}_overlay.png"))
    return captions


def segmentation_grid(examples, methods, path: str) -> None:
    colours = palette(CLASS_NAMES)
    rows, legends = [], []
    for scene, results in examples:
        ids = np.array([CLASS_NAMES.index(c) for c in scene.classes])
        rows.append(
            [upscale(scene.image), upscale(colours[scene.labels])]
            + [upscale(colours[ids[results[m].labels.numpy()]]) for m in methods]
        )
        legends.append((scene.classes, colours[ids]))
    _titled(rows, ["scene", "ground truth"] + list(methods), legends=legends).save(path)


def scfg_demo(pipe, out: str, n: int = 4, steps: int = 25, guidance: float = 5.0) -> None:
    """The same held-out captions and seeds with CFG, S-CFG with GoCA masks, and S-CFG with its own segmenter."""
    from ..pipelines import scfg_from_pipe
    from ..scfg import save_scfg_maps

    scfg = scfg_from_pipe(pipe)
    captions = [make_scene(s).caption for s in scene_seeds("test", n, start=20_000)]
    rows = {}
    for name, kw in (
        (f"CFG, w = {guidance:g}", {"scfg": False}),
        (f"S-CFG + GoCA, w = {guidance:g}", {"segmentor": "goca", "scfg_keep_maps": True}),
        (f"S-CFG (own), w = {guidance:g}", {"segmentor": "original"}),
    ):
        images = scfg(
            captions,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            **kw,
        ).images
        rows[name] = [upscale(img, 4) for img in images]
        if kw.get("scfg_keep_maps"):
            save_scfg_maps(scfg.scfg_maps, os.path.join(out, "scfg_maps.gif"))
    _titled([list(r) for r in zip(*rows.values())], list(rows), captions).save(os.path.join(out, "cfg_vs_scfg.png"))
    scfg.disable_goca()


def run_demo(out: str = "outputs/demo", n_eval: int = 100) -> dict:
    os.makedirs(out, exist_ok=True)
    start = time.time()
    pipe = load_toy_pipeline(pipeline_class=GoCAStableDiffusionPipeline)
    pipe.enable_goca()
    captions = generation_demo(pipe, out)
    print("generated with masks per step:", *captions, sep="\n  ")
    scfg_demo(pipe, out)
    print("CFG vs S-CFG (GoCA masks, S-CFG's own segmenter): cfg_vs_scfg.png, scfg_maps.gif")
    report = evaluate_segmentation(pipe, n=n_eval, methods=METHODS, keep=8)
    segmentation_grid(report["examples"], METHODS, os.path.join(out, "segmentation_grid.png"))
    table = markdown_table(report["miou"], n_eval)
    print(table)
    with open(os.path.join(out, "miou.json"), "w") as f:
        json.dump({"miou": report["miou"], "n": n_eval, "timestep": report["timestep"]}, f, indent=1)
    dit = evaluate_segmentation(
        from_pipe(load_toy_pipeline(TOY_DIT_MODEL_DIR)), n=n_eval, methods=DIT_METHODS, timestep=None
    )
    print("The transformer toy (PixArt layout):\n" + markdown_table(dit["miou"], n_eval))
    with open(os.path.join(out, "miou_dit.json"), "w") as f:
        json.dump({"miou": dit["miou"], "n": n_eval}, f, indent=1)
    print(f"pictures and tables in {out}/ ({time.time() - start:.0f} s)")
    return report
