"""What one captured denoiser forward holds (`StepCapture`) and its parts: a self (or joint) layer's queries and keys
(`SelfQK`), a joint layer's text keys and values held to the end of the forward (`JointText`), and an image's
reference attention (`Reference`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .functional.aggregation import pseudo_self_attention
from .functional.self_attention import reference_weights
from .models.base import OutputProjection


@dataclass
class SelfQK:
    """A self (or joint) layer's captured image queries and keys, with what its reductions read of the layer."""

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

        return dict(
            q=back(self.query[row]),
            k=back(self.key[row]),
            heads=self.heads,
            scale=self.scale,
            image_mass=None if self.image_mass is None else back(self.image_mass[row]),
        )

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.query, self.key, self.image_mass) if t is not None]


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
    pseudo_attention: str = (
        "official-code"  # the A_p of the joint layers' weights taken in the forward (layer_weight_terms)
    )
    columns: list[int] | None = None  # token positions kept in the maps (None: all)
    text_keys: int | None = None  # leading text keys read by the cross maps (None: all; see Capture.start)
    # [1, E, C]: the states of words outside the prompt (a background word during generation), as the cross layers
    # read text; each cross layer appends their keys after its `text_keys` on the side path (see Capture.start).
    extra_text: torch.Tensor | None = None
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
    layer_weight_terms: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # joint layer → [R] w_l before normalising
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
            raise RuntimeError(
                f"the attention mask leaves text keys past the prompt's {self.text_keys} tokens "
                f"unmasked: capture with text_keys=None"
            )

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
