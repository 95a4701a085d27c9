"""Joint attention (SD3, Flux): image queries attend to image and text keys in one softmax.

Under the joint softmax, A(p, t) = softmax_text(p, t) · m_text(p), where softmax_text is the softmax over the text keys
alone (T ≤ 512 columns, cheap) and m_text(p) is the share of query p's softmax that falls on text keys. m_text is one
fused attention call whose values are the text indicator, so the image→image scores are never formed. Keys that are
neither the image's nor the text's (Flux Kontext's reference image) take part in that call only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .aggregation import head_weights
from .self_attention import compute_dtype, logits, row_chunks


def key_shares(
    q: torch.Tensor,
    k_img: torch.Tensor,
    groups: list[torch.Tensor],
    heads: int,
    scale: float,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """[G, heads, N]: each image query's joint-softmax probability on each group of keys other than the image's
    (fp32), from one fused call over [k_img; groups...].

    q, k_img: [N, heads·d]; groups: G ≤ d key tensors [T_g, heads·d] (the text keys; Flux Kontext's reference image
    keys). The fused call runs in `compute_dtype(q, dtype)`.
    """
    n, hd = q.shape
    d = hd // heads
    if len(groups) > d:
        raise ValueError(f"{len(groups)} key groups need as many value channels, the head dim is {d}")
    dtype = compute_dtype(q, dtype)
    keys = torch.cat([k_img, *groups]).to(dtype).view(1, -1, heads, d).transpose(1, 2)  # [1, heads, M, d]
    # Value channel g marks group g's keys; the value has the query's head dim, as fused kernels expect.
    # 4-D, contiguous inputs select the fused kernels (else SDPA falls back to the explicit [heads, N, M] softmax).
    markers = torch.zeros(keys.shape[2], d, dtype=dtype, device=q.device)
    start = k_img.shape[0]
    for g, group in enumerate(groups):
        markers[start : start + group.shape[0], g] = 1
        start += group.shape[0]
    values = markers.expand(1, heads, -1, d).contiguous()
    queries = q.to(dtype).view(1, n, heads, d).transpose(1, 2)
    shares = F.scaled_dot_product_attention(queries, keys, values, scale=scale)[0, ..., : len(groups)]  # [heads, N, G]
    return shares.permute(2, 0, 1).float().clamp(0, 1)


def joint_text_attention(
    q: torch.Tensor,
    k_img: torch.Tensor,
    k_txt: torch.Tensor,
    v_txt: torch.Tensor,
    heads: int,
    scale: float,
    out_weight: torch.Tensor | None = None,
    head_weighting: str = "auto",
    columns: torch.Tensor | None = None,
    m_text: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    k_other: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Image→text attention of one image under the joint softmax, aggregated over heads.

    q, k_img: [N, heads·d] image queries / keys; k_txt, v_txt: [T, heads·d] text keys / values (after norms and RoPE).
    out_weight: [D, heads·d], the projection applied to the attention output (for the head weights).
    Head weights (docs/official_code.md, our extension): the text part of each head's output, o_h^text(p) = Σ_t A_h(p, t) V_h(t) W_hᵀ,
    against Σ_h o_h^text(p). columns: text positions to keep in the maps (default all T). m_text: each query's text
    share [heads, N] when already known (`joint_frobenius_with_reference` gives it), else one fused call here.
    k_other: [T_o, heads·d], keys that join the softmax but are neither the image's nor the text's (Flux Kontext's
    reference image), computed in that call; their share is then in neither the maps nor the image share.
    The products run in `compute_dtype(q, dtype)` with fp32 results; softmaxes and sums in fp32.
    Returns (image_mass [heads, N]: the share of each query's joint softmax that falls on the image keys k_img,
             {"average": [N, T'], "auto": [N, T'], "average mass": [N], "auto mass": [N]} fp32 (the masses: each map
             summed over all T text tokens, i.e. the head-weighted text share), bool [N]: the pixels whose text
             output was ≈ 0, left on q's device so that no caller waits for the device to count them).
    """
    n, hd = q.shape
    d = hd // heads
    dtype = compute_dtype(q, dtype)
    if m_text is not None and k_other is not None:
        raise ValueError("a text share given from elsewhere does not include the other keys' share")
    if m_text is None:
        shares = key_shares(q, k_img, [k_txt] + ([] if k_other is None else [k_other]), heads, scale, dtype)
        m_text, image_mass = shares[0], 1 - shares.sum(0)  # [heads, N]
    else:
        m_text = m_text.float()
        image_mass = 1 - m_text
    # Strided views: matrix products read them as they are, so no copies are launched for them.
    kx = k_txt.to(dtype).view(-1, heads, d).permute(1, 2, 0)  # [heads, d, T]
    vx = v_txt.to(dtype).view(-1, heads, d).transpose(0, 1)  # [heads, T, d]
    avgs, autos, degenerate = [], [], []
    avg_mass, auto_mass = m_text.mean(0), []
    for a, b in row_chunks(n, heads, kx.shape[2]):
        qc = q[a:b].view(b - a, heads, d).transpose(0, 1)  # [heads, c, d]
        probs = logits(qc, kx, dtype, scale).softmax(-1).mul_(m_text[:, a:b, None])  # [heads, c, T], joint softmax
        kept = probs if columns is None else probs[..., columns]
        avgs.append(kept.mean(0))
        if out_weight is None or head_weighting == "average":
            autos.append(avgs[-1])
            auto_mass.append(avg_mass[a:b])
            degenerate.append(torch.zeros(b - a, dtype=torch.bool, device=q.device))
            continue
        text_out = logits(probs, vx, dtype).transpose(0, 1).reshape(1, b - a, hd)  # [1, c, heads·d]
        w, bad = head_weights(text_out, out_weight, heads, head_weighting, return_degenerate=True, dtype=dtype)
        autos.append(torch.einsum("hct,hc->ct", kept, w[0]))
        auto_mass.append(torch.einsum("hc,hc->c", m_text[:, a:b], w[0]))
        degenerate.append(bad[0])
    maps = {"average": joined(avgs), "auto": joined(autos), "average mass": avg_mass, "auto mass": joined(auto_mass)}
    return image_mass, maps, joined(degenerate)


def joined(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Row chunks as one tensor: the chunk itself when there is one (no copy), else their concatenation."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
