"""Which named classes are in an image, by the denoiser's own evidence (a diffusion classifier).

Cross-attention cannot say this: every class map is min-max normalised, so a class that is named but absent still
wins a region (a halo around a similar object). The denoiser can: a class that is in the image explains part of it,
so leaving its name out of the prompt makes the noise harder to predict; leaving out an absent one does not.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .tokens import segmentation_prompt

# Noise levels (of 1000 training timesteps; σ = t / 1000 for flow models) at which the errors are compared, each
# with PRESENCE_DRAWS seeded noises: 14 comparisons per class. On the toy world's validation split, 14 told present
# from absent classes better than 3 (250, 500, 750 with one noise each): the share of pixels that two absent classes
# took fell from 9.2 % to 5.3 % on the UNet toy at the same threshold (docs/protocols.md).
PRESENCE_TIMESTEPS = (100, 250, 400, 500, 650, 750, 900)
PRESENCE_DRAWS = 2
# A class is kept only if naming it lowers the denoising error by more than this fraction (`kept_round`). Chosen on
# the validation split with the classes named stuff-first: 0.01 left absent classes fewer pixels than 0 on the UNet
# and SD3 toys and as few on the PixArt toy (docs/protocols.md). The same threshold holds for the gains read in the
# classes' regions, where a background channel is on.
PRESENCE_THRESHOLD = 0.01
# A class judged present weighs its map by sigmoid(gain / PRESENCE_TEMPERATURE) before the argmax, so one that the
# test barely kept yields its pixels to the classes it is sure of (chosen on the validation split, as the threshold).
PRESENCE_TEMPERATURE = 0.03


def leave_one_out_gain(
    errors_without: torch.Tensor, error_with: torch.Tensor, regions: torch.Tensor | None = None
) -> torch.Tensor:
    """How much each class's name lowers the denoising error where the class is: errors_without [K, S, *P] (without
    class k, over S noise draws and the error map's positions P, none for one error per draw), error_with [S, *P]
    and regions [K, *P] (each class's weight at each position, `class_regions`; None: 1 everywhere) → [K]:

        gain_k = mean over s of Σ_p r_k(p) (E_without_k − E_all)(s, p) / Σ_p r_k(p) E_all(s, p)

    the relative rise of the error in the class's own region when its name is left out. Without regions it is the
    rise of the whole image's error, which shrinks with the class's area and with whatever else the prompt leaves
    unexplained (the surface, when only the objects are named)."""
    k, s = errors_without.shape[:2]
    without, full = errors_without.reshape(k, s, -1), error_with.reshape(1, s, -1)
    weights = torch.ones_like(full) if regions is None else regions.reshape(k, 1, -1).to(full)
    return (((without - full) * weights).sum(-1) / (full * weights).sum(-1).clamp_min(1e-12)).mean(-1)


def class_regions(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Where each class is, as weights on the denoising error's grid: scores [K, H, W] → [K, h, w], each class's
    scores min-max normalised to [0, 1] and averaged over the pixels of each grid cell. A class that is named but
    absent still has a region (the min-max finds one), where its name should explain nothing."""
    low, high = scores.amin((1, 2), keepdim=True), scores.amax((1, 2), keepdim=True)
    normalised = (scores.float() - low) / (high - low).clamp_min(1e-12)
    return F.adaptive_avg_pool2d(normalised[None], grid)[0]


def presence_weights(
    gains: torch.Tensor, threshold: float = PRESENCE_THRESHOLD, temperature: float = PRESENCE_TEMPERATURE
) -> torch.Tensor:
    """Each class's weight in the argmax from its leave-one-out gain [K] → [K]: 0 (absent) where gain ≤ threshold,
    else sigmoid(gain / temperature)."""
    return torch.where(gains > threshold, torch.sigmoid(gains / temperature), torch.zeros_like(gains))


def noise_errors(
    forward: Callable,
    prompt: str,
    seed: int | None,
    timesteps: Sequence[float] = PRESENCE_TIMESTEPS,
    draws: int = PRESENCE_DRAWS,
) -> torch.Tensor:
    """The denoising errors of `prompt` [S, *P] over S = draws · len(timesteps) seeded noises (draw-major).

    forward(prompt, timestep, generator) → errors [*P]: one denoiser call on the noised image and its squared error
    at each position of the latent grid (the adapter's `error_map` of its `segment_forward`). Every prompt sees the
    same seeded noises, so two prompts' errors differ by their text alone."""
    out = []
    for draw in range(draws):
        for j, t in enumerate(timesteps):
            offset = draw * len(timesteps) + j
            generator = torch.Generator().manual_seed((0 if seed is None else int(seed)) + offset)
            out.append(forward(prompt, t, generator).float())
    return torch.stack(out)


@torch.no_grad()
def leave_one_out_errors(
    forward: Callable,
    classes: Sequence[str],
    background: bool,
    seed: int | None,
    timesteps: Sequence[float] = PRESENCE_TIMESTEPS,
    draws: int = PRESENCE_DRAWS,
    errors: Callable[[str], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoising errors without each class [K, S, *P] and with all of them [S, *P] (`noise_errors`): (K + 1) · S
    forwards. errors(prompt) → [S, *P], if given, stands in for `noise_errors` (a cache shared between rounds)."""
    errors = errors or (lambda prompt: noise_errors(forward, prompt, seed, timesteps, draws))
    full = errors(segmentation_prompt(classes, background))
    without = torch.stack(
        [errors(segmentation_prompt([c for c in classes if c != name], background)) for name in classes]
    )
    return without, full


@torch.no_grad()
def elimination_rounds(
    forward: Callable,
    classes: Sequence[str],
    background: bool,
    seed: int | None,
    timesteps: Sequence[float] = PRESENCE_TIMESTEPS,
    draws: int = PRESENCE_DRAWS,
    cache: dict[str, torch.Tensor] | None = None,
    regions: torch.Tensor | None = None,
) -> list[tuple[list[str], torch.Tensor]]:
    """Backward elimination by leave-one-out gain, run until no class is left: each round takes the gain [K'] of
    every class still named (`leave_one_out_gain` over `leave_one_out_errors`, in each class's region of `regions`
    [K, *P], in the order of `classes`; None: over the whole image), then leaves out the class of the lowest gain.
    Returns each round's (classes named, their gains): the path S_0 ⊃ S_1 ⊃ … from the classes given.

    Each prompt's errors are taken once (the full prompt of a round is a prompt without one class of the round
    before): (K + 1) · S forwards for the first round, K' · S for each later one, 1 + K(K + 1)/2 prompts in all;
    `cache` (prompt → errors [S, *P]), if given, keeps them for the caller.
    """
    cache = {} if cache is None else cache

    def errors(prompt: str) -> torch.Tensor:
        if prompt not in cache:
            cache[prompt] = noise_errors(forward, prompt, seed, timesteps, draws)
        return cache[prompt]

    named, rounds = list(classes), []
    while named:
        where = None if regions is None else regions[[list(classes).index(c) for c in named]]
        gains = leave_one_out_gain(*leave_one_out_errors(forward, named, background, seed, errors=errors), where)
        rounds.append((named, gains))
        named = [c for i, c in enumerate(named) if i != int(gains.argmin())]
    return rounds


def kept_round(rounds: Sequence[tuple[Sequence[str], torch.Tensor]], threshold: float = PRESENCE_THRESHOLD) -> int:
    """Which classes of an elimination path (`elimination_rounds`) explain the image best: the index i of the round
    whose named classes S_i minimise Φ(S_i) = Σ_{j<i} (g_j − threshold), g_j the gain of the class left out in round
    j, over i = 0 … len(rounds) (len(rounds): no class); the smallest set among equal Φ.

    With the gains over the whole image, Φ is to first order the log denoising error of the prompt naming S_i plus
    `threshold` for each class it names, up to a constant (with the gains in the regions, each step's term is the
    rise in the region of the class it leaves out): a class is kept only if naming it lowers the error by more than
    that fraction, and every gain of the round chosen is above the threshold. Stopping at the first round whose gains are all above the threshold
    finds only a local minimum: where the text conditioning is weak the error also depends on how many classes the
    prompt names, so every gain of a round can be above the threshold with absent classes still named, and a later
    round of the path explains the image better.
    """
    phi, best, chosen = 0.0, 0.0, 0
    for i, (_, gains) in enumerate(rounds):
        phi += float(gains.min()) - threshold
        if phi <= best:
            best, chosen = phi, i + 1
    return chosen


def round_weights(
    rounds: Sequence[tuple[Sequence[str], torch.Tensor]],
    chosen: int,
    classes: Sequence[str],
    threshold: float = PRESENCE_THRESHOLD,
    temperature: float = PRESENCE_TEMPERATURE,
) -> torch.Tensor:
    """Each class's weight [K] with the classes of round `chosen` of an elimination path kept (len(rounds): none):
    `presence_weights` of their gains there (the gains with only those classes named), 0 for the others."""
    weights = {}
    if chosen < len(rounds):
        named, gains = rounds[chosen]
        weights = dict(zip(named, presence_weights(gains, threshold, temperature).tolist()))
    return torch.tensor([weights.get(c, 0.0) for c in classes])


def elimination_weights(
    rounds: Sequence[tuple[Sequence[str], torch.Tensor]],
    classes: Sequence[str],
    threshold: float = PRESENCE_THRESHOLD,
    temperature: float = PRESENCE_TEMPERATURE,
) -> torch.Tensor:
    """Each class's weight [K] from an elimination path: `round_weights` of the round `kept_round` chooses."""
    return round_weights(rounds, kept_round(rounds, threshold), classes, threshold, temperature)
