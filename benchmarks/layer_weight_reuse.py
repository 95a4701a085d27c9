"""Masks during generation with the layer weights reused over steps (`goca_layer_weights_every=k`), on a toy model.

    python benchmarks/layer_weight_reuse.py --captions 48 --steps 25
    python benchmarks/layer_weight_reuse.py --toy-model diffusers_goca/toyworld/dit_model

Captions of validation toy scenes whose objects have distinct colours, so that a generated image's ground truth can be
read off its colours: a pixel near one of the caption's object colours is that object, any other the scene's surface.
For k in `--every`: the mIoU of the last step's masks against that ground truth, and the share of pixels whose label
at each step agrees with k = 1 (the method as published). The images are the same for every k: masks never change
them.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import diffusers_goca as goca
from diffusers_goca.bench.generation import exact_size
from diffusers_goca.functional.metrics import confusion_matrix, miou
from diffusers_goca.toyworld import load_toy_pipeline
from diffusers_goca.toyworld.scenes import CLASS_NAMES, colour_labels, make_scene, scene_seeds


def colour_truth(image: np.ndarray, classes: list[str]) -> torch.Tensor:
    """image [H, W, 3] in [0, 1], classes [surface, "colour shape", ...] with distinct colours → labels [H, W]: the
    object whose colour the pixel has, else the surface."""
    return torch.from_numpy(colour_labels(image, [c.split()[0] for c in classes[1:]]))


def distinct_colour_scenes(n: int, split: str = "validation"):
    scenes, start = [], 0
    while len(scenes) < n:
        for seed in scene_seeds(split, 4 * n, start):
            scene = make_scene(seed)
            objects = scene.classes[1:]
            if len({c.split()[0] for c in objects}) == len(objects) and len(scenes) < n:
                scenes.append(scene)
        start += 4 * n
    return scenes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy-model", default=None, help="a toy model folder (default: the shipped UNet toy)")
    p.add_argument("--captions", type=int, default=48)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--every", default="1,5,25", help="comma-separated k of goca_layer_weights_every (1 first)")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    every = [int(k) for k in args.every.split(",")]
    if every[0] != 1:
        raise SystemExit("--every must start with 1, the per-step method the others are compared with")
    pipe = goca.from_pipe(load_toy_pipeline(args.toy_model))
    pipe.set_progress_bar_config(disable=True)
    scenes = distinct_colour_scenes(args.captions)
    size = exact_size(pipe)
    confusion = {k: 0 for k in every}
    agree = {k: [] for k in every}  # per batch: [steps] shares of pixels labelled as with k = 1
    for start in range(0, len(scenes), args.batch):
        batch = scenes[start : start + args.batch]
        reference = None
        for k in every:
            images = pipe(
                [s.caption for s in batch],
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                goca_masks=True,
                goca_classes=[s.classes for s in batch],
                goca_layer_weights_every=k,
                generator=torch.Generator().manual_seed(start),
                output_type="np",
                **size,
            ).images
            labels = torch.stack([torch.stack([r.labels for r in m.results]) for m in pipe.goca_masks])  # [S, B, H, W]
            for image, scene, predicted in zip(images, batch, labels[-1]):
                world = torch.tensor([CLASS_NAMES.index(c) for c in scene.classes])  # scene ids → the world's
                truth = world[colour_truth(image, scene.classes)]
                confusion[k] = confusion[k] + confusion_matrix(world[predicted], truth, len(CLASS_NAMES), None)
            reference = labels if k == 1 else reference
            agree[k].append((labels == reference).float().mean((1, 2, 3)) * len(batch))
        print(f"{start + len(batch)}/{len(scenes)} captions", flush=True)
    print(f"{len(scenes)} validation captions, {args.steps} steps, w = {args.guidance:g}\n")
    print("| layer weights | mIoU of the last step's masks | labels as at k = 1: mean over steps | at the last step |")
    print("|---|---|---|---|")
    for k in every:
        share = torch.stack(agree[k]).sum(0) / len(scenes)
        taken = "every step" if k == 1 else ("first step only" if k >= args.steps else f"every {k} steps")
        print(f"| {taken} | {100 * miou(confusion[k])[0]:.1f} | {100 * share.mean():.1f} % | {100 * share[-1]:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
