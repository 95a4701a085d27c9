"""PixArtTransformer2DModel: PixArt-α and PixArt-Σ.

Each `BasicTransformerBlock` holds attn1 (self) and attn2 (cross, T5 text with the padding mask as an additive bias).
All layers share one token grid, the latent after patching. Reference block 13, refinement blocks 10–17, k = 5; the
official vanilla reads the cross maps of blocks 10–17 too (of 28 blocks; a model of another depth gets the same
relative positions).
"""

from __future__ import annotations

import re

import torch

from .base import Adapter, LayerInfo, call_default, relative_block

_NAME = re.compile(r"^transformer_blocks\.(\d+)\.(attn1|attn2)$")
_REFERENCE, _REFINE, _DEPTH = 13, range(10, 18), 28


class PixArtAdapter(Adapter):
    family = "pixart"
    denoiser_class = "PixArtTransformer2DModel"
    text_padding_masked = True

    def __init__(self, pipe):
        super().__init__(pipe)
        model = pipe.transformer
        patch = model.config.patch_size
        depth = len(model.transformer_blocks)
        for name, _module in model.named_modules():
            m = _NAME.match(name)
            if m:
                role = "self" if m.group(2) == "attn1" else "cross"
                self.layers[name] = LayerInfo(name, role, f"transformer_blocks.{m.group(1)}", patch)

        self.map_factor = patch
        self.reference_layer = f"transformer_blocks.{relative_block(_REFERENCE, depth, _DEPTH)}.attn2"
        self.refinement_layers = list(
            dict.fromkeys(f"transformer_blocks.{relative_block(i, depth, _DEPTH)}.attn1" for i in _REFINE)
        )
        self.refine_order = 5
        # The official vanilla reads the cross maps of the refinement blocks only.
        self.vanilla_layers = list(
            dict.fromkeys(f"transformer_blocks.{relative_block(i, depth, _DEPTH)}.attn2" for i in _REFINE)
        )
        self.native_resolution = model.config.sample_size * pipe.vae_scale_factor
        # PixArt-α encodes 120 T5 tokens, PixArt-Σ 300: the default of the pipeline's `max_sequence_length`.
        self.text_max_length = call_default(type(pipe), "max_sequence_length", 120)

    def output_resize(self, call_kwargs):
        # Resolution binning (the pipelines' default) generates at the nearest bin of the requested aspect ratio, then
        # resizes and centre-crops the decoded image to the requested size; latents are returned at the bin's size.
        if not call_kwargs.get("use_resolution_binning", True) or call_kwargs.get("output_type") == "latent":
            return None
        height = call_kwargs.get("height") or self.native_resolution
        width = call_kwargs.get("width") or self.native_resolution

        def resize(scores):
            if tuple(scores.shape[-2:]) == (height, width):
                return scores
            return self.pipe.image_processor.resize_and_crop_tensor(scores[None], width, height)[0]

        return resize

    def prompt_text(self, prompt: str, call_kwargs: dict) -> str:
        # The pipeline cleans captions (when bs4 / ftfy are installed) before tokenizing: index the text it encodes.
        return self.pipe._text_preprocessing(prompt, clean_caption=call_kwargs.get("clean_caption", True))[0]

    def segment_text(self, prompt: str) -> str:
        return self.prompt_text(prompt, {"clean_caption": False})  # as `segment_forward` encodes it (lower case)

    def encode_segment_prompt(self, prompt, device):
        """(T5 states [1, L, C], their padding mask [1, L])."""
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            device=device,
            clean_caption=False,
            max_sequence_length=self.text_max_length,
        )
        return embeds, mask

    def cross_text_states(self, text: str):
        model = self.pipe.transformer
        with torch.no_grad():
            embeds, _ = self.segment_encoding(text, self.pipe._execution_device)
            return model.caption_projection(embeds.to(model.dtype))  # what every block's cross-attention reads

    def segment_forward(self, latents, prompt, timestep, generator, guidance_scale=None):
        pipe, model = self.pipe, self.pipe.transformer
        noisy, t, target = self.ddpm_noised(latents, timestep, generator)
        embeds, mask = self.segment_encoding(prompt, latents.device)
        added = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:
            h, w = latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor
            added = {
                "resolution": torch.tensor([[h, w]], device=latents.device, dtype=embeds.dtype),
                "aspect_ratio": torch.tensor([[h / w]], device=latents.device, dtype=embeds.dtype),
            }
        out = model(
            noisy.to(model.dtype),
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return out[:, : latents.shape[1]], target  # a learned variance fills the other half of the channels
