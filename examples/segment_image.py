"""Segment an existing image into the classes you name, with every method from one forward, and save the overlays.

python examples/segment_image.py photo.jpg cat,grass --model stable-diffusion-v1-5/stable-diffusion-v1-5
python examples/segment_image.py                      # a toy scene with the embedded toy model (CPU, offline)
"""

import argparse
import os

import torch
from diffusers import DiffusionPipeline
from PIL import Image

import diffusers_goca as goca
from diffusers_goca.loading import dtype_kwargs, pipeline_dtype
from diffusers_goca.toyworld import TOY_MODEL_DIR


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", nargs="?", help="default: a held-out toy scene")
    p.add_argument("classes", nargs="?", help="comma-separated class names (default: the toy scene's)")
    p.add_argument("--model", default=TOY_MODEL_DIR, help="hub id or local folder (default: the toy model)")
    p.add_argument("--out", default="outputs/example_segment")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float16 on a GPU, float32 on the CPU; `dtype_kwargs` passes it as `dtype=` where the installed diffusers reads
    # that keyword (the releases that deprecate `torch_dtype=` for it), else as `torch_dtype=`.
    pipe = DiffusionPipeline.from_pretrained(args.model, **dtype_kwargs(pipeline_dtype("float16", device)))
    pipe = goca.from_pipe(pipe.to(device))
    if args.image:
        image, classes = args.image, args.classes.split(",")  # segment opens the path upright (EXIF)
    else:
        from diffusers_goca.toyworld import make_scene

        scene = make_scene(123456)
        image, classes = Image.fromarray(scene.image).resize((128, 128), Image.NEAREST), scene.classes
    # Every method this model family runs (pipe.goca_methods), from one forward (iSeg adds its own).
    results = pipe.segment(image, classes, method=pipe.goca_methods)
    os.makedirs(args.out, exist_ok=True)
    for method, result in results.items():
        result.overlay().save(f"{args.out}/{method}.png")
        share = {c: f"{100 * float((result.labels == k).float().mean()):.0f}%" for k, c in enumerate(result.classes)}
        print(f"{method:>14s}: {share}")
    print(f"overlays in {args.out}/")
    return results


if __name__ == "__main__":
    main()
