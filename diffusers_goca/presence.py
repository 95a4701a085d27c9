"""Which named classes are in an image, by the denoiser's own evidence (a diffusion classifier).

Cross-attention cannot say this: every class map is min-max normalised, so a class that is named but absent still
wins a region (a halo around a similar object). The denoiser can: a class that is in the image explains part of it,
so leaving its name out of the prompt makes the noise harder to predict; leaving out an absent one does not.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .tokens import segmentation_prompt

# Noise levels (of 1000 training timesteps; σ = t / 1000 for flow models) at which the errors are compared: spread
# over the middle of the schedule, where the text decides most of the prediction.
PRESENCE_TIMESTEPS = (250, 500, 750)
# A class is judged present when leaving it out raises the denoising error by more than this fraction.
PRESENCE_THRESHOLD = 0.0


def denoising_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element: [B, ...] × [B, ...] → scalar (float32)."""
    return (prediction.float() - target.float()).pow(2).mean()


def leave_one_out_gain(errors_without: torch.Tensor, error_with: torch.Tensor) -> torch.Tensor:
    """(E_without_k − E_all) / E_all per class: errors_without [K, S] over S noise draws, error_with [S] → [K]."""
    return ((errors_without - error_with) / error_with.clamp_min(1e-12)).mean(-1)


@torch.no_grad()
def denoiser_presence(
    forward: Callable,
    classes: Sequence[str],
    background: bool,
    seed: int | None,
    timesteps: Sequence[float] = PRESENCE_TIMESTEPS,
) -> torch.Tensor:
    """The relative rise of the denoising error when each class is left out of the segmentation prompt, [K].

    forward(prompt, timestep, generator) → (prediction, target): one denoiser call on the noised image (the
    adapter's `segment_forward`); the same seeded noise serves the full prompt and each prompt without one class,
    so the difference is the class's alone. K + 1 forwards per timestep.
    """

    def errors(prompt: str) -> torch.Tensor:
        out = []
        for j, t in enumerate(timesteps):
            generator = torch.Generator().manual_seed((0 if seed is None else int(seed)) + j)
            out.append(denoising_error(*forward(prompt, t, generator)))
        return torch.stack(out)

    full = errors(segmentation_prompt(classes, background))
    without = torch.stack(
        [errors(segmentation_prompt([c for c in classes if c != name], background)) for name in classes]
    )
    return leave_one_out_gain(without, full)
