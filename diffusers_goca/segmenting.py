"""Segmentation of an existing image (`GoCAMixin.segment`): the image encoded by the VAE and noised, the classes'
presence, their separate encoding, one captured denoiser forward per kind of map, and each method's result."""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager

import torch
from PIL import Image

from .arguments import finite_number, is_integer
from .capture import StepCapture
from .capture_request import kept_columns, text_keys_read
from .class_encoding import CLASS_ENCODINGS, separately_encoded
from .class_order import prompt_orders
from .functional.maps import weighted_labels
from .image_input import as_rgb
from .methods import ISEG_EMBEDDING_SCALE, capture_pseudo_attention, check_method
from .presence import class_regions, elimination_rounds, elimination_weights
from .result import GoCASegmentation
from .step_results import step_segmentations
from .tokens import has_class, segmentation_prompt

logger = logging.getLogger(__name__)


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


def _cast_module(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast `module`'s parameters and buffers to `dtype` in place, through `torch.nn.Module.to`. Not diffusers'
    `ModelMixin.to`, which logs "There are modules in <class> that should be kept in float32: [...]" for every dtype
    cast (also for an empty list, as AutoencoderKL's), which `segment`'s VAE upcast would print twice per call; the
    checks it adds before casting concern quantized models (never cast here) and device moves (none here)."""
    torch.nn.Module.to(module, dtype)


def encoded_latents(pipe, rgb: Image.Image, resolution: int, adapter) -> torch.Tensor:
    """`rgb` resized to a `resolution` square and encoded by the pipeline's VAE (its mean; upcast to float32 for the
    encode where the VAE asks for it), scaled as the denoiser reads latents, in the denoiser's dtype."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(rgb, height=resolution, width=resolution)
    upcast = (
        vae.dtype == torch.float16
        and getattr(vae.config, "force_upcast", False)
        and not getattr(vae, "is_quantized", False)
    )
    dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        _cast_module(vae, torch.float32)
    try:
        # The pipeline's execution device: under model offload the VAE waits on the host until `encode` moves it.
        latents = vae.encode(pixels.to(pipe._execution_device, dtype)).latent_dist.mean
    finally:
        if upcast:
            _cast_module(vae, torch.float16)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).to(adapter.denoiser.dtype)


def segment_image(
    pipe,
    image,
    classes,
    method,
    timestep,
    seed,
    background: bool,
    background_offset,
    resolution,
    guidance_scale,
    presence: bool,
    presence_threshold,
    class_encoding: str,
    class_order: str,
    options: dict,
) -> GoCASegmentation | dict[str, GoCASegmentation]:
    """`pipe.segment(image, classes, ...)` (see there): every argument checked before the image is encoded, then
    the presence test if asked for, the captured forwards (one per kind of map, iSeg's own, for each order of the
    classes), and each method's result."""
    methods = [method] if isinstance(method, str) else list(method)
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    rgb = as_rgb(image)
    classes = list(classes)
    orders = prompt_orders(classes, class_order)
    named = orders[0]
    use_background = background and not has_class(classes, "background")
    adapter = pipe.goca_adapter
    for m in methods:
        check_method(adapter, m)
    pseudo_attention = capture_pseudo_attention(adapter, methods, options)
    background_offset = finite_number("background_offset", background_offset)
    presence_threshold = finite_number("presence_threshold", presence_threshold)
    if class_encoding not in CLASS_ENCODINGS:
        raise ValueError(f"class_encoding must be one of {CLASS_ENCODINGS}, got {class_encoding!r}")
    adapter.check_segment_guidance(guidance_scale)
    extra_entities = ["background"] if use_background else []
    # Every order's token index before the image is encoded: a class cut off by the token limit fails here.
    indices = [
        adapter.token_index(adapter.segment_text(segmentation_prompt(order, use_background)), order, extra_entities)
        for order in orders
    ]
    # None: the family's own rule
    timestep = adapter.segment_timestep if timestep is None else adapter.checked_timestep(timestep)
    if seed is not None and not is_integer(seed):
        raise ValueError(f"seed must be an integer or None (unseeded), got {seed!r}")
    resolution = adapter.checked_resolution(resolution)
    latents = encoded_latents(pipe, rgb, resolution, adapter)

    def capture(names: list[str], index, scale_classes: float | None = None) -> StepCapture:
        prompt = segmentation_prompt(names, use_background)
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        forward = lambda: adapter.segment_forward(latents, prompt, timestep, generator, guidance_scale)  # noqa: E731
        settings = dict(
            columns=kept_columns(adapter, [index]),
            text_keys=text_keys_read(adapter, [index]),
            pseudo_attention=pseudo_attention,
        )
        with ExitStack() as stack:
            if class_encoding == "separate":
                missing = stack.enter_context(separately_encoded(pipe, names, adapter.segment_text))
            if scale_classes is not None:
                positions = sorted({p for ps in index.class_tokens for p in ps})
                stack.enter_context(_scaled_text_tokens(adapter.denoiser, positions, scale_classes))
            step = pipe.capture_forward(forward, **settings)
        if class_encoding == "separate" and missing:
            logger.warning(
                "GoCA: class_encoding='separate' did not find the tokens of %s in the prompt as "
                "tokenized; they keep the prompt's encoding",
                ", ".join(sorted(missing)),
            )
        return step

    def one_order(names: list[str], index) -> dict[str, GoCASegmentation]:
        """Each method's segmentation with the prompt naming `names` in this order: iSeg reads a forward whose
        class-token embeddings are scaled; every other method shares one plain forward."""
        steps = {}
        if any(m != "iseg" for m in methods):
            steps["plain"] = capture(names, index)
        if "iseg" in methods:
            steps["iseg"] = capture(names, index, ISEG_EMBEDDING_SCALE)
        background_name = "background" if use_background else None
        return {
            m: step_segmentations(
                adapter,
                steps["iseg" if m == "iseg" else "plain"],
                [index],
                m,
                background_name,
                background_offset,
                options,
                (rgb.height, rgb.width),
            )[0]
            for m in methods
        }

    runs = [one_order(order, index) for order, index in zip(orders, indices)]
    averaged = {m: _averaged_scores([run[m] for run in runs], classes) for m in methods}
    weights = None
    if presence:
        regions = None
        if use_background:
            # the classes named need not explain the whole image (the surface goes to the background channel), so each
            # class's gain is read where the first method's scores put it, on the denoising error's grid
            names, scores = averaged[methods[0]]
            regions = class_regions(scores[[names.index(c) for c in named]], adapter.error_map_grid(latents))
        with adapter.encodings_kept():  # each prompt encoded once, not at every noise
            rounds = elimination_rounds(
                adapter.presence_forward(latents, guidance_scale),
                named,
                use_background,
                seed,
                regions=regions,
            )
        weights = dict(zip(named, elimination_weights(rounds, named, presence_threshold).tolist()))
        absent = [c for c in classes if weights[c] == 0]
        if len(absent) == len(classes):
            logger.warning(
                "GoCA: the presence test judged every class absent (%s): %s",
                ", ".join(absent),
                "all pixels are background"
                if use_background
                else "the labels are the plain argmax over them (pass background=True to get background)",
            )
    out = {m: _segmentation(*averaged[m], weights, rgb) for m in methods}
    return out[method] if isinstance(method, str) else out


def _averaged_scores(runs: list[GoCASegmentation], classes: list[str]) -> tuple[list[str], torch.Tensor]:
    """(names, scores [len(names), H, W]) of one method from the same classes named in one or several orders: the
    caller's order `classes` (and "background" last, with a channel), each class's scores averaged over the runs."""
    names = classes + runs[0].classes[len(classes) :]
    return names, torch.stack([torch.stack([run.scores[run.classes.index(c)] for c in names]) for run in runs]).mean(0)


def _segmentation(
    names: list[str], scores: torch.Tensor, weights: dict[str, float] | None, image: Image.Image
) -> GoCASegmentation:
    """The labels of `scores`: their argmax with each class weighted by the presence test's `weights` (a class
    without one: 1)."""
    labels = weighted_labels(scores, [1.0 if weights is None else weights.get(c, 1.0) for c in names])
    return GoCASegmentation(labels, scores, names, image=image, presence=dict(weights or {}))
