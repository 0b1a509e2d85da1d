"""The fused ops: typed public functions over torch.ops.mmkernels, their fake kernels (so
torch.compile traces them) and their autograd formulas (backward ops in C++).

Semantics (DESIGN.md, "The fused ops"): xs is a list of K modality tensors [B, d_k];
present(s, b, k) = subset_mask[s, k] and sample_mask[b, k], a missing mask counting as True.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["concat_project", "project_concat"]

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
    """
    _check_nonempty("concat_project", xs)
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
    """
    _check_nonempty("project_concat", xs)
    return _ops.project_concat(
        list(xs),
        list(weights),
        [] if biases is None else list(biases),
        subset_mask,
        sample_mask,
        activation,
    )


def _check_nonempty(op: str, xs: Sequence[Tensor]) -> None:
    # With no tensor at all the dispatcher cannot pick a backend; say what is wrong instead.
    if len(xs) == 0:
        raise ValueError(f"{op}: xs must hold at least one modality tensor, got an empty list")


# ---- fake kernels: output shapes only; the native kernels validate every argument ----------


def _lead(xs: Sequence[Tensor], subset_mask: Tensor | None) -> list[int]:
    if not xs:
        raise ValueError("xs must hold at least one modality tensor, got an empty list")
    batch = xs[0].shape[0]
    return [subset_mask.shape[0], batch] if subset_mask is not None else [batch]


@torch.library.register_fake("mmkernels::concat_project")
def _concat_project_fake(xs, weight, bias, subset_mask, sample_mask, activation):
    return xs[0].new_empty([*_lead(xs, subset_mask), weight.shape[-2]])


@torch.library.register_fake("mmkernels::project_concat")
def _project_concat_fake(xs, weights, biases, subset_mask, sample_mask, activation):
    width = sum(w.shape[-2] for w in weights)
    return xs[0].new_empty([*_lead(xs, subset_mask), width])


@torch.library.register_fake("mmkernels::concat_project_backward")
def _concat_project_backward_fake(
    grad_out, out, xs, weight, subset_mask, sample_mask, activation, output_mask
):
    grad_xs = [torch.empty_like(x) for x in xs] if output_mask[0] else []
    grad_w = torch.empty_like(weight) if output_mask[1] else weight.new_empty([0])
    grad_b = weight.new_empty(weight.shape[:-1]) if output_mask[2] else weight.new_empty([0])
    return grad_xs, grad_w, grad_b


@torch.library.register_fake("mmkernels::project_concat_backward")
def _project_concat_backward_fake(
    grad_out, out, xs, weights, subset_mask, sample_mask, activation, output_mask
):
    grad_xs = [torch.empty_like(x) for x in xs] if output_mask[0] else []
    grad_ws = [torch.empty_like(w) for w in weights] if output_mask[1] else []
    grad_bs = [w.new_empty(w.shape[:-1]) for w in weights] if output_mask[2] else []
    return grad_xs, grad_ws, grad_bs


@torch.library.register_fake("mmkernels::gram")
def _gram_fake(z, y):
    # float32 accumulation for float32/bfloat16 z, float64 for float64 (as the CPU kernel).
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    width = z.shape[2] + 1
    outputs = 1 if y.dim() == 1 else y.shape[1]
    return (z.new_empty([z.shape[0], width, width], dtype=acc),
            z.new_empty([z.shape[0], width, outputs], dtype=acc))


@torch.library.register_fake("mmkernels::softmax_regression_loss_grad")
def _softmax_regression_loss_grad_fake(z, y, w, b, sample_weight, l2, subset_index=None):
    # No autograd for the head-refit ops: they are solver internals (mmkernels/heads.py).
    return w.new_empty([w.shape[0]]), torch.empty_like(w), torch.empty_like(b)


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
