"""What the capture records: the layers each family's adapter picks, maps equal to the attention formula recomputed
from each layer's inputs (cross and joint attention), the text columns and keys it keeps, no host wait for the
device, no autograd graph kept, and pixels whose attention output vanishes reported."""

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_goca as goca
from diffusers_goca.testing import (
    FAMILIES,
    FAMILY_IDS,
    PROMPTS,
    HostWaits,
    Running,
    generate,
    make_tiny_flux,
    make_tiny_pixart,
    make_tiny_sd,
    make_tiny_sd3,
)


def test_adapter_layers_follow_the_algorithm(tiny_sd, tiny_sdxl):
    sd = goca.adapter_for(tiny_sd)
    assert sd.reference_layer == "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
    assert sd.refinement_layers == [
        "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1",
    ]
    manual_blocks = sorted({n.split(".transformer_blocks")[0] for n in sd.manual_layers})
    assert manual_blocks == [
        "down_blocks.2.attentions.0",
        "down_blocks.2.attentions.1",
        "mid_block.attentions.0",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "up_blocks.1.attentions.2",
        "up_blocks.2.attentions.0",
        "up_blocks.2.attentions.1",
    ]  # SD 1.5's hand-picked set: down_blocks.2, mid, up_blocks.1, up_blocks.2 attentions 0–1
    assert len(sd.cross_layers) == 16 and sd.map_factor == 1
    xl = goca.adapter_for(tiny_sdxl)
    assert xl.reference_layer == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert xl.map_factor == 2 and len(xl.refinement_layers) == 7
    assert all(xl.layers[n].factor == 2 for n in xl.refinement_layers)


def test_pixart_adapter_scales_reference_and_refinement_with_depth():
    full = goca.adapter_for(make_tiny_pixart(num_layers=28))
    assert full.reference_layer == "transformer_blocks.13.attn2"
    assert full.refinement_layers == [f"transformer_blocks.{i}.attn1" for i in range(10, 18)]
    assert full.refine_order == 5 and full.text_max_length == 300 and full.map_factor == 2
    assert goca.adapter_for(make_tiny_pixart(sigma=False)).text_max_length == 120


@pytest.mark.parametrize("sigma", [pytest.param(True, marks=pytest.mark.slow), False], ids=["sigma", "alpha"])
def test_pixart_maps_read_only_the_prompts_text_keys(sigma, monkeypatch):
    """PixArt masks the T5 padding (300 / 120 keys, most of them padding): its cross maps are computed over the
    prompt's tokens only (`segment` and generation pass their count), and equal those over every key. A mask that
    leaves a key past them open is an error."""
    from diffusers_goca.capture import Capture
    from diffusers_goca.tokens import segmentation_prompt

    pipe = goca.from_pipe(make_tiny_pixart(sigma=sigma))
    adapter = pipe._goca.adapter
    prompt = segmentation_prompt(["cat", "grass"], True)
    index = adapter.token_index(prompt, ["cat", "grass"], extra_entities=["background"])
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    forward = lambda text: lambda: adapter.segment_forward(latents, text, 100, torch.Generator().manual_seed(1))
    short = pipe.capture_forward(forward(prompt), columns=index.needed(), text_keys=index.length)
    full = pipe.capture_forward(forward(prompt), columns=index.needed())
    assert index.length < adapter.text_max_length
    for name, maps in short.cross.items():
        for kind, m in maps.items():
            assert torch.allclose(m, full.cross[name][kind], atol=1e-6), (name, kind)
    short.check_text_keys()

    read = []
    start = Capture.start
    monkeypatch.setattr(Capture, "start", lambda self, *a: read.append(a[4]) or start(self, *a))  # text_keys
    pipe.segment(Image.new("RGB", (32, 32), "green"), ["cat", "grass"], background=True)
    generate(pipe, goca_masks=[1])
    lengths = [adapter.token_index(adapter.prompt_text(p, {}), [], require_classes=False).length for p in PROMPTS]
    assert read == [index.length, max(lengths)]

    cut = pipe.capture_forward(forward("a cat on green grass"), text_keys=2)
    assert next(iter(cut.cross.values()))["auto"].shape[-1] == 2
    with pytest.raises(RuntimeError, match="unmasked"):
        cut.check_text_keys()
    text = torch.randn(1, 12, adapter.denoiser.config.caption_channels)
    unmasked = pipe.capture_forward(
        lambda: adapter.denoiser(  # no mask at all: every key is read
            torch.randn(1, 4, 16, 16),
            encoder_hidden_states=text,
            timestep=torch.tensor([100]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ),
        text_keys=2,
    )
    assert next(iter(unmasked.cross.values()))["auto"].shape[-1] == 12


def _full_and_needed_captures(pipe, classes):
    from diffusers_goca.tokens import segmentation_prompt

    adapter = pipe._goca.adapter
    prompt = segmentation_prompt(classes, True)
    index = adapter.token_index(prompt, classes, extra_entities=["background"])
    latents = torch.randn(1, pipe.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    forward = lambda: adapter.segment_forward(
        latents, prompt, adapter.segment_timestep, torch.Generator().manual_seed(1)
    )
    return index, pipe.capture_forward(forward), pipe.capture_forward(forward, columns=index.needed())


@pytest.mark.parametrize("make", [make_tiny_sd3, make_tiny_flux], ids=["sd3", "flux"])
def test_maps_of_only_the_needed_tokens_are_the_full_maps_columns(make):
    """Joint families keep only the token columns the methods read (333 / 512 text keys at every layer): they are the
    full capture's columns, the text masses give the L1 sum over every token, and the methods give the scores of
    the full capture."""
    from diffusers_goca.capture_request import kept_columns
    from diffusers_goca.methods import available_methods, method_scores

    pipe = goca.from_pipe(make())
    adapter = pipe._goca.adapter
    index, full, kept = _full_and_needed_captures(pipe, ["cat", "green grass"])
    needed = index.needed()
    assert kept_columns(adapter, [index]) == needed
    assert kept.columns == needed and len(needed) < index.length
    for layer, maps in kept.cross.items():
        for kind in ("auto", "average"):
            assert torch.allclose(maps[kind], full.cross[layer][kind][..., needed], atol=1e-6), (layer, kind)
            mass = full.cross[layer][f"{kind} mass"]
            assert torch.allclose(mass, full.cross[layer][kind].sum(-1), atol=1e-5), (layer, kind)
            assert torch.allclose(maps[f"{kind} mass"], mass, atol=1e-6)
    assert kept.nbytes() < full.nbytes()
    # GoCA's min-max stages amplify the rounding on a random model's near-constant maps: compared on the toy below.
    for method in [m for m in available_methods(adapter) if m != "goca"]:
        a, a_bg = method_scores(full, 0, index, adapter, method, "background")
        b, b_bg = method_scores(kept, 0, index, adapter, method, "background")
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a_bg, b_bg, atol=1e-5), method


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_pixart], ids=["sd", "pixart-sigma"])
def test_cross_attention_families_keep_every_text_column(make):
    """Cross-attention families keep every column their softmax reads (the per-pixel clamp and L1 sum run over all
    text tokens): segment's capture holds CLIP's 77 columns, or PixArt's unmasked prompt tokens."""
    from diffusers_goca.capture_request import kept_columns

    pipe = goca.from_pipe(make())
    adapter = pipe._goca.adapter
    index, full, _ = _full_and_needed_captures(pipe, ["cat", "green grass"])
    assert kept_columns(adapter, [index]) is None
    steps = []
    pipe.capture_forward = lambda run, **kw: steps.append(type(pipe).capture_forward(pipe, run, **kw)) or steps[-1]
    pipe.segment(Image.new("RGB", (32, 32), "green"), ["cat", "green grass"], background=True)
    del pipe.capture_forward
    width = index.length if adapter.text_padding_masked else 77
    assert all(m["auto"].shape[-1] == width for m in steps[0].cross.values())


def test_goca_scores_of_the_needed_tokens_equal_the_full_capture_on_the_toy_model():
    from diffusers_goca.methods import method_scores
    from diffusers_goca.toyworld import load_toy_pipeline

    pipe = goca.from_pipe(load_toy_pipeline())
    index, full, kept = _full_and_needed_captures(pipe, ["red circle", "grass"])
    a, a_bg = method_scores(full, 0, index, pipe._goca.adapter, "goca", "background")
    b, b_bg = method_scores(kept, 0, index, pipe._goca.adapter, "goca", "background")
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a_bg, b_bg, atol=1e-4)


def literal_cross_maps(attn, hidden_states, context, bias):
    """Head-weighted and head-mean image→text maps of one cross-attention call, by the book (docs/official_code.md), from the
    layer's inputs: per head softmax(q kᵀ·scale + bias), o_h = (A_h V_h) W_hᵀ, w_h = ⟨o_h, Σ o⟩ / Σ_h' ⟨o_h', Σ o⟩."""
    q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    heads, w_out = attn.heads, attn.to_out[0].weight
    d = q.shape[-1] // heads
    probs, outs = [], []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        a = (q[..., cols] @ k[..., cols].transpose(-1, -2) * attn.scale + bias).softmax(-1)
        probs.append(a)
        outs.append(a @ v[..., cols] @ w_out[:, cols].T)
    total = sum(outs)
    dots = torch.stack([(o * total).sum(-1) for o in outs], 1)  # [B, heads, N]
    probs = torch.stack(probs, 1)  # [B, heads, N, T]
    return (probs * (dots / dots.sum(1, keepdim=True))[..., None]).sum(1), probs.mean(1)


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_captured_cross_maps_are_the_formula_on_the_layers_inputs(family):
    """The capture reads the forward's own projections (q, k, the attention output and its `to_out` projection): its
    maps equal the formula recomputed from each layer's inputs, padding mask included."""
    pipe = goca.from_pipe(make_tiny_sd() if family == "sd" else make_tiny_pixart())
    model = pipe.unet if family == "sd" else pipe.transformer
    torch.manual_seed(0)
    text = torch.randn(2, 12, 32 if family == "sd" else model.config.caption_channels)
    keep = torch.ones(2, 12)
    keep[1, 7:] = 0  # padding of the second prompt, masked in PixArt's cross-attention
    if family == "sd":
        run = lambda: model(torch.randn(2, 4, 8, 12), torch.tensor([100]), encoder_hidden_states=text)
    else:
        run = lambda: model(
            torch.randn(2, 4, 8, 12),
            encoder_hidden_states=text,
            encoder_attention_mask=keep,
            timestep=torch.tensor([100, 100]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    inputs = {}

    def record(name):
        def hook(module, args, kwargs):
            inputs.setdefault(name, (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]))

        return hook

    cross = pipe._goca.adapter.cross_layers
    handles = [model.get_submodule(n).register_forward_pre_hook(record(n), with_kwargs=True) for n in cross]
    with torch.no_grad():
        step = pipe.capture_forward(run, n_images=2)
        for h in handles:
            h.remove()
        for name in cross:
            bias = 0.0 if family == "sd" else ((1 - keep) * -10000.0)[:, None, :]
            auto, mean = literal_cross_maps(model.get_submodule(name), *inputs[name], bias)
            assert torch.allclose(step.cross[name]["auto"], auto, atol=1e-5), name
            assert torch.allclose(step.cross[name]["average"], mean, atol=1e-6), name


def literal_joint_maps(attn, hidden_states, context, rope, text_len, family, out_weight, n_image):
    """Image→text maps of one joint attention call by the book, from the layer's inputs: the projections, the per-head
    norms and RoPE as the processor applies them, one softmax over all keys per head; the head weights from each
    head's text output o_h = (A_h V_h) W_hᵀ against their sum (docs/official_code.md, our extension). The image is the first
    `n_image` image tokens (Flux Kontext: then the reference image's). Returns (auto [B, N, T], head-mean [B, N, T],
    image mass [B, heads, N])."""
    from diffusers.models.embeddings import apply_rotary_emb

    heads = attn.heads

    def split(x):  # [B, n, heads, d]
        return x.unflatten(-1, (heads, -1))

    def norm(module, x):
        return x if module is None else module(x)

    q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
    q, k = norm(attn.norm_q, q), norm(attn.norm_k, k)
    if context is not None:
        eq, ek, ev = split(attn.add_q_proj(context)), split(attn.add_k_proj(context)), split(attn.add_v_proj(context))
        eq, ek = norm(attn.norm_added_q, eq), norm(attn.norm_added_k, ek)
        first, second = ((eq, ek, ev), (q, k, v)) if family == "flux" else ((q, k, v), (eq, ek, ev))
        q, k, v = (torch.cat(pair, 1) for pair in zip(first, second))
    if rope is not None:
        q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    d = q.shape[-1]
    probs = (torch.einsum("bihd,bjhd->bhij", q, k) * d**-0.5).softmax(-1)  # [B, heads, S, S]
    image_start = text_len if family == "flux" else 0
    image = slice(image_start, image_start + n_image)
    text = slice(0, text_len) if family == "flux" else slice(q.shape[1] - text_len, None)
    a = probs[:, :, image, text]  # [B, heads, N, T]
    outs = [a[:, h] @ v[:, text, h] @ out_weight[:, h * d : (h + 1) * d].T for h in range(heads)]
    total = sum(outs)
    dots = torch.stack([(o * total).sum(-1) for o in outs], 1)  # [B, heads, N]
    auto = (a * (dots / dots.sum(1, keepdim=True))[..., None]).sum(1)
    return auto, a.mean(1), probs[:, :, image, image].sum(-1)


def grid_ids(first: float, h: int, w: int) -> torch.Tensor:
    """Flux's position ids [h·w, 3] of an h×w token grid: (first, row, column)."""
    axes = torch.meshgrid(torch.full((1,), float(first)), torch.arange(h) * 1.0, torch.arange(w) * 1.0, indexing="ij")
    return torch.stack(axes, -1).reshape(-1, 3)


@pytest.mark.parametrize("family", ["sd35", "flux", "flux-kontext"])
def test_captured_joint_maps_are_the_formula_on_the_layers_inputs(family):
    """The capture reads the forward's own projections and per-head norms and applies the forward's RoPE: for the
    conditional half of a CFG batch, its maps and image shares equal the joint softmax recomputed from each layer's
    inputs (SD 3.5 with q/k norms and a dual-attention block; Flux's double- and single-stream blocks; Flux Kontext,
    whose reference image's tokens follow the generated image's and share its softmax)."""
    torch.manual_seed(0)
    n_reference = 0
    if family == "sd35":
        pipe = goca.from_pipe(make_tiny_sd3(num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,)))
        model, t, n = pipe.transformer, 10, (8 // 2) * (12 // 2)  # patch 2
        args = dict(
            hidden_states=torch.randn(2, 4, 8, 12),
            encoder_hidden_states=torch.randn(2, t, 64),
            pooled_projections=torch.randn(2, 64),
            timestep=torch.tensor([500.0, 500.0]),
        )
    else:
        pipe = goca.from_pipe(make_tiny_flux())
        model, t, (h, w) = pipe.transformer, 10, (4, 6)
        ids = grid_ids(0, h, w)
        if family == "flux-kontext":  # a 3×5 reference image
            ids = torch.cat([ids, grid_ids(1, 3, 5)])
            n_reference = 15
        n = h * w
        args = dict(
            hidden_states=torch.randn(2, n + n_reference, 16) * 3,
            encoder_hidden_states=torch.randn(2, t, 32),
            pooled_projections=torch.randn(2, 32),
            timestep=torch.tensor([0.5, 0.5]),
            img_ids=ids,
            txt_ids=torch.zeros(t, 3),
        )
    inputs = {}

    def record(name):
        def hook(module, args_, kwargs):
            hs = args_[0] if args_ else kwargs["hidden_states"]
            inputs.setdefault(name, (hs, kwargs.get("encoder_hidden_states"), kwargs.get("image_rotary_emb")))

        return hook

    pipe.enable_goca()
    adapter = pipe._goca.adapter
    handles = [model.get_submodule(n).register_forward_pre_hook(record(n), with_kwargs=True) for n in adapter.layers]
    with torch.no_grad():
        step = pipe.capture_forward(lambda: model(**args, return_dict=False), n_images=1)  # rows: the second half
        for handle in handles:
            handle.remove()
        assert step.rows == [1] and len(adapter.layers) >= 3
        for name in adapter.layers:
            attn = model.get_submodule(name)
            auto, mean, mass = literal_joint_maps(
                attn,
                *inputs[name],
                t,
                "sd3" if family == "sd35" else "flux",
                adapter.output_projection(name, attn).weight(like=attn.to_q.weight),
                n,
            )
            assert torch.allclose(step.cross[name]["average"], mean[1:], atol=1e-6), name
            assert torch.allclose(step.cross[name]["auto"], auto[1:], atol=1e-5), name
            assert torch.allclose(step.selfs[name].image_mass, mass[1:], atol=1e-5), name
            if n_reference:  # the reference image takes a share of the softmax that the test can see
                assert (1 - mass[1:] - mean[1:].sum(-1)[:, None]).min() > 0.01, name


@pytest.mark.parametrize("make", FAMILIES, ids=FAMILY_IDS)
def test_capture_and_reductions_never_wait_for_the_device(make, monkeypatch):
    import diffusers_goca.step_results as step_results

    pipe = goca.from_pipe(make())
    reducing = Running(monkeypatch, step_results, "method_scores")
    img = Image.fromarray((np.random.RandomState(2).rand(40, 56, 3) * 255).astype(np.uint8))
    with HostWaits(lambda: pipe._goca.capture.active or bool(reducing)) as waits:
        result = pipe.segment(img, ["cat", "grass"], resolution=64)
    assert result.labels.shape == (40, 56)
    assert waits.ops == [], f"the capture forward or the reductions read device values on the host: {waits.ops}"


@pytest.mark.slow
def test_pixels_with_a_zero_attention_output_are_reported(caplog):
    pipe = goca.from_pipe(make_tiny_sd())
    img = Image.fromarray((np.random.RandomState(3).rand(32, 32, 3) * 255).astype(np.uint8))
    with caplog.at_level("WARNING", logger="diffusers_goca"):
        pipe.segment(img, ["cat", "grass"], resolution=64)
    assert "norm ≈ 0" not in caplog.text
    layer = pipe._goca.adapter.cross_layers[0]
    with torch.no_grad():  # its output is then the bias alone: out(p) = 0 for the head weights at every pixel
        pipe.unet.get_submodule(layer).to_out[0].weight.zero_()
    with caplog.at_level("WARNING", logger="diffusers_goca"):
        pipe.segment(img, ["cat", "grass"], resolution=64)
        pipe.segment(img, ["cat", "grass"], resolution=64, method="vanilla")  # reads the head-mean maps: no report
    side = 64 // pipe.vae_scale_factor
    h, w = pipe._goca.adapter.layer_hw(layer, (side, side))
    assert caplog.text.count("norm ≈ 0") == 1 and f"GoCA: {h * w} pixel(s)" in caplog.text


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_forward_under_grad_leaves_no_graph_in_the_capture(family):
    """A denoiser called with gradients on (a training loop, gradient guidance): the capture holds no tensor that
    requires grad, so it keeps no part of the forward's graph alive."""
    pipe = goca.from_pipe(make_tiny_sd() if family == "sd" else make_tiny_sd3())
    denoiser = pipe._goca.adapter.denoiser
    if family == "sd":
        x = torch.randn(1, 4, 8, 8)
        embeds = pipe.encode_prompt("a cat", "cpu", 1, False)[0]
        run = lambda: denoiser(x, torch.tensor([10]), encoder_hidden_states=embeds)  # noqa: E731
    else:
        x = torch.randn(1, denoiser.config.in_channels, 8, 8)
        embeds, _, pooled, _ = pipe.encode_prompt(
            "a cat", None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=32
        )
        run = lambda: denoiser(
            hidden_states=x,
            timestep=torch.tensor([10.0]),
            encoder_hidden_states=embeds,  # noqa: E731
            pooled_projections=pooled,
        )
    with torch.enable_grad():
        step = pipe.capture_forward(run)
    held, seen = [], set()

    def walk(obj, path):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            held.append((path, obj.requires_grad))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
            for k, v in vars(obj).items():
                walk(v, f"{path}.{k}")

    walk(step, "step")
    assert any(p.startswith("step.cross") for p, _ in held)
    assert [p for p, grad in held if grad] == []
