"""The image side of an `Adapter`: `segment`'s size and timestep rules, the noising of an image's latents and the
one denoiser forward on them."""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager

import torch


class SegmentForward:
    """A base of `Adapter`: what `segment` needs of the family: its resolution, timestep and guidance checks, the
    noising (DDPM or flow matching) and the forward that `segment_forward` runs."""

    segment_timestep: int | None = (
        100  # docs/official_code.md: t = 100 of 1000 for SD / SDXL / PixArt; None: the family's rule
    )
    flow_matching: bool = False  # noised by `flow_noised` at any t in [0, T] (SD3, Flux), else by DDPM at t in 0…T−1

    # guidance-distilled families: the guidance embedding's value in `segment` (None: the family has no such input)
    segment_guidance: float | None = None

    _encodings: dict | None = None  # (prompt, device) → encoding, inside `encodings_kept`

    @contextmanager
    def encodings_kept(self):
        """Within the block, `segment_encoding` encodes each prompt text once: the presence test runs 14 forwards
        per prompt, which would otherwise run the text encoder (T5-XXL on PixArt and Flux) as often."""
        outer = self._encodings
        self._encodings = {} if outer is None else outer
        try:
            yield
        finally:
            self._encodings = outer

    def segment_encoding(self, prompt: str, device) -> tuple:
        """`encode_segment_prompt(prompt, device)`, kept for the block where `encodings_kept` is open."""
        if self._encodings is None:
            return self.encode_segment_prompt(prompt, device)
        key = (prompt, str(device))
        if key not in self._encodings:
            self._encodings[key] = self.encode_segment_prompt(prompt, device)
        return self._encodings[key]

    def encode_segment_prompt(self, prompt: str, device) -> tuple:
        """The pipeline's encoding of `prompt` as `segment_forward` feeds it to the denoiser (one prompt, no CFG)."""
        raise NotImplementedError

    def check_segment_guidance(self, guidance_scale) -> None:
        if guidance_scale is None:
            return
        if self.segment_guidance is None or not self.denoiser.config.get("guidance_embeds", False):
            raise ValueError(
                f"guidance_scale: segment runs {self.family} models without guidance (one forward, no "
                f"CFG); it applies to guidance-distilled models (Flux dev) only"
            )
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not math.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")

    def checked_resolution(self, resolution) -> int:
        """`segment`'s square size: the native resolution for None, else a positive multiple of the pixels one token
        covers (the VAE's factor times the patch or packing size); other sizes would cut a token, which the
        denoiser's patching drops."""
        if resolution is None:
            return self.native_resolution
        step = self.image_hw((1, 1))[0] * self.map_factor
        if (
            isinstance(resolution, bool)
            or not isinstance(resolution, numbers.Integral)
            or resolution <= 0
            or resolution % step
        ):
            raise ValueError(
                f"resolution must be a positive multiple of {step} for this {self.family} model (its VAE "
                f"and patch size), e.g. {self.native_resolution}; got {resolution!r}"
            )
        return int(resolution)

    def checked_timestep(self, timestep):
        """`timestep` for `segment_forward`, or ValueError: DDPM's an integer in 0…T−1 (an index into its noise
        schedule, where a negative one would wrap around), flow matching's a number in [0, T]."""
        n = self.pipe.scheduler.config.get("num_train_timesteps", 1000)
        try:
            value = float(timestep)
        except (TypeError, ValueError, RuntimeError):
            value = None
        if self.flow_matching:
            if value is None or not 0 <= value <= n:
                raise ValueError(f"timestep must be a number in [0, {n}] (σ = t / {n}), got {timestep!r}")
            return value
        if value is None or not 0 <= value < n or value != int(value):  # the range first: int(nan) would raise
            raise ValueError(
                f"timestep must be an integer in 0…{n - 1} (a step of the DDPM noise schedule), got {timestep!r}"
            )
        return int(value)

    def flow_noised(self, latents: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
        """The flow-matching forward process at any timestep t (SD3, Flux): σ = t / num_train_timesteps,
        x_t = σ·noise + (1 − σ)·x_0. The scheduler's `scale_noise` computes the same, but only for a timestep of its
        schedule."""
        sigma = float(timestep) / self.pipe.scheduler.config.num_train_timesteps
        return sigma * noise + (1 - sigma) * latents

    def ddpm_noised(self, latents: torch.Tensor, timestep: int, generator: torch.Generator):
        """(x_t, t, target) for DDPM-family models: seeded noise at `timestep` with the pipeline scheduler's betas,
        and what the denoiser is trained to predict there (the noise, the velocity or the sample, as the scheduler's
        `prediction_type` says)."""
        from diffusers import DDPMScheduler

        noising = DDPMScheduler.from_config(self.pipe.scheduler.config)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        t = torch.tensor([timestep], device=latents.device)
        kind = noising.config.prediction_type
        target = {
            "epsilon": lambda: noise,
            "v_prediction": lambda: noising.get_velocity(latents, noise, t),
            "sample": lambda: latents,
        }[kind]()
        return noising.add_noise(latents, noise, t), t, target

    def segment_forward(
        self,
        latents: torch.Tensor,
        prompt: str,
        timestep: int,
        generator: torch.Generator,
        guidance_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise `latents` (clean, scaled) to `timestep` and run the denoiser once on `prompt`, without CFG.

        Returns (prediction, target): the denoiser's output and what it is trained to output there (noise,
        velocity or flow), in the same layout; their distance is the denoising error (`error_map`).
        """
        raise NotImplementedError

    def error_map(self, prediction: torch.Tensor, target: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The squared denoising error at each position of the latent grid, averaged over channels: `segment_forward`'s
        (prediction, target) [1, C, h, w] → [h, w] (float32); `latents` is its input. The presence test reads it
        in each class's region (`presence.leave_one_out_gain`)."""
        return (prediction.float() - target.float()).pow(2).mean(1)[0]

    def presence_forward(self, latents: torch.Tensor, guidance_scale: float | None = None):
        """The forward the presence test asks (`presence.noise_errors`): (prompt, timestep, generator) → the
        `error_map` of one `segment_forward` on these latents."""
        return lambda prompt, timestep, generator: self.error_map(
            *self.segment_forward(latents, prompt, timestep, generator, guidance_scale), latents
        )

    def error_map_grid(self, latents: torch.Tensor) -> tuple[int, int]:
        """The (h, w) of `error_map` for these latents [1, C, h, w]."""
        return tuple(latents.shape[-2:])
