"""The CUDA kernels on a GPU, both backends (the fused kernels, and the cuBLAS fallback with
MMKERNELS_CUDA_BACKEND=cublas): parity with the reference on fresh random inputs (float16
included), outputs poisoned beforehand and every element checked, NaN in absent rows, float64
gradcheck, opcheck, torch.compile, CUDA graph capture and replay of the fused path (no host
sync), TF32 on and off, run-to-run determinism. Run on a machine with a GPU
(scripts/gpu_check.sh); without one the same kernels run through the host emulator in
tests/ops/test_cuda_emulated.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from test_fused_ops_parity import DTYPES, Problem, call, check, problems

import mmkernels
from mmkernels import reference
from mmkernels.subsets import all_subsets, subset_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA_DTYPES = (*DTYPES, torch.float16)


@pytest.fixture(params=["fused", "cublas"], autouse=True)
def backend(request, monkeypatch) -> str:
    """Every test runs on both CUDA backends (the variable is read at every op call)."""
    monkeypatch.setenv("MMKERNELS_CUDA_BACKEND", request.param)
    return request.param


@settings(max_examples=100, deadline=None)
@given(problems("concat_project", device="cuda", dtypes=CUDA_DTYPES))
def test_concat_project_cuda_matches_reference(problem: Problem) -> None:
    check(problem)


@settings(max_examples=100, deadline=None)
@given(problems("project_concat", device="cuda", dtypes=CUDA_DTYPES))
def test_project_concat_cuda_matches_reference(problem: Problem) -> None:
    check(problem)


def poison_allocator() -> None:
    """Leave NaN in the blocks the caching allocator hands out next."""
    for numel in (1 << 12, 1 << 16, 1 << 20, 1 << 24):
        torch.full((numel,), float("nan"), device="cuda")
    torch.cuda.synchronize()


@pytest.mark.parametrize("op", ["concat_project", "project_concat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_output_element_is_written(op: str, dtype: torch.dtype) -> None:
    widths = [64] if op == "concat_project" else [16, 32, 8]
    problem = Problem(
        op, [100, 100, 500], 3000, widths, 7, True, 0.7, True, "relu", dtype, 3, "cuda"
    )
    xs, weights, biases, smask, present = problem.tensors()
    poison_allocator()
    out = call(problem, mmkernels, xs, weights, biases, smask, present, "relu")
    ref = call(
        problem,
        reference,
        [x.double() for x in xs],
        [w.double() for w in weights],
        [b.double() for b in biases],
        smask,
        present,
        "relu",
    )
    assert torch.isfinite(out).all(), "an output element was never written"
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(
        call(
            problem,
            mmkernels,
            *[[t.requires_grad_(True) for t in ts] for ts in (xs, weights, biases)],
            smask,
            present,
            "relu",
        ).sum(),
        [*xs, *weights, *biases],
    )
    assert all(torch.isfinite(g).all() for g in grads), "a gradient element was never written"


def cuda_sample():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, d, generator=gen, dtype=torch.float64).cuda() for d in (3, 4, 2)]
    smask = subset_mask(all_subsets(3), 3).cuda()
    present = (torch.rand(6, 3, generator=gen) < 0.6).cuda()
    weight = torch.randn(7, 5, 9, generator=gen, dtype=torch.float64).cuda()
    weights = [
        torch.randn(7, h, d, generator=gen, dtype=torch.float64).cuda()
        for h, d in zip((2, 3, 4), (3, 4, 2))
    ]
    return xs, smask, present, weight, weights


def test_gradcheck_float64_on_cuda() -> None:
    xs, smask, present, weight, weights = cuda_sample()
    inputs = [t.requires_grad_(True) for t in (*xs, weight, *weights)]

    def fn(*ts):
        early = mmkernels.concat_project(
            list(ts[:3]), ts[3], subset_mask=smask, sample_mask=present
        )
        late = mmkernels.project_concat(
            list(ts[:3]), list(ts[4:]), subset_mask=smask, sample_mask=present
        )
        return early, late

    assert torch.autograd.gradcheck(fn, inputs)


def test_opcheck_on_cuda() -> None:
    xs, smask, present, weight, weights = cuda_sample()
    xs = [x.float().requires_grad_(True) for x in xs]
    weight = weight.float().requires_grad_(True)
    weights = [w.float().requires_grad_(True) for w in weights]
    torch.library.opcheck(
        torch.ops.mmkernels.concat_project.default, (xs, weight, None, smask, present, "relu")
    )
    torch.library.opcheck(
        torch.ops.mmkernels.project_concat.default, (xs, weights, [], smask, present, "relu")
    )
    out = mmkernels.concat_project(xs, weight, subset_mask=smask, sample_mask=present)
    torch.library.opcheck(
        torch.ops.mmkernels.concat_project_backward.default,
        (
            torch.randn_like(out),
            out.detach(),
            xs,
            weight,
            smask,
            present,
            "relu",
            [True, True, True],
        ),
    )


def test_compile_fullgraph_on_cuda() -> None:
    xs, smask, present, weight, _ = cuda_sample()
    xs = [x.float() for x in xs]
    weight = weight.float().requires_grad_(True)

    def loss(xs, weight):
        return (
            mmkernels.concat_project(xs, weight, subset_mask=smask, sample_mask=present)
            .square()
            .sum()
        )

    got = torch.compile(loss, fullgraph=True)(xs, weight)
    torch.testing.assert_close(got, loss(xs, weight))


def test_backward_is_deterministic_on_cuda() -> None:
    problem = Problem(
        "concat_project",
        [100, 100, 500],
        4096,
        [128],
        7,
        False,
        0.7,
        True,
        "relu",
        torch.float32,
        5,
        "cuda",
    )
    xs, weights, biases, smask, present = problem.tensors()
    inputs = [t.requires_grad_(True) for t in (*xs, *weights, *biases)]

    def run():
        out = call(problem, mmkernels, xs, weights, biases, smask, present, "relu")
        return torch.autograd.grad(out.square().sum(), inputs)

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def headline_inputs(dtype=torch.bfloat16, batch=4096, subsets=None):
    gen = torch.Generator(device="cuda").manual_seed(0)
    dims = [100, 100, 500]
    xs = [torch.randn(batch, d, device="cuda", dtype=dtype, generator=gen) for d in dims]
    w = torch.randn(256, sum(dims), device="cuda", dtype=dtype, generator=gen) / 700**0.5
    b = torch.randn(256, device="cuda", dtype=dtype, generator=gen)
    present = torch.rand(batch, 3, device="cuda", generator=gen) < 0.7
    smask = subset_mask(all_subsets(3), 3).cuda() if subsets else None
    return xs, w, b, present, smask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nan_in_absent_rows_reaches_nothing(backend: str, dtype: torch.dtype) -> None:
    if backend == "cublas":
        pytest.skip("the cuBLAS fallback multiplies absent rows by zero in grad_W")
    xs, w, b, present, _ = headline_inputs(dtype)
    poisoned = [torch.where(present[:, k : k + 1], x, float("nan")) for k, x in enumerate(xs)]
    clean = [torch.where(present[:, k : k + 1], x, 0.0) for k, x in enumerate(xs)]
    outs, grads = [], []
    for inputs in (poisoned, clean):
        leaves = [t.detach().requires_grad_(True) for t in (*inputs, w, b)]
        out = mmkernels.concat_project(leaves[:3], leaves[3], leaves[4], sample_mask=present)
        outs.append(out)
        grads.append(torch.autograd.grad(out.float().square().sum(), leaves))
    assert torch.equal(outs[0], outs[1])
    for a, c in zip(*grads):
        assert torch.equal(a, c)


@pytest.mark.parametrize("subsets", [False, True])
def test_cuda_graph_capture_and_replay(backend: str, subsets: bool) -> None:
    """The fused path never synchronises with the host, so forward and backward capture."""
    if backend == "cublas":
        pytest.skip("the cuBLAS fallback reads the masks on the host")
    xs, w, b, present, smask = headline_inputs(subsets=subsets)
    leaves = [t.detach().requires_grad_(True) for t in (*xs, w, b)]

    def step():
        out = mmkernels.concat_project(leaves[:3], leaves[3], leaves[4], subset_mask=smask,
                                       sample_mask=present)
        return (out, *torch.autograd.grad(out.float().square().sum(), leaves))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for x in xs:
        x.normal_()  # new inputs in the captured buffers (the leaves share their storage)
    graph.replay()
    fresh = step()
    torch.cuda.synchronize()
    for a, c in zip(captured, fresh):
        assert torch.equal(a, c)
    assert eager[0].shape == captured[0].shape


def test_compile_reduce_overhead(backend: str) -> None:
    if backend == "cublas":
        pytest.skip("the cuBLAS fallback reads the masks on the host")
    xs, w, b, present, smask = headline_inputs(subsets=True)

    def fn(xs, w, b):
        return mmkernels.concat_project(xs, w, b, subset_mask=smask, sample_mask=present)

    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        got = compiled(xs, w, b)
    torch.testing.assert_close(got, fn(xs, w, b), rtol=0, atol=0)


@pytest.mark.parametrize("tf32", [False, True])
def test_float32_with_and_without_tf32(backend: str, tf32: bool) -> None:
    xs, w, b, present, _ = headline_inputs(torch.float32)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        out = mmkernels.concat_project(xs, w, b, sample_mask=present)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    ref = reference.concat_project([x.double() for x in xs], w.double(), b.double(),
                                   sample_mask=present)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (3e-3 if tf32 else 1e-5), err


# ---- autocast and the Meta kernels on CUDA -----------------------------------------------------


@pytest.mark.parametrize("fusion", ["early", "late"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_under_cuda_autocast_matches_float32(fusion: str, dtype: torch.dtype) -> None:
    from test_autocast import check_training_matches_float32

    check_training_matches_float32(fusion, "cuda", dtype)


@pytest.mark.parametrize("op", ["concat_project", "project_concat"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_mixes_a_layer_output_with_float32(op: str, dtype: torch.dtype) -> None:
    """fp16 / bf16 from an autocast layer next to float32 modalities and weights."""
    from test_autocast import DIMS, fused_call, fused_params, modalities

    xs, mask = modalities("cuda")
    layer = torch.nn.Linear(DIMS[0], DIMS[0], device="cuda")
    params = fused_params(op, "cuda")
    with torch.autocast("cuda", dtype=dtype):
        first = layer(xs[0])
        assert first.dtype == dtype
        out = fused_call(op, [first, *xs[1:]], params, mask)
    assert out.dtype == dtype
    hand = [t.detach().to(dtype) for t in (first, *xs[1:], *params)]
    assert torch.equal(out, fused_call(op, hand[: len(DIMS)], hand[len(DIMS) :], mask))
    grads = torch.autograd.grad(out.float().sum(), [layer.weight, *params])
    assert all(g.dtype == torch.float32 for g in grads)
