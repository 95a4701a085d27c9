"""The layer weights' per-query sums in one pass over the scores (docs/official_code.md), as a Triton kernel.

For head h and query i, with s_ik = q_i·k_k·scale, the kernel streams the keys once and keeps a running maximum and
the sums Σ_k e^{s_ik}, Σ_k W_ik e^{s_ik}, Σ_k c_k e^{s_ik} and, over text keys, Σ_t e^{s_it}. Against the fused
attention call of `self_attention._frobenius` (twice the keys, a bias tensor, a value product) that is a quarter of the
arithmetic: one QKᵀ pass, the floor `benchmarks/memory_plan.py` counts as `least_flops`.

Opt-in while its speed is unmeasured on a GPU; which path the layer weights take is one explicit setting:

    from diffusers_goca.functional import set_layer_weight_kernel, layer_weight_kernel
    set_layer_weight_kernel("triton")      # for the process, from now on; returns the previous setting
    with layer_weight_kernel("torch"):     # for a block (this thread / task only), whatever the setting
        ...

"torch" (default): the fused attention call; "triton": this kernel on CUDA tensors (and, for the tests, on CPU
tensors under TRITON_INTERPRET=1), an error where triton is not installed; "auto": this kernel on CUDA tensors
where triton is installed, else the fused call. The environment variable GOCA_KERNEL gives the setting's initial
value only: it is read once, when this module is imported (a value it does not know is refused at the first
layer weights, not at import), never again afterwards.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from contextvars import ContextVar

import torch

KERNELS = ("torch", "triton", "auto")
ENVIRONMENT_VARIABLE = "GOCA_KERNEL"

# The process-wide setting (`set_layer_weight_kernel`), initially GOCA_KERNEL's value read at import.
_setting: str = os.environ.get(ENVIRONMENT_VARIABLE, "torch")
# The innermost `layer_weight_kernel` block of the running thread / task (None: none).
_block: ContextVar[str | None] = ContextVar("goca_layer_weight_kernel", default=None)


def _checked(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"the layer-weight kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def set_layer_weight_kernel(kernel: str) -> str:
    """Set, for the whole process from now on, how the layer weights are computed: "torch" (the fused attention
    call, the default), "triton" (this module's kernel) or "auto" (the kernel on CUDA where triton is installed).
    Returns the previous setting, to restore it. A `layer_weight_kernel` block overrides it within the block."""
    global _setting
    previous, _setting = _setting, _checked(kernel)
    return previous


def get_layer_weight_kernel() -> str:
    """The choice in force here: the innermost `layer_weight_kernel` block's, else the process-wide setting
    (`set_layer_weight_kernel`, initially GOCA_KERNEL's value at import, "torch" without it)."""
    chosen = _block.get()
    if chosen is not None:
        return chosen
    if _setting not in KERNELS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE} must be one of {KERNELS}, got {_setting!r}")
    return _setting


@contextmanager
def layer_weight_kernel(kernel: str):
    """Within the block (in this thread or async task only), the layer weights go through `kernel` ("torch",
    "triton" or "auto"), whatever the process-wide setting is; for benchmarks and checks that compare the paths in
    one process. Blocks nest; the setting outside them is untouched."""
    token = _block.set(_checked(kernel))
    try:
        yield
    finally:
        _block.reset(token)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_enabled(t: torch.Tensor) -> bool:
    """Whether the layer weights of `t`'s device go through this kernel under the choice in force
    (`get_layer_weight_kernel`)."""
    choice = get_layer_weight_kernel()
    if choice == "torch":
        return False
    if choice == "auto":
        return t.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError(
            "the Triton layer-weight kernel needs the triton package (it ships with CUDA builds of torch)"
        )
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def row_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    queries: torch.Tensor,
    weights: torch.Tensor,
    heads: int,
    scale: float,
    key_column: torch.Tensor | None = None,
    k_txt: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per head and query row, the shares of the softmax over [k; k_txt] (the joint one when text keys are given):

        R[h, i] = Σ_k S_h[i, k] W[i, k],  column[h, i] = Σ_k S_h[i, k] c_k,  text[h, i] = Σ_t S_h[i, t]

    with S_h[i, ·] = softmax(q_{queries[i]} · [k; k_txt]ᵀ · scale) of head h, k running over the image keys only.
    q: [N_q, heads·d], k: [N_k, heads·d], k_txt: [T, heads·d]; queries: LongTensor [Q]; weights: W [Q, N_k];
    key_column: c [N_k]. The scores in fp32 from operands in `dtype` (default q's). Returns ([heads, Q] fp32, the
    column's [heads, Q] or None, the text's [heads, Q] or None).
    """
    import triton  # on first use: only the sessions that select the kernel import triton

    from ._frobenius_triton import row_sums_kernel

    d = q.shape[1] // heads
    dtype = dtype or q.dtype
    q, k = q.to(dtype).contiguous(), k.to(dtype).contiguous()
    kt = k if k_txt is None else k_txt.to(dtype).contiguous()
    weights = weights.float().contiguous()
    column = torch.zeros(1, device=q.device) if key_column is None else key_column.float().contiguous()
    n_q = len(queries)
    out_w = torch.empty(heads, n_q, device=q.device)
    out_col = torch.empty(heads, n_q, device=q.device) if key_column is not None else out_w
    out_text = torch.empty(heads, n_q, device=q.device) if k_txt is not None else out_w
    bm, bn = 64, 64
    row_sums_kernel[(triton.cdiv(n_q, bm), heads)](
        q,
        k,
        kt,
        weights,
        column,
        queries.contiguous(),
        out_w,
        out_col,
        out_text,
        n_q,
        k.shape[0],
        0 if k_txt is None else k_txt.shape[0],
        d,
        scale,
        q.stride(0),
        k.stride(0),
        kt.stride(0),
        weights.stride(0),
        HAS_COL=key_column is not None,
        HAS_TEXT=k_txt is not None,
        PRECISION="ieee" if dtype == torch.float32 else None,  # fp32 operands: no TF32 rounding, as the fused call
        BM=bm,
        BN=bn,
        BD=max(16, triton.next_power_of_2(d)),
    )
    return out_w, out_col if key_column is not None else None, out_text if k_txt is not None else None
