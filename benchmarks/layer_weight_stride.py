"""What `layer_weight_stride` (layer weights over every s-th reference row and column) changes, on the toy world:
the normalised layer weights against the official ones (every row), and `goca` mIoU on held-out scenes.

    python benchmarks/layer_weight_stride.py                     # strides 1, 2, 4; 20 scenes for weights, 100 for mIoU
    python benchmarks/layer_weight_stride.py --strides 1 2 --n-eval 50

The FLOPs it saves at the real configs' sizes are in `benchmarks/memory_plan.py`'s last column.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

import diffusers_goca as goca
from diffusers_goca.methods import layer_weights
from diffusers_goca.segmenting import encoded_latents
from diffusers_goca.tokens import segmentation_prompt
from diffusers_goca.toyworld import load_toy_pipeline, make_scene, scene_seeds
from diffusers_goca.toyworld.evaluate import evaluate_segmentation


def weight_distances(pipe, strides, n_scenes: int) -> dict[int, list[float]]:
    """Per stride, the L1 distance of each scene's normalised layer weights from those over every row."""
    adapter = pipe._goca.adapter
    distances = {s: [] for s in strides}
    for seed in scene_seeds("test", n_scenes):
        scene = make_scene(seed)
        prompt = segmentation_prompt(scene.classes, False)
        latents = encoded_latents(pipe, Image.fromarray(scene.image), adapter.native_resolution, adapter)
        forward = lambda: adapter.segment_forward(latents, prompt, 100, torch.Generator().manual_seed(0))
        step = pipe.capture_forward(forward)
        exact = layer_weights(step, 0, adapter, adapter.cross_layers, False)
        for s in strides:
            strided = layer_weights(step, 0, adapter, adapter.cross_layers, False, s)
            distances[s].append(float((strided - exact).abs().sum()))
    return distances


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--n-weights", type=int, default=20, help="scenes for the layer-weight distances")
    p.add_argument("--n-eval", type=int, default=100, help="held-out scenes for mIoU")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    pipe = load_toy_pipeline(pipeline_class=goca.GoCAStableDiffusionPipeline).enable_goca()
    distances = weight_distances(pipe, args.strides, args.n_weights)
    print(
        f"| stride | L1 distance of the normalised layer weights from stride 1 ({args.n_weights} scenes), mean / max "
        f"| goca mIoU ({args.n_eval} held-out scenes) |"
    )
    print("|---|---|---|")
    for s in args.strides:
        miou = evaluate_segmentation(pipe, n=args.n_eval, methods=("goca",), progress=False, layer_weight_stride=s)[
            "miou"
        ]["goca"]
        d = distances[s]
        print(f"| {s} | {sum(d) / len(d):.3f} / {max(d):.3f} | {100 * miou:.1f} |")


if __name__ == "__main__":
    main()
