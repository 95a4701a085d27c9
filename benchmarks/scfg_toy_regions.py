"""Where S-CFG's foreground falls on the toy model: against the object pixels of the images it generates.

    python benchmarks/scfg_toy_regions.py --captions 12 --steps 15

The toy world's objects have five known colours and its backgrounds none of them, so a generated image's object pixels
can be read off its colours. For each segmenter, per step: the share of the latent grid called foreground, and the
foreground's precision and recall on the object pixels (precision at the object share = no better than chance).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import diffusers_goca as goca
from diffusers_goca.toyworld import load_toy_pipeline
from diffusers_goca.toyworld.scenes import COLOURS, colour_labels, make_scene, scene_seeds


def object_pixels(images: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """images [B, H, W, 3] in [0, 1] → bool [B, *grid]: cells of the latent grid that are mostly object pixels."""
    mask = torch.from_numpy((colour_labels(images, list(COLOURS)) > 0).astype(np.float32))[:, None]
    return F.adaptive_avg_pool2d(mask, grid)[:, 0] > 0.5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", type=int, default=12, help="captions of validation toy scenes")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--guidance", type=float, default=5.0)
    args = p.parse_args(argv)
    pipe = goca.scfg_from_pipe(load_toy_pipeline())
    captions = [make_scene(s).caption for s in scene_seeds("validation", args.captions)]
    print("| segmenter | step | foreground share | object share | precision | recall |\n|---|---|---|---|---|---|")
    for segmentor in ("original", "goca"):
        images = pipe(
            captions,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            segmentor=segmentor,
            generator=torch.Generator().manual_seed(1),
            scfg_keep_maps=True,
            output_type="np",
        ).images
        objects = object_pixels(images, tuple(pipe.scfg_maps[0].foreground.shape[-2:]))
        shown = sorted(set(range(0, len(pipe.scfg_maps), max(1, args.steps // 5))) | {len(pipe.scfg_maps) - 1})
        for m in (pipe.scfg_maps[i] for i in shown):
            hit = (m.foreground & objects).float().sum((1, 2))
            precision = (hit / m.foreground.float().sum((1, 2)).clamp_min(1)).mean()
            recall = (hit / objects.float().sum((1, 2)).clamp_min(1)).mean()
            print(
                f"| {segmentor} | {m.step} | {m.foreground.float().mean():.2f} | {objects.float().mean():.2f} | "
                f"{precision:.2f} | {recall:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
