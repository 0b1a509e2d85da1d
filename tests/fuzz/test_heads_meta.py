"""The head-refit ops' Meta kernels against their CPU kernels on the op-boundary fuzzer's cases
(the gram, softmax and lbfgs targets of fuzz_boundary.py): a call on meta tensors raises the
CPU call's exception type and message, or returns outputs of the CPU call's shapes, strides and
dtypes.

The range checks of y's labels and of subset_index read data, so they are the CPU kernel's
alone: for those cases the meta call succeeds. Cases that already mix meta with CPU tensors are
meta calls either way and are not compared. In-process (these ops are the fuzzer's, already
crash-free), as many examples as the fuzzer's targets (MMKERNELS_FUZZ_SCALE scales them).
"""

from __future__ import annotations

import torch
from fuzz_boundary import TARGETS, scale
from fuzz_worker import build
from hypothesis import HealthCheck, given, settings

import mmkernels  # noqa: F401  (registers the ops)

DATA_DEPENDENT = ("y must hold labels", "subset_index must hold subsets", "must hold rows of")
OPS = {"gram": (torch.ops.mmkernels.gram, ("z", "y")),
       "softmax": (torch.ops.mmkernels.softmax_regression_loss_grad,
                   ("z", "y", "w", "b", "sample_weight", "l2", "subset_index")),
       "lbfgs": (torch.ops.mmkernels.lbfgs_direction,
                 ("grad", "s", "y", "rho", "gamma", "diag", "rows"))}


def _strides(t: torch.Tensor) -> tuple:
    """Strides of the dims of size > 1 (any stride is the same layout for the others)."""
    return tuple(st for size, st in zip(t.shape, t.stride()) if size > 1)


def _outcome(op, args: list):
    try:
        outs = op(*args)
    except Exception as e:  # noqa: BLE001 - the outcome is what is compared
        return "raised", type(e).__name__, str(e)
    outs = (outs,) if isinstance(outs, torch.Tensor) else outs
    return "ok", [(tuple(t.shape), _strides(t), t.dtype) for t in outs]


def _meta(a):
    if isinstance(a, torch.Tensor):
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
    if isinstance(a, list):
        return [_meta(t) for t in a]
    return a


def _compare(name: str, case: dict) -> None:
    op, keys = OPS[name]
    a = build(case["args"], torch.Generator().manual_seed(case["seed"]))
    args = [a.get(k) for k in keys]
    if name == "softmax" and args[-1] is None:
        args.pop()  # subset_index left to its default
    tensors = [x for t in args for x in (t if isinstance(t, list) else [t])]
    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tensors):
        return
    cpu, meta = _outcome(op, args), _outcome(op, [_meta(t) for t in args])
    if cpu[0] == "raised" and any(d in cpu[2] for d in DATA_DEPENDENT):
        assert meta[0] == "ok", (case, cpu, meta)
    else:
        assert meta == cpu, (case, cpu, meta)


def _meta_test(name: str):
    strategy, examples = TARGETS[name]

    @settings(max_examples=max(1, int(examples * scale())), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def test(case):
        _compare(name, case)

    test.__name__ = f"test_{name}_meta_raises_like_cpu"
    return test


test_gram_meta_raises_like_cpu = _meta_test("gram")
test_softmax_meta_raises_like_cpu = _meta_test("softmax")
test_lbfgs_meta_raises_like_cpu = _meta_test("lbfgs")
