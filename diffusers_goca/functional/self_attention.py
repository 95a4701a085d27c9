"""Self-attention reductions computed from queries and keys in row chunks, so that no [heads, N, N] tensor is formed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one [heads, rows, N] score chunk; 2^24 fp32 = 64 MiB (softmax needs a second buffer of that size).
CHUNK_ELEMENTS = 2**24


def grid_nearest_rows(src_hw: tuple[int, int], dst_hw: tuple[int, int], device=None) -> torch.Tensor:
    """Index of the `src` grid cell that nearest-neighbour resizing puts at each `dst` cell: LongTensor [dst_h·dst_w].

    Matches `F.interpolate(mode="nearest")` (floor(i · src / dst)).
    """
    (sh, sw), (dh, dw) = src_hw, dst_hw
    ys = torch.div(torch.arange(dh, device=device) * sh, dh, rounding_mode="floor")
    xs = torch.div(torch.arange(dw, device=device) * sw, dw, rounding_mode="floor")
    return (ys[:, None] * sw + xs[None, :]).reshape(-1)


def self_attention_rows(
    q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, heads: int, scale: float, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """Head-mean attention probabilities of the query rows `rows`.

    q: [N, heads·d], k: [M, heads·d] (one image, before the head split), rows: LongTensor [R].
    lse: [heads, N], the log-normaliser of each query over all keys of a joint attention (text keys included); then
    the rows are the image→image slice of the joint softmax, not renormalised. None: softmax over `k`.
    Returns [R, M] in fp32: mean over heads of softmax(q_h k_hᵀ · scale).
    """
    d = q.shape[-1] // heads
    qh = q[rows].float().view(len(rows), heads, d).transpose(0, 1)  # [heads, R, d]
    kh = k.float().view(-1, heads, d).transpose(0, 1)  # [heads, M, d]
    scores = qh @ kh.transpose(1, 2) * scale
    if lse is None:
        return scores.softmax(-1).mean(0)
    return (scores - lse[:, rows, None].float()).exp().mean(0)


def row_chunks(n_rows: int, heads: int, n_keys: int):
    """(start, end) of query-row chunks whose [heads, rows, n_keys] scores hold at most CHUNK_ELEMENTS."""
    step = max(1, CHUNK_ELEMENTS // max(1, heads * n_keys))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def head_mean_self_attention(
    q: torch.Tensor, k: torch.Tensor, heads: int, scale: float, src_hw: tuple[int, int], dst_hw: tuple[int, int],
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean self-attention resized to the `dst` grid: queries nearest, keys bilinear, rows not renormalised.

    q, k: [N_src, heads·d] of one image with N_src = src_h·src_w; lse: see `self_attention_rows`. Returns [N_dst, N_dst] fp32.
    """
    rows = grid_nearest_rows(src_hw, dst_hw, q.device)
    out = torch.empty(len(rows), dst_hw[0] * dst_hw[1], dtype=torch.float32, device=q.device)
    for a, b in row_chunks(len(rows), heads, k.shape[0]):
        out[a:b] = resize_keys(self_attention_rows(q, k, rows[a:b], heads, scale, lse), src_hw, dst_hw)
    return out


def resize_keys(rows: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the key axis: [R, src_h·src_w] → [R, dst_h·dst_w]."""
    if tuple(src_hw) == tuple(dst_hw):
        return rows
    img = rows.view(len(rows), 1, *src_hw)
    return F.interpolate(img, size=dst_hw, mode="bilinear", align_corners=False).view(len(rows), -1)


def frobenius_with_reference(
    q: torch.Tensor, k: torch.Tensor, heads: int, scale: float, src_hw: tuple[int, int],
    reference: torch.Tensor, ref_hw: tuple[int, int], renormalize_rows: bool = False, lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """w_l before normalisation (ALGORITHMS §2): Σ_ij A_p[i, j] · S̃_l[i, j], computed in row chunks.

    q, k: [N_l, heads·d] of one image's self-attention layer; reference: the dense feature F [N_ref, C].
    A_p = softmax(F Fᵀ / √C); S̃_l = head-mean self-attention resized to the reference grid (rows renormalised to sum 1
    after resizing when `renormalize_rows`; the official code does not). Returns a 0-d fp32 tensor.
    """
    rows = grid_nearest_rows(src_hw, ref_hw, q.device)
    f = reference.float()
    total = torch.zeros((), dtype=torch.float32, device=q.device)
    for a, b in row_chunks(len(rows), max(heads, 1), max(k.shape[0], f.shape[0])):
        s_rows = resize_keys(self_attention_rows(q, k, rows[a:b], heads, scale, lse), src_hw, ref_hw)
        if renormalize_rows:
            s_rows = s_rows / s_rows.sum(-1, keepdim=True)
        total += (pseudo_rows(f, a, b) * s_rows).sum()
    return total


def pseudo_rows(f: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows a..b of the pseudo self-attention softmax(F Fᵀ / √C): [b-a, N_ref] fp32."""
    return (f[a:b] @ f.T / f.shape[-1] ** 0.5).softmax(-1)
