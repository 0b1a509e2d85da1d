"""nn.MaskedFusion and nn.SubsetEnsemble: semantics against plain PyTorch, initialisation, and
training equivalence of the ensemble with S separately trained models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mmkernels import reference
from mmkernels.nn import (
    MaskedFusion,
    SubsetEnsemble,
    clip_grad_norm_per_subset,
    linear_init_,
    modality_dropout,
)
from mmkernels.subsets import all_subsets

DIMS = [5, 3, 4]
F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # MaskedFusion initialises from the global RNG, like nn.Linear


def _data(n=24, dims=DIMS, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g, dtype=dtype) for d in dims]
    mask = torch.rand(n, len(dims), generator=g) < 0.7
    mask[0] = False  # one row with nothing present
    return xs, mask


# ---- MaskedFusion -----------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_fusion_zero_fill_matches_reference_and_dict_input(fusion):
    xs, mask = _data()
    mod = MaskedFusion({"t": 5, "a": 3, "v": 4}, 6, fusion=fusion, dtype=F64)
    out = mod(xs, mask)
    if fusion == "early":
        ref = reference.concat_project(xs, mod.weight, mod.bias, sample_mask=mask)
    else:
        ref = reference.project_concat(xs, list(mod.weights), list(mod.biases), sample_mask=mask)
    torch.testing.assert_close(out, ref)
    named = mod(dict(zip("tav", xs, strict=True)), {n: mask[:, j] for j, n in enumerate("tav")})
    torch.testing.assert_close(named, out)
    assert out.shape == (24, mod.out_features)
    with pytest.raises(ValueError, match="keys"):
        mod({"t": xs[0], "a": xs[1]})
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        mod([xs[0], xs[0], xs[2]])


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_fusion_learned_fill_substitutes_tokens(fusion):
    xs, mask = _data()
    mod = MaskedFusion(DIMS, 6, fusion=fusion, fill="learned", dtype=F64)
    with torch.no_grad():
        for t in mod.tokens:
            t.normal_()
    filled = [torch.where(mask[:, k : k + 1], x, mod.tokens[k].expand_as(x)) for k, x in
              enumerate(xs)]
    if fusion == "early":
        ref = reference.concat_project(filled, mod.weight, mod.bias)
    else:
        ref = reference.project_concat(filled, list(mod.weights), list(mod.biases))
    out = mod(xs, mask)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in mod.tokens)


def test_fusion_mean_fill_early_scales_by_k_over_present():
    xs, mask = _data()
    mod = MaskedFusion(DIMS, 6, fusion="early", fill="mean", dtype=F64)
    num = mask.sum(1, keepdim=True).double()
    scale = torch.where(num > 0, 3 / num.clamp(min=1), torch.ones_like(num))
    ref = reference.concat_project([x * scale for x in xs], mod.weight, mod.bias, sample_mask=mask)
    torch.testing.assert_close(mod(xs, mask), ref)
    # no mask: identical to zero fill
    torch.testing.assert_close(mod(xs), reference.concat_project(xs, mod.weight, mod.bias))


def test_fusion_mean_fill_late_blocks_are_mean_of_present():
    xs, mask = _data()
    mod = MaskedFusion(DIMS, 4, fusion="late", fill="mean", dtype=F64)
    out = mod(xs, mask).view(-1, 3, 4)
    full = reference.project_concat(xs, list(mod.weights), list(mod.biases)).view(-1, 3, 4)
    for b in range(out.shape[0]):
        present = mask[b].nonzero().flatten().tolist()
        if not present:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        mean = full[b, present].mean(0)
        for k in range(3):
            torch.testing.assert_close(out[b, k], full[b, k] if k in present else mean)
    with pytest.raises(ValueError, match="equal widths"):
        MaskedFusion(DIMS, [4, 5, 4], fusion="late", fill="mean")


def test_modality_dropout_rule():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(500, 4, generator=g) < 0.8
    mask[:5] = False
    kept = modality_dropout(mask, torch.tensor([1.0, 1.0, 1.0, 1.0]), generator=g)
    assert not (kept & ~mask).any()
    # everything drawn to drop: exactly one present modality survives; empty rows stay empty
    assert torch.equal(kept.sum(1), mask.any(1).long())
    kept = modality_dropout(mask, torch.tensor([0.0, 0.5, 0.0, 0.0]), generator=g)
    assert torch.equal(kept[:, [0, 2, 3]], mask[:, [0, 2, 3]])
    assert (kept[:, 1] != mask[:, 1]).any()


def test_modality_dropout_draws_the_same_from_the_global_rng_and_a_generator():
    # the draws depend on the RNG state only: not on the mask's values, layout or on whether
    # a sample lost everything (no data-dependent draw, which torch.compile could not trace)
    mask = torch.rand(40, 3, generator=torch.Generator().manual_seed(2)) < 0.7
    p = torch.tensor([0.9, 0.2, 0.5])
    torch.manual_seed(3)
    from_global = modality_dropout(mask, p)
    after_global = torch.rand(1)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(modality_dropout(mask, [0.9, 0.2, 0.5], generator=g), from_global)
    assert torch.equal(torch.rand(1, generator=g), after_global)  # the same number of draws
    torch.manual_seed(3)
    assert torch.equal(modality_dropout(mask.t().contiguous().t(), p), from_global)


def test_fusion_dropout_only_in_training():
    xs, _ = _data()
    mod = MaskedFusion(DIMS, 6, dropout=1.0, dtype=F64)
    mod.eval()
    torch.testing.assert_close(mod(xs), reference.concat_project(xs, mod.weight, mod.bias))
    mod.train()
    torch.manual_seed(0)
    out = mod(xs)
    # every sample keeps exactly one modality: the output is one block's projection
    assert not torch.allclose(out, reference.concat_project(xs, mod.weight, mod.bias))


# ---- SubsetEnsemble: initialisation, forward, latents ------------------------------------------


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_ensemble_init_equals_separate_linear_init(fusion):
    ens = SubsetEnsemble(DIMS, 6, 3, fusion=fusion, seed=7)
    for s, subset in enumerate(ens.subsets):
        g = torch.Generator().manual_seed(7 * 2**20 + sum(1 << k for k in subset))
        layers = [torch.nn.Linear(sum(DIMS), 6)] if fusion == "early" else \
            [torch.nn.Linear(d, 6) for d in DIMS]
        layers.append(torch.nn.Linear(ens.latent_dim, 3))
        for lin in layers:
            linear_init_(lin.weight, lin.bias, g)
        model = ens.subset_model(s)
        got = [p for p in model.parameters()]
        want = [p for lin in layers for p in (lin.weight, lin.bias)]
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    # a subset's init does not depend on the other subsets in the ensemble
    small = SubsetEnsemble(DIMS, 6, 3, fusion=fusion, seed=7, subsets=[(0, 2)])
    s = ens.subsets.index((0, 2))
    for a, b in zip(small.subset_model(0).parameters(), ens.subset_model(s).parameters(),
                    strict=True):
        assert torch.equal(a, b)


def test_linear_init_matches_nn_linear_reset_parameters():
    torch.manual_seed(3)
    lin = torch.nn.Linear(7, 5)
    other = torch.nn.Linear(7, 5)
    torch.manual_seed(3)
    linear_init_(other.weight, other.bias, torch.default_generator)
    assert torch.equal(lin.weight, other.weight) and torch.equal(lin.bias, other.bias)


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_ensemble_forward_and_latents(fusion):
    xs, mask = _data()
    ens = SubsetEnsemble(DIMS, 6, 3, fusion=fusion, dtype=F64)
    assert ens.num_subsets == 7 and ens.subset_names == ["A", "B", "C", "AB", "AC", "BC", "ABC"]
    out = ens(xs, mask)
    assert out.shape == (7, 24, 3)
    for s in range(7):
        torch.testing.assert_close(out[s], ens.subset_model(s)(xs, mask))
    z = ens.latents(xs, mask, chunk_size=5)
    assert z.shape == (7, 24, ens.latent_dim) and not z.requires_grad
    torch.testing.assert_close(z, ens.encode(xs, mask).detach())
    # usable as an encoder callable: list of modality tensors -> [S, n, H]
    encoder = ens.latents
    assert encoder(xs).shape == (7, 24, ens.latent_dim)


# ---- training equivalence -----------------------------------------------------------------------


def _targets(task, n, g):
    if task == "classification":
        return torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 3, generator=g, dtype=F64)


@pytest.mark.parametrize("fusion", ["early", "late"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_ensemble_training_equals_separate_models(fusion, task):
    n, epochs, batch = 40, 3, 16
    xs, mask = _data(n=n, seed=2)
    g = torch.Generator().manual_seed(5)
    y = _targets(task, n, g)
    ens = SubsetEnsemble(DIMS, 6, 3, fusion=fusion, dtype=F64, seed=1)
    models = [ens.subset_model(s) for s in range(ens.num_subsets)]
    opt = torch.optim.Adam(ens.parameters(), lr=0.01, weight_decay=1e-3)
    opts = [torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=1e-3) for m in models]
    loss_fn = F.cross_entropy if task == "classification" else F.mse_loss
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch):
            xb, yb, mb = [x[idx] for x in xs], y[idx], mask[idx]
            opt.zero_grad()
            ens.losses(ens(xb, mb), yb, task).sum().backward()
            opt.step()
            for m, o in zip(models, opts, strict=True):
                o.zero_grad()
                loss_fn(m(xb, mb), yb).backward()
                o.step()
    for s, m in enumerate(models):
        for a, b in zip(ens.subset_model(s).parameters(), m.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        # the parameters actually moved
        assert not torch.equal(next(iter(m.parameters())),
                               next(iter(SubsetEnsemble(DIMS, 6, 3, fusion=fusion, dtype=F64,
                                                        seed=1).subset_model(s).parameters())))


def test_clip_grad_norm_per_subset_matches_separate_clipping():
    xs, mask = _data(seed=3)
    y = torch.randint(0, 3, (24,))
    ens = SubsetEnsemble(DIMS, 6, 3, fusion="late", dtype=F64)
    models = [ens.subset_model(s) for s in range(7)]
    ens.losses(ens(xs, mask), y).sum().backward()
    norms = clip_grad_norm_per_subset(ens, 0.05)
    for s, m in enumerate(models):
        F.cross_entropy(m(xs, mask), y).backward()
        ref = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
        torch.testing.assert_close(norms[s], ref)
        grads = [ens.enc_weights[k].grad[s] for k in range(3)]
        torch.testing.assert_close(grads[0], m[0].linears[0].weight.grad)
        torch.testing.assert_close(ens.head_weight.grad[s], m[1].weight.grad)


def test_ensemble_argument_errors():
    with pytest.raises(ValueError, match="fusion"):
        SubsetEnsemble(DIMS, 6, 3, fusion="middle")
    with pytest.raises(ValueError, match="subsets"):
        SubsetEnsemble(DIMS, 6, 3, subsets=[()])
    ens = SubsetEnsemble(DIMS, 6, 3, subsets=all_subsets(3, min_size=2))
    assert ens.num_subsets == 4
    with pytest.raises(ValueError, match="expected 3 modality tensors"):
        ens([torch.randn(2, 5)])
    with pytest.raises(ValueError, match="mask"):
        ens([torch.randn(2, d) for d in DIMS], torch.ones(3, 3, dtype=torch.bool))


# ---- property tests against plain PyTorch ------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    dims=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    hidden=st.integers(1, 5),
    batch=st.integers(0, 7),
    fusion=st.sampled_from(["early", "late"]),
    seed=st.integers(0, 2**16),
)
def test_property_ensemble_forward_equals_subset_models(dims, hidden, batch, fusion, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, d, generator=g, dtype=F64) for d in dims]
    mask = torch.rand(batch, len(dims), generator=g) < 0.6
    ens = SubsetEnsemble(dims, hidden, 2, fusion=fusion, dtype=F64, seed=seed)
    out = ens(xs, mask)
    assert out.shape == (2 ** len(dims) - 1, batch, 2)
    for s in range(ens.num_subsets):
        torch.testing.assert_close(out[s], ens.subset_model(s)(xs, mask))


@settings(max_examples=30, deadline=None)
@given(
    dims=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    hidden=st.lists(st.integers(1, 5), min_size=5, max_size=5),
    batch=st.integers(0, 9),
    picks=st.sets(st.integers(0, 30), min_size=1, max_size=8),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_late_forward_equals_head_of_padded_latent(dims, hidden, batch, picks, masked,
                                                            seed):
    # forward() of late fusion works modality by modality; head(encode()) is the padded
    # latent's definition. Outputs and every gradient agree, on any subset list (modalities
    # no subset uses included) and with NaN in the absent rows.
    k = len(dims)
    every = all_subsets(k)
    subsets = sorted({every[i % len(every)] for i in picks})
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, d, generator=g, dtype=F64) for d in dims]
    mask = torch.rand(batch, k, generator=g) < 0.6 if masked else None
    if mask is not None:
        for j, x in enumerate(xs):
            x[~mask[:, j]] = float("nan")
    ens = SubsetEnsemble(dims, hidden[:k], 3, subsets=subsets, fusion="late", dtype=F64,
                         seed=seed)
    weights = torch.randn(len(subsets), batch, 3, generator=g, dtype=F64)
    grads = []
    for out in (ens(xs, mask), ens.head(ens.encode(xs, mask))):
        grads.append([out.detach(), *torch.autograd.grad(
            (out * weights).sum(), list(ens.parameters()), allow_unused=True,
            materialize_grads=True)])  # the encoder of a modality no subset uses: zeros
    for a, b in zip(*grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    dims=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    batch=st.integers(1, 7),
    fusion=st.sampled_from(["early", "late"]),
    fill=st.sampled_from(["zero", "learned", "mean"]),
    seed=st.integers(0, 2**16),
)
def test_property_fusion_fill_semantics(dims, batch, fusion, fill, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, d, generator=g, dtype=F64) for d in dims]
    mask = torch.rand(batch, len(dims), generator=g) < 0.6
    mod = MaskedFusion(dims, 3, fusion=fusion, fill=fill, dtype=F64)
    if fill == "learned":
        with torch.no_grad():
            for t in mod.tokens:
                t.normal_(generator=g)
    out = mod(xs, mask)
    k = len(dims)
    # plain PyTorch, row by row
    for b in range(batch):
        present = [j for j in range(k) if mask[b, j]]
        if fusion == "early":
            blocks = []
            for j in range(k):
                if j in present:
                    scale = k / len(present) if fill == "mean" else 1.0
                    blocks.append(xs[j][b] * scale)
                elif fill == "learned":
                    blocks.append(mod.tokens[j])
                else:
                    blocks.append(torch.zeros(dims[j], dtype=F64))
            want = torch.relu(F.linear(torch.cat(blocks), mod.weight, mod.bias))
        else:
            outs = []
            for j in range(k):
                src = xs[j][b] if (j in present or fill != "learned") else mod.tokens[j]
                outs.append(torch.relu(F.linear(src, mod.weights[j], mod.biases[j])))
            for j in range(k):
                if j not in present and fill != "learned":
                    outs[j] = (torch.stack([outs[i] for i in present]).mean(0)
                               if fill == "mean" and present else torch.zeros(3, dtype=F64))
            want = torch.cat(outs)
        torch.testing.assert_close(out[b], want.detach())


# ---- module conventions: extra_repr, reset_parameters ----------------------------------------


def test_masked_fusion_repr_states_its_configuration():
    text = repr(MaskedFusion({"text": 5, "audio": 3}, 4, fusion="late", fill="learned",
                             dropout={"text": 0.2}))
    assert ("dims={'text': 5, 'audio': 3}, hidden=[4, 4], fusion='late', fill='learned', "
            "dropout={'text': 0.2, 'audio': 0.0}, activation='relu', bias=True") in text
    assert repr(MaskedFusion([5, 3], 4, dropout=0.1, bias=False)) == (
        "MaskedFusion(dims=[5, 3], hidden=4, fusion='early', fill='zero', dropout=0.1, "
        "activation='relu', bias=False)")
    with pytest.raises(ValueError, match=r"unknown modalities \['txt'\]"):
        MaskedFusion({"text": 5, "audio": 3}, 4, dropout={"txt": 0.2})


def test_subset_ensemble_repr_states_its_configuration():
    assert repr(SubsetEnsemble(DIMS, 6, 3, seed=2)) == (
        "SubsetEnsemble(dims=[5, 3, 4], hidden=6, num_outputs=3, fusion='early', "
        "activation='relu', num_subsets=7, seed=2)")
    late = SubsetEnsemble({"t": 5, "a": 3}, [4, 2], 2, fusion="late", subsets=[(0,), (0, 1)])
    assert ("dims={'t': 5, 'a': 3}, hidden=[4, 2], num_outputs=2, fusion='late', "
            "activation='relu', num_subsets=2, seed=0") in repr(late)


@pytest.mark.parametrize("fill", ["zero", "learned"])
@pytest.mark.parametrize("fusion", ["early", "late"])
def test_masked_fusion_reset_parameters_draws_like_nn_linear(fusion, fill):
    torch.manual_seed(4)
    mod = MaskedFusion(DIMS, 6, fusion=fusion, fill=fill)
    torch.manual_seed(4)
    layers = [torch.nn.Linear(sum(DIMS), 6)] if fusion == "early" else \
        [torch.nn.Linear(d, 6) for d in DIMS]
    want = [p for lin in layers for p in (lin.weight, lin.bias)]
    got = [mod.weight, mod.bias] if fusion == "early" else \
        [p for w, b in zip(mod.weights, mod.biases, strict=True) for p in (w, b)]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    # reset_parameters: the same draws from the same RNG state, and tokens back to zero
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(1.0)
    torch.manual_seed(4)
    mod.reset_parameters()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    if fill == "learned":
        assert all(torch.equal(t, torch.zeros_like(t)) for t in mod.tokens)


def test_subset_ensemble_reset_parameters_restores_its_seeded_initialisation():
    ens = SubsetEnsemble(DIMS, 6, 3, fusion="late", seed=5)
    init = [p.detach().clone() for p in ens.parameters()]
    with torch.no_grad():
        for p in ens.parameters():
            p.mul_(3.0).add_(1.0)
    torch.manual_seed(123)  # the global RNG plays no part: each subset has its own seed
    ens.reset_parameters()
    for a, b in zip(ens.parameters(), init, strict=True):
        assert torch.equal(a, b)
