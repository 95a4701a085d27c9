"""GoCA as pure tensor functions (docs/official_code.md–4, §7). No state, no diffusers imports."""
from .aggregation import (
    aggregate_heads,
    aggregate_layers,
    head_weights,
    layer_weight,
    normalize_layer_weights,
    pseudo_self_attention,
)
from .maps import (
    gaussian_blur,
    gaussian_kernel1d,
    minmax,
    per_pixel_rescale,
    propagate,
    resize_maps,
    scores_to_labels,
    token_class_maps,
)
from .self_attention import (
    compute_dtype,
    frobenius_with_reference,
    grid_nearest_rows,
    head_mean_self_attention,
    self_attention_rows,
)

__all__ = [
    "aggregate_heads", "aggregate_layers", "head_weights", "layer_weight", "normalize_layer_weights",
    "pseudo_self_attention", "gaussian_blur", "gaussian_kernel1d", "minmax", "per_pixel_rescale", "propagate",
    "resize_maps", "scores_to_labels", "token_class_maps", "grid_nearest_rows", "head_mean_self_attention",
    "self_attention_rows", "compute_dtype", "frobenius_with_reference",
]
