"""The Triton layer-weight kernel (`functional.frobenius_kernel`) against the fused attention call, on CPU tensors
under triton's interpreter: plain, joint, renormalised, coarse-grid and odd-head-dim layers, then through the SD3 and
SDXL pipelines. Skipped where triton is not installed; on a CUDA device, benchmarks/gpu_checks.py compares the two
paths compiled.

Triton reads TRITON_INTERPRET when it is imported, so both paths run in a fresh interpreter with it set: this file,
run as a script, which saves what each path gave; the tests compare them."""

import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_goca as goca
from diffusers_goca.functional import self_attention as sa
from diffusers_goca.functional.frobenius_kernel import layer_weight_kernel
from diffusers_goca.testing import make_tiny_sd3, make_tiny_sdxl, with_kernel

pytest.importorskip("triton", reason="the Triton layer-weight kernel needs triton (it ships with CUDA builds of torch)")

# One fresh interpreter that imports torch, diffusers and triton, then runs the kernel interpreted: over 10 s.
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# (heads, head dim, layer grid, reference grid, text keys, renormalise rows, image mass, operand dtype). Half
# precision: float16 only, as the interpreter's bfloat16 products are wrong (its integer view of bf16).
LAYERS = {
    "plain": (2, 16, (6, 5), (6, 5), 0, False, False, torch.float32),
    "joint": (3, 24, (8, 8), (8, 8), 11, False, False, torch.float32),
    "renorm-coarse-d72": (2, 72, (4, 6), (8, 12), 0, True, False, torch.float32),
    "mass": (4, 8, (9, 9), (9, 9), 0, False, True, torch.float32),
    "renorm-mass-finer-reference": (1, 32, (12, 10), (6, 5), 0, True, True, torch.float32),
    "joint-mass-float16": (3, 24, (8, 8), (8, 8), 11, False, True, torch.float16),
}
PIPELINES = {"sd3": make_tiny_sd3, "sdxl": make_tiny_sdxl}


def one_layer(heads, d, src, ref, t, renorm, mass, dtype):
    """(kernel, fused): `_frobenius`'s (total, text share) by the kernel and by the fused attention call."""
    torch.manual_seed(0)
    n, n_ref = src[0] * src[1], ref[0] * ref[1]
    q, k = torch.randn(n, heads * d), torch.randn(n, heads * d)
    k_txt = torch.randn(t, heads * d) if t else None
    a_p = torch.randn(n_ref, n_ref).softmax(-1)
    image_mass = torch.rand(heads, n) if mass else None
    args = (q, k, heads, d**-0.5, src, a_p, ref, renorm, image_mass, dtype, None, k_txt)
    with layer_weight_kernel("triton"):
        kernel = sa._frobenius(*args)
    with layer_weight_kernel("torch"):
        fused = sa._frobenius(*args)
    return kernel, fused


def through_the_pipeline(make):
    """(kernel, fused): a seeded segmentation's (scores, layer weights) by the kernel and by the fused call."""
    img = Image.fromarray((np.random.RandomState(0).rand(40, 40, 3) * 255).astype(np.uint8))
    pipe = goca.from_pipe(make())
    return [
        with_kernel(kernel, lambda: pipe.segment(img, ["cat", "grass"], resolution=64, seed=1).scores)
        for kernel in ("triton", "torch")
    ]


def run_all(out: str) -> None:
    """Every case under the interpreter (TRITON_INTERPRET=1, set before this process imported triton), saved to
    `out`: case → (kernel, fused), or the traceback of its failure."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    cases = [(name, one_layer, case) for name, case in LAYERS.items()]
    cases += [(name, through_the_pipeline, (make,)) for name, make in PIPELINES.items()]
    for name, fn, args in cases:
        try:
            results[name] = fn(*args)
        except Exception:
            results[name] = traceback.format_exc()
    torch.save(results, out)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """What `run_all` gave, in a fresh interpreter under TRITON_INTERPRET=1."""
    out = tmp_path_factory.mktemp("triton_kernel") / "results.pt"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    run = subprocess.run(
        [sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return torch.load(out, weights_only=False)


def result(interpreted, name):
    got = interpreted[name]
    if isinstance(got, str):
        pytest.fail(f"{name} failed under the interpreter:\n{got}")
    return got


@pytest.mark.parametrize("case", list(LAYERS))
def test_triton_layer_weight_kernel_equals_the_fused_call(interpreted, case):
    kernel, fused = result(interpreted, case)
    dtype, t = LAYERS[case][7], LAYERS[case][4]
    rtol = 1e-4 if dtype == torch.float32 else 2e-2  # float16: the fused call's bias log W is rounded to it
    assert torch.allclose(kernel[0], fused[0], rtol=rtol, atol=1e-6), (kernel[0].item(), fused[0].item())
    if t:
        assert torch.allclose(kernel[1], fused[1], rtol=rtol, atol=rtol * 1e-2), (kernel[1], fused[1])


@pytest.mark.parametrize("family", list(PIPELINES))
def test_triton_layer_weight_kernel_equals_the_fused_call_through_the_pipelines(interpreted, family):
    """Two seeded segmentations each: the joint layers' finish in the capture (SD3: the scores) and the layer weights
    after the forward (SDXL, coarse layers against a finer reference: its weights, as its tiny random maps are near
    flat and min-max scaling magnifies any rounding in them)."""
    (kernel_scores, kernel_weights), (fused_scores, fused_weights) = result(interpreted, family)
    if family == "sd3":
        a, b, atol = kernel_scores, fused_scores, 1e-4
    else:
        a, b, atol = kernel_weights, fused_weights, 1e-6
    assert torch.allclose(a, b, atol=atol), f"max difference {(a - b).abs().max().item():.2e}"


if __name__ == "__main__":
    run_all(sys.argv[1])
