"""Aggregations over one capture: GoCA and the baselines of docs/official_code.md, all reading the same `StepCapture`.

Each method returns class scores at the map grid, [K, h·w] in [0, 1], plus the background entity's score when one is
asked for. The formulas are those of `functional`; this module only picks the layers and the options.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .arguments import step_interval
from .capture import StepCapture, brought_back
from .functional.aggregation import PSEUDO_ATTENTIONS, aggregate_layers, normalize_layer_weights
from .functional.maps import (
    entropy_reduced,
    gaussian_blur,
    minmax,
    per_pixel_rescale,
    propagate,
    resize_maps,
    token_class_maps,
)
from .functional.self_attention import apply_self_attention, frobenius_with_reference, head_mean_self_attention
from .tokens import TokenIndex

METHODS = ("goca", "vanilla", "manual", "diffsegmenter", "iseg", "seg4diff")


@dataclass(frozen=True)
class GoCAOptions:
    """The switches of GoCA; the defaults are the official method (what the released code computes, whose A_p beats
    the paper's on three of the four toys: docs/toy_families.md), the others its ablations and baselines.

    head_weighting: "auto" | "average" | "dot-product" (chosen when the capture is made: None reads the capture's,
    `enable_goca(head_weighting=...)`; "average" is read from any capture);
    layer_weighting: "auto" (pseudo self-attention) | "uniform"; renormalize_rows: renormalise resized self-attention
    rows in the layer weights (the official code does not); pseudo_attention: the reference's A_p, "paper"
    (softmax(F Fᵀ/√C)) or "official-code" (softmax(f₀ f₀ᵀ) from channel 0 of F, what the released code computes);
    rescale: per-pixel rescaling over content tokens (False = "renorm+": the clamped, per-pixel L1-normalised maps,
    blur and min-max); refine_order: k of S^k·M (None = the model's default);
    layers: "all", "subset" (the official vanilla's layers, maps and refinement: PixArt cross blocks 10–17, Flux
    blocks 8, 28 and 47 of its running numbering; every layer elsewhere), "manual" (SD 1.5's hand-picked set) or a
    tuple of cross layer names;
    layer_weight_stride: s > 1 sums the layer weights' Frobenius
    products over the reference rows at every s-th row and column only (about 1/s² of their work, the largest part of
    the reductions; not the official method, which reads every row: docs/performance.md gives its effect).
    """

    head_weighting: str | None = None
    layer_weighting: str = "auto"
    renormalize_rows: bool = False
    pseudo_attention: str = "official-code"
    rescale: bool = True
    refine_order: int | None = None
    layers: str | tuple[str, ...] = "all"
    blur_kernel: int = 5
    layer_weight_stride: int = 1


VANILLA = GoCAOptions(head_weighting="average", layer_weighting="uniform", rescale=False, layers="subset")
PRESETS = {"goca": GoCAOptions(), "vanilla": VANILLA, "manual": replace(VANILLA, layers="manual")}


def options_for(method: str, **overrides) -> GoCAOptions:
    if method not in PRESETS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return replace(PRESETS[method], **overrides)


def capture_pseudo_attention(adapter, methods, options: dict) -> str:
    """The A_p formula a capture takes its joint layers' weights with (they are taken in the forward), after checking
    `options` for each of `methods`: a ValueError (TypeError for an unknown field) before any forward."""
    chosen = GoCAOptions.pseudo_attention
    for method in methods:
        if method not in PRESETS:
            continue
        checked = options_for(method, **options)
        order = checked.refine_order
        if order is not None and (isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 0):
            # a negative one was taken as 0 without a word, a fraction failed deep inside the refinement
            raise ValueError(f"refine_order must be None (the model's default) or an integer ≥ 0, got {order!r}")
        if checked.pseudo_attention not in PSEUDO_ATTENTIONS:
            raise ValueError(f"pseudo_attention must be one of {PSEUDO_ATTENTIONS}, got {checked.pseudo_attention!r}")
        adapter.layer_set(checked.layers)
        chosen = checked.pseudo_attention
    return chosen


def reads_head_weighted_maps(method: str, options: dict) -> bool:
    """Whether `method` with `options` reads the capture's head-weighted maps ("auto" or "dot-product", docs/official_code.md)
    rather than the head mean."""
    return method in PRESETS and options_for(method, **options).head_weighting != "average"


def _entities(index: TokenIndex, background: str | None) -> list[list[int]]:
    return index.class_tokens + ([index.positions(background)] if background else [])


# From this many products on, S is formed once (one pass over each layer's scores, [N_map, N_map] fp32) instead of
# running every layer's fused attention at every product (`order` passes).
EXPLICIT_S_FROM_ORDER = 3


def refinement_operator(step: StepCapture, row: int, layers: list[str], map_hw: tuple[int, int], order: int = 1):
    """x ↦ S·x with S the mean over `layers` of head-mean self-attention resized to the map grid ([N_map, K] → same).

    For few products (SD's k = 2) through the fused attention kernel with x as the values, S never formed; for
    `order` ≥ EXPLICIT_S_FROM_ORDER (PixArt's k = 5) S is formed once, at the map grid."""
    selfs = [step.selfs[n] for n in layers]
    if order >= EXPLICIT_S_FROM_ORDER:
        s = sum(head_mean_self_attention(src_hw=q.grid, dst_hw=map_hw, **q.image(row)) for q in selfs) / len(selfs)
        return s

    def apply(x: torch.Tensor) -> torch.Tensor:
        return sum(apply_self_attention(src_hw=s.grid, dst_hw=map_hw, x=x, **s.image(row)) for s in selfs) / len(selfs)

    return apply


def layer_weights(
    step: StepCapture,
    row: int,
    adapter,
    layers: list[str],
    renormalize_rows: bool,
    row_stride: int = 1,
    pseudo_attention: str | None = None,
) -> torch.Tensor:
    """Normalised w_l for `layers` from the pseudo self-attention of the reference feature; with `row_stride` > 1
    over the reference rows at every row_stride-th row and column (`frobenius_with_reference`). pseudo_attention:
    A_p's formula (`pseudo_self_attention`; None: the capture's)."""
    if step.reference is None:
        raise RuntimeError(f"the reference layer {adapter.reference_layer} was not captured")
    if not isinstance(row_stride, int) or row_stride < 1:
        raise ValueError(f"layer_weight_stride must be an integer ≥ 1, got {row_stride!r}")
    pseudo_attention = pseudo_attention or step.pseudo_attention
    reference = step.reference_of(
        row, pseudo_attention
    )  # A_p and its per-grid weights, made only if a layer needs them
    terms = {} if renormalize_rows else step.layer_weight_terms  # taken at the end of the forward (joint layers)
    taken = {n: terms[n][row] for n in layers if n in terms}
    if taken and pseudo_attention != step.pseudo_attention:
        raise ValueError(
            f"pseudo_attention={pseudo_attention!r}: the joint layers' weights were taken in the forward "
            f"with {step.pseudo_attention!r}; pass it to the call that captures (segment's or the "
            f"generation's goca_options)"
        )
    if taken and row_stride > 1:
        raise ValueError(
            "layer_weight_stride > 1 applies to cross-attention models (UNet, PixArt): a joint attention "
            "layer (SD3, Flux) reads every row in the forward, for its text shares"
        )
    todo = [n for n in layers if n not in taken]
    selfs = [step.selfs[adapter.self_of(n)] for n in todo]
    for name, s, inputs in zip(todo, selfs, brought_back(selfs, row)):
        taken[name] = frobenius_with_reference(
            src_hw=s.grid,
            reference_attention=reference.attention,
            ref_hw=reference.grid,
            renormalize_rows=renormalize_rows,
            prepared=reference.on(s.grid, row_stride),
            **inputs,
        )
    return normalize_layer_weights(torch.stack([taken[n] for n in layers]))


class LayerWeightReuse:
    """Layer weights taken at one denoising step and reused for the next `every` − 1 steps (the weights are one scalar
    per layer and change slowly over the steps). `reuse(step, key, compute)` returns the weights taken for `key` (the
    image row and the options) at most `every` − 1 steps before `step`, else `compute()`'s, kept for the next ones."""

    def __init__(self, every: int, name: str = "layer_weights_every"):
        self.every = step_interval(name, every)
        self._taken: dict = {}  # key → (step, weights)

    def __call__(self, step: int, key, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        taken = self._taken.get(key)
        if taken is None or step - taken[0] >= self.every:
            taken = self._taken[key] = (step, compute())
        return taken[1]


def goca_scores(
    step: StepCapture,
    row: int,
    index: TokenIndex,
    adapter,
    options: GoCAOptions,
    background: str | None = None,
    reuse: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GoCA (and, through `options`, vanilla and manual): class scores [K, N_map] and the background entity's [N_map].
    reuse(key, compute): where the layer weights come from during generation (a `LayerWeightReuse` bound to the
    step); None: computed from this capture."""
    map_hw = adapter.map_grid(step.latent_hw)
    layers, refinement = adapter.layer_set(options.layers)
    head_weighting = options.head_weighting or step.head_weighting
    if head_weighting not in ("average", step.head_weighting):
        raise ValueError(
            f"head_weighting={head_weighting!r} needs a capture made with it: "
            f"pipe.enable_goca(head_weighting={head_weighting!r}) (this one: {step.head_weighting!r})"
        )
    maps = [step.cross[n]["average" if head_weighting == "average" else "auto"][row] for n in layers]
    grids = [step.grids[n] for n in layers]
    if options.layer_weighting == "auto":

        def compute() -> torch.Tensor:
            return layer_weights(
                step,
                row,
                adapter,
                layers,
                options.renormalize_rows,
                options.layer_weight_stride,
                options.pseudo_attention,
            )

        weights = compute() if reuse is None else reuse((row, options), compute)
    elif options.layer_weighting == "uniform":
        weights = torch.full((len(layers),), 1.0 / len(layers))
    else:
        raise ValueError(f"layer_weighting must be 'auto' or 'uniform', got {options.layer_weighting!r}")
    entities = _entities(index, background)
    # Clamped and L1-normalised per pixel over all text tokens in every mode, as the official code does: a no-op
    # only where each pixel's maps are ≥ 0 and sum to 1 (not under a joint softmax, nor with negative head weights).
    masses = text_masses(step, layers, head_weighting, row)
    token_maps = aggregate_layers(maps, grids, weights, map_hw, masses)
    if options.rescale:
        scores = per_pixel_rescale(token_maps, entities, index.content)
    else:
        scores = token_class_maps(token_maps, entities)
    scores = minmax(gaussian_blur(scores, map_hw, options.blur_kernel))
    order = adapter.refine_order if options.refine_order is None else options.refine_order
    if order > 0:
        s = refinement_operator(step, row, refinement, map_hw, order)
        scores = minmax(propagate(s, scores, order))
    return _split_background(scores, background)


def text_masses(step: StepCapture, layers: list[str], head_weighting: str, row: int) -> list[torch.Tensor] | None:
    """Per layer, each pixel's map summed over all text tokens ([N_l]), where the capture keeps them (joint layers,
    whose maps keep only the columns read); None where the maps keep every column the softmax reads."""
    key = "average mass" if head_weighting == "average" else "auto mass"
    if not all(key in step.cross[n] for n in layers):
        return None
    return [step.cross[n][key][row] for n in layers]


# DiffSegmenter's weights per grid size at SD 1.5's 512 px, i.e. per downsampling from the finest grid.
_DIFFSEG_WEIGHTS = {1: 0.1, 2: 0.1, 4: 0.5, 8: 0.3}


def diffsegmenter_scores(
    step: StepCapture, row: int, index: TokenIndex, adapter, background: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DiffSegmenter: per-resolution head/layer means, min-max, fixed resolution weights, one product with the mean
    finest-grid self-attention."""
    map_hw = adapter.map_grid(step.latent_hw)
    entities = _entities(index, background)
    by_level: dict[int, list[torch.Tensor]] = {}
    for name in adapter.cross_layers:
        rel = adapter.layers[name].factor // adapter.map_factor
        by_level.setdefault(rel, []).append(
            resize_maps(step.cross[name]["average"][row].float().T, step.grids[name], map_hw).T
        )
    scores = sum(
        _DIFFSEG_WEIGHTS.get(rel, 0.0) * minmax(token_class_maps(torch.stack(ms).mean(0), entities))
        for rel, ms in by_level.items()
    )
    finest_selfs = [n for n in adapter.self_layers if adapter.layers[n].factor == adapter.map_factor]
    s = refinement_operator(step, row, finest_selfs, map_hw)
    return _split_background(minmax(propagate(s, scores, 1)), background)


def seg4diff_scores(
    step: StepCapture, row: int, index: TokenIndex, adapter, background: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Seg4Diff (SD3): one block's image→text attention (joint softmax), head mean, mean over each class's tokens."""
    maps = step.cross[adapter.seg4diff_layer]["average"][row].float()
    grid, map_hw = step.grids[adapter.seg4diff_layer], adapter.map_grid(step.latent_hw)
    scores = resize_maps(token_class_maps(maps, _entities(index, background)), grid, map_hw)
    return _split_background(scores, background)


def available_methods(adapter) -> list[str]:
    """The methods this model family can run: `manual` needs a hand-picked layer set, `seg4diff` its block, `iseg`
    cross-attention at coarser levels than the map grid (UNets)."""
    coarser = {adapter.layers[n].factor // adapter.map_factor for n in adapter.cross_layers}
    return [
        m
        for m in METHODS
        if (m != "manual" or adapter.manual_layers)
        and (m != "seg4diff" or getattr(adapter, "seg4diff_layer", None))
        and (m != "iseg" or coarser & set(ISEG_LEVEL_WEIGHTS))
    ]


def check_method(adapter, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method not in available_methods(adapter):
        raise ValueError(
            f"method {method!r} is not defined for {adapter.family} models; "
            f"available: {', '.join(available_methods(adapter))}"
        )


def _split_background(scores: torch.Tensor, background: str | None):
    if background:
        return scores[:-1], scores[-1]
    return scores, None


# iSeg (docs/official_code.md): cross maps of two levels, relative to the finest map grid, and their weights; the class-token
# embedding scale of its own forward; the entropy reduction of the finest self-attention and its iterations (VOC).
ISEG_LEVEL_WEIGHTS = {4: 0.7, 2: 0.3}
ISEG_EMBEDDING_SCALE = 1.6
ISEG_ENTROPY_LAMBDA = 0.015
ISEG_ITERATIONS = 8


def iseg_scores(
    step: StepCapture,
    row: int,
    index: TokenIndex,
    adapter,
    background: str | None = None,
    iterations: int = ISEG_ITERATIONS,
    lam: float = ISEG_ENTROPY_LAMBDA,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """iSeg on a capture made with the class tokens' embeddings scaled (`segment` runs that forward): level-weighted
    head/layer-mean cross maps, then M ← Â·M `iterations` times with Â the entropy-reduced mean self-attention of
    the last finest-grid self layer, each time shifted to min 0 and normalised to sum 1. Scores are divided by their
    global max (the argmax over classes is iSeg's)."""
    map_hw = adapter.map_grid(step.latent_hw)
    entities = _entities(index, background)
    levels: dict[int, list[torch.Tensor]] = {}
    for name in adapter.cross_layers:
        rel = adapter.layers[name].factor // adapter.map_factor
        if rel in ISEG_LEVEL_WEIGHTS:
            levels.setdefault(rel, []).append(
                resize_maps(step.cross[name]["average"][row].float().T, step.grids[name], map_hw)
            )
    if not levels:
        raise ValueError(f"iseg needs cross-attention at {sorted(ISEG_LEVEL_WEIGHTS)}× the finest map grid")
    token_maps = sum(ISEG_LEVEL_WEIGHTS[rel] * torch.stack(ms).mean(0) for rel, ms in levels.items()).T  # [N, T']
    x = token_class_maps(token_maps, entities)  # [K, N]
    last = [n for n in adapter.self_layers if adapter.layers[n].factor == adapter.map_factor][-1]
    q = step.selfs[last]
    a = entropy_reduced(head_mean_self_attention(src_hw=q.grid, dst_hw=map_hw, **q.image(row)), lam)
    for _ in range(iterations):
        x = (a @ x.T).T
        x = x - x.amin(-1, keepdim=True)
        x = x / x.sum(-1, keepdim=True).clamp_min(1e-12)
    return _split_background(minmax(x), background)


def method_scores(
    step, row, index, adapter, method: str, background: str | None = None, reuse: Callable | None = None, **options
):
    """Dispatch on the method name; `options` override GoCAOptions fields for goca / vanilla / manual.

    index: the prompt's TokenIndex (token positions); it is mapped onto the columns the capture kept. reuse: the
    layer weights' source during generation (`goca_scores`)."""
    check_method(adapter, method)
    index = step.index(index)
    if method in ("diffsegmenter", "seg4diff", "iseg"):
        if options:
            raise ValueError(f"{method} takes no GoCA options, got {sorted(options)}")
        fn = {"diffsegmenter": diffsegmenter_scores, "seg4diff": seg4diff_scores, "iseg": iseg_scores}[method]
        return fn(step, row, index, adapter, background)
    return goca_scores(step, row, index, adapter, options_for(method, **options), background, reuse)
