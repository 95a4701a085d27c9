"""The segmentations of one captured denoiser step: what `segment`, masks during generation and the benchmarks share
once the capture is done (each captured row's scores by its method, then labels at the output size)."""

from __future__ import annotations

import logging
from typing import Callable

from .capture import StepCapture
from .functional.maps import scores_to_labels, weighted_labels
from .methods import method_scores, reads_head_weighted_maps
from .result import GoCASegmentation

logger = logging.getLogger(__name__)


def step_segmentations(
    adapter,
    step: StepCapture,
    indices,
    method: str,
    background: str | None,
    background_offset: float,
    options: dict,
    out_hw=None,
    output_resize=None,
    presence: dict[str, float] | None = None,
    reuse: Callable | None = None,
) -> list[GoCASegmentation]:
    """One segmentation per captured row; labels at `out_hw` (default: the generated image's size), then through
    `output_resize` (what the pipeline does to its image after generating it, if anything). `presence`: the
    presence test's weight of each named class (`presence.presence_weights`; 0: absent); the labels are the argmax of
    the scores so weighted, where absent classes take no pixel (unless every class is absent and there is no
    background channel: then the plain argmax). reuse: the layer weights'
    source during generation (`methods.goca_scores`)."""
    map_hw = adapter.map_grid(step.latent_hw)
    out_hw = out_hw or adapter.image_hw(step.latent_hw)
    results = []
    for row, index in enumerate(indices):
        bg = background if background in index.extra_entities else None
        scores, bg_scores = method_scores(step, row, index, adapter, method, bg, reuse, **options)
        labels, up = scores_to_labels(scores, map_hw, out_hw, bg_scores, background_offset)
        if output_resize is not None:
            up = output_resize(up)
            labels = up.argmax(0)
        classes = list(index.classes) + (["background"] if bg else [])
        if presence is not None:
            labels = weighted_labels(up, [presence.get(c, 1.0) for c in classes])
        results.append(GoCASegmentation(labels.cpu(), up.cpu(), classes, presence=dict(presence or {})))
    # Read after the labels came to the host, so the checks and counts cost no wait of their own.
    step.check_text_keys()
    degenerate = step.degenerate_pixels if reads_head_weighted_maps(method, options) else 0
    if degenerate:
        logger.warning(
            "GoCA: %d pixel(s), summed over the layers and images of this forward, had an attention "
            "output of norm ≈ 0; their head weights fell back to the head mean (docs/official_code.md)",
            degenerate,
        )
    return results
