"""Every formula against a slow, literal implementation on random tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_goca.functional import (
    aggregate_heads,
    aggregate_layers,
    gaussian_blur,
    head_mean_self_attention,
    head_weights,
    layer_weight,
    minmax,
    normalize_layer_weights,
    per_pixel_rescale,
    propagate,
    pseudo_self_attention,
    scores_to_labels,
)
from diffusers_goca.functional.self_attention import frobenius_with_reference, grid_nearest_rows

torch.manual_seed(0)


def literal_head_weights(x, w, heads):
    """w_h(p) = ⟨o_h(p), out(p)⟩ / Σ_h ⟨o_h(p), out(p)⟩ with explicit per-head projections."""
    b, n, hd = x.shape
    d = hd // heads
    out = torch.zeros(b, n, w.shape[0], dtype=torch.float64)
    o = []
    for h in range(heads):
        oh = x[..., h * d : (h + 1) * d].double() @ w[:, h * d : (h + 1) * d].double().T
        o.append(oh)
        out += oh
    dots = torch.stack([(oh * out).sum(-1) for oh in o], 1)
    return dots / dots.sum(1, keepdim=True)


def test_head_weights_match_literal_and_can_be_negative():
    heads, d, D = 4, 8, 20
    x = torch.randn(2, 10, heads * d)
    w = torch.randn(D, heads * d)
    got = head_weights(x, w, heads)
    want = literal_head_weights(x, w, heads)
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(got.sum(1), torch.ones(2, 10), atol=1e-5)
    assert (got < 0).any(), "random heads must give some negative weights: no clamp"
    bias = torch.randn(D)  # the capture passes the forward's own to_out output less its bias
    assert torch.allclose(head_weights(x, w, heads, out=F.linear(x, w, bias) - bias), got, atol=1e-4, rtol=1e-4)
    clamped = head_weights(x, w, heads, mode="dot-product")
    dots = torch.stack(
        [((x[..., h * d : (h + 1) * d] @ w[:, h * d : (h + 1) * d].T) * (x @ w.T)).sum(-1) for h in range(heads)], 1
    )
    lit = dots.clamp_min(0) / dots.clamp_min(0).sum(1, keepdim=True)
    assert torch.allclose(clamped, lit, atol=1e-5)
    assert torch.equal(head_weights(x, w, heads, mode="average"), torch.full((2, heads, 10), 0.25))


def test_head_weights_guard_zero_output():
    heads = 2
    x = torch.zeros(1, 3, 4)
    w, degenerate = head_weights(x, torch.randn(5, 4), heads, return_degenerate=True)
    assert torch.equal(w, torch.full((1, 2, 3), 0.5)) and degenerate.all()


def test_aggregate_heads_literal():
    probs = torch.rand(2, 3, 5, 7).softmax(-1)
    w = torch.randn(2, 3, 5)
    want = torch.zeros(2, 5, 7)
    for b in range(2):
        for h in range(3):
            for p in range(5):
                want[b, p] += w[b, h, p] * probs[b, h, p]
    assert torch.allclose(aggregate_heads(probs, w), want, atol=1e-6)


def literal_resized_self_attention(q, k, heads, scale, src, dst, mass=None):
    """S̃ by the book: full per-head softmax (times each query's image-key share for joint attention), head mean,
    queries nearest, keys bilinear (F.interpolate)."""
    n, hd = q.shape
    d = hd // heads
    s = torch.stack(
        [
            ((q[:, h * d : (h + 1) * d] @ k[:, h * d : (h + 1) * d].T) * scale).softmax(-1)
            * (1 if mass is None else mass[h][:, None])
            for h in range(heads)
        ]
    ).mean(0)
    s4 = s.view(*src, *src)  # [hq, wq, hk, wk]
    s4 = F.interpolate(s4.reshape(-1, 1, *src), size=dst, mode="bilinear", align_corners=False).view(*src, *dst)
    s4 = s4.permute(2, 3, 0, 1).reshape(-1, 1, *src)
    s4 = F.interpolate(s4, size=dst, mode="nearest").view(*dst, *dst).permute(2, 3, 0, 1)
    return s4.reshape(dst[0] * dst[1], dst[0] * dst[1])


@pytest.mark.parametrize("src,dst", [((4, 6), (8, 12)), ((8, 12), (8, 12)), ((6, 4), (3, 2))])
def test_head_mean_self_attention_resized(src, dst):
    heads, d = 3, 4
    q, k = torch.randn(src[0] * src[1], heads * d), torch.randn(src[0] * src[1], heads * d)
    got = head_mean_self_attention(q, k, heads, d**-0.5, src, dst)
    want = literal_resized_self_attention(q, k, heads, d**-0.5, src, dst)
    assert torch.allclose(got, want, atol=1e-6)


def test_nearest_rows_match_interpolate():
    src, dst = (5, 7), (12, 9)
    idx = torch.arange(35.0).view(1, 1, *src)
    want = F.interpolate(idx, size=dst, mode="nearest").flatten().long()
    assert torch.equal(grid_nearest_rows(src, dst), want)


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("src", [(4, 3), (8, 6), (16, 12)])
def test_layer_weight_chunked_equals_dense(renorm, joint, src, monkeypatch):
    import diffusers_goca.functional.self_attention as sa

    monkeypatch.setattr(sa, "CHUNK_ELEMENTS", 50)  # force many chunks
    heads, d, ref = 2, 4, (8, 6)
    n = src[0] * src[1]
    q, k = torch.randn(n, heads * d), torch.randn(n, heads * d)
    mass = torch.rand(heads, n) if joint else None
    f = torch.randn(48, 10)
    s = literal_resized_self_attention(q, k, heads, d**-0.5, src, ref, mass)
    if renorm:
        s = s / s.sum(-1, keepdim=True)
    a_p = torch.stack([(f[i] @ f.T / math.sqrt(10)).softmax(-1) for i in range(48)])
    assert torch.allclose(pseudo_self_attention(f), a_p, atol=1e-6)
    want = (a_p * s).sum()
    assert torch.allclose(layer_weight(a_p, s), want)
    got = frobenius_with_reference(
        q, k, heads, d**-0.5, src, pseudo_self_attention(f), ref, renormalize_rows=renorm, image_mass=mass
    )
    assert torch.allclose(got, want, rtol=1e-5)
    # Strided rows: the same sum over the reference cells at every second row and column of its 8×6 grid.
    sampled = [y * ref[1] + x for y in range(0, ref[0], 2) for x in range(0, ref[1], 2)]
    got = frobenius_with_reference(
        q, k, heads, d**-0.5, src, pseudo_self_attention(f), ref, renormalize_rows=renorm, image_mass=mass, row_stride=2
    )
    assert torch.allclose(got, (a_p * s)[sampled].sum(), rtol=1e-5)


@pytest.mark.parametrize("chunk", [50, 2**24])  # many query chunks, one chunk
@pytest.mark.parametrize("joint", [False, True])
def test_layers_of_one_grid_share_the_fused_calls_buffers(chunk, joint, monkeypatch):
    """The layers of one grid reuse the marker values and the bias rows the first one made (`GridWeights.buffers`):
    each layer's weight is still the one it gets alone."""
    import diffusers_goca.functional.self_attention as sa
    from diffusers_goca.functional.self_attention import joint_frobenius_with_reference, reference_weights

    monkeypatch.setattr(sa, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(3)
    heads, d, src, ref = 2, 4, (8, 6), (8, 6)
    a_p = pseudo_self_attention(torch.randn(48, 10))
    prepared = reference_weights(a_p, src, ref)
    for _layer in range(3):
        q, k, k_txt = torch.randn(48, heads * d), torch.randn(48, heads * d), torch.randn(5, heads * d)
        if joint:
            alone = joint_frobenius_with_reference(q, k, k_txt, heads, d**-0.5, src, a_p, ref)
            shared = joint_frobenius_with_reference(q, k, k_txt, heads, d**-0.5, src, a_p, ref, prepared=prepared)
            assert torch.equal(alone[0], shared[0]) and torch.equal(alone[1], shared[1])
        else:
            alone = frobenius_with_reference(q, k, heads, d**-0.5, src, a_p, ref)
            assert torch.equal(alone, frobenius_with_reference(q, k, heads, d**-0.5, src, a_p, ref, prepared=prepared))
    assert len(prepared.buffers) == 2  # one set of marker values, one bias buffer


def test_normalize_layer_weights():
    w = normalize_layer_weights(torch.tensor([2.0, -1.0, 6.0]))
    assert torch.allclose(w, torch.tensor([0.25, 0.0, 0.75]))
    assert torch.allclose(normalize_layer_weights(torch.tensor([-1.0, -2.0])), torch.tensor([0.5, 0.5]))


def test_aggregate_layers_literal():
    """Each layer resized, weighted and summed, by the book (the code sums the layers of one grid first)."""
    maps = [torch.rand(4 * 6, 5), torch.rand(8 * 12, 5) - 0.2, torch.rand(4 * 6, 5) - 0.5]
    grids = [(4, 6), (8, 12), (4, 6)]
    w = torch.tensor([0.3, 0.7, 0.4])

    def up(m):
        return (
            F.interpolate(m.T.reshape(5, 1, 4, 6), size=(8, 12), mode="bilinear", align_corners=False).reshape(5, -1).T
        )

    m = (0.3 * up(maps[0]) + 0.7 * maps[1] + 0.4 * up(maps[2])).clamp_min(0)
    want = m / m.sum(-1, keepdim=True)
    assert torch.allclose(aggregate_layers(maps, grids, w, (8, 12)), want, atol=1e-6)


def test_per_pixel_rescale_literal():
    m = torch.rand(6, 10)
    classes, content = [[2, 3], [5], [7]], [2, 3, 5, 7, 8]
    got = per_pixel_rescale(m, classes, content)
    for p in range(6):
        denom = sum(m[p, t] for t in content)
        for k, toks in enumerate(classes):
            assert torch.isclose(got[k, p], sum(m[p, t] for t in toks) / len(toks) / denom, atol=1e-6)


def test_blur_matches_torchvision_semantics():
    # torchvision's gaussian_blur: sigma = 0.3·((k−1)/2 − 1) + 0.8, reflect padding, separable kernel.
    x = torch.rand(2, 9 * 7)
    sigma = 1.1
    k1 = torch.exp(-0.5 * ((torch.arange(5) - 2) / sigma) ** 2)
    k1 = k1 / k1.sum()
    k2 = k1[:, None] * k1[None, :]
    img = F.pad(x.view(2, 1, 9, 7), (2, 2, 2, 2), mode="reflect")
    want = F.conv2d(img, k2.view(1, 1, 5, 5)).view(2, -1)
    assert torch.allclose(gaussian_blur(x, (9, 7)), want, atol=1e-6)
    try:
        import torchvision.transforms.functional as TF

        tv = TF.gaussian_blur(x.view(2, 1, 9, 7), [5, 5]).view(2, -1)
        assert torch.allclose(gaussian_blur(x, (9, 7)), tv, atol=1e-5)
    except Exception:  # torchvision is optional
        pass


def test_minmax_and_propagation():
    m = torch.randn(3, 16)
    mm = minmax(m)
    assert torch.allclose(mm.min(-1).values, torch.zeros(3)) and torch.allclose(mm.max(-1).values, torch.ones(3))
    s = torch.rand(16, 16)
    want = (torch.linalg.matrix_power(s, 3) @ m.T).T
    assert torch.allclose(propagate(s, m, 3), want, rtol=1e-4, atol=1e-4)
    calls = []
    assert torch.allclose(propagate(lambda x: calls.append(1) or s @ x, m, 3), want, rtol=1e-4, atol=1e-4)
    assert len(calls) == 3, "S^k·M must be k products, never S^k"


def test_labels_with_background_offset():
    scores = torch.tensor([[0.2, 0.9], [0.5, 0.1]])  # 2 classes, 1×2 grid
    bg = torch.tensor([0.4, 0.4])
    labels, up = scores_to_labels(scores, (1, 2), (1, 2), bg, background_offset=0.2)
    assert up.shape == (3, 1, 2)
    assert labels.tolist() == [[2, 0]]  # background 0.6 beats 0.5 at pixel 0; class 0 (0.9) wins at pixel 1
    labels, _ = scores_to_labels(scores, (1, 2), (1, 2), bg, background_offset=-0.3)
    assert labels.tolist() == [[1, 0]]


@pytest.mark.parametrize("mode", ["auto", "average"])
@pytest.mark.parametrize("other", [0, 5], ids=["image+text", "image+text+other"])
def test_joint_text_attention_matches_the_full_softmax(mode, other, monkeypatch):
    """Under the softmax over [image; text; other keys] (the other keys: Flux Kontext's reference image)."""
    import diffusers_goca.functional.self_attention as sa
    from diffusers_goca.functional.joint import joint_text_attention

    monkeypatch.setattr(sa, "CHUNK_ELEMENTS", 64)  # several query chunks
    heads, d, n, t, D = 3, 4, 10, 6, 7
    q, k_img = torch.randn(n, heads * d), torch.randn(n, heads * d)
    k_txt, v_txt = torch.randn(t, heads * d), torch.randn(t, heads * d)
    k_other = torch.randn(other, heads * d) * 2 if other else None
    w_out = torch.randn(D, heads * d)
    scale = d**-0.5
    image_mass, maps, _ = joint_text_attention(q, k_img, k_txt, v_txt, heads, scale, w_out, mode, k_other=k_other)
    keys = torch.cat([k_img, k_txt] + ([k_other] if other else []))
    probs = torch.stack(
        [(q[:, h * d : (h + 1) * d] @ keys[:, h * d : (h + 1) * d].T * scale).softmax(-1) for h in range(heads)]
    )
    a_txt = probs[:, :, n : n + t]  # [heads, N, T] under the joint softmax
    assert other == 0 or probs[:, :, n + t :].sum(-1).min() > 0.05  # the other keys take a share the test can see
    assert torch.allclose(maps["average"], a_txt.mean(0), atol=1e-6)
    assert torch.allclose(image_mass, probs[:, :, :n].sum(-1), atol=1e-6)
    if mode == "auto":
        o = [
            a_txt[h] @ v_txt[:, h * d : (h + 1) * d] @ w_out[:, h * d : (h + 1) * d].T for h in range(heads)
        ]  # o_h^text
        total = sum(o)
        dots = torch.stack([(oh * total).sum(-1) for oh in o])
        w = dots / dots.sum(0)
        assert torch.allclose(maps["auto"], torch.einsum("hnt,hn->nt", a_txt, w), atol=1e-5)
    # The image→image slice of the same softmax, from q, k and lse alone.
    from diffusers_goca.functional.self_attention import self_attention_rows

    rows = torch.arange(n)
    assert torch.allclose(
        self_attention_rows(q, k_img, rows, heads, scale, image_mass), probs[:, :, :n].mean(0), atol=1e-6
    )


@pytest.mark.parametrize("src,dst", [((4, 6), (8, 12)), ((8, 12), (8, 12)), ((6, 4), (3, 2))])
@pytest.mark.parametrize("joint", [False, True])
def test_fused_self_attention_product_equals_the_explicit_matrix(src, dst, joint):
    from diffusers_goca.functional.self_attention import apply_self_attention

    heads, d = 3, 4
    n = src[0] * src[1]
    q, k = torch.randn(n, heads * d), torch.randn(n, heads * d)
    mass = torch.rand(heads, n) if joint else None
    x = torch.randn(dst[0] * dst[1], 6)  # wider than the head dim: two value chunks
    s = head_mean_self_attention(q, k, heads, d**-0.5, src, dst, mass)
    got = apply_self_attention(q, k, heads, d**-0.5, src, dst, x, mass)
    assert torch.allclose(got, s @ x, atol=1e-5)


def test_entropy_reduced_self_attention_matches_a_literal_loop():
    import math

    from diffusers_goca.functional.maps import entropy_reduced

    torch.manual_seed(0)
    a = torch.rand(5, 5).softmax(-1)
    a[1, 3] = 0.0  # a zero entry stays zero
    lam = 0.015
    expected = torch.zeros(5, 5)
    col_max = [max(float(a[i, j]) for i in range(5)) for j in range(5)]
    for i in range(5):
        for j in range(5):
            v = float(a[i, j]) / col_max[j]
            expected[i, j] = max(0.0, v + lam * math.log10(math.e * v)) if v > 0 else 0.0
        expected[i] /= expected[i].sum()
    assert torch.allclose(entropy_reduced(a, lam), expected, atol=1e-6)
    assert entropy_reduced(a, lam)[1, 3] == 0


def test_fused_reductions_in_bfloat16_stay_close_to_fp32():
    """Accelerators run the side path's large products in the model dtype: the marker-value readouts (R / (1 + R),
    the text share) and the head weights keep their precision in bf16."""
    from diffusers_goca.functional.joint import key_shares

    torch.manual_seed(0)
    heads, d, src, ref = 4, 16, (8, 8), (8, 8)
    n = src[0] * src[1]
    q, k = torch.randn(n, heads * d), torch.randn(n, heads * d)
    a_p = pseudo_self_attention(torch.randn(n, 32))
    exact = frobenius_with_reference(q, k, heads, d**-0.5, src, a_p, ref)
    half = frobenius_with_reference(q.bfloat16(), k.bfloat16(), heads, d**-0.5, src, a_p, ref, dtype=torch.bfloat16)
    assert half.dtype == torch.float32 and abs(half / exact - 1) < 0.005, (float(half), float(exact))
    x, w = torch.randn(2, 10, heads * d), torch.randn(24, heads * d)
    weights, weights_half = (
        head_weights(x, w, heads),
        head_weights(x.bfloat16(), w.bfloat16(), heads, dtype=torch.bfloat16),
    )
    assert weights_half.dtype == torch.float32 and (weights_half - weights).abs().max() < 0.01
    k_txt = torch.randn(12, heads * d)
    share = key_shares(q, k, [k_txt], heads, d**-0.5)[0]
    share_half = key_shares(q.bfloat16(), k.bfloat16(), [k_txt.bfloat16()], heads, d**-0.5, dtype=torch.bfloat16)[0]
    assert (share_half - share).abs().max() < 0.02


def test_maps_and_refinement_in_bfloat16_keep_fp32_logits():
    """The text maps, the joint maps with their head weights, A_p and the refinement run their products in the model
    dtype on accelerators, with the logits kept in fp32: their results stay close to the fp32 ones."""
    from diffusers_goca.functional.joint import joint_text_attention
    from diffusers_goca.functional.self_attention import apply_self_attention, logits

    torch.manual_seed(0)
    heads, d, hw = 4, 16, (8, 8)
    n = hw[0] * hw[1]
    q, k, k_txt, v_txt = (3 * torch.randn(m, heads * d) for m in (n, n, 12, 12))
    a, b = q.view(n, heads, d).transpose(0, 1), k_txt.view(12, heads, d).permute(1, 2, 0)
    half = logits(a, b, torch.bfloat16)
    assert half.dtype == torch.float32 and torch.equal(half, a.bfloat16().float() @ b.bfloat16().float())
    bf = {name: t.bfloat16() for name, t in dict(q=q, k=k, k_txt=k_txt, v_txt=v_txt).items()}
    w = torch.randn(24, heads * d)
    mass, maps, _ = joint_text_attention(q, k, k_txt, v_txt, heads, d**-0.5, w)
    mass_half, maps_half, _ = joint_text_attention(
        bf["q"], bf["k"], bf["k_txt"], bf["v_txt"], heads, d**-0.5, w.bfloat16(), dtype=torch.bfloat16
    )
    assert (mass_half - mass).abs().max() < 0.02
    for key in ("average", "auto"):
        assert maps_half[key].dtype == torch.float32 and (maps_half[key] - maps[key]).abs().max() < 0.02
    x = torch.rand(n, 3)
    refined = apply_self_attention(q, k, heads, d**-0.5, hw, hw, x)
    refined_half = apply_self_attention(bf["q"], bf["k"], heads, d**-0.5, hw, hw, x, dtype=torch.bfloat16)
    assert (refined_half - refined).abs().max() < 0.02
    f = torch.randn(n, 32)
    assert (pseudo_self_attention(f.bfloat16(), dtype=torch.bfloat16) - pseudo_self_attention(f)).abs().max() < 0.02


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("src", [(4, 3), (8, 6)])
def test_joint_layer_weight_call_also_gives_the_text_share(renorm, src, monkeypatch):
    """With the text keys in the same fused call, the layer weight is the one taken with the joint softmax's image
    share, and the text share comes out of it too."""
    import diffusers_goca.functional.self_attention as sa
    from diffusers_goca.functional.joint import key_shares
    from diffusers_goca.functional.self_attention import joint_frobenius_with_reference

    monkeypatch.setattr(sa, "CHUNK_ELEMENTS", 300)  # several query chunks
    torch.manual_seed(1)
    heads, d, ref = 2, 4, (8, 6)
    n = src[0] * src[1]
    q, k, k_txt = torch.randn(n, heads * d), torch.randn(n, heads * d), torch.randn(7, heads * d)
    a_p = pseudo_self_attention(torch.randn(48, 10))
    share = key_shares(q, k, [k_txt], heads, d**-0.5)[0]
    want = frobenius_with_reference(q, k, heads, d**-0.5, src, a_p, ref, renormalize_rows=renorm, image_mass=1 - share)
    got, m_text = joint_frobenius_with_reference(q, k, k_txt, heads, d**-0.5, src, a_p, ref, renormalize_rows=renorm)
    assert torch.allclose(got, want, rtol=1e-5) and torch.allclose(m_text, share, atol=1e-6)
    with pytest.raises(ValueError, match="finer"):
        q16, k16 = torch.randn(192, heads * d), torch.randn(192, heads * d)
        joint_frobenius_with_reference(q16, k16, k_txt, heads, d**-0.5, (16, 12), a_p, ref)


@pytest.mark.parametrize("src, dst", [((32, 32), (64, 64)), ((5, 7), (16, 16)), ((16, 16), (8, 8)), ((3, 5), (7, 4))])
def test_key_resize_adjoint_is_the_transposed_resize(src, dst):
    """Bᵀ·x from the separable per-axis factors equals the transpose of the bilinear resize itself."""
    from diffusers_goca.functional.self_attention import resize_keys, resize_keys_adjoint

    torch.manual_seed(0)
    x = torch.randn(dst[0] * dst[1], 5, dtype=torch.float64)
    b_transposed = resize_keys(torch.eye(src[0] * src[1], dtype=torch.float64), src, dst)  # [N_src, N_dst]
    assert torch.allclose(resize_keys_adjoint(x, src, dst).double(), b_transposed @ x, atol=1e-5)


def test_miou_over_the_classes_of_the_ground_truth_against_a_plain_loop():
    """over="truth" averages the IoU of the classes the ground truth has; a class only predicted does not count."""
    from diffusers_goca.functional.metrics import confusion_matrix, miou

    target = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 3, 1, 0, 2])
    conf = confusion_matrix(pred, target, 4)
    expected = []
    for k in target.unique().tolist():
        inter = int(((pred == k) & (target == k)).sum())
        union = int(((pred == k) | (target == k)).sum())
        expected.append(inter / union)
    assert miou(conf, over="truth")[0] == pytest.approx(sum(expected) / len(expected))
    assert miou(conf, over="present")[0] != pytest.approx(miou(conf, over="truth")[0])  # class 3: predicted only
    with pytest.raises(ValueError, match="'truth'"):
        miou(conf, over="everything")
