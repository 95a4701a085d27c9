"""Generate images, get GoCA masks at the steps you ask for, and compare CFG with S-CFG from the same noise.

python examples/generate_with_masks.py "a red circle and a white square on grass" --model <hub id or folder>
python examples/generate_with_masks.py          # the embedded toy model (CPU, offline)
python examples/generate_with_masks.py --model diffusers_goca/toyworld/dit_model   # the transformer toy (PixArt layout)
"""

import argparse
import os

import torch
from diffusers import DiffusionPipeline

import diffusers_goca as goca
from diffusers_goca.bench.generation import exact_size
from diffusers_goca.loading import dtype_kwargs, pipeline_dtype
from diffusers_goca.toyworld import TOY_MODEL_DIR


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", nargs="?", default="a red circle and a white square on grass")
    p.add_argument("--model", default=TOY_MODEL_DIR)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--out", default="outputs/example_generate")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float16 on a GPU, float32 on the CPU; `dtype_kwargs` passes it as `dtype=` where the installed diffusers reads
    # that keyword (the releases that deprecate `torch_dtype=` for it), else as `torch_dtype=`.
    pipe = DiffusionPipeline.from_pretrained(args.model, **dtype_kwargs(pipeline_dtype("float16", device)))
    pipe = goca.scfg_from_pipe(pipe.to(device))  # S-CFG pipeline: masks, and S-CFG on request
    os.makedirs(args.out, exist_ok=True)

    # PixArt's pipelines round the size to their trained aspect ratios, of which the 32 px toy has none: keep the size.
    size = exact_size(pipe)

    def seeded():
        return torch.Generator("cpu").manual_seed(0)

    # Plain CFG (bit-identical to the stock pipeline) with masks at the last step, classes taken from the prompt.
    cfg = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=seeded(),
        scfg=False,
        goca_masks="last",
        **size,
    ).images[0]
    masks = pipe.goca_masks[-1].results[0]
    cfg.save(f"{args.out}/cfg.png")
    masks.overlay(cfg).save(f"{args.out}/cfg_masks.png")
    print("classes from the prompt:", masks.classes)
    # S-CFG with GoCA masks at every step, from the same noise.
    scfg = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=seeded(),
        scfg=True,
        segmentor="goca",
        scfg_keep_maps=True,
        **size,
    ).images[0]
    scfg.save(f"{args.out}/scfg.png")
    goca.save_scfg_maps(pipe.scfg_maps, f"{args.out}/scfg_maps.gif")
    print(f"images, masks and the S-CFG regions per step in {args.out}/")
    return cfg, scfg


if __name__ == "__main__":
    main()
