"""Batched head refits: the best linear head on each subset's frozen representation.

eta and gamma (docs/paper.md) need inf_h r(h o g_s) for every subset s. This module fits that head
for all S subsets at once on Z [S, n, H], on an encoder's output (encoded(encoder, xs): encoded
once, in memory or in a memory-mapped temporary file, never per solver iteration), or on a
GroupedZ: each subset at its own width (a late-fusion subset of m modalities is m blocks wide,
not padded to all K), in groups of equal width, one op call per group. select_l2 / fit_cv
choose each subset's l2 by k-fold cross-validation (as scikit-learn's LogisticRegressionCV /
RidgeCV on the same folds), all subsets and folds of a group in one batched solve.

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
  per-subset convergence, in centred coordinates (logits (z - mean z) W + c: the same model
  and optimum, better conditioned for all-positive ReLU features) with the inverse of the
  Hessian's diagonal at W = 0 as the initial matrix (on trained 6-view latents these two
  halved the iterations of a cold start: 1443 -> 476 summed over 30 problems at H = 128);
  the state (parameters, gradients, history) is kept for the
  still-active subsets only and compacted when some finish, so an iteration runs on views and
  each evaluation reads exactly the active subsets of Z (the op's subset_index). Stopping rule
  (sklearn's gtol):
      max_j |d objective / d theta_j| / sum_i sw_i <= tol,
  default tol 1e-6 for float64 Z and 1e-4 for float32/bfloat16 Z (sklearn's default; the loss
  and gradient are computed in float32 then). Each evaluation is the fused native op
  mmkernels::softmax_regression_loss_grad (logits, softmax, loss and gradient in one pass over
  Z; for C <= 16 (C <= 8 without AVX-512) rows sit in the vector lanes for the softmax, see
  csrc/cpu/heads/softmax_lanes.h).
  Why this solver, and how it uses threads (results depend on the thread count only through
  the op's summation order): docs/heads.md.

Risks reported by Heads.risk are unpenalised and unweighted means: the mean squared error
(averaged over outputs) for regression, the mean cross-entropy (nats) for classification.

The native ops have Meta kernels in C++ (csrc/meta/heads_meta.cpp: torch.library.opcheck
passes) and no autograd: they are solver internals, never differentiated.

On a GPU (Z a CUDA tensor, or an encoder whose output is one) every tensor the solvers make is
on Z's device and the ops run their CUDA kernels (csrc/cuda/gram.cuh, softmax_regression.cuh:
fixed-order reductions, so a given GPU gives the same bits run to run). The L-BFGS reads the
device once per iteration when every problem accepts its unit step (the acceptance and the
convergence test read together); a halved step or a problem finishing adds a read. GPU
results agree with the CPU's to rounding, not bit for bit (other summation orders).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    buffers (padded to at most 32 lanes), the grouped kernel's chunk buffers per thread (when
    problems of one subset are solved at once: a cross-validation's folds), and a float32
    copy of the picked subsets' Z rows of a call when Z is bfloat16 (with the bfloat16 gather
    it is made from)."""
    P = (H + 1) * C
    g = S if group is None else max(1, min(S, group))
    state = 8 * g * P * (2 * history + 12) + 8 * g * history + 2 * 8 * S * P
    lanes = C if C <= 8 else 16 if C <= 16 else 32 if C <= 32 else C
    tasks = g + 4 * max(1, torch.get_num_threads())
    op = 8 * (tasks + 3 * g) * (H * lanes + C + 1)
    op += 4 * max(1, torch.get_num_threads()) * (2 * 256 * 64 + 2 * 64 * H)
    convert = g * rows * H * (4 + z_itemsize) if z_itemsize == 2 else 0
    return state + op + convert


def _softmax_group(S: int, P: int, device: torch.device | str = "cpu") -> int:
    """Problems solved at once: k with k * P below PyTorch's intra-op grain (see _lbfgs), so
    the solver's own tensor ops run serially; all S with one torch thread (every op is serial
    then, and one group per call keeps the Python work per iteration independent of S), and
    all S on a GPU (where the grain does not apply and a group is a launch per op)."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() == 1:
        return S
    return min(S, max(1, (_GRAIN - 1) // P))


# ---- sources of Z: a tensor, an encoder applied chunk by chunk, or Z grouped by width ----------


Modalities = Sequence[Tensor] | Mapping[str, Tensor]


def _rows_of(xs: Modalities) -> list[Tensor]:
    return list(xs.values()) if isinstance(xs, Mapping) else list(xs)


def _take_rows(xs: Modalities, rows: slice) -> Modalities:
    if isinstance(xs, Mapping):
        return {k: v[rows] for k, v in xs.items()}
    return [x[rows] for x in xs]


@dataclass
class Encoded:
    """Z produced on demand: encoder(modality chunks) -> [S, r, H].

    xs is a list of modality tensors [n, d_k] or a dict name -> [n, d_k] (passed to the encoder
    as the same type); with a presence mask (bool [n, K], or a dict name -> bool [n]) the
    encoder is called as encoder(xs, mask), as SubsetEnsemble.latents takes them. Rows are
    encoded in chunks so that Z's chunk plus the ops' per-chunk buffers stay within
    memory_budget bytes (the encoder's own intermediates come on top). The encoder runs under
    torch.no_grad(); put modules in eval mode first.
    """

    encoder: Callable[..., Tensor]
    xs: Modalities
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    mask: Tensor | Mapping[str, Tensor] | None = None
    _shape: tuple[int, int, torch.dtype] | None = field(default=None, repr=False)
    _device: torch.device | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.xs, (list, tuple, Mapping)) or not self.xs:
            raise ValueError("xs must be a non-empty list (or dict) of modality tensors [n, d_k]")
        keys = list(self.xs) if isinstance(self.xs, Mapping) else list(range(len(self.xs)))
        tensors = _rows_of(self.xs)
        for k, x in zip(keys, tensors, strict=True):
            if not isinstance(x, Tensor):
                raise ValueError(f"xs[{k!r}] must be a tensor [n, d], got {type(x).__name__}")
        n = tensors[0].shape[0]
        for k, x in zip(keys, tensors, strict=True):
            if x.shape[0] != n:
                raise ValueError(f"xs[{k!r}] has {x.shape[0]} rows, expected {n} (rows of "
                                 f"xs[{keys[0]!r}])")
        if self.mask is not None:
            for key, m in (self.mask.items() if isinstance(self.mask, Mapping)
                           else [("", self.mask)]):
                if not isinstance(m, Tensor) or m.shape[:1] != (n,):
                    got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
                    raise ValueError(f"mask{f'[{key!r}]' if key else ''} must have {n} rows "
                                     f"(one per sample), got {got}")
        if self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be > 0 bytes, got {self.memory_budget}")

    @property
    def num_rows(self) -> int:
        return int(_rows_of(self.xs)[0].shape[0])

    def encode(self, r0: int, r1: int) -> Tensor:
        rows = slice(r0, r1)
        with torch.no_grad():
            x = _take_rows(self.xs, rows)
            if self.mask is None:
                z = self.encoder(x)
            else:
                m = ({k: v[rows] for k, v in self.mask.items()}
                     if isinstance(self.mask, Mapping) else self.mask[rows])
                z = self.encoder(x, m)
        if not isinstance(z, Tensor) or z.dim() != 3 or z.shape[1] != r1 - r0:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"encoder must return [S, {r1 - r0}, H] for {r1 - r0} rows, got {got}")
        return z.detach()

    def shape(self) -> tuple[int, int, torch.dtype]:
        """(S, H, dtype) of the encoder's output, from a probe of the first rows."""
        if self._shape is None:
            z = self.encode(0, min(self.num_rows, 2))
            self._shape = (int(z.shape[0]), int(z.shape[2]), z.dtype)
            self._device = z.device
        return self._shape

    def device(self) -> torch.device:
        """Where the encoder's output is (from the same probe as shape)."""
        self.shape()
        assert self._device is not None
        return self._device

    def rows_per_chunk(self, extra_per_row: int = 0) -> int:
        S, H, dtype = self.shape()
        per_row = S * (H * (dtype.itemsize + 4) + extra_per_row)
        return max(1, self.memory_budget // max(1, per_row))


def encoded(encoder: Callable[..., Tensor], xs: Modalities, *,
            mask: Tensor | Mapping[str, Tensor] | None = None,
            memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Encoded:
    """Wrap an encoder and its inputs (a list or dict of modalities, an optional presence
    mask) as a source of Z. fit encodes it once (see fit); risk / accuracy / predict stream it
    chunk by chunk."""
    return Encoded(encoder, xs if isinstance(xs, Mapping) else list(xs), memory_budget, mask)


def _spill(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor backed by a temporary file (MMKERNELS_SPILL_DIR, else the
    system's temporary folder) mapped into memory: the page cache holds what fits, the disk
    the rest. The file is unlinked at once; the mapping keeps it until the tensor is freed."""
    numel = math.prod(shape)
    fd, path = tempfile.mkstemp(prefix="mmkernels-z-", dir=os.environ.get("MMKERNELS_SPILL_DIR"))
    try:
        os.ftruncate(fd, max(1, numel * dtype.itemsize))
        t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)
    return t.view(shape)


def _storage(shape: tuple[int, ...], dtype: torch.dtype, in_memory: bool,
             device: torch.device | str = "cpu") -> Tensor:
    """Z's storage: on an accelerator always in its memory (the ops' own budget checks
    refuse what does not fit); on the CPU in memory or spilled to a file (see _spill)."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device="cpu") if in_memory else _spill(shape, dtype)


def _materialise(z: Encoded, extra_per_row: int) -> Tensor:
    """All of Z, encoded once (chunk by chunk, each chunk checked for NaN/Inf once): in memory
    when it fits z.memory_budget, else in a memory-mapped temporary file (see _spill)."""
    S, H, dtype = z.shape()
    n = z.num_rows
    step = z.rows_per_chunk(extra_per_row)
    out = None
    for r0, chunk in _chunks(z, extra_per_row):
        if out is None:
            out = _storage((S, n, H), dtype, in_memory=step >= n, device=chunk.device)
        out[:, r0:r0 + chunk.shape[1]] = chunk
    assert out is not None
    return out


ZLike = Tensor | Encoded


@dataclass
class GroupedZ:
    """Z of S subsets, each at its own width, stored as groups of subsets of equal width.

    groups[g] = (ids, z): ids int64 [S_g] are the subsets (0..S-1) of the group, in order,
    and z [S_g, n, H_g] their representations. A late-fusion subset of m modalities is m
    blocks wide, not padded to all K blocks with zeros, so a refit's work and memory per subset
    are proportional to its own width; one op call covers a whole group.
    """

    groups: list[tuple[Tensor, Tensor]]

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("GroupedZ needs at least one group")
        ids = torch.cat([i for i, _ in self.groups])
        if ids.dtype != torch.int64 or not torch.equal(ids.sort().values,
                                                      torch.arange(len(ids), device=ids.device)):
            raise ValueError("the groups' ids must hold every subset 0..S-1 exactly once")
        n = self.groups[0][1].shape[1]
        for i, z in self.groups:
            _check_z_tensor(z, finite=False)
            if z.shape[0] != len(i) or z.shape[1] != n:
                raise ValueError(f"a group of {len(i)} subsets has Z of shape {tuple(z.shape)}, "
                                 f"expected [{len(i)}, {n}, H]")

    @property
    def num_subsets(self) -> int:
        return sum(len(i) for i, _ in self.groups)

    @property
    def num_rows(self) -> int:
        return int(self.groups[0][1].shape[1])

    @property
    def widths(self) -> list[int]:
        """H_s of every subset, in subset order."""
        out = [0] * self.num_subsets
        for i, z in self.groups:
            for s in i.tolist():
                out[s] = int(z.shape[2])
        return out

    @property
    def nbytes(self) -> int:
        return sum(z.numel() * z.element_size() for _, z in self.groups)

    @classmethod
    def from_source(cls, source: ZLike, columns: Sequence[Tensor | None] | None = None, *,
                    memory_budget: int | None = None) -> GroupedZ:
        """Encode (or read) Z once and keep each subset's own columns.

        Args:
            source: a tensor [S, n, L] or an Encoded source producing it.
            columns: per subset, the int64 columns of L that are its representation (e.g. a
                late-fusion subset's blocks); None for a subset, or columns=None, keeps all L.
                The other columns must be zero in every row (they are checked as the chunks
                go by): they carry nothing a head could use.
            memory_budget: bytes of grouped Z held in memory (default: the source's budget,
                or DEFAULT_MEMORY_BUDGET); a larger Z goes to a memory-mapped temporary file
                (see _spill). Each chunk of the encoder's output is checked for NaN/Inf once.
        """
        if isinstance(source, Encoded):
            S, L, dtype = source.shape()
            n = source.num_rows
            budget = source.memory_budget if memory_budget is None else memory_budget
        else:
            _check_z_tensor(source, finite=False)
            S, n, L = (int(d) for d in source.shape)
            dtype = source.dtype
            budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
        cols = [None] * S if columns is None else list(columns)
        if len(cols) != S:
            raise ValueError(f"columns has {len(cols)} entries, expected S = {S} (one per subset)")
        # Subset ids and column lists are host metadata; Z's storage is on Z's device.
        full = torch.arange(L, device="cpu")
        cols = [full if c is None else torch.as_tensor(c, dtype=torch.int64, device="cpu")
                for c in cols]
        for s, c in enumerate(cols):
            if c.dim() != 1 or (c.numel() and (int(c.min()) < 0 or int(c.max()) >= L)):
                raise ValueError(f"columns[{s}] must be a 1-d list of columns in [0, {L - 1}]")
        dropped = torch.ones(S, L, dtype=torch.bool, device="cpu")
        for s, c in enumerate(cols):
            dropped[s, c] = False
        by_width: dict[int, list[int]] = {}
        for s, c in enumerate(cols):
            by_width.setdefault(len(c), []).append(s)
        need = n * dtype.itemsize * sum(len(c) for c in cols)
        in_memory = need <= budget
        groups: list = []
        check_drop = bool(dropped.any())
        if isinstance(source, Encoded):
            # A chunk of the encoder's output (padded) within a quarter of the budget.
            step = max(1, budget // (4 * max(1, S * L * dtype.itemsize)))
            pieces = ((r0, source.encode(r0, min(n, r0 + step))) for r0 in range(0, n, step))
        else:
            pieces = iter([(0, source)])
        for r0, chunk in pieces:
            dev = chunk.device
            if not groups:  # the storage, on the device of the source's first chunk
                for w, members in sorted(by_width.items()):
                    groups.append((torch.tensor(members, dtype=torch.int64, device="cpu"),
                                   _storage((len(members), n, w), dtype, in_memory, dev),
                                   torch.stack([cols[s] for s in members]).to(dev)))
            r1 = r0 + chunk.shape[1]
            where = f"Z (the encoder's output for rows {r0}:{r1})" if isinstance(
                source, Encoded) else "Z"
            if chunk.shape[0] != S or chunk.shape[2] != L:
                raise ValueError(f"{where} has shape {tuple(chunk.shape)}, expected "
                                 f"[{S}, {r1 - r0}, {L}]")
            _check_z_tensor(chunk, where, finite=False)
            # One pass over the chunk for both checks: the column minima and maxima [S, L] are
            # all finite iff the chunk is, and both 0 iff the column is zero in every row.
            lo, hi = (torch.aminmax(chunk, dim=1) if chunk.shape[1] else
                      (chunk.new_zeros(S, L), chunk.new_zeros(S, L)))
            if not bool((torch.isfinite(lo) & torch.isfinite(hi)).all()):
                bad = (~(torch.isfinite(lo) & torch.isfinite(hi))).any(1).nonzero()
                raise ValueError(f"{where} holds NaN or Inf values (in subsets "
                                 f"{bad.flatten().tolist()[:10]})")
            if check_drop:
                nonzero = (((lo != 0) | (hi != 0)) & dropped.to(dev)).any(1)
                if bool(nonzero.any()):
                    bad = nonzero.nonzero().flatten().tolist()
                    raise ValueError(f"{where} is non-zero outside the columns given for "
                                     f"subsets {bad[:10]}: those columns would be dropped")
            # A column gather per subset: 5x the 3-d advanced index [ids, rows, columns] of
            # a whole group (which builds an index per output entry) on the cell's Z.
            for ids, store, c in groups:
                for j, s in enumerate(ids.tolist()):
                    store[j, r0:r1].copy_(chunk[s].index_select(1, c[j]))
        return cls([(ids, store) for ids, store, _ in groups])


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
    if finite and not _all_finite(z):
        bad = (~torch.isfinite(z)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{name} holds NaN or Inf values (in subsets {bad[:10]})")


def _all_finite(z: Tensor) -> bool:
    """No NaN or Inf in z, by one reduction: aminmax propagates NaN, and an infinity is the
    minimum or the maximum (13x faster than isfinite(z).all(), which writes a bool per entry,
    on the sweep cell's 268 MB Z)."""
    if z.numel() == 0:
        return True
    lo, hi = torch.aminmax(z)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _num_rows(z: ZLike | GroupedZ) -> int:
    return z.num_rows if isinstance(z, (Encoded, GroupedZ)) else int(z.shape[1])


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
        return torch.baddbmm(self.intercept.to(z.device, dt).unsqueeze(1), z.to(dt),
                             self.coef.to(z.device, dt))

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
        total = None
        for r0, chunk in _chunks(z, extra_per_row=8 * self.coef.shape[2]):
            if total is None:
                total = torch.zeros(self.num_subsets, dtype=torch.float64, device=chunk.device)
            yc = y[r0:r0 + chunk.shape[1]].to(chunk.device)
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
                    chunk, yc, self.coef.to(chunk.device, dt),
                    self.intercept.to(chunk.device, dt), None, 0.0)
                total += loss.double()
            if not bool(torch.isfinite(total).all()):
                _check_z_tensor(chunk)
        assert total is not None
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
        pred = self.predict(z)
        return (pred == y.to(pred.device).unsqueeze(0)).double().mean(1)


@dataclass
class GroupedHeads:
    """Heads fitted on a GroupedZ: parts[g] = (ids, Heads) for each group of equal width.

    l2, converged, n_iter: [S] in subset order; risk / accuracy / predict take a GroupedZ of
    the same grouping (e.g. the test rows' GroupedZ.from_source with the same columns).
    """

    task: str
    parts: list[tuple[Tensor, Heads]]

    @property
    def num_subsets(self) -> int:
        return sum(len(i) for i, _ in self.parts)

    def _gather(self, attr: str) -> Tensor:
        first = getattr(self.parts[0][1], attr)
        out = first.new_empty((self.num_subsets, *first.shape[1:]))
        for ids, h in self.parts:
            out[ids.to(out.device)] = getattr(h, attr)
        return out

    @property
    def l2(self) -> Tensor:
        return self._gather("l2")

    @property
    def converged(self) -> Tensor:
        return self._gather("converged")

    @property
    def n_iter(self) -> Tensor:
        return self._gather("n_iter")

    @property
    def pinv_fallback(self) -> list[int]:
        return sorted(int(ids[j]) for ids, h in self.parts for j in h.pinv_fallback)

    def head(self, s: int) -> tuple[Tensor, Tensor]:
        """(coef [H_s, T or C], intercept [T or C]) of subset s."""
        for ids, h in self.parts:
            hit = (ids == s).nonzero().flatten()
            if len(hit):
                return h.coef[int(hit[0])], h.intercept[int(hit[0])]
        raise ValueError(f"s must be a subset in 0..{self.num_subsets - 1}, got {s}")

    def _zip(self, z: GroupedZ) -> list[tuple[Tensor, Heads, Tensor]]:
        if not isinstance(z, GroupedZ):
            raise ValueError(f"Z must be a GroupedZ like the one the heads were fitted on, got "
                             f"{type(z).__name__}")
        if len(z.groups) != len(self.parts) or any(
                not torch.equal(i, j) for (i, _), (j, _) in zip(z.groups, self.parts,
                                                                 strict=True)):
            raise ValueError("Z must group the subsets as the fitted heads do (the same "
                             "columns per subset)")
        return [(ids, h, zg) for (ids, h), (_, zg) in zip(self.parts, z.groups, strict=True)]

    def _per_subset(self, z: GroupedZ, score: Callable[[Heads, Tensor], Tensor]) -> Tensor:
        parts = [(ids, score(h, zg)) for ids, h, zg in self._zip(z)]
        out = parts[0][1].new_empty(self.num_subsets)
        for ids, v in parts:
            out[ids.to(out.device)] = v
        return out

    def risk(self, z: GroupedZ, y: Tensor) -> Tensor:
        """Heads.risk per subset, float64 [S]."""
        return self._per_subset(z, lambda h, zg: h.risk(zg, y))

    def accuracy(self, z: GroupedZ, y: Tensor) -> Tensor:
        """Heads.accuracy per subset, float64 [S] (classification only)."""
        return self._per_subset(z, lambda h, zg: h.accuracy(zg, y))

    def predict(self, z: GroupedZ) -> Tensor:
        """Heads.predict, every subset: labels [S, n], or [S, n, T] / [S, n] (regression)."""
        parts = [(ids, h.predict(zg)) for ids, h, zg in self._zip(z)]
        out = parts[0][1].new_empty((self.num_subsets, *parts[0][1].shape[1:]))
        for ids, p in parts:
            out[ids.to(out.device)] = p
        return out


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


def _l2_vector(l2: float | Tensor, S: int, device: torch.device | str = "cpu") -> Tensor:
    """l2 as float64 [S] on device (a float, or one value per subset), checked finite, >= 0."""
    if isinstance(l2, Tensor):
        if l2.shape != (S,):
            raise ValueError(f"l2 must be a float or a tensor [S] = [{S}] (one per subset), got "
                             f"shape {tuple(l2.shape)}")
        lam = l2.detach().to(device, torch.float64)
    else:
        lam = torch.full((S,), float(l2), dtype=torch.float64, device=device)
    if not (bool(torch.isfinite(lam).all()) and bool((lam >= 0).all())):
        raise ValueError(f"l2 must be finite and >= 0, got {l2}")
    return lam


def fit(
    z: ZLike | GroupedZ,
    y: Tensor,
    *,
    task: str,
    l2: float | Tensor | None = None,
    class_weight: str | Tensor | None = None,
    num_classes: int | None = None,
    tol: float | None = None,
    max_iter: int = 1000,
    history: int = 10,
) -> Heads | GroupedHeads:
    """Fit one linear head per subset on Z [S, n, H] (a tensor, an encoded(encoder, xs)
    source, or a GroupedZ: each subset at its own width, fitted group by group).

    Args:
        z: [S, n, H] float32/float64/bfloat16, an Encoded source, or a GroupedZ (then the
            result is a GroupedHeads).
        y: regression: float [n] or [n, T]; classification: int labels [n] in [0, C).
        task: "regression" or "classification".
        l2: penalty on the weights (never on the intercept), sum-of-losses scaling; a float,
            or a tensor [S] with one value per subset. Ridge: sklearn Ridge(alpha=l2); default
            1e-6 * trace(centred Gram) / H per subset. Classification: l2 = 1 / sklearn's C;
            default 1.0. To choose it by cross-validation, see select_l2.
        class_weight: classification only: None, "balanced" (n / (n_present_classes *
            count_c), sklearn's rule) or a tensor [C] of per-class weights.
        num_classes: C; default max(y) + 1. A class absent from y gets a head whose intercept
            drives its probability toward 0 (to the gradient tolerance).
        tol: classification gradient tolerance (see the module docstring).
        max_iter, history: L-BFGS iteration limit and memory.

    Memory: an Encoded source is encoded once, chunk by chunk (each chunk checked for NaN/Inf
    once), into memory when all of Z fits its memory_budget, else into a memory-mapped
    temporary file (ridge streams it once instead); the solver then reads that Z, never the
    encoder again. Solver state on top: ridge ~6 [S, H+1, H+1] float64 matrices; L-BFGS
    history 2 * history * S * (H+1) * C float64 plus ~12 [S, (H+1) C] vectors; bfloat16 Z is
    converted to float32 inside each op call (a float32 copy of the call's rows of the subsets
    it evaluates). When that state and workspace would exceed the memory budget
    (:mod:`mmkernels.memory`: MMKERNELS_MEMORY_BUDGET, default 80 % of the memory available),
    fit raises MemoryBudgetError (a ValueError) stating the bytes needed and the budget, before
    allocating. With more than one torch thread the L-BFGS state is for one group of subsets
    at a time (k with k (H+1) C < 32768), with one thread for all S.

    Determinism: for a given Z, y, settings and torch.get_num_threads(), results are
    bit-identical from run to run. Classification results of a subset can differ at the
    rounding level (and the solver may then take a different number of iterations) with the
    thread count and with the other subsets fitted alongside it: the op splits each subset's
    rows into blocks by the thread count and the number of subsets of the call, and sums the
    blocks in order.
    """
    if task not in _TASKS:
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
    if l2 is not None and not isinstance(l2, Tensor) and not (math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be finite and >= 0, got {l2}")
    if isinstance(z, GroupedZ):
        lam = None if l2 is None else _l2_vector(l2, z.num_subsets, _device_of(z))
        return GroupedHeads(task, [
            (ids, fit(zg, y, task=task, l2=None if lam is None else lam[ids.to(lam.device)],
                      class_weight=class_weight, num_classes=num_classes, tol=tol,
                      max_iter=max_iter, history=history))
            for ids, zg in z.groups])
    if not isinstance(z, Encoded):
        _check_z_tensor(z, finite=False)
    n = _num_rows(z)
    if n == 0:
        raise ValueError("Z has no rows (n = 0): nothing to fit")
    dev = _device_of(z)
    y = _check_y(y, n, task).to(dev)
    S, H, zdtype = (z.shape() if isinstance(z, Encoded)
                    else (int(z.shape[0]), int(z.shape[2]), z.dtype))
    lam = None if l2 is None else _l2_vector(l2, S, dev)
    if task == "regression":
        if class_weight is not None:
            raise ValueError("class_weight applies to task='classification' only")
        T = 1 if y.dim() == 1 else int(y.shape[1])
        _check_budget(f"the ridge refit of S = {S} subsets at H = {H}, T = {T}",
                      _ridge_bytes(S, H, T))
        return _fit_ridge(z, y, lam)
    C = (int(y.max()) + 1 if num_classes is None else max(1, int(num_classes)))
    group = _softmax_group(S, (H + 1) * C, dev)
    _check_budget(f"the softmax refit of S = {S} subsets at H = {H}, C = {C} (L-BFGS history "
                  f"{history})", _softmax_bytes(S, H, C, history, n, zdtype.itemsize, group))
    C, sw = _softmax_setup(y, class_weight, num_classes, max_iter, history)
    if isinstance(z, Encoded):
        z = _materialise(z, extra_per_row=16 * C)
    lam = torch.full((S,), 1.0, dtype=torch.float64, device=dev) if lam is None else lam
    tol = _default_tol(tol, z.dtype)
    theta, converged, n_iter = _solve_softmax(z, y, sw, C, lam, tol=tol, max_iter=max_iter,
                                              history=history)
    return _softmax_heads(theta, H, C, lam, converged, n_iter)


def _device_of(z: ZLike | GroupedZ) -> torch.device:
    """Where Z is (an Encoded source: where its encoder's output is): the solvers' state and
    every tensor they make live there."""
    if isinstance(z, GroupedZ):
        return z.groups[0][1].device
    if isinstance(z, Encoded):
        return z.device()
    return z.device


def _grams(z: ZLike, y2: Tensor, rows: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Sum over chunks (of rows r0:r1 of a tensor Z, or of all of an Encoded Z) of the
    intercept-augmented Gram [S, H+1, H+1] and [Z 1]^T Y [S, H+1, T], float64."""
    G = R = None
    if rows is not None:
        assert isinstance(z, Tensor)
        parts: Iterator[tuple[int, Tensor]] = iter([(rows[0], z[:, rows[0]:rows[1]])])
    else:
        parts = _chunks(z, extra_per_row=8 * y2.shape[1])
    for r0, chunk in parts:
        g, r = _ops.gram(chunk, y2[r0:r0 + chunk.shape[1]].to(chunk.device, chunk.dtype))
        if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(r).all())):
            _check_z_tensor(chunk)  # names the subsets holding NaN/Inf
            raise ValueError("the Gram matrix of Z overflowed (entries of Z too large for "
                             f"{g.dtype} accumulation); pass float64 Z or rescale it")
        G = g.double() if G is None else G + g.double()
        R = r.double() if R is None else R + r.double()
    assert G is not None and R is not None
    return G, R


def _centred(G: Tensor, R: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(A, rhs, mu, ybar): the Gram and right-hand side with the intercept eliminated."""
    H = G.shape[1] - 1
    n = G[:, H, H]
    mu = G[:, :H, H] / n[:, None]                                   # [S, H]
    ybar = R[:, H, :] / n[:, None]                                  # [S, T]
    A = G[:, :H, :H] - n[:, None, None] * mu.unsqueeze(2) * mu.unsqueeze(1)
    rhs = R[:, :H, :] - n[:, None, None] * mu.unsqueeze(2) * ybar.unsqueeze(1)
    return A, rhs, mu, ybar


def _ridge_default_l2(A: Tensor) -> Tensor:
    return 1e-6 * A.diagonal(dim1=1, dim2=2).sum(1).clamp_min(0) / max(A.shape[1], 1)


def _ridge_solve(A: Tensor, rhs: Tensor, lam: Tensor) -> tuple[Tensor, list[int]]:
    """coef [S, H, T] of (A + lam I) coef = rhs by batched Cholesky; where that fails, the
    minimum-norm solution by eigh (listed in the returned subsets)."""
    H = A.shape[1]
    A = A + lam[:, None, None] * torch.eye(H, dtype=torch.float64, device=A.device)
    L, info = torch.linalg.cholesky_ex(A)
    coef = torch.empty_like(rhs)
    ok = info == 0
    if bool(ok.all()):
        coef = torch.cholesky_solve(rhs, L)
    elif bool(ok.any()):
        coef[ok] = torch.cholesky_solve(rhs[ok], L[ok])
    failed = (~ok).nonzero().flatten().tolist()
    for s in failed:
        # Minimum-norm solution: drop eigen-directions at the rounding level of the Gram.
        evals, evecs = torch.linalg.eigh(A[s])
        cutoff = evals.abs().max() * H * torch.finfo(torch.float32).eps
        inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
        coef[s] = evecs @ (inv[:, None] * (evecs.T @ rhs[s]))
    return coef, failed


def _fit_ridge(z: ZLike, y: Tensor, lam: Tensor | None) -> Heads:
    G, R = _grams(z, y.reshape(y.shape[0], -1))
    A, rhs, mu, ybar = _centred(G, R)
    lam = _ridge_default_l2(A) if lam is None else lam
    coef, failed = _ridge_solve(A, rhs, lam)
    intercept = ybar - (mu.unsqueeze(1) @ coef).squeeze(1)
    S = G.shape[0]
    dev = G.device
    return Heads("regression", coef, intercept, lam.to(dev),
                 torch.ones(S, dtype=torch.bool, device=dev),
                 torch.zeros(S, dtype=torch.int64, device=dev), y_1d=y.dim() == 1,
                 pinv_fallback=failed)


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
        cw = class_weight.to(y.device, torch.float64)
        if not bool(torch.isfinite(cw).all()) or bool((cw < 0).any()):
            raise ValueError("class_weight must hold finite values >= 0")
    return cw[y]


def _softmax_setup(y: Tensor, class_weight: str | Tensor | None, num_classes: int | None,
                   max_iter: int, history: int) -> tuple[int, Tensor | None]:
    """(C, per-row sample weights or None), with the argument checks."""
    C = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if C < 1 or int(y.max()) >= C:
        raise ValueError(f"num_classes must be >= 1 and above every label of y (max "
                         f"{int(y.max())}), got {num_classes}")
    if max_iter < 0 or history < 1:
        raise ValueError(f"max_iter must be >= 0 and history >= 1, got {max_iter}, {history}")
    sw = _class_weights(class_weight, y, C)
    if sw is not None and float(sw.sum()) <= 0:
        raise ValueError("class_weight gives every sample weight 0")
    return C, sw


def _default_tol(tol: float | None, zdtype: torch.dtype) -> float:
    if tol is None:
        return 1e-6 if zdtype == torch.float64 else 1e-4
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be finite and > 0, got {tol}")
    return tol


def _softmax_heads(theta: Tensor, H: int, C: int, lam: Tensor, converged: Tensor,
                   n_iter: Tensor) -> Heads:
    S = theta.shape[0]
    coef = theta[:, : H * C].reshape(S, H, C).clone()
    intercept = theta[:, H * C:].clone()
    return Heads("classification", coef, intercept, lam.clone(), converged, n_iter)


def _column_moments(z: Tensor, rows: int = 4096) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of every column of every subset, float64 [S, H] each, in
    chunks of rows (no float64 copy of Z)."""
    S, n, H = (int(d) for d in z.shape)
    total = torch.zeros(S, H, dtype=torch.float64, device=z.device)
    for r0 in range(0, n, rows):
        total += z[:, r0:r0 + rows].sum(1, dtype=torch.float64)
    mu = total / max(n, 1)
    sq = torch.zeros(S, H, dtype=torch.float64, device=z.device)
    for r0 in range(0, n, rows):
        sq += (z[:, r0:r0 + rows].double() - mu.unsqueeze(1)).square().sum(1)
    return mu, sq / max(n, 1)


def _solve_softmax(z: Tensor, y: Tensor, sw: Tensor | None, C: int, l2: Tensor, *,
                   tol: float, max_iter: int, history: int, zid: Tensor | None = None,
                   fold: Tensor | None = None,
                   pieces: Sequence[Sequence[tuple[int, int]]] | None = None,
                   theta0: Tensor | None = None,
                   moments: tuple[Tensor, Tensor] | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Solve k independent multinomial problems on Z [S, n, H].

    Problem i fits subset zid[i] of Z (default: i, k = S) on the rows pieces[fold[i]] (a list
    of row ranges (r0, r1); default: all rows) with penalty l2[i], from theta0[i] (default
    0). Returns theta [k, (H+1) C] float64 (W flattened, then b), converged [k], n_iter [k].
    moments: _column_moments(z), when the caller has them (one pass over Z saved).

    The solver works in centred coordinates: logits = (z - mu) W + c with mu the subset's mean
    row of Z, i.e. b = c - mu W. That is the same model and the same penalty (on W only), so
    the same optimum, but the intercept no longer competes with the mean of Z: ReLU features
    are all >= 0, and their mean direction made the uncentred problem ill-conditioned (L-BFGS
    took ~2-5x the iterations on trained latents). The op still reads Z as it is stored.
    """
    S, n, H = (int(d) for d in z.shape)
    dev = z.device
    y = y.to(dev)
    k = S if zid is None else len(zid)
    mu_s, var_s = _column_moments(z) if moments is None else moments  # [S, H] each
    mu = mu_s if zid is None else mu_s.index_select(0, zid)             # [k, H]
    dt = _compute_dtype(z.dtype)
    P, HC = (H + 1) * C, H * C
    pieces = [[(0, n)]] if pieces is None else pieces
    fold = torch.zeros(k, dtype=torch.int64, device=dev) if fold is None else fold.to(dev)
    sw_c = None if sw is None else sw.to(dev, dt)
    rows_weight = [sum(float(r1 - r0) if sw is None else float(sw[r0:r1].sum())
                       for r0, r1 in ps) for ps in pieces]
    if any(w <= 0 for w in rows_weight):
        raise ValueError("a fold leaves no training rows (or only rows of weight 0)")
    scale = torch.tensor(rows_weight, dtype=torch.float64, device=dev)[fold]  # [k]
    # The row ranges the op is called on: the pieces cut at every piece's ends, each with the
    # folds whose pieces cover it. A cross-validation's folds overlap (every block of rows
    # trains all folds but its own), so one call per block covers all the problems that read
    # it, each subset's problems side by side: the op solves those at once, reading the rows
    # once (softmax_grouped.h).
    cuts = sorted({0, n, *(r for ps in pieces for piece in ps for r in piece)})
    atoms = [(a0, a1, [f for f, ps in enumerate(pieces) if any(r0 <= a0 and a1 <= r1
                                                              for r0, r1 in ps)])
             for a0, a1 in zip(cuts, cuts[1:]) if a1 > a0]
    atoms = [atom for atom in atoms if atom[2]]
    # L-BFGS's initial inverse Hessian: the inverse of the Hessian's diagonal at W = 0 in the
    # centred coordinates (each class at probability 1/C): p (1 - p) var(z_h) + l2 / n for
    # W[h, c] and p (1 - p) for c. The columns of trained latents differ in scale by 10-100x;
    # the diagonal takes that out of the iteration count (the optimum is unchanged).
    pc = (1.0 / C) * (1.0 - 1.0 / C)
    var = var_s if zid is None else var_s.index_select(0, zid)
    hess = torch.empty(k, P, dtype=torch.float64, device=dev)
    hess[:, :HC] = (pc * var).unsqueeze(2).expand(k, H, C).flatten(1) + (l2 / scale)[:, None]
    hess[:, HC:] = pc
    diag = 1.0 / hess.clamp_min(1e-10 * hess.amax(1, keepdim=True))

    cached: list = [object(), None]  # (pid, its row ranges' problems)

    def atom_problems(pid: Tensor | None) -> list[tuple[int, int, Tensor | None]]:
        """Per row range (r0, r1), the positions in pid (None: all k) of the problems that
        read it, ordered by subset (None: all, in order). Read on the host, so cached per pid:
        the solver asks again with the same tensor until some problem finishes."""
        if cached[0] is pid:
            return cached[1]
        fp = fold if pid is None else fold.index_select(0, pid)
        zs = zid if pid is None else (pid if zid is None else zid.index_select(0, pid))
        if zs is not None and (len(zs) < 2 or bool((zs[1:] >= zs[:-1]).all())):
            zs = None  # already in subset order
        out: list[tuple[int, int, Tensor | None]] = []
        for a0, a1, folds_in in atoms:
            if len(folds_in) == len(pieces):
                sel = None if zs is None else torch.argsort(zs, stable=True)
            else:
                sel = torch.isin(fp, torch.tensor(folds_in, device=dev)).nonzero().flatten()
                if zs is not None:
                    sel = sel.index_select(0, torch.argsort(zs.index_select(0, sel),
                                                            stable=True))
            if sel is None or len(sel):
                out.append((a0, a1, sel))
        cached[0], cached[1] = pid, out
        return out

    def evaluate(theta: Tensor, pid: Tensor | None) -> tuple[Tensor, Tensor]:
        """Mean-scaled objective [m] and gradient [m, P] (float64) of problems pid (None: all
        k), at theta [m, P]."""
        Wd = theta[:, :HC]
        W64 = Wd.reshape(theta.shape[0], H, C)
        mu_p = mu if pid is None else mu.index_select(0, pid)
        W = W64.to(dt)
        b = (theta[:, HC:] - (mu_p.unsqueeze(1) @ W64).squeeze(1)).to(dt)
        zsel = pid if zid is None else (zid if pid is None else zid.index_select(0, pid))
        m = theta.shape[0]
        loss = torch.zeros(m, dtype=torch.float64, device=dev)
        # The row ranges' gradients are summed in the op's dtype: in float32 the rounding of
        # up to F - 1 sums is of the order of the op's own rounding of each (~1e-7 relative),
        # far below the solver's tolerance, and it saves a float64 copy of each.
        # W's and b's gradients apart: index_add_ into a column slice of [m, P] takes a
        # scatter path ~7x slower than into a whole contiguous tensor.
        gW = torch.zeros(m, HC, dtype=dt, device=dev)
        gB = torch.zeros(m, C, dtype=dt, device=dev)
        for r0, r1, sel in atom_problems(pid):
            Ws, bs = (W, b) if sel is None else (W.index_select(0, sel), b.index_select(0, sel))
            idx = zsel if sel is None else (sel if zsel is None else zsel.index_select(0, sel))
            # subset_index lets the op read only the picked subsets of Z in place (a gather
            # would copy as many bytes as the op reads).
            lo, gwc, gbc = _ops.softmax_regression_loss_grad(
                z[:, r0:r1], y[r0:r1], Ws, bs, None if sw_c is None else sw_c[r0:r1], 0.0, idx)
            if sel is None:
                loss += lo
                gW += gwc.flatten(1)
                gB += gbc
            else:
                loss.index_add_(0, sel, lo.double())
                gW.index_add_(0, sel, gwc.flatten(1))
                gB.index_add_(0, sel, gbc)
        lam = l2 if pid is None else l2.index_select(0, pid)
        sc = scale if pid is None else scale.index_select(0, pid)
        grad = torch.empty(m, P, dtype=torch.float64, device=dev)
        grad[:, HC:] = gB
        # d/dW at fixed c: the op's gradient in W minus mu (outer) its gradient in b, in
        # float64 as it is converted.
        torch.addcmul(gW.view(m, H, C), mu_p.unsqueeze(2), gB.unsqueeze(1), value=-1.0,
                      out=grad[:, :HC].view(m, H, C))
        loss += (0.5 * lam) * Wd.square().sum(1)
        grad[:, :HC].addcmul_(lam.unsqueeze(1), Wd)
        return loss.div_(sc), grad.div_(sc.unsqueeze(1))

    def subsets_of(bad: list[int]) -> list[int]:
        return bad if zid is None else zid[bad].tolist()

    def shift(theta: Tensor, sign: float) -> Tensor:
        """Between b (sign -1: to b) and c = b + mu W (sign +1: to c)."""
        out = theta.to(torch.float64).clone()
        out[:, HC:] += sign * (mu.unsqueeze(1) @ out[:, :HC].reshape(k, H, C)).squeeze(1)
        return out

    theta0 = None if theta0 is None else shift(theta0, 1.0)
    # With several threads, problems are solved in groups of g with g * P below PyTorch's
    # intra-op grain, so that the solver's own tensor ops run serially (see _lbfgs).
    size = _softmax_group(k, P, dev)
    if size >= k:
        th, conv, its = _lbfgs(evaluate, k, P, tol, max_iter, history, theta0, subsets_of, diag,
                               dev)
        return shift(th, -1.0), conv, its
    out = [torch.zeros(k, P, dtype=torch.float64, device=dev),
           torch.zeros(k, dtype=torch.bool, device=dev),
           torch.zeros(k, dtype=torch.int64, device=dev)]
    for s0 in range(0, k, size):
        ids = torch.arange(s0, min(k, s0 + size), device=dev)

        def in_group(theta: Tensor, pid: Tensor | None, ids: Tensor = ids
                     ) -> tuple[Tensor, Tensor]:
            return evaluate(theta, ids if pid is None else ids.index_select(0, pid))

        part = _lbfgs(in_group, len(ids), P, tol, max_iter, history,
                      None if theta0 is None else theta0[ids],
                      lambda bad, ids=ids: subsets_of(ids[bad].tolist()), diag[ids], dev)
        for o, p in zip(out, part, strict=True):
            o[ids] = p
    return shift(out[0], -1.0), out[1], out[2]


_GRAIN = 32768  # at::internal::GRAIN_SIZE: elementwise ops on fewer elements run serially


def _reads_are_free(device: torch.device | str) -> bool:
    """Whether reading a flag from `device` costs nothing (the CPU: no queue to drain); the
    solver then tests for its rare branches instead of computing them for every problem."""
    return torch.device(device).type == "cpu"


def _lbfgs(evaluate: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]], S: int, P: int,
           tol: float, max_iter: int, history: int, theta0: Tensor | None = None,
           subsets_of: Callable[[list[int]], list[int]] = lambda bad: bad,
           diag: Tensor | None = None, device: torch.device | str = "cpu"
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Batched L-BFGS over S independent problems with parameters theta [S, P], from theta0
    (default 0); returns (theta, converged [S], n_iter [S]), on `device` (where evaluate's
    results are; theta0 and diag must be there too).

    Host syncs: one per iteration when the unit step is accepted for every problem (the
    common case): the line search's acceptance and the convergence test are read together.
    A backtracking step reads its acceptance once more, and problems finishing are compacted
    (reads of which finished); nothing else waits for the device. On the CPU, where a read
    costs nothing, two more flags skip work that is rarely needed.

    diag [S, P] > 0: an estimate of the inverse Hessian's diagonal, the initial matrix of
    every two-loop recursion (times the usual scalar s'y / y'Dy); None: the identity.

    The state is kept for the still-active problems only, compacted when some finish, so an
    iteration runs on views (no gathers) and evaluates exactly the problems that need it. The
    history is the exception: its slots are never compacted (that was 20 copies of [k, P] each
    time a problem finished), the direction op reads each problem's row of each slot. Every
    tensor op here is on [k, P] or [k] (the history is a list of slots), so it runs serially
    below PyTorch's intra-op grain (k * P < 32768, e.g. 7 subsets at H = 128, C = 6;
    with several threads the caller splits larger S into groups) without touching the global
    thread count; gathers use index_select / index_copy_ (serial when small) rather than
    advanced indexing (aten::index opens an OpenMP region). subsets_of maps problems to the
    subsets named in messages.
    """
    theta_out = (torch.zeros(S, P, dtype=torch.float64, device=device) if theta0 is None
                 else theta0.to(torch.float64).clone())
    f, g = evaluate(theta_out, None)
    if not bool(torch.isfinite(f).all()):
        bad = subsets_of((~torch.isfinite(f)).nonzero().flatten().tolist())
        where = "at W = 0" if theta0 is None else "at the starting point"
        raise ValueError(f"the loss {where} is not finite: Z holds NaN or Inf values (in "
                         f"subsets {sorted(set(bad))[:10]})")
    gmax = g.abs().amax(1)  # the gradient's max norm, carried with g
    converged = gmax <= tol
    n_iter = torch.zeros(S, dtype=torch.int64, device=device)
    # index_select / index_copy_ rather than advanced indexing: those run serially on small
    # tensors, while aten::index opens an OpenMP region (milliseconds on a busy machine).
    ids = (~converged).nonzero().flatten()
    th, f, g = theta_out.index_select(0, ids), f.index_select(0, ids), g.index_select(0, ids)
    gmax = gmax.index_select(0, ids)
    k = len(ids)
    # History slot by slot, filled in turn: each slot is [k, P] for the k problems active when
    # it was written and is never compacted; slot_rows[j] maps today's problems to its rows
    # (None: row i), which lbfgs_direction reads through.
    s_hist: list[Tensor] = []
    y_hist: list[Tensor] = []
    rho: list[Tensor] = []
    slot_rows: list[Tensor | None] = []
    dg = None if diag is None else diag.index_select(0, ids)
    gamma = (1.0 / g.norm(dim=1).clamp_min(1e-12) if dg is None
             else torch.ones(k, dtype=torch.float64, device=device))
    its = torch.zeros(k, dtype=torch.int64, device=device)
    on_gpu = not _reads_are_free(device)
    pos = filled = 0
    for _ in range(max_iter):
        if k == 0:
            break
        # The two-loop recursion over the filled slots, newest pair first (a rejected pair is
        # stored with rho = 0 and does nothing), problem by problem in one op: each problem's
        # history is read from memory once (see csrc/cpu/heads/lbfgs_direction.cpp).
        order = [(pos - 1 - j) % history for j in range(min(filled, history))]
        rows = None
        if any(slot_rows[j] is not None for j in order):
            every = torch.arange(k, device=device)
            rows = torch.stack([every if slot_rows[j] is None else slot_rows[j] for j in order])
        d = _ops.lbfgs_direction(g, [s_hist[j] for j in order], [y_hist[j] for j in order],
                                 [rho[j] for j in order], gamma, dg, rows)
        gd = torch.linalg.vecdot(g, d)
        # A stale history points uphill: restart those problems on steepest descent (selected
        # on the device, no host read; on the CPU a read is free and saves the rare case's
        # four passes over [k, P]).
        uphill = gd >= 0
        if on_gpu or bool(uphill.any()):
            sd = g if dg is None else g * dg
            sd = sd / sd.norm(dim=1, keepdim=True).clamp_min(1e-12)
            d = torch.where(uphill.unsqueeze(1), -sd, d)
            gd = torch.where(uphill, torch.linalg.vecdot(g, d), gd)
        # Backtracking Armijo line search, per subset; only pending subsets are evaluated.
        gmax0 = gmax
        step = torch.ones(k, dtype=torch.float64, device=device)
        # The accepted points, copied from the current ones only when some unit step fails
        # (the common case, all accepted, takes the trial point as it is).
        new_th = new_f = new_g = new_gmax = None
        pending = torch.ones(k, dtype=torch.bool, device=device)
        p = None  # the pending rows; None = all k
        any_stop = None  # known without a further read when every unit step is accepted
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
            gmt = gt.abs().amax(1)
            ok = torch.isfinite(ft) & ((ft <= f0 + 1e-4 * st * gd0) | (
                # Near the optimum the decrease drowns in float64 rounding of f; then a step
                # that keeps f within rounding and shrinks the gradient is progress too.
                (ft <= f0 + 1e-14 * f0.abs()) & (gmt < gm0)))
            if p is None:
                # One host read: is every unit step accepted, and would any problem then meet
                # the tolerance (the convergence test, below)?
                all_ok, any_done = torch.stack([ok.all(), (gmt <= tol).any()]).tolist()
                if all_ok:
                    new_th, new_f, new_g, new_gmax = trial, ft, gt, gmt
                    pending.zero_()
                    any_stop = bool(any_done)
                    break
            if new_th is None:
                new_th, new_f, new_g, new_gmax = th.clone(), f.clone(), g.clone(), gmax.clone()
            rows = ok.nonzero().flatten()
            acc = rows if p is None else p.index_select(0, rows)
            new_th.index_copy_(0, acc, trial.index_select(0, rows))
            new_f.index_copy_(0, acc, ft.index_select(0, rows))
            new_g.index_copy_(0, acc, gt.index_select(0, rows))
            new_gmax.index_copy_(0, acc, gmt.index_select(0, rows))
            pending.index_fill_(0, acc, False)
            p = pending.nonzero().flatten()
            if len(p) == 0:
                break
            step = torch.where(pending, step * 0.5, step)
        failed = pending
        sv, yv = new_th - th, new_g - g
        sy = torch.linalg.vecdot(sv, yv)
        good = ~failed & (sy > 1e-10 * sv.norm(dim=1) * yv.norm(dim=1))
        if on_gpu or not bool(good.all()):
            sv.mul_(good.unsqueeze(1))
            yv.mul_(good.unsqueeze(1))
        slot = (sv, yv, torch.where(good, 1.0 / sy.where(good, 1.0), 0.0))
        for hist, value in zip((s_hist, y_hist, rho, slot_rows), (*slot, None), strict=True):
            if len(hist) < history:
                hist.append(value)
            else:
                hist[pos] = value
        yy = yv.square() if dg is None else yv.square().mul_(dg)
        gamma = torch.where(good, sy / yy.sum(1).clamp_min(1e-300), gamma)
        pos, filled = (pos + 1) % history, filled + 1
        th, f, g, gmax = new_th, new_f, new_g, new_gmax
        its += (~failed).long()
        done = gmax <= tol
        # A failed line search means no decrease is representable any more: stop that subset.
        stop = done | failed
        if any_stop if any_stop is not None else bool(stop.any()):
            out = stop.nonzero().flatten()
            where = ids.index_select(0, out)
            theta_out.index_copy_(0, where, th.index_select(0, out))
            n_iter.index_copy_(0, where, its.index_select(0, out))
            converged.index_copy_(0, where, done.index_select(0, out))
            keep = (~stop).nonzero().flatten()
            ids, th, f, g, gmax, gamma, its = (
                t.index_select(0, keep) for t in (ids, th, f, g, gmax, gamma, its))
            dg = None if dg is None else dg.index_select(0, keep)
            slot_rows = [keep if r is None else r.index_select(0, keep) for r in slot_rows]
            k = len(ids)
    if k:  # max_iter reached
        theta_out.index_copy_(0, ids, th)
        n_iter.index_copy_(0, ids, its)
    return theta_out, converged, n_iter


# ---- choosing l2 by cross-validation ------------------------------------------------------------


def kfold(y: Tensor, k: int, *, stratify: bool = True) -> Tensor:
    """Fold ids [n] in 0..k-1: with stratify (classification labels), the rows of each class
    are dealt to the folds in turn (the classes one after another, so fold sizes differ by at
    most one and every class is spread as evenly as it can be); without, rows are dealt in
    order. Deterministic, no random draws; no fold is empty when n >= k >= 2."""
    n = int(y.shape[0])
    if not 2 <= k <= n:
        raise ValueError(f"k-fold cross-validation needs 2 <= folds <= n = {n} rows, got "
                         f"folds = {k}")
    order = torch.argsort(y, stable=True) if stratify else torch.arange(n, device=y.device)
    fold = torch.empty(n, dtype=torch.int64, device=y.device)
    fold[order] = torch.arange(n, device=y.device) % k
    return fold


@dataclass
class L2Search:
    """What select_l2 found, per subset s and grid value j.

    grid [S, L]: the l2 values tried (descending); score [S, L]: the mean over folds of the
    held-out risk (mean cross-entropy in nats, or MSE), NaN where not evaluated; l2 [S]: the
    chosen value (the lowest score; the larger l2 on ties); folds [n]: the fold of each row.
    """

    grid: Tensor
    score: Tensor
    l2: Tensor
    folds: Tensor

    @property
    def num_folds(self) -> int:
        return int(self.folds.max()) + 1


def default_l2_grid(task: str, n: int) -> list[float]:
    """The default grid of select_l2 for classification: n * 10^j for j = 0, -1, -2, -3
    (l2 in sum-of-losses units, so n * lam is a per-row penalty lam, from one that outweighs
    the loss down to 1e-3). Not lower: on the sweep-scaling benchmark's trained latents the
    fits below n * 1e-3 took the most iterations (about a quarter of a CV's time), and on the
    test rows they beat the best of this grid by at most 0.004 nats (20 of 63 subsets, all
    with test risks near 0). Regression has a per-subset default (see select_l2)."""
    if task != "classification":
        raise ValueError("default_l2_grid: the regression default is relative to each "
                         "subset's Gram (see select_l2)")
    return [n * 10.0 ** -j for j in range(4)]


RIDGE_GRID_RELATIVE = tuple(10.0 ** -j for j in range(-2, 7))  # x trace(centred Gram) / H


def _fold_rows(fold: Tensor, F: int) -> tuple[list[list[tuple[int, int]]],
                                              list[tuple[int, int]] | None]:
    """Training row ranges per fold and held-out range per fold, when every fold is one
    contiguous block of rows (fold ids non-decreasing); ([], None) otherwise."""
    n = int(fold.shape[0])
    if n > 1 and bool((fold[1:] < fold[:-1]).any()):
        return [], None
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64, device=fold.device),
                        torch.bincount(fold, minlength=F).cumsum(0)]).tolist()
    held = [(bounds[f], bounds[f + 1]) for f in range(F)]
    train = [[r for r in ((0, lo), (hi, n)) if r[1] > r[0]] for lo, hi in held]
    return train, held


def select_l2(
    z: Tensor | GroupedZ,
    y: Tensor,
    *,
    task: str,
    grid: Sequence[float] | None = None,
    folds: int | Tensor = 5,
    class_weight: str | Tensor | None = None,
    num_classes: int | None = None,
    tol: float | None = None,
    max_iter: int = 1000,
    history: int = 10,
) -> L2Search:
    """Choose each subset's l2 by k-fold cross-validation on the rows of Z, all subsets at once.

    For every fold, grid value and subset, the head is fitted (as fit does) on the other folds'
    rows and scored on the fold's rows by the unpenalised risk (mean cross-entropy in nats, or
    MSE over rows and outputs); a subset's score at a grid value is the mean over folds, and
    its l2 the grid value of lowest score: sklearn's LogisticRegressionCV(Cs=1/grid,
    scoring="neg_log_loss") / RidgeCV(alphas=grid, scoring="neg_mean_squared_error") with the
    same folds (their refit is fit(z, y, l2=result.l2)).

    Args:
        z: [S, n, H] tensor or a GroupedZ (fitted group by group; no padding columns).
        grid: l2 values (sum-of-losses units, as fit's l2). Default: classification
            default_l2_grid(n) (n * 1, 0.1, 0.01, 0.001); regression 10^2 .. 10^-6 times
            trace(centred Gram) / H of each subset (RIDGE_GRID_RELATIVE: scale-free).
        folds: the number of folds (kfold: stratified for classification) or fold ids [n].
            Folds that are contiguous blocks of rows (e.g. rows sorted by fold) are read in
            place; other folds cost one pass over all rows per fold and evaluation.
        class_weight, num_classes, tol, max_iter, history: as fit.

    Classification solves the grid from the largest l2 down, each value warm-started from the
    previous one's solution (the path LogisticRegressionCV follows), all folds and subsets of a
    width group in one batched L-BFGS: a step's op calls cover every subset of the group.
    """
    return _select(z, y, task=task, grid=grid, folds=folds, class_weight=class_weight,
                   num_classes=num_classes, tol=tol, max_iter=max_iter, history=history)[0]


def fit_cv(
    z: Tensor | GroupedZ,
    y: Tensor,
    *,
    task: str,
    grid: Sequence[float] | None = None,
    folds: int | Tensor = 5,
    class_weight: str | Tensor | None = None,
    num_classes: int | None = None,
    tol: float | None = None,
    max_iter: int = 1000,
    history: int = 10,
) -> tuple[Heads | GroupedHeads, L2Search]:
    """select_l2, then every subset refitted on all rows at its chosen l2 (the multinomial
    refit warm-started from the mean of its folds' solutions, as LogisticRegressionCV does):
    (heads, search). Arguments as select_l2."""
    search, inits = _select(z, y, task=task, grid=grid, folds=folds, class_weight=class_weight,
                            num_classes=num_classes, tol=tol, max_iter=max_iter,
                            history=history)
    if task == "regression":
        return fit(z, y, task=task, l2=search.l2), search
    groups = z.groups if isinstance(z, GroupedZ) else [
        (torch.arange(int(z.shape[0]), device="cpu"), z)]
    y = _check_y(y, _num_rows(z), task).to(_device_of(z))
    C, sw = _softmax_setup(y, class_weight, num_classes, max_iter, history)
    parts = []
    for (ids, zg), start in zip(groups, inits, strict=True):
        assert start is not None
        lam = search.l2[ids.to(search.l2.device)]
        theta, converged, n_iter = _solve_softmax(
            zg, y, sw, C, lam, tol=_default_tol(tol, zg.dtype), max_iter=max_iter,
            history=history, theta0=start[0], moments=start[1])
        parts.append((ids, _softmax_heads(theta, int(zg.shape[2]), C, lam, converged, n_iter)))
    if isinstance(z, GroupedZ):
        return GroupedHeads(task, parts), search
    return parts[0][1], search


def _select(z: Tensor | GroupedZ, y: Tensor, *, task: str, grid: Sequence[float] | None,
            folds: int | Tensor, class_weight: str | Tensor | None,
            num_classes: int | None, tol: float | None, max_iter: int, history: int
            ) -> tuple[L2Search, list[tuple[Tensor, tuple[Tensor, Tensor]] | None]]:
    """select_l2, plus per group what the refit starts from (classification: the mean over
    folds of the solutions at each subset's chosen l2, and Z's column moments; regression:
    None)."""
    if task not in _TASKS:
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
    groups = z.groups if isinstance(z, GroupedZ) else None
    if groups is None:
        _check_z_tensor(z, finite=False)
        S = int(z.shape[0])
        groups = [(torch.arange(S, device="cpu"), z)]
    n = _num_rows(z)
    dev = _device_of(z)
    y = _check_y(y, n, task).to(dev)
    if isinstance(folds, Tensor):
        fold = folds.to(dev, torch.int64)
        if fold.shape != (n,) or (n and int(fold.min()) < 0):
            raise ValueError(f"folds must be an int or fold ids [n] = [{n}] >= 0, got shape "
                             f"{tuple(folds.shape)}")
        F = int(fold.max()) + 1
        if F < 2 or int(torch.bincount(fold, minlength=F).min()) == 0:
            raise ValueError("folds must name at least 2 folds, each with at least one row")
    else:
        F = int(folds)
        fold = kfold(y, F, stratify=task == "classification")
    if grid is not None:
        g = torch.tensor([float(v) for v in grid], dtype=torch.float64, device=dev)
        if g.numel() == 0 or not (bool(torch.isfinite(g).all()) and bool((g >= 0).all())):
            raise ValueError(f"grid must hold l2 values that are finite and >= 0, got {grid}")
        g = g.sort(descending=True).values
    else:
        g = None
    S_all = sum(len(i) for i, _ in groups)
    parts = []
    for ids, zg in groups:
        if task == "regression":
            if class_weight is not None:
                raise ValueError("class_weight applies to task='classification' only")
            parts.append((ids, *_ridge_cv(zg, y, fold, F, g), None))
        else:
            gg = (torch.tensor(default_l2_grid(task, n), dtype=torch.float64, device=dev)
                  if g is None else g)
            parts.append((ids, *_softmax_cv(zg, y, fold, F, gg, class_weight=class_weight,
                                            num_classes=num_classes, tol=tol,
                                            max_iter=max_iter, history=history)))
    L = parts[0][1].shape[1]
    grid_out = torch.empty(S_all, L, dtype=torch.float64, device=dev)
    score = torch.empty(S_all, L, dtype=torch.float64, device=dev)
    for ids, gr, sc, _ in parts:
        grid_out[ids.to(dev)], score[ids.to(dev)] = gr, sc
    best = torch.where(torch.isnan(score), math.inf, score).argmin(1)
    search = L2Search(grid_out, score, grid_out.gather(1, best[:, None]).squeeze(1), fold)
    return search, [init for _, _, _, init in parts]


def _ridge_cv(z: Tensor, y: Tensor, fold: Tensor, F: int, grid: Tensor | None
              ) -> tuple[Tensor, Tensor]:
    """(grid [S, L], score [S, L]) of ridge on one width group: fold Grams are summed once and
    each fold's training Gram is the total minus its own; held-out MSE from predictions."""
    y2 = y.reshape(y.shape[0], -1)
    S, H = int(z.shape[0]), int(z.shape[2])
    T = int(y2.shape[1])
    _check_budget(f"the ridge cross-validation of S = {S} subsets at H = {H}, T = {T} "
                  f"({F} folds)", _ridge_bytes(S, H, T) * 2 + 8 * S * (H + 1) ** 2 * 2 * F)
    _, held = _fold_rows(fold, F)
    rows_of = [torch.arange(lo, hi, device=z.device) for lo, hi in held] if held is not None else \
        [(fold == f).nonzero().flatten() for f in range(F)]
    grams = []
    for f in range(F):
        if held is not None:
            grams.append(_grams(z, y2, rows=held[f]))
        else:
            grams.append(_grams(z.index_select(1, rows_of[f]), y2[rows_of[f]]))
    G = sum(gr[0] for gr in grams)
    R = sum(gr[1] for gr in grams)
    if grid is None:
        A_all, _, _, _ = _centred(G, R)
        base = A_all.diagonal(dim1=1, dim2=2).sum(1).clamp_min(0) / max(H, 1)
        gr = base[:, None] * torch.tensor(RIDGE_GRID_RELATIVE, dtype=torch.float64,
                                          device=z.device)[None, :]
    else:
        gr = grid[None, :].expand(S, -1).clone()
    score = torch.zeros(S, gr.shape[1], dtype=torch.float64, device=z.device)
    for f in range(F):
        A, rhs, mu, ybar = _centred(G - grams[f][0], R - grams[f][1])
        zf = (z[:, held[f][0]:held[f][1]] if held is not None
              else z.index_select(1, rows_of[f])).double()
        yf = y2[rows_of[f]].double()
        for j in range(gr.shape[1]):
            coef, _ = _ridge_solve(A, rhs, gr[:, j])
            intercept = ybar - (mu.unsqueeze(1) @ coef).squeeze(1)
            pred = torch.baddbmm(intercept.unsqueeze(1), zf, coef)
            score[:, j] += (pred - yf).square().mean((1, 2))
    return gr, score / F


def _softmax_cv(z: Tensor, y: Tensor, fold: Tensor, F: int, grid: Tensor, *,
                class_weight: str | Tensor | None, num_classes: int | None, tol: float | None,
                max_iter: int, history: int) -> tuple[Tensor, Tensor]:
    """(grid [S, L], score [S, L]) of the multinomial heads of one width group: the problems
    (fold, subset) of all folds in one batched L-BFGS per grid value, warm-started along the
    grid from the largest l2."""
    S, n, H = (int(d) for d in z.shape)
    C = int(y.max()) + 1 if num_classes is None else max(1, int(num_classes))
    k, P = F * S, (H + 1) * C
    _check_budget(f"the softmax cross-validation of S = {S} subsets at H = {H}, C = {C} ({F} "
                  f"folds, L-BFGS history {history})",
                  _softmax_bytes(k, H, C, history, n, z.dtype.itemsize,
                                 _softmax_group(k, P, z.device)) + 8 * k * P)
    C, sw = _softmax_setup(y, class_weight, num_classes, max_iter, history)
    tol = _default_tol(tol, z.dtype)
    train, held = _fold_rows(fold, F)
    if held is None:  # folds interleaved: every fold reads all rows, with weight 0 held out
        base = torch.ones(n, dtype=torch.float64, device=z.device) if sw is None else sw
        weights = [base * (fold != f) for f in range(F)]
        pieces: list[list[tuple[int, int]]] = [[(0, n)]] * F
    else:
        weights, pieces = None, train
    dev = z.device
    zid = torch.arange(S, device=dev).repeat(F)                      # problem i: subset i % S
    pfold = torch.arange(F, device=dev).repeat_interleave(S)         # ... of fold i // S
    dt = _compute_dtype(z.dtype)
    moments = _column_moments(z)
    theta = None
    L = int(grid.shape[0])
    score = torch.zeros(S, L, dtype=torch.float64, device=dev)
    best = torch.full((S,), math.inf, dtype=torch.float64, device=dev)
    init = torch.zeros(S, P, dtype=torch.float64, device=dev)
    for j in range(L):
        lam = torch.full((k,), float(grid[j]), dtype=torch.float64, device=dev)
        if weights is None:
            theta, _, _ = _solve_softmax(z, y, sw, C, lam, tol=tol, max_iter=max_iter,
                                         history=history, zid=zid, fold=pfold, pieces=pieces,
                                         theta0=theta, moments=moments)
        else:
            theta = _solve_weighted_folds(z, y, weights, C, lam, pfold, theta, tol=tol,
                                          max_iter=max_iter, history=history,
                                          moments=moments)
        W = theta[:, :H * C].reshape(k, H, C).to(dt)
        b = theta[:, H * C:].to(dt)
        for f in range(F):
            sel = slice(f * S, (f + 1) * S)
            if held is not None:
                lo, hi = held[f]
                loss, _, _ = _ops.softmax_regression_loss_grad(z[:, lo:hi], y[lo:hi], W[sel],
                                                               b[sel], None, 0.0)
                score[:, j] += loss.double() / (hi - lo)
            else:
                m = (fold == f).to(dt)
                loss, _, _ = _ops.softmax_regression_loss_grad(z, y, W[sel], b[sel], m, 0.0)
                score[:, j] += loss.double() / float(m.sum())
        # The refit's starting point (as LogisticRegressionCV's): the mean over folds of the
        # solutions at each subset's best l2 so far.
        better = (score[:, j] < best).nonzero().flatten()
        best[better] = score[better, j]
        init[better] = theta.view(F, S, P).mean(0)[better]
    return grid[None, :].expand(S, -1).clone(), score / F, (init, moments)


def _solve_weighted_folds(z: Tensor, y: Tensor, weights: list[Tensor], C: int, lam: Tensor,
                          pfold: Tensor, theta0: Tensor | None, *, tol: float,
                          max_iter: int, history: int,
                          moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Interleaved folds: each fold's problems (subsets 0..S-1 in order) solved with that
    fold's row weights."""
    theta = torch.empty(len(pfold), (int(z.shape[2]) + 1) * C, dtype=torch.float64,
                        device=z.device)
    for f, w in enumerate(weights):
        sel = (pfold == f).nonzero().flatten()
        th, _, _ = _solve_softmax(z, y, w, C, lam[sel], tol=tol, max_iter=max_iter,
                                  history=history, moments=moments,
                                  theta0=None if theta0 is None else theta0[sel])
        theta[sel] = th
    return theta
