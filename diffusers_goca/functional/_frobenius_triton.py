"""The Triton kernels of `frobenius_kernel`, in a module of their own so that triton is imported only when they run."""

import triton
import triton.language as tl


@triton.jit
def _exp_scores(q, K, stride_k, h, d, cols, col_ok, dims, dim_ok, scale, top, PRECISION: tl.constexpr):
    """One block of keys: e^{s − m'} [BM, BN], the rescale e^{m − m'} of the sums so far, and m' (running max)."""
    k = tl.load(K + cols[:, None] * stride_k + h * d + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    s = tl.where(col_ok[None, :], s, float("-inf"))
    new_top = tl.maximum(top, tl.max(s, 1))
    return tl.exp(s - new_top[:, None]), tl.exp(top - new_top), new_top


@triton.jit
def row_sums_kernel(
    Q,
    K,
    KT,
    W,
    COL,
    QIDX,
    OUT_W,
    OUT_COL,
    OUT_TEXT,
    n_queries,
    n_keys,
    n_text,
    d,
    scale,
    stride_q,
    stride_k,
    stride_kt,
    stride_w,
    HAS_COL: tl.constexpr,
    HAS_TEXT: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    block, h = tl.program_id(0), tl.program_id(1)
    rows = block * BM + tl.arange(0, BM)
    row_ok = rows < n_queries
    dims = tl.arange(0, BD)
    dim_ok = dims < d
    query = tl.load(QIDX + rows, mask=row_ok, other=0)
    q = tl.load(
        Q + query[:, None] * stride_q + h * d + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
    )
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
