"""The capture's memory plan and the segmentation's arithmetic at full size, from the real configs on the meta device
(no weights, no GPU needed).

    python benchmarks/memory_plan.py                  # every family at its native resolution
    python benchmarks/memory_plan.py --columns 40     # a longer class list

For one segmented image in the model dtype: what the capture holds on the accelerator, what it offloads to host
memory, its largest transient working set, and what storing every attention map (the official code) would take.
`diffusers_goca.capture.memory_plan` follows the same rules as the capture; a test checks it equals the capture's own
byte accounting on small models.

Second table: the FLOPs of one `goca` segmentation beyond the forward (capture: text maps, head weights, text
share; then layer weights, refinement), counted
by the rules the code follows, against the forward's own FLOPs (`torch.utils.flop_counter` on the meta device). Where
a GPU is compute-bound, this ratio is the overhead to expect; memory-bound kernels and launch costs come on top.
The last column is the floor of any exact implementation (`least_flops`: every score matrix formed by one QKᵀ pass,
as a single-pass kernel would), the overhead no kernel work can go below.
"""

from __future__ import annotations

import argparse

import diffusers
import torch
from accelerate import init_empty_weights
from torch.utils.flop_counter import FlopCounterMode

from diffusers_goca.capture import memory_plan
from diffusers_goca.clip_bpe import build_clip_tokenizer
from diffusers_goca.functional.self_attention import queries_read
from diffusers_goca.methods import EXPLICIT_S_FROM_ORDER
from diffusers_goca.models import adapter_for
from overhead import Host, build, quiet_casts
from real_configs import TEXT_TOKENS, TRANSFORMERS, UNETS

NATIVE = {"sd15": 512, "sdxl": 1024, "pixart-sigma": 1024, "sd3-medium": 1024, "flux-dev": 1024}
BOUNDS = {"pixart-sigma": 1.0, "flux-dev": 1.5}  # GiB, held + transient (issue #3)


def host_for(name: str):
    with init_empty_weights():
        if name in UNETS:
            return Host(
                unet=diffusers.UNet2DConditionModel(**UNETS[name]), tokenizer=build_clip_tokenizer(), vae_scale_factor=8
            )
        cls_name, _, config = TRANSFORMERS[name]
        return Host(transformer=getattr(diffusers, cls_name)(**config), vae_scale_factor=8, default_sample_size=128)


def tokens(adapter, layer: str, latent_hw) -> int:
    h, w = adapter.layer_hw(layer, latent_hw)
    return h * w


def store_everything(adapter, latent_hw, text_len: int, dtype_bytes: int) -> int:
    """Every attention probability map of the step in the model dtype: [heads, N, keys] per layer."""
    total = 0
    for name, info in adapter.layers.items():
        attn = adapter.denoiser.get_submodule(name)
        n = tokens(adapter, name, latent_hw)
        keys = {"cross": text_len, "self": n, "joint": n + text_len}[info.role]
        total += attn.heads * n * keys * dtype_bytes
    return total


def extra_flops(adapter, latent_hw, text_len: int, row_stride: int = 1) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of one `goca` segmentation beyond the forward, by the code's rules: in the capture,
    the text scores and text outputs, the head-weight projections (one product where the forward's own `to_out`
    output serves, two for joint layers) and, for joint layers off the reference grid, the text-share call; after it,
    the layer weights (one fused call per cross layer over twice its keys, plus the text keys of a joint layer, each
    distinct query once, plus A_p; with `row_stride` > 1 the queries the strided reference rows read) and the
    refinement (k fused products per layer, or one explicit pass of QKᵀ when S is formed)."""

    def grid(name):
        return tokens(adapter, name, latent_hw)

    def inner(name):
        return adapter.denoiser.get_submodule(name).to_q.out_features

    n_ref = grid(adapter.reference_layer)
    map_h, map_w = adapter.map_grid(latent_hw)
    flops = dict.fromkeys(("text maps", "head weights", "text share", "layer weights", "refinement"), 0)
    for name in adapter.cross_layers:
        n, c = grid(name), inner(name)
        width = adapter.output_projection(name, adapter.denoiser.get_submodule(name)).out_features
        joint = adapter.layers[name].role == "joint"
        # A joint layer on the reference grid gets its text shares from its layer-weight call (text keys included).
        merged = joint and adapter.on_reference_grid(name)
        flops["text maps"] += (4 if joint else 2) * n * text_len * c
        flops["head weights"] += (4 if joint else 2) * n * width * c
        flops["text share"] += 4 * n * (n + text_len) * c if joint and not merged else 0
        own = adapter.self_of(name)
        own_hw, ref_hw = adapter.layer_hw(own, latent_hw), adapter.layer_hw(adapter.reference_layer, latent_hw)
        queries = len(queries_read(own_hw, ref_hw, row_stride)[1])
        flops["layer weights"] += 4 * queries * (2 * grid(own) + (text_len if merged else 0)) * inner(own)
    flops["layer weights"] += 2 * n_ref * n_ref * inner(adapter.reference_layer)
    order = adapter.refine_order
    flops["refinement"] = sum(
        2 * map_h * map_w * grid(n) * inner(n)
        if order >= EXPLICIT_S_FROM_ORDER
        else order * 4 * grid(n) * grid(n) * inner(n)
        for n in adapter.refinement_layers
    )
    return flops


def least_flops(adapter, latent_hw, text_len: int) -> int:
    """The FLOPs any exact implementation of one `goca` segmentation needs beyond the forward, whatever its kernels:
    the capture's products as `extra_flops` counts them (text scores and outputs, head-weight projections), and every
    score matrix formed once, by one QKᵀ pass: per layer weight over the distinct queries and the layer's own keys
    (the text shares of a joint layer read in the same pass), A_p, and per refinement layer its head-mean S, the
    propagation itself (k products with S at the map grid) being small beside it."""

    def grid(name):
        return tokens(adapter, name, latent_hw)

    def inner(name):
        return adapter.denoiser.get_submodule(name).to_q.out_features

    flops = extra_flops(adapter, latent_hw, text_len)
    n_ref = grid(adapter.reference_layer)
    total = flops["text maps"] + flops["head weights"] + 2 * n_ref * n_ref * inner(adapter.reference_layer)
    for name in adapter.cross_layers:
        own = adapter.self_of(name)
        total += 2 * min(grid(own), n_ref) * grid(own) * inner(own)
    return total + sum(2 * grid(n) * grid(n) * inner(n) for n in adapter.refinement_layers)


def forward_flops(name: str, px: int) -> int:
    """The denoiser forward's FLOPs for one image, counted on the meta device."""
    args = argparse.Namespace(model=name, resolution=px, layers=None, device="meta", cfg=False)
    with quiet_casts():  # build casts its config-built model to bfloat16 on the meta device: no weights to keep
        _, run = build(args, torch.bfloat16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def families(resolution: int | None):
    """(name, adapter, px, latent_hw) of every family, at `resolution` or its native one."""
    for name in NATIVE:
        px = resolution or NATIVE[name]
        latent = px // 8
        # Flux packs 2×2 latent patches before the transformer; its adapter's grid is in packed tokens.
        latent_hw = (latent // 2, latent // 2) if name == "flux-dev" else (latent, latent)
        yield name, adapter_for(host_for(name)), px, latent_hw


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--columns",
        type=int,
        default=16,
        help="token columns kept by the joint families (content + special tokens); cross-attention families keep all",
    )
    p.add_argument("--resolution", type=int, default=None, help="default: each family's native resolution")
    p.add_argument("--offload-above-mib", type=float, default=256)
    args = p.parse_args(argv)
    gib, mib = 2**30, 2**20
    print(
        "| model | px | held on the accelerator | offloaded to host | transient | held + transient | bound "
        "| store every map (official) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, adapter, px, latent_hw in families(args.resolution):
        # Cross-attention families keep every text column their softmax reads (the clamp and L1 sum run over all).
        columns = args.columns if adapter.joint else TEXT_TOKENS[name]
        plan = memory_plan(
            adapter, latent_hw, columns, TEXT_TOKENS[name], offload_above=int(args.offload_above_mib * mib)
        )
        everything = store_everything(adapter, latent_hw, TEXT_TOKENS[name], 2)
        bound = f"≤ {BOUNDS[name]} GiB" if name in BOUNDS else "–"
        print(
            f"| {name} | {px} | {plan['held'] / mib:.0f} MiB | {plan['offloaded'] / mib:.0f} MiB "
            f"| {plan['transient'] / mib:.0f} MiB | {(plan['held'] + plan['transient']) / gib:.2f} GiB | {bound} "
            f"| {everything / gib:.1f} GiB |"
        )
    print()
    print(
        "| model | px | forward | text maps | head weights | text share | layer weights | refinement | extra / forward "
        "| least exact / forward | extra / forward, layer_weight_stride=2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, adapter, px, latent_hw in families(args.resolution):
        extra, forward = extra_flops(adapter, latent_hw, TEXT_TOKENS[name]), forward_flops(name, px)
        parts = " | ".join(f"{v / 1e12:.2f} TFLOP" for v in extra.values())
        least = least_flops(adapter, latent_hw, TEXT_TOKENS[name])
        strided = (
            "–"
            if adapter.joint
            else f"{sum(extra_flops(adapter, latent_hw, TEXT_TOKENS[name], 2).values()) / forward:.2f}×"
        )
        print(
            f"| {name} | {px} | {forward / 1e12:.2f} TFLOP | {parts} | {sum(extra.values()) / forward:.2f}× "
            f"| {least / forward:.2f}× | {strided} |"
        )


if __name__ == "__main__":
    main()
