"""The op-boundary fuzzer under pytest (issue 8, section 1) and a regression test per bug it
found. Each case runs in a worker subprocess (fuzz_boundary.py); a crash, hang, wrong result,
an invalid call accepted or an unclear error fails the test with a replayable case.

Budget: about a minute on a 2-core CPU; MMKERNELS_FUZZ_SCALE=20 (or more) for a deeper run.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from fuzz_boundary import STATS, TARGETS, check, scale, worker
from hypothesis import HealthCheck, given, settings

import mmkernels


@pytest.fixture(scope="module", autouse=True)
def _worker():
    yield
    worker().stop()
    report = os.environ.get("MMKERNELS_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump(STATS, f)
    print(f"\nop-boundary fuzzer: {STATS}")


def _fuzz_test(name: str):
    strategy, examples = TARGETS[name]

    @settings(max_examples=max(1, int(examples * scale())), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def test(case):
        check(case)

    test.__name__ = f"test_fuzz_{name}"
    return test


test_fuzz_fused_public = _fuzz_test("fused_public")
test_fuzz_fused_op = _fuzz_test("fused_op")
test_fuzz_fused_backward = _fuzz_test("fused_backward")
test_fuzz_gram = _fuzz_test("gram")
test_fuzz_softmax = _fuzz_test("softmax")
test_fuzz_heads = _fuzz_test("heads")
test_fuzz_refit_quality = _fuzz_test("refit_quality")
test_fuzz_lbfgs = _fuzz_test("lbfgs")


def test_worker_attributes_crashes_and_hangs_to_their_case():
    """A case that kills the child (here os.abort) or hangs is reported as that case's crash
    or hang, and the next case runs in a fresh child."""
    from fuzz_boundary import Worker, verdict

    w = Worker()
    ok = {"op": "gram", "seed": 0, "args": {"z": {"T": [1, 2, 1]}, "y": {"T": [2]}},
          "expect": "ok", "why": "valid", "expect_ok": True}
    abort = {"op": "_selftest", "seed": 0, "args": {"do": "abort"}, "expect": "ok"}
    hang = {"op": "_selftest", "seed": 0, "args": {"do": "hang"}, "expect": "ok"}
    try:
        assert w.run(ok)["status"] == "ok"
        res = w.run(abort)
        assert res["status"] == "crash" and res["rc"] == -6, res
        assert verdict(abort, res).startswith("crash: worker died with rc -6")
        assert w.run(ok)["status"] == "ok"  # a fresh child
        res = w.run(hang, timeout=2)
        assert res["status"] == "hang" and verdict(hang, res).startswith("hang")
    finally:
        w.stop()


# ---- regressions: one per bug the fuzzer found ------------------------------------------------

B, DIMS, H = 4, [3, 5], 6


def _xs(**kw):
    return [torch.randn(B, d, **kw) for d in DIMS]


def test_zero_width_output_backward():
    """H = 0: the backward took 0 bytes from a workspace that did not exist yet (narrow of an
    undefined tensor: RuntimeError 'Expected a proper Tensor but got None')."""
    x = torch.randn(3, 2, requires_grad=True)
    w = torch.randn(0, 2, requires_grad=True)
    mmkernels.concat_project([x], w).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and w.grad.shape == (0, 2)


def test_project_concat_backward_empty_blocks():
    """H_k = 0 and d_k = 0: reshape(-1, 0) of an empty weight stack raised."""
    xs = [torch.randn(0, 0)]
    ws = [torch.randn(0, 0)]
    out = mmkernels.project_concat(xs, ws)
    gx, gw, gb = torch.ops.mmkernels.project_concat_backward(
        torch.zeros_like(out), out, xs, ws, None, None, "relu", [True, True, True])
    assert gw[0].shape == (0, 0) and gb[0].shape == (0,)


@pytest.mark.parametrize("op", ["concat", "project"])
def test_zero_subsets_matches_reference(op):
    """S = 0 subsets: the reference (torch.stack of nothing) raised; the op returns [0, B, H]."""
    from mmkernels import reference

    xs = _xs(requires_grad=True)
    m = torch.ones(0, 2, dtype=torch.bool)
    if op == "concat":
        w = torch.randn(0, H, 8, requires_grad=True)
        out, ref = (f(xs, w, subset_mask=m) for f in (mmkernels.concat_project,
                                                       reference.concat_project))
    else:
        w = [torch.randn(0, 2, 3, requires_grad=True), torch.randn(0, 4, 5, requires_grad=True)]
        out, ref = (f(xs, w, subset_mask=m) for f in (mmkernels.project_concat,
                                                       reference.project_concat))
    assert out.shape == ref.shape == (0, B, H)
    out.sum().backward()
    assert all(torch.equal(x.grad, torch.zeros_like(x)) for x in xs)


@pytest.mark.parametrize("where", ["weight", "bias", "subset_mask", "sample_mask", "xs[1]"])
def test_meta_mixed_with_cpu_raises(where):
    """A meta tensor among CPU ones sent the call to the fake kernel, which returned an
    uninitialised CPU tensor: garbage, silently."""
    xs = _xs()
    args = dict(weight=torch.randn(H, 8), bias=torch.zeros(H),
                subset_mask=torch.ones(2, 2, dtype=torch.bool),
                sample_mask=torch.ones(B, 2, dtype=torch.bool))
    if where == "xs[1]":
        xs[1] = xs[1].to("meta")
    else:
        args[where] = args[where].to("meta")
    with pytest.raises(ValueError, match=re.escape(where) + " is on meta, expected cpu"):
        mmkernels.concat_project(xs, args.pop("weight"), args.pop("bias"), **args)


def test_meta_mixed_backward_and_head_ops_raise():
    xs = _xs()
    w = torch.randn(H, 8)
    out = mmkernels.concat_project(xs, w)
    with pytest.raises(ValueError, match=r"grad_out is on meta"):
        torch.ops.mmkernels.concat_project_backward(
            torch.ones(B, H, device="meta"), out, xs, w, None, None, "relu", [True] * 3)
    with pytest.raises(ValueError, match=r"y is on meta"):
        torch.ops.mmkernels.gram(torch.randn(2, 3, 2), torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match=r"sample_weight is on meta"):
        torch.ops.mmkernels.softmax_regression_loss_grad(
            torch.randn(2, 3, 2), torch.zeros(3, dtype=torch.long), torch.zeros(2, 2, 2),
            torch.zeros(2, 2), torch.ones(3, device="meta"), 0.0)


def test_meta_call_validates_shapes():
    """All-meta calls (and torch.compile's fake tensors) check shapes like the kernels."""
    xs = [x.to("meta") for x in _xs()]
    with pytest.raises(ValueError, match=r"weight's last dim must be D = .* = 8"):
        mmkernels.concat_project(xs, torch.randn(H, 9, device="meta"))
    with pytest.raises(ValueError, match=r"weights\[1\]'s last dim must be d_1 = 5"):
        mmkernels.project_concat(xs, [torch.randn(2, 3, device="meta"),
                                      torch.randn(4, 6, device="meta")])
    out = mmkernels.concat_project(xs, torch.randn(H, 8, device="meta"))
    assert out.shape == (B, H) and out.device.type == "meta"


@pytest.mark.parametrize("call,message", [
    (lambda xs, w: mmkernels.concat_project(xs, None), r"weight must be a Tensor, got NoneType"),
    (lambda xs, w: mmkernels.concat_project(None, w), r"xs must be a list of Tensors"),
    (lambda xs, w: mmkernels.concat_project(xs[0], w), r"xs must be a list of Tensors, got Tensor"),
    (lambda xs, w: mmkernels.concat_project([1.5, xs[1]], w), r"xs must be a list of Tensors"),
    (lambda xs, w: mmkernels.project_concat(xs, w), r"weights must be a list of Tensors"),
    (lambda xs, w: mmkernels.concat_project(xs, w, activation=None), r"activation must be a str"),
])
def test_argument_types_are_named(call, message):
    """A tensor passed as xs was iterated row by row ('xs[0] must be 2-d'), None as weight
    gave 'weight has dtype UNKNOWN_SCALAR', None as xs a bare len() TypeError."""
    with pytest.raises(TypeError, match=message):
        call(_xs(), torch.randn(H, 8))


def test_none_tensor_to_the_op_is_named():
    """None for a Tensor argument of the op itself reaches C++ as an undefined tensor."""
    with pytest.raises(ValueError, match=r"concat_project: weight must be a tensor, got None"):
        torch.ops.mmkernels.concat_project(_xs(), None, None, None, None, "relu")
    xs, w = _xs(), torch.randn(H, 8)
    out = mmkernels.concat_project(xs, w)
    with pytest.raises(ValueError, match=r"out must be a tensor, got None"):
        torch.ops.mmkernels.concat_project_backward(
            torch.ones_like(out), None, xs, w, None, None, "relu", [True] * 3)


# ---- the memory budget (issue 8, section 2) ---------------------------------------------------


def test_over_budget_call_raises_with_the_bytes_before_allocating():
    """S = 4096 subsets, B = 1e6, H = 1024 on the CPU: 16 TiB of output, refused up front."""
    xs = [torch.randn(1, 2).expand(10**6, 2)]
    m = torch.ones(4096, 1, dtype=torch.bool)
    with pytest.raises(torch.OutOfMemoryError, match=r"concat_project: needs about 15.3 TiB "
                       r"\(16\d+ bytes\) for its output \[4096, 1000000, 1024\] .*memory budget "
                       r"of .* bytes"):
        mmkernels.concat_project(xs, torch.randn(1024, 2), subset_mask=m)


def test_budget_from_the_environment(monkeypatch):
    xs, w = _xs(), torch.randn(H, 8)
    ok = mmkernels.concat_project(xs, w)  # a normal call is unaffected
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "100")
    assert mmkernels.ops.memory_budget() == (100.0, "MMKERNELS_MEMORY_BUDGET=100")
    with pytest.raises(torch.OutOfMemoryError, match=r"needs about .* \((\d+) bytes\).*memory "
                       r"budget of 100 B \(100 bytes: MMKERNELS_MEMORY_BUDGET=100\)"):
        mmkernels.concat_project(xs, w)
    with pytest.raises(torch.OutOfMemoryError, match=r"project_concat_backward: needs about"):
        torch.ops.mmkernels.project_concat_backward(
            torch.ones(B, 6), torch.ones(B, 6), xs, [torch.randn(2, 3), torch.randn(4, 5)],
            None, None, "relu", [True] * 3)
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "1G")
    assert torch.equal(mmkernels.concat_project(xs, w), ok)
    assert mmkernels.ops.memory_budget()[0] == 2.0**30
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "off")
    assert mmkernels.ops.memory_budget()[0] == float("inf")
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match=r"MMKERNELS_MEMORY_BUDGET must be a byte count"):
        mmkernels.concat_project(xs, w)


@pytest.mark.parametrize("text", ["0", "0G", "0.0", "-1"])
def test_a_zero_budget_is_an_error_not_no_limit(monkeypatch, text):
    """"0" once meant "off" although the message says "> 0" (needs the extension rebuilt)."""
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", text)
    with pytest.raises(ValueError, match=rf'must be a byte count .*> 0 .*got "{text}"'):
        mmkernels.ops.memory_budget()


def test_default_budget_is_a_fraction_of_available_memory(monkeypatch):
    monkeypatch.delenv("MMKERNELS_MEMORY_BUDGET", raising=False)
    budget, source = mmkernels.ops.memory_budget("cpu")
    assert 0 < budget < float("inf") and "available" in source
