"""S-CFG with GoCA masks: semantic-aware classifier-free guidance (docs/official_code.md).

At every denoising step the denoiser's batch [uncond, cond] is captured; after its forward, region maps are computed
(GoCA's, or S-CFG's own segmenter) and the conditional prediction is replaced by ε_u + rate·(ε_c − ε_u), so the
pipeline's own guidance line ε_u + w·(ε_c' − ε_u) becomes ε_u + w·rate·(ε_c − ε_u). Everything else (schedulers,
negative prompts, `guidance_rescale`, callbacks) is the pipeline's own code.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .arguments import step_interval
from .capture_request import CaptureRequest
from .functional.aggregation import aggregate_layers
from .functional.maps import gaussian_blur, minmax, per_pixel_rescale, propagate, resize_maps
from .functional.scfg import guidance_norm, rate_map, scfg_cond
from .generation import prompt_indices
from .methods import LayerWeightReuse, capture_pseudo_attention, layer_weights, refinement_operator
from .mixin import GoCAMixin
from .models.base import adapter_for, call_default, check_one_call_per_step
from .result import palette

SEGMENTORS = ("goca", "original")


@dataclass
class SCFGStepMaps:
    """One step of S-CFG: regions [B, h, w] (ids of the text tokens that own each latent pixel), foreground [B, h, w],
    rates [B, h, w] (the smoothed per-pixel guidance rate); timestep; region_names[b][k]: the token of region k of
    image b; rate_bounds: the (low, high) the rates were clamped to."""

    step: int
    regions: torch.Tensor
    foreground: torch.Tensor
    rates: torch.Tensor
    timestep: float | None = None
    region_names: list[list[str]] = field(default_factory=list)
    rate_bounds: tuple[float, float] = (0.8, 3.0)


def region_names(adapter, index, segmentor: str, count: int) -> list[str]:
    """The token each of the `count` region ids stands for: GoCA's regions are the start (or end) token, then the
    content tokens; the original segmenter's are every token position, the padding included."""
    from .tokens import encode_with_offsets

    tokenizer = adapter.tokenizer()
    ids, _ = encode_with_offsets(tokenizer, index.prompt)
    tokens = [t.replace("</w>", "").lstrip("▁") for t in tokenizer.convert_ids_to_tokens(ids)]
    if segmentor == "goca":
        special = index.bos if index.bos is not None else index.eos
        positions = [special] + list(index.content)
    else:
        positions = list(range(count))
    return [tokens[p] if p < len(tokens) else "<pad>" for p in positions]


def goca_regions(step, adapter, cond_row: int, uncond_row: int, index, reuse=None):
    """GoCA regions: per-token GoCA maps of the conditional prompt (start token + content tokens), argmax; foreground
    where the unconditional start-token map is < 0.5 (PixArt's T5 has none: the conditional end token's map).
    reuse(key, compute): the layer weights' source (a `LayerWeightReuse` bound to the step; None: this capture).
    Returns regions [h, w], foreground [h, w] and the number of regions."""
    map_hw = adapter.map_grid(step.latent_hw)
    layers = adapter.cross_layers
    grids = [step.grids[n] for n in layers]

    def token_maps(row):
        def compute():
            return layer_weights(step, row, adapter, layers, renormalize_rows=False)

        weights = compute() if reuse is None else reuse((row,), compute)
        return aggregate_layers([step.cross[n]["auto"][row] for n in layers], grids, weights, map_hw)

    cond = token_maps(cond_row)
    special = index.bos if index.bos is not None else index.eos
    channels = [[special]] + [[t] for t in index.content]
    scores = minmax(gaussian_blur(per_pixel_rescale(cond, channels, index.content), map_hw))
    order = 2  # S²·M, the UNet's GoCA order, on every family (S-CFG's own two-step refinement)
    s = refinement_operator(step, cond_row, adapter.refinement_layers, map_hw, order)
    regions = minmax(propagate(s, scores, order)).argmax(0)
    reference = token_maps(uncond_row)[:, 0] if index.bos is not None else cond[:, special]
    foreground = minmax(gaussian_blur(reference[None], map_hw))[0] < 0.5
    return regions.view(map_hw), foreground.view(map_hw), len(channels)


def original_regions(step, adapter, cond_row: int, uncond_row: int, index, variant: str = "code"):
    """S-CFG's own segmenter: head-mean cross-attention of its layers, each refined by its own self-attention —
    (S + 3·S²)/4 · C as coded, or (S + S²)/2 · C ("paper", its text's mean of powers) — 3×3 Gaussian, each token
    map divided by its spatial mean, layers averaged; argmax over all tokens of the conditional half; foreground
    where the unconditional half's non-start tokens together beat its start token: their maps summed, then the sum
    and the start token's map each divided by its spatial mean (normalising each of the 76 maps before summing, as
    this did, made the sum ≈ 76 against ≈ 1, and every pixel foreground)."""
    if variant not in ("code", "paper"):
        raise ValueError(f"variant must be 'code' or 'paper', got {variant!r}")
    map_hw = adapter.map_grid(step.latent_hw)
    layers = adapter.scfg_layers

    def maps(row):
        tokens, start_and_rest = 0, 0
        for name in layers:
            c, grid = step.cross[name]["average"][row].float(), step.grids[name]
            s = refinement_operator(step, row, [adapter.self_of(name)], grid)  # the layer's own S, at its grid
            sc = s(c)
            r = (sc + 3 * s(sc)) / 4 if variant == "code" else (sc + s(sc)) / 2
            r = gaussian_blur(r.T, grid, kernel_size=3)  # [T, N]
            pair = torch.stack([r[0], r[1:].sum(0)])  # summed before the spatial normalisation, as the code does
            r, pair = (resize_maps(x / x.mean(-1, keepdim=True).clamp_min(1e-12), grid, map_hw) for x in (r, pair))
            tokens, start_and_rest = tokens + r, start_and_rest + pair
        return tokens / len(layers), start_and_rest / len(layers)  # [T, N_map], [2, N_map]

    cond, _ = maps(cond_row)
    _, uncond = maps(uncond_row)
    regions = cond.argmax(0)
    foreground = uncond[1] > uncond[0]
    return regions.view(map_hw), foreground.view(map_hw), cond.shape[0]


class SCFGMixin(GoCAMixin):
    """Adds S-CFG to a GoCA pipeline: the pipeline's call with `scfg=True` (default), `segmentor="goca"` or
    `"original"`, `scfg_variant` ("code" / "paper", for the original segmenter), `rate_bounds=(0.8, 3.0)` and
    `max_guidance=15.0`, `pseudo_attention` (the GoCA regions' layer weights, as `GoCAOptions.pseudo_attention`;
    None: its default), `layer_weights_every` (k > 1: the GoCA regions' layer weights taken at the first step and
    again once k steps have passed, reused in between; 1: every step), `regions_every` (k > 1: the regions and
    foreground segmented at steps 0, k, 2k, … only, the steps between guided by the last ones, at the cost of CFG;
    1: every step, as published). `guidance_scale` keeps its meaning; at `guidance_scale ≤ 1` it is plain sampling.
    `scfg_keep_maps=True` keeps every step's regions and rates in `pipe.scfg_maps` (see `save_scfg_maps`)."""

    def __call__(
        self,
        *args,
        scfg: bool = True,
        segmentor: str = "goca",
        scfg_variant: str = "code",
        rate_bounds: tuple[float, float] = (0.8, 3.0),
        max_guidance: float = 15.0,
        scfg_keep_maps: bool = False,
        pseudo_attention: str | None = None,
        layer_weights_every: int = 1,
        regions_every: int = 1,
        **kwargs,
    ):
        guidance = kwargs.get("guidance_scale", call_default(type(self), "guidance_scale", 7.5))
        if not scfg or guidance <= 1:
            return super().__call__(*args, **kwargs)
        if segmentor not in SEGMENTORS:
            raise ValueError(f"segmentor must be one of {SEGMENTORS}, got {segmentor!r}")
        if kwargs.get("goca_masks"):
            raise ValueError("S-CFG and goca_masks use the same capture: ask for one of them per call")
        if (
            hasattr(self, "pag_applied_layers")
            and kwargs.get("pag_scale", call_default(type(self), "pag_scale", 0)) > 0
        ):
            raise ValueError(
                "S-CFG sets the guidance of the [uncond, cond] batch; it does not combine with PAG's "
                "perturbed rows: pass pag_scale=0, or scfg=False"
            )
        lo, hi = rate_bounds
        if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in (lo, hi)) or not 0 < lo <= hi:
            raise ValueError(f"rate_bounds must be finite numbers with 0 < low <= high, got {rate_bounds}")
        if not (isinstance(max_guidance, numbers.Real) and 0 < max_guidance < math.inf):
            raise ValueError(
                f"max_guidance must be a finite number > 0 (the cap on guidance × rate), got {max_guidance!r}"
            )
        reuse = LayerWeightReuse(layer_weights_every)
        regions_every = step_interval("regions_every", regions_every)
        # Every check before GoCA is attached: a refused call leaves a disabled pipeline as it was.
        check_one_call_per_step(self, "S-CFG")
        adapter = self._goca.adapter if self._goca is not None else adapter_for(self)
        pseudo_attention = capture_pseudo_attention(
            adapter, ["goca"], {} if pseudo_attention is None else {"pseudo_attention": pseudo_attention}
        )
        indices = prompt_indices(
            adapter,
            adapter.call_prompt(args, kwargs),
            kwargs,
            "S-CFG",
            lambda i, text, max_length, part_texts: adapter.token_index(
                text, [], max_length=max_length, require_classes=False, part_texts=part_texts
            ),
        )
        n = len(indices)
        self.scfg_maps: list[SCFGStepMaps] = []
        # All token columns are kept: S-CFG's foreground reads the start token's share of every token's attention.
        request = CaptureRequest(
            wants=lambda i: i % regions_every == 0,
            n_images=2 * n,
            forwards_per_step=adapter.forwards_per_step(kwargs),
            pseudo_attention=pseudo_attention,
        )

        names: list[list[str]] = []  # the regions' tokens per image, read at the first kept step
        last_regions: dict = {}  # the last captured step's regions, foregrounds and token counts, for the steps between

        def transform(step, output):
            return self._scfg_step(
                step,
                output,
                indices,
                request,
                segmentor,
                scfg_variant,
                guidance,
                lo,
                hi,
                max_guidance,
                names if scfg_keep_maps else None,
                reuse if reuse.every > 1 else None,
                last_regions,
            )

        request.transform = transform
        state = self._goca_attached() if self._goca is not None else self.enable_goca()._goca
        with state.serving(request):
            return super(GoCAMixin, self).__call__(*args, **kwargs)

    def _scfg_step(
        self, step, output, indices, request, segmentor, variant, guidance, lo, hi, max_guidance, names, reuse, last
    ):
        """One step's S-CFG; `names` (None: the maps are not kept) holds the regions' tokens once known; `reuse`: the
        `LayerWeightReuse` of the call (None: layer weights at every step); `last`: the regions of the last captured
        step, which a step without a capture (`regions_every` > 1; `step` None) guides by."""
        adapter = self._goca.adapter
        out = output[0] if isinstance(output, tuple) else output.sample
        n = len(indices)
        step_number = (request.forward - 1) // request.forwards_per_step
        eps_u, eps_c = out[:n], out[n:]
        channels = self.vae.config.latent_channels  # PixArt predicts [ε, variance]: guide by the ε channels
        reuse = None if reuse is None else partial(reuse, step_number)
        if step is not None:
            last["regions"] = self._scfg_regions(step, adapter, indices, segmentor, variant, reuse, out.shape[-2:])
        regions, foreground, counts = last["regions"]
        norm = guidance_norm(eps_u[:, :channels], eps_c[:, :channels])
        rate = rate_map(
            norm, regions.to(norm.device), foreground.to(norm.device), max(counts), guidance, lo, hi, max_guidance
        )
        if names is not None:
            t = request.timestep
            t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t or 0)
            names[:] = names or [region_names(adapter, i, segmentor, k) for i, k in zip(indices, counts)]
            self.scfg_maps.append(
                SCFGStepMaps(
                    step_number,
                    regions.cpu(),
                    foreground.cpu(),
                    rate[:, 0].cpu(),
                    adapter.scheduler_timestep(t),
                    names,
                    (lo, hi),
                )
            )
        guided = torch.cat([eps_u, scfg_cond(eps_u, eps_c, rate)])
        if isinstance(output, tuple):
            return (guided,) + tuple(output[1:])
        output.sample = guided
        return output

    @staticmethod
    def _scfg_regions(step, adapter, indices, segmentor, variant, reuse, latent_hw):
        """Each image's regions [B, h, w] (token ids) and foreground [B, h, w] at the latent grid, and its token
        count, from a captured step."""
        n = len(indices)
        regions, foreground, counts = [], [], []
        for b, index in enumerate(indices):
            if segmentor == "goca":
                r, f, k = goca_regions(step, adapter, n + b, b, index, reuse)
            else:
                r, f, k = original_regions(step, adapter, n + b, b, index, variant)
            regions.append(r)
            foreground.append(f)
            counts.append(k)
        regions = F.interpolate(torch.stack(regions)[:, None].float(), size=latent_hw, mode="nearest")[:, 0].long()
        foreground = F.interpolate(torch.stack(foreground)[:, None].float(), size=latent_hw, mode="nearest")[:, 0] > 0.5
        return regions, foreground, counts


def _rate_colours(rate: np.ndarray, lo: float, hi: float) -> np.ndarray:
    r = ((rate - lo) / max(hi - lo, 1e-12)).clip(0, 1)
    return (np.stack([r, r**2, 1 - r], -1) * 255).astype(np.uint8)


def save_scfg_maps(
    maps: Sequence[SCFGStepMaps],
    path: str,
    image: int = 0,
    cell: int = 128,
    duration_ms: int = 150,
    max_legend: int = 8,
):
    """One image's S-CFG maps per step, titled with the step and timestep: the regions (a colour per token, with a
    legend of the tokens), the foreground (white) and the rate (a colour bar over `rate_bounds`). A GIF when `path`
    ends in .gif, else a PNG with one row per step."""
    if not maps:
        raise ValueError("no S-CFG maps to save: call the pipeline with scfg_keep_maps=True")
    shown = sorted({int(k) for m in maps for k in np.unique(m.regions[image].numpy())})
    legend_rows = min(len(shown), max_legend) + (1 if len(shown) > max_legend else 0)
    head, bar, row_h = 28, 26, 13
    width, height = 3 * cell, head + cell + max(bar, 4 + row_h * legend_rows)
    frames = []
    for m in maps:
        names = m.region_names[image] if m.region_names else []
        label = lambda k: names[k] if k < len(names) and names[k] else f"region {k}"  # noqa: E731
        regions = m.regions[image].numpy()
        colours = palette([str(i) for i in range(max(shown) + 1)])
        lo, hi = m.rate_bounds
        tiles = [
            Image.fromarray(colours[regions]),
            Image.fromarray((m.foreground[image].numpy() * 255).astype(np.uint8)).convert("RGB"),
            Image.fromarray(_rate_colours(m.rates[image].numpy(), lo, hi)),
        ]
        frame = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(frame)
        when = f"step {m.step}" + ("" if m.timestep is None else f" · t = {m.timestep:g}")
        draw.text((4, 1), when, fill="black")
        for j, (title, tile) in enumerate(zip(("regions", "foreground", "rate"), tiles)):
            draw.text((j * cell + 4, 14), title, fill="black")
            frame.paste(tile.resize((cell, cell), Image.NEAREST), (j * cell, head))
        y = head + cell + 4
        for n, k in enumerate(shown[:max_legend]):
            draw.rectangle([4, y + n * row_h + 2, 13, y + n * row_h + 11], fill=tuple(int(c) for c in colours[k]))
            draw.text((17, y + n * row_h), label(k)[:18], fill="black")
        if len(shown) > max_legend:
            draw.text((17, y + max_legend * row_h), f"+{len(shown) - max_legend} more", fill="black")
        ramp = _rate_colours(np.linspace(lo, hi, cell - 8)[None].repeat(8, 0), lo, hi)
        frame.paste(Image.fromarray(ramp), (2 * cell + 4, y))
        draw.text((2 * cell + 4, y + 10), f"{lo:g}", fill="black")
        draw.text((3 * cell - 4 - 6 * len(f"{hi:g}"), y + 10), f"{hi:g}", fill="black")
        frames.append(frame)
    if str(path).endswith(".gif"):
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    else:
        grid = Image.new("RGB", (width, height * len(frames)), "white")
        for i, f in enumerate(frames):
            grid.paste(f, (0, i * height))
        grid.save(path)
