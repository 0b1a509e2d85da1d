"""Benchmarks of concat_project / project_concat against the baselines of docs/design.md.

Every case times the mmkernels op and its baselines in the same run, on the same tensors:
- eager: mmkernels.reference (torch.cat of masked inputs, nn.functional.linear, activation,
  a Python loop over subsets);
- composition: the same algorithm as the kernel in plain PyTorch (per-modality partial
  products; GEMMs grouped by modality), so the kernel's own gain is separated from the
  algorithm's;
- torch.compile: the eager reference compiled (inductor, static shapes);
- gemm_floor: the case's GEMMs alone on PyTorch, the floor of the GEMM work;
- in bfloat16, mmkernels on float32 copies of the same tensors;
- mmkernels on its fallback path (oneDNN disabled: MKL, bfloat16 converted to float32).
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


# ---- the GEMM floor ------------------------------------------------------------------------


def gemm_floor(shapes: list[tuple[int, int, int]], dtype: torch.dtype, gen, backward: bool = True):
    """The GEMMs of a case alone, in PyTorch (MKL in float32, oneDNN in bfloat16), into
    preallocated outputs: per modality (rows, d, ncols), T = x @ W^T and, with ``backward``,
    grad_x = R @ W and grad_W = R^T @ x. Returns the runner and its GFLOP."""
    mats = []
    for rows, d, ncols in shapes:
        x = torch.randn(rows, d, dtype=dtype, generator=gen)
        w = _param(ncols, d, dtype=dtype, gen=gen)
        r = torch.randn(rows, ncols, dtype=dtype, generator=gen)
        outs = [torch.empty(rows, ncols, dtype=dtype), torch.empty(rows, d, dtype=dtype),
                torch.empty(ncols, d, dtype=dtype)]
        mats.append((x, w.detach(), r, outs))

    def run() -> object:
        for x, w, r, (t, gx, gw) in mats:
            torch.mm(x, w.t(), out=t)
            if backward:
                torch.mm(r, w, out=gx)
                torch.mm(r.t(), x, out=gw)
        return None

    gflop = sum(2 * rows * d * ncols for rows, d, ncols in shapes) * (3 if backward else 1) / 1e9
    return run, gflop


# ---- the cases --------------------------------------------------------------------------------


def _without_onednn(run: Runner) -> Runner:
    """The runner with torch.backends.mkldnn disabled: mmkernels then takes its fallback path
    (MKL GEMMs, bfloat16 converted to float32), as on a CPU without AMX."""

    def wrapped() -> object:
        before = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            return run()
        finally:
            torch.backends.mkldnn.enabled = before

    return wrapped


def _compiled(fn):
    """torch.compile of a reference function (the baseline of docs/design.md), shapes static."""
    return torch.compile(fn, dynamic=False)


def cpu_cases(
    scale: float = 1.0, dtype: torch.dtype = torch.float32, compile: bool = True
) -> list[Case]:
    """The CPU targets of the foundation issue and of the CPU-rate issue; scale < 1 shrinks the
    batch for a quick pass.

    Every case times mmkernels, the eager reference, the composition, torch.compile of the
    reference (unless ``compile`` is False) and the case's GEMMs alone ("gemm_floor": speed-up
    = the fraction of PyTorch's GEMM rate on the same shapes that the op reaches). In bfloat16
    the op on float32 copies of the same tensors is timed too ("mmkernels_float32"), and in
    both dtypes the op on its fallback path ("mmkernels_mkl_path": oneDNN disabled, so MKL
    GEMMs and bfloat16 converted to float32, as on a CPU without AMX).
    """
    gen = torch.Generator().manual_seed(0)
    cases = []
    dims3, hidden = [100, 100, 500], 128
    batch = max(64, int(13_200 * scale))
    bf16 = dtype == torch.bfloat16

    def targets(fp32: dict[str, float]) -> dict[str, float]:
        # bfloat16 (CPU-rate issue): >= 1.5x the bf16 composition, >= 2x our own float32.
        return {"composition": 1.5, "mmkernels_float32": 2.0} if bf16 else fp32

    def add(name, shapes, runners, fp32_targets, floor_shapes, backward=True, fp32_runner=None,
            reference_fn=None):
        floor, gflop = gemm_floor(floor_shapes, dtype, gen, backward)
        runners = dict(runners)
        runners["mmkernels_mkl_path"] = _without_onednn(runners["mmkernels"])
        if compile and reference_fn is not None:
            runners["torch.compile"] = reference_fn
        runners["gemm_floor"] = floor
        if bf16 and fp32_runner is not None:
            runners["mmkernels_float32"] = fp32_runner
        cases.append(Case(name, shapes, runners, targets(fp32_targets), gflop))

    def as_float32(ts):
        return [t.detach().float().requires_grad_(t.requires_grad) for t in ts]

    # (a) concat_project, shared weight, 70 % of each modality present.
    xs = _inputs(dims3, batch, dtype, gen)
    w = _param(hidden, sum(dims3), dtype=dtype, gen=gen)
    b = _param(hidden, dtype=dtype, gen=gen)
    present = torch.rand(batch, 3, generator=gen) < 0.7
    args = [*xs, w, b]
    f32 = as_float32(args)
    present_rows = present.sum(0).tolist()
    compiled = _compiled(reference.concat_project)
    add(
        "a_concat_project_sample_mask",
        f"dims {dims3}, B {batch}, H {hidden}, 70% present, fwd+bwd",
        {
            "mmkernels": _fwd_bwd(lambda: ops.concat_project(xs, w, b, sample_mask=present), args),
            "eager": _fwd_bwd(
                lambda: reference.concat_project(xs, w, b, sample_mask=present), args
            ),
            "composition": _fwd_bwd(lambda: partial_products(xs, w, b, present), args),
        },
        {"eager": 2.5, "composition": 1.1, "gemm_floor": 0.7},
        [(n, d, hidden) for n, d in zip(present_rows, dims3)],
        fp32_runner=_fwd_bwd(
            lambda f32=f32: ops.concat_project(f32[:3], f32[3], f32[4], sample_mask=present), f32
        ),
        reference_fn=_fwd_bwd(lambda: compiled(xs, w, b, sample_mask=present), args),
    )

    # (b) concat_project, per-subset weights, all 7 subsets of 3 modalities.
    subsets = subset_mask(all_subsets(3), 3)
    users = subsets.sum(0).tolist()
    ws = _param(len(subsets), hidden, sum(dims3), dtype=dtype, gen=gen)
    bs = _param(len(subsets), hidden, dtype=dtype, gen=gen)
    args = [*xs, ws, bs]
    f32 = as_float32(args)
    compiled_b = _compiled(reference.concat_project)
    add(
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
        [(batch, d, u * hidden) for d, u in zip(dims3, users)],
        fp32_runner=_fwd_bwd(
            lambda f32=f32: ops.concat_project(f32[:3], f32[3], f32[4], subset_mask=subsets), f32
        ),
        reference_fn=_fwd_bwd(lambda: compiled_b(xs, ws, bs, subset_mask=subsets), args),
    )

    # (c) one shared weight under all 15 subsets of 4 x 100 dims, forward.
    dims4, batch_c = [100] * 4, max(64, int(7_000 * scale))
    xs4 = _inputs(dims4, batch_c, dtype, gen, grad=False)
    w4 = _param(hidden, sum(dims4), dtype=dtype, gen=gen).detach()
    b4 = _param(hidden, dtype=dtype, gen=gen).detach()
    subsets4 = subset_mask(all_subsets(4), 4)
    f32 = as_float32([*xs4, w4, b4])
    compiled_c = _compiled(reference.concat_project)
    add(
        "c_shared_weight_15_subsets",
        f"dims {dims4}, S 15, B {batch_c}, H {hidden}, fwd",
        {
            "mmkernels": _fwd(lambda: ops.concat_project(xs4, w4, b4, subset_mask=subsets4)),
            "eager": _fwd(lambda: reference.concat_project(xs4, w4, b4, subset_mask=subsets4)),
            "composition": _fwd(lambda: shared_subsets_composition(xs4, w4, b4, subsets4)),
        },
        {"eager": 5.0},
        [(batch_c, d, hidden) for d in dims4],
        backward=False,
        fp32_runner=_fwd(
            lambda f32=f32: ops.concat_project(f32[:4], f32[4], f32[5], subset_mask=subsets4)
        ),
        reference_fn=_fwd(lambda: compiled_c(xs4, w4, b4, subset_mask=subsets4)),
    )

    # (d) project_concat on the shapes of (a) and (b), H_k = 128 per modality.
    wl = [_param(hidden, d, dtype=dtype, gen=gen) for d in dims3]
    bl = [_param(hidden, dtype=dtype, gen=gen) for _ in dims3]
    args = [*xs, *wl, *bl]
    f32 = as_float32(args)
    compiled_d1 = _compiled(reference.project_concat)
    add(
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
        [(n, d, hidden) for n, d in zip(present_rows, dims3)],
        fp32_runner=_fwd_bwd(
            lambda f32=f32: ops.project_concat(f32[:3], f32[3:6], f32[6:], sample_mask=present), f32
        ),
        reference_fn=_fwd_bwd(lambda: compiled_d1(xs, wl, bl, sample_mask=present), args),
    )
    wls = [_param(len(subsets), hidden, d, dtype=dtype, gen=gen) for d in dims3]
    bls = [_param(len(subsets), hidden, dtype=dtype, gen=gen) for _ in dims3]
    args = [*xs, *wls, *bls]
    f32 = as_float32(args)
    compiled_d2 = _compiled(reference.project_concat)
    add(
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
        [(batch, d, u * hidden) for d, u in zip(dims3, users)],
        fp32_runner=_fwd_bwd(
            lambda f32=f32: ops.project_concat(f32[:3], f32[3:6], f32[6:], subset_mask=subsets), f32
        ),
        reference_fn=_fwd_bwd(lambda: compiled_d2(xs, wls, bls, subset_mask=subsets), args),
    )
    return cases
