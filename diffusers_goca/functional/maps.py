"""From token maps to class scores and labels (docs/method.md)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def resize_maps(
    maps: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int], mode: str = "bilinear"
) -> torch.Tensor:
    """Resize flattened maps: [K, src_h·src_w] → [K, dst_h·dst_w] (bilinear, align_corners=False)."""
    if tuple(src_hw) == tuple(dst_hw):
        return maps
    img = maps.reshape(maps.shape[0], 1, *src_hw)
    return F.interpolate(img, size=tuple(dst_hw), mode=mode, align_corners=False).reshape(maps.shape[0], -1)


def token_class_maps(token_maps: torch.Tensor, class_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mean of each class's token columns.  token_maps: [N, T]; class_tokens: K lists of positions → [K, N]."""
    return torch.stack([token_maps[:, list(pos)].mean(-1) for pos in class_tokens])


def per_pixel_rescale(
    token_maps: torch.Tensor, class_tokens: Sequence[Sequence[int]], content_tokens: Sequence[int], eps: float = 1e-12
) -> torch.Tensor:
    """s_c(p) = mean_{t ∈ tokens(c)} M(p, t) / Σ_{t ∈ content} M(p, t): the weight of special tokens taken out per pixel.

    token_maps: [N, T]; class_tokens: K lists of token positions; content_tokens: positions of all content tokens.
    Returns [K, N].
    """
    denom = token_maps[:, list(content_tokens)].sum(-1).clamp_min(eps)
    return token_class_maps(token_maps, class_tokens) / denom


def gaussian_kernel1d(kernel_size: int = 5, sigma: float | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian; sigma defaults to torchvision's 0.3·((k−1)·0.5 − 1) + 0.8 (1.1 for k = 5)."""
    if sigma is None:
        sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(
    maps: torch.Tensor, hw: tuple[int, int], kernel_size: int = 5, sigma: float | None = None
) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, as torchvision's `gaussian_blur`. maps: [K, h·w] → [K, h·w]."""
    k1 = gaussian_kernel1d(kernel_size, sigma).to(maps.device)
    img = maps.float().reshape(maps.shape[0], 1, *hw)
    pad = kernel_size // 2
    # Reflect padding needs pad < size; tiny grids fall back to replicate.
    mode = "reflect" if min(hw) > pad else "replicate"
    img = F.pad(img, (pad, pad, pad, pad), mode=mode)
    img = F.conv2d(img, k1.view(1, 1, 1, -1))
    img = F.conv2d(img, k1.view(1, 1, -1, 1))
    return img.reshape(maps.shape[0], -1)


def minmax(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-map min-max over space to [0, 1].  maps: [K, N] → [K, N] (a constant map becomes 0)."""
    lo = maps.min(-1, keepdim=True).values
    hi = maps.max(-1, keepdim=True).values
    return (maps - lo) / (hi - lo).clamp_min(eps)


def propagate(self_attn_rows, maps: torch.Tensor, order: int) -> torch.Tensor:
    """M' = S^order · M as `order` products, never forming S^order.

    self_attn_rows: S as a tensor [N, N], or a callable that returns S · X for X [N, K] (a chunked implementation).
    maps: [K, N] (class maps, flattened). Returns [K, N].
    """
    apply = self_attn_rows if callable(self_attn_rows) else (lambda x: self_attn_rows @ x)
    x = maps.float().T
    for _ in range(order):
        x = apply(x)
    return x.T


def entropy_reduced(attention: torch.Tensor, lam: float) -> torch.Tensor:
    """iSeg's entropy-reduced self-attention: each key column divided by its max, A + λ·log10(e·A) on non-zero
    entries, clamped ≥ 0, rows renormalised. attention: [N, N] → [N, N]; lam: λ (iSeg's is
    `methods.ISEG_ENTROPY_LAMBDA`)."""
    a = attention / attention.amax(0, keepdim=True).clamp_min(1e-12)
    a = torch.where(a > 0, a + lam * torch.log10(torch.e * a.clamp_min(1e-30)), torch.zeros_like(a)).clamp_min(0)
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def scores_to_labels(
    scores: torch.Tensor,
    map_hw: tuple[int, int],
    out_hw: tuple[int, int],
    background: torch.Tensor | None = None,
    background_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsample class scores to the image and take the argmax.

    scores: [K, h·w]; background: optional [h·w] score of the background entity, shifted by `background_offset` and
    appended as the last channel. Returns (labels LongTensor [H, W], scores [K(+1), H, W]).
    """
    if background is not None:
        scores = torch.cat([scores, (background + background_offset)[None]])
    up = F.interpolate(
        scores.float().reshape(1, -1, *map_hw), size=tuple(out_hw), mode="bilinear", align_corners=False
    )[0]
    return up.argmax(0), up


def labels_without(scores: torch.Tensor, excluded: Sequence[int] = ()) -> torch.Tensor:
    """Argmax over the channels of scores [C, H, W] that are not `excluded` (all of them excluded: over every
    channel). Returns LongTensor [H, W]."""
    keep = [c for c in range(scores.shape[0]) if c not in set(excluded)]
    if not keep or len(keep) == scores.shape[0]:
        return scores.argmax(0)
    return torch.tensor(keep, device=scores.device)[scores[keep].argmax(0)]


def weighted_labels(scores: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Argmax over the channels of scores [C, H, W] weighted by `weights` [C], where a weight of 0 takes no pixel;
    every weight 0: the plain argmax. Returns LongTensor [H, W]."""
    absent = [c for c, w in enumerate(weights) if w == 0]
    if len(absent) == len(weights):
        return scores.argmax(0)
    weighted = scores * torch.tensor(weights, dtype=scores.dtype, device=scores.device)[:, None, None]
    return labels_without(weighted, absent)
