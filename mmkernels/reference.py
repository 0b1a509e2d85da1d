"""Plain-PyTorch implementations of every op: the test oracle and the benchmarks' baseline.

They follow the design literally: build the masked concatenation, apply nn.functional.linear
and the activation, and loop over subsets; the head-refit ops (gram,
softmax_regression_loss_grad) build the intercept column and use autograd. The modules at the
end are one subset's model of a SubsetEnsemble as plain nn.Linear layers
(SubsetEnsemble.subset_model builds them).
"Absent" is a zero block, chosen with torch.where so that whatever an absent row holds (even
NaN or Inf) reaches neither the result nor a gradient: absent rows are selected out before any
product, never multiplied by zero (0 * NaN is NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["concat_project", "project_concat", "presence", "gram",
           "softmax_regression_loss_grad", "MaskedConcat", "MaskedLateEncoder", "SubsetModel"]


def _activate(z: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "none":
        return z
    raise ValueError(f'activation must be "relu" or "none", got "{activation}"')


def presence(
    num_rows: int,
    num_modalities: int,
    subset_row: Tensor | None,
    sample_mask: Tensor | None,
    device: torch.device,
) -> Tensor:
    """present(b, k) for one subset row: bool [B, K]."""
    keep = torch.ones(num_rows, num_modalities, dtype=torch.bool, device=device)
    if subset_row is not None:
        keep = keep & subset_row.to(device).view(1, -1)
    if sample_mask is not None:
        keep = keep & sample_mask
    return keep


def _empty(shape: list[int], inputs: Sequence[Tensor | None]) -> Tensor:
    """An empty result that still depends on the inputs (autograd gives them zero grads)."""
    out = inputs[0].new_zeros(shape)
    for t in inputs:
        if t is not None:
            out = out + 0 * t.sum()
    return out


def _subset_rows(subset_mask: Tensor | None) -> list[Tensor | None]:
    return [None] if subset_mask is None else list(subset_mask)


def concat_project(
    xs: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    subset_mask: Tensor | None = None,
    sample_mask: Tensor | None = None,
    activation: str = "relu",
) -> Tensor:
    """act(Linear(cat(masked xs))), one subset at a time."""
    batch = xs[0].shape[0]
    outs = []
    for s, row in enumerate(_subset_rows(subset_mask)):
        keep = presence(batch, len(xs), row, sample_mask, xs[0].device)
        masked = [torch.where(keep[:, k : k + 1], x, torch.zeros_like(x)) for k, x in enumerate(xs)]
        w = weight[s] if weight.dim() == 3 else weight
        b = None if bias is None else (bias[s] if bias.dim() == 2 else bias)
        outs.append(_activate(F.linear(torch.cat(masked, dim=1), w, b), activation))
    if not outs:  # S = 0 subsets: an empty [0, B, H]
        return _empty([0, batch, weight.shape[-2]], [*xs, weight, bias])
    return outs[0] if subset_mask is None else torch.stack(outs)


def project_concat(
    xs: Sequence[Tensor],
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] | None = None,
    *,
    subset_mask: Tensor | None = None,
    sample_mask: Tensor | None = None,
    activation: str = "relu",
) -> Tensor:
    """cat_k(present * act(Linear_k(x_k))), one subset at a time."""
    batch = xs[0].shape[0]
    outs = []
    for s, row in enumerate(_subset_rows(subset_mask)):
        keep = presence(batch, len(xs), row, sample_mask, xs[0].device)
        blocks = []
        for k, x in enumerate(xs):
            w = weights[k][s] if weights[k].dim() == 3 else weights[k]
            b = None if biases is None else (biases[k][s] if biases[k].dim() == 2 else biases[k])
            # Select before the product too: the weight gradient sums over the rows of x.
            present = keep[:, k : k + 1]
            y = _activate(F.linear(torch.where(present, x, torch.zeros_like(x)), w, b), activation)
            blocks.append(torch.where(present, y, torch.zeros_like(y)))
        outs.append(torch.cat(blocks, dim=1))
    if not outs:  # S = 0 subsets: an empty [0, B, sum H_k]
        return _empty([0, batch, sum(w.shape[-2] for w in weights)],
                      [*xs, *weights, *(biases or [])])
    return outs[0] if subset_mask is None else torch.stack(outs)



def gram(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """mmkernels::gram: per subset the intercept-augmented Gram (A^T A [S, H+1, H+1]) and
    A^T y ([S, H+1, T]) with A = [z_s, 1], for z [S, n, H] and y [n, T]; in z's dtype."""
    a = torch.cat([z, torch.ones(*z.shape[:2], 1, dtype=z.dtype, device=z.device)], 2)
    return a.transpose(1, 2) @ a, a.transpose(1, 2) @ y.to(z.dtype)


def softmax_regression_loss_grad(
    z: Tensor, y: Tensor, w: Tensor, b: Tensor, sample_weight: Tensor | None, l2: float,
    subset_index: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """mmkernels::softmax_regression_loss_grad, in z's dtype, by autograd: for each subset s of
    ``subset_index`` (every subset when None), with logits z_s W_s + b_s ([n, C]),
    loss_s = sum_i sw_i CE(logits_i, y_i) + l2 / 2 ||W_s||^2 (sw = 1 when sample_weight is
    None), and its gradient with respect to W [k, H, C] and b [k, C]. Returns (loss [k],
    grad_w, grad_b)."""
    zs = z if subset_index is None else z.index_select(0, subset_index)
    w = w.detach().to(z.dtype).requires_grad_(True)
    b = b.detach().to(z.dtype).requires_grad_(True)
    k, n = zs.shape[:2]
    weight = torch.ones(n, dtype=z.dtype, device=z.device) if sample_weight is None \
        else sample_weight.to(z.dtype)
    with torch.enable_grad():
        logp = torch.log_softmax(torch.baddbmm(b.unsqueeze(1), zs, w), dim=2)
        ce = -logp.gather(2, y.expand(k, n).unsqueeze(2)).squeeze(2)
        loss = (ce * weight).sum(1) + 0.5 * l2 * w.square().sum((1, 2))
        grad_w, grad_b = torch.autograd.grad(loss.sum(), [w, b])
    return loss.detach(), grad_w, grad_b

def lbfgs_direction(grad: Tensor, s: Sequence[Tensor], y: Sequence[Tensor],
                    rho: Sequence[Tensor], gamma: Tensor, diag: Tensor | None = None,
                    rows: Tensor | None = None) -> Tensor:
    """mmkernels::lbfgs_direction: the L-BFGS two-loop recursion, row by row of grad [k, P]
    (k independent problems), over the stored pairs s[j], y[j] [n_j, P] with rho[j] [n_j]
    (newest first; rho = 0 marks an empty pair); problem i's pair j is row rows[j, i] of them
    (rows [m, k]; None: row i, n_j = k). The initial inverse Hessian is gamma [k] times diag
    [k, P] (None: the identity). Returns the direction d = -H grad."""
    if rows is not None:
        s, y, rho = ([t.index_select(0, r) for t, r in zip(ts, rows, strict=True)]
                     for ts in (s, y, rho))
    q = grad.clone()
    alphas = []
    for sj, yj, rj in zip(s, y, rho, strict=True):
        a = torch.linalg.vecdot(sj, q) * rj
        q = q - a.unsqueeze(1) * yj
        alphas.append(a)
    r = q * gamma.unsqueeze(1)
    if diag is not None:
        r = r * diag
    for sj, yj, rj, a in zip(reversed(s), reversed(y), reversed(rho), reversed(alphas),
                             strict=True):
        beta = torch.linalg.vecdot(yj, r) * rj
        r = r + (a - beta).unsqueeze(1) * sj
    return -r


# ---- the plain-PyTorch per-subset model (SubsetEnsemble.subset_model; the equivalence oracle)


class MaskedConcat(nn.Module):
    """cat of the modality tensors with the ones outside ``subset`` (or absent) zeroed."""

    def __init__(self, subset: Sequence[int], num_modalities: int) -> None:
        super().__init__()
        self.subset = tuple(subset)
        self.num_modalities = num_modalities

    def forward(self, xs: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        blocks = []
        for k, x in enumerate(xs):
            if k not in self.subset:
                blocks.append(torch.zeros_like(x))
            elif mask is not None:
                blocks.append(torch.where(mask[:, k : k + 1], x, torch.zeros_like(x)))
            else:
                blocks.append(x)
        return torch.cat(blocks, dim=1)


class MaskedLateEncoder(nn.Module):
    """cat_k of act(Linear_k(x_k)) with the blocks outside ``subset`` (or absent) zeroed.

    The layers of modalities outside the subset are kept (the output never depends on them)
    and receive zero gradients, as their slices in a SubsetEnsemble do.
    """

    def __init__(self, subset: Sequence[int], linears: Sequence[nn.Linear], activation: str):
        super().__init__()
        self.subset = tuple(subset)
        self.linears = nn.ModuleList(linears)
        self.activation = activation

    def forward(self, xs: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        blocks = []
        for k, (x, lin) in enumerate(zip(xs, self.linears, strict=True)):
            y = lin(x)
            y = torch.relu(y) if self.activation == "relu" else y
            if k not in self.subset:
                # torch.where (not zeros_like) so this unused layer gets a zero gradient, not
                # None, exactly like its slice in the ensemble (matters for weight decay).
                y = torch.where(torch.zeros_like(y, dtype=torch.bool), y, torch.zeros_like(y))
            elif mask is not None:
                y = torch.where(mask[:, k : k + 1], y, torch.zeros_like(y))
            blocks.append(y)
        return torch.cat(blocks, dim=1)


class SubsetModel(nn.Sequential):
    """nn.Sequential whose first module takes (xs, mask)."""

    def forward(self, xs: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        modules = list(self)
        z = modules[0](list(xs), mask)
        for mod in modules[1:]:
            z = mod(z)
        return z
