"""The capture: what one denoiser forward leaves behind for the GoCA formulas, and nothing more (ARCHITECTURE, memory).

Per cross (or joint) layer: the head-aggregated image→text maps C_l [R, N_l, T] (auto-weighted and head-mean); for the
reference layer its feature F [R, N_ref, C]; per self (or joint) layer its image queries and keys [R, N_l, C] in the
model dtype, plus for joint layers the share of each query's softmax that falls on image keys [R, heads, N_l]. Everything that needs
[N, N] scores is reduced after the forward in row chunks (no [heads, N, N] tensor is ever formed).
R = the batch rows segmented (the conditional half of a CFG batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .functional.aggregation import aggregate_heads, head_weights
from .functional.joint import joint_text_attention


@dataclass
class SelfQK:
    query: torch.Tensor  # [R, N, C]
    key: torch.Tensor  # [R, N, C]
    heads: int
    scale: float
    grid: tuple[int, int]
    image_mass: torch.Tensor | None = None  # [R, heads, N] joint attention: share of the softmax on image keys

    def image(self, row: int) -> dict:
        """Keyword arguments of the self-attention reductions for one captured image."""
        return dict(q=self.query[row], k=self.key[row], heads=self.heads, scale=self.scale,
                    image_mass=None if self.image_mass is None else self.image_mass[row])


@dataclass
class StepCapture:
    """Everything captured in one denoiser forward, for rows `rows` of its batch."""

    latent_hw: tuple[int, int]
    rows: list[int]
    text_len: int | None = None
    head_weighting: str = "auto"  # how the "auto" maps were weighted over heads
    cross: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer → {"auto", "average"}: [R, N, T]
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)
    selfs: dict[str, SelfQK] = field(default_factory=dict)
    reference: torch.Tensor | None = None  # [R, N_ref, C]
    reference_grid: tuple[int, int] | None = None
    degenerate_pixels: int = 0  # pixels where the (text) output ≈ 0, whose head weights fell back to 1/H

    def nbytes(self) -> int:
        """Bytes held by the capture (the accounting that bounds its memory)."""
        tensors = [t for maps in self.cross.values() for t in maps.values()]
        tensors += [t for s in self.selfs.values() for t in (s.query, s.key, s.image_mass) if t is not None]
        tensors += [self.reference] if self.reference is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)


class Capture:
    """Receives projections from the GoCA processors while active; `start` / `stop` bracket one denoiser forward."""

    def __init__(self, adapter, head_weighting: str = "auto"):
        self.adapter = adapter
        self.head_weighting = head_weighting
        self.step: StepCapture | None = None

    @property
    def active(self) -> bool:
        return self.step is not None

    def wants(self, layer: str) -> bool:
        return self.step is not None and layer in self.adapter.layers

    def start(self, latent_hw: tuple[int, int], rows: list[int], text_len: int | None = None) -> None:
        self.step = StepCapture(tuple(latent_hw), list(rows), text_len, self.head_weighting)

    def stop(self) -> StepCapture | None:
        step, self.step = self.step, None
        return step

    def record(self, layer: str, attn, tap, attention_mask, output, call_kwargs: dict) -> None:
        info = self.adapter.layers[layer]
        if tap.query is None or tap.key is None:
            raise RuntimeError(
                f"GoCA could not read the queries and keys of {layer}: its processor "
                f"({type(attn.processor).__name__}) does not call to_q / to_k (fused projections are not supported)"
            )
        step = self.step
        rows = torch.tensor(step.rows, device=tap.query.device)
        if info.role == "joint":
            self._record_joint(layer, attn, tap, output, call_kwargs, rows)
        else:
            q, k = tap.query.index_select(0, rows), tap.key.index_select(0, rows)
            grid = step.grids[layer] = self.adapter.grid(layer, q.shape[1], step.latent_hw)
            if info.role == "self":
                step.selfs[layer] = SelfQK(q.detach(), k.detach(), attn.heads, attn.scale, grid)
            else:
                self._record_cross(layer, attn, tap, q, k, rows, attention_mask)
                if layer == self.adapter.reference_layer:
                    step.reference, step.reference_grid = q.detach(), grid

    def _record_cross(self, layer, attn, tap, q, k, rows, attention_mask) -> None:
        heads = attn.heads
        r, n, inner = q.shape
        d = inner // heads
        qh = q.float().view(r, n, heads, d).transpose(1, 2)
        kh = k.float().view(r, k.shape[1], heads, d).transpose(1, 2)
        scores = qh @ kh.transpose(-1, -2) * attn.scale  # [R, heads, N, T]
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[1], tap.query.shape[0])
            mask = mask.view(tap.query.shape[0], heads, -1, mask.shape[-1]).index_select(0, rows)
            scores = scores + mask.float()
        probs = scores.softmax(-1)
        maps = {"average": probs.mean(1)}
        if tap.head_out is not None:
            weight = attn.to_out[0].weight
            w, degenerate = head_weights(
                tap.head_out.index_select(0, rows), weight, heads, self.head_weighting, return_degenerate=True
            )
            self.step.degenerate_pixels += int(degenerate.sum())
            maps["auto"] = aggregate_heads(probs, w)
        else:
            maps["auto"] = maps["average"]
        self.step.cross[layer] = maps

    def _record_joint(self, layer, attn, tap, output, call_kwargs, rows) -> None:
        step, adapter = self.step, self.adapter
        q, k, k_txt, v_txt = (t.index_select(0, rows) for t in adapter.joint_inputs(layer, attn, tap, call_kwargs, step))
        grid = step.grids[layer] = adapter.grid(layer, q.shape[1], step.latent_hw)
        heads, scale = attn.heads, adapter.attention_scale(attn)
        weight = adapter.output_weight(layer, attn)
        masses, avgs, autos = [], [], []
        for i in range(len(rows)):
            mass, maps, bad = joint_text_attention(q[i], k[i], k_txt[i], v_txt[i], heads, scale, weight, self.head_weighting)
            masses.append(mass)
            avgs.append(maps["average"])
            autos.append(maps["auto"])
            step.degenerate_pixels += bad
        step.cross[layer] = {"average": torch.stack(avgs), "auto": torch.stack(autos)}
        step.selfs[layer] = SelfQK(q.detach(), k.detach(), heads, scale, grid, torch.stack(masses))
        if layer == adapter.reference_layer:
            step.reference = adapter.reference_feature(layer, tap, output, step).index_select(0, rows).detach()
            step.reference_grid = grid
