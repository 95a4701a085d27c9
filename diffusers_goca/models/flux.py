"""FluxTransformer2DModel: Flux.1 [dev] / [schnell].

`FluxAttention` modules with `FluxAttnProcessor` (through `dispatch_attention_fn`): text first, RoPE on the whole
sequence, one softmax. 19 double-stream blocks (text projected by `add_*_proj`) and 38 single-stream blocks (text and
image concatenated before the call, `encoder_hidden_states=None`: the text length comes from the denoiser pre-hook).
Single blocks have no `to_out`: their attention output goes through the block's `proj_out` (its first `dim` columns).
Reference: image tokens of the attention output of the official code's `vit-block27`, whose numbering runs on from
the 19 double blocks into the single blocks: single block 8. Refinement: double blocks 12 and 18, k = 2. The official
vanilla reads blocks 8, 28 and 47 of that running numbering (double 8, single 9 and 28) for its maps and refinement.
A model of another depth gets the same relative depths. Latents are packed 2×2: the token grid comes from `img_ids`.
Flux Kontext appends a reference image's tokens (`img_ids` first coordinate 1) to the generated image's: they share
the softmax, so they take part in the text shares, and the maps and grids are the generated image's.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .base import Adapter, JointInputs, LayerInfo, OutputProjection, call_default, relative_block

_NAME = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn$")
_REFERENCE_SINGLE, _SINGLE_DEPTH = 8, 38
_REFINE_DOUBLE, _DOUBLE_DEPTH = (12, 18), 19
_VANILLA_DOUBLE, _VANILLA_SINGLE = (8,), (9, 28)


class FluxAdapter(Adapter):
    family = "flux"
    denoiser_class = "FluxTransformer2DModel"
    segment_timestep = None
    flow_matching = True
    # The official extractor: img2img at strength 0.15 with the default shift, and guidance_scale=1 (not dev's 3.5).
    segment_steps, segment_strength, segment_guidance = 28, 0.15, 1.0
    cfg_batch = False  # guidance distilled into the model; true CFG runs the unconditional call apart

    def __init__(self, pipe):
        super().__init__(pipe)
        model = pipe.transformer
        for name, _module in model.named_modules():
            m = _NAME.match(name)
            if m:
                self.layers[name] = LayerInfo(name, "joint", f"{m.group(1)}.{m.group(2)}", 1)
        n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
        if n_single:
            self.reference_layer = (
                f"single_transformer_blocks.{relative_block(_REFERENCE_SINGLE, n_single, _SINGLE_DEPTH)}.attn"
            )
        else:
            self.reference_layer = f"transformer_blocks.{n_double - 1}.attn"
        self.refinement_layers = list(
            dict.fromkeys(
                f"transformer_blocks.{relative_block(i, n_double, _DOUBLE_DEPTH)}.attn" for i in _REFINE_DOUBLE
            )
        )
        self.refine_order = 2
        vanilla = [f"transformer_blocks.{relative_block(i, n_double, _DOUBLE_DEPTH)}.attn" for i in _VANILLA_DOUBLE]
        if n_single:
            vanilla += [
                f"single_transformer_blocks.{relative_block(i, n_single, _SINGLE_DEPTH)}.attn" for i in _VANILLA_SINGLE
            ]
        self.vanilla_layers = self.vanilla_refinement_layers = list(dict.fromkeys(vanilla))
        # FluxPipeline fixes its default size at 1024 px; the VAE's config says the size the model was made for
        # (Flux.1's: 1024; the toy Flux's: 32).
        vae = getattr(pipe, "vae", None)
        self.native_resolution = (
            getattr(vae.config, "sample_size", None) if vae is not None else None
        ) or pipe.default_sample_size * pipe.vae_scale_factor
        # The pipeline's default (512), or the T5 tokenizer's own limit where it is shorter (the toy Flux: 32 tokens,
        # the length it was trained with).
        self.text_max_length = min(
            call_default(type(pipe), "max_sequence_length", 512),
            getattr(getattr(pipe, "tokenizer_2", None), "model_max_length", 512) or 512,
        )

    def tokenizer(self):
        return self.pipe.tokenizer_2  # the transformer attends to the T5 tokens; CLIP gives only the pooled vector

    def call_prompt(self, args, call_kwargs):
        prompt_2 = call_kwargs.get("prompt_2")  # what T5 encodes, when given
        return super().call_prompt(args, call_kwargs) if prompt_2 is None else prompt_2

    def denoiser_latent_hw(self, args, kwargs):
        ids = kwargs["img_ids"]
        # One copy (one wait for the device), then host arithmetic: no torch operator per value read.
        ids = (ids[0] if ids.ndim == 3 else ids).cpu().float().numpy()
        generated = ids[:, 0] == 0  # Kontext's reference image: first coordinate 1
        n = int(generated.sum())
        h, w = int(ids[:n, 1].max()) + 1, int(ids[:n, 2].max()) + 1
        if not generated[:n].all() or h * w != n:
            raise ValueError(
                f"img_ids: expected the generated image's {n} tokens first, as an h×w grid (first "
                f"coordinate 0), then any reference image's"
            )
        return h, w

    def image_hw(self, latent_hw):
        return tuple(s * self.pipe.vae_scale_factor * 2 for s in latent_hw)

    def forwards_per_step(self, call_kwargs):
        negative = call_kwargs.get("negative_prompt") is not None or (
            call_kwargs.get("negative_prompt_embeds") is not None
            and call_kwargs.get("negative_pooled_prompt_embeds") is not None
        )
        return 2 if call_kwargs.get("true_cfg_scale", 1.0) > 1 and negative else 1  # cond, then uncond

    def scheduler_timestep(self, t: float) -> float:
        return t * 1000  # the pipeline calls the transformer with timestep / 1000

    def attention_scale(self, attn):
        return attn.head_dim**-0.5

    def joint_inputs(self, layer, attn, tap, call_kwargs, step):
        from diffusers.models.embeddings import apply_rotary_emb

        def split(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        def normed(out, raw, norm):  # the norm's output in the forward, where the tap saw it
            return out if out is not None else norm(split(raw))

        t, n = step.text_len, step.latent_hw[0] * step.latent_hw[1]  # text, then the generated image (, reference)
        q, k = normed(tap.normed_query, tap.query, attn.norm_q), normed(tap.normed_key, tap.key, attn.norm_k)
        if tap.added_key is not None:  # double stream: the text is projected apart and goes first; its queries
            k = torch.cat([normed(tap.normed_added_key, tap.added_key, attn.norm_added_k), k], 1)  # are not read
            v_txt = split(tap.added_value)
        else:  # single stream: text and image tokens in one sequence
            q, v_txt = q[:, t:], split(tap.value)[:, :t]
        q = q[:, :n]
        rope = call_kwargs.get("image_rotary_emb")
        if rope is not None:
            image_rope = tuple(f[t : t + n] for f in rope) if isinstance(rope, tuple) else rope[t : t + n]
            q, k = apply_rotary_emb(q, image_rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
        other = k[:, t + n :].flatten(2) if k.shape[1] > t + n else None
        return JointInputs(q.flatten(2), k[:, t : t + n].flatten(2), k[:, :t].flatten(2), v_txt.flatten(2), other)

    def output_projection(self, layer, attn):
        if isinstance(getattr(attn, "to_out", None), torch.nn.ModuleList):
            return OutputProjection(attn.to_out[0])
        return OutputProjection(self.submodule(layer.rsplit(".", 1)[0]).proj_out, attn.inner_dim)

    def reference_feature(self, layer, tap, output, step):
        out = output[0] if isinstance(output, tuple) else output
        image = out[:, step.text_len :] if out.shape[1] > step.text_len and tap.added_key is None else out
        return image[:, : step.latent_hw[0] * step.latent_hw[1]]  # not Kontext's reference image

    def encode_segment_prompt(self, prompt, device):
        """(T5 states [1, L, C], CLIP's pooled embedding, text ids)."""
        return self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=self.text_max_length,
        )

    def segment_forward(self, latents, prompt, timestep, generator, guidance_scale=None):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        pipe, model = self.pipe, self.pipe.transformer
        b, c, h, w = latents.shape
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(device)
        packed, noise = (pipe._pack_latents(x, b, c, h, w) for x in (latents, noise))
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, latents.dtype)
        embeds, pooled, text_ids = self.segment_encoding(prompt, device)
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        steps = self.segment_steps
        cfg = sched.config
        mu = calculate_shift(
            packed.shape[1],
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
        if timestep is None:  # as FluxImg2ImgPipeline.get_timesteps at the official strength
            t = sched.timesteps[int(max(steps - min(steps * self.segment_strength, steps), 0))]
        else:
            t = torch.tensor(float(timestep), device=device)
        noisy = self.flow_noised(packed, noise, t)
        guidance_scale = self.segment_guidance if guidance_scale is None else guidance_scale
        guidance = torch.full([b], float(guidance_scale), device=device) if model.config.guidance_embeds else None
        out = model(
            hidden_states=noisy.to(model.dtype),
            timestep=t.reshape(1).expand(b) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )
        return out[0], noise - packed  # the flow's velocity, in the packed layout

    def error_map(self, prediction, target, latents):
        # packed [1, (h/2)(w/2), 4C]: each token is a 2 × 2 patch of the latent grid, in row-major order
        return (prediction.float() - target.float()).pow(2).mean(-1)[0].reshape(self.error_map_grid(latents))

    def error_map_grid(self, latents):
        return latents.shape[-2] // 2, latents.shape[-1] // 2
