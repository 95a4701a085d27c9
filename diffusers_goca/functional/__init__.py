"""GoCA as pure tensor functions (the formulas of docs/method.md). No diffusers imports; the one setting is the
layer-weight kernel (`set_layer_weight_kernel` / `layer_weight_kernel`: the fused attention call or a Triton kernel,
`frobenius_kernel`)."""

from .aggregation import (
    aggregate_heads,
    aggregate_layers,
    head_weights,
    layer_weight,
    normalize_layer_weights,
    pseudo_self_attention,
)
from .frobenius_kernel import get_layer_weight_kernel, layer_weight_kernel, set_layer_weight_kernel
from .maps import (
    entropy_reduced,
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
    "aggregate_heads",
    "aggregate_layers",
    "head_weights",
    "layer_weight",
    "normalize_layer_weights",
    "pseudo_self_attention",
    "entropy_reduced",
    "gaussian_blur",
    "gaussian_kernel1d",
    "minmax",
    "per_pixel_rescale",
    "propagate",
    "resize_maps",
    "scores_to_labels",
    "token_class_maps",
    "grid_nearest_rows",
    "head_mean_self_attention",
    "self_attention_rows",
    "compute_dtype",
    "frobenius_with_reference",
    "get_layer_weight_kernel",
    "layer_weight_kernel",
    "set_layer_weight_kernel",
]
