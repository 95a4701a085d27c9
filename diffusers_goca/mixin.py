"""`GoCAMixin`: enable / disable the capture on a pipeline, segment existing images, masks during generation."""
from __future__ import annotations

import logging
import math
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .capture import Capture, StepCapture
from .class_encoding import CLASS_ENCODINGS, separately_encoded
from .functional.maps import labels_without, scores_to_labels
from .image_input import as_rgb
from .methods import (
    LayerWeightReuse,
    available_methods,
    capture_pseudo_attention,
    check_method,
    method_scores,
    reads_head_weighted_maps,
)
from .models.base import adapter_for, call_default, check_one_call_per_step
from .presence import PRESENCE_THRESHOLD, denoiser_presence
from .processors import unwrap_processor, wrap_processor
from .prompt_classes import entities_from_prompt
from .result import GoCASegmentation
from .tokens import has_class, segmentation_prompt

logger = logging.getLogger(__name__)


@dataclass
class GoCAStepMasks:
    """The segmentation of the images being generated, at one denoising step (one result per image of the batch)."""

    step: int
    timestep: float
    results: list[GoCASegmentation]


@contextmanager
def _scaled_text_tokens(denoiser: torch.nn.Module, positions: list[int], scale: float):
    """While active, the denoiser sees `encoder_hidden_states` with the tokens at `positions` multiplied by `scale`."""
    def hook(module, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None:
            return None
        scaled = ehs.clone()
        scaled[:, positions] *= scale
        return args, {**kwargs, "encoder_hidden_states": scaled}

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def kept_columns(adapter, indices) -> list[int] | None:
    """The text positions whose maps a capture keeps for `indices`. Cross-attention families keep every column their
    softmax reads (CLIP's 77, or PixArt's unmasked prompt tokens: None), since the per-pixel clamp and L1 sum run over
    all text tokens and auto head weights can make any column negative. Joint families (333 or 512 text tokens at
    every layer) keep the columns the methods read; their layers' text masses give the rest of the L1 sum."""
    if not adapter.joint:
        return None
    return sorted({p for index in indices for p in index.needed()})


@dataclass
class CaptureRequest:
    """What the denoiser hooks of a `GoCAMixin` pipeline capture (and, during generation, segment) in one pipeline
    call or one forward: built by `segment` / `capture_forward` (`keep_capture=True`), by the call with `goca_masks`
    (the masks of the steps `wants`), and by `SCFGMixin`'s call (`transform`: the capture and the denoiser output →
    the output the pipeline goes on with). Handed to the hooks with `GoCAMixin._goca_request`; the hooks fill
    `captured` / `delivered` and count `forward`. For mixins built on `GoCAMixin`, as S-CFG is."""

    wants: Callable[[int], bool]
    n_images: int  # images segmented per forward: the conditional rows of the batch (`GoCAMixin._goca_rows`)
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
    output_resize: Callable | None = None  # scores at the generated size → the returned image's (Adapter.output_resize)
    transform: Callable | None = None  # (capture, denoiser output) → replacement output (S-CFG)
    reuse: LayerWeightReuse | None = None  # layer weights kept over steps (generation; None: taken at every step)
    captured: list[StepCapture] = field(default_factory=list)
    delivered: list[GoCAStepMasks] = field(default_factory=list)


# The requests running on each denoiser, innermost last. A forward belongs to the innermost one only: a segmentation
# asked for inside a generation's callback runs its own forward, which the generation must not take for a step (also
# when the segmenting pipeline is another one sharing the denoiser).
_RUNNING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _owns_forward(state: "_GoCAState") -> bool:
    running = _RUNNING.get(state.adapter.denoiser)
    return state.request is not None and bool(running) and running[-1] is state.request


@dataclass
class _GoCAState:
    adapter: object
    capture: Capture
    originals: dict
    handles: list
    request: CaptureRequest | None = None


def _cast_module(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast `module`'s parameters and buffers to `dtype` in place, through `torch.nn.Module.to`. Not diffusers'
    `ModelMixin.to`, which logs "There are modules in <class> that should be kept in float32: [...]" for every dtype
    cast (also for an empty list, as AutoencoderKL's), which `segment`'s VAE upcast would print twice per call; the
    checks it adds before casting concern quantized models (never cast here) and device moves (none here)."""
    torch.nn.Module.to(module, dtype)


def _is_integer(value) -> bool:
    """Whether `value` is a Python or numpy integer (a bool is not one)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _finite(name: str, value) -> float:
    """`value` as a float, or a ValueError naming the argument `name`: a NaN or infinite background offset labelled
    every pixel background."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


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
        raise ValueError(f"goca_classes must be a list of class names, or one list of names for each of the "
                         f"{n_prompts} prompts, got {goca_classes!r}")
    return [list(c) for c in items]


def _is_ours(proc, state: _GoCAState) -> bool:
    """Whether `proc` is one of the processors that `state`'s capture wrapped."""
    return getattr(proc, "capture", None) is state.capture


def _replaced_layers(state: _GoCAState) -> list[str]:
    """The capture's layers whose processor is no longer one of its own: something replaced it since it was wrapped."""
    return [n for n in state.adapter.layers if not _is_ours(state.adapter.submodule(n).processor, state)]


def _text_keys(adapter, indices) -> int | None:
    """The text keys the cross maps need to read for these prompts: all (None) unless the family masks the text's
    padding, then the longest prompt's tokens (the mask covers the rest)."""
    return max(index.length for index in indices) if adapter.text_padding_masked else None


class GoCAMixin:
    """Adds GoCA to a diffusers pipeline: `enable_goca`, `disable_goca`, `segment`, and masks during generation
    through the extra call arguments `goca_masks`, `goca_classes`, `goca_method`, `goca_callback`.
    """

    _goca: _GoCAState | None = None

    # -- attach / detach ----------------------------------------------------------------------------------------------
    def enable_goca(self, head_weighting: str = "auto", offload_above_mib: float | None = 256) -> "GoCAMixin":
        """Install the capture processors and the denoiser hooks. Images are unchanged; steps that ask for no mask
        cost nothing extra. Calling it again re-attaches (e.g. after `load_ip_adapter` replaced the processors).

        offload_above_mib: once the queries and keys a capture holds on the accelerator would pass this many MiB,
        further layers' go to host memory until the reductions (what bounds the extra memory at 1024 px; see the
        memory table in docs/performance.md). None keeps everything on the accelerator: faster where memory allows (Flux at
        1024 px then holds about 2.7 GiB more).
        """
        from .functional.aggregation import HEAD_WEIGHTINGS

        if head_weighting not in HEAD_WEIGHTINGS:  # else every later call would fail, after its denoising
            raise ValueError(f"head_weighting must be one of {HEAD_WEIGHTINGS}, got {head_weighting!r}")
        if offload_above_mib is not None and offload_above_mib < 0:
            raise ValueError(f"offload_above_mib must be None or ≥ 0, got {offload_above_mib}")
        offload_above = None if offload_above_mib is None else int(offload_above_mib * 2**20)
        return self._goca_attach(Capture(adapter_for(self), head_weighting, offload_above))

    def _goca_attach(self, capture: Capture) -> "GoCAMixin":
        """Wrap the processors of the capture's layers around `capture` and register the denoiser hooks."""
        if self._goca is not None:
            self.disable_goca()
        adapter = capture.adapter
        denoiser = adapter.denoiser
        originals = {key: unwrap_processor(proc) for key, proc in denoiser.attn_processors.items()}
        wrapped = {}
        for key, proc in originals.items():
            layer = key[: -len(".processor")]
            wrapped[key] = wrap_processor(proc, capture, layer) if layer in adapter.layers else proc
        state = _GoCAState(adapter, capture, originals, [])
        try:
            denoiser.set_attn_processor(dict(wrapped))
            state.handles = [
                denoiser.register_forward_pre_hook(self._goca_pre_forward, with_kwargs=True),
                denoiser.register_forward_hook(self._goca_post_forward, with_kwargs=True),
            ]
        except Exception:
            denoiser.set_attn_processor(dict(originals))
            for h in state.handles:
                h.remove()
            raise
        self._goca = state
        return self

    def disable_goca(self) -> None:
        """Remove the hooks and put the original processors (the same objects) back where ours stand. Settings made
        on ours meanwhile (`set_attention_backend`, context parallelism) carry over to the originals; processors set
        since by something else (attention slicing, `load_ip_adapter`) stay."""
        state, self._goca = self._goca, None
        if state is None:
            return
        for h in state.handles:
            h.remove()
        denoiser = state.adapter.denoiser
        restored = {}
        for key, proc in denoiser.attn_processors.items():
            restored[key] = proc
            if _is_ours(proc, state):
                restored[key] = original = state.originals[key]
                for setting in ("_attention_backend", "_parallel_config"):
                    if proc is not original and hasattr(proc, setting):
                        setattr(original, setting, getattr(proc, setting))
        denoiser.set_attn_processor(restored)

    @property
    def goca_enabled(self) -> bool:
        """Whether the capture is attached (`enable_goca`)."""
        return self._goca is not None

    @property
    def goca_adapter(self):
        """The model-family `Adapter` of this pipeline (`models.adapter_for`): its layers, token index
        (`goca_adapter.token_index(prompt, classes)`) and timestep rules; the enabled capture's when GoCA is
        enabled."""
        return self._goca.adapter if self._goca is not None else adapter_for(self)

    @property
    def goca_methods(self) -> list[str]:
        """The segmentation methods this pipeline's model family runs, in the order of `methods.METHODS`
        (`methods.available_methods`): every value `segment(..., method=...)` takes here, e.g.
        `pipe.segment(image, classes, method=pipe.goca_methods)` for all of them from one forward."""
        return available_methods(self.goca_adapter)

    def _goca_attached(self) -> _GoCAState:
        """The state, with the capture's processors wrapped again where something replaced them since `enable_goca`
        (attention slicing, IP-Adapter loading, or another pipeline sharing the denoiser through `from_pipe`): the
        new ones become the originals that `disable_goca` restores. The hooks stay registered: this may run inside
        one of them (a segmentation asked for in a generation's callback)."""
        state = self._goca
        if state is None:
            raise RuntimeError("GoCA is not enabled: call pipe.enable_goca() first")
        self._goca_wrap_replaced(state, adopt=True)
        return state

    # -- hooks --------------------------------------------------------------------------------------------------------
    @torch.compiler.disable  # the capture's bookkeeping stays out of a compiled denoiser
    def _goca_pre_forward(self, module, args, kwargs):
        state = self._goca
        req = state.request if state and _owns_forward(state) else None
        if (req is None or state.adapter.guidance_forward(args, kwargs) or req.forward % req.forwards_per_step
                or not req.wants(req.forward // req.forwards_per_step)):
            return None
        adapter = state.adapter
        rows = self._goca_rows(adapter.denoiser_batch(args, kwargs), req.n_images)
        self._goca_wrap_replaced(state, adopt=False)
        state.capture.start(adapter.denoiser_latent_hw(args, kwargs), rows, adapter.denoiser_text_len(args, kwargs),
                            req.columns, req.text_keys, req.pseudo_attention)
        req.timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        return None

    def _goca_rows(self, batch: int, n: int) -> range:
        """The rows of the denoiser batch that hold the n images to segment: the conditional ones."""
        if batch == n:
            return range(n)
        if getattr(self, "do_perturbed_attention_guidance", False):  # PAG appends the perturbed rows
            if batch == 3 * n:
                return range(n, 2 * n)  # [uncond, cond, perturbed]
            if batch == 2 * n:
                return range(n)  # [cond, perturbed]
        elif batch == 2 * n:
            return range(n, 2 * n)  # [uncond, cond]
        raise RuntimeError(f"GoCA expected a denoiser batch of {n} images, or those with their unconditional (CFG) or "
                           f"perturbed (PAG) copies, got {batch}")

    def _goca_wrap_replaced(self, state: _GoCAState, adopt: bool) -> None:
        """Wrap, in place, the processors set on the capture's layers since they were wrapped. adopt: they replace
        the originals that `disable_goca` restores (unwrapped, if another pipeline's capture wrapped them); else they
        are the call's own (PAG swaps its processors in for the call and restores ours after it)."""
        for layer in _replaced_layers(state):
            attn = state.adapter.submodule(layer)
            processor = attn.processor
            if adopt:
                processor = state.originals[f"{layer}.processor"] = unwrap_processor(processor)
            attn.set_processor(wrap_processor(processor, state.capture, layer))

    @torch.compiler.disable  # the capture's bookkeeping stays out of a compiled denoiser
    def _goca_post_forward(self, module, args, kwargs, output):
        state = self._goca
        req = state.request if state and _owns_forward(state) else None
        if req is None or state.adapter.guidance_forward(args, kwargs):
            return None
        step = state.capture.stop()
        index = req.forward // req.forwards_per_step
        req.forward += 1
        if step is not None and req.transform is not None:
            return req.transform(step, output)
        if step is not None and req.keep_capture:
            req.captured.append(step)
        elif step is not None:
            reuse = None if req.reuse is None else partial(req.reuse, index)
            results = self._goca_results(state.adapter, step, req.indices, req.method, req.background,
                                         req.background_offset, req.options, output_resize=req.output_resize,
                                         reuse=reuse)
            t = req.timestep
            t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t or 0)
            masks = GoCAStepMasks(index, state.adapter.scheduler_timestep(t), results)
            req.delivered.append(masks)
            if req.callback is not None:
                req.callback(self, index, masks.timestep, masks)
        return None

    def _goca_results(self, adapter, step: StepCapture, indices, method: str, background: str | None,
                      background_offset: float, options: dict, out_hw=None, output_resize=None,
                      absent: Sequence[str] = (), reuse: Callable | None = None) -> list[GoCASegmentation]:
        """One segmentation per captured row; labels at `out_hw` (default: the generated image's size), then through
        `output_resize` (what the pipeline does to its image after generating it, if anything). Classes in `absent`
        take no pixel (unless every class is absent and there is no background channel). reuse: the layer weights'
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
            if absent:
                labels = labels_without(up, [classes.index(c) for c in absent])
            results.append(GoCASegmentation(labels.cpu(), up.cpu(), classes, absent=list(absent)))
        # Read after the labels came to the host, so the checks and counts cost no wait of their own.
        step.check_text_keys()
        degenerate = step.degenerate_pixels if reads_head_weighted_maps(method, options) else 0
        if degenerate:
            logger.warning("GoCA: %d pixel(s), summed over the layers and images of this forward, had an attention "
                           "output of norm ≈ 0; their head weights fell back to the head mean (docs/official_code.md)",
                           degenerate)
        return results

    @contextmanager
    def _goca_request(self, state: _GoCAState, request: CaptureRequest):
        """Hand `request` to the denoiser hooks for the duration of the block, then back the request it was nested in
        (a segmentation inside a generation's callback), if any; the capture is off afterwards."""
        running = _RUNNING.setdefault(state.adapter.denoiser, [])
        outer = state.request
        state.request = request
        running.append(request)
        try:
            yield request
        finally:
            running.remove(request)
            state.request = outer
            state.capture.abandon()

    def _goca_prompt_indices(self, adapter, prompt, kwargs, what: str, index_for) -> list:
        """One TokenIndex per generated image (prompts × num_images_per_prompt), read from the text the pipeline
        encodes; `prompt`: the call's `adapter.call_prompt`. index_for(i, text, max_length, part_texts) builds the
        i-th prompt's."""
        if prompt is None:
            raise ValueError(f"{what} needs the prompt text (prompt_embeds alone cannot be segmented)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = kwargs.get("num_images_per_prompt", 1) or 1
        max_length = kwargs.get("max_sequence_length", adapter.text_max_length)
        return [index_for(i, adapter.prompt_text(p, kwargs), max_length, adapter.part_texts(kwargs, i, len(prompts)))
                for i, p in enumerate(prompts) for _ in range(per_prompt)]

    def capture_forward(self, run: Callable[[], object], n_images: int = 1, columns: Sequence[int] | None = None,
                        text_keys: int | None = None, pseudo_attention: str = "official-code") -> StepCapture:
        """Run `run()`, which calls the denoiser once, with the capture on; return what it captured.

        The conditional rows of the denoiser batch are captured (`n_images` of them: the last ones of a CFG batch);
        `columns`: the text positions whose maps are kept (default all; `TokenIndex.needed()` is what the methods read);
        `text_keys`: for a family that masks the text's padding, the prompts' token count (`_text_keys`), past
        which no key is read (default all); `pseudo_attention`: the A_p formula of the layer weights that joint layers
        take in the forward (`GoCAOptions.pseudo_attention`). GoCA is enabled for the call if it was not, and left as it was afterwards,
        also on error. `segment` and the benchmarks are built on this.
        """
        was_enabled = self._goca is not None
        state = self._goca_attached() if was_enabled else self.enable_goca()._goca
        request = CaptureRequest(wants=lambda i: True, n_images=n_images, keep_capture=True,
                                 columns=None if columns is None else list(columns), text_keys=text_keys,
                                 pseudo_attention=pseudo_attention)
        try:
            with self._goca_request(state, request):
                run()
        finally:
            if not was_enabled:
                self.disable_goca()
        if not request.captured:
            raise RuntimeError("the denoiser did not run: GoCA captured nothing")
        return request.captured[0]

    # -- segmentation of an existing image ------------------------------------------------------------------------------
    @torch.no_grad()
    def segment(
        self,
        image,
        classes: Sequence[str],
        method: str | Sequence[str] = "goca",
        timestep: int | float | None = None,
        seed: int | None = 0,
        background: bool = False,
        background_offset: float = 0.0,
        resolution: int | None = None,
        guidance_scale: float | None = None,
        presence: bool = False,
        presence_threshold: float = PRESENCE_THRESHOLD,
        class_encoding: str = "prompt",
        **options,
    ) -> GoCASegmentation | dict[str, GoCASegmentation]:
        """Segment an existing image into `classes` (docs/official_code.md): resize to the model's native square resolution,
        VAE-encode, add seeded noise at `timestep` (default 100 of 1000), one denoiser forward without CFG on the
        prompt "class1, class2, ..., background", then the aggregation `method`, one of `methods.METHODS`: "goca"
        (default), "vanilla", "manual", "diffsegmenter", "iseg" (a forward of its own, with the class tokens'
        embeddings scaled) or "seg4diff"; not every family runs every one (`pipe.goca_methods` lists this
        pipeline's). `options` override GoCA's switches for goca / vanilla / manual (see `GoCAOptions`).

        timestep: SD / SDXL / PixArt an integer in 0…999, SD3 / Flux a number in [0, 1000] (σ = t / 1000); seed: the
        noise's seed (None: unseeded).
        guidance_scale: for guidance-distilled models (Flux dev), the guidance embedding's value; default 1.0, as the
        official extractor runs. Other families run one forward without guidance and refuse it.
        background: add a "background" word to the prompt and a background channel (its map + `background_offset`),
        unless a class is named background (in any case). Off by default: where the surface is named, the channel
        takes part of it (the toy models' protocol table in docs/protocols.md); turn it on when only objects are named.
        presence: first ask the denoiser which classes are in the image (`presence.denoiser_presence`: each class
        left out of the prompt in turn, 3·(K+1) more forwards); a class whose absence raises the denoising error by
        no more than `presence_threshold` is judged absent and takes no pixel (`result.absent`; its scores stay in
        `result.scores`). Every class absent: all background with a background channel, else the plain argmax; a
        warning names them.
        class_encoding: "prompt" (the classes' tokens as the text encoder reads them in the prompt) or "separate"
        (each class encoded on its own, `class_encoding.separately_encoded`: the result no longer depends on the
        order of the classes, which a causal text encoder such as CLIP otherwise imposes; see docs/protocols.md).
        Returns, for one method (a string), a `GoCASegmentation` whose labels have the input image's size; for a list
        of methods, a dict method → `GoCASegmentation`, all read from the same single forward (iSeg's from its own).
        """
        methods = [method] if isinstance(method, str) else list(method)
        if isinstance(classes, str):
            classes = [c.strip() for c in classes.split(",") if c.strip()]
        rgb = as_rgb(image)
        classes = list(classes)
        use_background = background and not has_class(classes, "background")
        prompt = segmentation_prompt(classes, use_background)
        adapter = self._goca.adapter if self._goca is not None else adapter_for(self)
        for m in methods:
            check_method(adapter, m)
        pseudo_attention = capture_pseudo_attention(adapter, methods, options)
        background_offset = _finite("background_offset", background_offset)
        presence_threshold = _finite("presence_threshold", presence_threshold)
        if class_encoding not in CLASS_ENCODINGS:
            raise ValueError(f"class_encoding must be one of {CLASS_ENCODINGS}, got {class_encoding!r}")
        adapter.check_segment_guidance(guidance_scale)
        index = adapter.token_index(adapter.segment_text(prompt), classes,
                                    extra_entities=["background"] if use_background else [])
        # None: the family's own rule
        timestep = adapter.segment_timestep if timestep is None else adapter.checked_timestep(timestep)
        if seed is not None and not _is_integer(seed):
            raise ValueError(f"seed must be an integer or None (unseeded), got {seed!r}")
        resolution = adapter.checked_resolution(resolution)
        latents = self._goca_encode(rgb, resolution, adapter)
        text_keys = _text_keys(adapter, [index])

        def capture(scale_classes: float | None = None) -> StepCapture:
            generator = None if seed is None else torch.Generator().manual_seed(int(seed))
            forward = lambda: adapter.segment_forward(latents, prompt, timestep, generator, guidance_scale)  # noqa: E731
            settings = dict(columns=kept_columns(adapter, [index]), text_keys=text_keys, pseudo_attention=pseudo_attention)
            with ExitStack() as stack:
                if class_encoding == "separate":
                    missing = stack.enter_context(separately_encoded(self, classes, adapter.segment_text))
                if scale_classes is not None:
                    positions = sorted({p for ps in index.class_tokens for p in ps})
                    stack.enter_context(_scaled_text_tokens(adapter.denoiser, positions, scale_classes))
                step = self.capture_forward(forward, **settings)
            if class_encoding == "separate" and missing:
                logger.warning("GoCA: class_encoding='separate' did not find the tokens of %s in the prompt as "
                               "tokenized; they keep the prompt's encoding", ", ".join(sorted(missing)))
            return step

        absent = []
        if presence:
            gains = denoiser_presence(lambda text, t, g: adapter.segment_forward(latents, text, t, g, guidance_scale),
                                      classes, use_background, seed)
            absent = [c for c, gain in zip(classes, gains.tolist()) if gain <= presence_threshold]
            if len(absent) == len(classes):
                logger.warning("GoCA: the presence test judged every class absent (%s): %s", ", ".join(absent),
                               "all pixels are background" if use_background else
                               "the labels are the plain argmax over them (pass background=True to get background)")
        # iSeg reads a forward whose class-token embeddings are scaled; every other method shares one plain forward.
        steps = {}
        if any(m != "iseg" for m in methods):
            steps["plain"] = capture()
        if "iseg" in methods:
            from .methods import ISEG_EMBEDDING_SCALE

            steps["iseg"] = capture(ISEG_EMBEDDING_SCALE)
        results = {}
        for m in methods:
            step = steps["iseg" if m == "iseg" else "plain"]
            results[m] = self._goca_results(adapter, step, [index], m, "background" if use_background else None,
                                            background_offset, options, (rgb.height, rgb.width), absent=absent)[0]
            results[m].image = rgb
        return results[method] if isinstance(method, str) else results

    def _goca_encode(self, rgb: Image.Image, resolution: int, adapter) -> torch.Tensor:
        vae = self.vae
        pixels = self.image_processor.preprocess(rgb, height=resolution, width=resolution)
        upcast = (vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
                  and not getattr(vae, "is_quantized", False))
        dtype = torch.float32 if upcast else vae.dtype
        if upcast:
            _cast_module(vae, torch.float32)
        try:
            # The pipeline's execution device: under model offload the VAE waits on the host until `encode` moves it.
            latents = vae.encode(pixels.to(self._execution_device, dtype)).latent_dist.mean
        finally:
            if upcast:
                _cast_module(vae, torch.float16)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(adapter.denoiser.dtype)

    # -- masks during generation --------------------------------------------------------------------------------------
    def __call__(
        self,
        *args,
        goca_masks: bool | str | Sequence[int] = False,
        goca_classes: Sequence[str] | Sequence[Sequence[str]] | None = None,
        goca_method: str = "goca",
        goca_callback: Callable | None = None,
        goca_background: bool = False,
        goca_background_offset: float = 0.0,
        goca_options: dict | None = None,
        goca_layer_weights_every: int = 1,
        **kwargs,
    ):
        """The pipeline's own call, plus masks during generation.

        goca_masks: False (default: nothing extra is computed), True / "all" (every step), "last", or step indices
        (negative ones count from the end: -1 is the last step).
        goca_classes: classes to segment, for every prompt, or one list per prompt (default: the entities of each
        prompt, see `tokens.entities_from_prompt`).
        goca_callback: called as `goca_callback(pipe, step, timestep, masks: GoCAStepMasks)` after each segmented step.
        goca_layer_weights_every: k > 1 takes GoCA's layer weights at the first segmented step and again only once k
        steps have passed, reusing them in between (they change slowly; the cost they save is in
        docs/scfg_toy.md); 1 (default): at every step, the method as published.
        After the call, `pipe.goca_masks` holds the list of `GoCAStepMasks` of that call.
        """
        if goca_masks is None or goca_masks is False or (isinstance(goca_masks, (list, tuple)) and not goca_masks):
            self.goca_masks = []
            return super().__call__(*args, **kwargs)
        if goca_method == "iseg":  # its maps come from a forward with scaled class-token embeddings
            raise ValueError("goca_method='iseg' needs a denoiser forward of its own, which would change the images: "
                             "segment the generated image with pipe.segment(image, classes, method='iseg')")
        # Every check before GoCA is attached: a refused call leaves a disabled pipeline as it was.
        check_one_call_per_step(self, "goca_masks")
        adapter = self._goca.adapter if self._goca is not None else adapter_for(self)
        check_method(adapter, goca_method)
        pseudo_attention = capture_pseudo_attention(adapter, [goca_method], dict(goca_options or {}))
        goca_background_offset = _finite("goca_background_offset", goca_background_offset)
        reuse = LayerWeightReuse(goca_layer_weights_every, "goca_layer_weights_every")

        prompt = adapter.call_prompt(args, kwargs)
        adapter.check_mask_prompt(kwargs, prompt)
        per_prompt = _classes_per_prompt(goca_classes, prompt)

        def index_for(i, text, max_length, part_texts):
            classes = list(per_prompt[i]) if per_prompt is not None else entities_from_prompt(text)
            extra = ["background"] if goca_background and not has_class(classes, "background") else []
            index = adapter.token_index(text, classes, extra, max_length, part_texts=part_texts)
            if extra and "background" not in index.extra_entities:
                # the channel is the word's map: without the word there is none, and the masks would silently lack it
                raise ValueError(f"goca_background=True reads the map of the word 'background' in the prompt, and "
                                 f"{text!r} has none: add it to the prompt (which changes the image), or segment the "
                                 f"generated image with pipe.segment(image, classes, background=True)")
            return index

        indices = self._goca_prompt_indices(adapter, prompt, kwargs, "masks during generation", index_for)
        schedule = kwargs.get("timesteps") if kwargs.get("timesteps") is not None else kwargs.get("sigmas")
        steps = len(schedule) if schedule is not None else kwargs.get(
            "num_inference_steps", call_default(type(self), "num_inference_steps", 50))
        wants = self._goca_step_filter(goca_masks, adapter.steps_run(kwargs, steps), steps)
        request = CaptureRequest(
            wants=wants, n_images=len(indices), indices=indices, method=goca_method,
            background="background" if goca_background else None, background_offset=goca_background_offset,
            options=dict(goca_options or {}), callback=goca_callback, forwards_per_step=adapter.forwards_per_step(kwargs),
            columns=kept_columns(adapter, indices), text_keys=_text_keys(adapter, indices),
            pseudo_attention=pseudo_attention,
            output_resize=adapter.output_resize(kwargs), reuse=reuse if reuse.every > 1 else None,
        )
        self.goca_masks = request.delivered
        state = self._goca_attached() if self._goca is not None else self.enable_goca()._goca
        with self._goca_request(state, request):
            return super().__call__(*args, **kwargs)

    def _goca_step_filter(self, goca_masks, steps_run: int, num_inference_steps: int) -> Callable[[int], bool]:
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
            raise ValueError(f"goca_masks must be True, 'all', 'last' or a list of step indices (one step: [i]), "
                             f"got {goca_masks!r}")
        goca_masks = list(goca_masks)
        n = steps_run
        bad = [i for i in goca_masks if not _is_integer(i) or not -n <= i < n]
        if bad:
            cut = "" if n == num_inference_steps else f" of num_inference_steps={num_inference_steps}, the rest cut " \
                                                       f"by strength / denoising_start / denoising_end"
            raise ValueError(f"goca_masks: steps must be integers in -{n}…{n - 1} (this call runs {n} steps{cut}), "
                             f"got {bad}")
        wanted = {int(i) for i in goca_masks}

        def steps() -> int:
            # Read as the loop runs. PixArt's pipelines keep no `_num_timesteps`; their loop runs the whole schedule.
            return getattr(self, "_num_timesteps", None) or len(self.scheduler.timesteps)

        return lambda i: i in wanted or i - steps() in wanted
