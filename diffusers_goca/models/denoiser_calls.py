"""The denoiser-call side of an `Adapter`: what a call of the denoiser, and a call of the pipeline around it, say
about the batch, the latent grid, the text and the steps."""

from __future__ import annotations

import torch


class DenoiserCalls:
    """A base of `Adapter`: reads the denoiser's call arguments (its batch, latent grid and text length, whether it
    is a guidance-only call) and the pipeline call's (denoiser calls per step, the resize of its output)."""

    # Whether the pipeline's classifier-free guidance runs as one [uncond, cond] denoiser batch (what S-CFG rescales).
    cfg_batch = True

    def scheduler_timestep(self, t: float) -> float:
        """The timestep the denoiser was called with, in the scheduler's units (what `callback_on_step_end` sees)."""
        return t

    def denoiser_text_len(self, args, kwargs) -> int | None:
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        return None if ehs is None else int(ehs.shape[1])

    def forwards_per_step(self, call_kwargs: dict) -> int:
        """Denoiser calls per denoising step; the first is the one segmented (Flux's true CFG adds an uncond call)."""
        return 1

    def output_resize(self, call_kwargs: dict):
        """What the pipeline does to the generated image before returning it, as a function of scores [C, H, W] at the
        generated size (labels follow by argmax), or None when it returns the image at that size."""
        return None

    def guidance_forward(self, args, kwargs) -> bool:
        """Whether this denoiser call is an extra one that some steps add for a guidance (SD3's skip-layer guidance),
        neither segmented nor counted as a step's call."""
        return False

    def denoiser_latent_hw(self, args, kwargs) -> tuple[int, int]:
        sample = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        return tuple(sample.shape[-2:])

    def denoiser_batch(self, args, kwargs) -> int:
        sample = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        return sample.shape[0]

    def text_swapped_call(self, args, kwargs: dict, rows, encodings: list[tuple]) -> dict:
        """The keyword arguments of this denoiser call for its batch rows `rows` only, its text replaced by
        `encodings` (one `encode_segment_prompt` result per row: text states, pooled vector and, for Flux, the text
        ids): the side forward that reads a word outside a joint-attention prompt (`generation.mask_indices`)."""
        if args:
            raise RuntimeError(
                f"GoCA's side forward expects the {self.family} denoiser called with keyword arguments only, as the "
                f"diffusers pipelines call it; this call passed {len(args)} positional ones"
            )
        batch = self.denoiser_batch((), kwargs)
        text = {
            "encoder_hidden_states": torch.cat([e[0] for e in encodings]),
            "pooled_projections": torch.cat([e[1] for e in encodings]),
        }
        if "txt_ids" in kwargs:
            text["txt_ids"] = encodings[0][2]  # one set of ids for the batch, as the pipeline passes them
        rows = list(rows)
        call = {}
        for key, value in kwargs.items():
            if key in text:
                call[key] = text[key]
            elif torch.is_tensor(value) and value.ndim and value.shape[0] == batch and key != "img_ids":
                call[key] = value[rows]  # per-row inputs: the latents, timestep, guidance
            else:
                call[key] = value
        return call
