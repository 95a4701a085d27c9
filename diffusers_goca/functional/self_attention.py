"""Self-attention reductions computed from queries and keys, so that no [heads, N, N] tensor is formed.

The fused attention kernel (`scaled_dot_product_attention`) does the work wherever the reduction is an attention with
other values: the refinement product S̃·X (X as the values) and the layer weights' Frobenius product (an additive
log-weight bias on a second copy of the keys). Explicit score rows, in chunks, only form the head-mean S at the map
grid when many products are wanted.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .frobenius_kernel import kernel_enabled, row_sums

# Elements of one [heads, rows, N] score chunk (or [rows, 2·N] bias chunk); 2^24 fp32 = 64 MiB.
CHUNK_ELEMENTS = 2**24


def compute_dtype(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the side path's large products on `t`'s device (fused attention calls, head-weight projections):
    `dtype` if given, else fp32 on CPU (where half-precision kernels are slow) and `t`'s own dtype on accelerators
    (their kernels accumulate in fp32; an fp32 matmul there runs at a fraction of the half-precision rate)."""
    if dtype is not None:
        return dtype
    return torch.float32 if t.device.type == "cpu" else t.dtype


def logits(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """scale · (a @ b) for 3-D operands [B, n, d] @ [B, d, m], the operands in `dtype` and the result in fp32:
    attention logits of half-precision operands kept at fp32, as fused attention kernels keep them (a half-precision
    result would round a logit of 10 by up to 0.04, i.e. its probability by 4 %). The scale rides on the product
    where the kernel takes one, so that it costs no pass of its own over the logits."""
    a, b = a.to(dtype), b.to(dtype)
    if dtype != torch.float32 and a.device.type == "cuda":
        try:
            out = torch.bmm(a, b, out_dtype=torch.float32)
            return out if scale == 1 else out.mul_(scale)
        except TypeError:  # torch < 2.8 has no out_dtype
            pass
    # The same numbers where no half-precision kernel with fp32 output exists; beta = 0: the input is not read.
    return torch.baddbmm(torch.empty((), device=a.device), a.float(), b.float(), beta=0, alpha=scale)


def grid_nearest_rows(src_hw: tuple[int, int], dst_hw: tuple[int, int], device=None) -> torch.Tensor:
    """Index of the `src` grid cell that nearest-neighbour resizing puts at each `dst` cell: LongTensor [dst_h·dst_w].

    Matches `F.interpolate(mode="nearest")` (floor(i · src / dst)). Computed on the host (it depends on the grid
    sizes only) and copied without waiting for the device's queue.
    """
    (sh, sw), (dh, dw) = src_hw, dst_hw
    ys, xs = np.arange(dh) * sh // dh, np.arange(dw) * sw // dw
    rows = torch.from_numpy((ys[:, None] * sw + xs[None, :]).reshape(-1))
    return rows if device is None else rows.to(device, non_blocking=True)


def self_attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor | slice,
    heads: int,
    scale: float,
    image_mass: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean attention probabilities of the query rows `rows`.

    q: [N, heads·d], k: [M, heads·d] (one image, before the head split), rows: LongTensor [R] (or a slice, which
    gathers nothing). image_mass: [heads, N], for a joint attention the share of each query's softmax that falls on
    the image keys; the rows are then the image→image slice of the joint softmax, not renormalised. None: softmax
    over `k`. out: where to write the result.
    Returns [R, M] in fp32: mean over heads of softmax(q_h k_hᵀ · scale) (· image_mass); the logits in fp32 from
    operands in `compute_dtype(q, dtype)`.
    """
    d = q.shape[-1] // heads
    qr = q[rows]
    qh = qr.view(len(qr), heads, d).transpose(0, 1)  # [heads, R, d]
    kh = k.view(-1, heads, d).permute(1, 2, 0)  # [heads, d, M]
    probs = logits(qh, kh, compute_dtype(q, dtype), scale).softmax(-1)
    if image_mass is not None:
        probs = probs * image_mass[:, rows, None].float()
    return torch.mean(probs, 0, out=out)


def row_chunks(n_rows: int, heads: int, n_keys: int):
    """(start, end) of query-row chunks whose [heads, rows, n_keys] scores hold at most CHUNK_ELEMENTS."""
    step = max(1, CHUNK_ELEMENTS // max(1, heads * n_keys))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def head_mean_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    scale: float,
    src_hw: tuple[int, int],
    dst_hw: tuple[int, int],
    image_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean self-attention resized to the `dst` grid: queries nearest, keys bilinear, rows not renormalised.

    q, k: [N_src, heads·d] of one image with N_src = src_h·src_w. Returns [N_dst, N_dst] fp32 (small grids only:
    `apply_self_attention` gives S̃·X without forming S̃).
    """
    same_grid = tuple(src_hw) == tuple(dst_hw)
    rows = None if same_grid else grid_nearest_rows(src_hw, dst_hw, q.device)
    n_dst = dst_hw[0] * dst_hw[1]
    out = torch.empty(n_dst, n_dst, dtype=torch.float32, device=q.device)
    for a, b in row_chunks(n_dst, heads, k.shape[0]):
        if same_grid:  # the rows are the queries themselves: no gather, no copy
            self_attention_rows(q, k, slice(a, b), heads, scale, image_mass, out=out[a:b])
        else:
            out[a:b] = resize_keys(self_attention_rows(q, k, rows[a:b], heads, scale, image_mass), src_hw, dst_hw)
    return out


def resize_keys(rows: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the key axis: [R, src_h·src_w] → [R, dst_h·dst_w]."""
    if tuple(src_hw) == tuple(dst_hw):
        return rows
    img = rows.view(len(rows), 1, *src_hw)
    return F.interpolate(img, size=dst_hw, mode="bilinear", align_corners=False).view(len(rows), -1)


def resize_keys_adjoint(x: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Bᵀ·x for the bilinear key resize B (src → dst): [dst_h·dst_w, K] → [src_h·src_w, K], so that
    resize_keys(S)·x = S·(Bᵀ·x). B is separable, so this is two small products with its per-axis factors:
    deterministic, unlike the bilinear resize's own backward, whose CUDA atomics sum in a varying order."""
    if tuple(src_hw) == tuple(dst_hw):
        return x
    (sh, sw), (dh, dw) = src_hw, dst_hw
    rows, cols = linear_resize_matrix(sh, dh, x.device), linear_resize_matrix(sw, dw, x.device)
    out = torch.einsum("ya,yxk->axk", rows, x.float().view(dh, dw, -1))  # one axis at a time: O(N·(h + w)·K)
    return torch.einsum("xb,axk->abk", cols, out).reshape(sh * sw, -1)


def linear_resize_matrix(src: int, dst: int, device=None) -> torch.Tensor:
    """[dst, src]: the 1-D linear resize (align_corners=False) as a matrix, one axis' factor of the bilinear resize."""
    eye = torch.eye(src, device=device)[None]  # src one-hot signals of length src
    return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0].T


def apply_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    scale: float,
    src_hw: tuple[int, int],
    dst_hw: tuple[int, int],
    x: torch.Tensor,
    image_mass: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """S̃·x with S̃ = `head_mean_self_attention(...)`, through the fused attention kernel (x as the values).

    q, k: [N_src, heads·d]; x: [N_dst, K] → [N_dst, K] fp32. The kernel runs in `compute_dtype(q, dtype)`.
    """
    n, hd = q.shape
    d = hd // heads
    dtype = compute_dtype(q, dtype)
    xs = resize_keys_adjoint(x.float(), src_hw, dst_hw)  # [N_src, K]
    qh = q.to(dtype).view(1, n, heads, d).transpose(1, 2)
    kh = k.to(dtype).view(1, -1, heads, d).transpose(1, 2)
    outs = []
    for c in range(0, xs.shape[1], d):  # values as wide as the head dim keep the fast kernels
        cols = xs[:, c : c + d]
        v = F.pad(cols, (0, d - cols.shape[1])).to(dtype).view(1, 1, -1, d).expand(1, heads, -1, d)
        y = F.scaled_dot_product_attention(qh, kh, v, scale=scale)[0].float()  # [heads, N_src, d]
        if image_mass is not None:
            y = y * image_mass.float()[..., None]
        outs.append(y.mean(0)[:, : cols.shape[1]])
    out = torch.cat(outs, -1)
    return out if tuple(src_hw) == tuple(dst_hw) else out[grid_nearest_rows(src_hw, dst_hw, q.device)]


class GridWeights(NamedTuple):
    """What the layer weights of every layer on one grid read from A_p (`reference_weights`).

    queries: LongTensor, the layer's query rows the reference grid reads (nearest resize), each once, sorted;
    log_weights: [len(queries), N_src] fp32, log(A_p B) with B the bilinear key resize, the rows of reference cells
    that read the same query summed (the Frobenius product is linear in them);
    buffers: the constant inputs of the fused calls (marker values, the bias rows, the key column of renormalised
    rows), made by the grid's first layer and reused by the others, so that each layer launches only the work that
    differs.
    """

    queries: torch.Tensor
    log_weights: torch.Tensor
    buffers: dict


def strided_cells(hw: tuple[int, int], stride: int) -> np.ndarray:
    """Flat indices of the cells of an (h, w) grid whose row and column are multiples of `stride` (all for 1)."""
    ys, xs = np.arange(0, hw[0], stride), np.arange(0, hw[1], stride)
    return (ys[:, None] * hw[1] + xs[None, :]).reshape(-1)


def queries_read(src_hw: tuple[int, int], ref_hw: tuple[int, int], row_stride: int = 1):
    """(cells, queries, group): the reference cells the layer weights read (every row_stride-th row and column), the
    distinct `src` queries they read by nearest resize (sorted; one per cell when none repeats), and each cell's
    query as an index into `queries`. Numpy: it depends on the grid sizes only, and on the device the size of
    unique's output would make the host wait for the device."""
    cells = strided_cells(ref_hw, row_stride)
    queries, group = np.unique(grid_nearest_rows(src_hw, ref_hw).numpy()[cells], return_inverse=True)
    return cells, queries, group


def reference_weights(
    reference_attention: torch.Tensor, src_hw: tuple[int, int], ref_hw: tuple[int, int], row_stride: int = 1
) -> GridWeights:
    """What the layer weights of every layer on the `src` grid read from A_p (see `GridWeights`); with
    `row_stride` s > 1, from the rows of A_p at every s-th row and column of the reference grid only."""
    device = reference_attention.device
    cells, queries, group = queries_read(src_hw, ref_hw, row_stride)
    if row_stride > 1:
        reference_attention = reference_attention[torch.from_numpy(cells).to(device, non_blocking=True)]
    weights = resize_keys_adjoint(reference_attention.T, src_hw, ref_hw).T  # A_p B: [N_ref (sampled), N_src]
    if len(queries) < len(cells):  # a one-hot product, not index_add_: CUDA's atomics would sum in a varying order
        onehot = np.zeros((len(queries), len(cells)), dtype=np.float32)
        onehot[group, np.arange(len(cells))] = 1
        weights = torch.from_numpy(onehot).to(device, non_blocking=True) @ weights
    return GridWeights(torch.from_numpy(queries).to(device, non_blocking=True), weights.clamp_min(1e-30).log_(), {})


def frobenius_with_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    scale: float,
    src_hw: tuple[int, int],
    reference_attention: torch.Tensor,
    ref_hw: tuple[int, int],
    renormalize_rows: bool = False,
    image_mass: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    prepared=None,
    row_stride: int = 1,
) -> torch.Tensor:
    """w_l before normalisation (docs/official_code.md): Σ_ij A_p[i, j] · S̃_l[i, j], through the fused attention kernel.
    With `row_stride` s > 1, the sum runs over the rows i at every s-th row and column of the reference grid (about
    1/s² of the work; an estimate of w_l up to a factor common to all layers, which their normalisation removes).

    q, k: [N_l, heads·d] of one image's self-attention layer; reference_attention: A_p = softmax(F Fᵀ / √C)
    [N_ref, N_ref] (`pseudo_self_attention`, computed once for all layers); S̃_l = head-mean self-attention resized to
    the reference grid (rows renormalised to sum 1 after resizing when `renormalize_rows`; the official code does not).
    image_mass: [heads, N_l], for joint attention (the image→image slice of the joint softmax).
    prepared: `reference_weights(reference_attention, src_hw, ref_hw, row_stride)`, when the caller shares it between
    the layers of one grid.

    The key resize moves onto A_p (Σ_j A_p[i, j] (S Bᵀ)[i, j] = Σ_k S[i, k] (A_p B)[i, k] =: R_i). Each query then
    attends to its keys twice: once with log(A_p B)[i, k] added to the scores, once plain. The values mark the first
    copy, so the output is Σ_k e^{s_ik}(A_p B)_ik / (Σ_k e^{s_ik}(A_p B)_ik + Σ_k e^{s_ik}) = R_i / (1 + R_i), from
    which R_i follows. No score matrix exists outside the kernel; the bias is one [rows, 2·N_l] chunk shared by
    all heads. The kernel runs in `compute_dtype(q, dtype)`. Returns a 0-d fp32 tensor. Where the layer-weight kernel
    setting selects Triton (`frobenius_kernel.set_layer_weight_kernel` / `layer_weight_kernel`), R_i comes from a
    single pass over the scores instead (`frobenius_kernel.row_sums`).

    A layer coarser than the reference grid sends each of its queries to several reference rows (nearest resize).
    R is linear in the weight row and the row mass depends only on the query, so those rows' weights are summed and
    each query attends once (SDXL's 32×32 layers against the 64×64 reference: 4× fewer queries).
    """
    prepared = prepared or reference_weights(reference_attention, src_hw, ref_hw, row_stride)
    return _frobenius(
        q, k, heads, scale, src_hw, reference_attention, ref_hw, renormalize_rows, image_mass, dtype, prepared
    )[0]


def joint_frobenius_with_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    k_txt: torch.Tensor,
    heads: int,
    scale: float,
    src_hw: tuple[int, int],
    reference_attention: torch.Tensor,
    ref_hw: tuple[int, int],
    renormalize_rows: bool = False,
    dtype: torch.dtype | None = None,
    prepared=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`frobenius_with_reference` of a joint attention layer, whose image queries also attend to the text keys k_txt
    [T, heads·d], in the same fused call: the text keys join the plain copy, so the softmax is the joint one (no
    image_mass needed), and a third marker column gives each query's text share m_text (`joint.key_shares`).

    Returns (w_l before normalisation, 0-d fp32; m_text [heads, N_l] fp32). Every query must be read: the layer's
    grid is not finer than the reference grid."""
    total, m_text = _frobenius(
        q, k, heads, scale, src_hw, reference_attention, ref_hw, renormalize_rows, None, dtype, prepared, k_txt
    )
    if m_text.shape[1] != q.shape[0]:
        raise ValueError(
            f"a {src_hw} layer finer than the {ref_hw} reference grid: not every query's text share is read"
        )
    return total, m_text


def _frobenius(
    q, k, heads, scale, src_hw, reference_attention, ref_hw, renormalize_rows, image_mass, dtype, prepared, k_txt=None
):
    """w_l before normalisation and, with text keys, the text share [heads, queries] (else None), from each query's
    R (and row mass, and text share) per head: by `frobenius_kernel.row_sums` where the kernel setting selects it
    (`frobenius_kernel.kernel_enabled`), else by one fused attention call per row chunk (`_fused_row_sums`)."""
    queries, log_weights, buffers = prepared or reference_weights(reference_attention, src_hw, ref_hw)
    dtype = compute_dtype(q, dtype)
    key_column = None
    if renormalize_rows:  # the row sums of S̃ are S·(Bᵀ1), the same for every layer of the grid
        key_column = buffers.get("key column")
        if key_column is None:
            ones = torch.ones(ref_hw[0] * ref_hw[1], 1, device=q.device)
            key_column = buffers["key column"] = resize_keys_adjoint(ones, src_hw, ref_hw)[:, 0]
    if kernel_enabled(q):
        share, column, text = row_sums(q, k, queries, log_weights.exp(), heads, scale, key_column, k_txt, dtype)
    else:
        share, column, text = _fused_row_sums(
            q, k, queries, log_weights, heads, scale, key_column, k_txt, dtype, buffers
        )
    if image_mass is not None:
        mass = (image_mass if len(queries) == image_mass.shape[1] else image_mass[:, queries]).float()
        share, column = share * mass, None if column is None else column * mass
    r = share.mean(0)  # [queries]
    total = (r / column.mean(0)).sum() if renormalize_rows else r.sum()
    return total, None if text is None else text.clamp(0, 1)


def _fused_row_sums(q, k, queries, log_weights, heads, scale, key_column, k_txt, dtype, buffers):
    """`frobenius_kernel.row_sums` through the fused attention kernel, in row chunks: keys [biased copy; plain copy
    (; text keys)] with log W added to the biased copy's scores, and marker value columns 0 (biased copy),
    1 (the plain copy's key column c) and 2 (text keys). Each output is its marker's share of
    Z_i = Σ_k e^{s_ik}(W_ik + 1) (+ Σ_t e^{s_it}); divided by the plain part 1 − out₀ it is the share of the plain
    (joint) softmax. No score matrix exists outside the kernel; the bias is one [rows, 2·N_l + T] chunk shared by
    all heads. Per chunk three kernels run (the bias rows, the fused call, its three marker columns), so that a
    short forward is not held up by launching them; the marker values and the bias buffer come from `buffers`, where
    the first layer of a grid leaves them for the others."""
    n, hd = k.shape
    d = hd // heads
    t = 0 if k_txt is None else k_txt.shape[0]
    width = 2 * n + t
    kh = k.to(dtype).view(1, n, heads, d).transpose(1, 2)
    keys = [kh, kh] + ([] if k_txt is None else [k_txt.to(dtype).view(1, t, heads, d).transpose(1, 2)])
    keys = torch.cat(keys, 2)  # [1, heads, 2·N_l + T, d]
    values = buffers.get(("values", heads, width, d, dtype, key_column is not None))
    if values is None:  # the same for every layer of the grid (the key column depends on the grids only)
        values = torch.zeros(1, heads, width, d, dtype=dtype, device=q.device)  # fused kernels want contiguous 4-D
        values[..., :n, 0] = 1  # marks the biased copy
        values[..., 2 * n :, 2] = 1  # marks the text keys
        if key_column is not None:
            values[..., n : 2 * n, 1] = key_column.to(dtype)
        buffers[("values", heads, width, d, dtype, key_column is not None)] = values
    # Every query (the layer is on the reference grid or coarser: `queries` is then 0..N-1) needs no gather.
    rows = q if len(queries) == q.shape[0] else q.index_select(0, queries)
    qh = rows.to(dtype).view(1, -1, heads, d).transpose(1, 2)  # [1, heads, Q, d]
    parts = torch.empty(heads, len(queries), 3, device=q.device)
    chunks = list(row_chunks(len(queries), 1, width))
    bias = buffers.get(("bias", width, dtype))
    if bias is None:  # rows padded to a multiple of 16 elements, the alignment fused kernels want of a bias
        bias = torch.zeros(chunks[0][1], -(-width // 16) * 16, dtype=dtype, device=q.device)[:, :width]
        if len(chunks) == 1:  # the same rows for every layer of the grid
            bias[:, :n] = log_weights
        buffers[("bias", width, dtype)] = bias
    for a, b in chunks:
        if len(chunks) > 1:
            bias[: b - a, :n] = log_weights[a:b]  # the plain copy's and the text keys' columns stay 0
        out = F.scaled_dot_product_attention(
            qh[:, :, a:b], keys, values, attn_mask=bias[None, None, : b - a], scale=scale
        )
        parts[:, a:b] = out[0, ..., :3]
    shares = parts / (1 - parts[..., :1])  # over the unbiased keys' share of the normaliser
    return shares[..., 0], shares[..., 1] if key_column is not None else None, shares[..., 2] if t else None
