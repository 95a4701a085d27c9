"""SD3Transformer2DModel: Stable Diffusion 3 / 3.5.

Every `JointTransformerBlock` has one joint attention `attn` (`JointAttnProcessor2_0`): image tokens first, then
77 CLIP + 256 T5 text tokens, one softmax, no mask. SD 3.5's extra image-only `attn2` is left untouched.
Reference and refinement blocks: docs/official_code.md names none for SD3, so the PixArt rule at the same relative depth
(reference 13/28 of the depth, refinement 10–17 of 28), k = 2. Seg4Diff reads block 9.
"""

from __future__ import annotations

import re

import torch

from .base import Adapter, JointInputs, LayerInfo, relative_block

_NAME = re.compile(r"^transformer_blocks\.(\d+)\.attn$")
_REFERENCE, _REFINE, _DEPTH, _SEG4DIFF = 13, range(10, 18), 28, 9
_CLIP_TOKENS = 77


def split_heads_norm(x: torch.Tensor, heads: int, norm, normed: torch.Tensor | None = None) -> torch.Tensor:
    """A per-head norm (RMSNorm over the head dim, or None) of [B, n, heads·d], in the same layout: `normed`, the
    norm's own output in the forward ([B, heads, n, d]), where the tap saw it, else computed here."""
    if norm is None:
        return x
    if normed is not None:
        return normed.transpose(1, 2).flatten(2)  # a view: the norm kept its input's [B, n, heads, d] memory order
    b, n, hd = x.shape
    return norm(x.view(b, n, heads, hd // heads)).reshape(b, n, hd)


class SD3Adapter(Adapter):
    family = "sd3"
    denoiser_class = "SD3Transformer2DModel"
    segment_timestep = None
    flow_matching = True
    segment_steps, segment_from_end = 28, 8  # Seg4Diff: FlowMatch, 28 steps, the 8th timestep from the end
    shared_clip_positions = True  # CLIP-L ⊕ CLIP-G features at each of the 77 CLIP positions

    def __init__(self, pipe):
        super().__init__(pipe)
        model = pipe.transformer
        depth = len(model.transformer_blocks)
        for name, _module in model.named_modules():
            m = _NAME.match(name)
            if m:
                self.layers[name] = LayerInfo(
                    name, "joint", f"transformer_blocks.{m.group(1)}", model.config.patch_size
                )
        self.map_factor = model.config.patch_size
        self.reference_layer = f"transformer_blocks.{relative_block(_REFERENCE, depth, _DEPTH)}.attn"
        self.refinement_layers = list(
            dict.fromkeys(f"transformer_blocks.{relative_block(i, depth, _DEPTH)}.attn" for i in _REFINE)
        )
        self.refine_order = 2
        self.seg4diff_layer = f"transformer_blocks.{min(_SEG4DIFF, depth - 1)}.attn"
        self.native_resolution = model.config.sample_size * pipe.vae_scale_factor
        self.t5_length = 256

    def token_index(self, prompt, classes, extra_entities=(), max_length=None, require_classes=True, part_texts=()):
        from ..tokens import concat_token_indices, token_index

        t5_length = max_length or self.t5_length
        has_t5 = getattr(self.pipe, "tokenizer_3", None) is not None  # without T5 its part of the sequence is zeros
        t5_text = part_texts[0] if part_texts else prompt
        # A class past the 77 CLIP tokens is read from the T5 part alone, and with a prompt_3 of its own a class may
        # be in either text; it must have tokens in one of them.
        apart = has_t5 and t5_text != prompt
        clip = token_index(
            self.pipe.tokenizer,
            prompt,
            classes,
            max_length=_CLIP_TOKENS,
            extra_entities=extra_entities,
            require_classes=require_classes,
            allow_cut_off=has_t5,
            allow_absent=apart,
        )
        if not has_t5:
            return concat_token_indices([clip], [_CLIP_TOKENS + t5_length])
        t5 = token_index(
            self.pipe.tokenizer_3,
            t5_text,
            classes,
            max_length=t5_length,
            extra_entities=extra_entities,
            require_classes=require_classes,
            allow_cut_off=True,
            allow_absent=apart,
        )
        return concat_token_indices([clip, t5], [_CLIP_TOKENS, t5_length])

    def part_texts(self, call_kwargs, i, n):
        t5 = call_kwargs.get("prompt_3")  # what T5 encodes, when given; its tokens follow the 77 CLIP positions
        if t5 is None:
            return ()
        if isinstance(t5, str):
            return (t5,)
        if len(t5) != n:
            raise ValueError(f"prompt_3 has {len(t5)} texts for {n} prompts")
        return (t5[i],)

    def guidance_forward(self, args, kwargs):
        return kwargs.get("skip_layers") is not None  # skip-layer guidance: a cond-only call with blocks left out

    def joint_inputs(self, layer, attn, tap, call_kwargs, step):
        h = attn.heads
        return JointInputs(
            split_heads_norm(tap.query, h, attn.norm_q, tap.normed_query),
            split_heads_norm(tap.key, h, attn.norm_k, tap.normed_key),
            split_heads_norm(tap.added_key, h, attn.norm_added_k, tap.normed_added_key),
            tap.added_value,
        )

    def encode_segment_prompt(self, prompt, device):
        """(joint text states [1, 77 + L, C], pooled embedding)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled

    def segment_forward(self, latents, prompt, timestep, generator, guidance_scale=None):
        pipe, model = self.pipe, self.pipe.transformer
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(self.segment_steps, device=latents.device)
        t = sched.timesteps[-self.segment_from_end] if timestep is None else torch.tensor(float(timestep))
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        noisy = self.flow_noised(latents, noise, t)
        embeds, pooled = self.segment_encoding(prompt, latents.device)
        out = model(
            hidden_states=noisy.to(model.dtype),
            timestep=t.reshape(1).to(latents.device),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )
        return out[0], noise - latents  # the flow's velocity
