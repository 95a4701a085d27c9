"""What the denoiser hooks of a `GoCAMixin` pipeline are asked to capture in one call (`CaptureRequest`), which text
columns and keys a capture of given prompts reads, and the masks a generation step delivers (`GoCAStepMasks`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .capture import StepCapture
from .methods import LayerWeightReuse
from .result import GoCASegmentation


@dataclass
class GoCAStepMasks:
    """The segmentation of the images being generated, at one denoising step (one result per image of the batch)."""

    step: int
    timestep: float
    results: list[GoCASegmentation]


@dataclass
class CaptureRequest:
    """What the denoiser hooks of a `GoCAMixin` pipeline capture (and, during generation, segment) in one pipeline
    call or one forward: built by `segment` / `capture_forward` (`keep_capture=True`), by the call with `goca_masks`
    (the masks of the steps `wants`), and by `SCFGMixin`'s call (`transform`: the capture and the denoiser output →
    the output the pipeline goes on with). Handed to the hooks with `AttachedCapture.serving`; the hooks fill
    `captured` / `delivered` and count `forward`. For mixins built on `GoCAMixin`, as S-CFG is."""

    wants: Callable[[int], bool]
    n_images: int  # images segmented per forward: the conditional rows of the batch (`DenoiserHooks.rows`)
    indices: list = field(default_factory=list)  # TokenIndex per segmented image (generation)
    method: str = "goca"
    background: str | None = None
    background_offset: float = 0.0
    options: dict = field(default_factory=dict)
    forwards_per_step: int = 1
    forward: int = 0  # denoiser calls so far in this request
    timestep: object = None
    callback: Callable | None = None
    keep_capture: bool = False  # keep the raw capture instead of segmenting (segment(), capture_forward())
    columns: list[int] | None = None  # text positions whose maps are kept (None: all)
    text_keys: int | None = None  # leading text keys the cross maps read (None: all; see `Capture.start`)
    pseudo_attention: str = "official-code"  # A_p of the joint layers' weights taken in the forward (`Capture.start`)
    extra_text: torch.Tensor | None = (
        None  # states of words outside the prompt, keyed on the side path (`Capture.start`)
    )
    # one text encoding per segmented image: the wanted steps are read from a side forward on these texts instead of
    # the call's own forward (a word outside a joint-attention prompt: `generation.mask_indices`), None: the call's
    side_encodings: list[tuple] | None = None
    output_resize: Callable | None = None  # scores at the generated size → the returned image's (Adapter.output_resize)
    # (capture, denoiser output) → replacement output (S-CFG): at the first forward of every step, the capture None
    # on the steps `wants` leaves out
    transform: Callable | None = None
    reuse: LayerWeightReuse | None = None  # layer weights kept over steps (generation; None: taken at every step)
    captured: list[StepCapture] = field(default_factory=list)
    delivered: list[GoCAStepMasks] = field(default_factory=list)


def kept_columns(adapter, indices) -> list[int] | None:
    """The text positions whose maps a capture keeps for `indices`. Cross-attention families keep every column their
    softmax reads (CLIP's 77, or PixArt's unmasked prompt tokens: None), since the per-pixel clamp and L1 sum run over
    all text tokens and auto head weights can make any column negative. Joint families (333 or 512 text tokens at
    every layer) keep the columns the methods read; their layers' text masses give the rest of the L1 sum."""
    if not adapter.joint:
        return None
    return sorted({p for index in indices for p in index.needed()})


def text_keys_read(adapter, indices) -> int | None:
    """The text keys the cross maps need to read for these prompts: all (None) unless the family masks the text's
    padding, then the longest prompt's tokens (the mask covers the rest)."""
    return max(index.length for index in indices) if adapter.text_padding_masked else None
