"""Joint attention (SD3, Flux): image queries attend to image and text keys in one softmax.

The image→text probabilities need the softmax over all keys: computed per query chunk through the log-sum-exp, so the
image→image scores of one chunk are the largest tensor formed.
"""
from __future__ import annotations

import torch

from .aggregation import head_weights
from .self_attention import row_chunks


def joint_text_attention(
    q: torch.Tensor, k_img: torch.Tensor, k_txt: torch.Tensor, v_txt: torch.Tensor, heads: int, scale: float,
    out_weight: torch.Tensor | None = None, head_weighting: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Image→text attention of one image under the joint softmax, aggregated over heads.

    q, k_img: [N, heads·d] image queries / keys; k_txt, v_txt: [T, heads·d] text keys / values (after norms and RoPE).
    out_weight: [D, heads·d], the projection applied to the attention output (for the head weights).
    Head weights (ALGORITHMS §1 extension): the text part of each head's output, o_h^text(p) = Σ_t A_h(p, t) V_h(t) W_hᵀ,
    against Σ_h o_h^text(p).
    Returns (image_mass [heads, N]: the share of each query's joint softmax that falls on image keys,
             {"average": [N, T], "auto": [N, T]} fp32, number of pixels whose text output was ~0).
    """
    n, hd = q.shape
    d = hd // heads
    kt = k_img.float().view(-1, heads, d).transpose(0, 1)  # [heads, N, d]
    kx = k_txt.float().view(-1, heads, d).transpose(0, 1)  # [heads, T, d]
    vx = v_txt.float().view(-1, heads, d).transpose(0, 1)
    image_mass = torch.empty(heads, n, dtype=torch.float32, device=q.device)
    avg = torch.empty(n, kx.shape[1], dtype=torch.float32, device=q.device)
    auto = torch.empty_like(avg)
    degenerate = 0
    for a, b in row_chunks(n, heads, kt.shape[1] + kx.shape[1]):
        qc = q[a:b].float().view(b - a, heads, d).transpose(0, 1)  # [heads, c, d]
        s_txt = qc @ kx.transpose(1, 2) * scale
        lse_img = (qc @ kt.transpose(1, 2) * scale).logsumexp(-1)
        lse_c = torch.logaddexp(lse_img, s_txt.logsumexp(-1))
        image_mass[:, a:b] = (lse_img - lse_c).exp()
        probs = (s_txt - lse_c[..., None]).exp()  # [heads, c, T]
        avg[a:b] = probs.mean(0)
        if out_weight is None or head_weighting == "average":
            auto[a:b] = avg[a:b]
            continue
        text_out = (probs @ vx).transpose(0, 1).reshape(1, b - a, hd)  # [1, c, heads·d]
        w, bad = head_weights(text_out, out_weight, heads, head_weighting, return_degenerate=True)
        auto[a:b] = torch.einsum("hct,hc->ct", probs, w[0])
        degenerate += int(bad.sum())
    return image_mass, {"average": avg, "auto": auto}, degenerate
