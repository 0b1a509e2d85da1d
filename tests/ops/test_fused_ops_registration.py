"""float64 gradcheck, torch.library.opcheck on every op, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import mmkernels
from mmkernels import reference
from mmkernels.subsets import all_subsets, subset_mask


def sample(per_subset: bool, with_subsets: bool, with_sample_mask: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dims, batch, hidden = [3, 4, 2], 6, 5
    xs = [torch.randn(batch, d, generator=gen, dtype=torch.float64) for d in dims]
    smask = subset_mask(all_subsets(3), 3) if with_subsets else None
    lead = [smask.shape[0]] if per_subset else []
    weight = torch.randn(*lead, hidden, sum(dims), generator=gen, dtype=torch.float64)
    bias = torch.randn(*lead, hidden, generator=gen, dtype=torch.float64)
    weights = [
        torch.randn(*lead, h, d, generator=gen, dtype=torch.float64)
        for h, d in zip([2, 3, 4], dims)
    ]
    biases = [torch.randn(*lead, h, generator=gen, dtype=torch.float64) for h in [2, 3, 4]]
    present = torch.rand(batch, 3, generator=gen) < 0.6 if with_sample_mask else None
    return xs, weight, bias, weights, biases, smask, present


LAYOUTS = [
    pytest.param(False, False, False, id="plain"),
    pytest.param(False, False, True, id="sample-mask"),
    pytest.param(False, True, True, id="shared-weight-subsets"),
    pytest.param(True, True, False, id="per-subset"),
    pytest.param(True, True, True, id="per-subset-sample-mask"),
]


def leaf(ts):
    return [t.clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("per_subset,with_subsets,with_sample_mask", LAYOUTS)
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_gradcheck_concat_project(per_subset, with_subsets, with_sample_mask, activation):
    xs, weight, bias, *_, smask, present = sample(per_subset, with_subsets, with_sample_mask)
    inputs = leaf([*xs, weight, bias])

    def fn(*ts):
        return mmkernels.concat_project(
            list(ts[:3]),
            ts[3],
            ts[4],
            subset_mask=smask,
            sample_mask=present,
            activation=activation,
        )

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("per_subset,with_subsets,with_sample_mask", LAYOUTS)
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_gradcheck_project_concat(per_subset, with_subsets, with_sample_mask, activation):
    xs, _, _, weights, biases, smask, present = sample(per_subset, with_subsets, with_sample_mask)
    inputs = leaf([*xs, *weights, *biases])

    def fn(*ts):
        return mmkernels.project_concat(
            list(ts[:3]),
            list(ts[3:6]),
            list(ts[6:]),
            subset_mask=smask,
            sample_mask=present,
            activation=activation,
        )

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("per_subset,with_subsets,with_sample_mask", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_forward_ops(per_subset, with_subsets, with_sample_mask, dtype):
    xs, weight, bias, weights, biases, smask, present = sample(
        per_subset, with_subsets, with_sample_mask
    )
    xs, weights, biases = [
        [t.to(dtype).requires_grad_(True) for t in ts] for ts in (xs, weights, biases)
    ]
    weight, bias = weight.to(dtype).requires_grad_(True), bias.to(dtype).requires_grad_(True)
    torch.library.opcheck(
        torch.ops.mmkernels.concat_project.default, (xs, weight, bias, smask, present, "relu")
    )
    torch.library.opcheck(
        torch.ops.mmkernels.concat_project.default, (xs, weight, None, smask, present, "none")
    )
    torch.library.opcheck(
        torch.ops.mmkernels.project_concat.default, (xs, weights, biases, smask, present, "relu")
    )
    torch.library.opcheck(
        torch.ops.mmkernels.project_concat.default, (xs, weights, [], smask, present, "none")
    )


@pytest.mark.parametrize("per_subset,with_subsets,with_sample_mask", LAYOUTS)
@pytest.mark.parametrize(
    "output_mask", [[True, True, True], [False, True, False], [True, False, True]]
)
def test_opcheck_backward_ops(per_subset, with_subsets, with_sample_mask, output_mask):
    xs, weight, bias, weights, biases, smask, present = sample(
        per_subset, with_subsets, with_sample_mask
    )
    out = mmkernels.concat_project(xs, weight, bias, subset_mask=smask, sample_mask=present)
    torch.library.opcheck(
        torch.ops.mmkernels.concat_project_backward.default,
        (torch.randn_like(out), out, xs, weight, smask, present, "relu", output_mask),
    )
    out = mmkernels.project_concat(xs, weights, biases, subset_mask=smask, sample_mask=present)
    torch.library.opcheck(
        torch.ops.mmkernels.project_concat_backward.default,
        (torch.randn_like(out), out, xs, weights, smask, present, "relu", output_mask),
    )


def test_torch_compile_fullgraph_forward_and_backward():
    xs, weight, bias, weights, biases, smask, present = sample(True, True, True)
    xs = [x.float() for x in xs]
    weight, bias = weight.float().requires_grad_(True), bias.float()
    weights = [w.float().requires_grad_(True) for w in weights]
    biases = [b.float() for b in biases]

    def model(xs, weight, bias, weights, biases):
        early = mmkernels.concat_project(xs, weight, bias, subset_mask=smask, sample_mask=present)
        late = mmkernels.project_concat(xs, weights, biases, subset_mask=smask, sample_mask=present)
        return early.square().sum() + late.sum()

    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(xs, weight, bias, weights, biases)
    grads = torch.autograd.grad(loss, [weight, *weights])
    expected = model(xs, weight, bias, weights, biases)
    expected_grads = torch.autograd.grad(expected, [weight, *weights])
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    ref = reference.concat_project(xs, weight, bias, subset_mask=smask, sample_mask=present)
    torch.testing.assert_close(
        mmkernels.concat_project(xs, weight, bias, subset_mask=smask, sample_mask=present), ref
    )


def _layouts(ts):
    return [(tuple(t.shape), t.stride(), t.dtype) for t in ts]


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for part in result for t in _flat(part)]


@pytest.mark.parametrize(
    "output_mask", [[True, True, True], [False, True, False], [True, False, True]]
)
def test_fake_outputs_have_the_real_kernels_layout(output_mask):
    """Transposed inputs, and a modality no subset uses (its weight gradient is all zeros):
    the real kernels return contiguous tensors, and the meta and fake kernels say so."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(0)
    dims, batch, S = [3, 4], 5, 2

    def transposed(*shape):
        return torch.randn(*reversed(shape), generator=gen).t() if len(shape) == 2 else (
            torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2))

    xs = [transposed(batch, d) for d in dims]
    smask = torch.tensor([[True, False], [True, False]])
    weight = transposed(S, 6, sum(dims))
    weights = [transposed(S, h, d) for h, d in zip([2, 3], dims)]
    assert not any(t.is_contiguous() for t in (*xs, weight, *weights))
    calls = [
        (torch.ops.mmkernels.concat_project, (xs, weight, None, smask, None, "relu")),
        (torch.ops.mmkernels.project_concat, (xs, weights, [], smask, None, "relu")),
    ]
    for forward, backward in ((calls[0], torch.ops.mmkernels.concat_project_backward),
                              (calls[1], torch.ops.mmkernels.project_concat_backward)):
        op, args = forward
        out = op(*args)
        grad = torch.randn(out.shape[::-1], generator=gen).permute(2, 1, 0)
        calls.append((backward, (grad, out, xs, args[1], smask, None, "relu", output_mask)))

    def on(device_fn, args):
        return [device_fn(a) if isinstance(a, torch.Tensor) else
                [device_fn(t) for t in a] if isinstance(a, list) and a and
                isinstance(a[0], torch.Tensor) else a for a in args]

    mode = FakeTensorMode()
    for op, args in calls:
        real = _layouts(_flat(op(*args)))
        assert all(stride == torch.empty(shape).stride() for shape, stride, _ in real)
        assert _layouts(_flat(op(*on(lambda t: t.to("meta"), args)))) == real
        fake_args = on(mode.from_tensor, args)
        with mode:
            assert _layouts(_flat(op(*fake_args))) == real


@pytest.mark.parametrize("per_subset,with_subsets,with_sample_mask", LAYOUTS)
def test_torch_compile_dynamic_shapes(per_subset, with_subsets, with_sample_mask):
    """fullgraph=True, dynamic=True: the C++ Meta kernels run on symbolic sizes; a second and a
    third batch size reuse the graph, forward and backward."""
    torch._dynamo.reset()

    def model(xs, weight, bias, weights, biases, smask, present):
        early = mmkernels.concat_project(xs, weight, bias, subset_mask=smask, sample_mask=present)
        late = mmkernels.project_concat(xs, weights, biases, subset_mask=smask,
                                        sample_mask=present)
        return early.square().sum() + late.sum()

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for batch_seed in (0, 1, 2):
        xs, weight, bias, weights, biases, smask, present = sample(
            per_subset, with_subsets, with_sample_mask, seed=batch_seed
        )
        rows = 6 + 3 * batch_seed
        xs = [torch.cat([x] * 3)[:rows].float().requires_grad_(True) for x in xs]
        present = None if present is None else torch.cat([present] * 3)[:rows]
        params = [weight, bias, *weights, *biases]
        params = [p.float().requires_grad_(True) for p in params]
        args = (xs, params[0], params[1], params[2:5], params[5:], smask, present)
        got = compiled(*args)
        got_grads = torch.autograd.grad(got, [*xs, *params])
        want = model(*args)
        want_grads = torch.autograd.grad(want, [*xs, *params])
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w)
    assert counter.frame_count == 1, "a new batch size recompiled the graph"
