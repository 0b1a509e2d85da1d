"""The fused ops: typed public functions over torch.ops.mmkernels, their fake kernels (so
torch.compile traces them) and their autograd formulas (backward ops in C++).

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
    _check_nonempty(op, xs)
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
    _check_nonempty(op, xs)
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


# ---- fake kernels ----------------------------------------------------------------------------
#
# They run for meta tensors and under torch.compile (FakeTensorMode). They check the arguments
# the native kernels check that can be checked without data (devices, dtypes, shapes), with
# the native kernels' messages: a meta call with a bad shape, or a call that mixes meta with
# CPU tensors (the dispatcher then picks the meta kernel), must raise, not return garbage.


def _fail(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{op}: {message}")


def _check_like(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    _fail(isinstance(t, Tensor), op, f"{name} must be a tensor, got {type(t).__name__}")
    _fail(t.dtype == ref.dtype, op,
          f"{name} has dtype {t.dtype}, expected {ref.dtype} (the dtype of {ref_name})")
    _fail(t.device == ref.device, op,
          f"{name} is on {t.device}, expected {ref.device} (the device of {ref_name})")


def _check_shape(op: str, name: str, t: Tensor, expected: list, what: str) -> None:
    _fail(list(t.shape) == list(expected), op,
          f"{name} must have shape {list(expected)} ({what}), got {list(t.shape)}")


_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_fused_fake(op: str, xs, subset_mask, sample_mask, activation) -> tuple[int, int]:
    """The modalities, masks and activation; returns (K, S) with S = 0 without subsets."""
    _fail(len(xs) > 0, op, "xs must hold at least one modality tensor, got an empty list")
    for k, x in enumerate(xs):
        _fail(x.dim() == 2, op, f"xs[{k}] must be 2-d [B, d_k], got shape {list(x.shape)}")
        _fail(x.dtype in _FLOATS, op, f"xs[{k}] must be float32, float64 or bfloat16 (or "
                                      f"float16), got {x.dtype}")
        if k:
            _check_like(op, f"xs[{k}]", x, xs[0], "xs[0]")
            _fail(x.shape[0] == xs[0].shape[0], op, f"xs[{k}] has {x.shape[0]} rows, expected "
                                                    f"B = {xs[0].shape[0]} (the rows of xs[0])")
    _fail(activation in ("relu", "none"), op,
          f'activation must be "relu" or "none", got "{activation}"')
    K, S = len(xs), 0
    for name, m, rows, what in (("subset_mask", subset_mask, None, "[S, K] with K = len(xs)"),
                                ("sample_mask", sample_mask, xs[0].shape[0],
                                 "[B, K]: B rows of xs, K = len(xs)")):
        if m is None:
            continue
        _fail(m.dtype == torch.bool, op, f"{name} must be a bool tensor, got {m.dtype}")
        _fail(m.dim() == 2, op, f"{name} must be 2-d, got shape {list(m.shape)}")
        _check_shape(op, name, m, [m.shape[0] if rows is None else rows, K], what)
        _fail(m.device == xs[0].device, op,
              f"{name} is on {m.device}, expected {xs[0].device} (the device of xs)")
        if rows is None:
            S = m.shape[0]
    return K, S


def _check_backward_fake(op: str, grad_out, out, xs, expected: list) -> None:
    for name, t in (("grad_out", grad_out), ("out", out)):
        _fail(isinstance(t, Tensor), op, f"{name} must be a tensor, got {type(t).__name__}")
        _check_shape(op, name, t, expected, "the output's shape")
        _check_like(op, name, t, xs[0], "xs[0]")


def _concat_project_shape(xs, weight, bias, subset_mask, sample_mask, activation,
                          op="concat_project") -> list:
    K, S = _check_fused_fake(op, xs, subset_mask, sample_mask, activation)
    D = sum(x.shape[1] for x in xs)
    _check_like(op, "weight", weight, xs[0], "xs[0]")
    _fail(weight.dim() in (2, 3), op, f"weight must be [H, D] or [S, H, D] with D = sum of "
                                      f"modality dims = {D}, got shape {list(weight.shape)}")
    _fail(weight.shape[-1] == D, op, f"weight's last dim must be D = sum of modality dims = "
                                     f"{D}, got shape {list(weight.shape)}")
    if weight.dim() == 3:
        _fail(subset_mask is not None, op,
              "a 3-d weight [S, H, D] needs subset_mask [S, K] (got none)")
        _fail(weight.shape[0] == S, op, f"weight has S = {weight.shape[0]} subsets, expected "
                                        f"S = {S} (the rows of subset_mask)")
    if bias is not None:
        _check_like(op, "bias", bias, xs[0], "xs[0]")
        _check_shape(op, "bias", bias, list(weight.shape[:-1]), "weight's shape without D")
    lead = [S] if subset_mask is not None else []
    return [*lead, xs[0].shape[0], weight.shape[-2]]


def _project_concat_shape(xs, weights, biases, subset_mask, sample_mask, activation,
                          op="project_concat") -> list:
    K, S = _check_fused_fake(op, xs, subset_mask, sample_mask, activation)
    _fail(len(weights) == K, op,
          f"weights must hold K = {K} tensors (one per modality), got {len(weights)}")
    for k, w in enumerate(weights):
        name = f"weights[{k}]"
        _check_like(op, name, w, xs[0], "xs[0]")
        _fail(w.dim() in (2, 3) and w.dim() == weights[0].dim(), op,
              f"{name} must be [H_k, d_k] or [S, H_k, d_k] like weights[0], got shape "
              f"{list(w.shape)}")
        _fail(w.shape[-1] == xs[k].shape[1], op, f"{name}'s last dim must be d_{k} = "
                                                 f"{xs[k].shape[1]} (the width of xs[{k}]), got "
                                                 f"shape {list(w.shape)}")
        if w.dim() == 3:
            _fail(subset_mask is not None, op,
                  "3-d weights [S, H_k, d_k] need subset_mask [S, K] (got none)")
            _fail(w.shape[0] == S, op, f"{name} has S = {w.shape[0]} subsets, expected S = {S} "
                                       f"(the rows of subset_mask)")
    if biases:
        _fail(len(biases) == K, op,
              f"biases must hold K = {K} tensors (one per modality), got {len(biases)}")
        for k, b in enumerate(biases):
            _check_like(op, f"biases[{k}]", b, xs[0], "xs[0]")
            _check_shape(op, f"biases[{k}]", b, list(weights[k].shape[:-1]),
                         "weights[k]'s shape without its last dim")
    lead = [S] if subset_mask is not None else []
    return [*lead, xs[0].shape[0], sum(w.shape[-2] for w in weights)]




@torch.library.register_fake("mmkernels::concat_project")
def _concat_project_fake(xs, weight, bias, subset_mask, sample_mask, activation):
    shape = _concat_project_shape(xs, weight, bias, subset_mask, sample_mask, activation)
    return xs[0].new_empty(shape)


@torch.library.register_fake("mmkernels::project_concat")
def _project_concat_fake(xs, weights, biases, subset_mask, sample_mask, activation):
    shape = _project_concat_shape(xs, weights, biases, subset_mask, sample_mask, activation)
    return xs[0].new_empty(shape)


@torch.library.register_fake("mmkernels::concat_project_backward")
def _concat_project_backward_fake(
    grad_out, out, xs, weight, subset_mask, sample_mask, activation, output_mask
):
    op = "concat_project_backward"
    shape = _concat_project_shape(xs, weight, None, subset_mask, sample_mask, activation, op)
    _check_backward_fake(op, grad_out, out, xs, shape)
    grad_xs = [torch.empty_like(x) for x in xs] if output_mask[0] else []
    grad_w = torch.empty_like(weight) if output_mask[1] else weight.new_empty([0])
    grad_b = weight.new_empty(weight.shape[:-1]) if output_mask[2] else weight.new_empty([0])
    return grad_xs, grad_w, grad_b


@torch.library.register_fake("mmkernels::project_concat_backward")
def _project_concat_backward_fake(
    grad_out, out, xs, weights, subset_mask, sample_mask, activation, output_mask
):
    op = "project_concat_backward"
    shape = _project_concat_shape(xs, weights, [], subset_mask, sample_mask, activation, op)
    _check_backward_fake(op, grad_out, out, xs, shape)
    grad_xs = [torch.empty_like(x) for x in xs] if output_mask[0] else []
    grad_ws = [torch.empty_like(w) for w in weights] if output_mask[1] else []
    grad_bs = [w.new_empty(w.shape[:-1]) for w in weights] if output_mask[2] else []
    return grad_xs, grad_ws, grad_bs


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
