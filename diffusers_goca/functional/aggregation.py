"""Head-wise and layer-wise auto aggregation (docs/method.md)."""

from __future__ import annotations

from typing import Sequence

import torch

from .maps import resize_maps
from .self_attention import compute_dtype, logits

HEAD_WEIGHTINGS = ("auto", "average", "dot-product")


def head_weights(
    head_out: torch.Tensor,
    out_weight: torch.Tensor,
    heads: int,
    mode: str = "auto",
    eps: float = 1e-8,
    return_degenerate: bool = False,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
):
    """Per-pixel head weights w_h(p) = ⟨o_h(p), out(p)⟩ / Σ_h' ⟨o_h'(p), out(p)⟩, with o_h(p) = head_out_h(p) · W_hᵀ.

    head_out: [B, N, heads·d], the attention output before `to_out` (head h in columns h·d:(h+1)·d).
    out_weight: [D, heads·d], the weight of `to_out[0]` (its bias is excluded, as in the formula).
    mode: "auto" (official "dot-product w/o clamp": may be negative), "average" (1/H), "dot-product" (clamp ≥ 0, renormalise).
    out: [B, N, D], head_out · out_weightᵀ when the caller has it (the forward's own `to_out[0]` output less its bias),
    which saves one of the two [N, heads·d, D] products. The products run in `compute_dtype(head_out, dtype)`, the
    per-head sums and the division in fp32.
    Returns [B, heads, N] fp32 summing to 1 over heads; where Σ_h ⟨o_h, out⟩ = ‖out(p)‖² < eps the weights fall back to 1/H
    (with `return_degenerate`, also the bool mask [B, N] of those pixels).
    """
    if mode not in HEAD_WEIGHTINGS:
        raise ValueError(f"head weighting must be one of {HEAD_WEIGHTINGS}, got {mode!r}")
    b, n, hd = head_out.shape
    if mode == "average":
        uniform = torch.full((b, heads, n), 1.0 / heads, device=head_out.device)
        return (uniform, torch.zeros(b, n, dtype=torch.bool, device=head_out.device)) if return_degenerate else uniform
    dtype = compute_dtype(head_out, dtype)
    x = head_out.to(dtype)
    w = out_weight.to(dtype)
    out = x @ w.T if out is None else out.to(dtype)  # [B, N, D]
    # ⟨o_h, out⟩ = Σ_{j ∈ head h} x_j · (out · W)_j: one matmul back instead of H per-head projections.
    back = (out @ w).float()
    dots = (x.float() * back).view(b, n, heads, hd // heads).sum(-1).transpose(1, 2)  # [B, heads, N]
    if mode == "dot-product":
        dots = dots.clamp_min(0)
    total = dots.sum(1, keepdim=True)
    degenerate = total < eps  # Σ_h ⟨o_h, out⟩ = ‖out‖² ≥ 0 (≥ 0 term by term after the clamp of "dot-product")
    weights = torch.where(degenerate, 1.0 / heads, dots / total)  # where it is degenerate, dots / total is not read
    return (weights, degenerate[:, 0]) if return_degenerate else weights


def aggregate_heads(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """C(p, t) = Σ_h w_h(p) · A_h(p, t).  probs: [B, heads, N, T], weights: [B, heads, N] → [B, N, T] fp32."""
    return torch.einsum("bhnt,bhn->bnt", probs.float(), weights.float())


PSEUDO_ATTENTIONS = ("paper", "official-code")


def pseudo_self_attention(feature: torch.Tensor, mode: str = "paper", dtype: torch.dtype | None = None) -> torch.Tensor:
    """The pseudo self-attention A_p of the reference feature F [N, C] → [N, N] fp32 (64 MiB for a 64×64 grid).

    mode "paper": softmax(F Fᵀ / √C) over rows. "official-code": what the released code computes, softmax(f₀ f₀ᵀ)
    from channel 0 of F alone with scale 1 (its feature is reduced to batch 0, then indexed [0] again), a rank-one
    affinity. The product in `compute_dtype(feature, dtype)`, the logits and the softmax in fp32."""
    if mode not in PSEUDO_ATTENTIONS:
        raise ValueError(f"pseudo_attention must be one of {PSEUDO_ATTENTIONS}, got {mode!r}")
    f = (feature if mode == "paper" else feature[:, :1])[None]
    scale = f.shape[-1] ** -0.5
    return logits(f, f.transpose(1, 2), compute_dtype(feature, dtype), scale)[0].softmax(-1)


def layer_weight(pseudo: torch.Tensor, self_attn: torch.Tensor) -> torch.Tensor:
    """Unnormalised layer weight: the Frobenius product Σ_ij A_p[i, j] · S̃_l[i, j]. Both [N_ref, N_ref] → 0-d."""
    return (pseudo.float() * self_attn.float()).sum()


def normalize_layer_weights(raw: torch.Tensor) -> torch.Tensor:
    """w_l ← max(w_l, 0) / Σ_l' max(w_l', 0).  raw: [L] → [L]; all-nonpositive input gives uniform weights."""
    pos = raw.float().clamp_min(0)
    total = pos.sum()
    # torch.where, not `if total <= 0`: a Python branch on a device value makes the host wait for the device.
    return torch.where(total > 0, pos / total.clamp_min(torch.finfo(pos.dtype).tiny), 1.0 / len(pos))


def aggregate_layers(
    maps: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    weights: torch.Tensor,
    out_hw: tuple[int, int],
    text_mass: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """M = Σ_l w_l · resize_bilinear(C_l → out grid), clamped ≥ 0, L1-normalised per pixel over all T tokens.

    maps: per layer [N_l, T'] (N_l = h_l·w_l of `grids[l]`); weights: [L]. Returns [out_h·out_w, T'] fp32.
    text_mass: per layer [N_l], Σ_t C_l(p, t) over **all** T text tokens, when the maps keep only T' < T of them
    (joint attention, where a pixel's text share of the softmax is anywhere in 0…1). The L1 sum is then
    Σ_t max(M, 0) = Σ_t M + Σ_t max(−M, 0), the first term from the masses and the second over the kept columns:
    exact when the columns not kept are ≥ 0 (always, unless head weights are negative there). None: the maps
    keep every token column (cross-attention), and the sum runs over them.
    """
    total = weighted_layer_sum(maps, grids, weights, out_hw)
    if text_mass is None:
        denominator = total.clamp_min(0).sum(-1, keepdim=True)
    else:
        mass = weighted_layer_sum([m[:, None] for m in text_mass], grids, weights, out_hw)
        denominator = mass + (-total).clamp_min(0).sum(-1, keepdim=True)
    return total.clamp_min(0) / denominator.clamp_min(1e-12)


def weighted_layer_sum(
    maps: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], weights: torch.Tensor, out_hw: tuple[int, int]
) -> torch.Tensor:
    """Σ_l w_l · resize_bilinear(C_l → out grid): maps per layer [N_l, K], weights [L] → [out_h·out_w, K] fp32.

    The resize is linear, so the layers of one grid are summed first (one fused multiply-add each) and each grid
    resized once: a model's dozens of layers on a few grids cost a few resizes, not one per layer."""
    by_grid = {}
    for c, hw, w in zip(maps, grids, weights):
        hw = tuple(hw)
        by_grid[hw] = c.float() * w if hw not in by_grid else by_grid[hw].addcmul_(c.float(), w)
    total = None
    for hw, summed in by_grid.items():
        term = resize_maps(summed.T, hw, out_hw).T
        total = term if total is None else total + term
    return total
