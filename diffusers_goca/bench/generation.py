"""Generation metrics for the COCO-30k benchmark (docs/official_code.md): FID and CLIP score.

FID: features of the generated and reference images, Fréchet distance of their Gaussians. The features are clean-fid's
Inception ("clean" resize) when it is installed, or any callable (tests use a tiny local network). CLIP score:
100 × cosine between open_clip image and caption embeddings (ViT-B/32 by default), clamped at 0 as torchmetrics'
CLIPScore does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..models.base import call_default

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
Extractor = Callable[[list[Image.Image]], np.ndarray]  # images → features [B, D]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) in float64.

    tr((Σ1 Σ2)^½) = Σ √λ over the eigenvalues λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (same spectrum), so no
    general matrix square root (scipy's sqrtm) is needed; tiny negative eigenvalues from rounding are clipped."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_root)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ [D], Σ [D, D]) of features [N, D] (N ≥ 2), in float64."""
    f = np.asarray(features, np.float64)
    if len(f) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(f)}")
    return f.mean(0), np.cov(f, rowvar=False)


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """An .npz with `mu` and `sigma` (the names clean-fid's and pytorch-fid's precomputed statistics use)."""
    np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["mu"], f["sigma"]


def image_paths(folder: str | os.PathLike) -> list[Path]:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images in {folder}")
    return paths


def folder_features(folder, extractor: Extractor, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Features [N, D] of every image under `folder` (sorted), in batches."""
    paths = image_paths(folder)
    out = []
    for i in tqdm(range(0, len(paths), batch_size), desc=f"features {Path(folder).name}", disable=not progress):
        out.append(np.asarray(extractor([Image.open(p).convert("RGB") for p in paths[i : i + batch_size]])))
    return np.concatenate(out)


def clean_fid_extractor(device: str | torch.device = "cuda", inception_path: str | None = None) -> Extractor:
    """clean-fid's Inception-V3 features with its "clean" resize (PIL bicubic to 299 px).

    clean-fid downloads `inception-2015-12-05.pt` on first use; offline, pass the file's local path."""
    try:
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer
    except ImportError:
        raise ImportError(
            "FID with clean-fid's Inception needs `pip install clean-fid` (or the [bench] extra)"
        ) from None
    if inception_path is None and os.environ.get("HF_HUB_OFFLINE") == "1":
        default = Path("/tmp/inception-2015-12-05.pt")
        if not default.exists():
            raise FileNotFoundError(
                "offline: pass --inception PATH to a local inception-2015-12-05.pt (clean-fid's "
                "TorchScript Inception), or place it at /tmp/inception-2015-12-05.pt"
            )
    folder = str(Path(inception_path).parent) if inception_path else "/tmp"
    if inception_path and Path(inception_path).name != "inception-2015-12-05.pt":
        raise ValueError("clean-fid loads the Inception file by its name: it must be called inception-2015-12-05.pt")
    model = InceptionV3W(folder, download=inception_path is None, resize_inside=False).to(device).eval()
    resize = build_resizer("clean")

    @torch.no_grad()
    def extract(images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([resize(np.asarray(img)) for img in images])  # [B, 299, 299, 3] float, 0..255
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
        return model(x).cpu().numpy()

    return extract


def reference_statistics(
    reference: str | os.PathLike, extractor: Extractor, cache: str | os.PathLike | None = None, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """μ, Σ of the reference: an .npz of precomputed statistics, or a folder of images (its statistics are written to
    `cache` and read from there on the next run)."""
    reference = Path(reference)
    if reference.suffix == ".npz":
        return load_statistics(reference)
    if cache is not None and Path(cache).exists():
        return load_statistics(cache)
    mu, sigma = feature_statistics(folder_features(reference, extractor, progress=progress))
    if cache is not None:
        save_statistics(cache, mu, sigma)
    return mu, sigma


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float], n: int, resamples: int = 200, seed: int = 0, around: float | None = None
) -> tuple[float, float]:
    """95 % bootstrap interval of `statistic(indices)` over `n` items drawn with replacement: the percentile interval,
    or, given the estimate `around`, that estimate ± 1.96 bootstrap standard deviations, for a statistic that
    resampling biases (a resample's repeated images lower its feature covariance and raise FID by more than its
    spread: the percentile and basic intervals then miss the estimate)."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    if around is None:
        return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))
    spread = 1.96 * float(values.std(ddof=1))
    return around - spread, around + spread


def fid_with_interval(
    generated, reference, extractor: Extractor, cache=None, resamples: int = 200, progress: bool = True
) -> tuple[float, tuple[float, float]]:
    """FID of the images under `generated` against `reference` (a folder of images or an .npz of statistics; see
    `reference_statistics`), and its 95 % interval from the bootstrap spread over the generated images (the
    reference held fixed)."""
    features = folder_features(generated, extractor, progress=progress)
    ref = reference_statistics(reference, extractor, cache, progress)
    fid = frechet_distance(*feature_statistics(features), *ref)
    interval = bootstrap_interval(
        lambda i: frechet_distance(*feature_statistics(features[i]), *ref), len(features), resamples, around=fid
    )
    return fid, interval


class ClipScorer:
    """CLIP score = max(100 · cos(image embedding, caption embedding), 0) with an open_clip model."""

    def __init__(self, model, preprocess, tokenizer, device: str | torch.device = "cpu"):
        self.model, self.preprocess, self.tokenizer, self.device = (
            model.eval().to(device),
            preprocess,
            tokenizer,
            device,
        )

    @classmethod
    def load(cls, model_name: str = "ViT-B-32", pretrained: str = "openai", device: str | torch.device = "cpu"):
        """`pretrained`: an open_clip tag (downloads) or a local checkpoint file (offline)."""
        import open_clip

        local = os.path.exists(pretrained)
        if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(
                f"offline: --clip-pretrained must be a local {model_name} checkpoint file, got the tag {pretrained!r}"
            )
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), device)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        pixels = torch.stack([self.preprocess(img.convert("RGB")) for img in images]).to(self.device)
        image = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text = torch.nn.functional.normalize(
            self.model.encode_text(self.tokenizer(list(captions)).to(self.device)).float(), dim=-1
        )
        return (100 * (image * text).sum(-1)).clamp_min(0).tolist()


def exact_size(pipe) -> dict:
    """Call arguments that make `pipe` generate at the size asked for: PixArt's pipelines bin the size to their trained
    aspect ratios (and the toy sizes have no bins); the others take the size as it is."""
    return (
        {"use_resolution_binning": False}
        if call_default(type(pipe), "use_resolution_binning", None) is not None
        else {}
    )
