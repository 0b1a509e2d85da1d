"""The fused ops: typed public functions over torch.ops.mmkernels and their autograd formulas
(backward ops in C++). Every argument check of the fused ops is the C++ plan's
(csrc/include/mmkernels/fusion_plan.h), which is also their Meta kernel (csrc/meta), so meta
tensors and torch.compile's fake tensors get the real kernels' errors; only the Python types
are checked here, which the dispatcher cannot name.

Semantics (docs/design.md, "The fused ops"): xs is a list of K modality tensors [B, d_k];
present(s, b, k) = subset_mask[s, k] and sample_mask[b, k], a missing mask counting as True.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmkernels.memory import memory_budget

__all__ = ["concat_project", "memory_budget", "project_concat"]

_ops = torch.ops.mmkernels


def concat_project(
    xs: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    subset_mask: Tensor | None = None,
    sample_mask: Tensor | None = None,
    activation: str = "relu",
) -> Tensor:
    """Early fusion: act(Linear(cat(masked xs))) without building the concatenation.

    Args:
        xs: K modality tensors, xs[k] of shape [B, d_k], one dtype and device.
        weight: [H, D] (one encoder) or [S, H, D] (one encoder per subset), D = sum d_k.
        bias: [H] or [S, H], matching weight.
        subset_mask: bool [S, K]; row s says which modalities subset s uses. Required with a
            3-d weight; with a 2-d weight it evaluates the one encoder under S subsets.
        sample_mask: bool [B, K]; which modalities each sample has.
        activation: "relu" or "none".

    Returns:
        [S, B, H] when subset_mask is given, else [B, H]:
        out[s, b] = act(sum_k present(s, b, k) * xs[k][b] @ W_s[:, o_k:o_k + d_k]^T + bias_s).
        Absent blocks do no work; a row with every modality absent gives act(bias).

    Raises:
        ValueError / TypeError naming a bad argument; torch.OutOfMemoryError (before any
        allocation) when the output and workspace would exceed the memory budget
        (memory_budget(); MMKERNELS_MEMORY_BUDGET overrides it).
    """
    op = "concat_project"
    _check_types(op, xs=(xs, "list"), weight=(weight, "tensor"), bias=(bias, "tensor?"),
                 subset_mask=(subset_mask, "tensor?"), sample_mask=(sample_mask, "tensor?"),
                 activation=(activation, "str"))
    return _ops.concat_project(list(xs), weight, bias, subset_mask, sample_mask, activation)


def project_concat(
    xs: Sequence[Tensor],
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] | None = None,
    *,
    subset_mask: Tensor | None = None,
    sample_mask: Tensor | None = None,
    activation: str = "relu",
) -> Tensor:
    """Late fusion: project each modality, apply the activation, concatenate the blocks.

    Args:
        xs: K modality tensors, xs[k] of shape [B, d_k].
        weights: K tensors, weights[k] [H_k, d_k] (shared) or [S, H_k, d_k] (per subset).
        biases: None, or K tensors shaped like weights[k] without its last dim.
        subset_mask: bool [S, K]; required with 3-d weights.
        sample_mask: bool [B, K].
        activation: "relu" or "none".

    Returns:
        [S, B, sum H_k] when subset_mask is given, else [B, sum H_k]:
        out[s, b] = cat_k(present(s, b, k) * act(xs[k][b] @ W_{s,k}^T + b_{s,k})).
        An absent modality's block is exactly zero (the bias does not leak).

    Raises:
        As concat_project (ValueError / TypeError, torch.OutOfMemoryError over the budget).
    """
    op = "project_concat"
    _check_types(op, xs=(xs, "list"), weights=(weights, "list"), biases=(biases, "list?"),
                 subset_mask=(subset_mask, "tensor?"), sample_mask=(sample_mask, "tensor?"),
                 activation=(activation, "str"))
    biases = [] if biases is None else list(biases)
    if not xs and not weights and not biases and subset_mask is None and sample_mask is None:
        # No tensor at all: the dispatcher could pick no kernel to run the C++ checks in.
        raise ValueError(f"{op}: xs must hold at least one modality tensor, got an empty list")
    return _ops.project_concat(list(xs), list(weights), biases, subset_mask, sample_mask,
                               activation)


def _check_types(op: str, **args: tuple[object, str]) -> None:
    """Python types of the public functions' arguments, checked before the dispatcher sees
    them (it would name a C++ type, or iterate the rows of a tensor passed as xs)."""
    for name, (value, kind) in args.items():
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        if kind == "str":
            ok, want = isinstance(value, str), "a str"
        elif kind == "tensor":
            ok, want = isinstance(value, Tensor), "a Tensor"
        else:
            ok = isinstance(value, Sequence) and not isinstance(value, (Tensor, str))
            ok = ok and all(isinstance(v, Tensor) for v in value)
            want = "a list of Tensors"
        if not ok:
            got = type(value).__name__
            if kind == "list" and isinstance(value, Sequence) and not isinstance(value, str):
                got += " holding " + ", ".join(sorted({type(v).__name__ for v in value}))
            raise TypeError(f"{op}: {name} must be {want}, got {got}")


# ---- autograd ---------------------------------------------------------------------------------


def _any(flags) -> bool:
    return any(flags) if isinstance(flags, (list, tuple)) else bool(flags)


def _setup_concat_project(ctx, inputs, output):
    xs, weight, bias, subset_mask, sample_mask, activation = inputs
    ctx.save_for_backward(output, weight, subset_mask, sample_mask, *xs)
    ctx.activation = activation


def _concat_project_backward(ctx, grad):
    out, weight, subset_mask, sample_mask, *xs = ctx.saved_tensors
    need_x, need_w, need_b = (_any(f) for f in ctx.needs_input_grad[:3])
    grad_xs, grad_w, grad_b = _ops.concat_project_backward(
        grad, out, xs, weight, subset_mask, sample_mask, ctx.activation, [need_x, need_w, need_b]
    )
    return (
        grad_xs if need_x else [None] * len(xs),
        grad_w if need_w else None,
        grad_b if need_b else None,
        None,
        None,
        None,
    )


def _setup_project_concat(ctx, inputs, output):
    xs, weights, biases, subset_mask, sample_mask, activation = inputs
    ctx.save_for_backward(output, subset_mask, sample_mask, *xs, *weights)
    ctx.activation = activation
    ctx.num_modalities = len(xs)
    ctx.num_biases = len(biases)


def _project_concat_backward(ctx, grad):
    out, subset_mask, sample_mask, *rest = ctx.saved_tensors
    xs, weights = rest[: ctx.num_modalities], rest[ctx.num_modalities :]
    need_x, need_w, need_b = (_any(f) for f in ctx.needs_input_grad[:3])
    need_b = need_b and ctx.num_biases > 0
    grad_xs, grad_ws, grad_bs = _ops.project_concat_backward(
        grad, out, xs, weights, subset_mask, sample_mask, ctx.activation, [need_x, need_w, need_b]
    )
    # Gradients of list inputs are lists of the same length (the autograd tree must match).
    return (
        grad_xs if need_x else [None] * len(xs),
        grad_ws if need_w else [None] * len(weights),
        grad_bs if need_b else [None] * ctx.num_biases,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "mmkernels::concat_project", _concat_project_backward, setup_context=_setup_concat_project
)
torch.library.register_autograd(
    "mmkernels::project_concat", _project_concat_backward, setup_context=_setup_project_concat
)
