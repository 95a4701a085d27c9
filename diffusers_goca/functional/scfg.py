"""Semantic-aware classifier-free guidance (S-CFG, docs/official_code.md): per-region guidance rates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .maps import gaussian_kernel1d


def guidance_norm(eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
    """n(p) = ‖ε_c(p) − ε_u(p)‖₂ over latent channels.  [B, C, h, w] → [B, h, w] fp32."""
    return (eps_cond.float() - eps_uncond.float()).norm(dim=1)


def region_rates(norm: torch.Tensor, regions: torch.Tensor, foreground: torch.Tensor, num_regions: int) -> torch.Tensor:
    """rate_k = f / d_k with d_k the mean of n over region k and f its mean over the foreground; 0 for empty regions.

    norm: [B, h, w]; regions: LongTensor [B, h, w] in [0, num_regions); foreground: bool [B, h, w] (an empty
    foreground falls back to the whole image). Returns [B, num_regions] fp32.
    """
    b = norm.shape[0]
    flat_n, flat_r = norm.reshape(b, -1).float(), regions.reshape(b, -1)
    sums = torch.zeros(b, num_regions, device=norm.device).scatter_add_(1, flat_r, flat_n)
    counts = torch.zeros(b, num_regions, device=norm.device).scatter_add_(1, flat_r, torch.ones_like(flat_n))
    fg = foreground.reshape(b, -1)
    fg = torch.where(fg.any(1, keepdim=True), fg, torch.ones_like(fg))
    f = (flat_n * fg).sum(1) / fg.sum(1)
    d = sums / counts.clamp_min(1)
    return torch.where((counts > 0) & (d > 0), f[:, None] / d.clamp_min(1e-12), torch.zeros_like(d))


def rate_map(
    norm: torch.Tensor,
    regions: torch.Tensor,
    foreground: torch.Tensor,
    num_regions: int,
    guidance_scale: float,
    min_rate: float = 0.8,
    max_rate: float = 3.0,
    max_guidance: float = 15.0,
) -> torch.Tensor:
    """rate(p) = rate_k on region k, clamped to [min_rate, max_rate], then to ≤ max_guidance / w, then smoothed by a
    3×3 Gaussian (σ = 0.5, reflect padding).  Returns [B, 1, h, w] fp32."""
    rates = region_rates(norm, regions, foreground, num_regions)
    per_pixel = rates.gather(1, regions.reshape(regions.shape[0], -1)).view_as(norm)
    per_pixel = per_pixel.clamp(min_rate, max_rate).clamp_max(max_guidance / guidance_scale)
    k = gaussian_kernel1d(3, 0.5).to(norm.device)
    img = F.pad(per_pixel[:, None], (1, 1, 1, 1), mode="reflect" if min(norm.shape[-2:]) > 1 else "replicate")
    img = F.conv2d(F.conv2d(img, k.view(1, 1, 1, 3)), k.view(1, 1, 3, 1))
    return img


def scfg_cond(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """The conditional prediction that makes the pipeline's own ε_u + w·(ε_c' − ε_u) equal ε_u + w·rate·(ε_c − ε_u)."""
    return eps_uncond + rate.to(eps_cond.dtype) * (eps_cond - eps_uncond)
