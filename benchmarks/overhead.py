"""Time and peak memory of a denoiser forward with GoCA's capture vs without, and of the segmentation reductions,
for the real configs (public layer counts, widths, heads) with random weights.

    python benchmarks/overhead.py --model sd15 --resolution 512 --device cuda --dtype float16
    python benchmarks/overhead.py --model sdxl --resolution 1024 --device cuda --dtype float16
    python benchmarks/overhead.py --model pixart-sigma --resolution 1024 --device cuda --dtype float16
    python benchmarks/overhead.py --model flux-dev --resolution 1024 --device cuda --dtype bfloat16
    python benchmarks/overhead.py --model sd3-medium --resolution 256 --layers 4     # CPU: reduced depth, full width
    python benchmarks/overhead.py --model pixart-sigma --resolution 1024 --kernel both  # fused call vs Triton kernel
    python benchmarks/overhead.py --model pixart-sigma --resolution 256 --launches      # kernel launches per forward
    python benchmarks/overhead.py --model sd15 --resolution 512 --cfg    # a generation step's [uncond, cond] batch

Prints ratios measured in the same run: capture forward / plain forward, enabled-but-idle forward / plain forward,
and the extra peak memory of the capture step (CUDA: allocator peak; CPU: the capture's own byte accounting).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_goca.clip_bpe import build_clip_tokenizer
from diffusers_goca.functional.frobenius_kernel import layer_weight_kernel
from diffusers_goca.methods import method_scores
from diffusers_goca.mixin import GoCAMixin
from diffusers_goca.tokens import TokenIndex
from real_configs import TEXT_TOKENS, TRANSFORMERS, UNETS

# The prompt "cat, grass, background": classes at token positions 1 and 3, "background" at 5, the end token at 6.
PROMPT = TokenIndex("cat, grass, background", ["cat", "grass"], [[1], [3]], [1, 3, 5], 7, {"background": [5]}, 0, 6)


class Host(GoCAMixin):
    """Just enough of a pipeline for the adapters: the denoiser, a tokenizer, the VAE factor."""

    def __init__(self, **parts):
        self.__dict__.update(parts)


class _CastNotice(logging.Filter):
    """Drops diffusers' "There are modules in ... that should be kept in float32: [...]. Casting directly with `to()`
    ..." notice, which every `.to(device, dtype)` of a model built from a config logs (`memory_plan` casts the
    meta-device models it counts on, `scfg_overhead.build` its pipeline): it advises
    `from_pretrained(torch_dtype=...)` for loaded weights, and there are none here. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("should be kept in float32" in message and "Casting directly with `to()`" in message)


@contextlib.contextmanager
def quiet_casts():
    """`_CastNotice` on the logger that emits the notice, for a benchmark's own model construction only."""
    logger, notice = logging.getLogger("diffusers.models.modeling_utils"), _CastNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def build(args, dtype):
    """(host, forward closure) for the chosen model, random weights, one image at `args.resolution` (with `args.cfg`
    a batch of two, [uncond, cond], as a generation step with classifier-free guidance runs it)."""
    import diffusers

    dev, side = args.device, args.resolution // 8
    b = 2 if args.cfg else 1
    torch.manual_seed(0)
    if args.model in UNETS:
        with torch.device(dev):  # "meta": no weights at all (the FLOP count of benchmarks/memory_plan.py)
            unet = diffusers.UNet2DConditionModel(**UNETS[args.model]).to(dev, dtype).eval()
        host = Host(unet=unet, tokenizer=build_clip_tokenizer(), vae_scale_factor=8)
        x = torch.randn(b, 4, side, side, device=dev, dtype=dtype)
        ehs = torch.randn(b, 77, unet.config.cross_attention_dim, device=dev, dtype=dtype)
        extra = {}
        if unet.config.addition_embed_type == "text_time":
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.randn(b, 1280, device=dev, dtype=dtype),
                "time_ids": torch.tensor(
                    [[args.resolution] * 2 + [0, 0] + [args.resolution] * 2] * b, device=dev, dtype=dtype
                ),
            }
        return host, lambda: unet(
            x, torch.tensor([100], device=dev), encoder_hidden_states=ehs, return_dict=False, **extra
        )
    cls_name, depth_key, config = TRANSFORMERS[args.model]
    config = dict(config)
    if args.layers:
        config[depth_key] = args.layers
        if args.model == "flux-dev":
            config["num_layers"] = max(1, args.layers // 2)
    with torch.device(dev):
        model = getattr(diffusers, cls_name)(**config).to(dev, dtype).eval()
    host = Host(transformer=model, vae_scale_factor=8, default_sample_size=128)
    t = TEXT_TOKENS[args.model]
    ehs = torch.randn(b, t, 4096, device=dev, dtype=dtype)
    if args.model == "pixart-sigma":
        x = torch.randn(b, 4, side, side, device=dev, dtype=dtype)
        mask = (torch.arange(t, device=dev) < PROMPT.length).float()[None].repeat(b, 1)  # T5 padding: masked
        return host, lambda: model(
            x,
            encoder_hidden_states=ehs,
            encoder_attention_mask=mask,
            timestep=torch.tensor([100] * b, device=dev),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )
    if args.model == "sd3-medium":
        x = torch.randn(b, 16, side, side, device=dev, dtype=dtype)
        pooled = torch.randn(b, 2048, device=dev, dtype=dtype)
        return host, lambda: model(
            x,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            timestep=torch.tensor([500.0] * b, device=dev),
            return_dict=False,
        )
    if args.cfg:
        raise SystemExit("--cfg: Flux.1 has no [uncond, cond] batch (its guidance is distilled into the model)")
    h = side // 2
    ids = torch.zeros(h, h, 3, device=dev)
    ids[..., 1], ids[..., 2] = torch.arange(h, device=dev)[:, None], torch.arange(h, device=dev)[None, :]
    x = torch.randn(1, h * h, 64, device=dev, dtype=dtype)
    pooled = torch.randn(1, 768, device=dev, dtype=dtype)
    return host, lambda: model(
        x,
        encoder_hidden_states=ehs,
        pooled_projections=pooled,
        timestep=torch.tensor([0.5], device=dev),
        guidance=torch.tensor([3.5], device=dev),
        txt_ids=torch.zeros(t, 3, device=dev),
        img_ids=ids.reshape(-1, 3),
        return_dict=False,
    )


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def segmentation(host, run, index, offload_above_mib, kernel="torch", layer_weight_stride=1, every_text_key=False):
    """(enable, capture, reduce): GoCA's attachment with the offload setting, one `segment`'s capture forward
    (the token columns it keeps; the prompt's text keys only where the family masks the padding, unless
    `every_text_key`) and its `goca` reductions of a capture, the layer weights by `kernel` over the reference rows of
    `layer_weight_stride`."""

    def enable():
        host.enable_goca(offload_above_mib=offload_above_mib)

    def capture():
        text_keys = index.length if host._goca.adapter.text_padding_masked and not every_text_key else None
        with layer_weight_kernel(kernel):
            return host.capture_forward(run, columns=index.needed(), text_keys=text_keys)

    def reduce(step):
        with layer_weight_kernel(kernel):
            return method_scores(
                step, 0, index, host._goca.adapter, "goca", "background", layer_weight_stride=layer_weight_stride
            )

    return enable, capture, reduce


def timed_rounds(host, run, variants, device, rounds):
    """Median times of the plain forward (GoCA disabled), the enabled-but-idle forward and, per variant
    (name → `segmentation(...)`), the capture forward and the reductions, measured in interleaved rounds so that
    drift in the machine's speed hits all of them alike. Returns (times, the last variant's last capture)."""
    times = {"plain": [], "idle": []}
    step = None

    def clock(name, fn):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.setdefault(name, []).append(time.perf_counter() - t)
        return out

    with torch.no_grad():
        for _ in range(rounds):
            host.disable_goca()
            clock("plain", run)
            for name, (enable, capture, reduce) in variants.items():
                enable()
                clock("idle", run)
                step = clock(f"capture {name}", capture)
                clock(f"reduce {name}", lambda: reduce(step))
    return {name: statistics.median(ts) for name, ts in times.items()}, step


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(UNETS) + sorted(TRANSFORMERS), default="sd15")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--layers", type=int, default=None, help="transformers: reduced depth (full width), for CPU runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="interleaved timing rounds (the median is reported); 0: no timing, only --launches / --profile",
    )
    p.add_argument(
        "--offload-above-mib",
        type=float,
        default=256,
        help="enable_goca's offload_above_mib; a negative value: never offload",
    )
    p.add_argument(
        "--kernel",
        choices=["torch", "triton", "both"],
        default="torch",
        help="the layer weights by the fused attention call, the Triton kernel, or both, "
        "timed in the same rounds (the peaks and the profile are the last one's)",
    )
    p.add_argument(
        "--layer-weight-stride",
        type=int,
        default=1,
        help="the `goca` option: layer weights over every s-th reference row and column (1: official)",
    )
    p.add_argument(
        "--compare-text-keys",
        action="store_true",
        help="also time the capture over every text key (PixArt: the masked T5 padding too), in the same rounds",
    )
    p.add_argument(
        "--cfg",
        action="store_true",
        help="time the capture step of a generation with classifier-free guidance: the forward runs "
        "[uncond, cond] and the conditional image is segmented (not Flux: no CFG batch)",
    )
    p.add_argument(
        "--launches",
        action="store_true",
        help="also count the operators that launch device work (no views, no bare allocations) in the plain "
        "forward, the capture forward and the reductions: where the forward is short, each one costs "
        "host time whatever its size",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="also print the ROWS operators that take the most time in one capture + reductions",
    )
    args = p.parse_args(argv)
    host, run = build(args, getattr(torch, args.dtype))
    offload = None if args.offload_above_mib < 0 else args.offload_above_mib
    kernels = ["torch", "triton"] if args.kernel == "both" else [args.kernel]
    variants = {
        f"layer weights by {kernel}": segmentation(host, run, PROMPT, offload, kernel, args.layer_weight_stride)
        for kernel in kernels
    }
    if args.compare_text_keys:
        variants["every text key"] = segmentation(
            host, run, PROMPT, offload, kernels[0], args.layer_weight_stride, every_text_key=True
        )
    parts = variants[f"layer weights by {kernels[-1]}"]
    depth = f", {args.layers} layers" if args.layers else ""
    batch = ", CFG batch [uncond, cond], the cond image segmented" if args.cfg else ""
    print(
        f"model {args.model} (real config{depth}, random weights{batch}), {args.resolution} px, {args.device}, {args.dtype}, "
        f"offload above {'never' if offload is None else f'{offload:g} MiB'}, "
        f"layer_weight_stride {args.layer_weight_stride}"
    )
    if args.repeats > 0:
        report_times(args, host, run, variants, parts)
    if args.launches:
        print_launches(host, run, parts)
    if args.profile:
        print_profile(host, parts, args.device, args.profile)


def report_times(args, host, run, variants, parts):
    """Times (interleaved rounds, medians) and peak memory of the plain forward, the capture and the reductions."""
    enable, capture, reduce = parts
    with torch.no_grad():  # warm-up: one of each
        run()
        for enable_k, capture_k, reduce_k in variants.values():
            enable_k()
            reduce_k(capture_k())
    t, step = timed_rounds(host, run, variants, args.device, args.repeats)
    plain_t, idle_t = t["plain"], t["idle"]
    host.disable_goca()
    with torch.no_grad():
        plain_mem, _ = peak(run, args.device)
        enable()
        cap_mem, step = peak(capture, args.device)
        reduce_mem, _ = peak(lambda: reduce(step), args.device)
    host.disable_goca()
    mib = 2**20
    print(f"  plain denoiser forward          {plain_t * 1e3:9.1f} ms")
    print(f"  enabled, step without masks     {idle_t * 1e3:9.1f} ms   ratio {idle_t / plain_t:.3f}")
    for name in variants:
        cap_t, reduce_t = t[f"capture {name}"], t[f"reduce {name}"]
        if len(variants) > 1:
            print(f"  {name}:")
        print(f"  forward with capture            {cap_t * 1e3:9.1f} ms   ratio {cap_t / plain_t:.3f}")
        print(f"  GoCA reductions after forward   {reduce_t * 1e3:9.1f} ms   ratio {reduce_t / plain_t:.3f}")
        print(
            f"  capture + reductions (segment)  {(cap_t + reduce_t) * 1e3:9.1f} ms   "
            f"ratio {(cap_t + reduce_t) / plain_t:.3f}"
        )
    print(f"  capture held (own accounting)   {step.nbytes() / mib:9.1f} MiB")
    if args.device != "cpu":
        print(
            f"    on {args.device} / offloaded to host {step.nbytes(torch.device(args.device).type) / mib:9.1f} / "
            f"{step.nbytes('cpu') / mib:.1f} MiB"
        )
    if plain_mem is not None:
        print(f"  peak memory, plain forward      {plain_mem / mib:9.1f} MiB")
        print(
            f"  peak memory, capture forward    {cap_mem / mib:9.1f} MiB   extra {(cap_mem - plain_mem) / mib:.1f} MiB"
        )
        print(f"  peak memory, reductions         {reduce_mem / mib:9.1f} MiB (on top of the held capture)")


class Launches(TorchDispatchMode):
    """Counts the operators that launch device work: not views, not allocations without a fill (on CUDA those
    launch nothing), not host-side scalars."""

    SILENT = {"_unsafe_view", "empty", "empty_like", "empty_strided", "scalar_tensor", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in self.SILENT:
            self.count += 1
        return func(*args, **(kwargs or {}))


def print_launches(host, run, parts):
    """The launches of the plain forward, the capture forward and the reductions."""
    enable, capture, reduce = parts
    host.disable_goca()
    with torch.no_grad():
        with Launches() as plain:
            run()
        enable()
        with Launches() as captured:
            step = capture()
        with Launches() as reduced:
            reduce(step)
    host.disable_goca()
    plain, captured, reduced = plain.count, captured.count, reduced.count
    print("  kernel launches (operators that launch device work)")
    print(f"    plain forward                 {plain:9d}")
    print(f"    forward with capture          {captured:9d}   ratio {captured / plain:.3f}")
    print(f"    reductions after forward      {reduced:9d}   ratio {reduced / plain:.3f}")
    print(f"    capture + reductions          {captured + reduced:9d}   ratio {(captured + reduced) / plain:.3f}")


def print_profile(host, parts, device, rows):
    """The operators of one segmentation (capture forward + reductions), by their own time on the device."""
    from torch.profiler import ProfilerActivity, profile

    enable, capture, reduce = parts
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    enable()
    with torch.no_grad(), profile(activities=activities) as prof:
        reduce(capture())
        sync(device)
    host.disable_goca()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
