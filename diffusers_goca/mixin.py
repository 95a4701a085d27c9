"""`GoCAMixin`: GoCA on a diffusers pipeline: enable / disable the capture, segment existing images, masks during
generation. The work is done by its parts (`attach`, `denoiser_hooks`, `segmenting`, `generation`); the mixin holds
the public methods; the parts do the work."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .attach import AttachedCapture
from .capture import Capture, StepCapture
from .capture_request import CaptureRequest, GoCAStepMasks
from .denoiser_hooks import DenoiserHooks
from .generation import masks_request
from .methods import (
    available_methods,
)
from .models.base import adapter_for
from .presence import PRESENCE_THRESHOLD
from .result import GoCASegmentation
from .segmenting import segment_image


class GoCAMixin:
    """Adds GoCA to a diffusers pipeline: `enable_goca`, `disable_goca`, `segment`, and masks during generation
    through the extra call arguments `goca_masks`, `goca_classes`, `goca_method`, `goca_callback`. Its parts are held,
    not inherited: a pipeline class's bases are this mixin and the diffusers class (`pipelines.goca_class`).
    """

    _goca: AttachedCapture | None = None

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
        capture = Capture(adapter_for(self), head_weighting, offload_above)
        if self._goca is not None:
            self.disable_goca()
        hooks = DenoiserHooks(self)
        self._goca = AttachedCapture.attach(capture, hooks.pre_forward, hooks.post_forward)
        return self

    def disable_goca(self) -> None:
        """Remove the hooks and put the original processors (the same objects) back where ours stand. Settings made
        on ours meanwhile (`set_attention_backend`, context parallelism) carry over to the originals; processors set
        since by something else (attention slicing, `load_ip_adapter`) stay."""
        state, self._goca = self._goca, None
        if state is not None:
            state.detach()

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

    def _goca_attached(self) -> AttachedCapture:
        """The attached capture, with its processors wrapped again where something replaced them since `enable_goca`
        (attention slicing, IP-Adapter loading, or another pipeline sharing the denoiser through `from_pipe`): the
        new ones become the originals that `disable_goca` restores. The hooks stay registered: this may run inside
        one of them (a segmentation asked for in a generation's callback)."""
        state = self._goca
        if state is None:
            raise RuntimeError("GoCA is not enabled: call pipe.enable_goca() first")
        state.wrap_replaced(adopt=True)
        return state

    def capture_forward(
        self,
        run: Callable[[], object],
        n_images: int = 1,
        columns: Sequence[int] | None = None,
        text_keys: int | None = None,
        pseudo_attention: str = "official-code",
    ) -> StepCapture:
        """Run `run()`, which calls the denoiser once, with the capture on; return what it captured.

        The conditional rows of the denoiser batch are captured (`n_images` of them: the last ones of a CFG batch);
        `columns`: the text positions whose maps are kept (default all; `TokenIndex.needed()` is what the methods read);
        `text_keys`: for a family that masks the text's padding, the prompts' token count (`text_keys_read`), past
        which no key is read (default all); `pseudo_attention`: the A_p formula of the layer weights that joint layers
        take in the forward (`GoCAOptions.pseudo_attention`). GoCA is enabled for the call if it was not, and left as it was afterwards,
        also on error. `segment` and the benchmarks are built on this.
        """
        was_enabled = self._goca is not None
        state = self._goca_attached() if was_enabled else self.enable_goca()._goca
        request = CaptureRequest(
            wants=lambda i: True,
            n_images=n_images,
            keep_capture=True,
            columns=None if columns is None else list(columns),
            text_keys=text_keys,
            pseudo_attention=pseudo_attention,
        )
        try:
            with state.serving(request):
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
        class_order: str = "given",
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
        presence: first ask the denoiser which classes are in the image (`presence.elimination_rounds`: each class
        left out of the prompt in turn, then the class whose absence raised the denoising error least left out and
        the others asked again, until none is left, 14·(1 + K(K+1)/2) more forwards for K classes); the classes of
        the prompt along that path that explains the image best are kept, each having to lower the error by more
        than `presence_threshold` (`presence.kept_round`). The error is read over the whole image, or with a
        background channel in each class's region (`presence.class_regions` of the first method's scores): there the
        classes named need not explain the surface. A class left out is judged absent and takes no pixel
        (`result.absent`; its scores stay in `result.scores`), and the kept classes' scores are weighted by their
        gains there (`presence.presence_weights`, in `result.presence`) before the argmax. Every class absent: all
        background with a background channel, else the plain argmax; a warning names them.
        class_encoding: "prompt" (the classes' tokens as the text encoder reads them in the prompt) or "separate"
        (each class encoded on its own, `class_encoding.separately_encoded`: the result no longer depends on the
        order of the classes, which a causal text encoder such as CLIP otherwise imposes; see docs/protocols.md).
        class_order: the order the prompt names the classes in: "given" (as `classes`, one forward) or
        "stuff-first" (stuff classes such as sky, grass, road or wall first, alphabetically, then the others in
        several orders whose scores are averaged: every order of up to three, 2·T orders of T > 3;
        `class_order.prompt_orders`): the segmentation depends on the set of classes, not on their order, and the
        class that covers most of the image is named first, where a causal text encoder reads it best. One forward
        per order. The result lists the classes in the order given either way.
        Returns, for one method (a string), a `GoCASegmentation` whose labels have the input image's size; for a list
        of methods, a dict method → `GoCASegmentation`, all read from the same single forward (iSeg's from its own).
        """
        return segment_image(
            self,
            image,
            classes,
            method,
            timestep,
            seed,
            background,
            background_offset,
            resolution,
            guidance_scale,
            presence,
            presence_threshold,
            class_encoding,
            class_order,
            options,
        )

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
        request = masks_request(
            self,
            args,
            kwargs,
            goca_masks,
            goca_classes,
            goca_method,
            goca_callback,
            goca_background,
            goca_background_offset,
            goca_options,
            goca_layer_weights_every,
        )
        self.goca_masks: list[GoCAStepMasks] = request.delivered
        state = self._goca_attached() if self._goca is not None else self.enable_goca()._goca
        with state.serving(request):
            return super().__call__(*args, **kwargs)
