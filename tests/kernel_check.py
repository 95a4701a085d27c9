"""Run by test_functional under TRITON_INTERPRET=1 and GOCA_KERNEL=triton: the Triton layer-weight kernel against the
fused-attention path on CPU tensors, for plain, joint, renormalised, coarse-grid and odd-head-dim layers. Prints one
line per case; exits 1 on a mismatch."""
import os
import sys

import torch

from diffusers_goca.functional import self_attention as sa
from diffusers_goca.functional.frobenius_kernel import layer_weight_kernel


def both(fn, *args):
    """fn(*args) with the kernel (GOCA_KERNEL=triton), then with the fused attention call."""
    kernel = fn(*args)
    with layer_weight_kernel("torch"):
        return kernel, fn(*args)


assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("GOCA_KERNEL") == "triton"
torch.manual_seed(0)
failed = False
# (heads, head dim, layer grid, reference grid, text keys, renormalise rows, image mass, operand dtype). Half
# precision: float16 only, as the interpreter's bfloat16 products are wrong (its integer view of bf16).
for heads, d, src, ref, t, renorm, mass, dtype in [(2, 16, (6, 5), (6, 5), 0, False, False, torch.float32),
                                                    (3, 24, (8, 8), (8, 8), 11, False, False, torch.float32),
                                                    (2, 72, (4, 6), (8, 12), 0, True, False, torch.float32),
                                                    (4, 8, (9, 9), (9, 9), 0, False, True, torch.float32),
                                                    (1, 32, (12, 10), (6, 5), 0, True, True, torch.float32),
                                                    (3, 24, (8, 8), (8, 8), 11, False, True, torch.float16)]:
    n, n_ref = src[0] * src[1], ref[0] * ref[1]
    q, k = torch.randn(n, heads * d), torch.randn(n, heads * d)
    k_txt = torch.randn(t, heads * d) if t else None
    a_p = torch.randn(n_ref, n_ref).softmax(-1)
    image_mass = torch.rand(heads, n) if mass else None
    args = (q, k, heads, d ** -0.5, src, a_p, ref, renorm, image_mass, dtype, None, k_txt)
    kernel, fused = both(sa._frobenius, *args)
    rtol = 1e-4 if dtype == torch.float32 else 2e-2  # float16: the fused call's bias log W is rounded to it
    total_ok = torch.allclose(kernel[0], fused[0], rtol=rtol, atol=1e-6)
    text_ok = t == 0 or torch.allclose(kernel[1], fused[1], rtol=rtol, atol=rtol * 1e-2)
    failed |= not (total_ok and text_ok)
    print(f"heads {heads} d {d} {src}→{ref} text {t} renorm {renorm} mass {mass} {dtype}: "
          f"kernel {kernel[0].item():.6f} fused {fused[0].item():.6f} {'ok' if total_ok and text_ok else 'MISMATCH'}")

# Through the pipelines, two seeded segmentations each: the joint layers' finish in the capture (SD3: scores) and
# the layer weights after the forward (SDXL, coarse layers against a finer reference: its weights, as its tiny random
# maps are near flat and min-max scaling magnifies any rounding in them).
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import diffusers_goca as goca  # noqa: E402
from conftest import make_tiny_sd3, make_tiny_sdxl, with_kernel  # noqa: E402

img = Image.fromarray((np.random.RandomState(0).rand(40, 40, 3) * 255).astype(np.uint8))
sd3, sdxl = goca.from_pipe(make_tiny_sd3()), goca.from_pipe(make_tiny_sdxl())
compared = {}
for name, pipe in (("sd3", sd3), ("sdxl", sdxl)):
    compared[name] = [with_kernel(kernel, lambda: pipe.segment(img, ["cat", "grass"], resolution=64, seed=1).scores)
                      for kernel in ("triton", "torch")]
(sd3_kernel, _), (sd3_fused, _) = compared["sd3"]
(_, sdxl_kernel), (_, sdxl_fused) = compared["sdxl"]
for name, a, b, atol in (("sd3 scores", sd3_kernel, sd3_fused, 1e-4),
                         ("sdxl layer weights", sdxl_kernel, sdxl_fused, 1e-6)):
    ok = torch.allclose(a, b, atol=atol)
    failed |= not ok
    print(f"{name}: max difference {(a - b).abs().max().item():.2e} {'ok' if ok else 'MISMATCH'}")
sys.exit(1 if failed else 0)
