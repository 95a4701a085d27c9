"""The layer weights' per-query sums in one pass over the scores (ALGORITHMS §2), as a Triton kernel.

For head h and query i, with s_ik = q_i·k_k·scale, the kernel streams the keys once and keeps a running maximum and
the sums Σ_k e^{s_ik}, Σ_k W_ik e^{s_ik}, Σ_k c_k e^{s_ik} and, over text keys, Σ_t e^{s_it}. Against the fused
attention call of `self_attention._frobenius` (twice the keys, a bias tensor, a value product) that is a quarter of the
arithmetic: one QKᵀ pass, the floor `benchmarks/memory_plan.py` counts as `least_flops`.

Opt-in while its speed is unmeasured on a GPU: GOCA_KERNEL=triton (or a `layer_weight_kernel("triton")` block)
selects it on CUDA tensors (and, for the tests, on CPU tensors under TRITON_INTERPRET=1). The default stays the fused
attention call.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with CUDA builds of torch only
    triton = None


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


def kernel_enabled(t: torch.Tensor) -> bool:
    """Whether the layer weights of `t`'s device go through this kernel (GOCA_KERNEL=triton, or inside
    `layer_weight_kernel("triton")`)."""
    choice = _selected[-1] if _selected else os.environ.get("GOCA_KERNEL", "torch")
    if choice not in KERNELS:
        raise ValueError(f"GOCA_KERNEL must be one of {KERNELS}, got {choice!r}")
    if choice == "torch":
        return False
    if triton is None:
        raise RuntimeError("the Triton layer-weight kernel needs the triton package")
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _exp_scores(q, K, stride_k, h, d, cols, col_ok, dims, dim_ok, scale, top, PRECISION: tl.constexpr):
        """One block of keys: e^{s − m'} [BM, BN], the rescale e^{m − m'} of the sums so far, and m' (running max)."""
        k = tl.load(K + cols[:, None] * stride_k + h * d + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, 1))
        return tl.exp(s - new_top[:, None]), tl.exp(top - new_top), new_top

    @triton.jit
    def _row_sums_kernel(
        Q, K, KT, W, COL, QIDX, OUT_W, OUT_COL, OUT_TEXT,
        n_queries, n_keys, n_text, d, scale,
        stride_q, stride_k, stride_kt, stride_w,
        HAS_COL: tl.constexpr, HAS_TEXT: tl.constexpr, PRECISION: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ):
        block, h = tl.program_id(0), tl.program_id(1)
        rows = block * BM + tl.arange(0, BM)
        row_ok = rows < n_queries
        dims = tl.arange(0, BD)
        dim_ok = dims < d
        query = tl.load(QIDX + rows, mask=row_ok, other=0)
        q = tl.load(Q + query[:, None] * stride_q + h * d + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                    other=0.0)
        top = tl.full([BM], float("-inf"), tl.float32)
        plain = tl.zeros([BM], tl.float32)
        weighted = tl.zeros([BM], tl.float32)
        column = tl.zeros([BM], tl.float32)
        text = tl.zeros([BM], tl.float32)
        for start in range(0, n_keys, BN):
            cols = start + tl.arange(0, BN)
            col_ok = cols < n_keys
            p, alpha, top = _exp_scores(q, K, stride_k, h, d, cols, col_ok, dims, dim_ok, scale, top, PRECISION)
            w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            plain = plain * alpha + tl.sum(p, 1)
            weighted = weighted * alpha + tl.sum(p * w, 1)
            if HAS_COL:
                c = tl.load(COL + cols, mask=col_ok, other=0.0)
                column = column * alpha + tl.sum(p * c[None, :], 1)
        if HAS_TEXT:  # the text keys of a joint attention: in the normaliser, and their own share
            for start in range(0, n_text, BN):
                cols = start + tl.arange(0, BN)
                col_ok = cols < n_text
                p, alpha, top = _exp_scores(q, KT, stride_kt, h, d, cols, col_ok, dims, dim_ok, scale, top, PRECISION)
                plain = plain * alpha + tl.sum(p, 1)
                text = text * alpha + tl.sum(p, 1)
                weighted = weighted * alpha
                column = column * alpha
        out = h * n_queries + rows
        tl.store(OUT_W + out, weighted / plain, mask=row_ok)
        if HAS_COL:
            tl.store(OUT_COL + out, column / plain, mask=row_ok)
        if HAS_TEXT:
            tl.store(OUT_TEXT + out, text / plain, mask=row_ok)


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
    _row_sums_kernel[(triton.cdiv(n_q, bm), heads)](
        q, k, kt, weights, column, queries.contiguous(), out_w, out_col, out_text,
        n_q, k.shape[0], 0 if k_txt is None else k_txt.shape[0], d, scale,
        q.stride(0), k.stride(0), kt.stride(0), weights.stride(0),
        HAS_COL=key_column is not None, HAS_TEXT=k_txt is not None,
        PRECISION="ieee" if dtype == torch.float32 else None,  # fp32 operands: no TF32 rounding, as the fused call
        BM=bm, BN=bn, BD=max(16, triton.next_power_of_2(d)),
    )
    return out_w, out_col if key_column is not None else None, out_text if k_txt is not None else None
