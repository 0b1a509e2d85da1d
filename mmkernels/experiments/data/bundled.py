"""Small real multi-view datasets that ship with scikit-learn (no network needed).

They stand in for IEMOCAP when the user has no IEMOCAP file, so the Experiment 1 pipeline
(subsets, fractions, latent quality) runs end to end offline:

    "digits": 1,797 8x8 handwritten digits, 10 classes. Each image is cut into its four
        4x4 quadrants, one modality each: "TL", "TR", "BL", "BR" (16 features).
    "breast_cancer": 569 tumours, 2 classes (0 malignant, 1 benign). The 30 features are
        10 measurements summarised three ways, one modality each: "mean", "se"
        (standard error) and "worst" (10 features).

Split: seeded, stratified train/test (default 70/30). Features are standardised with the
*train* rows' mean and standard deviation only, so no test information leaks into
training; a feature constant on the train rows (digits' blank border pixels) is only
centred (its std is taken as 1).
"""

from __future__ import annotations

import numpy as np

from .dataset import MultiModalDataset

BUNDLED = ("digits", "breast_cancer")


def load_bundled(
    name: str = "digits", *, seed: int = 0, test_size: float = 0.3, standardize: bool = True
) -> MultiModalDataset:
    """A bundled multi-view classification dataset with split "train"/"test".

    Args:
        name: "digits" or "breast_cancer".
        seed: seeds the stratified split.
        test_size: fraction of samples in the test split.
        standardize: standardise each feature with train statistics (see module docstring).
    """
    # scikit-learn is imported here so that importing mmkernels.experiments.data stays cheap.
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    if name == "digits":
        raw = load_digits()
        img = raw.images  # [n, 8, 8]
        views = {
            "TL": img[:, :4, :4],
            "TR": img[:, :4, 4:],
            "BL": img[:, 4:, :4],
            "BR": img[:, 4:, 4:],
        }
        modalities = {k: v.reshape(len(img), 16) for k, v in views.items()}
        label_names = [str(c) for c in raw.target_names]
    elif name == "breast_cancer":
        raw = load_breast_cancer()
        x = raw.data
        # Columns come as 10 "mean ...", 10 "... error", 10 "worst ..."; check, don't assume.
        feature_names = [str(f) for f in raw.feature_names]
        groups = {
            "mean": [i for i, f in enumerate(feature_names) if f.startswith("mean ")],
            "se": [i for i, f in enumerate(feature_names) if f.endswith(" error")],
            "worst": [i for i, f in enumerate(feature_names) if f.startswith("worst ")],
        }
        if sorted(i for g in groups.values() for i in g) != list(range(x.shape[1])):
            raise RuntimeError("breast_cancer: unexpected feature names in scikit-learn's copy")
        modalities = {k: x[:, idx] for k, idx in groups.items()}
        label_names = [str(c) for c in raw.target_names]
    else:
        raise ValueError(f"name: expected one of {BUNDLED}, got {name!r}")

    y = raw.target.astype(np.int64)
    train_idx, _ = train_test_split(
        np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y
    )
    is_train = np.zeros(len(y), dtype=bool)
    is_train[train_idx] = True

    out = {}
    for k, v in modalities.items():
        v = v.astype(np.float64)
        if standardize:
            mean = v[is_train].mean(axis=0)
            std = v[is_train].std(axis=0)
            v = (v - mean) / np.where(std > 0, std, 1.0)
        out[k] = v.astype(np.float32)
    return MultiModalDataset(
        out,
        y,
        task="classification",
        split=np.where(is_train, "train", "test"),
        label_names=label_names,
        info={
            "source": f"sklearn.datasets.load_{name}",
            "seed": seed,
            "test_size": test_size,
            "standardize": standardize,
        },
    )
