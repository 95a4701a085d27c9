"""Train the toy text-to-image model on CPU: a small VAE first, then a UNet and a CLIP text encoder jointly.

    python -m diffusers_goca.toyworld.train --out toy_runs/sd --steps 6000
    python -m diffusers_goca.toyworld.train --arch sd3 --vae-from toy_runs/sd --out toy_runs/sd3 --steps 3000
    python -m diffusers_goca.toyworld.train --arch pixart --blocks 6 --vae-from diffusers_goca/toyworld/model ...
    python -m diffusers_goca.toyworld.train --arch flux --vae-from diffusers_goca/toyworld/model ...

The result is a stock `StableDiffusionPipeline` folder (`save_pretrained`), rewritten every `--save-every` steps with
`training_log.json` (seed, wall time, loss curve) beside it, so an interrupted run still leaves a usable model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..clip_bpe import build_clip_tokenizer, small_clip_text_config
from .scenes import make_scene, scene_seeds


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
    )


def build_unet(cross_attention_dim: int = 64):
    from diffusers import UNet2DConditionModel

    # Cross-attention at 16×16 and 8×8 and in the 4×4 mid block; `attention_head_dim` is the head count here (diffusers' naming).
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        block_out_channels=(48, 96, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )


def build_text_encoder(hidden: int = 64):
    from transformers import CLIPTextModel

    return CLIPTextModel(small_clip_text_config(hidden))


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _scenes_tensor(seeds: list[int]) -> tuple[torch.Tensor, list[str]]:
    scenes = [make_scene(s) for s in tqdm(seeds, desc="drawing scenes", mininterval=5)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [s.caption for s in scenes]


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, generator: torch.Generator, log: dict) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=max(0.1, 3 / steps))
    vae.train()
    for step in tqdm(range(steps), desc="vae", mininterval=10):
        x = images[torch.randint(len(images), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            log["vae_loss"].append([step, round(loss.item(), 5)])
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


class SDRecipe:
    """A `StableDiffusionPipeline`: UNet + CLIP text encoder trained jointly, DDPM ε-prediction."""

    def __init__(self, vae, tokenizer):
        self.vae, self.tokenizer = vae, tokenizer
        self.unet, self.text_encoder = build_unet(), build_text_encoder()
        self.alphas = build_scheduler().alphas_cumprod

    @property
    def modules(self):
        return [self.unet, self.text_encoder]

    def loss(self, x0: torch.Tensor, captions: list[str], g: torch.Generator) -> torch.Tensor:
        ids = self.tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = self.alphas[t].view(-1, 1, 1, 1)
        cond = self.text_encoder(ids).last_hidden_state
        return F.mse_loss(
            self.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=cond).sample, noise
        )

    def pipeline(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            unet=self.unet,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler=build_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


class SD3Recipe:
    """A `StableDiffusion3Pipeline` in miniature (joint attention, two CLIP encoders, no T5), rectified flow.

    The text goes through the pipeline's own `encode_prompt`, so training sees exactly the layout inference sees.
    """

    def __init__(self, vae, tokenizer):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection

        def clip(hidden):
            return CLIPTextModelWithProjection(small_clip_text_config(hidden))

        self.transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=6,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=96,
            caption_projection_dim=64,
            pooled_projection_dim=96,
            pos_embed_max_size=16,
        )
        self.text_encoder, self.text_encoder_2 = clip(64), clip(32)
        self._pipe = StableDiffusion3Pipeline(
            transformer=self.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
            vae=vae,
            text_encoder=self.text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=build_clip_tokenizer(pad_token="!"),
            text_encoder_3=None,
            tokenizer_3=None,
        )

    @property
    def modules(self):
        return [self.transformer, self.text_encoder, self.text_encoder_2]

    def loss(self, x0, captions, g):
        embeds, _, pooled, _ = self._pipe.encode_prompt(
            captions, None, None, device=x0.device, do_classifier_free_guidance=False, max_sequence_length=256
        )
        noisy, sigma, target = flow_matching_sample(x0, g)
        pred = self.transformer(
            noisy, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigma * 1000
        ).sample
        return F.mse_loss(pred, target)

    def pipeline(self):
        return self._pipe


def build_t5_toy(tokenizer_words=None, d_model: int = 64):
    """The toy world's T5 encoder (2 layers × `d_model`) and its tokenizer (a unigram model over the world's words and
    common prompt words; 32 tokens, more than any toy caption takes)."""
    from transformers import T5Config, T5EncoderModel

    from ..t5_spm import build_t5_word_tokenizer
    from .scenes import BACKGROUNDS, COLOURS, SHAPES

    words = list(
        tokenizer_words
        or [
            *BACKGROUNDS,
            *COLOURS,
            *SHAPES,
            "a",
            "an",
            "the",
            "on",
            "with",
            "and",
            "of",
            "in",
            "photo",
            "background",
            "next",
            "to",
            "cat",
            "dog",
            "object",
            "thing",
        ]
    )
    tokenizer = build_t5_word_tokenizer(words, model_max_length=32)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=16,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config), tokenizer


def flow_matching_sample(x0: torch.Tensor, g: torch.Generator):
    """(noisy, sigma [B], velocity target) of rectified flow at logit-normal σ, as SD3 and Flux are trained."""
    sigma = torch.sigmoid(torch.randn(len(x0), generator=g))
    noise = torch.randn(x0.shape, generator=g)
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    return (1 - s) * x0 + s * noise, sigma, noise - x0


class PixArtRecipe:
    """A `PixArtSigmaPipeline` in miniature: cross-attention DiT (patch 1 on the 16×16 latent, so a 16×16 token grid),
    T5-style text with its padding mask, DDPM ε-prediction. `blocks` sets the depth (6 or 12 in the shipped runs)."""

    def __init__(self, vae, tokenizer, blocks: int = 6, width: int = 96):
        from diffusers import PixArtTransformer2DModel

        self.vae = vae
        self.text_encoder, self.tokenizer = build_t5_toy()
        heads = width // 16
        self.transformer = PixArtTransformer2DModel(
            sample_size=16,
            num_layers=blocks,
            patch_size=1,
            attention_head_dim=16,
            num_attention_heads=heads,
            caption_channels=self.text_encoder.config.d_model,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=width,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=False,
        )
        self.alphas = build_scheduler().alphas_cumprod

    @property
    def modules(self):
        return [self.transformer, self.text_encoder]

    def loss(self, x0, captions, g):
        text = self.tokenizer(captions, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        embeds = self.text_encoder(text.input_ids, attention_mask=text.attention_mask).last_hidden_state
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = self.alphas[t].view(-1, 1, 1, 1)
        pred = self.transformer(
            a.sqrt() * x0 + (1 - a).sqrt() * noise,
            encoder_hidden_states=embeds,
            encoder_attention_mask=text.attention_mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        return F.mse_loss(pred, noise)

    def pipeline(self):
        from diffusers import PixArtSigmaPipeline

        return PixArtSigmaPipeline(
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            vae=self.vae,
            transformer=self.transformer,
            scheduler=build_scheduler(),
        )


class FluxRecipe:
    """A `FluxPipeline` in miniature: double- and single-stream blocks with RoPE, latents packed 2×2 (an 8×8 token
    grid), T5-style text (32 tokens) and a CLIP pooled vector, rectified flow, no guidance embedding (as schnell)."""

    def __init__(self, vae, tokenizer, double: int = 2, single: int = 4, width: int = 96):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        self.text_encoder_2, tokenizer_2 = build_t5_toy()
        self.text_encoder = build_text_encoder()
        self.transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=double,
            num_single_layers=single,
            attention_head_dim=16,
            num_attention_heads=width // 16,
            joint_attention_dim=self.text_encoder_2.config.d_model,
            pooled_projection_dim=self.text_encoder.config.hidden_size,
            axes_dims_rope=(4, 6, 6),
            guidance_embeds=False,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        self._pipe = FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=self.text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=self.transformer,
        )

    @property
    def modules(self):
        return [self.transformer, self.text_encoder, self.text_encoder_2]

    def loss(self, x0, captions, g):
        pipe = self._pipe
        b, c, h, w = x0.shape
        embeds, pooled, text_ids = pipe.encode_prompt(captions, None, device=x0.device, max_sequence_length=32)
        packed = pipe._pack_latents(x0, b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)
        noisy, sigma, target = flow_matching_sample(packed, g)
        pred = self.transformer(
            hidden_states=noisy,
            timestep=sigma,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=img_ids,
        ).sample
        return F.mse_loss(pred, target)

    def pipeline(self):
        return self._pipe


RECIPES = {"sd": SDRecipe, "sd3": SD3Recipe, "pixart": PixArtRecipe, "flux": FluxRecipe}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", choices=sorted(RECIPES), default="sd")
    p.add_argument(
        "--blocks",
        type=int,
        default=6,
        help="pixart, flux: transformer blocks (flux: one third double-stream, "
        "two thirds single-stream, as Flux.1's 19 + 38)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument(
        "--vae-from", default=None, help="a trained toy pipeline folder whose VAE to reuse (no VAE training)"
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n-scenes", type=int, default=30000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument(
        "--save-dtype",
        choices=["float16", "float32"],
        default="float32",
        help="float32 (default) loads in the stock pipelines with no dtype given; a float16 folder must be "
        "loaded with torch_dtype set (transformers keeps the text encoder's stored dtype, diffusers does not)",
    )
    args = p.parse_args(argv)
    if args.steps < 10 or (args.vae_from is None and args.vae_steps < 10):
        p.error("--steps and --vae-steps must be at least 10: the one-cycle schedule needs room for its warm-up")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    log = {"seed": args.seed, "args": vars(args), "vae_loss": [], "loss": [], "torch_threads": torch.get_num_threads()}

    images, captions = _scenes_tensor(scene_seeds("train", args.n_scenes))
    if args.vae_from:
        from diffusers import AutoencoderKL

        from ..loading import dtype_kwargs

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", **dtype_kwargs(torch.float32)).eval()
        latents = encode_latents(vae, images) * vae.config.scaling_factor
    else:
        vae = build_vae()
        train_vae(vae, images, args.vae_steps, args.batch, g, log)
        latents = encode_latents(vae, images)
        vae.register_to_config(scaling_factor=1.0 / latents.std().item())
        latents = latents * vae.config.scaling_factor
    if vae.config.shift_factor is None:  # SD3 and Flux decode latents / scaling + shift: these latents have no shift
        vae.register_to_config(shift_factor=0.0)
    log["vae_seconds"] = round(time.time() - start, 1)
    log["scaling_factor"] = vae.config.scaling_factor

    depth = {
        "pixart": {"blocks": args.blocks},
        "flux": {"double": args.blocks // 3, "single": args.blocks - args.blocks // 3},
    }
    recipe = RECIPES[args.arch](vae, build_clip_tokenizer(), **depth.get(args.arch, {}))
    params = [q for m in recipe.modules for q in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.steps, pct_start=max(0.05, 3 / args.steps)
    )
    save_dtype = getattr(torch, args.save_dtype)
    running = None
    for step in tqdm(range(1, args.steps + 1), desc=args.arch, mininterval=10):
        for m in recipe.modules:
            m.train()
        idx = torch.randint(len(latents), (args.batch,), generator=g)
        drop = torch.rand(args.batch, generator=g) < 0.1  # caption dropout, so classifier-free guidance works
        batch_captions = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        loss = recipe.loss(latents[idx], batch_captions, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            log["loss"].append([step, round(running, 5)])
        if step % args.save_every == 0 or step == args.steps:
            for m in recipe.modules:
                m.eval()
            recipe.pipeline().to(save_dtype).save_pretrained(args.out)
            recipe.pipeline().to(torch.float32)
            log["steps_done"] = step
            log["seconds"] = round(time.time() - start, 1)
            with open(os.path.join(args.out, "training_log.json"), "w") as f:
                json.dump(log, f, indent=1)
            plot_loss(os.path.join(args.out, "training_log.json"), os.path.join(args.out, "loss.png"))
    if not math.isfinite(running):
        raise RuntimeError("training diverged")


def plot_loss(log_path: str, out_path: str, size: tuple[int, int] = (480, 240)) -> None:
    """The loss curves of a `training_log.json` as a PNG (PIL only, log-scale y)."""
    from PIL import Image, ImageDraw

    with open(log_path) as f:
        log = json.load(f)
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    pad = 30
    curves = [(log["loss"], (200, 30, 30), "denoiser MSE"), (log["vae_loss"], (30, 90, 200), "vae MSE")]
    values = [v for c, _, _ in curves for _, v in c if v > 0]
    if not values:
        return
    lo, hi = math.log10(min(values)), math.log10(max(values))
    for k, (curve, colour, name) in enumerate(curves):
        if len(curve) < 2:
            continue
        last = curve[-1][0]
        pts = [
            (pad + (w - 2 * pad) * s / last, h - pad - (h - 2 * pad) * (math.log10(v) - lo) / max(hi - lo, 1e-9))
            for s, v in curve
        ]
        draw.line(pts, fill=colour, width=2)
        draw.text((pad + 5, 5 + 12 * k), f"{name}: {curve[-1][1]:.4f} at step {last}", fill=colour)
    draw.text(
        (pad, h - pad + 8),
        f"steps (each curve to its own end); log y from {10**lo:.3g} to {10**hi:.3g}; "
        f"{log.get('seconds', 0) / 60:.0f} min, seed {log['seed']}",
        fill="black",
    )
    img.save(out_path)


if __name__ == "__main__":
    main()
