"""Drop-in attention processors that return exactly what the processor they stand for returns.

The output path is the parent's own code (`AttnProcessor2_0.__call__`, or the wrapped custom processor's); the maps are
read on a side path: forward hooks on `to_q` / `to_k` and a pre-hook on `to_out[0]` see the projections the output path
computes anyway, and hand them to the capture. When the capture does not want the layer, no hook is set at all.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import AttnProcessor2_0


class ProjectionTap:
    """The first output of `to_q`, `to_k`, `to_v` and the first input of `to_out[0]` in one attention call."""

    def __init__(self):
        self.query = self.key = self.value = self.head_out = None

    @contextmanager
    def listen(self, attn):
        def keep(attr):
            def hook(_module, _inputs, output):
                if getattr(self, attr) is None:
                    setattr(self, attr, output)
            return hook

        def keep_head_out(_module, inputs):
            if self.head_out is None:
                self.head_out = inputs[0]

        handles = [
            attn.to_q.register_forward_hook(keep("query")),
            attn.to_k.register_forward_hook(keep("key")),
            attn.to_v.register_forward_hook(keep("value")),
            attn.to_out[0].register_forward_pre_hook(keep_head_out),
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


class _Tapping:
    """Shared call logic: run the output path, listening only when the capture wants this layer."""

    capture = None
    layer: str = ""

    def _run(self, output_path, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs):
        if not self.capture.wants(self.layer):
            return output_path(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        tap = ProjectionTap()
        with tap.listen(attn):
            out = output_path(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        self.capture.record(self.layer, attn, tap, attention_mask)
        return out


class GoCAAttnProcessor2_0(_Tapping, AttnProcessor2_0):
    """`AttnProcessor2_0` whose output is the parent's, with the GoCA capture on a side path."""

    def __init__(self, capture, layer: str, original: AttnProcessor2_0 | None = None):
        super().__init__()
        self.capture, self.layer = capture, layer
        self.original = original if original is not None else AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        return self._run(super().__call__, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class GoCAWrappedProcessor(_Tapping, torch.nn.Module):
    """Wraps a custom processor (IP-Adapter, a user's own): it still runs, and its weights stay registered modules."""

    def __init__(self, inner, capture, layer: str):
        super().__init__()
        self.inner = inner
        self.capture, self.layer = capture, layer

    @property
    def original(self):
        return self.inner

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        return self._run(self.inner, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        # Attention calls `processor(...)` directly; skip nn.Module's hook machinery, which processors never use.
        return self.forward(*args, **kwargs)


def wrap_processor(original, capture, layer: str):
    """The GoCA processor that stands for `original` on `layer`."""
    if type(original) is AttnProcessor2_0:
        return GoCAAttnProcessor2_0(capture, layer, original)
    return GoCAWrappedProcessor(original, capture, layer)


def is_goca_processor(proc) -> bool:
    return isinstance(proc, _Tapping)


def unwrap_processor(proc):
    """The processor a GoCA processor stands for (a pipeline made by `from_pipe` shares its modules' processors)."""
    while is_goca_processor(proc):
        proc = proc.original
    return proc
