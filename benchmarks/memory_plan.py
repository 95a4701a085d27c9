"""The capture's memory plan at full size, from the real configs on the meta device (no weights, no GPU needed).

    python benchmarks/memory_plan.py                  # every family at its native resolution
    python benchmarks/memory_plan.py --columns 40     # a longer class list

For one segmented image in the model dtype: what the capture holds on the accelerator, what it offloads to host
memory, its largest transient working set, and what storing every attention map (the official code) would take.
`diffusers_goca.capture.memory_plan` follows the same rules as the capture; a test checks it equals the capture's own
byte accounting on small models.
"""
from __future__ import annotations

import argparse

import diffusers
from accelerate import init_empty_weights
from real_configs import TEXT_TOKENS, TRANSFORMERS, UNETS

from diffusers_goca.capture import memory_plan
from diffusers_goca.clip_bpe import build_clip_tokenizer
from diffusers_goca.mixin import GoCAMixin
from diffusers_goca.models import adapter_for

NATIVE = {"sd15": 512, "sdxl": 1024, "pixart-sigma": 1024, "sd3-medium": 1024, "flux-dev": 1024}
BOUNDS = {"pixart-sigma": 1.0, "flux-dev": 1.5}  # GiB, held + transient (issue #3)


class Host(GoCAMixin):
    def __init__(self, **parts):
        self.__dict__.update(parts)


def host_for(name: str):
    with init_empty_weights():
        if name in UNETS:
            return Host(unet=diffusers.UNet2DConditionModel(**UNETS[name]), tokenizer=build_clip_tokenizer(),
                        vae_scale_factor=8)
        cls_name, _, config = TRANSFORMERS[name]
        return Host(transformer=getattr(diffusers, cls_name)(**config), vae_scale_factor=8, default_sample_size=128)


def store_everything(adapter, latent_hw, text_len: int, dtype_bytes: int) -> int:
    """Every attention probability map of the step in the model dtype: [heads, N, keys] per layer."""
    total = 0
    for name, info in adapter.layers.items():
        attn = adapter.denoiser.get_submodule(name)
        n = -(-latent_hw[0] // info.factor) * -(-latent_hw[1] // info.factor)
        keys = {"cross": text_len, "self": n, "joint": n + text_len}[info.role]
        total += attn.heads * n * keys * dtype_bytes
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--columns", type=int, default=16, help="token columns kept (content + special tokens)")
    p.add_argument("--resolution", type=int, default=None, help="default: each family's native resolution")
    p.add_argument("--offload-above-mib", type=float, default=256)
    args = p.parse_args(argv)
    gib, mib = 2**30, 2**20
    print("| model | px | held on the accelerator | offloaded to host | transient | held + transient | bound "
          "| store every map (official) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in NATIVE:
        adapter = adapter_for(host_for(name))
        px = args.resolution or NATIVE[name]
        latent = px // 8
        # Flux packs 2×2 latent patches before the transformer; its adapter's grid is in packed tokens.
        latent_hw = (latent // 2, latent // 2) if name == "flux-dev" else (latent, latent)
        plan = memory_plan(adapter, latent_hw, args.columns, TEXT_TOKENS[name],
                           offload_above=int(args.offload_above_mib * mib))
        everything = store_everything(adapter, latent_hw, TEXT_TOKENS[name], 2)
        bound = f"≤ {BOUNDS[name]} GiB" if name in BOUNDS else "–"
        print(f"| {name} | {px} | {plan['held'] / mib:.0f} MiB | {plan['offloaded'] / mib:.0f} MiB "
              f"| {plan['transient'] / mib:.0f} MiB | {(plan['held'] + plan['transient']) / gib:.2f} GiB | {bound} "
              f"| {everything / gib:.1f} GiB |")


if __name__ == "__main__":
    main()
