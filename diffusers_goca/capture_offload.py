"""Host offload of a capture: a self (or joint) layer's queries and keys go to host memory once those held on the
accelerator would pass the capture's budget (copied on a side CUDA stream, overlapping the forward), and come back
one layer at a time for the reductions (`brought_back`, overlapping them)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .step_capture import SelfQK


def brought_back(selfs: list[SelfQK], row: int):
    """Yields `qk.image(row)` for each of `selfs` in order. For layers offloaded from a CUDA device, the next layer's
    host→device copies run on a side stream while the caller reduces the current one, so that the copies overlap
    the reductions instead of waiting in line with them."""
    side = None

    def start(qk: SelfQK):
        nonlocal side
        if qk.device is None or qk.device.type != "cuda":
            return qk.image(row), None
        side = side or torch.cuda.Stream(qk.device)
        side.wait_stream(torch.cuda.current_stream(qk.device))
        with torch.cuda.stream(side):
            inputs = qk.image(row)
        return inputs, side.record_event()

    upcoming = start(selfs[0]) if selfs else None
    for i, qk in enumerate(selfs):
        inputs, copied = upcoming
        if i + 1 < len(selfs):
            upcoming = start(selfs[i + 1])
        if copied is not None:
            main = torch.cuda.current_stream(qk.device)
            main.wait_event(copied)
            for t in inputs.values():
                if torch.is_tensor(t):
                    t.record_stream(main)  # made on the side stream, read on this one: not reused before that
        yield inputs


class HostOffload:
    """The offload part of `Capture`: stores each self (or joint) layer's inputs in its `step`, on the host past the
    `offload_above` bytes budget, the copies on the CUDA stream `_stream`; `_join_copies` makes the forward's stream
    wait for them."""

    def _keep_self(self, layer: str, qk: SelfQK) -> None:
        """Store a self layer's inputs, on the host when the accelerator-side ones would pass the budget."""
        step = self.step
        size = sum(t.numel() * t.element_size() for t in qk.tensors())
        device = qk.query.device
        resident = sum(
            t.numel() * t.element_size() for s in step.selfs.values() if s.device is None for t in s.tensors()
        )
        if device.type != "cpu" and self.offload_above is not None and resident + size > self.offload_above:
            with self._copy_stream(device) as moved:
                qk.query, qk.key = moved(qk.query), moved(qk.key)
                if qk.image_mass is not None:
                    qk.image_mass = moved(qk.image_mass)
            qk.device = device
        step.selfs[layer] = qk

    @contextmanager
    def _copy_stream(self, device: torch.device):
        """Yields `moved(t)`: t copied to (pinned) host memory. On CUDA the copies run on a side stream, so that they
        overlap the forward's own kernels instead of waiting in line with them; `stop` joins that stream."""
        if device.type != "cuda":
            yield lambda t: t.to("cpu", non_blocking=True)
            return
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))  # the tensors are complete

        def moved(t):
            t.record_stream(self._stream)  # its memory is not reused before the copy has read it
            return t.to("cpu", non_blocking=True)

        with torch.cuda.stream(self._stream):
            yield moved

    def _join_copies(self) -> None:
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
