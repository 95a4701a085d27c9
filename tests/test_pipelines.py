"""Tiny SD / SDXL pipelines: exactness with GoCA on, restoration, segmentation of odd inputs, clear errors."""
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image

import diffusers_goca as goca
from conftest import make_tiny_sd, make_tiny_sdxl

PROMPTS = ["a red circle on grass", "a cat and a dog on sand"]


def generate(pipe, **kw):
    return pipe(PROMPTS, num_inference_steps=3, height=32, width=48, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_sdxl], ids=["sd", "sdxl"])
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


def test_disable_restores_identical_objects_and_custom_processors_run(tiny_sd):
    pipe = goca.from_pipe(tiny_sd, enable=False)
    unet = pipe.unet
    before = dict(unet.attn_processors)
    pipe.enable_goca()
    assert all(isinstance(p, (goca.GoCAAttnProcessor2_0, goca.GoCAWrappedProcessor)) for p in unet.attn_processors.values())
    pipe.disable_goca()
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)

    class Scaled(torch.nn.Module):  # a custom processor holding weights, as IP-Adapter's do
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.tensor(1.5))
            self.calls = 0

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            self.calls += 1
            return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask) * self.gain

    custom = {k: (Scaled() if k.endswith("attn2.processor") else AttnProcessor2_0()) for k in before}
    unet.set_attn_processor(dict(custom))
    reference = generate(pipe)
    pipe.enable_goca()
    wrapped = unet.attn_processors
    assert isinstance(wrapped[next(k for k in custom if k.endswith("attn2.processor"))], goca.GoCAWrappedProcessor)
    assert np.array_equal(generate(pipe, goca_masks="last"), reference)
    assert all(p.calls > 0 for k, p in custom.items() if k.endswith("attn2.processor"))
    pipe.disable_goca()
    assert all(unet.attn_processors[k] is custom[k] for k in custom)
    unet.set_attn_processor(dict(before))


def test_steps_without_masks_capture_nothing(tiny_sd):
    pipe = goca.from_pipe(tiny_sd)
    seen = []
    generate(pipe, goca_masks=[1], goca_callback=lambda p, step, t, masks: seen.append((step, t, len(masks.results))))
    assert [s for s, _, _ in seen] == [1] and [m.step for m in pipe.goca_masks] == [1]
    assert seen[0][2] == 2
    assert not pipe._goca.capture.active
    pipe.disable_goca()


@pytest.mark.parametrize("size,mode", [((37, 53), "RGB"), ((64, 33), "RGBA"), ((29, 41), "L")])
@pytest.mark.parametrize("method", goca.METHODS)
def test_segment_sizes_and_modes(tiny_sd, size, mode, method):
    pipe = goca.from_pipe(tiny_sd)
    rng = np.random.RandomState(0)
    arr = (rng.rand(size[1], size[0], len(mode)) * 255).astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
    r = pipe.segment(img, ["cat", "grass"], method=method)
    assert r.labels.shape == (size[1], size[0]) and r.labels.dtype == torch.long
    assert r.scores.shape == (3, size[1], size[0])
    assert r.classes == ["cat", "grass", "background"]
    assert int(r.labels.max()) < 3
    assert r.overlay().mode == "RGB" and r.heatmaps().size[0] > 0
    pipe.disable_goca()


def test_segment_is_seeded_and_method_changes_result(tiny_sdxl):
    pipe = goca.from_pipe(tiny_sdxl)
    img = Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype(np.uint8))
    a = pipe.segment(img, ["cat", "grass"], seed=3)
    b = pipe.segment(img, ["cat", "grass"], seed=3)
    v = pipe.segment(img, ["cat", "grass"], seed=3, method="vanilla")
    assert torch.equal(a.scores, b.scores)
    assert not torch.equal(a.scores, v.scores)
    pipe.disable_goca()


def test_bad_inputs_raise_and_leave_nothing_patched(tiny_sd):
    pipe = goca.goca_class(type(tiny_sd)).from_pipe(tiny_sd)
    before = dict(pipe.unet.attn_processors)
    img = Image.new("RGB", (20, 20))
    with pytest.raises(ValueError, match="empty"):
        pipe.segment(img, [])
    with pytest.raises(ValueError, match="cut off"):
        pipe.segment(img, [f"thing{i} object" for i in range(40)])
    with pytest.raises(ValueError, match="image must be"):
        pipe.segment({"not": "an image"}, ["cat"])
    with pytest.raises(ValueError, match="method"):
        pipe.segment(img, ["cat"], method="nope")
    assert all(pipe.unet.attn_processors[k] is before[k] for k in before)
    assert not pipe.goca_enabled

    class NotSupported:
        pass

    with pytest.raises(ValueError, match="does not support NotSupported"):
        goca.from_pipe(NotSupported())
