"""Time and peak memory of a denoiser forward with GoCA's capture vs without, and of the segmentation reductions,
for the real SD 1.5 and SDXL UNet configs with random weights.

    python benchmarks/overhead.py --model sd15 --resolution 512 --device cuda --dtype float16
    python benchmarks/overhead.py --model sdxl --resolution 1024 --device cuda --dtype float16

Prints ratios measured in the same run: capture forward / plain forward, enabled-but-idle forward / plain forward,
and the extra peak memory of the capture step (CUDA: allocator peak; CPU: the capture's own byte accounting).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffusers_goca.clip_bpe import build_clip_tokenizer
from diffusers_goca.methods import method_scores
from diffusers_goca.mixin import GoCAMixin
from diffusers_goca.tokens import segmentation_prompt, token_index

CONFIGS = {
    "sd15": dict(
        sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, cross_attention_dim=2048,
    ),
}


class UNetOnly(GoCAMixin):
    """Just enough of a pipeline for the UNet adapter: the denoiser and the tokenizer."""

    def __init__(self, unet, tokenizer):
        self.unet, self.tokenizer, self.vae_scale_factor = unet, tokenizer, 8


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def peak(fn, device):
    if device != "cuda":
        return None, fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out


def main(argv=None):
    from diffusers import UNet2DConditionModel

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(CONFIGS), default="sd15")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[args.model]).to(args.device, dtype).eval()
    tokenizer = build_clip_tokenizer()
    host = UNetOnly(unet, tokenizer)
    classes = ["cat", "grass"]
    prompt = segmentation_prompt(classes, True)
    index = token_index(tokenizer, prompt, classes, extra_entities=["background"])
    side = args.resolution // 8
    x = torch.randn(1, 4, side, side, device=args.device, dtype=dtype)
    t = torch.tensor([100], device=args.device)
    ehs = torch.randn(1, 77, unet.config.cross_attention_dim, device=args.device, dtype=dtype)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, device=args.device, dtype=dtype),
            "time_ids": torch.tensor([[args.resolution] * 2 + [0, 0] + [args.resolution] * 2], device=args.device, dtype=dtype),
        }

    def forward():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ehs, return_dict=False, **kwargs)[0]

    forward()  # warm-up
    plain_t, _ = timed(forward, args.device, args.repeats)
    plain_mem, _ = peak(forward, args.device)
    host.enable_goca()
    state = host._goca
    idle_t, _ = timed(forward, args.device, args.repeats)

    def capture_forward():
        return host.capture_forward(forward)

    capture_forward()
    cap_t, step = timed(capture_forward, args.device, args.repeats)
    cap_mem, step = peak(capture_forward, args.device)

    def reduce():
        with torch.no_grad():
            return method_scores(step, 0, index, state.adapter, "goca", "background")

    reduce_t, _ = timed(reduce, args.device, args.repeats)
    reduce_mem, _ = peak(reduce, args.device)
    host.disable_goca()
    mib = 2**20
    print(f"model {args.model} (real config, random weights), {args.resolution} px, {args.device}, {args.dtype}")
    print(f"  plain denoiser forward          {plain_t * 1e3:9.1f} ms")
    print(f"  enabled, step without masks     {idle_t * 1e3:9.1f} ms   ratio {idle_t / plain_t:.3f}")
    print(f"  forward with capture            {cap_t * 1e3:9.1f} ms   ratio {cap_t / plain_t:.3f}")
    print(f"  GoCA reductions after forward   {reduce_t * 1e3:9.1f} ms   ratio {reduce_t / plain_t:.3f}")
    print(f"  capture + reductions (segment)  {(cap_t + reduce_t) * 1e3:9.1f} ms   ratio {(cap_t + reduce_t) / plain_t:.3f}")
    print(f"  capture held (own accounting)   {step.nbytes() / mib:9.1f} MiB")
    if plain_mem is not None:
        print(f"  peak memory, plain forward      {plain_mem / mib:9.1f} MiB")
        print(f"  peak memory, capture forward    {cap_mem / mib:9.1f} MiB   extra {(cap_mem - plain_mem) / mib:.1f} MiB")
        print(f"  peak memory, reductions         {reduce_mem / mib:9.1f} MiB (on top of the held capture)")


if __name__ == "__main__":
    main()
