"""Benchmarks of concat_project / project_concat against the baselines of docs/design.md.

Every case times the mmkernels op and its baselines in the same run, on the same tensors:
- eager: mmkernels.reference (torch.cat of masked inputs, nn.functional.linear, activation,
  a Python loop over subsets);
- composition: the same algorithm as the kernel in plain PyTorch (per-modality partial
  products; GEMMs grouped by modality), so the kernel's own gain is separated from the
  algorithm's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmkernels import ops, reference
from mmkernels.subsets import all_subsets, subset_mask

Runner = Callable[[], object]


@dataclass
class Case:
    name: str
    shapes: str
    runners: dict[str, Runner]
    targets: dict[str, float]  # baseline -> minimum speed-up of mmkernels
    gflop: float  # useful GEMM work of the kernel (absent blocks and rows excluded)
    notes: list[str] = field(default_factory=list)


def _fwd_bwd(forward: Callable[[], Tensor], inputs: list[Tensor]) -> Runner:
    """A runner that does forward and the full backward (grads of every input)."""

    def run() -> object:
        out = forward()
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def _fwd(forward: Callable[[], Tensor]) -> Runner:
    def run() -> object:
        with torch.no_grad():
            return forward()

    return run


def _inputs(dims, batch, dtype, gen, grad=True):
    return [torch.randn(batch, d, dtype=dtype, generator=gen).requires_grad_(grad) for d in dims]


def _param(*shape, dtype, gen):
    fan_in = shape[-1]
    w = torch.randn(*shape, dtype=dtype, generator=gen) / fan_in**0.5
    return w.requires_grad_(True)


def _offsets(dims):
    out, total = [], 0
    for d in dims:
        out.append(total)
        total += d
    return out


# ---- plain-PyTorch compositions of the kernels' algorithms ------------------------------------


def partial_products(xs, weight, bias, sample_mask):
    """concat_project, shared weight: act(bias + sum_k m_k * (x_k @ W_k^T))."""
    acc = bias
    for k, (x, o) in enumerate(zip(xs, _offsets([x.shape[1] for x in xs]))):
        part = x @ weight[:, o : o + x.shape[1]].t()
        if sample_mask is not None:
            part = part * sample_mask[:, k : k + 1]
        acc = acc + part
    return torch.relu(acc)


def grouped_concat(xs, weight, bias, smask, sample_mask=None):
    """concat_project, per-subset weights: one GEMM per modality over the stacked blocks of the
    subsets that use it, then a sum per subset."""
    num_subsets, hidden = weight.shape[0], weight.shape[1]
    acc = [bias[s] for s in range(num_subsets)]
    for k, (x, o) in enumerate(zip(xs, _offsets([x.shape[1] for x in xs]))):
        users = torch.nonzero(smask[:, k]).flatten().tolist()
        stack = weight[users, :, o : o + x.shape[1]].reshape(len(users) * hidden, x.shape[1])
        parts = (x @ stack.t()).view(x.shape[0], len(users), hidden)
        if sample_mask is not None:
            parts = parts * sample_mask[:, k : k + 1, None]
        for j, s in enumerate(users):
            acc[s] = acc[s] + parts[:, j]
    return torch.relu(torch.stack(acc))


def shared_subsets_composition(xs, weight, bias, smask):
    """One shared weight under S subsets: partial products once, then a sum per subset."""
    parts = [
        x @ weight[:, o : o + x.shape[1]].t()
        for x, o in zip(xs, _offsets([x.shape[1] for x in xs]))
    ]
    outs = []
    for row in smask.tolist():
        acc = bias
        for k, used in enumerate(row):
            if used:
                acc = acc + parts[k]
        outs.append(torch.relu(acc))
    return torch.stack(outs)


def per_modality_late(xs, weights, biases, sample_mask):
    """project_concat, shared weights: relu(linear) per modality, masked, concatenated."""
    blocks = []
    for k, (x, w, b) in enumerate(zip(xs, weights, biases)):
        y = torch.relu(torch.addmm(b, x, w.t()))
        if sample_mask is not None:
            y = y * sample_mask[:, k : k + 1]
        blocks.append(y)
    return torch.cat(blocks, dim=1)


def grouped_late(xs, weights, biases, smask):
    """project_concat, per-subset weights: one GEMM per modality over its subsets' blocks."""
    num_subsets, batch = smask.shape[0], xs[0].shape[0]
    blocks: list[list[Tensor]] = [[] for _ in range(num_subsets)]
    for k, (x, w, b) in enumerate(zip(xs, weights, biases)):
        hidden = w.shape[1]
        users = torch.nonzero(smask[:, k]).flatten().tolist()
        stack = w[users].reshape(len(users) * hidden, w.shape[2])
        ys = torch.relu(torch.addmm(b[users].reshape(-1), x, stack.t())).view(
            batch, len(users), hidden
        )
        for s in range(num_subsets):
            blocks[s].append(ys[:, users.index(s)] if s in users else x.new_zeros(batch, hidden))
    return torch.stack([torch.cat(bl, dim=1) for bl in blocks])


# ---- the cases --------------------------------------------------------------------------------


def cpu_cases(scale: float = 1.0, dtype: torch.dtype = torch.float32) -> list[Case]:
    """The CPU targets of the foundation issue; scale < 1 shrinks the batch for a quick pass."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    dims3, hidden = [100, 100, 500], 128
    batch = max(64, int(13_200 * scale))

    # (a) concat_project, shared weight, 70 % of each modality present.
    xs = _inputs(dims3, batch, dtype, gen)
    w = _param(hidden, sum(dims3), dtype=dtype, gen=gen)
    b = _param(hidden, dtype=dtype, gen=gen)
    present = torch.rand(batch, 3, generator=gen) < 0.7
    args = [*xs, w, b]
    gflop = 3 * 2 * batch * sum(dims3) * hidden * 0.7 / 1e9
    cases.append(
        Case(
            "a_concat_project_sample_mask",
            f"dims {dims3}, B {batch}, H {hidden}, 70% present, fwd+bwd",
            {
                "mmkernels": _fwd_bwd(
                    lambda: ops.concat_project(xs, w, b, sample_mask=present), args
                ),
                "eager": _fwd_bwd(
                    lambda: reference.concat_project(xs, w, b, sample_mask=present), args
                ),
                "composition": _fwd_bwd(lambda: partial_products(xs, w, b, present), args),
            },
            {"eager": 2.5, "composition": 1.1},
            gflop,
        )
    )

    # (b) concat_project, per-subset weights, all 7 subsets of 3 modalities.
    subsets = subset_mask(all_subsets(3), 3)
    ws = _param(len(subsets), hidden, sum(dims3), dtype=dtype, gen=gen)
    bs = _param(len(subsets), hidden, dtype=dtype, gen=gen)
    args = [*xs, ws, bs]
    used = sum(dims3[k] for row in subsets.tolist() for k, u in enumerate(row) if u)
    gflop = 3 * 2 * batch * used * hidden / 1e9
    cases.append(
        Case(
            "b_concat_project_per_subset",
            f"dims {dims3}, S 7, B {batch}, H {hidden}, fwd+bwd",
            {
                "mmkernels": _fwd_bwd(
                    lambda: ops.concat_project(xs, ws, bs, subset_mask=subsets), args
                ),
                "eager": _fwd_bwd(
                    lambda: reference.concat_project(xs, ws, bs, subset_mask=subsets), args
                ),
                "composition": _fwd_bwd(lambda: grouped_concat(xs, ws, bs, subsets), args),
            },
            {"eager": 3.0, "composition": 1.1},
            gflop,
        )
    )

    # (c) one shared weight under all 15 subsets of 4 x 100 dims, forward.
    dims4, batch_c = [100] * 4, max(64, int(7_000 * scale))
    xs4 = _inputs(dims4, batch_c, dtype, gen, grad=False)
    w4 = _param(hidden, sum(dims4), dtype=dtype, gen=gen).detach()
    b4 = _param(hidden, dtype=dtype, gen=gen).detach()
    subsets4 = subset_mask(all_subsets(4), 4)
    cases.append(
        Case(
            "c_shared_weight_15_subsets",
            f"dims {dims4}, S 15, B {batch_c}, H {hidden}, fwd",
            {
                "mmkernels": _fwd(lambda: ops.concat_project(xs4, w4, b4, subset_mask=subsets4)),
                "eager": _fwd(lambda: reference.concat_project(xs4, w4, b4, subset_mask=subsets4)),
                "composition": _fwd(lambda: shared_subsets_composition(xs4, w4, b4, subsets4)),
            },
            {"eager": 5.0},
            2 * batch_c * sum(dims4) * hidden / 1e9,
        )
    )

    # (d) project_concat on the shapes of (a) and (b), H_k = 128 per modality.
    wl = [_param(hidden, d, dtype=dtype, gen=gen) for d in dims3]
    bl = [_param(hidden, dtype=dtype, gen=gen) for _ in dims3]
    args = [*xs, *wl, *bl]
    cases.append(
        Case(
            "d1_project_concat_sample_mask",
            f"dims {dims3}, B {batch}, H_k {hidden}, 70% present, fwd+bwd",
            {
                "mmkernels": _fwd_bwd(
                    lambda: ops.project_concat(xs, wl, bl, sample_mask=present), args
                ),
                "eager": _fwd_bwd(
                    lambda: reference.project_concat(xs, wl, bl, sample_mask=present), args
                ),
                "composition": _fwd_bwd(lambda: per_modality_late(xs, wl, bl, present), args),
            },
            {"eager": 2.5, "composition": 1.1},
            3 * 2 * batch * sum(dims3) * hidden * 0.7 / 1e9,
        )
    )
    wls = [_param(len(subsets), hidden, d, dtype=dtype, gen=gen) for d in dims3]
    bls = [_param(len(subsets), hidden, dtype=dtype, gen=gen) for _ in dims3]
    args = [*xs, *wls, *bls]
    cases.append(
        Case(
            "d2_project_concat_per_subset",
            f"dims {dims3}, S 7, B {batch}, H_k {hidden}, fwd+bwd",
            {
                "mmkernels": _fwd_bwd(
                    lambda: ops.project_concat(xs, wls, bls, subset_mask=subsets), args
                ),
                "eager": _fwd_bwd(
                    lambda: reference.project_concat(xs, wls, bls, subset_mask=subsets), args
                ),
                "composition": _fwd_bwd(lambda: grouped_late(xs, wls, bls, subsets), args),
            },
            {"eager": 3.0, "composition": 1.1},
            3 * 2 * batch * used * hidden / 1e9,
        )
    )
    return cases
