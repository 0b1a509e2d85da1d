"""Autocast: under torch.autocast the fused ops cast their floating inputs to the autocast dtype
(the C++ AutocastCPU / AutocastCUDA kernels, csrc/autocast), accumulate in float32, return the
autocast dtype, and give each input its gradient in its own dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_matches_oracle
from torch import nn

import mmkernels
from mmkernels import reference
from mmkernels.nn import MaskedFusion

DIMS, B, H = [6, 5, 9], 48, 8


def modalities(device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, d, generator=gen).to(device) for d in DIMS]
    mask = (torch.rand(B, len(DIMS), generator=gen) < 0.7).to(device)
    return xs, mask


def fused_call(op: str, xs, params, mask):
    if op == "concat_project":
        return mmkernels.concat_project(xs, params[0], params[1], sample_mask=mask)
    k = len(DIMS)
    return mmkernels.project_concat(xs, params[:k], params[k:], sample_mask=mask)


def fused_params(op: str, device: str):
    gen = torch.Generator().manual_seed(1)
    if op == "concat_project":
        shapes = [(H, sum(DIMS)), (H,)]
    else:
        shapes = [(H, d) for d in DIMS] + [(H,)] * len(DIMS)
    return [torch.randn(*s, generator=gen).to(device).requires_grad_(True) for s in shapes]


@pytest.mark.parametrize("op", ["concat_project", "project_concat"])
def test_a_bfloat16_layer_output_mixes_with_float32_tensors(op: str) -> None:
    """An autocast layer hands the op bfloat16 next to float32 modalities and weights (this
    raised "xs[1] has dtype Float, expected BFloat16"); the op equals the same call with every
    input cast by hand, and each input's gradient comes back in its own dtype."""
    xs, mask = modalities("cpu")
    layer = nn.Linear(DIMS[0], DIMS[0])
    params = fused_params(op, "cpu")
    raw = [x.clone().requires_grad_(True) for x in xs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = layer(raw[0])
        assert first.dtype == torch.bfloat16
        out = fused_call(op, [first, *raw[1:]], params, mask)
    assert out.dtype == torch.bfloat16
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    leaves = [layer.weight, layer.bias, *raw[1:], *params]
    grads = torch.autograd.grad(out, leaves, grad_out)
    for t, g in zip(leaves, grads):
        assert g.dtype == t.dtype == torch.float32

    # By hand, outside autocast: the same casts, the same op.
    hand = [t.detach().bfloat16().requires_grad_(True) for t in (first, *raw[1:], *params)]
    expected = fused_call(op, hand[: len(DIMS)], hand[len(DIMS) :], mask)
    assert torch.equal(out, expected)
    hand_grads = torch.autograd.grad(expected, hand[1:], grad_out)
    for g, h in zip(grads[2:], hand_grads):
        assert torch.equal(g, h.float())


def test_outside_autocast_mixed_dtypes_are_still_an_error() -> None:
    xs, _ = modalities("cpu")
    with pytest.raises(ValueError, match=r"xs\[1\] has dtype Float, expected BFloat16"):
        mmkernels.concat_project([xs[0].bfloat16(), *xs[1:]], torch.randn(H, sum(DIMS)))


def test_float64_is_not_cast() -> None:
    """Autocast leaves float64 alone (torch's rule), so a float64 call stays float64."""
    xs, mask = modalities("cpu")
    xs = [x.double() for x in xs]
    w = torch.randn(H, sum(DIMS), dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mmkernels.concat_project(xs, w, sample_mask=mask)
    assert out.dtype == torch.float64
    assert torch.equal(out, mmkernels.concat_project(xs, w, sample_mask=mask))


def test_float16_on_the_cpu_says_it_is_cuda_only() -> None:
    xs, _ = modalities("cpu")
    w = torch.randn(H, sum(DIMS))
    message = (r"xs\[0\] must be float32, float64 or bfloat16, got Half "
               r"\(float16 is supported on CUDA only\)")
    with pytest.raises(ValueError, match=message):
        mmkernels.concat_project([x.half() for x in xs], w.half())
    with pytest.raises(ValueError, match=message), torch.autocast("cpu", dtype=torch.float16):
        mmkernels.concat_project(xs, w)


class Net(nn.Module):
    """A MaskedFusion encoder and a linear head; `plain` runs the same parameters through the
    plain-PyTorch reference (autocast's own ops), the comparison run of the oracle rule."""

    def __init__(self, fusion: str, device: str, plain: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.encoder = MaskedFusion(DIMS, H, fusion=fusion, device=device)
        self.head = nn.Linear(self.encoder.out_features, 3, device=device)
        self.plain = plain

    def forward(self, xs, mask):
        enc = self.encoder
        if not self.plain:
            z = enc(xs, mask)
        elif enc.fusion == "early":
            z = reference.concat_project(xs, enc.weight, enc.bias, sample_mask=mask)
        else:
            z = reference.project_concat(xs, list(enc.weights), list(enc.biases), sample_mask=mask)
        return self.head(z)


def train(net: Net, xs, mask, y, dtype: torch.dtype | None, steps: int = 5) -> torch.Tensor:
    """A few Adam steps (autocast in `dtype`, or none); the logits of every step, stacked."""
    device = xs[0].device.type
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    logits = []
    for _ in range(steps):
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = net(xs, mask)
            loss = F.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad.dtype == p.dtype == torch.float32 for p in net.parameters())
        opt.step()
        logits.append(out.detach())
    return torch.stack(logits)


def check_training_matches_float32(fusion: str, device: str, dtype: torch.dtype) -> None:
    """Trained under autocast, the model's logits at every step match the float32 run as
    closely as the same model on plain PyTorch ops under the same autocast does (the oracle
    rule, tests/oracle.py, with the autocast dtype's rounding unit)."""
    xs, mask = modalities(device)
    with torch.autocast(device, dtype=dtype):  # the fused op itself runs in the autocast dtype
        assert Net(fusion, device).encoder(xs, mask).dtype == dtype
    y = torch.randint(3, (B,), generator=torch.Generator().manual_seed(4)).to(device)
    ours = train(Net(fusion, device), xs, mask, y, dtype)
    same = train(Net(fusion, device, plain=True), xs, mask, y, dtype)
    oracle = train(Net(fusion, device), xs, mask, y, None)
    assert ours.dtype == same.dtype == dtype
    assert_matches_oracle(ours, same, oracle, f"{fusion} fusion under autocast", max(sum(DIMS), B))


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_training_under_cpu_autocast_matches_float32(fusion: str) -> None:
    check_training_matches_float32(fusion, "cpu", torch.bfloat16)


def test_autocast_inside_a_compiled_function() -> None:
    """torch.compile traces the autocast region through the Autocast and Meta kernels."""
    xs, mask = modalities("cpu")
    w = torch.randn(H, sum(DIMS), requires_grad=True)

    def f(xs, w, mask):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mmkernels.concat_project(xs, w, sample_mask=mask)

    out = torch.compile(f, fullgraph=True)(xs, w, mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, f(xs, w, mask))
    (grad,) = torch.autograd.grad(out.float().sum(), [w])
    assert grad.dtype == torch.float32
