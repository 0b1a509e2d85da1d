"""Synthetic regression data with controlled modality overlap (docs/paper.md, Experiment 2).

Both recipes are linear-Gaussian and act coordinate by coordinate. For feature coordinate j
let z_j = (x1_j, u2_j, ..., uK_j) be K independent N(0, 1) latents; modality k's coordinate
j is ``B[j, k] @ z_j`` for a fixed [dim, K, K] array B (:attr:`OverlapGenerator.mixing`).
The target is the sum of all K * dim features plus optional N(0, noise^2) noise.

Recipes:
    "mix" (default, the one that reproduces Table 4): x1 ~ N(0, I_dim);
        x_k = w x1 + (1 - w) u_k for k = 2..K.
    "share": modality k copies modality 1 on a random set of round(w * dim) coordinates
        (drawn once per generator from its seed, a different set per modality) and draws
        the other coordinates fresh.

Because everything is jointly Gaussian and zero-mean, the best predictor of y from a subset
S of modalities is linear and its risk (the Bayes risk, what a refit head approaches with
enough data) is exactly computable: per coordinate,
    Var(y_j | x_S,j) = |c_j - P_j c_j|^2,   c_j = 1^T B_j,
with P_j the projection onto the row space of B_j restricted to S's rows; the risk is the
sum over j plus noise^2. :meth:`OverlapGenerator.bayes_risk` computes this with numpy (an
SVD per coordinate) from the very matrix used for sampling. For "mix" it has a closed form
(:func:`mix_bayes_risk`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from .dataset import MultiModalDataset, concat_splits

RECIPES = ("mix", "share")


@dataclass(frozen=True)
class OverlapGenerator:
    """A seeded generator for one (w, K, dim, recipe, noise) setting.

    Args:
        w: overlap in [0, 1]; 1 = every modality carries modality 1's information,
            0 = independent modalities.
        n_modalities: K.
        dim: features per modality.
        recipe: "mix" or "share" (see the module docstring).
        noise: standard deviation of additive Gaussian label noise (default 0, as in the
            paper's recipe).
        seed: seeds the structure ("share" coordinate sets) and the train/test draws, each
            from its own child stream, so the train set does not depend on n_test.

    Modalities are named "1", ..., "K" as in the paper; modality "1" is the base one.
    """

    w: float
    n_modalities: int = 4
    dim: int = 100
    recipe: str = "mix"
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Plain Python numbers, so info["generator"] stays JSON-serialisable (np.int64 isn't).
        for name, kind in (
            ("w", float),
            ("n_modalities", int),
            ("dim", int),
            ("noise", float),
            ("seed", int),
        ):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if not 0.0 <= self.w <= 1.0:
            raise ValueError(f"w: expected a value in [0, 1], got {self.w}")
        if self.n_modalities < 1:
            raise ValueError(f"n_modalities: expected >= 1, got {self.n_modalities}")
        if self.dim < 1:
            raise ValueError(f"dim: expected >= 1, got {self.dim}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe: expected one of {RECIPES}, got {self.recipe!r}")
        if not self.noise >= 0.0:
            raise ValueError(f"noise: expected a standard deviation >= 0, got {self.noise}")
        if self.seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {self.seed}")

    @classmethod
    def from_info(cls, info: dict) -> OverlapGenerator:
        """Rebuild the generator recorded in a generated dataset's ``info``."""
        gen = dict(info.get("generator") or {})
        if gen.pop("name", None) != "overlap":
            raise ValueError(f"info: no overlap generator recorded, got {info!r:.200}")
        return cls(**gen)

    @property
    def names(self) -> list[str]:
        return [str(k + 1) for k in range(self.n_modalities)]

    def _streams(self) -> list[np.random.Generator]:
        # Independent child streams: structure, train, test.
        return [np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(3)]

    @cached_property
    def mixing(self) -> np.ndarray:
        """[dim, K, K] float64: modality k's coordinate j is ``mixing[j, k] @ z_j``."""
        k, d, w = self.n_modalities, self.dim, self.w
        b = np.zeros((d, k, k))
        b[:, 0, 0] = 1.0  # modality 1 is the base latent itself
        if self.recipe == "mix":
            for m in range(1, k):
                b[:, m, 0] = w
                b[:, m, m] = 1.0 - w
        else:  # "share"
            n_shared = int(np.floor(w * d + 0.5))  # round half up, not to even
            rng = self._streams()[0]
            for m in range(1, k):
                shared = np.zeros(d, dtype=bool)
                shared[rng.choice(d, size=n_shared, replace=False)] = True
                b[shared, m, 0] = 1.0
                b[~shared, m, m] = 1.0
        b.flags.writeable = False
        return b

    def sample(self, n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
        """Draw n samples: K float32 arrays [n, dim] and float32 targets [n]."""
        z = rng.standard_normal((n, self.dim, self.n_modalities))
        x = np.einsum("jkl,njl->knj", self.mixing, z).astype(np.float32)
        # The target is the sum of the float32 features actually returned, so the
        # all-modality predictor is exact up to float rounding.
        y = x.sum(axis=(0, 2), dtype=np.float64)
        if self.noise > 0:
            y = y + self.noise * rng.standard_normal(n)
        return list(x), y.astype(np.float32)

    def dataset(self, n_train: int = 7000, n_test: int = 3000) -> MultiModalDataset:
        """Train and test draws in one dataset with ``split`` set ("train" rows first)."""
        _, rng_train, rng_test = self._streams()
        parts = []
        for split, n, rng in (("train", n_train, rng_train), ("test", n_test, rng_test)):
            xs, y = self.sample(n, rng)
            parts.append(
                (
                    split,
                    MultiModalDataset(dict(zip(self.names, xs, strict=True)), y, task="regression"),
                )
            )
        ds = concat_splits(parts)
        ds.info = {"generator": {"name": "overlap", **asdict(self)}}
        return ds

    def subset_mask(self, subset: Sequence[str] | Sequence[bool] | np.ndarray) -> np.ndarray:
        """A subset as a bool [K] mask, from a bool mask or from modality names ("1", "2").

        Integers are refused on purpose: 0-based indices and the paper's 1-based names
        would be too easy to confuse.
        """
        arr = np.asarray(subset)
        if arr.dtype == np.bool_:
            if arr.shape != (self.n_modalities,):
                raise ValueError(
                    f"subset: bool mask must have shape [{self.n_modalities}], "
                    f"got {list(arr.shape)}"
                )
            return arr.copy()
        if arr.size and arr.dtype.kind != "U":
            raise ValueError(
                f"subset: expected a bool mask [{self.n_modalities}] or modality names "
                f"{self.names}, got {subset!r}"
            )
        unknown = sorted(set(arr.tolist()) - set(self.names))
        if unknown:
            raise ValueError(f"subset: unknown modality names {unknown}; names are {self.names}")
        return np.isin(self.names, arr)

    def bayes_risk(self, subset: Sequence[str] | Sequence[bool] | np.ndarray) -> float:
        """Expected squared error of the best predictor of y from ``subset``'s features.

        Exact, from the covariance of the generator (see the module docstring); includes
        the label noise variance. The empty subset gives Var(y).
        """
        mask = self.subset_mask(subset)
        b = self.mixing
        c = b.sum(axis=1)  # [dim, K]: y_j = c_j @ z_j
        a = b[:, mask, :]  # [dim, k, K]: the observed rows
        if a.shape[1] == 0:
            resid = c
        else:
            # Project c_j onto the row space of a_j through an SVD of a_j itself rather than
            # its Gram matrix: near w = 1 the Gram matrix is ill-conditioned and
            # |c|^2 - |Pc|^2 would cancel catastrophically.
            _, s, vh = np.linalg.svd(a, full_matrices=False)
            tol = s.max(axis=1, keepdims=True) * max(a.shape[1:]) * np.finfo(float).eps
            coef = np.einsum("jrl,jl->jr", vh, c) * (s > tol)
            resid = c - np.einsum("jr,jrl->jl", coef, vh)
        per_coord = np.einsum("jl,jl->j", resid, resid)
        return float(per_coord.sum() + self.noise**2)


def make_overlap_regression(
    w: float,
    *,
    n_modalities: int = 4,
    dim: int = 100,
    n_train: int = 7000,
    n_test: int = 3000,
    seed: int = 0,
    recipe: str = "mix",
    noise: float = 0.0,
) -> MultiModalDataset:
    """The Experiment 2 dataset: K modalities of ``dim`` features, target = their sum.

    Defaults are the paper's (4 x 100 features, 7000 train / 3000 test, no noise).
    Returns one float32 regression dataset with split "train"/"test"; its
    ``info["generator"]`` holds the arguments, so ``OverlapGenerator.from_info(ds.info)``
    rebuilds the generator (for :meth:`OverlapGenerator.bayes_risk`), also after save/load.
    """
    gen = OverlapGenerator(w, n_modalities, dim, recipe, noise, seed)
    return gen.dataset(n_train, n_test)


def mix_bayes_risk(
    w: float, subset: Sequence[bool] | np.ndarray, *, dim: int = 100, noise: float = 0.0
) -> float:
    """Closed-form Bayes risk of the "mix" recipe for a bool subset mask over K modalities.

    Let k = |S| and K = len(subset). Per coordinate, with a = 1 + (K - 1) w:
      y = a x1 + (1 - w) sum_{m>=2} u_m.
    * Modality 1 in S: x1 is seen and each seen x_m reveals u_m (for w < 1), so only the
      K - k unseen u_m remain: risk = dim (K - k) (1 - w)^2. This is Table 4's formula.
    * Modality 1 not in S, k >= 1: substituting (1 - w) u_m = x_m - w x1 for seen m gives
      y = (1 + (K - 1 - k) w) x1 + sum_S x_m + rest, and x1 given k noisy copies
      (gain w, noise variance (1 - w)^2) has posterior variance
      (1 - w)^2 / ((1 - w)^2 + k w^2), so
      risk = dim [ (1 + (K-1-k) w)^2 (1-w)^2 / ((1-w)^2 + k w^2) + (K - 1 - k) (1 - w)^2 ].
    * Empty S: risk = Var(y) = dim [ a^2 + (K - 1) (1 - w)^2 ].
    Label noise adds noise^2 in every case.
    """
    mask = np.asarray(subset, dtype=bool)
    big_k, k = mask.size, int(mask.sum())
    v = (1.0 - w) ** 2
    if mask[0]:
        per = (big_k - k) * v
    elif k == 0:
        per = (1.0 + (big_k - 1) * w) ** 2 + (big_k - 1) * v
    else:
        per = (1.0 + (big_k - 1 - k) * w) ** 2 * v / (v + k * w * w) + (big_k - 1 - k) * v
    return float(dim * per + noise**2)
