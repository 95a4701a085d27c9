"""UNet2DConditionModel: Stable Diffusion 1.x / 2.x (incl. 768-v) and SDXL.

Every `Transformer2DModel` block holds attn1 (self) and attn2 (cross). Grids: down_blocks.i at 1/2^i of the latent,
the mid block at the coarsest level, up_blocks.i mirrored. Reference and refinement layers follow docs/official_code.md
(docs/method.md lists them per family).
"""

from __future__ import annotations

import re

import torch

from .base import Adapter, LayerInfo

_NAME = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn1|attn2)$|"
    r"^mid_block\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn1|attn2)$"
)


def _attn(path: str, attention: int, block: int, which: str) -> str:
    return f"{path}.attentions.{attention}.transformer_blocks.{block}.{which}"


class UNetAdapter(Adapter):
    family = "unet"
    denoiser_class = "UNet2DConditionModel"
    denoiser_attr = "unet"

    @classmethod
    def supports(cls, pipe) -> bool:
        return super().supports(pipe) and cls.text_tokenizer(pipe) is not None

    @staticmethod
    def text_tokenizer(pipe):
        # SDXL's refiner has only the second (OpenCLIP) tokenizer: the same BPE tokens, so the same positions.
        return getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)

    def tokenizer(self):
        return self.text_tokenizer(self.pipe)

    def __init__(self, pipe):
        super().__init__(pipe)
        unet = pipe.unet
        self.is_sdxl = unet.config.addition_embed_type == "text_time"
        # SDXL's two CLIP encoders; the refiner has only the second, which encodes `prompt` (prompt_2 goes unread).
        self.shared_clip_positions = all(getattr(pipe, n, None) is not None for n in ("text_encoder", "text_encoder_2"))
        n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
        from diffusers.models.attention_processor import Attention

        for name, module in unet.named_modules():
            m = _NAME.match(name)
            if not m or not isinstance(module, Attention):
                continue
            if m.group(1):
                level = int(m.group(2)) if m.group(1) == "down_blocks" else n_up - 1 - int(m.group(2))
                which = m.group(5)
            else:
                level, which = n_down - 1, m.group(8)
            role = "cross" if which == "attn2" and module.is_cross_attention else "self"
            self.layers[name] = LayerInfo(name, role, name.rsplit(".", 1)[0], 2**level)
        if not self.cross_layers:
            kinds = sorted({type(p).__name__ for p in unet.attn_processors.values()})
            raise ValueError(
                "GoCA reads the cross-attention (attn2) of the UNet's transformer blocks, and this UNet has "
                f"none (its attention processors: {', '.join(kinds) or 'none'}); layouts such as "
                "DeepFloyd IF's added-KV attention are not supported"
            )
        # The map grid is the finest grid with cross-attention (64×64 for SD 1.5 at 512 px and SDXL at 1024 px).
        self.map_factor = min(self.layers[n].factor for n in self.cross_layers)
        self.native_resolution = unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8)
        self.reference_layer = self._reference_layer()
        self.refinement_layers = self._refinement_layers()
        self.manual_layers = self._manual_layers()
        self.refine_order = 2

    @property
    def scfg_layers(self) -> list[str]:
        # S-CFG's own segmenter: the 16×16 and 8×8 layers at SD 1.5's 512 px (two down, the mid, three up); a UNet
        # without levels that coarse (SDXL) uses its coarsest cross-attention level.
        coarse = min(4 * self.map_factor, max(self.layers[n].factor for n in self.cross_layers))
        return [n for n in self.cross_layers if self.layers[n].factor >= coarse]

    def _up_cross(self, factor: int) -> list[str]:
        return [n for n in self.cross_layers if n.startswith("up_blocks.") and self.layers[n].factor == factor]

    def _reference_layer(self) -> str:
        # SD 1.x/2.x: up_blocks.2.attentions.1 (the 1/2-resolution up level, second attention);
        # SDXL: up_blocks.1.attentions.0 block 0 (its 1/2-resolution up level, first attention).
        if self.is_sdxl:
            return self._up_cross(self.map_factor)[0]
        candidates = self._up_cross(2 * self.map_factor) or self._up_cross(self.map_factor)
        blocks0 = [n for n in candidates if n.endswith("transformer_blocks.0.attn2")]
        return blocks0[1] if len(blocks0) > 1 else blocks0[0]

    def _refinement_layers(self) -> list[str]:
        finest = self.map_factor
        selfs = [n for n, i in self.layers.items() if i.role == "self" and i.factor == finest]
        up = [n for n in selfs if n.startswith("up_blocks.")]
        down = [n for n in selfs if n.startswith("down_blocks.")]
        if self.is_sdxl:
            # up attentions 0 and 1 (blocks 0, 1), attention 2 (block 0); the first down attention (blocks 0, 1).
            ub = up[0].split(".")[1] if up else None
            db = down[0].split(".")[1] if down else None
            wanted = [_attn(f"up_blocks.{ub}", a, b, "attn1") for a, b in ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0))]
            wanted += [_attn(f"down_blocks.{db}", 0, b, "attn1") for b in (0, 1)]
            return [n for n in wanted if n in self.layers]

        # SD 1.x/2.x: the first two up attentions and the last down attention of the finest level.
        def attention_index(n: str) -> int:
            return int(n.split(".")[3])

        up_first = [n for n in up if attention_index(n) in (0, 1) and ".transformer_blocks.0." in n]
        down_last = [n for n in down if ".transformer_blocks.0." in n][-1:]
        return up_first + down_last

    def _manual_layers(self) -> list[str]:
        # SD 1.5's hand-picked set: every cross layer at 1/4 resolution and coarser, plus the first two up attentions of
        # the 1/2 level (down_blocks.2, mid, up_blocks.1, up_blocks.2 attentions 0–1 at 512 px). Other layouts: the same rule.
        coarse = [n for n in self.cross_layers if self.layers[n].factor >= 4 * self.map_factor]
        half = [n for n in self._up_cross(2 * self.map_factor) if int(n.split(".")[3]) in (0, 1)]
        return coarse + half

    # -- segmentation of an existing image (docs/official_code.md) --------------------------------------------------------------
    def time_ids(self, latents, dtype):
        """SDXL's micro-conditioning for an uncropped image at the latents' size: (size, crop (0, 0), size), or with
        the refiner's aesthetic score (size, crop, 6.0: the pipelines' default), as the pipelines build it. Built here,
        not by the pipeline's `_get_add_time_ids`, whose signature differs between SDXL pipeline classes."""
        size = (latents.shape[-2] * self.pipe.vae_scale_factor, latents.shape[-1] * self.pipe.vae_scale_factor)
        last = (6.0,) if self.pipe.config.get("requires_aesthetics_score", False) else size
        return torch.tensor([[*size, 0, 0, *last]], dtype=dtype, device=latents.device)

    def steps_run(self, call_kwargs, steps):
        """SDXL's pipelines also cut the schedule at `denoising_start` / `denoising_end` (fractions of the training
        timesteps), as they compute it: the timesteps below / at or above the cutoff."""
        start, end = call_kwargs.get("denoising_start"), call_kwargs.get("denoising_end")
        steps = super().steps_run(call_kwargs, steps)
        if start is None and end is None:
            return steps
        schedule = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        schedule.set_timesteps(steps)
        timesteps = schedule.timesteps
        total = schedule.config.num_train_timesteps
        if isinstance(start, float) and 0 < start < 1:
            timesteps = timesteps[timesteps < int(round(total - start * total))]
        if isinstance(end, float) and 0 < end < 1:
            timesteps = timesteps[timesteps >= int(round(total - end * total))]
        return len(timesteps)

    def encode_segment_prompt(self, prompt, device):
        """(text states [1, 77, C], SDXL's pooled embedding or None)."""
        if self.is_sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return embeds, pooled
        return self.pipe.encode_prompt(prompt, device, 1, False)[0], None

    def cross_text_states(self, text: str):
        with torch.no_grad():
            return self.segment_encoding(text, self.pipe._execution_device)[0]

    def segment_forward(self, latents, prompt, timestep, generator, guidance_scale=None):
        unet = self.pipe.unet
        noisy, t, target = self.ddpm_noised(latents, timestep, generator)
        kwargs = {}
        embeds, pooled = self.segment_encoding(prompt, latents.device)
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": self.time_ids(latents, embeds.dtype)}
        out = unet(noisy.to(unet.dtype), t, encoder_hidden_states=embeds.to(unet.dtype), return_dict=False, **kwargs)
        return out[0], target
