"""Masks during generation (`GoCAMixin.__call__` with `goca_masks`): the classes segmented in each generated image,
the denoising steps segmented, and the capture request that carries them to the denoiser hooks."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from .arguments import finite_number, is_integer
from .capture_request import CaptureRequest, kept_columns, text_keys_read
from .methods import LayerWeightReuse, capture_pseudo_attention, check_method
from .models.base import call_default, check_one_call_per_step
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


def prompt_indices(adapter, prompt, call_kwargs: dict, what: str, index_for) -> list:
    """One TokenIndex per generated image (prompts × num_images_per_prompt), read from the text the pipeline
    encodes; `prompt`: the call's `adapter.call_prompt`. index_for(i, text, max_length, part_texts) builds the
    i-th prompt's."""
    if prompt is None:
        raise ValueError(f"{what} needs the prompt text (prompt_embeds alone cannot be segmented)")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    per_prompt = call_kwargs.get("num_images_per_prompt", 1) or 1
    max_length = call_kwargs.get("max_sequence_length", adapter.text_max_length)
    return [
        index_for(i, adapter.prompt_text(p, call_kwargs), max_length, adapter.part_texts(call_kwargs, i, len(prompts)))
        for i, p in enumerate(prompts)
        for _ in range(per_prompt)
    ]


def mask_indices(adapter, prompt, call_kwargs: dict, goca_classes, goca_background: bool) -> tuple[list, list | None]:
    """(one TokenIndex per generated image (`prompt_indices`) of the classes `goca_classes` names for its prompt
    (default: the prompt's entities), with the word "background" where `goca_background` asks for its map; the side
    prompts). Where a prompt lacks the word, a cross-attention family appends the word's keys on the side path
    (`with_background_keys`); a joint-attention family cannot (its text keys come from the text stream of the block
    before), so its masks are read from a side forward of the same inputs on each prompt with the word added, "a cat
    on grass, background", encoded for every text encoder as `segment(..., background=True)` encodes its prompt: the
    side prompts are those texts and the indices theirs (None: the call's own forward is read)."""
    per_prompt = _classes_per_prompt(goca_classes, prompt)
    named = []  # (text, classes, extra entities) per generated image

    def index_for(i, text, max_length, part_texts):
        classes = list(per_prompt[i]) if per_prompt is not None else entities_from_prompt(text)
        extra = ["background"] if goca_background and not has_class(classes, "background") else []
        named.append((text, classes, extra))
        return adapter.token_index(text, classes, extra, max_length, part_texts=part_texts)

    indices = prompt_indices(adapter, prompt, call_kwargs, "masks during generation", index_for)
    lacking = [bool(extra) and "background" not in index.extra_entities for index, (_, _, extra) in zip(indices, named)]
    if not adapter.joint or not any(lacking):
        return indices, None
    side = [f"{text}, background" if lack else text for (text, _, _), lack in zip(named, lacking)]
    indices = [
        adapter.token_index(adapter.segment_text(text), classes, extra)
        for text, (_, classes, extra) in zip(side, named)
    ]
    return indices, side


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


def masks_request(
    pipe,
    args,
    kwargs: dict,
    goca_masks,
    goca_classes,
    goca_method: str,
    goca_callback,
    goca_background: bool,
    goca_background_offset,
    goca_options: dict | None,
    goca_layer_weights_every,
) -> CaptureRequest:
    """The capture request of a generation with masks (`GoCAMixin.__call__`'s arguments), every argument checked
    before anything is attached or run."""
    if goca_method == "iseg":  # its maps come from a forward with scaled class-token embeddings
        raise ValueError(
            "goca_method='iseg' needs a denoiser forward of its own, which would change the images: "
            "segment the generated image with pipe.segment(image, classes, method='iseg')"
        )
    # Every check before GoCA is attached: a refused call leaves a disabled pipeline as it was.
    check_one_call_per_step(pipe, "goca_masks")
    adapter = pipe.goca_adapter
    check_method(adapter, goca_method)
    pseudo_attention = capture_pseudo_attention(adapter, [goca_method], dict(goca_options or {}))
    goca_background_offset = finite_number("goca_background_offset", goca_background_offset)
    reuse = LayerWeightReuse(goca_layer_weights_every, "goca_layer_weights_every")

    prompt = adapter.call_prompt(args, kwargs)
    adapter.check_mask_prompt(kwargs, prompt)
    indices, side_prompts = mask_indices(adapter, prompt, kwargs, goca_classes, goca_background)
    side_encodings = None
    if side_prompts is not None:
        with adapter.encodings_kept():  # each distinct prompt encoded once
            side_encodings = [adapter.segment_encoding(p, pipe._execution_device) for p in side_prompts]
    text_keys = text_keys_read(adapter, indices)
    extra_text = with_background_keys(adapter, indices, text_keys) if goca_background else None
    wants = steps_wanted(pipe, adapter, kwargs, goca_masks)
    request = CaptureRequest(
        wants=wants,
        n_images=len(indices),
        indices=indices,
        method=goca_method,
        background="background" if goca_background else None,
        background_offset=goca_background_offset,
        options=dict(goca_options or {}),
        callback=goca_callback,
        forwards_per_step=adapter.forwards_per_step(kwargs),
        columns=kept_columns(adapter, indices),
        text_keys=text_keys,
        extra_text=extra_text,
        side_encodings=side_encodings,
        pseudo_attention=pseudo_attention,
        output_resize=adapter.output_resize(kwargs),
        reuse=reuse if reuse.every > 1 else None,
    )
    return request


def with_background_keys(adapter, indices: list, text_keys: int | None) -> torch.Tensor | None:
    """For the prompts without the word "background" whose masks ask for its channel (cross-attention families):
    the word's text states, whose keys every cross layer appends after the text keys it reads, on the side path
    only (`Capture.start`'s extra_text), and the word's positions there added to those prompts' indices (as an
    entity and as content, as the word would be in the prompt). None where no prompt needs them."""
    missing = [i for i in indices if "background" not in i.extra_entities and not has_class(i.classes, "background")]
    if not missing:
        return None
    states = adapter.word_states("background")
    first = text_keys if text_keys is not None else adapter.text_max_length
    positions = list(range(first, first + states.shape[1]))
    for index in missing:
        index.extra_entities["background"] = positions
        index.content = sorted(set(index.content) | set(positions))
    return states
