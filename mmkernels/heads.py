"""Batched head refits: the best linear head on each subset's frozen representation.

eta and gamma (docs/paper.md) need inf_h r(h o g_s) for every subset s. This module fits that head
for all S subsets at once on Z [S, n, H] (or on chunks of Z produced by an encoder):

* task="regression" (squared loss): ridge in closed form. The native op mmkernels::gram builds
  the intercept-augmented Gram [Z_s 1]^T [Z_s 1] and [Z_s 1]^T Y for all subsets, accumulating
  in float32 (float32/bfloat16 Z) or float64 (float64 Z), summed over chunks. The solve is in
  float64: the intercept is eliminated exactly (Schur complement, i.e. the data are centred in
  the solve, not in the accumulation), then a batched Cholesky (cholesky_ex + cholesky_solve);
  where cholesky_ex reports failure (rank-deficient Z with l2 = 0, or a float32 Gram that
  rounding made indefinite) that subset falls back to an eigh-based pseudo-inverse (the
  minimum-norm solution). Objective, per subset and output, sklearn Ridge's scaling:
      ||y - Z w - b||^2 + l2 ||w||^2          (intercept b not penalised)
  Default l2: 1e-6 * trace(centred Gram) / H per subset (tiny and scale-free).
  Centring in the solve means float32 Z with a large mean loses digits to cancellation; pass
  float64 Z when you need agreement to many digits.

* task="classification" (cross-entropy): multinomial logistic regression, sklearn's
  LogisticRegression objective exactly (sum-of-losses scaling, l2 = 1/C):
      sum_i sw_i CE(z_i W + b, y_i) + l2/2 ||W||^2      (intercept b not penalised)
  Default l2 = 1.0 (sklearn's default C = 1). With two classes sklearn fits one binomial
  vector w instead; our symmetric fit at l2 equals it at C = 2 / l2, with W = [-w/2, w/2].
  The multinomial gradient keeps sum_c W[:, c] = 0 and sum_c b_c = 0 from the zero start, so
  the (otherwise unidentified) intercept is the sum-to-zero one, as in sklearn.
  Solver: batched L-BFGS (history 10) with a per-subset backtracking Armijo line search and
  per-subset convergence; the state (parameters, gradients, history) is kept for the
  still-active subsets only and compacted when some finish, so an iteration runs on views and
  each evaluation reads exactly the active subsets of Z (the op's subset_index). Stopping rule
  (sklearn's gtol):
      max_j |d objective / d theta_j| / sum_i sw_i <= tol,
  default tol 1e-6 for float64 Z and 1e-4 for float32/bfloat16 Z (sklearn's default; the loss
  and gradient are computed in float32 then). Each evaluation is the fused native op
  mmkernels::softmax_regression_loss_grad (logits, softmax, loss and gradient in one pass over
  Z; for C <= 8 rows sit in the vector lanes for the softmax, see csrc/cpu/heads/softmax_lanes.h).
  Why this solver:
  - The cost is one pass over Z per evaluation: 4 n H C flops and n H words per subset (~40
    MFLOP and 6.8 MB at n = 13,200, H = 128, C = 6, float32); the kernel runs at ~55 ns per
    row of Z per thread here (~0.75 ms per subset evaluation, ~55 GFLOP/s). L-BFGS needs about one
    evaluation per iteration (the unit step is accepted almost always) and takes the same
    iteration counts as sklearn's lbfgs on the same objective and gtol (5-20 on the benchmark),
    so the speed-up over sklearn's loop is the kernel's speed plus the batching.
  - Newton was rejected: its Hessian costs n (H C)^2 per iteration, ~8 GFLOP per subset at H =
    128, C = 6, i.e. ~200 evaluations' worth, to save ~10 iterations.
  - A warm start from the ridge solution (one Newton step from W = 0 with the Gram) costs a
    Gram per subset, 2 n (H+1)^2 flops (~11 evaluations' worth of flops at H = 128, C = 6).
    Tried on the benchmark: 77 iterations instead of 91 over the 7 subsets, but 25 % slower
    overall (the Gram took more time than the 14 evaluations saved); not used.
  - The solver's own algebra is on [k, (H+1) C] tensors a history slot at a time: ~80 small
    op calls per iteration, ~0.75 ms, ~15 ms of a ~60-100 ms fit at the benchmark's shapes
    (the evaluations are the rest). Moving it into C++ would save at most that.
  Threads: fit never changes torch's thread count (process-global state, unsafe with several
  Python threads; the old code set 1 thread around the solver). Instead:
  - the native op uses up to the caller's torch.get_num_threads(): helpers from ATen's
    inter-op pool claim (subset, row block) tasks from a shared counter and the caller runs
    what they have not claimed, so it never waits for a helper that has not got a CPU yet (an
    OpenMP region waits for every team thread: on this 2-core machine shared with other busy
    processes that made 2 threads 2.5x slower than 1); below ~1M elements of Z per call the
    op runs on the calling thread;
  - the solver's own ops stay below PyTorch's intra-op grain (serial): subsets are solved in
    groups of k with k (H+1) C < 32768, and gathers use index_select / index_copy_.
  Results depend on the thread count only through the op's summation order (rounding level),
  and so, once one op call covers >= 2^20 elements of Z (K n H for the K subsets it
  evaluates), on K too: the rows of a subset are split into blocks by the thread count and K,
  so a subset's bits can change with the other subsets evaluated alongside it (see fit).

Risks reported by Heads.risk are unpenalised and unweighted means: the mean squared error
(averaged over outputs) for regression, the mean cross-entropy (nats) for classification.

The native ops have Meta kernels in C++ (csrc/meta/heads_meta.cpp: torch.library.opcheck
passes) and no autograd: they are solver internals, never differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmkernels._native import native
from mmkernels.memory import check_memory

__all__ = ["Encoded", "Heads", "encoded", "fit", "DEFAULT_MEMORY_BUDGET"]

_ops = torch.ops.mmkernels
DEFAULT_MEMORY_BUDGET = 512 * 2**20  # bytes of Z (and per-chunk op buffers) held at once
_TASKS = ("regression", "classification")


def _compute_dtype(zdtype: torch.dtype) -> torch.dtype:
    """The dtype the native ops accumulate Z of zdtype in, and the solvers' compute dtype: the
    one rule of csrc/include/mmkernels/accumulation.h (float64 for float64, else float32)."""
    return native().accumulation_dtype(zdtype)


# ---- the memory budget of the solvers' own state ----------------------------------------------


def _check_budget(what: str, nbytes: int) -> None:
    check_memory(what, nbytes, hint="fit fewer subsets at once")


def _ridge_bytes(S: int, H: int, T: int) -> int:
    """Ridge's state: the Gram [S, H+1, H+1] (float32/64) and ~5 float64 [S, H, H] copies in
    the solve (float64 Gram, centred Gram, its Cholesky factor, a rank-1 temporary), plus the
    right-hand sides."""
    return S * (H + 1) ** 2 * (8 + 5 * 8) + S * (H + 1) * T * 8 * 6


def _softmax_bytes(S: int, H: int, C: int, history: int, rows: int, z_itemsize: int,
                   group: int | None = None) -> int:
    """L-BFGS state of one group of subsets (group: the subsets solved at once, default S):
    history 2 * m * group * P float64 (P = (H+1) C) plus ~12 [group, P] vectors (parameters,
    gradients, trials, direction), and the fitted parameters of all S (each group's, then
    their concatenation); per op call (on a group) the per-task partial sums and gradient
    buffers (padded to at most 32 lanes), and a float32 copy of the picked subsets' Z rows of
    a call when Z is bfloat16 (with the bfloat16 gather it is made from)."""
    P = (H + 1) * C
    g = S if group is None else max(1, min(S, group))
    state = 8 * g * P * (2 * history + 12) + 8 * g * history + 2 * 8 * S * P
    lanes = C if C <= 8 else 16 if C <= 16 else 32 if C <= 32 else C
    tasks = g + 4 * max(1, torch.get_num_threads())
    op = 8 * (tasks + 3 * g) * (H * lanes + C + 1)
    convert = g * rows * H * (4 + z_itemsize) if z_itemsize == 2 else 0
    return state + op + convert


def _softmax_group(S: int, P: int, streamed: bool) -> int:
    """Subsets solved at once: k with k * P below PyTorch's intra-op grain (see _lbfgs), or
    all S when Z is streamed from an encoder (each group would re-encode every chunk)."""
    return S if streamed else min(S, max(1, (_GRAIN - 1) // P))


# ---- sources of Z: a tensor, or an encoder applied chunk by chunk ---------------------------


@dataclass
class Encoded:
    """Z produced on demand: encoder(list of modality chunks [r, d_k]) -> [S, r, H].

    Rows are encoded in chunks so that Z's chunk plus the ops' per-chunk buffers stay within
    memory_budget bytes (the encoder's own intermediates come on top). The encoder runs under
    torch.no_grad(); put modules in eval mode first.
    """

    encoder: Callable[[list[Tensor]], Tensor]
    xs: Sequence[Tensor]
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    _shape: tuple[int, int, torch.dtype] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.xs, (list, tuple)) or not self.xs:
            raise ValueError("xs must be a non-empty list of modality tensors [n, d_k]")
        n = self.xs[0].shape[0]
        for k, x in enumerate(self.xs):
            if x.shape[0] != n:
                raise ValueError(f"xs[{k}] has {x.shape[0]} rows, expected {n} (rows of xs[0])")
        if self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be > 0 bytes, got {self.memory_budget}")

    @property
    def num_rows(self) -> int:
        return int(self.xs[0].shape[0])

    def encode(self, r0: int, r1: int) -> Tensor:
        with torch.no_grad():
            z = self.encoder([x[r0:r1] for x in self.xs])
        if not isinstance(z, Tensor) or z.dim() != 3 or z.shape[1] != r1 - r0:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"encoder must return [S, {r1 - r0}, H] for {r1 - r0} rows, got {got}")
        return z.detach()

    def shape(self) -> tuple[int, int, torch.dtype]:
        """(S, H, dtype) of the encoder's output, from a probe of the first rows."""
        if self._shape is None:
            z = self.encode(0, min(self.num_rows, 2))
            self._shape = (int(z.shape[0]), int(z.shape[2]), z.dtype)
        return self._shape

    def rows_per_chunk(self, extra_per_row: int = 0) -> int:
        S, H, dtype = self.shape()
        per_row = S * (H * (dtype.itemsize + 4) + extra_per_row)
        return max(1, self.memory_budget // max(1, per_row))


def encoded(encoder: Callable[[list[Tensor]], Tensor], xs: Sequence[Tensor], *,
            memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Encoded:
    """Wrap an encoder and its inputs so fit/risk/accuracy stream Z in chunks."""
    return Encoded(encoder, list(xs), memory_budget)


ZLike = Tensor | Encoded


def _check_z_tensor(z: Tensor, name: str = "Z", finite: bool = True) -> None:
    """Type, shape and dtype of Z; with finite=True also NaN/Inf (a full pass over Z).

    Tensor Z given to fit/risk/predict is not scanned up front: NaN or Inf in Z always reaches
    the Gram diagonal, the first loss (W = 0 multiplies every entry) or the outputs, which are
    checked instead, and only then is Z scanned to name the offending subsets."""
    if not isinstance(z, Tensor):
        raise ValueError(f"{name} must be a tensor [S, n, H] or an Encoded source, got "
                         f"{type(z).__name__}")
    if z.dim() != 3:
        raise ValueError(f"{name} must be 3-d [S, n, H], got shape {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float64 or bfloat16, got {z.dtype}")
    if z.shape[0] == 0:
        raise ValueError(f"{name} has no subsets (S = 0): the subsets list is empty")
    if finite and not bool(torch.isfinite(z).all()):
        bad = (~torch.isfinite(z)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{name} holds NaN or Inf values (in subsets {bad[:10]})")


def _num_rows(z: ZLike) -> int:
    return z.num_rows if isinstance(z, Encoded) else int(z.shape[1])


def _chunks(z: ZLike, extra_per_row: int = 0) -> Iterator[tuple[int, Tensor]]:
    """(first row, Z chunk [S, r, H]) over all rows. Encoded chunks are checked for NaN/Inf
    as they are produced; a tensor Z is checked once by the public entry points."""
    if isinstance(z, Tensor):
        yield 0, z
        return
    n, step = z.num_rows, z.rows_per_chunk(extra_per_row)
    for r0 in range(0, n, step):
        chunk = z.encode(r0, min(n, r0 + step))
        _check_z_tensor(chunk, f"Z (the encoder's output for rows {r0}:{min(n, r0 + step)})")
        yield r0, chunk


def _materialise_if_fits(z: ZLike, extra_per_row: int) -> ZLike:
    """The whole Z when it fits the budget (iterative solvers then encode once)."""
    if isinstance(z, Tensor):
        return z
    if z.rows_per_chunk(extra_per_row) >= z.num_rows:
        full = z.encode(0, z.num_rows)
        _check_z_tensor(full, "Z (the encoder's output)")
        return full
    return z


# ---- the fitted heads -------------------------------------------------------------------------


@dataclass
class Heads:
    """S fitted linear heads. coef [S, H, T or C], intercept [S, T or C] (float64).

    converged / n_iter [S]: per-subset solver status (ridge: always True / 0; a ridge subset
    solved by the pseudo-inverse fallback is listed in pinv_fallback).
    """

    task: str
    coef: Tensor
    intercept: Tensor
    l2: Tensor
    converged: Tensor
    n_iter: Tensor
    y_1d: bool = False
    pinv_fallback: list[int] = field(default_factory=list)

    @property
    def num_subsets(self) -> int:
        return int(self.coef.shape[0])

    def _check_z(self, z: ZLike) -> None:
        S, H = self.coef.shape[0], self.coef.shape[1]
        if not isinstance(z, Encoded):
            _check_z_tensor(z, finite=False)
            if z.shape[0] != S or z.shape[2] != H:
                raise ValueError(f"Z must be [S={S}, n, H={H}] like the fitted heads, got "
                                 f"shape {tuple(z.shape)}")

    def decision_function(self, z: Tensor) -> Tensor:
        """Z @ coef + intercept: [S, n, T] (regression) or logits [S, n, C]."""
        self._check_z(z)
        out = self._decision(z)
        if not bool(torch.isfinite(out).all()):
            _check_z_tensor(z)
        return out

    def _decision(self, z: Tensor) -> Tensor:
        dt = _compute_dtype(z.dtype)
        return torch.baddbmm(self.intercept.to(dt).unsqueeze(1), z.to(dt), self.coef.to(dt))

    def predict(self, z: ZLike) -> Tensor:
        """Regression: [S, n, T] ([S, n] when fitted on 1-d y). Classification: labels [S, n]."""
        self._check_z(z)
        outs = []
        for _, chunk in _chunks(z):
            out = self._decision(chunk)
            if not bool(torch.isfinite(out).all()):
                _check_z_tensor(chunk)
            if self.task == "classification":
                outs.append(out.argmax(-1))
            else:
                outs.append(out.squeeze(-1) if self.y_1d else out)
        return torch.cat(outs, 1)

    def risk(self, z: ZLike, y: Tensor) -> Tensor:
        """Unpenalised mean risk per subset, float64 [S]: MSE (mean over samples and outputs)
        for regression, mean cross-entropy in nats for classification."""
        self._check_z(z)
        n = _num_rows(z)
        y = _check_y(y, n, self.task)
        if n == 0:
            raise ValueError("Z has no rows (n = 0): the risk is undefined")
        total = torch.zeros(self.num_subsets, dtype=torch.float64)
        for r0, chunk in _chunks(z, extra_per_row=8 * self.coef.shape[2]):
            yc = y[r0:r0 + chunk.shape[1]]
            if self.task == "regression":
                pred = self._decision(chunk).double()
                yt = yc.double().reshape(yc.shape[0], -1)
                total += (pred - yt).square().mean(-1).sum(-1)
            else:
                if int(yc.max()) >= self.coef.shape[2]:
                    raise ValueError(f"y holds label {int(yc.max())} but the heads have "
                                     f"{self.coef.shape[2]} classes")
                dt = _compute_dtype(chunk.dtype)
                loss, _, _ = _ops.softmax_regression_loss_grad(
                    chunk, yc, self.coef.to(dt), self.intercept.to(dt), None, 0.0)
                total += loss.double()
            if not bool(torch.isfinite(total).all()):
                _check_z_tensor(chunk)
        return total / n

    def accuracy(self, z: ZLike, y: Tensor) -> Tensor:
        """Fraction of correct labels per subset, float64 [S] (classification only)."""
        if self.task != "classification":
            raise ValueError("accuracy is defined for task='classification' only; these heads "
                             "were fitted with task='regression' (use risk)")
        self._check_z(z)
        n = _num_rows(z)
        y = _check_y(y, n, self.task)
        if n == 0:
            raise ValueError("Z has no rows (n = 0): the accuracy is undefined")
        return (self.predict(z) == y.unsqueeze(0)).double().mean(1)


def _check_y(y: Tensor, n: int, task: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise ValueError(f"y must be a tensor, got {type(y).__name__}")
    if y.shape[:1] != (n,):
        raise ValueError(f"y must have n = {n} rows (dim 1 of Z), got shape {tuple(y.shape)}")
    if task == "classification":
        if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"y must be 1-d integer class labels for classification, got "
                             f"dtype {y.dtype} and shape {tuple(y.shape)}")
        y = y.long()
        if n and int(y.min()) < 0:
            raise ValueError(f"y must hold labels >= 0, got {int(y.min())}")
        return y
    if y.dim() not in (1, 2) or not y.is_floating_point():
        raise ValueError(f"y must be a float tensor [n] or [n, T] for regression, got dtype "
                         f"{y.dtype} and shape {tuple(y.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y holds NaN or Inf values")
    return y


# ---- fitting ----------------------------------------------------------------------------------


def fit(
    z: ZLike,
    y: Tensor,
    *,
    task: str,
    l2: float | None = None,
    class_weight: str | Tensor | None = None,
    num_classes: int | None = None,
    tol: float | None = None,
    max_iter: int = 1000,
    history: int = 10,
) -> Heads:
    """Fit one linear head per subset on Z [S, n, H] (a tensor, or encoded(encoder, xs)).

    Args:
        z: [S, n, H] float32/float64/bfloat16, or an Encoded source streamed in chunks.
        y: regression: float [n] or [n, T]; classification: int labels [n] in [0, C).
        task: "regression" or "classification".
        l2: penalty on the weights (never on the intercept), sum-of-losses scaling. Ridge:
            sklearn Ridge(alpha=l2); default 1e-6 * trace(centred Gram) / H per subset.
            Classification: l2 = 1 / sklearn's C; default 1.0.
        class_weight: classification only: None, "balanced" (n / (n_present_classes *
            count_c), sklearn's rule) or a tensor [C] of per-class weights.
        num_classes: C; default max(y) + 1. A class absent from y gets a head whose intercept
            drives its probability toward 0 (to the gradient tolerance).
        tol: classification gradient tolerance (see the module docstring).
        max_iter, history: L-BFGS iteration limit and memory.

    Memory: an Encoded source is materialised once when all of Z fits its memory_budget;
    otherwise ridge streams it once, and the classifier re-encodes it chunk by chunk at every
    loss evaluation (slower, but never more than the budget of Z at once). Solver state on
    top: ridge ~6 [S, H+1, H+1] float64 matrices; L-BFGS history 2 * history * S * (H+1) * C
    float64 plus ~12 [S, (H+1) C] vectors; bfloat16 Z is converted to float32 inside each op
    call (a float32 copy of the call's rows of the subsets it evaluates). When that state and
    workspace would exceed the memory budget (:mod:`mmkernels.memory`:
    MMKERNELS_MEMORY_BUDGET, default 80 % of the memory available), fit raises
    MemoryBudgetError (a ValueError) stating the bytes needed and the budget, before
    allocating. The L-BFGS state is for one group of subsets at a time
    (k with k (H+1) C < 32768; all S when Z is streamed).

    Determinism: for a given Z, y, settings and torch.get_num_threads(), results are
    bit-identical from run to run. Classification results of a subset can differ at the
    rounding level (and the solver may then take a different number of iterations) with the
    thread count and, when an op call covers >= 2^20 elements of Z (K n H, K the subsets of
    its group still active), with the other subsets fitted alongside it: the op splits each
    subset's rows into blocks by the thread count and K, and sums the blocks in order.
    """
    if task not in _TASKS:
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
    if l2 is not None and not (math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be finite and >= 0, got {l2}")
    if not isinstance(z, Encoded):
        _check_z_tensor(z, finite=False)
    n = _num_rows(z)
    if n == 0:
        raise ValueError("Z has no rows (n = 0): nothing to fit")
    y = _check_y(y, n, task)
    S, H, zdtype = (z.shape() if isinstance(z, Encoded)
                    else (int(z.shape[0]), int(z.shape[2]), z.dtype))
    if task == "regression":
        if class_weight is not None:
            raise ValueError("class_weight applies to task='classification' only")
        T = 1 if y.dim() == 1 else int(y.shape[1])
        _check_budget(f"the ridge refit of S = {S} subsets at H = {H}, T = {T}",
                      _ridge_bytes(S, H, T))
        return _fit_ridge(z, y, l2)
    C = (int(y.max()) + 1 if num_classes is None else max(1, int(num_classes)))
    rows = n if isinstance(z, Tensor) else min(n, z.rows_per_chunk(16 * C))
    group = _softmax_group(S, (H + 1) * C, streamed=rows < n)
    _check_budget(f"the softmax refit of S = {S} subsets at H = {H}, C = {C} (L-BFGS history "
                  f"{history})", _softmax_bytes(S, H, C, history, rows, zdtype.itemsize, group))
    return _fit_softmax(z, y, l2=1.0 if l2 is None else l2, class_weight=class_weight,
                        num_classes=num_classes, tol=tol, max_iter=max_iter, history=history)


def _fit_ridge(z: ZLike, y: Tensor, l2: float | None) -> Heads:
    G = R = None
    y2 = y.reshape(y.shape[0], -1)
    for r0, chunk in _chunks(z, extra_per_row=8 * y2.shape[1]):
        g, r = _ops.gram(chunk, y2[r0:r0 + chunk.shape[1]].to(chunk.dtype))
        if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(r).all())):
            _check_z_tensor(chunk)  # names the subsets holding NaN/Inf
            raise ValueError("the Gram matrix of Z overflowed (entries of Z too large for "
                             f"{g.dtype} accumulation); pass float64 Z or rescale it")
        G = g.double() if G is None else G + g.double()
        R = r.double() if R is None else R + r.double()
    assert G is not None and R is not None
    S, H = G.shape[0], G.shape[1] - 1
    n = G[:, H, H]
    mu = G[:, :H, H] / n[:, None]                                   # [S, H]
    ybar = R[:, H, :] / n[:, None]                                  # [S, T]
    A = G[:, :H, :H] - n[:, None, None] * mu.unsqueeze(2) * mu.unsqueeze(1)
    rhs = R[:, :H, :] - n[:, None, None] * mu.unsqueeze(2) * ybar.unsqueeze(1)
    if l2 is None:
        lam = 1e-6 * A.diagonal(dim1=1, dim2=2).sum(1).clamp_min(0) / max(H, 1)
    else:
        lam = torch.full((S,), float(l2), dtype=torch.float64)
    eye = torch.eye(H, dtype=torch.float64)
    A = A + lam[:, None, None] * eye
    L, info = torch.linalg.cholesky_ex(A)
    coef = torch.empty_like(rhs)
    ok = info == 0
    if bool(ok.any()):
        coef[ok] = torch.cholesky_solve(rhs[ok], L[ok])
    failed = (~ok).nonzero().flatten().tolist()
    for s in failed:
        # Minimum-norm solution: drop eigen-directions at the rounding level of the Gram.
        evals, evecs = torch.linalg.eigh(A[s])
        cutoff = evals.abs().max() * H * torch.finfo(torch.float32).eps
        inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
        coef[s] = evecs @ (inv[:, None] * (evecs.T @ rhs[s]))
    intercept = ybar - (mu.unsqueeze(1) @ coef).squeeze(1)
    return Heads("regression", coef, intercept, lam, torch.ones(S, dtype=torch.bool),
                 torch.zeros(S, dtype=torch.int64), y_1d=y.dim() == 1, pinv_fallback=failed)


def _class_weights(class_weight: str | Tensor | None, y: Tensor, C: int) -> Tensor | None:
    if class_weight is None:
        return None
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"class_weight must be None, 'balanced' or a tensor [C], got "
                             f"{class_weight!r}")
        counts = torch.bincount(y, minlength=C).double()
        present = int((counts > 0).sum())
        cw = torch.where(counts > 0, y.shape[0] / (present * counts.clamp_min(1)), 0.0)
    else:
        if not isinstance(class_weight, Tensor) or class_weight.shape != (C,):
            got = tuple(class_weight.shape) if isinstance(class_weight, Tensor) else class_weight
            raise ValueError(f"class_weight tensor must have shape [C] = [{C}], got {got}")
        cw = class_weight.double()
        if not bool(torch.isfinite(cw).all()) or bool((cw < 0).any()):
            raise ValueError("class_weight must hold finite values >= 0")
    return cw[y]


def _fit_softmax(z: ZLike, y: Tensor, *, l2: float, class_weight: str | Tensor | None,
                 num_classes: int | None, tol: float | None, max_iter: int,
                 history: int) -> Heads:
    n = y.shape[0]
    C = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if C < 1 or int(y.max()) >= C:
        raise ValueError(f"num_classes must be >= 1 and above every label of y (max "
                         f"{int(y.max())}), got {num_classes}")
    if max_iter < 0 or history < 1:
        raise ValueError(f"max_iter must be >= 0 and history >= 1, got {max_iter}, {history}")
    sw = _class_weights(class_weight, y, C)
    z = _materialise_if_fits(z, extra_per_row=16 * C)
    if isinstance(z, Tensor):
        S, H, zdtype = z.shape[0], z.shape[2], z.dtype
    else:
        S, H, zdtype = z.shape()
    dt = _compute_dtype(zdtype)
    if tol is None:
        tol = 1e-6 if dt == torch.float64 else 1e-4
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be finite and > 0, got {tol}")
    sw_c = None if sw is None else sw.to(dt)
    scale = float(n if sw is None else sw.sum())
    if scale <= 0:
        raise ValueError("class_weight gives every sample weight 0")
    P, HC = (H + 1) * C, H * C

    def evaluate(theta: Tensor, idx: Tensor | None) -> tuple[Tensor, Tensor]:
        """Mean-scaled objective [k] and gradient [k, P] (float64) of the subsets idx (None:
        all S), at theta [k, P]."""
        Wd = theta[:, :HC]
        W = Wd.reshape(theta.shape[0], H, C).to(dt)
        b = theta[:, HC:].to(dt)
        loss = grad = None
        for r0, chunk in _chunks(z, extra_per_row=16 * C):
            rows = slice(r0, r0 + chunk.shape[1])
            swr = None if sw_c is None else sw_c[rows]
            # subset_index lets the op read only the active subsets of Z in place (a gather
            # would copy as many bytes as the op reads).
            lo, gwc, gbc = _ops.softmax_regression_loss_grad(chunk, y[rows], W, b, swr, 0.0, idx)
            gc = torch.cat([gwc.flatten(1), gbc], 1)
            if loss is None:
                loss, grad = lo.double(), gc.double()
            else:
                loss += lo
                grad += gc
        assert loss is not None and grad is not None
        loss += (0.5 * l2) * Wd.square().sum(1)
        grad[:, :HC] += l2 * Wd
        return loss.div_(scale), grad.div_(scale)

    # Subsets are solved in groups of k with k * P below PyTorch's intra-op grain, so that
    # the solver's own tensor ops run serially (see _lbfgs); one group when k * P is small.
    # A streamed Z (not materialised) is one group: every group's evaluations would encode
    # all S subsets of every chunk again (the solver's ops may then run multi-threaded).
    size = _softmax_group(S, P, streamed=not isinstance(z, Tensor))
    if size >= S:
        return _lbfgs(evaluate, S, P, H, C, l2, tol, max_iter, history)
    parts = []
    for s0 in range(0, S, size):
        ids = torch.arange(s0, min(S, s0 + size))

        def in_group(theta: Tensor, idx: Tensor | None, ids: Tensor = ids
                     ) -> tuple[Tensor, Tensor]:
            return evaluate(theta, ids if idx is None else ids.index_select(0, idx))

        parts.append(_lbfgs(in_group, len(ids), P, H, C, l2, tol, max_iter, history, s0))
    return Heads("classification", *(torch.cat([getattr(h, a) for h in parts])
                                      for a in ("coef", "intercept", "l2", "converged",
                                                "n_iter")))


_GRAIN = 32768  # at::internal::GRAIN_SIZE: elementwise ops on fewer elements run serially


def _lbfgs(evaluate: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]], S: int, P: int,
           H: int, C: int, l2: float, tol: float, max_iter: int, history: int,
           first: int = 0) -> Heads:
    """Batched L-BFGS over S independent problems with parameters theta [S, P].

    The state is kept for the still-active subsets only, compacted when some finish, so an
    iteration runs on views (no gathers) and evaluates exactly the subsets that need it.
    Every tensor op here is on [k, P] or [k] (the history is a list of slots), so it runs
    serially below PyTorch's intra-op grain (k * P < 32768, e.g. 7 subsets at H = 128, C = 6;
    the caller splits larger S into groups) without touching the global thread count; gathers
    use index_select / index_copy_ (serial when small) rather than advanced indexing
    (aten::index opens an OpenMP region). first: the subset number of problem 0 (messages).
    """
    theta_out = torch.zeros(S, P, dtype=torch.float64)
    f, g = evaluate(theta_out, None)
    if not bool(torch.isfinite(f).all()):
        bad = ((~torch.isfinite(f)).nonzero().flatten() + first).tolist()
        raise ValueError("the loss at W = 0 is not finite: Z holds NaN or Inf values (in "
                         f"subsets {bad[:10]})")
    converged = g.abs().amax(1) <= tol
    n_iter = torch.zeros(S, dtype=torch.int64)
    # index_select / index_copy_ rather than advanced indexing: those run serially on small
    # tensors, while aten::index opens an OpenMP region (milliseconds on a busy machine).
    ids = (~converged).nonzero().flatten()
    th, f, g = theta_out.index_select(0, ids), f.index_select(0, ids), g.index_select(0, ids)
    k = len(ids)
    # History slot by slot ([k, P] each, filled in turn): a slot-major list keeps every gather
    # and write on one slot, below the intra-op grain for moderate S * P.
    s_hist: list[Tensor] = []
    y_hist: list[Tensor] = []
    rho: list[Tensor] = []
    gamma = 1.0 / g.norm(dim=1).clamp_min(1e-12)
    its = torch.zeros(k, dtype=torch.int64)
    pos = filled = 0
    for _ in range(max_iter):
        if k == 0:
            break
        # Two-loop recursion over the filled slots, newest pair first (a rejected pair is
        # stored with rho = 0 and does nothing).
        q = g.clone()
        order = [(pos - 1 - j) % history for j in range(min(filled, history))]
        sv_, yv_, rv_ = s_hist, y_hist, rho
        alphas = []
        for j in order:
            a = torch.linalg.vecdot(sv_[j], q).mul_(rv_[j])
            q.addcmul_(a.unsqueeze(1), yv_[j], value=-1.0)
            alphas.append(a)
        r = q.mul_(gamma.unsqueeze(1))
        for j, a in zip(reversed(order), reversed(alphas), strict=True):
            beta = torch.linalg.vecdot(yv_[j], r).mul_(rv_[j])
            r.addcmul_(a.sub_(beta).unsqueeze(1), sv_[j])
        d = r.neg_()
        gd = torch.linalg.vecdot(g, d)
        uphill = gd >= 0
        if bool(uphill.any()):  # a stale history; restart those subsets on steepest descent
            sd = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            d = torch.where(uphill.unsqueeze(1), -sd, d)
            gd = torch.linalg.vecdot(g, d)
        # Backtracking Armijo line search, per subset; only pending subsets are evaluated.
        gmax0 = g.abs().amax(1)
        step = torch.ones(k, dtype=torch.float64)
        new_th, new_f, new_g = th.clone(), f.clone(), g.clone()
        pending = torch.ones(k, dtype=torch.bool)
        p = None  # the pending rows; None = all k
        for _ls in range(40):
            if p is None:
                trial = th + d
                ft, gt = evaluate(trial, ids)
                f0, gd0, st, gm0 = f, gd, step, gmax0
            else:
                st = step.index_select(0, p)
                trial = th.index_select(0, p).addcmul_(st.unsqueeze(1), d.index_select(0, p))
                ft, gt = evaluate(trial, ids.index_select(0, p))
                f0, gd0, gm0 = f.index_select(0, p), gd.index_select(0, p), gmax0.index_select(0, p)
            ok = torch.isfinite(ft) & ((ft <= f0 + 1e-4 * st * gd0) | (
                # Near the optimum the decrease drowns in float64 rounding of f; then a step
                # that keeps f within rounding and shrinks the gradient is progress too.
                (ft <= f0 + 1e-14 * f0.abs()) & (gt.abs().amax(1) < gm0)))
            if p is None and bool(ok.all()):
                new_th, new_f, new_g = trial, ft, gt
                pending.zero_()
                break
            rows = ok.nonzero().flatten()
            acc = rows if p is None else p.index_select(0, rows)
            new_th.index_copy_(0, acc, trial.index_select(0, rows))
            new_f.index_copy_(0, acc, ft.index_select(0, rows))
            new_g.index_copy_(0, acc, gt.index_select(0, rows))
            pending.index_fill_(0, acc, False)
            p = pending.nonzero().flatten()
            if len(p) == 0:
                break
            step = torch.where(pending, step * 0.5, step)
        failed = pending
        sv, yv = new_th - th, new_g - g
        sy = torch.linalg.vecdot(sv, yv)
        good = ~failed & (sy > 1e-10 * sv.norm(dim=1) * yv.norm(dim=1))
        slot = (sv.mul_(good.unsqueeze(1)), yv.mul_(good.unsqueeze(1)),
                torch.where(good, 1.0 / sy.where(good, 1.0), 0.0))
        for hist, value in zip((s_hist, y_hist, rho), slot, strict=True):
            if len(hist) < history:
                hist.append(value)
            else:
                hist[pos] = value
        gamma = torch.where(good, sy / yv.square().sum(1).clamp_min(1e-300), gamma)
        pos, filled = (pos + 1) % history, filled + 1
        th, f, g = new_th, new_f, new_g
        its += (~failed).long()
        done = g.abs().amax(1) <= tol
        # A failed line search means no decrease is representable any more: stop that subset.
        stop = done | failed
        if bool(stop.any()):
            out = stop.nonzero().flatten()
            where = ids.index_select(0, out)
            theta_out.index_copy_(0, where, th.index_select(0, out))
            n_iter.index_copy_(0, where, its.index_select(0, out))
            converged.index_copy_(0, where, done.index_select(0, out))
            keep = (~stop).nonzero().flatten()
            ids, th, f, g, gamma, its = (
                t.index_select(0, keep) for t in (ids, th, f, g, gamma, its))
            s_hist, y_hist, rho = ([t.index_select(0, keep) for t in hist]
                                   for hist in (s_hist, y_hist, rho))
            k = len(ids)
    if k:  # max_iter reached
        theta_out.index_copy_(0, ids, th)
        n_iter.index_copy_(0, ids, its)
    coef = theta_out[:, : H * C].reshape(S, H, C).clone()
    intercept = theta_out[:, H * C:].clone()
    return Heads("classification", coef, intercept, torch.full((S,), float(l2)), converged,
                 n_iter)
