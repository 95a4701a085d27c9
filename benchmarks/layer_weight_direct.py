"""One layer's layer-weight row sums by the fused attention call (the code's path: twice the keys, a log-weight bias,
a value product) against a direct chunked reduction (one QKᵀ pass, then the exponentials and the weighted row sums
elementwise), at real head counts and widths, on this machine. Prints both times and their largest difference.

    python benchmarks/layer_weight_direct.py            # SD 1.5's 64² layer, SD3 and PixArt-Σ at 1024 px
    python benchmarks/layer_weight_direct.py --device cuda

The direct form needs a quarter of the fused call's arithmetic but writes every score chunk to memory several times;
which is faster depends on the device. On CPU it is not faster (docs/performance.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusers_goca.functional.self_attention import _fused_row_sums, row_chunks

# (name, image tokens, heads, head dim, text keys of a joint layer or None)
LAYERS = [
    ("SD 1.5, 64² self-attention", 4096, 8, 40, None),
    ("SD3-medium joint, 1024 px", 4096, 24, 64, 333),
    ("PixArt-Σ self-attention, 1024 px", 4096, 16, 72, None),
]


def direct_row_sums(q, k, weights, heads, scale, k_txt=None):
    """[heads, N] shares Σ_k S[i, k] W[i, k] of the (joint) softmax S, and the text keys' shares (or None)."""
    n, hd = k.shape
    d = hd // heads
    keys = k.view(n, heads, d).permute(1, 2, 0)
    if k_txt is not None:
        keys = torch.cat([keys, k_txt.view(-1, heads, d).permute(1, 2, 0)], 2)
    share = torch.empty(heads, q.shape[0], device=q.device)
    text = None if k_txt is None else torch.empty_like(share)
    for a, b in row_chunks(q.shape[0], heads, keys.shape[2]):
        s = torch.baddbmm(
            torch.empty((), device=q.device), q[a:b].view(b - a, heads, d).transpose(0, 1), keys, beta=0, alpha=scale
        )
        s.sub_(s.amax(-1, keepdim=True)).exp_()
        z = s.sum(-1)
        share[:, a:b] = (s[..., :n] * weights[a:b]).sum(-1) / z
        if text is not None:
            text[:, a:b] = s[..., n:].sum(-1) / z
    return share, text


def timed(fn, device):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    for name, n, heads, d, t in LAYERS:
        q, k = (torch.randn(n, heads * d, device=args.device) for _ in range(2))
        k_txt = None if t is None else torch.randn(t, heads * d, device=args.device)
        weights = torch.rand(n, n, device=args.device)
        weights /= weights.sum(1, keepdim=True)
        queries = torch.arange(n, device=args.device)
        scale = d**-0.5
        fused_t, fused = timed(
            lambda: _fused_row_sums(q, k, queries, weights.log(), heads, scale, None, k_txt, torch.float32, {}),
            args.device,
        )
        direct_t, direct = timed(lambda: direct_row_sums(q, k, weights, heads, scale, k_txt), args.device)
        diff = (fused[0] - direct[0]).abs().max().item()
        print(
            f"{name:36s} fused {fused_t * 1e3:8.1f} ms   direct {direct_t * 1e3:8.1f} ms   "
            f"direct / fused {direct_t / fused_t:.2f}   max difference {diff:.1e}"
        )


if __name__ == "__main__":
    main()
