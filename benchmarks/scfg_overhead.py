"""Per-step time and peak memory of S-CFG (GoCA masks, and S-CFG's own segmenter) against plain CFG, on the real
SD 1.5 or SDXL UNet config with random weights; plus plain CFG with SDPA turned off in every layer, which is what the
original S-CFG code runs (it swaps in attention processors that materialise the maps).

    python benchmarks/scfg_overhead.py --resolution 512 --device cuda --dtype float16
    python benchmarks/scfg_overhead.py --model sdxl --device cuda --dtype float16          # 1024 px
    OMP_NUM_THREADS=1 python benchmarks/scfg_overhead.py --resolution 512 --steps 3          # CPU

Per-step time = (time of `steps` steps − time of 1 step) / (steps − 1), each the best of `--rounds` interleaved
rounds, so text encoding and decoding cancel out; on the CPU the time is the process's CPU time (run it with
OMP_NUM_THREADS=1), so that other load on the machine does not distort the ratios. `--counts` adds each config's FLOPs and operator launches per step
beyond CFG's (`torch.utils.flop_counter`; the launches counted as `overhead.py --launches` does).
"""

from __future__ import annotations

import argparse
import time

import torch

from overhead import UNETS, Launches, quiet_casts


def build(model: str, device, dtype):
    """The S-CFG pipeline of `model` ("sd15" or "sdxl"): its real UNet config with random weights, small text encoders
    of the real widths (the text path is not what is measured), a tiny VAE with the real 8× downsampling."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    import diffusers_goca as goca
    from diffusers_goca.clip_bpe import build_clip_tokenizer
    from diffusers_goca.testing import tiny_clip_text, tiny_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNETS[model])
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = tiny_scheduler()
    if model == "sdxl":
        pipe = goca.SCFGGoCAStableDiffusionXLPipeline(
            vae=vae,
            unet=unet,
            text_encoder=tiny_clip_text(768),
            text_encoder_2=tiny_clip_text(1280, with_projection=True),
            tokenizer=build_clip_tokenizer(),
            tokenizer_2=build_clip_tokenizer(),
            scheduler=scheduler,
        )
    else:
        pipe = goca.SCFGGoCAStableDiffusionPipeline(
            vae=vae,
            unet=unet,
            text_encoder=tiny_clip_text(768),
            tokenizer=build_clip_tokenizer(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    with quiet_casts():  # models built from configs: no loaded weights to keep in float32
        pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, n, device, **kw):
    """Seconds of one `n`-step call: wall time on an accelerator; on the CPU the process's CPU time, which other load
    on the machine does not inflate (run with OMP_NUM_THREADS=1 so that no thread spins idle)."""
    clock = time.perf_counter if device != "cpu" else time.process_time
    if device == "cuda":
        torch.cuda.synchronize()
    t = clock()
    pipe(
        "a cat on the grass next to a red car",
        num_inference_steps=n,
        height=RES,
        width=RES,
        guidance_scale=7.5,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - t


def per_step_times(pipe, configs: dict, steps: int, rounds: int, device) -> dict:
    """Per config, (time of `steps` steps − time of 1 step) / (steps − 1), each the best over `rounds` rounds that run
    every config in turn (interleaved, so that drifts of the machine touch all alike)."""
    for kw in configs.values():
        call(pipe, 1, device, **kw)  # warm-up
    full = {name: [] for name in configs}
    one = {name: [] for name in configs}
    for _ in range(rounds):
        for name, kw in configs.items():
            full[name].append(call(pipe, steps, device, **kw))
            one[name].append(call(pipe, 1, device, **kw))
    return {name: (min(full[name]) - min(one[name])) / (steps - 1) for name in configs}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def per_step_counts(pipe, device, **kw) -> tuple[int, int]:
    """(FLOPs, operators that launch device work) of one step: a 2-step call's less a 1-step call's. The CPU's fused
    attention has no FLOP formula in torch's counter: it gets that of the other fused attentions."""
    from torch.utils.flop_counter import FlopCounterMode

    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}

    def counts(n):
        with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as flops, Launches() as launches:
            call(pipe, n, device, **kw)
        return flops.get_total_flops(), launches.count

    (flops_2, launches_2), (flops_1, launches_1) = counts(2), counts(1)
    return flops_2 - flops_1, launches_2 - launches_1


def peak(pipe, device, **kw):
    """Peak accelerator memory of a 2-step call above what was allocated before it (None on the CPU)."""
    if device != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call(pipe, 2, device, **kw)
    return torch.cuda.max_memory_allocated() - base


RES = 512
CFG = "CFG (stock, SDPA)"
# The layer weights taken at the first step only: a later step's time is that of a step that reuses them.
# Regions every k steps: over --steps k + 1, the k steps timed are k − 1 that reuse the regions and one that segments.
CONFIGS = {
    "cfg": (CFG, {"scfg": False}),
    "goca": ("S-CFG, GoCA masks", {"segmentor": "goca"}),
    "goca-reused": ("S-CFG, GoCA masks, layer weights reused", {"segmentor": "goca", "layer_weights_every": 10**6}),
    "goca-regions5": ("S-CFG, GoCA masks, regions every 5 steps", {"segmentor": "goca", "regions_every": 5}),
    "goca-regions10": ("S-CFG, GoCA masks, regions every 10 steps", {"segmentor": "goca", "regions_every": 10}),
    "goca-regions5-reused": (
        "S-CFG, GoCA masks, regions every 5 steps, layer weights reused",
        {"segmentor": "goca", "regions_every": 5, "layer_weights_every": 10**6},
    ),
    "original": ("S-CFG, own segmenter", {"segmentor": "original"}),
}


def main(argv=None):
    global RES
    from diffusers.models.attention_processor import AttnProcessor

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", choices=sorted(UNETS), help="whose real UNet config")
    p.add_argument("--resolution", type=int, default=None, help="default: 512 for sd15, 1024 for sdxl")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (the best of each is kept)")
    p.add_argument(
        "--counts",
        action="store_true",
        help="also the FLOPs and the operators launching device work per step, of each config",
    )
    p.add_argument(
        "--configs",
        default=",".join([*CONFIGS, "sdpa-off"]),
        help=f"comma-separated, of {', '.join(CONFIGS)} (CFG always runs, as the reference); 'sdpa-off' adds CFG "
        "with SDPA off",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    args = p.parse_args(argv)
    RES = args.resolution or {"sd15": 512, "sdxl": 1024}[args.model]
    keys = ["cfg"] + [k for k in args.configs.split(",") if k and k not in ("cfg", "sdpa-off")]
    unknown = [k for k in keys if k not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}, sdpa-off")
    configs = dict(CONFIGS[k] for k in keys)
    pipe = build(args.model, args.device, getattr(torch, args.dtype))
    rows = per_step_times(pipe, configs, args.steps, args.rounds, args.device)
    counts = {name: per_step_counts(pipe, args.device, **kw) for name, kw in configs.items()} if args.counts else {}
    mem = {CFG: peak(pipe, args.device, scfg=False), "S-CFG, GoCA masks": peak(pipe, args.device)}
    if "sdpa-off" in args.configs.split(","):
        pipe.disable_goca()
        pipe.unet.set_attn_processor(AttnProcessor())  # SDPA off, as the original S-CFG code runs
        sdpa_off = "CFG with SDPA off (original code's attention)"
        rows[sdpa_off] = per_step_times(pipe, {sdpa_off: {"scfg": False}}, args.steps, args.rounds, args.device)[
            sdpa_off
        ]
    base = rows[CFG]
    print(
        f"{'SDXL' if args.model == 'sdxl' else 'SD 1.5'} UNet (real config, random weights), {RES} px, {args.device}, {args.dtype}, CFG batch 2, "
        f"per step over {args.steps} steps, best of {args.rounds} interleaved rounds"
    )
    for name, t in rows.items():
        print(f"  {name:<48s} {t * 1e3:9.1f} ms/step   ratio {t / base:.3f}")
    if counts:
        flops, launches = counts[CFG]
        print("  per step, beyond CFG's own: FLOPs (ratio to CFG's) and operators launching device work")
        for name, (f, n) in counts.items():
            if name != CFG:
                print(
                    f"    {name:<46s} {(f - flops) / 1e9:9.1f} GFLOP ({(f - flops) / flops:.3f})   "
                    f"{n - launches:6d} launches ({(n - launches) / launches:.3f})"
                )
    if mem[CFG] is not None:
        extra = (mem["S-CFG, GoCA masks"] - mem[CFG]) / 2**20
        print(f"  extra peak memory of S-CFG with GoCA masks: {extra:.1f} MiB")


if __name__ == "__main__":
    main()
