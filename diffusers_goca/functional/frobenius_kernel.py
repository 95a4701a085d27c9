"""The layer weights' per-query sums in one pass over the scores (docs/official_code.md), as a Triton kernel.

For head h and query i, with s_ik = q_i·k_k·scale, the kernel streams the keys once and keeps a running maximum and
the sums Σ_k e^{s_ik}, Σ_k W_ik e^{s_ik}, Σ_k c_k e^{s_ik} and, over text keys, Σ_t e^{s_it}. Against the fused
attention call of `self_attention._frobenius` (twice the keys, a bias tensor, a value product) that is a quarter of the
arithmetic: one QKᵀ pass, the floor `benchmarks/memory_plan.py` counts as `least_flops`.

Opt-in while its speed is unmeasured on a GPU: GOCA_KERNEL=triton (or a `layer_weight_kernel("triton")` block)
selects it on CUDA tensors (and, for the tests, on CPU tensors under TRITON_INTERPRET=1). The default stays the fused
attention call.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

import torch


KERNELS = ("torch", "triton")
_selected: list[str] = []  # `layer_weight_kernel` blocks, innermost last


@contextmanager
def layer_weight_kernel(kernel: str):
    """Within the block, the layer weights go through `kernel` ("torch": the fused attention call, or "triton"),
    whatever GOCA_KERNEL says; for benchmarks and checks that compare the two in one process."""
    if kernel not in KERNELS:
        raise ValueError(f"the layer-weight kernel must be one of {KERNELS}, got {kernel!r}")
    _selected.append(kernel)
    try:
        yield
    finally:
        _selected.pop()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_enabled(t: torch.Tensor) -> bool:
    """Whether the layer weights of `t`'s device go through this kernel (GOCA_KERNEL=triton, or inside
    `layer_weight_kernel("triton")`)."""
    choice = _selected[-1] if _selected else os.environ.get("GOCA_KERNEL", "torch")
    if choice not in KERNELS:
        raise ValueError(f"GOCA_KERNEL must be one of {KERNELS}, got {choice!r}")
    if choice == "torch":
        return False
    if not triton_available():
        raise RuntimeError("the Triton layer-weight kernel needs the triton package (it ships with CUDA builds of torch)")
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def row_sums(
    q: torch.Tensor, k: torch.Tensor, queries: torch.Tensor, weights: torch.Tensor, heads: int, scale: float,
    key_column: torch.Tensor | None = None, k_txt: torch.Tensor | None = None, dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per head and query row, the shares of the softmax over [k; k_txt] (the joint one when text keys are given):

        R[h, i] = Σ_k S_h[i, k] W[i, k],  column[h, i] = Σ_k S_h[i, k] c_k,  text[h, i] = Σ_t S_h[i, t]

    with S_h[i, ·] = softmax(q_{queries[i]} · [k; k_txt]ᵀ · scale) of head h, k running over the image keys only.
    q: [N_q, heads·d], k: [N_k, heads·d], k_txt: [T, heads·d]; queries: LongTensor [Q]; weights: W [Q, N_k];
    key_column: c [N_k]. The scores in fp32 from operands in `dtype` (default q's). Returns ([heads, Q] fp32, the
    column's [heads, Q] or None, the text's [heads, Q] or None).
    """
    import triton  # on first use: only the sessions that select the kernel import triton

    from ._frobenius_triton import row_sums_kernel

    d = q.shape[1] // heads
    dtype = dtype or q.dtype
    q, k = q.to(dtype).contiguous(), k.to(dtype).contiguous()
    kt = k if k_txt is None else k_txt.to(dtype).contiguous()
    weights = weights.float().contiguous()
    column = torch.zeros(1, device=q.device) if key_column is None else key_column.float().contiguous()
    n_q = len(queries)
    out_w = torch.empty(heads, n_q, device=q.device)
    out_col = torch.empty(heads, n_q, device=q.device) if key_column is not None else out_w
    out_text = torch.empty(heads, n_q, device=q.device) if k_txt is not None else out_w
    bm, bn = 64, 64
    row_sums_kernel[(triton.cdiv(n_q, bm), heads)](
        q, k, kt, weights, column, queries.contiguous(), out_w, out_col, out_text,
        n_q, k.shape[0], 0 if k_txt is None else k_txt.shape[0], d, scale,
        q.stride(0), k.stride(0), kt.stride(0), weights.stride(0),
        HAS_COL=key_column is not None, HAS_TEXT=k_txt is not None,
        PRECISION="ieee" if dtype == torch.float32 else None,  # fp32 operands: no TF32 rounding, as the fused call
        BM=bm, BN=bn, BD=max(16, triton.next_power_of_2(d)),
    )
    return out_w, out_col if key_column is not None else None, out_text if k_txt is not None else None
