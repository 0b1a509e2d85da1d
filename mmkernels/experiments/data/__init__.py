"""Data for mmkernels: the dataset container, the synthetic generator, loaders.

Everything here needs only numpy (scikit-learn for the bundled datasets, torch for
``MultiModalDataset.to_torch``, both imported on use), never the compiled extension.

    dataset      MultiModalDataset (validated container, .npz save/load)
    synthetic    make_overlap_regression, OverlapGenerator (Experiment 2, Bayes risks)
    iemocap      load_iemocap (Experiment 1's feature pickles)
    bundled      load_bundled (offline real multi-view data: digits, breast_cancer)
    safe_pickle  safe_load (restricted unpickler for third-party pickles)
"""

from .bundled import BUNDLED, load_bundled
from .dataset import MultiModalDataset, concat_splits
from .iemocap import load_iemocap
from .safe_pickle import RefusedGlobalError, safe_load
from .synthetic import OverlapGenerator, make_overlap_regression, mix_bayes_risk

__all__ = [
    "BUNDLED",
    "MultiModalDataset",
    "OverlapGenerator",
    "RefusedGlobalError",
    "concat_splits",
    "load_bundled",
    "load_iemocap",
    "make_overlap_regression",
    "mix_bayes_risk",
    "safe_load",
]
