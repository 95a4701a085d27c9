"""Masks during generation (`GoCAMixin.__call__` with `goca_masks`): the classes segmented in each generated image,
and the denoising steps segmented."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from .arguments import is_integer
from .models.base import call_default
from .prompt_classes import entities_from_prompt
from .tokens import has_class


def _classes_per_prompt(goca_classes, prompt) -> list[list[str]] | None:
    """`goca_classes` as one class list per prompt of the call (`prompt`: a string or a list): a list of names serves
    every prompt, a list of lists gives each prompt its own (as many as there are prompts)."""
    if goca_classes is None or prompt is None:
        return None
    n_prompts = 1 if isinstance(prompt, str) else len(prompt)
    if isinstance(goca_classes, str):
        raise ValueError(f"goca_classes must be a list of class names (or one list per prompt), got {goca_classes!r}")
    items = list(goca_classes)
    nested = [not isinstance(c, str) for c in items]
    if not any(nested):
        return [items] * n_prompts
    if not all(nested) or len(items) != n_prompts:
        raise ValueError(
            f"goca_classes must be a list of class names, or one list of names for each of the "
            f"{n_prompts} prompts, got {goca_classes!r}"
        )
    return [list(c) for c in items]


def mask_indices(pipe, adapter, prompt, call_kwargs: dict, goca_classes, goca_background: bool) -> list:
    """One TokenIndex per generated image (`pipe._goca_prompt_indices`) of the classes `goca_classes` names for its
    prompt (default: the prompt's entities), with the word "background" where `goca_background` asks for its map."""
    per_prompt = _classes_per_prompt(goca_classes, prompt)

    def index_for(i, text, max_length, part_texts):
        classes = list(per_prompt[i]) if per_prompt is not None else entities_from_prompt(text)
        extra = ["background"] if goca_background and not has_class(classes, "background") else []
        index = adapter.token_index(text, classes, extra, max_length, part_texts=part_texts)
        if extra and "background" not in index.extra_entities:
            # the channel is the word's map: without the word there is none, and the masks would silently lack it
            raise ValueError(
                f"goca_background=True reads the map of the word 'background' in the prompt, and "
                f"{text!r} has none: add it to the prompt (which changes the image), or segment the "
                f"generated image with pipe.segment(image, classes, background=True)"
            )
        return index

    return pipe._goca_prompt_indices(adapter, prompt, call_kwargs, "masks during generation", index_for)


def steps_wanted(pipe, adapter, call_kwargs: dict, goca_masks) -> Callable[[int], bool]:
    """Whether step i of the pipeline call is segmented (`step_filter`), the steps counted from the call's schedule
    (`timesteps` / `sigmas`) or its `num_inference_steps`."""
    schedule = call_kwargs.get("timesteps") if call_kwargs.get("timesteps") is not None else call_kwargs.get("sigmas")
    steps = (
        len(schedule)
        if schedule is not None
        else call_kwargs.get("num_inference_steps", call_default(type(pipe), "num_inference_steps", 50))
    )
    return step_filter(pipe, goca_masks, adapter.steps_run(call_kwargs, steps), steps)


def step_filter(pipe, goca_masks, steps_run: int, num_inference_steps: int) -> Callable[[int], bool]:
    """Whether step i is segmented; negative indices count from the end of the call's denoising loop. Steps are
    integers (Python or numpy, or an integer array / tensor), checked against the `steps_run` steps the call
    runs of its `num_inference_steps` (img2img's strength, SDXL's denoising_start / denoising_end run fewer)."""
    if goca_masks is True or (isinstance(goca_masks, str) and goca_masks == "all"):
        return lambda i: True
    if isinstance(goca_masks, str) and goca_masks == "last":
        goca_masks = [-1]
    if isinstance(goca_masks, (np.ndarray, torch.Tensor)):
        goca_masks = goca_masks.tolist() if goca_masks.ndim == 1 else goca_masks
    if isinstance(goca_masks, str) or not isinstance(goca_masks, Iterable):
        raise ValueError(
            f"goca_masks must be True, 'all', 'last' or a list of step indices (one step: [i]), got {goca_masks!r}"
        )
    goca_masks = list(goca_masks)
    n = steps_run
    bad = [i for i in goca_masks if not is_integer(i) or not -n <= i < n]
    if bad:
        cut = (
            ""
            if n == num_inference_steps
            else f" of num_inference_steps={num_inference_steps}, the rest cut "
            f"by strength / denoising_start / denoising_end"
        )
        raise ValueError(
            f"goca_masks: steps must be integers in -{n}…{n - 1} (this call runs {n} steps{cut}), got {bad}"
        )
    wanted = {int(i) for i in goca_masks}

    def steps() -> int:
        # Read as the loop runs. PixArt's pipelines keep no `_num_timesteps`; their loop runs the whole schedule.
        return getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps)

    return lambda i: i in wanted or i - steps() in wanted
