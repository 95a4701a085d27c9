"""The capture: what one denoiser forward leaves behind for the GoCA formulas, and nothing more (ARCHITECTURE, memory).

Per cross (or joint) layer: the head-aggregated image→text maps C_l [R, N_l, T'] (auto-weighted and head-mean) over
the T' token positions the request reads (all T when it does not say); for the reference layer its feature
F [R, N_ref, C]; per self (or joint) layer its image queries and keys [R, N_l, C] in the model dtype, plus for joint
layers the share of each query's softmax that falls on image keys [R, heads, N_l]. Everything that needs [N, N] scores
is reduced after the forward in row chunks (no [heads, N, N] tensor is ever formed).
R = the batch rows segmented (the conditional half of a CFG batch).

Offload: once the queries and keys held on an accelerator would pass `offload_above` bytes, further layers' are
copied to host memory as they arrive (on a side CUDA stream, overlapping the forward) and brought back one layer at a
time when reduced (`brought_back`: the next layer's copies overlap the current one's reductions). That keeps the
accelerator-side capture bounded when the reference layer comes late (Flux: single block 8 of 38, after 27 of the
57 attention layers).
"""

from __future__ import annotations

import torch

from .capture_offload import HostOffload, brought_back
from .cross_capture import CrossCapture
from .functional.self_attention import CHUNK_ELEMENTS, joint_frobenius_with_reference
from .joint_capture import JointCapture
from .step_capture import SelfQK, StepCapture, batched


class Capture(CrossCapture, JointCapture, HostOffload):
    """Receives projections from the GoCA processors while active; `start` / `stop` bracket one denoiser forward.
    Each layer's call is recorded by its role: the cross maps (`CrossCapture`), joint layers (`JointCapture`), and a
    self layer's queries and keys, kept within the offload budget (`HostOffload`)."""

    def __init__(self, adapter, head_weighting: str = "auto", offload_above: int | None = 256 * 2**20):
        self.adapter = adapter
        self.head_weighting = head_weighting
        self.offload_above = offload_above  # None: never offload
        self.step: StepCapture | None = None
        self._stream = None  # CUDA stream of the offload copies

    @property
    def active(self) -> bool:
        return self.step is not None

    def wants(self, layer: str) -> bool:
        return self.step is not None and layer in self.adapter.layers

    def start(
        self,
        latent_hw: tuple[int, int],
        rows: list[int],
        text_len: int | None = None,
        columns: list[int] | None = None,
        text_keys: int | None = None,
        pseudo_attention: str = "official-code",
        extra_text: torch.Tensor | None = None,
    ) -> None:
        """Capture the next forward's rows `rows`, keeping the maps' token `columns` (None: all). text_keys: where the
        text's padding is masked, the number of leading text keys that may be unmasked (the longest captured
        prompt's tokens); the cross maps are computed over those keys only, the rest carrying no probability.
        pseudo_attention: the A_p formula of the layer weights that joint layers take in the forward. extra_text:
        [1, E, C] text states whose keys the cross maps append after the text keys read (at positions `text_keys` …
        `text_keys` + E − 1, or after all keys), as if their words ended the prompt; the forward never sees them."""
        rows = list(rows)
        if rows != list(range(rows[0], rows[0] + len(rows))):
            raise ValueError(f"the captured rows must be a contiguous range of the batch, got {rows}")
        if text_keys is not None and columns is not None and max(columns, default=0) >= text_keys:
            raise ValueError(
                f"token columns {sorted(c for c in columns if c >= text_keys)} lie past the {text_keys} text keys read"
            )
        self.step = StepCapture(
            tuple(latent_hw),
            rows,
            text_len,
            self.head_weighting,
            pseudo_attention,
            None if columns is None else sorted(set(columns)),
            text_keys,
            extra_text=extra_text,
        )

    @torch.no_grad()  # the side path never needs gradients, and under grad its maps would hold the forward's graph
    def stop(self) -> StepCapture | None:
        """End of the denoiser forward: finish the joint layers held for it and hand the capture over."""
        step, self.step = self.step, None
        self._join_copies()
        if step is not None and step.pending:
            self._finish_joint(step)
        return step

    def abandon(self) -> None:
        """Drop the capture of a forward that did not complete."""
        self.step = None
        self._join_copies()

    @torch.no_grad()
    def record(self, layer: str, attn, tap, attention_mask, output, call_kwargs: dict) -> None:
        info = self.adapter.layers[layer]
        if tap.query is None or tap.key is None:
            raise RuntimeError(
                f"GoCA could not read the queries and keys of {layer}: its processor ({type(attn.processor).__name__}) "
                f"does not project them through to_q / to_k (or the fused to_qkv / to_kv)"
            )
        step = self.step
        if info.role == "joint":
            self._record_joint(layer, attn, tap, output, call_kwargs)
            return
        reference = layer == self.adapter.reference_layer
        q, k = step.take(tap.query, keep=info.role == "self" or reference), step.take(tap.key, keep=info.role == "self")
        grid = step.grids[layer] = self.adapter.grid(layer, q.shape[1], step.latent_hw)
        if info.role == "self":
            self._keep_self(layer, SelfQK(q.detach(), k.detach(), attn.heads, attn.scale, grid))
            return
        self._record_cross(layer, attn, tap, q, k, attention_mask)
        if reference:
            step.reference, step.reference_grid = q.detach(), grid

    def _finish_joint(self, step: StepCapture) -> None:
        """Per image, one fused call per held joint layer gives its layer weight (before normalising) and its queries'
        text shares (`joint_frobenius_with_reference`); its maps follow from those shares, while the layer's queries
        and keys are back on the device. Without the reference feature, the maps take the shares from their own call."""
        if step.reference is None:
            for layer, text in step.pending.items():
                self._joint_maps(step, layer, step.selfs[layer], text)
            step.pending.clear()
            return
        held = [step.selfs[layer] for layer in step.pending]
        per_row = {layer: [] for layer in step.pending}
        terms = {layer: [] for layer in step.pending}
        for row in range(len(step.rows)):
            reference = step.reference_of(row)
            for (layer, text), qk, inputs in zip(step.pending.items(), held, brought_back(held, row)):
                term, share = joint_frobenius_with_reference(
                    inputs["q"],
                    inputs["k"],
                    text.key[row],
                    qk.heads,
                    qk.scale,
                    qk.grid,
                    reference.attention,
                    reference.grid,
                    prepared=reference.on(qk.grid),
                )
                terms[layer].append(term)
                per_row[layer].append(self._joint_row(step, qk, text, row, inputs, share))
        for (layer, text), qk in zip(step.pending.items(), held):
            self._store_joint(step, layer, qk, per_row[layer])
            step.layer_weight_terms[layer] = batched(terms[layer])
        step.pending.clear()


def memory_plan(
    adapter,
    latent_hw: tuple[int, int],
    n_columns: int,
    text_len: int,
    dtype_bytes: int = 2,
    rows: int = 1,
    offload_above: int | None = 256 * 2**20,
    accelerator: bool = True,
) -> dict[str, int]:
    """What one capture step holds, by the same rules as `Capture`, in bytes: `held` on the denoiser's device,
    `offloaded` to the host, and the largest `transient` working set (in the forward or in the reductions after it).
    Works on a meta-device model, so the plan of a 12B model costs nothing.

    n_columns: token columns kept (`len(TokenIndex.needed())`); text_len: the text keys each cross / joint layer sees;
    dtype_bytes: the model dtype's size.
    """
    chunk = 3 * CHUNK_ELEMENTS * 4  # fp32 scores of one row chunk, their exponentials and a product
    held = offloaded = resident_qk = largest_qk = n_ref = largest_self = pending = 0
    forward_transient = 0
    buffers = {}  # per self grid, shared by its layers' fused calls: one bias chunk and the marker values
    for name, info in adapter.layers.items():
        attn = adapter.submodule(name)
        h, w = adapter.layer_hw(name, latent_hw)
        n, inner, heads = h * w, attn.to_q.out_features, attn.heads
        if info.role == "cross":  # softmax over the text keys for all heads at once, fp32
            held += rows * 2 * n * n_columns * 4
            forward_transient = max(forward_transient, 3 * rows * heads * n * text_len * 4)
        if info.role == "joint":  # the keys and the text-indicator values of the fused call, plus row chunks
            held += rows * 2 * n * (n_columns + 1) * 4  # two maps and their text masses
            forward_transient = max(forward_transient, 2 * (n + text_len) * inner * dtype_bytes + chunk)
            if adapter.on_reference_grid(name):  # its text keys and values are held to the end of the forward
                pending += rows * 2 * text_len * inner * dtype_bytes
        if info.role in ("self", "joint"):
            qk = rows * 2 * n * inner * dtype_bytes
            largest_self = max(largest_self, n)
            held += rows * heads * n * 4 if info.role == "joint" else 0
            largest_qk = max(largest_qk, qk)
            keys = 2 * n + (text_len if info.role == "joint" else 0)
            buffers[n] = max(buffers.get(n, 0), (CHUNK_ELEMENTS + keys * inner) * dtype_bytes)
            if accelerator and offload_above is not None and resident_qk + qk > offload_above:
                offloaded += qk
            else:
                held, resident_qk = held + qk, resident_qk + qk
        if name == adapter.reference_layer:
            held += rows * n * inner * dtype_bytes
            n_ref = n
    # After the forward, the layer weights: A_p, log(A_p B) and its resize, each grid's buffers (kept while later
    # grids are reduced) and one layer's doubled keys; then the refinement: S at the map grid and explicit row chunks.
    # Plus one offloaded layer brought back, and the joint layers' text keys and values held to the end of the forward.
    map_h, map_w = adapter.map_grid(latent_hw)
    layer_weights = n_ref * n_ref * 4 + 2 * n_ref * largest_self * 4 + sum(buffers.values()) + largest_qk // rows
    refinement = (map_h * map_w) ** 2 * 4 + chunk
    after = max(layer_weights, refinement) + (largest_qk // rows if offloaded else 0)
    return {"held": held, "offloaded": offloaded, "transient": max(forward_transient, after) + pending}
