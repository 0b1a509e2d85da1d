"""Modules on the fused ops: MaskedFusion (one model, per-sample masks) and SubsetEnsemble
(one model per modality subset, all trained at once as a single batched model).

    MaskedFusion(dims, hidden, *, fusion="early", fill="zero", dropout=0.0, ...)
        forward(xs, mask=None) -> [B, H]           an encoder for users' own training code
    SubsetEnsemble(dims, hidden, num_outputs, *, subsets=None, fusion="early", seed=0, ...)
        forward(xs, mask=None) -> [S, B, C]        every subset's encoder + head at once
        latents(xs, mask=None) -> [S, n, H]        frozen per-subset latents (no grad, chunked)
        subset_model(s) -> nn.Module               the equivalent plain-PyTorch model
        losses(out, y) -> [S]                      per-subset mean loss; backprop their sum
    clip_grad_norm_per_subset(ensemble, max_norm) -> [S]

Modalities are given as a list in a fixed order (the order of ``dims``) or, when the module
was built with names (``dims`` a mapping name -> width), as a dict name -> tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkernels.ops import concat_project, project_concat
from mmkernels.reference import MaskedConcat, MaskedLateEncoder, SubsetModel
from mmkernels.subsets import all_subsets, modality_labels, subset_mask, subset_name

__all__ = [
    "MaskedFusion",
    "SubsetEnsemble",
    "clip_grad_norm_per_subset",
    "modality_dropout",
    "linear_init_",
]

Modalities = Sequence[Tensor] | Mapping[str, Tensor]


def _parse_dims(dims: Sequence[int] | Mapping[str, int]) -> tuple[list[str] | None, list[int]]:
    if isinstance(dims, Mapping):
        names, widths = list(dims.keys()), [int(d) for d in dims.values()]
    else:
        names, widths = None, [int(d) for d in dims]
    if not widths or any(d < 1 for d in widths):
        raise ValueError(f"dims must list at least one modality width >= 1, got {widths}")
    return names, widths


def _as_list(xs: Modalities, names: list[str] | None, dims: list[int]) -> list[Tensor]:
    """The modality tensors in the module's order; checks count and widths."""
    if isinstance(xs, Mapping):
        if names is None:
            raise ValueError("this module was built with unnamed dims: pass xs as a list")
        missing = [n for n in names if n not in xs]
        extra = [n for n in xs if n not in names]
        if missing or extra:
            raise ValueError(
                f"xs must have the keys {names}, missing {missing}, unexpected {extra}"
            )
        out = [xs[n] for n in names]
    else:
        out = list(xs)
    if len(out) != len(dims):
        raise ValueError(f"xs: expected {len(dims)} modality tensors, got {len(out)}")
    for k, (x, d) in enumerate(zip(out, dims, strict=True)):
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(f"xs[{k}]: expected shape [B, {d}], got {list(x.shape)}")
    return out


def _as_mask(
    mask: Tensor | Mapping[str, Tensor] | None, names: list[str] | None, batch: int, k: int,
    device: torch.device,
) -> Tensor | None:
    """A bool [B, K] presence mask, or None (every modality present)."""
    if mask is None:
        return None
    if isinstance(mask, Mapping):
        if names is None:
            raise ValueError("this module was built with unnamed dims: pass mask as [B, K]")
        missing = [n for n in names if n not in mask]
        extra = [n for n in mask if n not in names]
        if missing or extra:
            raise ValueError(
                f"mask must have the keys {names}, missing {missing}, unexpected {extra}"
            )
        mask = torch.stack([mask[n].to(torch.bool) for n in names], dim=1)
    if mask.shape != (batch, k):
        raise ValueError(f"mask: expected shape [{batch}, {k}], got {list(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def linear_init_(
    weight: Tensor, bias: Tensor | None, generator: torch.Generator | None = None
) -> None:
    """Initialise like ``nn.Linear.reset_parameters`` with its random draws taken from generator.

    nn.Linear draws weight ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with
    a = sqrt(5)) and then the bias from the same interval; this draws the same numbers in the
    same order, so ``linear_init_(lin.weight, lin.bias, torch.Generator().manual_seed(q))``
    on a separate nn.Linear reproduces the ensemble's slice for the same seed q. Without a
    generator the draws come from the default RNG of the weight's device, as in nn.Linear.
    """
    fan_in = weight.shape[1]
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)
        if bias is not None:
            bias.uniform_(-bound, bound, generator=generator)


def modality_dropout(
    mask: Tensor, p: Tensor | Sequence[float], generator: torch.Generator | None = None
) -> Tensor:
    """Drop present modalities at random, never all of a sample's modalities.

    Each present modality k of each sample is dropped independently with probability p[k].
    Rule for the all-dropped case: when every present modality of a sample was drawn to be
    dropped, that sample keeps exactly one of them, chosen uniformly at random among its
    present modalities. Samples that had no modality present stay empty.

    The draws do not depend on the data: two uniform [B, K] draws (the drop draw, then the
    draw that picks the survivor), in that order, whatever the mask holds. So the same RNG
    state gives the same result, and torch.compile traces it without a data-dependent branch.

    Args:
        mask: bool [B, K] presence before dropout.
        p: [K] drop probabilities in [0, 1] (a float tensor or a sequence of floats).
        generator: optional torch.Generator for the draws (else the global RNG; torch.compile
            supports only the global RNG).

    Returns:
        bool [B, K] presence after dropout (a subset of mask).
    """
    k = mask.shape[1]
    p = torch.as_tensor(p, dtype=torch.float32, device=mask.device).view(1, k)
    u, scores = _uniform(mask, generator), _uniform(mask, generator)
    keep = mask & (u >= p)
    lost_all = (mask.any(dim=1) & ~keep.any(dim=1)).view(-1, 1)
    scores = torch.where(mask, scores, torch.full_like(scores, -1.0))
    pick = scores.argmax(dim=1, keepdim=True) == torch.arange(k, device=mask.device).view(1, k)
    return torch.where(lost_all, pick, keep)


def _uniform(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) float32 of like's shape; without a generator, the form torch.compile traces
    (it cannot pass generator=None with a symbolic batch size)."""
    if generator is None:
        return torch.rand_like(like, dtype=torch.float32, memory_format=torch.contiguous_format)
    return torch.rand(like.shape, generator=generator, device=like.device)


class MaskedFusion(nn.Module):
    """Multi-modal encoder with per-sample presence masks, on the fused ops.

    ``fusion="early"``: out = act(W cat(x_1..x_K) + b), one [H, D] weight (concat_project).
    ``fusion="late"``:  out = cat_k act(W_k x_k + b_k), weights [H_k, d_k] (project_concat);
    ``hidden`` is then each modality's width H_k (an int for all, or one per modality) and the
    output width is sum_k H_k.

    Missing modalities (mask False) are filled according to ``fill``:

    - ``"zero"`` (default): an absent modality contributes nothing, exactly the fused ops'
      semantics: in early fusion its input block is zero; in late fusion its output block is
      zero (after the activation, so the bias does not leak).
    - ``"learned"``: a learned token t_k (nn.Parameter [d_k], initialised to zero) replaces
      the absent rows of x_k (torch.where before the op); the op then sees every modality as
      present, so in late fusion the absent block is act(W_k t_k + b_k).
    - ``"mean"``: renormalise by the present modalities. Early fusion: each present block's
      contribution is scaled by K / n_b, n_b = number of present modalities of sample b:
      out = act(K/n_b * sum_{k present} W_{:,k} x_k + b). Late fusion (all H_k equal): an
      absent modality's block is the mean of the present modalities' blocks,
      (1/n_b) sum_{k present} act(W_k x_k + b_k). A sample with no modality present gives
      act(b) (early) or zeros (late), as with "zero".

    Modality dropout (training mode only): ``dropout`` is a probability per modality (a float
    for all, a sequence in modality order, or a mapping by name). Each present modality is
    dropped independently with its probability; a sample never loses all its modalities: when
    every present one was drawn, it keeps one chosen uniformly at random among them (see
    :func:`modality_dropout`). Dropped modalities are then treated exactly like missing ones.
    The probabilities are fixed Python floats (``self.dropout``); the draws come from the
    global RNG.

    torch.compile: every fusion / fill / dropout mode compiles with ``fullgraph=True``, with
    ``dynamic=True`` or with batch sizes that change between calls. The compiled module draws
    the same dropout masks as eager from the same RNG state on backends that keep torch's
    random ops (e.g. "aot_eager"); Inductor generates its own random numbers unless
    ``torch._inductor.config.fallback_random = True``.

    Inputs: ``xs`` a list of [B, d_k] tensors in the order of ``dims``, or a dict name -> tensor
    when ``dims`` was a mapping name -> width; ``mask`` bool [B, K] (or dict name -> bool [B]),
    None = everything present.
    """

    def __init__(
        self,
        dims: Sequence[int] | Mapping[str, int],
        hidden: int | Sequence[int],
        *,
        fusion: str = "early",
        activation: str = "relu",
        fill: str = "zero",
        dropout: float | Sequence[float] | Mapping[str, float] = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.names, self.dims = _parse_dims(dims)
        k = len(self.dims)
        if fusion not in ("early", "late"):
            raise ValueError(f'fusion must be "early" or "late", got "{fusion}"')
        if fill not in ("zero", "learned", "mean"):
            raise ValueError(f'fill must be "zero", "learned" or "mean", got "{fill}"')
        self.fusion, self.activation, self.fill = fusion, activation, fill
        factory = {"device": device, "dtype": dtype}
        if fusion == "early":
            if not isinstance(hidden, int):
                raise ValueError("early fusion takes one int hidden width")
            self.hidden = [hidden]
            self.weight = nn.Parameter(torch.empty(hidden, sum(self.dims), **factory))
            self.bias = nn.Parameter(torch.empty(hidden, **factory)) if bias else None
        else:
            widths = [hidden] * k if isinstance(hidden, int) else [int(h) for h in hidden]
            if len(widths) != k:
                raise ValueError(f"hidden: expected {k} widths for late fusion, got {len(widths)}")
            if fill == "mean" and len(set(widths)) != 1:
                raise ValueError(f'fill="mean" with late fusion needs equal widths, got {widths}')
            self.hidden = widths
            self.weights = nn.ParameterList(
                [nn.Parameter(torch.empty(h, d, **factory)) for h, d in zip(widths, self.dims,
                                                                            strict=True)]
            )
            self.biases = (
                nn.ParameterList([nn.Parameter(torch.empty(h, **factory)) for h in widths])
                if bias else None
            )
        if fill == "learned":
            self.tokens = nn.ParameterList(
                [nn.Parameter(torch.empty(d, **factory)) for d in self.dims]
            )
        if isinstance(dropout, Mapping):
            if self.names is None:
                raise ValueError("dropout by name needs dims given as a mapping name -> width")
            unknown = [n for n in dropout if n not in self.names]
            if unknown:
                raise ValueError(f"dropout: unknown modalities {unknown}, expected names from "
                                 f"{self.names}")
            probs = [float(dropout.get(n, 0.0)) for n in self.names]
        elif isinstance(dropout, (int, float)):
            probs = [float(dropout)] * k
        else:
            probs = [float(p) for p in dropout]
        if len(probs) != k or any(not 0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"dropout: expected {k} probabilities in [0, 1], got {probs}")
        # Python floats, fixed at construction: whether dropout runs is decided without
        # reading a tensor, so torch.compile traces forward without a data-dependent branch.
        self.dropout: tuple[float, ...] = tuple(probs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialise like nn.Linear, from the default RNG: early, weight then bias; late,
        weight_k then bias_k for each modality in order. Learned fill tokens start at zero."""
        if self.fusion == "early":
            linear_init_(self.weight, self.bias)
        else:
            for j in range(len(self.dims)):
                linear_init_(self.weights[j], None if self.biases is None else self.biases[j])
        if self.fill == "learned":
            with torch.no_grad():
                for t in self.tokens:
                    t.zero_()

    def extra_repr(self) -> str:
        dims = dict(zip(self.names, self.dims, strict=True)) if self.names else self.dims
        hidden = self.hidden[0] if self.fusion == "early" else self.hidden
        has_bias = (self.bias if self.fusion == "early" else self.biases) is not None
        dropout: object = self.dropout[0]
        if len(set(self.dropout)) > 1:
            dropout = (dict(zip(self.names, self.dropout, strict=True)) if self.names
                       else list(self.dropout))
        return (f"dims={dims}, hidden={hidden}, fusion={self.fusion!r}, fill={self.fill!r}, "
                f"dropout={dropout}, activation={self.activation!r}, bias={has_bias}")

    @property
    def out_features(self) -> int:
        """Width of the output: H (early) or sum H_k (late)."""
        return sum(self.hidden)

    def forward(
        self, xs: Modalities, mask: Tensor | Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Encode a batch: [B, H] (early) or [B, sum H_k] (late)."""
        x = _as_list(xs, self.names, self.dims)
        batch, k = x[0].shape[0], len(x)
        m = _as_mask(mask, self.names, batch, k, x[0].device)
        if self.training and any(p > 0 for p in self.dropout):
            base = m if m is not None else torch.ones(
                batch, k, dtype=torch.bool, device=x[0].device
            )
            m = modality_dropout(base, self.dropout)
        if self.fill == "learned" and m is not None:
            x = [torch.where(m[:, j : j + 1], x[j], self.tokens[j].to(x[j].dtype).expand_as(x[j]))
                 for j in range(k)]
            m = None
        if self.fill == "mean" and m is not None:
            num = m.sum(dim=1, keepdim=True).to(x[0].dtype)
            if self.fusion == "early":
                scale = torch.where(num > 0, k / num.clamp(min=1), torch.ones_like(num))
                x = [xj * scale for xj in x]
                return self._op(x, m)
            out = self._op(x, m).view(batch, k, self.hidden[0])
            # in the op's output dtype (bfloat16 under autocast): the output keeps it
            mean = out.sum(dim=1, keepdim=True) / num.clamp(min=1).unsqueeze(2).to(out.dtype)
            out = torch.where(m.unsqueeze(2), out, mean)
            return out.reshape(batch, k * self.hidden[0])
        return self._op(x, m)

    def _op(self, x: list[Tensor], m: Tensor | None) -> Tensor:
        if self.fusion == "early":
            return concat_project(x, self.weight, self.bias, sample_mask=m,
                                  activation=self.activation)
        return project_concat(x, list(self.weights),
                              None if self.biases is None else list(self.biases),
                              sample_mask=m, activation=self.activation)


# ---- the ensemble -----------------------------------------------------------------------------


class SubsetEnsemble(nn.Module):
    """One encoder + linear head per modality subset, all S of them as one batched model.

    Model of subset s (the paper's setting: each subset has its own encoder and head):
      early fusion: logits = Linear_s2( act( Linear_s1( cat(masked xs) ) ) ), Linear_s1 [H, D];
      late fusion:  logits = Linear_s2( cat_k masked act(Linear_{s,k}(x_k)) ), [H_k, d_k].
    Absent modalities (outside the subset, or mask False) are zero blocks as in the fused ops;
    the encoder columns / head columns of a modality outside the subset therefore never get a
    gradient (as in the equivalent separate model, built by :meth:`subset_model`).

    Parameters (stored batched, nn.Linear layout [out, in] per subset):
      early: enc_weight [S, H, D], enc_bias [S, H];
      late:  enc_weights[k] [S, H_k, d_k], enc_biases[k] [S, H_k];
      head_weight [S, C, L], head_bias [S, C] with L = H (early) or sum H_k (late).
    The forward pass, early fusion: one concat_project with ``subset_mask`` and a torch.baddbmm
    for the heads; late fusion: per modality, one project_concat over the subsets that use it
    and a torch.bmm with their heads' columns, summed into each subset's logits (the padded
    latent of ``encode`` is never built). Output [S, B, C].

    Initialisation: each subset's layers are initialised exactly as separate nn.Linear layers
    would be (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight, then bias), with draws from a
    torch.Generator seeded ``seed * 2**20 + code(subset)``, code = sum_k 2**k over the subset's
    modalities (K <= 20). Draw order: encoder (early: weight, bias; late: for k in order,
    weight_k, bias_k), then head weight, head bias. A subset's initialisation thus depends only
    on (seed, subset), not on which other subsets are in the ensemble.

    Training equivalence: the loss is the sum over subsets of each subset's own loss
    (:meth:`losses` then ``.sum()``), so each subset's parameter slice gets exactly the
    gradient it would get alone. What holds for optimisers and tricks with global state:
    - element-wise optimisers (SGD, momentum, Adam, AdamW, RMSprop, Adagrad) are exact: their
      state is per parameter element and the step count is shared by all subsets;
    - weight decay (L2 or decoupled) is element-wise, so exact;
    - gradient-norm clipping must be per subset: use :func:`clip_grad_norm_per_subset`, never
      torch.nn.utils.clip_grad_norm_ over the whole ensemble (a global norm couples subsets);
    - per-subset early stopping is exact when the stopped subset's slice is frozen (the
      trainer in mmkernels.training restores it after every step);
    - anything that couples subsets breaks equivalence: global-norm clipping, LAMB/LARS-style
      per-tensor trust ratios (a tensor spans all subsets), Shampoo/K-FAC, a loss normalised
      by the sum over subsets, batch norm across the S axis, schedulers reacting to the summed loss.
    Results then agree with separate training up to floating-point rounding (the batched
    GEMMs sum in another order), not bitwise.
    """

    def __init__(
        self,
        dims: Sequence[int] | Mapping[str, int],
        hidden: int | Sequence[int],
        num_outputs: int,
        *,
        subsets: Sequence[Sequence[int]] | None = None,
        fusion: str = "early",
        activation: str = "relu",
        letters: Sequence[str] | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.names, self.dims = _parse_dims(dims)
        k = len(self.dims)
        if k > 20:
            raise ValueError(f"at most 20 modalities are supported, got {k}")
        if fusion not in ("early", "late"):
            raise ValueError(f'fusion must be "early" or "late", got "{fusion}"')
        self.fusion, self.activation, self.seed = fusion, activation, int(seed)
        self.subsets: list[tuple[int, ...]] = (
            all_subsets(k) if subsets is None else [tuple(sorted(set(s))) for s in subsets]
        )
        if not self.subsets or any(len(s) == 0 for s in self.subsets):
            raise ValueError("subsets must be non-empty lists of modality indices")
        self.register_buffer("subset_mask", subset_mask(self.subsets, k, device or "cpu"))
        if letters is None:
            letters = modality_labels(self.names if self.names else k)
        elif len(letters) != k or len(set(letters)) != k:
            raise ValueError(f"letters must give {k} distinct labels (one per modality), got "
                             f"{list(letters)}")
        self.letters = list(letters)
        self.num_outputs = int(num_outputs)
        s_count = len(self.subsets)
        factory = {"device": device, "dtype": dtype}
        if fusion == "early":
            if not isinstance(hidden, int):
                raise ValueError("early fusion takes one int hidden width")
            self.hidden = [hidden]
            self.enc_weight = nn.Parameter(torch.empty(s_count, hidden, sum(self.dims), **factory))
            self.enc_bias = nn.Parameter(torch.empty(s_count, hidden, **factory))
        else:
            widths = [hidden] * k if isinstance(hidden, int) else [int(h) for h in hidden]
            if len(widths) != k:
                raise ValueError(f"hidden: expected {k} widths for late fusion, got {len(widths)}")
            self.hidden = widths
            self.enc_weights = nn.ParameterList(
                [nn.Parameter(torch.empty(s_count, h, d, **factory))
                 for h, d in zip(widths, self.dims, strict=True)]
            )
            self.enc_biases = nn.ParameterList(
                [nn.Parameter(torch.empty(s_count, h, **factory)) for h in widths]
            )
            # Which subsets use each modality, for the forward pass modality by modality
            # (_late_logits). Not state: rebuilt from `subsets`, so checkpoints keep their keys.
            self._late_modalities = [j for j in range(k)
                                     if any(j in sub for sub in self.subsets)]
            for j in self._late_modalities:
                users = [s for s, sub in enumerate(self.subsets) if j in sub]
                self.register_buffer(f"_users_{j}", torch.tensor(users, device=device),
                                     persistent=False)
                self.register_buffer(f"_all_use_{j}", torch.ones(len(users), 1, dtype=torch.bool,
                                                                 device=device),
                                     persistent=False)
        latent = sum(self.hidden)
        self.head_weight = nn.Parameter(torch.empty(s_count, self.num_outputs, latent, **factory))
        self.head_bias = nn.Parameter(torch.empty(s_count, self.num_outputs, **factory))
        self.reset_parameters()

    # -- construction helpers --

    @property
    def num_subsets(self) -> int:
        """S, the number of subset models."""
        return len(self.subsets)

    @property
    def latent_dim(self) -> int:
        """Width of each subset's latent: H (early) or sum H_k (late)."""
        return sum(self.hidden)

    @property
    def subset_names(self) -> list[str]:
        """"TVA"-style names of the subsets, in order."""
        return [subset_name(s, self.letters) for s in self.subsets]

    def subset_generator(self, s: int) -> torch.Generator:
        """The generator the initialisation of subset s draws from (see the class docstring)."""
        code = sum(1 << j for j in self.subsets[s])
        return torch.Generator().manual_seed(self.seed * (1 << 20) + code)

    def reset_parameters(self) -> None:
        """(Re)initialise every subset as separate nn.Linear layers would be."""
        with torch.no_grad():
            for s in range(self.num_subsets):
                g = self.subset_generator(s)
                for w, b in self._subset_layers(s):
                    w_cpu, b_cpu = torch.empty(w.shape, dtype=w.dtype), torch.empty(b.shape,
                                                                                   dtype=b.dtype)
                    linear_init_(w_cpu, b_cpu, g)
                    w.copy_(w_cpu)
                    b.copy_(b_cpu)

    def extra_repr(self) -> str:
        dims = dict(zip(self.names, self.dims, strict=True)) if self.names else self.dims
        hidden = self.hidden[0] if self.fusion == "early" else self.hidden
        return (f"dims={dims}, hidden={hidden}, num_outputs={self.num_outputs}, "
                f"fusion={self.fusion!r}, activation={self.activation!r}, "
                f"num_subsets={self.num_subsets}, seed={self.seed}")

    def _subset_layers(self, s: int) -> list[tuple[Tensor, Tensor]]:
        """Views (weight [out, in], bias [out]) of subset s's layers in initialisation order."""
        if self.fusion == "early":
            layers = [(self.enc_weight[s], self.enc_bias[s])]
        else:
            layers = [(w[s], b[s]) for w, b in zip(self.enc_weights, self.enc_biases, strict=True)]
        return [*layers, (self.head_weight[s], self.head_bias[s])]

    # -- forward --

    def encode(self, xs: Modalities, mask: Tensor | Mapping[str, Tensor] | None = None) -> Tensor:
        """Every subset's latent: [S, B, L], with gradients."""
        x = _as_list(xs, self.names, self.dims)
        m = _as_mask(mask, self.names, x[0].shape[0], len(x), x[0].device)
        if self.fusion == "early":
            return concat_project(x, self.enc_weight, self.enc_bias, subset_mask=self.subset_mask,
                                  sample_mask=m, activation=self.activation)
        return project_concat(x, list(self.enc_weights), list(self.enc_biases),
                              subset_mask=self.subset_mask, sample_mask=m,
                              activation=self.activation)

    def head(self, z: Tensor) -> Tensor:
        """Apply every subset's head to its latent: [S, B, L] -> [S, B, C]."""
        return torch.baddbmm(self.head_bias.unsqueeze(1), z, self.head_weight.transpose(1, 2))

    def forward(self, xs: Modalities, mask: Tensor | Mapping[str, Tensor] | None = None) -> Tensor:
        """Outputs (logits or regression predictions) of every subset model: [S, B, C].

        Equal to ``head(encode(xs, mask))`` up to rounding; late fusion computes it modality by
        modality (see _late_logits) and never builds the padded latent.
        """
        if self.fusion == "early":
            return self.head(self.encode(xs, mask))
        x = _as_list(xs, self.names, self.dims)
        return self._late_logits(x, _as_mask(mask, self.names, x[0].shape[0], len(x), x[0].device))

    def _late_logits(self, x: list[Tensor], m: Tensor | None) -> Tensor:
        # The padded latent [S, B, sum H_k] is zero in every block of a modality its subset does
        # not use (49 % of it for the 63 subsets of 6 modalities), and every pass over it (the
        # encoder's output, three head GEMMs, the encoder's backward) pays for those zeros.
        # Instead, per modality k: one project_concat on x_k alone for the n_k subsets that use
        # it ([n_k, B, H_k], no zero block), their heads' k columns applied to it, and each part
        # added into its subset's logits (each subset's once per modality: deterministic).
        offsets = [0]
        for h in self.hidden:
            offsets.append(offsets[-1] + h)
        parts = []
        for k in self._late_modalities:
            users = getattr(self, f"_users_{k}")
            z = project_concat([x[k]], [self.enc_weights[k][users]], [self.enc_biases[k][users]],
                               subset_mask=getattr(self, f"_all_use_{k}"),
                               sample_mask=None if m is None else m[:, k:k + 1],
                               activation=self.activation)
            head_k = self.head_weight[users, :, offsets[k]:offsets[k + 1]]
            parts.append((users, torch.bmm(z, head_k.transpose(1, 2))))
        logits = self.head_bias.to(parts[0][1].dtype).unsqueeze(1)
        logits = logits.expand(self.num_subsets, x[0].shape[0], self.num_outputs)
        for users, part in parts:
            logits = logits.index_add(0, users, part)
        return logits

    @torch.no_grad()
    def latents(
        self, xs: Modalities, mask: Tensor | Mapping[str, Tensor] | None = None, *,
        chunk_size: int = 4096,
    ) -> Tensor:
        """Frozen per-subset latents [S, n, L], computed without gradients in chunks of rows.

        This is the encoder callable an eta refit needs: ``ensemble.latents(list_of_xs)``.
        """
        x = _as_list(xs, self.names, self.dims)
        n = x[0].shape[0]
        m = _as_mask(mask, self.names, n, len(x), x[0].device)
        out = x[0].new_empty(self.num_subsets, n, self.latent_dim, dtype=self.head_weight.dtype)
        for lo in range(0, n, max(1, chunk_size)):
            hi = min(n, lo + chunk_size)
            out[:, lo:hi] = self.encode([t[lo:hi] for t in x], None if m is None else m[lo:hi])
        return out

    # -- losses --

    @staticmethod
    def losses(out: Tensor, y: Tensor, task: str = "classification") -> Tensor:
        """Per-subset mean loss [S]: cross-entropy (y long [B]) or MSE (y [B] or [B, C]).

        Backpropagate ``losses(...).sum()`` so each subset gets exactly its own gradient.
        """
        s, b, c = out.shape
        if task == "classification":
            # The subsets as cross_entropy's "spatial" axis ([B, C, S] against [B, S]): 2.3x
            # faster forward + backward than S * B flattened rows at C = 10, the same losses.
            per_row = F.cross_entropy(out.permute(1, 2, 0), y.view(b, 1).expand(b, s),
                                      reduction="none")
            return per_row.mean(dim=0)
        if task == "regression":
            target = y.view(1, b, -1).to(out.dtype)
            if target.shape[2] != c:
                raise ValueError(
                    f"y: expected {c} regression targets per row, got {target.shape[2]}"
                )
            return ((out - target) ** 2).mean(dim=(1, 2))
        raise ValueError(f'task must be "classification" or "regression", got "{task}"')

    # -- the equivalent separate model --

    def subset_model(self, s: int) -> nn.Module:
        """A plain-PyTorch model equal to subset s, with copies of its current parameters.

        early: Sequential(MaskedConcat, Linear(D, H), ReLU, Linear(H, C));
        late:  Sequential(MaskedLateEncoder(K Linear(d_k, H_k) + ReLU), Linear(sum H_k, C)).
        Call it as ``model(xs, mask=None)`` with xs a list in modality order.
        """
        subset, k = self.subsets[s], len(self.dims)
        ref = self.head_weight
        factory = {"device": ref.device, "dtype": ref.dtype}
        act: list[nn.Module] = [nn.ReLU()] if self.activation == "relu" else []
        with torch.no_grad():
            head = nn.Linear(self.latent_dim, self.num_outputs, **factory)
            head.weight.copy_(self.head_weight[s])
            head.bias.copy_(self.head_bias[s])
            if self.fusion == "early":
                enc = nn.Linear(sum(self.dims), self.hidden[0], **factory)
                enc.weight.copy_(self.enc_weight[s])
                enc.bias.copy_(self.enc_bias[s])
                return SubsetModel(MaskedConcat(subset, k), enc, *act, head)
            lins = []
            for j in range(k):
                lin = nn.Linear(self.dims[j], self.hidden[j], **factory)
                lin.weight.copy_(self.enc_weights[j][s])
                lin.bias.copy_(self.enc_biases[j][s])
                lins.append(lin)
            return SubsetModel(MaskedLateEncoder(subset, lins, self.activation), head)


def clip_grad_norm_per_subset(
    ensemble: nn.Module, max_norm: float, eps: float = 1e-6
) -> Tensor:
    """Clip each subset's gradient to norm max_norm, as clip_grad_norm_ on each separate model.

    Every parameter of the ensemble has the subset axis first; subset s's norm is the 2-norm
    over all its slices. Like torch.nn.utils.clip_grad_norm_, gradients are scaled by
    min(1, max_norm / (norm + eps)). Returns the per-subset norms before clipping, [S].
    """
    grads = [p.grad for p in ensemble.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    sq = torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grads]).sum(dim=0)
    norms = sq.sqrt()
    coef = (max_norm / (norms + eps)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms
