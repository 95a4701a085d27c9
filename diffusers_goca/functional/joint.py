"""Joint attention (SD3, Flux): image queries attend to image and text keys in one softmax.

Under the joint softmax, A(p, t) = softmax_text(p, t) · m_text(p), where softmax_text is the softmax over the text keys
alone (T ≤ 512 columns, cheap) and m_text(p) is the share of query p's softmax that falls on text keys. m_text is one
fused attention call whose values are the text indicator, so the image→image scores are never formed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .aggregation import head_weights
from .self_attention import compute_dtype, logits, row_chunks


def text_share(q: torch.Tensor, k_img: torch.Tensor, k_txt: torch.Tensor, heads: int, scale: float,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """m_text [heads, N]: each image query's joint-softmax probability on the text keys (fp32).

    q, k_img: [N, heads·d]; k_txt: [T, heads·d]. The fused call runs in `compute_dtype(q, dtype)`.
    """
    n, hd = q.shape
    d = hd // heads
    dtype = compute_dtype(q, dtype)
    keys = torch.cat([k_img, k_txt]).to(dtype).view(1, -1, heads, d).transpose(1, 2)  # [1, heads, N+T, d]
    # The indicator is repeated over d channels so the value has the query's head dim (what fused kernels expect);
    # 4-D, contiguous inputs select the fused kernels (else SDPA falls back to the explicit [heads, N, N+T] softmax).
    indicator = torch.zeros(keys.shape[2], 1, dtype=dtype, device=q.device)
    indicator[k_img.shape[0]:] = 1
    values = indicator.expand(-1, d).reshape(1, 1, -1, d).expand(1, heads, -1, d).contiguous()
    queries = q.to(dtype).view(1, n, heads, d).transpose(1, 2)
    return F.scaled_dot_product_attention(queries, keys, values, scale=scale)[0, ..., 0].float().clamp(0, 1)


def joint_text_attention(
    q: torch.Tensor, k_img: torch.Tensor, k_txt: torch.Tensor, v_txt: torch.Tensor, heads: int, scale: float,
    out_weight: torch.Tensor | None = None, head_weighting: str = "auto", columns: torch.Tensor | None = None,
    m_text: torch.Tensor | None = None, dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Image→text attention of one image under the joint softmax, aggregated over heads.

    q, k_img: [N, heads·d] image queries / keys; k_txt, v_txt: [T, heads·d] text keys / values (after norms and RoPE).
    out_weight: [D, heads·d], the projection applied to the attention output (for the head weights).
    Head weights (ALGORITHMS §1 extension): the text part of each head's output, o_h^text(p) = Σ_t A_h(p, t) V_h(t) W_hᵀ,
    against Σ_h o_h^text(p). columns: text positions to keep in the maps (default all T). m_text: each query's text
    share [heads, N] when already known (`joint_frobenius_with_reference` gives it), else one fused call here.
    The products run in `compute_dtype(q, dtype)` with fp32 results; softmaxes and sums in fp32.
    Returns (image_mass [heads, N]: the share of each query's joint softmax that falls on image keys,
             {"average": [N, T'], "auto": [N, T']} fp32, bool [N]: the pixels whose text output was ≈ 0, left on
             q's device so that no caller waits for the device to count them).
    """
    n, hd = q.shape
    d = hd // heads
    dtype = compute_dtype(q, dtype)
    m_text = text_share(q, k_img, k_txt, heads, scale, dtype) if m_text is None else m_text.float()  # [heads, N]
    # Strided views: matrix products read them as they are, so no copies are launched for them.
    kx = k_txt.to(dtype).view(-1, heads, d).permute(1, 2, 0)  # [heads, d, T]
    vx = v_txt.to(dtype).view(-1, heads, d).transpose(0, 1)  # [heads, T, d]
    avgs, autos, degenerate = [], [], []
    for a, b in row_chunks(n, heads, kx.shape[2]):
        qc = q[a:b].view(b - a, heads, d).transpose(0, 1)  # [heads, c, d]
        probs = logits(qc, kx, dtype, scale).softmax(-1).mul_(m_text[:, a:b, None])  # [heads, c, T], joint softmax
        kept = probs if columns is None else probs[..., columns]
        avgs.append(kept.mean(0))
        if out_weight is None or head_weighting == "average":
            autos.append(avgs[-1])
            degenerate.append(torch.zeros(b - a, dtype=torch.bool, device=q.device))
            continue
        text_out = logits(probs, vx, dtype).transpose(0, 1).reshape(1, b - a, hd)  # [1, c, heads·d]
        w, bad = head_weights(text_out, out_weight, heads, head_weighting, return_degenerate=True, dtype=dtype)
        autos.append(torch.einsum("hct,hc->ct", kept, w[0]))
        degenerate.append(bad[0])
    return 1 - m_text, {"average": joined(avgs), "auto": joined(autos)}, joined(degenerate)


def joined(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Row chunks as one tensor: the chunk itself when there is one (no copy), else their concatenation."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
