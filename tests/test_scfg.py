"""S-CFG: the rate formula against a literal implementation, and the pipelines end to end on tiny models."""

import numpy as np
import pytest
import torch

import diffusers_goca as goca
from diffusers_goca.functional.scfg import guidance_norm, rate_map, region_rates, scfg_cond
from diffusers_goca.testing import HostWaits, Running, make_tiny_flux, make_tiny_pixart, make_tiny_sd, make_tiny_sdxl


def literal_rates(norm, regions, foreground, k, w, lo, hi, cap):
    """S-CFG by the book, pixel loop by pixel loop."""
    b, h, wd = norm.shape
    out = torch.zeros(b, h, wd)
    for i in range(b):
        fg = foreground[i] if foreground[i].any() else torch.ones_like(foreground[i])
        f = norm[i][fg].mean()
        rate_k = []
        for r in range(k):
            inside = regions[i] == r
            rate_k.append(0.0 if not inside.any() else float(f / norm[i][inside].mean()))
        for y in range(h):
            for x in range(wd):
                out[i, y, x] = min(max(rate_k[regions[i, y, x]], lo), hi)
                out[i, y, x] = min(out[i, y, x], cap / w)
    g = torch.tensor([np.exp(-0.5 * (d / 0.5) ** 2) for d in (-1, 0, 1)], dtype=torch.float32)
    g = g / g.sum()
    kernel = g[:, None] * g[None, :]
    padded = torch.nn.functional.pad(out[:, None], (1, 1, 1, 1), mode="reflect")[:, 0]
    smooth = torch.zeros_like(out)
    for y in range(h):
        for x in range(wd):
            smooth[:, y, x] = (padded[:, y : y + 3, x : x + 3] * kernel).sum((-1, -2))
    return smooth


@pytest.mark.parametrize("w", [3.0, 7.5])  # 7.5: the cap 15 / w = 2 bites below the upper bound 3
def test_rate_map_matches_literal_with_empty_regions_and_clamps(w):
    torch.manual_seed(0)
    eps_u, eps_c = torch.randn(2, 4, 6, 7), torch.randn(2, 4, 6, 7)
    eps_c[0, :, :2] *= 8  # a region with large guidance norm: its rate clamps at the lower bound
    norm = guidance_norm(eps_u, eps_c)
    regions = torch.randint(0, 3, (2, 6, 7))
    regions[0, :2] = 3
    regions[1][regions[1] == 1] = 0  # region 1 empty in image 1; region 4 empty everywhere
    foreground = torch.rand(2, 6, 7) > 0.5
    foreground[1] = False  # empty foreground: the whole image is the reference
    got = rate_map(norm, regions, foreground, 5, w, 0.8, 3.0, 15.0)[:, 0]
    want = literal_rates(norm, regions, foreground, 5, w, 0.8, 3.0, 15.0)
    assert torch.allclose(got, want, atol=1e-5)
    rates = region_rates(norm, regions, foreground, 5)
    assert rates[1, 1] == 0 and (rates[:, 4] == 0).all()
    assert got.min() >= 0.8 - 1e-6 and got.max() <= min(3.0, 15.0 / w) + 1e-6
    assert torch.allclose(norm, (eps_c - eps_u).pow(2).sum(1).sqrt())


def test_scfg_cond_turns_the_pipeline_line_into_scfg():
    eps_u, eps_c, rate = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3), torch.rand(1, 1, 3, 3) + 0.8
    w = 5.0
    pipeline_line = eps_u + w * (scfg_cond(eps_u, eps_c, rate) - eps_u)
    assert torch.allclose(pipeline_line, eps_u + w * rate * (eps_c - eps_u), atol=1e-6)


def run(pipe, **kw):
    if "PixArt" in type(pipe).__name__:
        kw.setdefault("use_resolution_binning", False)
    kw.setdefault("num_inference_steps", 3)
    return pipe(
        ["a cat on grass", "a red dog"],
        height=32,
        width=48,
        output_type="np",
        negative_prompt=["blurry", "dark"],
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images


@pytest.mark.slow
@pytest.mark.parametrize("make", [make_tiny_sd, make_tiny_sdxl, make_tiny_pixart], ids=["sd", "sdxl", "pixart-sigma"])
def test_scfg_off_is_the_stock_pipeline_and_on_changes_the_image(make, tmp_path):
    stock = make()
    reference = run(stock, guidance_scale=5.0)
    pipe = goca.scfg_from_pipe(stock)
    assert np.array_equal(run(pipe, guidance_scale=5.0, scfg=False), reference)
    assert np.array_equal(run(pipe, guidance_scale=1.0), run(stock, guidance_scale=1.0))  # w ≤ 1: plain sampling
    for segmentor in ("goca", "original"):
        images = run(pipe, guidance_scale=5.0, segmentor=segmentor, scfg_keep_maps=True)
        assert images.shape == reference.shape and not np.array_equal(images, reference)
        assert len(pipe.scfg_maps) == 3 and pipe.scfg_maps[0].rates.shape == (2, 16, 24)
        first = pipe.scfg_maps[0]
        assert first.rate_bounds == (0.8, 3.0) and first.timestep == pipe.scheduler.timesteps[0]
        # every region id names a token (the legend of save_scfg_maps)
        assert all(int(first.regions[b].max()) < len(first.region_names[b]) for b in range(2))
    goca.save_scfg_maps(pipe.scfg_maps, tmp_path / "maps.gif")
    goca.save_scfg_maps(pipe.scfg_maps, tmp_path / "maps.png")
    assert (tmp_path / "maps.gif").stat().st_size > 0 and (tmp_path / "maps.png").stat().st_size > 0
    if hasattr(stock, "text_encoder_2"):  # regions are per token position: a prompt_2 of its own is no obstacle
        assert run(pipe, guidance_scale=5.0, prompt_2=["a bird", "a fish"]).shape == reference.shape


def test_scfg_refuses_a_pipeline_without_a_cfg_batch():
    """Flux.1 distils its guidance into the model (true CFG runs the unconditional call apart): nothing to rescale."""
    with pytest.raises(ValueError, match="S-CFG .* FluxPipeline"):
        goca.scfg_from_pipe(make_tiny_flux())


@pytest.mark.slow
def test_scfg_refuses_the_perturbed_rows_of_pag():
    from diffusers import StableDiffusionPAGPipeline

    stock = make_tiny_sd()
    pag = StableDiffusionPAGPipeline(**stock.components, pag_applied_layers=["mid"])
    pag.set_progress_bar_config(disable=True)
    pipe = goca.scfg_from_pipe(pag)
    with pytest.raises(ValueError, match="PAG"):
        run(pipe, guidance_scale=5.0)  # the PAG pipeline's default pag_scale is 3
    images = run(pipe, guidance_scale=5.0, pag_scale=0.0)
    assert not np.array_equal(images, run(pipe, guidance_scale=5.0, pag_scale=0.0, scfg=False))


@pytest.mark.slow
def test_scfg_with_guidance_rescale_other_scheduler_and_callback():
    from diffusers import DPMSolverMultistepScheduler

    pipe = goca.SCFGGoCAStableDiffusionPipeline.from_pipe(make_tiny_sd())
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    steps = []

    def on_step(p, i, t, kwargs):
        steps.append(i)
        return kwargs

    images = run(pipe, guidance_scale=6.0, guidance_rescale=0.7, callback_on_step_end=on_step, num_images_per_prompt=2)
    assert images.shape == (4, 32, 48, 3) and steps == [0, 1, 2] and np.isfinite(images).all()
    with pytest.raises(ValueError, match="segmentor"):
        run(pipe, guidance_scale=6.0, segmentor="nope")


@pytest.mark.slow
@pytest.mark.parametrize("segmentor", ["goca", "original"])
def test_scfg_steps_never_wait_for_the_device(segmentor, monkeypatch):
    pipe = goca.scfg_from_pipe(make_tiny_sd())
    guiding = Running(monkeypatch, pipe, "_scfg_step")
    with HostWaits(lambda: pipe._goca.capture.active or bool(guiding)) as waits:
        run(pipe, guidance_scale=5.0, segmentor=segmentor)
    assert waits.ops == [], f"the capture or the S-CFG step read device values on the host: {waits.ops}"


@pytest.mark.slow
def test_layer_weights_every_k_steps_are_taken_then_reused(monkeypatch):
    """layer_weights_every=k takes each image's layer weights at steps 0, k, 2k… and reuses them in between: the first
    step is the per-step method's exactly; 1 is the per-step method."""
    from diffusers_goca import scfg

    pipe = goca.scfg_from_pipe(make_tiny_sd())
    exact = run(pipe, guidance_scale=5.0, scfg_keep_maps=True, num_inference_steps=5)
    first_rates = pipe.scfg_maps[0].rates
    taken = Running(monkeypatch, scfg, "layer_weights")
    for every, steps_taken in ((1, 5), (2, 3), (10, 1)):
        before = taken.calls
        images = run(pipe, guidance_scale=5.0, scfg_keep_maps=True, num_inference_steps=5, layer_weights_every=every)
        assert taken.calls - before == 2 * 2 * steps_taken  # 2 images, each its conditional and unconditional row
        assert torch.equal(pipe.scfg_maps[0].rates, first_rates)
        assert np.array_equal(images, exact) == (every == 1)


@pytest.mark.slow
def test_regions_every_k_steps_are_segmented_then_reused(monkeypatch):
    """regions_every=k segments at steps 0, k, 2k… only (no capture between) and guides the steps between by the last
    regions, each with its own rates and timestep; 1 is the per-step method."""
    pipe = goca.scfg_from_pipe(make_tiny_sd())
    exact = run(pipe, guidance_scale=5.0, scfg_keep_maps=True, num_inference_steps=5)
    exact_maps = list(pipe.scfg_maps)
    segmenting = Running(monkeypatch, pipe, "_scfg_regions")
    starts = Running(monkeypatch, pipe._goca.capture, "start")
    for every, segmented in ((1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (10, [0])):
        before = segmenting.calls, starts.calls
        images = run(pipe, guidance_scale=5.0, scfg_keep_maps=True, num_inference_steps=5, regions_every=every)
        assert (segmenting.calls - before[0], starts.calls - before[1]) == (len(segmented), len(segmented))
        maps = pipe.scfg_maps
        assert [m.step for m in maps] == [0, 1, 2, 3, 4]
        assert [m.timestep for m in maps] == [m.timestep for m in exact_maps]
        assert torch.equal(maps[0].rates, exact_maps[0].rates)
        for m in maps:
            source = max(s for s in segmented if s <= m.step)
            assert torch.equal(m.regions, maps[source].regions) and torch.equal(m.foreground, maps[source].foreground)
        assert np.array_equal(images, exact) == (every == 1)


@pytest.mark.slow
def test_original_foreground_is_not_every_pixel_on_the_toy():
    """The original segmenter's foreground compares the start token's map with the sum of the others, each of the two
    divided by its mean; dividing each of the 76 maps first made the sum ≈ 76 against ≈ 1: every pixel, every step."""
    from diffusers_goca.toyworld import load_toy_pipeline

    pipe = goca.scfg_from_pipe(load_toy_pipeline())
    pipe(
        ["a red circle and a white square on grass", "sky with a yellow triangle"],
        num_inference_steps=6,
        guidance_scale=5.0,
        segmentor="original",
        scfg_keep_maps=True,
        generator=torch.Generator().manual_seed(1),
    )
    shares = [float(m.foreground.float().mean()) for m in pipe.scfg_maps]
    assert len(shares) == 6 and all(0.1 < s < 0.9 for s in shares), shares
