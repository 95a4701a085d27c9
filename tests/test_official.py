"""`segment()` against a plain restatement of the official GoCA computation (the released code and its feature
extractor, as read from their source), on the same forward, at the real depth of SD 1.5 (16 cross layers), PixArt-Σ
(28 blocks) and Flux.1 (19 double + 38 single blocks) with tiny widths.

The forward runs with recording processors that compute every attention explicitly and keep all of it (as the official
extractor does); GoCA wraps them, so its capture reads the same queries and keys. The restatement then follows the
official steps literally, with full [heads, N, N] maps:
- per layer, C_l = Σ_h w_h A_h, w_h = ⟨o_h W_hᵀ, out⟩ / Σ_h' ⟨o_h' W_h'ᵀ, out⟩ (no bias, no clamp) or 1/H;
- A_p = softmax(F Fᵀ/√C), or in the code softmax(f₀ f₀ᵀ) from channel 0 of F at scale 1; S_l = head-mean
  self-attention of the same block, keys resized bilinearly and queries by nearest neighbour to the reference grid,
  rows not renormalised; w_l = max(Σ A_p ⊙ S̃_l, 0), normalised to sum 1;
- M = Σ_l w_l resize(C_l), clamped ≥ 0 and L1-normalised per pixel over all text tokens, in every mode;
- class = mean of its tokens (divided by the sum over the content tokens when rescaling), Gaussian blur 5 (σ 1.1,
  reflect), min-max; S^k·M with S the mean head-mean self-attention of the refinement layers, min-max.
Flux: the maps and self maps are slices of the joint softmax, not renormalised; the reference is the attention output
of single block 8 (the code's `vit-block27`); heads averaged (its config).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image

import diffusers_goca as goca
from diffusers_goca.testing import make_tiny_flux, make_tiny_pixart, make_tiny_sd
from diffusers_goca.tokens import segmentation_prompt

CLASSES = ["cat", "grass"]
STOPWORDS = {"a", "an", "the", "and", ",", ".", "-"}


class RecordingAttnProcessor(AttnProcessor):
    """diffusers' explicit `AttnProcessor`, keeping each call's attention probabilities [B·heads, N, T], the output
    before `to_out` and the query projection."""

    def __init__(self, store: dict):
        super().__init__()
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        scores = attn.get_attention_scores

        def kept_scores(query, key, mask=None):
            self.store["probs"] = scores(query, key, mask)
            return self.store["probs"]

        hooks = [
            attn.to_q.register_forward_hook(lambda m, i, o: self.store.__setitem__("query", o)),
            attn.to_out[0].register_forward_pre_hook(lambda m, i: self.store.__setitem__("head_out", i[0])),
        ]
        attn.get_attention_scores = kept_scores
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        finally:
            del attn.get_attention_scores
            for h in hooks:
                h.remove()


class RecordingFluxProcessor:
    """Flux attention computed explicitly (one softmax over [text; image] keys), keeping the probabilities
    [heads, T + N, T + N] and the attention output before any projection."""

    def __init__(self, store: dict):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        probs = (torch.einsum("bnhd,bmhd->bhnm", q, k) * attn.head_dim**-0.5).softmax(-1)
        out = torch.einsum("bhnm,bmhd->bnhd", probs, v).flatten(2)
        self.store["probs"], self.store["out"] = probs[0], out[0]
        if encoder_hidden_states is None:
            return out
        t = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, t:])), attn.to_add_out(out[:, :t])


def record(denoiser, processor_class) -> dict:
    stores = {}
    processors = {}
    for name in denoiser.attn_processors:
        layer = name.rsplit(".processor", 1)[0]
        stores[layer] = {}
        processors[name] = processor_class(stores[layer])
    denoiser.set_attn_processor(processors)
    return stores


# -- the official computation, literally --------------------------------------------------------------------------
def keys_bilinear_queries_nearest(s: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """[N_src, N_src] → [N_dst, N_dst]: the key axis resized bilinearly, the query axis by nearest neighbour."""
    keys = F.interpolate(s.reshape(-1, 1, *src), size=dst, mode="bilinear", align_corners=False).reshape(*src, -1)
    return (
        F.interpolate(keys.permute(2, 0, 1)[None], size=dst, mode="nearest")[0]
        .permute(1, 2, 0)
        .reshape(dst[0] * dst[1], -1)
    )


def official_head_weights(head_out: torch.Tensor, w_out: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads, N]: ⟨r_h, Σ_h' r_h'⟩ / Σ_h ⟨r_h, Σ_h' r_h'⟩ with r_h = o_h W_hᵀ, no bias, no clamp."""
    d = head_out.shape[-1] // heads
    r = torch.stack([head_out[:, h * d : (h + 1) * d] @ w_out[:, h * d : (h + 1) * d].T for h in range(heads)])
    dots = (r * r.sum(0)).sum(-1)
    return dots / dots.sum(0)


def blur(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    k = torch.exp(-0.5 * ((torch.arange(5.0) - 2) / 1.1) ** 2)
    k = k / k.sum()
    img = F.pad(x.reshape(-1, 1, *hw), (2, 2, 2, 2), mode="reflect")
    img = F.conv2d(F.conv2d(img, k.view(1, 1, 1, 5)), k.view(1, 1, 5, 1))
    return img.reshape(x.shape[0], -1)


def minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    return (x - lo) / (hi - lo)


def official_scores(
    cross,
    selfs,
    grids,
    reference,
    ref_grid,
    layers,
    refinement,
    order,
    class_tokens,
    content,
    map_hw,
    head_weighting,
    layer_weighting,
    rescale,
    pseudo,
) -> torch.Tensor:
    """cross[l]: (A [heads, N_l, T], head_out [N_l, heads·d], W_out); selfs[l]: [heads, N_l, N_l] of the layer paired
    with l; reference: F [N_ref, C]. Returns class scores [K, N_map]."""
    maps = []
    for name in layers:
        probs, head_out, w_out = cross[name]
        heads = probs.shape[0]
        if head_weighting == "auto":
            w = official_head_weights(head_out, w_out, heads)
        else:
            w = torch.full(probs.shape[:2], 1.0 / heads)
        maps.append(torch.einsum("hnt,hn->nt", probs, w))
    if layer_weighting == "auto":
        f = reference[:, :1] if pseudo == "official-code" else reference
        a_p = (f @ f.T * f.shape[-1] ** -0.5).softmax(-1)
        raw = torch.stack(
            [(a_p * keys_bilinear_queries_nearest(selfs[n].mean(0), grids[n], ref_grid)).sum() for n in layers]
        )
        weights = raw.clamp_min(0) / raw.clamp_min(0).sum()
    else:
        weights = torch.full((len(layers),), 1.0 / len(layers))
    m = sum(
        w
        * F.interpolate(c.T.reshape(-1, 1, *grids[n]), size=map_hw, mode="bilinear", align_corners=False)
        .reshape(c.shape[1], -1)
        .T
        for w, c, n in zip(weights, maps, layers)
    )
    m = m.clamp_min(0)
    m = m / m.sum(-1, keepdim=True)  # over all text tokens, in every mode
    scores = torch.stack([m[:, pos].mean(-1) for pos in class_tokens])
    if rescale:
        scores = scores / m[:, content].sum(-1)
    scores = minmax(blur(scores, map_hw))
    if order:
        s = sum(keys_bilinear_queries_nearest(selfs[n].mean(0), grids[n], map_hw) for n in refinement) / len(refinement)
        for _ in range(order):
            scores = (s @ scores.T).T
        scores = minmax(scores)
    return scores


def prompt_tokens(tokenizer, prompt: str, classes, t5: bool):
    """(positions of each class's tokens, positions of all content tokens) read off the tokenizer's offsets: tokens
    that are not special, not a lone T5 "▁", not punctuation and not in a stopword."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    ids, offsets = enc.input_ids, enc.offset_mapping
    special = set(tokenizer.all_special_ids)
    words = [(m.start(), m.end()) for m in re.finditer(r"\w+", prompt)]

    def word(a, b):
        return next((prompt[s:e].lower() for s, e in words if s < b and e > a), None)

    content = [
        i
        for i, (tid, (a, b)) in enumerate(zip(ids, offsets))
        if tid not in special
        and b > a
        and word(a, b) not in (None, *STOPWORDS)
        and not (t5 and tokenizer.convert_ids_to_tokens(tid) == "▁")
    ]
    class_tokens = []
    for c in classes:
        start = prompt.index(c)
        class_tokens.append([i for i in content if offsets[i][0] < start + len(c) and offsets[i][1] > start])
    return class_tokens, content


def sharpened(pipe, factor: float):
    """Attention that is not uniform on a random tiny model: every query projection scaled by `factor` (the norm's
    weight where a per-head norm follows), and the self-attention's keys tied to its queries, so that each image token
    attends mostly to itself and its look-alikes, as a trained model's does. Otherwise S^k·M of PixArt's k = 5 would be
    flat, and its min-max would only amplify rounding."""
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    for name, module in denoiser.named_modules():
        if not hasattr(module, "to_q"):
            continue
        with torch.no_grad():
            if not getattr(module, "is_cross_attention", False):
                module.to_k.weight.copy_(module.to_q.weight)
                if module.to_q.bias is not None:
                    module.to_k.bias.copy_(module.to_q.bias)
            norm = getattr(module, "norm_q", None)
            if norm is not None and getattr(norm, "weight", None) is not None:
                module.norm_k.weight.copy_(norm.weight)
                norm.weight.mul_(factor)
            else:
                module.to_q.weight.mul_(factor)
    return pipe


CASES = {  # name: (segment's method and options, the restatement's head / layer weighting, rescale)
    "vanilla": ("vanilla", {}, "average", "uniform", False),
    "head-wise only": ("goca", dict(layer_weighting="uniform", rescale=False), "auto", "uniform", False),
    "layer-wise only": ("goca", dict(head_weighting="average", rescale=False), "average", "auto", False),
    "rescaling only": ("goca", dict(head_weighting="average", layer_weighting="uniform"), "average", "uniform", True),
    "goca": ("goca", {}, "auto", "auto", True),
}


def _segment_and_restate(pipe, stores, adapter, latent_hw, cross_of, selfs_of, reference_of, t5):
    classes = CLASSES
    prompt = segmentation_prompt(classes, False)
    class_tokens, content = prompt_tokens(adapter.tokenizer(), adapter.segment_text(prompt), classes, t5)
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    out = {}
    for case, (method, options, heads, layer_weighting, rescale) in CASES.items():
        if adapter.family == "flux" and heads == "auto":
            options, heads = {**options, "head_weighting": "average"}, "average"  # Flux's official config
        options = {**options, "pseudo_attention": "official-code"}
        result = pipe.segment(image, classes, method=method, background=False, resolution=32, **options)
        layers, refinement = adapter.layer_set("subset" if method == "vanilla" else "all")
        grids = {n: adapter.layer_hw(n, latent_hw) for n in adapter.layers}
        map_hw = adapter.map_grid(latent_hw)
        want = official_scores(
            cross_of(stores),
            selfs_of(stores),
            grids,
            reference_of(stores),
            grids[adapter.reference_layer],
            layers,
            refinement,
            adapter.refine_order,
            class_tokens,
            content,
            map_hw,
            heads,
            layer_weighting,
            rescale,
            "official-code",
        )
        want = F.interpolate(
            want.reshape(1, -1, *map_hw), size=result.scores.shape[-2:], mode="bilinear", align_corners=False
        )[0]
        out[case] = (result.scores, want)
    return out


@pytest.mark.parametrize("family", ["sd", "pixart", pytest.param("flux", marks=pytest.mark.slow)])
@torch.no_grad()
def test_segment_equals_the_official_computation(family):
    torch.manual_seed(0)
    if family == "sd":
        pipe = sharpened(make_tiny_sd(), 6.0)
        stores = record(pipe.unet, RecordingAttnProcessor)
    elif family == "pixart":
        pipe = sharpened(make_tiny_pixart(num_layers=28), 12.0)  # k = 5: S must stay far from flat
        stores = record(pipe.transformer, RecordingAttnProcessor)
    else:
        pipe = sharpened(make_tiny_flux(num_layers=19, num_single_layers=38), 4.0)
        stores = record(pipe.transformer, RecordingFluxProcessor)
    pipe = goca.from_pipe(pipe)
    adapter = pipe._goca.adapter
    # segment at 32 px: the latent grid, packed 2×2 by Flux
    latent_hw = (32 // pipe.vae_scale_factor // (2 if family == "flux" else 1),) * 2

    if family == "flux":
        text_len = adapter.text_max_length

        def cross_of(st):
            return {n: (st[n]["probs"][:, text_len:, :text_len], None, None) for n in adapter.cross_layers}

        def selfs_of(st):
            return {n: st[n]["probs"][:, text_len:, text_len:] for n in adapter.cross_layers}

        def reference_of(st):
            return st[adapter.reference_layer]["out"][text_len:]
    else:

        def cross_of(st):
            def heads_first(name):
                probs = st[name]["probs"]
                return probs.view(-1, *probs.shape[-2:])

            return {
                n: (heads_first(n), st[n]["head_out"][0], adapter.submodule(n).to_out[0].weight)
                for n in adapter.cross_layers
            }

        def selfs_of(st):
            return {n: st[adapter.self_of(n)]["probs"] for n in adapter.cross_layers} | {
                n: st[n]["probs"] for n in adapter.self_layers
            }

        def reference_of(st):
            return st[adapter.reference_layer]["query"][0]

    results = _segment_and_restate(
        pipe, stores, adapter, latent_hw, cross_of, selfs_of, reference_of, t5=family != "sd"
    )
    for case, (got, want) in results.items():
        assert got.shape == want.shape, case
        shares = torch.bincount(want.argmax(0).flatten(), minlength=len(CLASSES)) / want[0].numel()
        assert shares.min() > 0.02, (case, shares, "one class takes the image: sharpen the attention")
        assert (got - want).abs().max() < 5e-3, (case, (got - want).abs().max().item())


def _count_forwards(denoiser) -> list:
    calls = []
    denoiser.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


def test_options_a_family_cannot_take_are_refused_before_any_forward():
    image = Image.new("RGB", (32, 32), "green")
    sd, pixart = goca.from_pipe(make_tiny_sd()), goca.from_pipe(make_tiny_pixart())
    forwards = _count_forwards(sd.unet) + _count_forwards(pixart.transformer)
    with pytest.raises(ValueError, match="pseudo_attention must be one of .*official-code"):
        sd.segment(image, CLASSES, pseudo_attention="channel-0")
    with pytest.raises(ValueError, match="layers='manual'.*'all' or 'subset'"):
        pixart.segment(image, CLASSES, method="vanilla", layers="manual")
    with pytest.raises(ValueError, match="layers must be one of"):
        sd.segment(image, CLASSES, method="vanilla", layers="official")
    with pytest.raises(ValueError, match="not cross-attention layers"):
        sd.segment(image, CLASSES, layers=("down_blocks.0.attentions.0.transformer_blocks.0.attn1",))
    with pytest.raises(ValueError, match="guidance_scale.*guidance-distilled"):
        sd.segment(image, CLASSES, guidance_scale=3.5)
    with pytest.raises(ValueError, match="pseudo_attention must be one of"):
        sd("a cat on grass", num_inference_steps=2, goca_masks="last", goca_options={"pseudo_attention": "x"})
    scfg = goca.scfg_from_pipe(make_tiny_sd())
    forwards += _count_forwards(scfg.unet)
    with pytest.raises(ValueError, match="pseudo_attention must be one of"):
        scfg("a cat on grass", num_inference_steps=2, pseudo_attention="x")
    assert forwards == []


def test_flux_segments_with_guidance_one_as_the_official_extractor():
    pipe = goca.from_pipe(make_tiny_flux(guidance_embeds=True))
    forwards = _count_forwards(pipe.transformer)
    image = Image.new("RGB", (32, 32), "green")
    pipe.segment(image, CLASSES, resolution=32)
    pipe.segment(image, CLASSES, resolution=32, guidance_scale=3.5)
    assert [float(kw["guidance"][0]) for kw in forwards] == [1.0, 3.5]
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        pipe.segment(image, CLASSES, guidance_scale=float("nan"))


def test_official_code_pseudo_attention_is_channel_zero_at_scale_one():
    from diffusers_goca.functional import pseudo_self_attention

    f = torch.randn(20, 8)
    assert torch.allclose(pseudo_self_attention(f, "official-code"), (f[:, :1] @ f[:, :1].T).softmax(-1), atol=1e-6)
    assert torch.allclose(pseudo_self_attention(f, "paper"), (f @ f.T / 8**0.5).softmax(-1), atol=1e-6)
