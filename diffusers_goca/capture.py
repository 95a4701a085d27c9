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

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .functional.aggregation import aggregate_heads, head_weights, pseudo_self_attention
from .functional.joint import joint_text_attention
from .functional.self_attention import (
    CHUNK_ELEMENTS, compute_dtype, joint_frobenius_with_reference, logits, reference_weights,
)
from .models.base import OutputProjection


@dataclass
class SelfQK:
    query: torch.Tensor  # [R, N, C]
    key: torch.Tensor  # [R, N, C]
    heads: int
    scale: float
    grid: tuple[int, int]
    image_mass: torch.Tensor | None = None  # [R, heads, N] joint attention: share of the softmax on image keys
    device: torch.device | None = None  # where reductions run, when the tensors were offloaded to the host

    def image(self, row: int) -> dict:
        """Keyword arguments of the self-attention reductions for one captured image (on the compute device)."""
        def back(t):
            return t if self.device is None else t.to(self.device, non_blocking=True)

        return dict(q=back(self.query[row]), k=back(self.key[row]), heads=self.heads, scale=self.scale,
                    image_mass=None if self.image_mass is None else back(self.image_mass[row]))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.query, self.key, self.image_mass) if t is not None]


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


@dataclass
class JointText:
    """A joint layer's text keys and values [R, T, C], held from its attention call to the end of the forward, where
    one fused call per image gives both its layer weight and each query's text share. other_key [R, T_o, C]: keys
    of the same softmax that are neither the image's nor the text's (Flux Kontext's reference image); a layer with
    them is finished in its attention call, not held."""

    key: torch.Tensor
    value: torch.Tensor
    out_projection: OutputProjection
    other_key: torch.Tensor | None = None


class Reference:
    """One image's pseudo self-attention A_p and, per layer grid, what the layer weights read from it
    (`reference_weights`), each made on first use."""

    def __init__(self, feature: torch.Tensor, grid: tuple[int, int], mode: str = "official-code"):
        self.feature, self.grid, self.mode = feature, grid, mode
        self._attention = None
        self._on_grid = {}

    @property
    def attention(self) -> torch.Tensor:
        if self._attention is None:
            self._attention = pseudo_self_attention(self.feature, self.mode)  # [N_ref, N_ref]
        return self._attention

    def on(self, grid: tuple[int, int], row_stride: int = 1):
        if (grid, row_stride) not in self._on_grid:
            self._on_grid[grid, row_stride] = reference_weights(self.attention, grid, self.grid, row_stride)
        return self._on_grid[grid, row_stride]


@dataclass
class StepCapture:
    """Everything captured in one denoiser forward, for rows `rows` of its batch."""

    latent_hw: tuple[int, int]
    rows: list[int]
    text_len: int | None = None
    head_weighting: str = "auto"  # how the "auto" maps were weighted over heads
    pseudo_attention: str = "official-code"  # the A_p of the joint layers' weights taken in the forward (layer_weight_terms)
    columns: list[int] | None = None  # token positions kept in the maps (None: all)
    text_keys: int | None = None  # leading text keys read by the cross maps (None: all; see Capture.start)
    # layer → {"auto", "average"}: [R, N, T'] maps; joint layers also {"auto mass", "average mass"}: [R, N], each
    # pixel's map summed over all T text tokens (its text share), for the L1 sum over the columns not kept.
    cross: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)
    selfs: dict[str, SelfQK] = field(default_factory=dict)
    reference: torch.Tensor | None = None  # [R, N_ref, C]
    reference_grid: tuple[int, int] | None = None
    # Per layer, the bool masks of the pixels whose (text) output ≈ 0, so their head weights fell back to 1/H. Kept
    # as they come: counting them per layer would cost a kernel launch each, and reading a count on the host in the
    # forward would make the host wait for the device.
    degenerate_masks: list[torch.Tensor] = field(default_factory=list)
    layer_weight_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # joint layer → [R] w_l before normalising
    pending: dict[str, JointText] = field(default_factory=dict)  # joint layers finished at the end of the forward
    key_bias: tuple | None = field(default=None, repr=False)  # (mask, its shape key, fp32 bias): see Capture._key_bias
    # Per distinct mask, a device bool: a text key past `text_keys` was unmasked in a captured row. Checked when the
    # results are read, on the host already (`check_text_keys`).
    unmasked_past_text_keys: list[torch.Tensor] = field(default_factory=list)
    _columns: dict = field(default_factory=dict, repr=False)  # device → `columns` as an index tensor

    @property
    def degenerate_pixels(self) -> int:
        """Pixels (summed over layers and rows) whose head weights fell back to 1/H, their output being ≈ 0."""
        if not self.degenerate_masks:
            return 0
        return int(torch.cat([m.flatten() for m in self.degenerate_masks]).sum())

    def check_text_keys(self) -> None:
        """RuntimeError if a text key the cross maps did not read (past `text_keys`) was unmasked: the maps would miss
        its probability. Reads device flags: call it where the host waits for the results anyway."""
        if self.unmasked_past_text_keys and bool(torch.stack([f.cpu() for f in self.unmasked_past_text_keys]).any()):
            raise RuntimeError(f"the attention mask leaves text keys past the prompt's {self.text_keys} tokens "
                               f"unmasked: capture with text_keys=None")

    def nbytes(self, device: str | None = None) -> int:
        """Bytes held by the capture (the accounting that bounds its memory), optionally only those on `device`'s
        type ("cuda", "cpu")."""
        tensors = [t for maps in self.cross.values() for t in maps.values()]
        tensors += [t for s in self.selfs.values() for t in s.tensors()]
        tensors += [self.reference] if self.reference is not None else []
        tensors += [t for text in self.pending.values() for t in (text.key, text.value)]
        return sum(t.numel() * t.element_size() for t in tensors if device is None or t.device.type == device)

    def take(self, t: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """Rows `rows` (a contiguous range) of a batch tensor [B, ...], without a kernel: the tensor itself when they
        are all of it, else a view of the range, copied only when `keep` (a kept view would hold on to the whole
        batch's memory)."""
        first, end = self.rows[0], self.rows[-1] + 1
        if first == 0 and end == t.shape[0]:
            return t
        return t[first:end].clone() if keep else t[first:end]

    def column_index(self, device: torch.device) -> torch.Tensor | None:
        """`columns` as an index tensor on `device` (None: all columns). Made once per forward, not in every attention
        call; the copy does not wait for the device's queue."""
        if self.columns is None:
            return None
        if device not in self._columns:
            self._columns[device] = torch.tensor(self.columns).to(device, non_blocking=True)
        return self._columns[device]

    def reference_of(self, row: int, pseudo_attention: str | None = None) -> Reference:
        """Row `row`'s reference; pseudo_attention: its A_p's formula (default: the capture's)."""
        return Reference(self.reference[row], self.reference_grid, pseudo_attention or self.pseudo_attention)

    def index(self, index):
        """A TokenIndex over this capture's maps (positions → kept columns)."""
        return index if self.columns is None else index.on_columns(self.columns)


def batched(per_row) -> torch.Tensor:
    """The per-image tensors of a capture as one [R, ...] tensor (a view, without a copy, for a single image)."""
    return per_row[0][None] if len(per_row) == 1 else torch.stack(per_row)


class Capture:
    """Receives projections from the GoCA processors while active; `start` / `stop` bracket one denoiser forward."""

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

    def start(self, latent_hw: tuple[int, int], rows: list[int], text_len: int | None = None,
              columns: list[int] | None = None, text_keys: int | None = None, pseudo_attention: str = "official-code") -> None:
        """Capture the next forward's rows `rows`, keeping the maps' token `columns` (None: all). text_keys: where the
        text's padding is masked, the number of leading text keys that may be unmasked (the longest captured
        prompt's tokens); the cross maps are computed over those keys only, the rest carrying no probability.
        pseudo_attention: the A_p formula of the layer weights that joint layers take in the forward."""
        rows = list(rows)
        if rows != list(range(rows[0], rows[0] + len(rows))):
            raise ValueError(f"the captured rows must be a contiguous range of the batch, got {rows}")
        if text_keys is not None and columns is not None and max(columns, default=0) >= text_keys:
            raise ValueError(f"token columns {sorted(c for c in columns if c >= text_keys)} lie past the {text_keys} "
                             f"text keys read")
        self.step = StepCapture(tuple(latent_hw), rows, text_len, self.head_weighting, pseudo_attention,
                                None if columns is None else sorted(set(columns)), text_keys)

    def _keep_self(self, layer: str, qk: SelfQK) -> None:
        """Store a self layer's inputs, on the host when the accelerator-side ones would pass the budget."""
        step = self.step
        size = sum(t.numel() * t.element_size() for t in qk.tensors())
        device = qk.query.device
        resident = sum(t.numel() * t.element_size() for s in step.selfs.values() if s.device is None for t in s.tensors())
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

    def _record_cross(self, layer, attn, tap, q, k, attention_mask) -> None:
        step, heads = self.step, attn.heads
        r, n, inner = q.shape
        d = inner // heads
        # The keys that can carry probability: all, unless a mask covers the text's padding past `text_keys`.
        t = k.shape[1] if step.text_keys is None or attention_mask is None else min(step.text_keys, k.shape[1])
        if attention_mask is not None:
            bias = step.take(self._key_bias(attn, attention_mask, k.shape[1], tap.query.shape[0]))[..., :t]
        k = k[:, :t]
        qh = q.view(r, n, heads, d).transpose(1, 2).reshape(r * heads, n, d)
        kh = k.reshape(r, t, heads, d).permute(0, 2, 3, 1).reshape(r * heads, d, t)
        scores = logits(qh, kh, compute_dtype(q), attn.scale).view(r, heads, n, t)  # [R, heads, N, T]
        if attention_mask is not None:
            scores += bias
        probs = scores.softmax(-1)
        columns = step.column_index(probs.device)
        if columns is not None:
            probs = probs.index_select(-1, columns)
        maps = {"average": probs.mean(1)}
        if tap.head_out is not None:
            projection = self.adapter.output_projection(layer, attn)
            head_out = step.take(tap.head_out)
            out = step.take(tap.projected)  # the forward's own projection of head_out, bias removed
            bias = projection.bias(like=head_out)
            out = out if bias is None else out - bias
            weight = None if self.head_weighting == "average" else projection.weight(like=head_out)
            w, degenerate = head_weights(head_out, weight, heads, self.head_weighting, return_degenerate=True, out=out)
            step.degenerate_masks.append(degenerate)
            maps["auto"] = aggregate_heads(probs, w)
        else:
            maps["auto"] = maps["average"]
        self.step.cross[layer] = maps

    def _key_bias(self, attn, attention_mask, keys: int, batch: int) -> torch.Tensor:
        """The attention mask as the fp32 bias of the scores [B, heads, 1 or N, T]. Made once per forward for all
        the layers that get the same mask (every cross layer, in the models that mask the text)."""
        step = self.step
        cache = step.key_bias
        if cache is None or cache[0] is not attention_mask or cache[1] != (attn.heads, keys, batch):
            mask = attn.prepare_attention_mask(attention_mask, keys, batch)  # [B·heads, 1 or N, T]
            bias = mask.view(batch, attn.heads, -1, mask.shape[-1]).float()
            cache = step.key_bias = (attention_mask, (attn.heads, keys, batch), bias)
            if step.text_keys is not None and step.text_keys < keys:  # masked: a bias of -10000 (any large negative)
                step.unmasked_past_text_keys.append((step.take(bias)[..., step.text_keys:] > -1000).any())
        return cache[2]

    def _record_joint(self, layer, attn, tap, output, call_kwargs) -> None:
        step, adapter = self.step, self.adapter
        inputs = adapter.joint_inputs(layer, attn, tap, call_kwargs, step)
        q, k, k_txt, v_txt = (step.take(t, keep=True).detach() for t in inputs[:4])
        k_other = None if inputs.other_key is None else step.take(inputs.other_key).detach()  # read in this call only
        grid = step.grids[layer] = adapter.grid(layer, q.shape[1], step.latent_hw)
        heads, scale = attn.heads, adapter.attention_scale(attn)
        text = JointText(k_txt, v_txt, adapter.output_projection(layer, attn), k_other)
        if layer == adapter.reference_layer:
            step.reference = step.take(adapter.reference_feature(layer, tap, output, step), keep=True).detach()
            step.reference_grid = grid
        if adapter.on_reference_grid(layer) and k_other is None:
            # On the reference grid the layer-weight call reads every query: it gives the text shares as well.
            step.pending[layer] = text
            self._keep_self(layer, SelfQK(q, k, heads, scale, grid))
            return
        self._joint_maps(step, layer, SelfQK(q, k, heads, scale, grid), text)

    def _joint_maps(self, step: StepCapture, layer: str, qk: SelfQK, text: JointText) -> None:
        """A joint layer's maps and image shares, one fused call per image for the text shares."""
        per_row = [self._joint_row(step, qk, text, row, qk.image(row)) for row in range(len(step.rows))]
        self._store_joint(step, layer, qk, per_row)

    def _joint_row(self, step: StepCapture, qk: SelfQK, text: JointText, row: int, inputs: dict, text_share=None):
        """(image share [heads, N], average map, auto map, average text mass, auto text mass) of one image of a joint
        layer; `inputs`: `qk.image(row)`."""
        out_weight = None if self.head_weighting == "average" else text.out_projection.weight(like=text.value)
        mass, maps, bad = joint_text_attention(
            inputs["q"], inputs["k"], text.key[row], text.value[row], qk.heads, qk.scale, out_weight,
            self.head_weighting, step.column_index(inputs["q"].device), text_share,
            k_other=None if text.other_key is None else text.other_key[row])
        step.degenerate_masks.append(bad)
        return mass, maps["average"], maps["auto"], maps["average mass"], maps["auto mass"]

    def _store_joint(self, step: StepCapture, layer: str, qk: SelfQK, per_row: list) -> None:
        masses, avgs, autos, avg_text, auto_text = (batched(parts) for parts in zip(*per_row))
        step.cross[layer] = {"average": avgs, "auto": autos, "average mass": avg_text, "auto mass": auto_text}
        qk.image_mass = masses.to(qk.query.device, non_blocking=True)
        if layer not in step.selfs:
            self._keep_self(layer, qk)

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
                    inputs["q"], inputs["k"], text.key[row], qk.heads, qk.scale, qk.grid, reference.attention,
                    reference.grid, prepared=reference.on(qk.grid))
                terms[layer].append(term)
                per_row[layer].append(self._joint_row(step, qk, text, row, inputs, share))
        for (layer, text), qk in zip(step.pending.items(), held):
            self._store_joint(step, layer, qk, per_row[layer])
            step.layer_weight_terms[layer] = batched(terms[layer])
        step.pending.clear()


def memory_plan(adapter, latent_hw: tuple[int, int], n_columns: int, text_len: int, dtype_bytes: int = 2,
                rows: int = 1, offload_above: int | None = 256 * 2**20, accelerator: bool = True) -> dict[str, int]:
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
