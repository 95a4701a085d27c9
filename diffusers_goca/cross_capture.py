"""The cross-attention part of a capture (SD, SDXL, PixArt): a layer's head-aggregated image→text maps, from the
queries and keys of its attention call, the attention mask as a bias."""

from __future__ import annotations

import torch

from .functional.aggregation import aggregate_heads, head_weights
from .functional.self_attention import compute_dtype, logits


class CrossCapture:
    """The cross-attention part of `Capture`: the maps of one cross layer's call into its `step` ("average": the head
    mean; "auto": weighted by each head's share of the output, where the processor saw that output)."""

    def _record_cross(self, layer, attn, tap, q, k, attention_mask) -> None:
        step, heads = self.step, attn.heads
        r, n, inner = q.shape
        d = inner // heads
        # The keys that can carry probability: all, unless a mask covers the text's padding past `text_keys`.
        t = k.shape[1] if step.text_keys is None or attention_mask is None else min(step.text_keys, k.shape[1])
        if attention_mask is not None:
            bias = step.take(self._key_bias(attn, attention_mask, k.shape[1], tap.query.shape[0]))[..., :t]
        k = k[:, :t]
        if step.extra_text is not None:  # words outside the prompt: their keys after the prompt's, on the side path
            text = step.extra_text.to(device=k.device, dtype=k.dtype)
            extra = attn.to_k(attn.norm_encoder_hidden_states(text) if attn.norm_cross else text)
            k = torch.cat([k, extra.expand(r, -1, -1)], 1)
            if attention_mask is not None:
                bias = torch.nn.functional.pad(bias, (0, extra.shape[1]))
            t = k.shape[1]
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
                step.unmasked_past_text_keys.append((step.take(bias)[..., step.text_keys :] > -1000).any())
        return cache[2]
