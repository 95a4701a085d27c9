"""The capture attached to a pipeline's denoiser: its processors wrapped around the capture, the denoiser hooks
registered, and the capture requests it serves (`GoCAMixin._goca`)."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from .capture import Capture
from .capture_request import CaptureRequest
from .processors import unwrap_processor, wrap_processor

# The requests running on each denoiser, innermost last. A forward belongs to the innermost one only: a segmentation
# asked for inside a generation's callback runs its own forward, which the generation must not take for a step (also
# when the segmenting pipeline is another one sharing the denoiser).
_RUNNING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class AttachedCapture:
    """A capture attached to its adapter's denoiser: the original processors its own stand for (what `detach` puts
    back), the handles of the denoiser hooks, and the request those hooks serve now (None: none)."""

    adapter: object
    capture: Capture
    originals: dict
    handles: list
    request: CaptureRequest | None = None

    @classmethod
    def attach(cls, capture: Capture, pre_forward: Callable, post_forward: Callable) -> "AttachedCapture":
        """Wrap the processors of the capture's layers around `capture` and register the denoiser hooks; on error,
        the denoiser is left as it was."""
        adapter = capture.adapter
        denoiser = adapter.denoiser
        originals = {key: unwrap_processor(proc) for key, proc in denoiser.attn_processors.items()}
        wrapped = {}
        for key, proc in originals.items():
            layer = key[: -len(".processor")]
            wrapped[key] = wrap_processor(proc, capture, layer) if layer in adapter.layers else proc
        state = cls(adapter, capture, originals, [])
        try:
            denoiser.set_attn_processor(dict(wrapped))
            state.handles = [
                denoiser.register_forward_pre_hook(pre_forward, with_kwargs=True),
                denoiser.register_forward_hook(post_forward, with_kwargs=True),
            ]
        except Exception:
            denoiser.set_attn_processor(dict(originals))
            for h in state.handles:
                h.remove()
            raise
        return state

    def detach(self) -> None:
        """Remove the hooks and put the original processors back where ours stand (`GoCAMixin.disable_goca`), with
        the settings made on ours meanwhile."""
        for h in self.handles:
            h.remove()
        denoiser = self.adapter.denoiser
        restored = {}
        for key, proc in denoiser.attn_processors.items():
            restored[key] = proc
            if self._is_ours(proc):
                restored[key] = original = self.originals[key]
                for setting in ("_attention_backend", "_parallel_config"):
                    if proc is not original and hasattr(proc, setting):
                        setattr(original, setting, getattr(proc, setting))
        denoiser.set_attn_processor(restored)

    def _is_ours(self, proc) -> bool:
        """Whether `proc` is one of the processors that this capture wrapped."""
        return getattr(proc, "capture", None) is self.capture

    def wrap_replaced(self, adopt: bool) -> None:
        """Wrap, in place, the processors set on the capture's layers since they were wrapped (their processor is no
        longer one of ours). adopt: they replace the originals that `detach` restores (unwrapped, if another
        pipeline's capture wrapped them); else they are the call's own (PAG swaps its processors in for the call and
        restores ours after it)."""
        replaced = [n for n in self.adapter.layers if not self._is_ours(self.adapter.submodule(n).processor)]
        for layer in replaced:
            attn = self.adapter.submodule(layer)
            processor = attn.processor
            if adopt:
                processor = self.originals[f"{layer}.processor"] = unwrap_processor(processor)
            attn.set_processor(wrap_processor(processor, self.capture, layer))

    def owns_forward(self) -> bool:
        """Whether the denoiser's forward now belongs to this capture's request: it is the innermost one running."""
        running = _RUNNING.get(self.adapter.denoiser)
        return self.request is not None and bool(running) and running[-1] is self.request

    @contextmanager
    def serving(self, request: CaptureRequest):
        """Hand `request` to the denoiser hooks for the duration of the block, then back the request it was nested in
        (a segmentation inside a generation's callback), if any; the capture is off afterwards."""
        running = _RUNNING.setdefault(self.adapter.denoiser, [])
        outer = self.request
        self.request = request
        running.append(request)
        try:
            yield request
        finally:
            running.remove(request)
            self.request = outer
            self.capture.abandon()
