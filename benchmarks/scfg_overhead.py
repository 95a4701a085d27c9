"""Per-step time and peak memory of S-CFG (GoCA masks, and S-CFG's own segmenter) against plain CFG, on the real
SD 1.5 UNet config with random weights; plus plain CFG with SDPA turned off in every layer, which is what the original
S-CFG code runs (it swaps in attention processors that materialise the maps).

    python benchmarks/scfg_overhead.py --resolution 512 --device cuda --dtype float16
    python benchmarks/scfg_overhead.py --resolution 256 --steps 3          # CPU

Per-step time = (time of `steps` steps − time of 1 step) / (steps − 1), each the best of two runs, so text encoding
and decoding cancel out.
"""
from __future__ import annotations

import argparse
import time

import torch

from overhead import UNETS


def build(device, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import diffusers_goca as goca
    from diffusers_goca.clip_bpe import CLIP_VOCAB_SIZE, build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNETS["sd15"])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=1536,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77))
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = goca.SCFGGoCAPipeline(vae=vae, unet=unet, text_encoder=text, tokenizer=build_clip_tokenizer(),
                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def per_step(pipe, steps, device, **kw):
    def call(n):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        pipe("a cat on the grass next to a red car", num_inference_steps=n, height=RES,
             width=RES, guidance_scale=7.5, output_type="latent", generator=torch.Generator().manual_seed(0), **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    call(1)  # warm-up
    return (min(call(steps) for _ in range(2)) - min(call(1) for _ in range(2))) / (steps - 1)


def peak(pipe, device, **kw):
    if device != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    pipe("a cat on the grass", num_inference_steps=2, height=RES, width=RES, guidance_scale=7.5, output_type="latent", **kw)
    return torch.cuda.max_memory_allocated() - base


RES = 512


def main(argv=None):
    global RES
    from diffusers.models.attention_processor import AttnProcessor

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    args = p.parse_args(argv)
    RES = args.resolution
    pipe = build(args.device, getattr(torch, args.dtype))
    rows = {
        "CFG (stock, SDPA)": per_step(pipe, args.steps, args.device, scfg=False),
        "S-CFG, GoCA masks": per_step(pipe, args.steps, args.device, segmentor="goca"),
        "S-CFG, own segmenter": per_step(pipe, args.steps, args.device, segmentor="original"),
    }
    mem = {"CFG (stock, SDPA)": peak(pipe, args.device, scfg=False), "S-CFG, GoCA masks": peak(pipe, args.device)}
    pipe.disable_goca()
    pipe.unet.set_attn_processor(AttnProcessor())  # SDPA off, as the original S-CFG code runs
    rows["CFG with SDPA off (original code's attention)"] = per_step(pipe, args.steps, args.device, scfg=False)
    base = rows["CFG (stock, SDPA)"]
    print(f"SD 1.5 UNet (real config, random weights), {RES} px, {args.device}, {args.dtype}, CFG batch 2")
    for name, t in rows.items():
        print(f"  {name:<48s} {t * 1e3:9.1f} ms/step   ratio {t / base:.3f}")
    if mem["CFG (stock, SDPA)"] is not None:
        extra = (mem["S-CFG, GoCA masks"] - mem["CFG (stock, SDPA)"]) / 2**20
        print(f"  extra peak memory of S-CFG with GoCA masks: {extra:.1f} MiB")


if __name__ == "__main__":
    main()
