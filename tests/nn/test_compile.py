"""MaskedFusion and SubsetEnsemble under torch.compile(fullgraph=True): every fusion x fill x
dropout mode, training and eval, batch sizes that change between calls (a DataLoader's last,
partial batch), forward and backward, equal to eager.

Dropout draws random numbers; the compiled module must draw the same presence masks as eager
from the same RNG state. The full mode matrix runs on the "aot_eager" backend (Dynamo's
full-graph capture, fake tensors with symbolic batch sizes, AOTAutograd's forward and backward
graphs: where compile used to fail), a few modes on Inductor too, with fallback_random so that
its random numbers are eager's. Compiling is slow on a small machine: shapes are tiny and each
mode compiles one module.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from mmkernels.nn import MaskedFusion, SubsetEnsemble, modality_dropout

DIMS = [5, 3, 4]
F64 = torch.float64
BATCHES = (8, 5, 3)  # full batches, then smaller last ones


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test compiles its own module; no cache limits carried over
    yield
    torch._dynamo.reset()


def _batch(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, d, generator=g, dtype=F64) for d in DIMS]
    mask = torch.rand(b, len(DIMS), generator=g) < 0.6
    mask[0] = False  # a row with nothing present
    return xs, mask


def _run(module, fn, xs, mask, rng_seed):
    """Output and the gradients of every input and parameter, from a fixed RNG state."""
    xs = [x.clone().requires_grad_() for x in xs]
    module.zero_grad(set_to_none=True)
    torch.manual_seed(rng_seed)
    out = fn(xs, mask)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    grads = [x.grad for x in xs] + [p.grad for p in module.parameters()]
    return out.detach(), grads


def _assert_compiled_equals_eager(module, compiled, batches=BATCHES, no_recompile=True):
    for i, b in enumerate(batches):
        xs, mask = _batch(b, seed=b)
        # after the first call, a new batch size must reuse the dynamic graph
        with torch._dynamo.config.patch(error_on_recompile=no_recompile and i > 0):
            got, got_grads = _run(module, compiled, xs, mask, rng_seed=100 + b)
        want, want_grads = _run(module, module, xs, mask, rng_seed=100 + b)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert len(got_grads) == len(want_grads)
        for g, w in zip(got_grads, want_grads, strict=True):
            if w is None:
                assert g is None
            else:
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def _fusion(fusion: str, fill: str, dropout: float) -> MaskedFusion:
    torch.manual_seed(0)
    mod = MaskedFusion(DIMS, 4, fusion=fusion, fill=fill, dropout=dropout, dtype=F64)
    if fill == "learned":
        with torch.no_grad():
            for t in mod.tokens:
                t.normal_()
    return mod


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("fill", ["zero", "learned", "mean"])
@pytest.mark.parametrize("fusion", ["early", "late"])
def test_masked_fusion_compiles_fullgraph_dynamic_in_every_mode(fusion, fill, dropout):
    mod = _fusion(fusion, fill, dropout)
    compiled = torch.compile(mod, fullgraph=True, dynamic=True, backend="aot_eager")
    for training in (True, False):
        mod.train(training)  # the training flag is guarded on: one recompile when it flips
        _assert_compiled_equals_eager(mod, compiled)


def test_compiled_dropout_equals_eager_with_the_mask_passed_explicitly():
    # the mask the compiled module draws is modality_dropout's from the same RNG state
    mod = _fusion("late", "zero", 1.0).train()
    compiled = torch.compile(mod, fullgraph=True, dynamic=True, backend="aot_eager")
    xs, mask = _batch(6, seed=1)
    torch.manual_seed(7)
    got = compiled(xs, mask)
    torch.manual_seed(7)
    dropped = modality_dropout(mask, mod.dropout)
    assert torch.equal(dropped.sum(dim=1), mask.any(dim=1).long())  # p = 1: one modality left
    torch.testing.assert_close(got, mod.eval()(xs, dropped), rtol=1e-12, atol=1e-12)


def test_masked_fusion_default_compile_survives_a_new_batch_size():
    # The default (dynamic=None) recompiles with a symbolic batch size on the first new size:
    # the DataLoader pattern 8, 8, 5. That recompile used to crash in modality_dropout.
    mod = _fusion("early", "mean", 0.3).train()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    _assert_compiled_equals_eager(mod, compiled, batches=(8, 8, 5, 3), no_recompile=False)


def test_masked_fusion_inductor_with_dropout():
    # the largest graph (late fusion, mean fill, dropout); README's example compiles another
    mod = _fusion("late", "mean", 0.4).train()
    compiled = torch.compile(mod, fullgraph=True, dynamic=True)
    with torch._inductor.config.patch(fallback_random=True):  # eager's random numbers
        _assert_compiled_equals_eager(mod, compiled, batches=(8, 5))


# one Inductor case (late fusion, the larger graph) keeps the test time down
@pytest.mark.parametrize(("fusion", "backend"),
                         [("early", "aot_eager"), ("late", "aot_eager"), ("late", "inductor")])
def test_subset_ensemble_compiles_fullgraph_dynamic(fusion, backend):
    ens = SubsetEnsemble(DIMS, 4, 3, fusion=fusion, dtype=F64, seed=1)
    compiled = torch.compile(ens, fullgraph=True, dynamic=True, backend=backend)
    for training in (True, False):
        ens.train(training)
        _assert_compiled_equals_eager(ens, compiled, batches=BATCHES if backend == "aot_eager"
                                      else (8, 5))
    # the per-subset loss on top, compiled with the model (what a training step compiles)
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(0))

    def step(xs, mask):
        return SubsetEnsemble.losses(ens(xs, mask), y)

    xs, mask = _batch(5, seed=9)
    got = torch.compile(step, fullgraph=True, dynamic=True, backend=backend)(xs, mask)
    torch.testing.assert_close(got, step(xs, mask), rtol=1e-12, atol=1e-12)
