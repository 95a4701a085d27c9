"""The joint-attention part of a capture (SD3, Flux): image and text keys in one softmax, so a layer's maps come
with each query's share of the softmax on the text (and on the image, for the refinement)."""

from __future__ import annotations

from .functional.joint import joint_text_attention
from .step_capture import JointText, SelfQK, StepCapture, batched


class JointCapture:
    """The joint-attention part of `Capture`: a joint layer's call is read through the adapter's `joint_inputs`; on
    the reference grid its text keys and values are held to the end of the forward (`Capture.stop`), where one fused
    call per image gives its layer weight and text shares, else its maps are made in the call."""

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
            inputs["q"],
            inputs["k"],
            text.key[row],
            text.value[row],
            qk.heads,
            qk.scale,
            out_weight,
            self.head_weighting,
            step.column_index(inputs["q"].device),
            text_share,
            k_other=None if text.other_key is None else text.other_key[row],
        )
        step.degenerate_masks.append(bad)
        return mass, maps["average"], maps["auto"], maps["average mass"], maps["auto mass"]

    def _store_joint(self, step: StepCapture, layer: str, qk: SelfQK, per_row: list) -> None:
        masses, avgs, autos, avg_text, auto_text = (batched(parts) for parts in zip(*per_row))
        step.cross[layer] = {"average": avgs, "auto": autos, "average mass": avg_text, "auto mass": auto_text}
        qk.image_mass = masses.to(qk.query.device, non_blocking=True)
        if layer not in step.selfs:
            self._keep_self(layer, qk)
