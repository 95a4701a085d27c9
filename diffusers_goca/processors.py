"""Drop-in attention processors that return exactly what the processor they stand for returns.

The output path is the parent's own code (`AttnProcessor2_0`, `JointAttnProcessor2_0`, `FluxAttnProcessor`, or the
wrapped custom processor); the maps are read on a side path: forward hooks on the projections (`to_q`, `to_k`, `to_v`,
and `add_*_proj` for joint attention) and a pre-hook on `to_out[0]` see the tensors the output path computes anyway, and
hand them to the capture. When the capture does not want the layer, no hook is set at all.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

try:  # diffusers ≥ 0.35
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
except ImportError:  # pragma: no cover
    FluxAttnProcessor = None

_PROJECTIONS = {
    "to_q": "query",
    "to_k": "key",
    "to_v": "value",
    "add_q_proj": "added_query",
    "add_k_proj": "added_key",
    "add_v_proj": "added_value",
    # The per-head norms of joint attention (SD 3.5, Flux): their outputs, so that the capture does not
    # compute them again. In the layout the processor gives them (SD3 [B, heads, N, d], Flux [B, N, heads, d]).
    "norm_q": "normed_query",
    "norm_k": "normed_key",
    "norm_added_k": "normed_added_key",
}
# Fused projections (`fuse_qkv_projections()`): one output that the processor splits into equal parts along the width.
_FUSED_PROJECTIONS = {
    "to_qkv": ("query", "key", "value"),
    "to_kv": ("key", "value"),
    "to_added_qkv": ("added_query", "added_key", "added_value"),
}


class ProjectionTap:
    """The first output of each projection (and per-head norm; split into its parts for a fused projection), and the
    first input and output of `to_out[0]`, in one attention call."""

    def __init__(self):
        for attr in _PROJECTIONS.values():
            setattr(self, attr, None)
        self.head_out = None  # the attention output before `to_out[0]`: [B, N, heads·d]
        self.projected = None  # what `to_out[0]` made of it: [B, N, D]

    @contextmanager
    def listen(self, attn):
        def keep(attr):
            def hook(_module, _inputs, output):
                if getattr(self, attr) is None:
                    setattr(self, attr, output)

            return hook

        def keep_parts(attrs):
            def hook(_module, _inputs, output):
                for attr, part in zip(attrs, output.split(output.shape[-1] // len(attrs), dim=-1)):
                    if getattr(self, attr) is None:
                        setattr(self, attr, part)

            return hook

        def keep_head_out(_module, inputs):
            if self.head_out is None:
                self.head_out = inputs[0]

        def keep_projected(_module, _inputs, output):
            if self.projected is None:
                self.projected = output

        handles = [
            getattr(attn, name).register_forward_hook(keep(attr))
            for name, attr in _PROJECTIONS.items()
            if isinstance(getattr(attn, name, None), torch.nn.Module)
        ]
        handles += [
            getattr(attn, name).register_forward_hook(keep_parts(attrs))
            for name, attrs in _FUSED_PROJECTIONS.items()
            if isinstance(getattr(attn, name, None), torch.nn.Module)
        ]
        if isinstance(getattr(attn, "to_out", None), torch.nn.ModuleList):
            handles.append(attn.to_out[0].register_forward_pre_hook(keep_head_out))
            handles.append(attn.to_out[0].register_forward_hook(keep_projected))
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
        return self._run_capturing(
            output_path, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
        )

    @torch.compiler.disable  # hooks and Python-side storage: run eagerly inside a compiled denoiser
    def _run_capturing(self, output_path, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs):
        tap = ProjectionTap()
        with tap.listen(attn):
            out = output_path(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        self.capture.record(self.layer, attn, tap, attention_mask, out, kwargs)
        return out


class _DropIn(_Tapping):
    """A subclass of one of diffusers' processors: the parent's `__call__` is the output path."""

    def __init__(self, capture, layer: str, original):
        super().__init__()
        self.capture, self.layer, self.original = capture, layer, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        return self._run(super().__call__, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class GoCAAttnProcessor2_0(_DropIn, AttnProcessor2_0):
    """`AttnProcessor2_0` whose output is the parent's, with the GoCA capture on a side path."""


class GoCAJointAttnProcessor2_0(_DropIn, JointAttnProcessor2_0):
    """`JointAttnProcessor2_0` (SD3) whose output is the parent's, with the GoCA capture on a side path."""


if FluxAttnProcessor is not None:

    class GoCAFluxAttnProcessor(_DropIn, FluxAttnProcessor):
        """`FluxAttnProcessor` whose output is the parent's (the same `dispatch_attention_fn` call, with the original's
        attention backend and parallel config), with the GoCA capture on a side path."""

        def __init__(self, capture, layer: str, original):
            super().__init__(capture, layer, original)
            self._attention_backend = original._attention_backend
            self._parallel_config = original._parallel_config

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            # FluxAttention passes image_rotary_emb positionally; name it so the capture can apply the same RoPE.
            return self._run(
                FluxAttnProcessor.__call__.__get__(self),
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                image_rotary_emb=image_rotary_emb,
            )


class GoCAWrappedProcessor(_Tapping, torch.nn.Module):
    """Wraps a custom processor (IP-Adapter, a user's own): it still runs, and its weights stay registered modules."""

    def __init__(self, inner, capture, layer: str):
        super().__init__()
        self.inner = inner
        self.capture, self.layer = capture, layer
        # The attention module passes on only the cross-attention kwargs that `processor.__call__` names (IP-Adapter's
        # `ip_adapter_masks`, Flux IP-Adapter's `ip_hidden_states`, a custom processor's own): name the inner's.
        call = functools.partial(type(self).__call__, self)
        call.__signature__ = inspect.signature(inner.__call__)
        object.__setattr__(self, "__call__", call)

    @property
    def original(self):
        return self.inner

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        names = list(inspect.signature(self.inner.__call__).parameters)[4 : 4 + len(args)]
        if args and len(names) == len(args) and not set(names) & set(kwargs):
            # Named, so that the capture reads them as it does the drop-ins' (FluxAttention passes image_rotary_emb
            # positionally: unnamed, a wrapped Flux processor's maps were computed without RoPE).
            args, kwargs = (), {**dict(zip(names, args)), **kwargs}
        return self._run(self.inner, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        # Attention calls `processor(...)` directly; skip nn.Module's hook machinery, which processors never use.
        return self.forward(*args, **kwargs)


_DROP_IN = {AttnProcessor2_0: GoCAAttnProcessor2_0, JointAttnProcessor2_0: GoCAJointAttnProcessor2_0}
if FluxAttnProcessor is not None:
    _DROP_IN[FluxAttnProcessor] = GoCAFluxAttnProcessor


def wrap_processor(original, capture, layer: str):
    """The GoCA processor that stands for `original` on `layer`: a drop-in subclass for diffusers' default processors,
    a wrapper for anything else."""
    drop_in = _DROP_IN.get(type(original))
    if drop_in is not None:
        return drop_in(capture, layer, original)
    return GoCAWrappedProcessor(original, capture, layer)


def is_goca_processor(proc) -> bool:
    return isinstance(proc, _Tapping)


def unwrap_processor(proc):
    """The processor a GoCA processor stands for (a pipeline made by `from_pipe` shares its modules' processors)."""
    while is_goca_processor(proc):
        proc = proc.original
    return proc
