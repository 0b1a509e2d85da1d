"""Problems for the fused CUDA kernels run through the host emulator (tests/cuda_emulator.py),
checked against mmkernels.reference with the project's tolerance rule (tests/oracle.py).

Every output and gradient buffer is filled with NaN before the kernels run, so an element
they never write fails the comparison; absent rows of xs can hold NaN, which must not reach
any output or gradient (the oracle then runs on the same inputs with those rows zeroed:
absent rows never matter, whatever they hold)."""

from __future__ import annotations

from dataclasses import dataclass

import cuda_emulator as emu
import torch
from oracle import assert_matches_oracle

from mmkernels import reference


@dataclass
class Case:
    late: bool  # project_concat (else concat_project)
    dims: list[int]
    batch: int
    widths: list[int]  # [H] (concat) or [H_k]
    num_subsets: int | None  # None: no subset_mask
    per_subset: bool
    present: float | str | None  # fraction present, "tiles" (whole row tiles absent), None
    bias: bool
    relu: bool
    dtype: torch.dtype
    tf32: bool
    seed: int
    nan_absent: bool = False
    strided: bool = False  # xs as column slices of wider tensors: odd offsets, odd strides

    def tensors(self):
        gen = torch.Generator().manual_seed(self.seed)
        K = len(self.dims)

        def rand(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(self.dtype)

        xs = []
        for d in self.dims:
            if self.strided:
                wide = rand(self.batch, d + 3)
                xs.append(wide[:, 1 : 1 + d])
            else:
                xs.append(rand(self.batch, d))
        lead = [self.num_subsets] if self.per_subset else []
        if self.late:
            weights = [rand(*lead, h, d) / d**0.5 for h, d in zip(self.widths, self.dims)]
            biases = [rand(*lead, h) for h in self.widths] if self.bias else []
        else:
            D = sum(self.dims)
            weights = [rand(*lead, self.widths[0], D) / D**0.5]
            biases = [rand(*lead, self.widths[0])] if self.bias else []
        subset_mask = None
        if self.num_subsets is not None:
            subset_mask = torch.rand(self.num_subsets, K, generator=gen) < 0.6
        sample_mask = None
        if self.present == "tiles":
            # Whole 64-row tiles without a modality, and a row with none at all.
            sample_mask = torch.rand(self.batch, K, generator=gen) < 0.7
            sample_mask[: min(64, self.batch), 0] = False
            sample_mask[64:, K - 1] = False
            if self.batch > 3:
                sample_mask[3] = False
        elif self.present is not None:
            sample_mask = torch.rand(self.batch, K, generator=gen) < self.present
        if self.nan_absent and sample_mask is not None:
            xs = [x.clone() for x in xs] if not self.strided else xs
            for k, x in enumerate(xs):
                x[~sample_mask[:, k]] = float("nan")
        return xs, weights, biases, subset_mask, sample_mask


def sample_case(late: bool, dtype: torch.dtype) -> Case:
    """A small case with tails everywhere: two row tiles (the second partial), K-dims that
    are not multiples of the K tile, columns that are not multiples of the N tile."""
    return Case(late, [5, 37, 9], 70, [11, 70, 3] if late else [70], 3, False, 0.7, True, True,
                dtype, False, 11)


def tf32_rounded(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to tf32 as cvt.rna.tf32.f32 does (nearest, ties away)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _call(case: Case, xs, weights, biases, subset_mask, sample_mask, activation):
    kw = dict(subset_mask=subset_mask, sample_mask=sample_mask, activation=activation)
    if case.late:
        return reference.project_concat(xs, weights, biases or None, **kw)
    return reference.concat_project(xs, weights[0], biases[0] if biases else None, **kw)


def run_case(case: Case, fault: str = "none", stage: str = "both", check: bool = False) -> None:
    xs, weights, biases, subset_mask, sample_mask = case.tensors()
    K = len(xs)
    f, keep = emu.problem(xs, weights, biases, subset_mask, sample_mask, late=case.late,
                          relu=case.relu, allow_tf32=case.tf32)
    activation = "relu" if case.relu else "none"
    W = case.widths[0] if not case.late else sum(case.widths)
    shape = [case.num_subsets, case.batch, W] if subset_mask is not None else [case.batch, W]
    out = torch.full(shape, float("nan"), dtype=case.dtype)
    emu.run_forward(f, out, fault=fault if stage != "backward" else "none")

    # The oracle's inputs: absent rows zeroed (they must not matter), float64 and same dtype.
    clean = xs
    if sample_mask is not None:
        clean = [torch.where(sample_mask[:, k : k + 1], x, torch.zeros_like(x))
                 for k, x in enumerate(xs)]
    masks = (subset_mask, sample_mask)
    same_dtype = [t.to(case.dtype) for t in (*clean, *weights, *biases)]
    if case.tf32:  # the GEMM operands in TF32; the bias is added in float32
        same_dtype = [tf32_rounded(t) if i < K + len(weights) else t
                      for i, t in enumerate(same_dtype)]
    eps = 2.0**-10 if case.tf32 else None
    leaves_same = [t.detach().clone().requires_grad_(True) for t in same_dtype]
    leaves_oracle = [t.detach().double().requires_grad_(True) for t in (*clean, *weights, *biases)]

    def split(ts):
        return ts[:K], ts[K : K + len(weights)], ts[K + len(weights) :]

    reduction = max(sum(case.dims), case.batch * (case.num_subsets or 1),
                    sum(case.widths) * (case.num_subsets or 1))
    if check and stage in ("forward", "both"):
        same = _call(case, *split(leaves_same), *masks, activation)
        oracle = _call(case, *split(leaves_oracle), *masks, activation)
        assert_matches_oracle(out, same.to(case.dtype), oracle, "forward (emulated)", reduction,
                              eps)
    if stage not in ("backward", "both"):
        return

    gen = torch.Generator().manual_seed(case.seed + 1)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64).to(case.dtype)
    grads = {
        "x": [torch.full(x.shape, float("nan"), dtype=case.dtype) for x in xs],
        "weight": [torch.full(w.shape, float("nan"), dtype=case.dtype) for w in weights],
        "bias": [torch.full(b.shape, float("nan"), dtype=case.dtype) for b in biases],
    }
    emu.run_backward(f, out.contiguous(), grad_out, grads, fault=fault)
    if not check:
        return
    # Differentiate the piecewise-linear function our forward chose (the ReLU pattern of out).
    effective = grad_out * (out > 0) if case.relu else grad_out
    # PyTorch "in TF32" sees dZ rounded to tf32, as the kernel's A tiles are; the oracle does not.
    effective_same = tf32_rounded(effective.float()) if case.tf32 else effective
    same_g = torch.autograd.grad(_call(case, *split(leaves_same), *masks, "none"), leaves_same,
                                 effective_same.to(leaves_same[0].dtype))
    oracle_g = torch.autograd.grad(_call(case, *split(leaves_oracle), *masks, "none"),
                                   leaves_oracle, effective.double())
    ours = [*grads["x"], *grads["weight"], *grads["bias"]]
    names = [f"grad xs[{k}]" for k in range(K)] + [f"grad weight[{k}]" for k in range(len(weights))]
    names += [f"grad bias[{k}]" for k in range(len(biases))]
    for name, a, b, c in zip(names, ours, same_g, oracle_g):
        assert_matches_oracle(a, b.to(case.dtype), c, f"{name} (emulated)", reduction, eps)
