"""The forward hooks that GoCA registers on a pipeline's denoiser: they bracket each forward that the running capture
request wants with the capture's `start` / `stop`, and hand what it captured to the request."""

from __future__ import annotations

from functools import partial

import torch

from .capture_request import GoCAStepMasks
from .step_results import step_segmentations


class DenoiserHooks:
    """The pre- and post-forward hooks of one `GoCAMixin` pipeline (`pipe`), read against its attached capture
    (`pipe._goca`) at every call. A forward is captured when the request served now owns it (not a forward of a
    request nested in it), it is the first denoiser call of its step, no guidance-only call, and `wants` the step;
    after it, the capture goes to the request's `transform` (S-CFG), to `captured` (`keep_capture`), or is segmented
    (`step_results.step_segmentations`) into the step's `GoCAStepMasks`, delivered and passed to the request's callback."""

    def __init__(self, pipe):
        self.pipe = pipe

    @torch.compiler.disable  # the capture's bookkeeping stays out of a compiled denoiser
    def pre_forward(self, module, args, kwargs):
        state = self.pipe._goca
        req = state.request if state and state.owns_forward() else None
        if req is None or state.adapter.guidance_forward(args, kwargs) or req.forward % req.forwards_per_step:
            return None
        req.timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if req.side_encodings is not None or not req.wants(req.forward // req.forwards_per_step):
            return None  # with side texts, the step is read from a forward of its own after this one (`post_forward`)
        adapter = state.adapter
        rows = self.rows(adapter.denoiser_batch(args, kwargs), req.n_images)
        state.wrap_replaced(adopt=False)
        state.capture.start(
            adapter.denoiser_latent_hw(args, kwargs),
            rows,
            adapter.denoiser_text_len(args, kwargs),
            req.columns,
            req.text_keys,
            req.pseudo_attention,
            req.extra_text,
        )
        return None

    def rows(self, batch: int, n: int) -> range:
        """The rows of the denoiser batch that hold the n images to segment: the conditional ones."""
        if batch == n:
            return range(n)
        if getattr(self.pipe, "do_perturbed_attention_guidance", False):  # PAG appends the perturbed rows
            if batch == 3 * n:
                return range(n, 2 * n)  # [uncond, cond, perturbed]
            if batch == 2 * n:
                return range(n)  # [cond, perturbed]
        elif batch == 2 * n:
            return range(n, 2 * n)  # [uncond, cond]
        raise RuntimeError(
            f"GoCA expected a denoiser batch of {n} images, or those with their unconditional (CFG) or "
            f"perturbed (PAG) copies, got {batch}"
        )

    @torch.compiler.disable  # the capture's bookkeeping stays out of a compiled denoiser
    def post_forward(self, module, args, kwargs, output):
        state = self.pipe._goca
        req = state.request if state and state.owns_forward() else None
        if req is None or state.adapter.guidance_forward(args, kwargs):
            return None
        step = state.capture.stop()
        index, in_step = divmod(req.forward, req.forwards_per_step)  # in_step: this forward's place in its step
        if req.side_encodings is not None and in_step == 0 and req.wants(index):
            # the same inputs with the side texts, captured as a forward of its own
            rows = self.rows(state.adapter.denoiser_batch(args, kwargs), req.n_images)
            call = state.adapter.text_swapped_call(args, kwargs, rows, req.side_encodings)
            step = self.pipe.capture_forward(
                lambda: module(**call), req.n_images, req.columns, req.text_keys, req.pseudo_attention
            )
        req.forward += 1
        if req.transform is not None and (step is not None or in_step == 0):
            return req.transform(step, output)  # step None: a step the request does not capture
        if step is not None and req.keep_capture:
            req.captured.append(step)
        elif step is not None:
            reuse = None if req.reuse is None else partial(req.reuse, index)
            results = step_segmentations(
                state.adapter,
                step,
                req.indices,
                req.method,
                req.background,
                req.background_offset,
                req.options,
                output_resize=req.output_resize,
                reuse=reuse,
            )
            t = req.timestep
            t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t or 0)
            masks = GoCAStepMasks(index, state.adapter.scheduler_timestep(t), results)
            req.delivered.append(masks)
            if req.callback is not None:
                req.callback(self.pipe, index, masks.timestep, masks)
        return None
