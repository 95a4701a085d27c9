"""GoCA attached to a pipeline: the images stay bit-identical to the untouched pipeline's, `disable_goca` puts the
same processor objects back (settings made meanwhile carry over, processors set by others stay), and `from_pipe`
shares the components without casting or double wrapping."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image

import diffusers_goca as goca
from diffusers_goca.testing import (
    FAMILIES,
    FAMILY_IDS,
    generate,
    make_tiny_flux,
    make_tiny_sd,
)

SLOW_FAMILIES = {"sd", "sd2", "sdxl", "pixart-sigma"}  # over about 10 s each on 2 CPU cores


@pytest.mark.parametrize(
    "make",
    [pytest.param(m, marks=pytest.mark.slow) if i in SLOW_FAMILIES else m for m, i in zip(FAMILIES, FAMILY_IDS)],
    ids=FAMILY_IDS,
)
def test_images_bit_identical_with_goca(make):
    pipe = make()
    reference = generate(pipe)
    gp = goca.from_pipe(pipe)
    assert np.array_equal(generate(gp), reference)
    masked = generate(gp, goca_masks=True)
    assert np.array_equal(masked, reference), "computing masks must not change the images"
    assert len(gp.goca_masks) == 3
    last = gp.goca_masks[-1].results
    assert len(last) == 2 and last[0].labels.shape == (32, 48) and last[1].classes == ["cat", "dog", "sand"]
    assert last[0].scores.shape == (2, 32, 48)
    gp.disable_goca()
    assert np.array_equal(generate(pipe), reference)


@pytest.mark.slow
def test_disable_restores_identical_objects_and_custom_processors_run(tiny_sd):
    pipe = goca.from_pipe(tiny_sd, enable=False)
    unet = pipe.unet
    before = dict(unet.attn_processors)
    pipe.enable_goca()
    assert all(
        isinstance(p, (goca.GoCAAttnProcessor2_0, goca.GoCAWrappedProcessor)) for p in unet.attn_processors.values()
    )
    pipe.disable_goca()
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)

    class Scaled(torch.nn.Module):  # a custom processor holding weights, as IP-Adapter's do
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.tensor(1.5))
            self.calls = 0

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, gain_scale=1.0):
            self.calls += 1
            return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask) * self.gain * gain_scale

    custom = {k: (Scaled() if k.endswith("attn2.processor") else AttnProcessor2_0()) for k in before}
    unet.set_attn_processor(dict(custom))
    # The attention module passes on only the cross-attention kwargs its processor's __call__ names.
    own_kwarg = dict(cross_attention_kwargs={"gain_scale": 0.5})
    reference, reference_own_kwarg = generate(pipe), generate(pipe, **own_kwarg)
    assert not np.array_equal(reference, reference_own_kwarg)
    pipe.enable_goca()
    wrapped = unet.attn_processors
    assert isinstance(wrapped[next(k for k in custom if k.endswith("attn2.processor"))], goca.GoCAWrappedProcessor)
    assert np.array_equal(generate(pipe, goca_masks="last"), reference)
    assert np.array_equal(generate(pipe, goca_masks="last", **own_kwarg), reference_own_kwarg)
    assert all(p.calls > 0 for k, p in custom.items() if k.endswith("attn2.processor"))
    pipe.disable_goca()
    assert all(unet.attn_processors[k] is custom[k] for k in custom)


def test_attention_backend_set_while_enabled_stays_after_disable():
    pipe = make_tiny_flux()
    original = pipe.transformer.transformer_blocks[0].attn.processor
    gp = goca.from_pipe(pipe)
    pipe.transformer.set_attention_backend("native")
    assert gp.transformer.transformer_blocks[0].attn.processor._attention_backend.value == "native"
    gp.disable_goca()
    assert pipe.transformer.transformer_blocks[0].attn.processor is original
    assert original._attention_backend.value == "native"
    pipe.transformer.reset_attention_backend()  # the active backend is global state


def test_from_pipe_of_an_enabled_pipeline_shares_without_double_wrapping(tiny_sd):
    before = dict(tiny_sd.unet.attn_processors)
    first = goca.from_pipe(tiny_sd)
    second = goca.from_pipe(first)
    procs = second.unet.attn_processors
    assert all(
        not isinstance(getattr(p, "inner", None), (goca.GoCAAttnProcessor2_0, goca.GoCAWrappedProcessor))
        for p in procs.values()
    )
    img = Image.new("RGB", (24, 24), "green")
    assert first.segment(img, ["cat"]).labels.shape == (24, 24)  # re-attaches its own capture
    second.disable_goca()
    first.disable_goca()
    assert all(tiny_sd.unet.attn_processors[k] is before[k] for k in before)


@pytest.mark.parametrize(
    "make", [pytest.param(make_tiny_sd, marks=pytest.mark.slow), make_tiny_flux], ids=["sd", "flux"]
)
def test_from_pipe_casts_nothing_in_a_half_precision_pipeline(make):
    pipe = make().to(torch.bfloat16)
    reference = generate(pipe)
    gp = goca.from_pipe(pipe)
    assert all(
        p.dtype == torch.bfloat16
        for m in pipe.components.values()
        if isinstance(m, torch.nn.Module)
        for p in m.parameters()
    )
    assert all(gp.components[k] is v for k, v in pipe.components.items())
    assert dict(gp.config) == dict(pipe.config)
    assert np.array_equal(generate(gp, goca_masks=True), reference)
    gp.disable_goca()
    pipe.vae.float()  # components of different dtypes stay as they are
    goca.from_pipe(pipe, enable=False)
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder.dtype == torch.bfloat16


@pytest.mark.slow
def test_reattaches_after_attention_slicing(tiny_sd):
    """Processors set after `enable_goca` (attention slicing replaces every one) are wrapped anew on the next call,
    with the capture's own settings, not put back to those from before: the images are the sliced pipeline's, and
    `disable_goca` leaves the sliced processors."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    tiny_sd.enable_attention_slicing(1)
    reference = generate(tiny_sd)
    tiny_sd.disable_attention_slicing()
    pipe = goca.from_pipe(tiny_sd, enable=False).enable_goca(head_weighting="average", offload_above_mib=None)
    capture = pipe._goca.capture
    pipe.enable_attention_slicing(1)
    assert np.array_equal(generate(pipe, goca_masks="last"), reference)
    result = pipe.segment(Image.new("RGB", (24, 24), "green"), ["cat"])
    assert result.labels.shape == (24, 24)
    assert pipe._goca.capture is capture and capture.offload_above is None  # re-attached with its own settings
    pipe.disable_goca()
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {SlicedAttnProcessor}


def test_from_pipe_adds_no_watermark(tiny_sdxl, monkeypatch):
    """SDXL pipelines watermark by default where the package is installed; a pipeline built without must not gain one."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl as sdxl

    assert tiny_sdxl.watermark is None
    monkeypatch.setattr(sdxl, "is_invisible_watermark_available", lambda: True)
    assert goca.from_pipe(tiny_sdxl, enable=False).watermark is None
