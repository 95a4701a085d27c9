"""What the CPU test suite cannot see: GoCA on a CUDA device, on the tiny pipelines of every family.

    PYTHONPATH=. python benchmarks/gpu_checks.py               # exits 1 on any failed check
    PYTHONPATH=. python benchmarks/gpu_checks.py --device cpu  # the same checks against itself, as a dry run

For each family, in float32 and in the half precision its users run:
  - images with GoCA enabled and masks computed at every step are bit-identical to the untouched pipeline's;
  - `segment` with every captured layer offloaded to the host gives the same scores twice, and the labels it gives
    with everything resident;
  - (float32) `segment` on the GPU gives the labels `segment` gives on the CPU, and those it gives under
    `enable_model_cpu_offload` (where the images with masks must also stay bit-identical);
  - where triton is installed, the layer weights of the Triton kernel (`layer_weight_kernel`) equal those of the fused
    attention call (float32: 1e-4 relative; half precision, whose fused call adds log W rounded to the model dtype:
    5e-2), and its labels agree.
Labels must agree on 95 % of the pixels, or, for a tiny model so chaotic that a 1e-6 relative change of its weights
moves more of its labels (the first row of each family), within 5 points of that.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

import diffusers_goca as goca
from diffusers_goca.functional import frobenius_kernel
from diffusers_goca.testing import (
    generate,
    make_tiny_flux,
    make_tiny_pixart,
    make_tiny_sd,
    make_tiny_sd3,
    make_tiny_sdxl,
    with_kernel,
)

FAMILIES = {
    "sd": (make_tiny_sd, torch.float16),
    "sdxl": (make_tiny_sdxl, torch.float16),
    "pixart-sigma": (make_tiny_pixart, torch.bfloat16),
    "sd3": (make_tiny_sd3, torch.bfloat16),
    "flux": (make_tiny_flux, torch.bfloat16),
}
CLASSES = ["cat", "dog"]


def segment_scores(pipe, image, offload_above_mib):
    pipe.enable_goca(offload_above_mib=offload_above_mib)
    return pipe.segment(image, CLASSES, resolution=32).scores.float().cpu()


def kernel_rows(name, gp, image, dtype, min_agreement):
    """The Triton layer-weight kernel against the fused attention call, both on the device."""
    fused, fused_w = with_kernel("torch", lambda: segment_scores(gp, image, None))
    kernel, kernel_w = with_kernel("triton", lambda: segment_scores(gp, image, None))
    rtol = 1e-4 if dtype == torch.float32 else 5e-2
    diff = float(((kernel_w - fused_w).abs() / fused_w.abs().clamp_min(1e-12)).max())
    return [
        (name, str(dtype), "Triton kernel = fused call: layer weights", diff <= rtol, f"max relative diff {diff:.1e}"),
        compare(name, dtype, "Triton kernel = fused call", kernel, fused, min_agreement),
    ]


def compare(family, dtype, what, scores, reference, min_agreement):
    """A row of the report: labels (argmax over classes) agree on at least `min_agreement` of the pixels. Scores are
    min-max normalised per class, so on a tiny random model a near-constant map turns rounding into large score
    differences; the labels are what a user reads."""
    agree = float((scores.argmax(0) == reference.argmax(0)).float().mean())
    diff = float((scores - reference).abs().max())
    return (
        family,
        str(dtype),
        f"{what} labels",
        agree >= min_agreement,
        f"{agree:.1%} agree, max |score diff| {diff:.1e}",
    )


def offload_rows(name, make, image, resident, min_agreement, device):
    """`enable_model_cpu_offload`: the weights wait on the host and each model moves to the GPU for its forward."""
    pipe = make()
    pipe.enable_model_cpu_offload(device=device)
    reference = generate(pipe)
    gp = goca.from_pipe(pipe)
    rows = [
        (
            name,
            "torch.float32",
            "model CPU offload: images bit-identical with masks",
            bool(np.array_equal(generate(gp, goca_masks=True), reference)),
            "",
        )
    ]
    rows.append(
        compare(
            name,
            torch.float32,
            "model CPU offload: segment = resident",
            segment_scores(gp, image, None),
            resident,
            min_agreement,
        )
    )
    gp.disable_goca()
    return rows


def check_family(name, make, half, device):
    rows = []
    image = np.random.default_rng(0).random((40, 56, 3)).astype(np.float32)
    cpu_pipe = goca.from_pipe(make())
    cpu_scores = cpu_pipe.segment(image, CLASSES, resolution=32).scores.float()
    with torch.no_grad():  # how far rounding alone moves this tiny random model's labels: the bar for the comparisons
        for p in cpu_pipe._goca.adapter.denoiser.parameters():
            p.mul_(1 + 1e-6 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    perturbed = cpu_pipe.segment(image, CLASSES, resolution=32).scores.float()
    stable = float((perturbed.argmax(0) == cpu_scores.argmax(0)).float().mean())
    min_agreement = min(0.95, stable - 0.05)
    rows.append(compare(name, torch.float32, "CPU, weights × (1 ± 1e-6)", perturbed, cpu_scores, 0.0))
    for dtype in (torch.float32, half):
        pipe = make().to(device, dtype)
        reference = generate(pipe)
        gp = goca.from_pipe(pipe)
        masked = generate(gp, goca_masks=True)
        rows.append((name, str(dtype), "images bit-identical with masks", bool(np.array_equal(masked, reference)), ""))
        resident = segment_scores(gp, image, None)
        offloaded = segment_scores(gp, image, 0)
        again = segment_scores(gp, image, 0)
        rows.append(
            (
                name,
                str(dtype),
                "offloaded twice: identical scores",
                bool(torch.equal(offloaded, again)),
                "(side-stream copies: a race would show here)",
            )
        )
        rows.append(compare(name, dtype, "offloaded = resident", offloaded, resident, min_agreement))
        rows.append(
            (
                name,
                str(dtype),
                "resident again: identical scores",
                bool(torch.equal(resident, segment_scores(gp, image, None))),
                "",
            )
        )
        if dtype == torch.float32:
            rows.append(compare(name, dtype, "GPU = CPU", resident, cpu_scores, min_agreement))
            rows += offload_rows(name, make, image, resident, min_agreement, device)
        if frobenius_kernel.triton_available() and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            rows += kernel_rows(name, gp, image, dtype, min_agreement)
        gp.disable_goca()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for a dry run")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # GPU = CPU compares fp32 with fp32
    rows = []
    for name in args.families:
        make, half = FAMILIES[name]
        rows += check_family(name, make, half, args.device)
    width = max(len(r[2]) for r in rows)
    for family, dtype, what, ok, detail in rows:
        print(f"{'ok  ' if ok else 'FAIL'} {family:13s} {dtype:15s} {what:{width}s} {detail}")
    print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else args.device}, torch {torch.__version__}")
    sys.exit(0 if all(r[3] for r in rows) else 1)


if __name__ == "__main__":
    main()
