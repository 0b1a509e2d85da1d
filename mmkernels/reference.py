"""Plain-PyTorch implementations of every op: the test oracle and the benchmarks' baseline.

They follow DESIGN.md literally: build the masked concatenation, apply nn.functional.linear
and the activation, and loop over subsets. "Absent" is a zero block, chosen with torch.where so
that whatever an absent row holds (even NaN) cannot leak into the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["concat_project", "project_concat", "presence"]


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
            y = _activate(F.linear(x, w, b), activation)
            blocks.append(torch.where(keep[:, k : k + 1], y, torch.zeros_like(y)))
        outs.append(torch.cat(blocks, dim=1))
    if not outs:  # S = 0 subsets: an empty [0, B, sum H_k]
        return _empty([0, batch, sum(w.shape[-2] for w in weights)],
                      [*xs, *weights, *(biases or [])])
    return outs[0] if subset_mask is None else torch.stack(outs)
