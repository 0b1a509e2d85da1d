"""Determinism on CPU: the same seed and thread count give bitwise-identical results, within a
process (fresh tensor copies at other addresses), and between separate processes.

Covered: both fused ops forward and backward (dense and gathered rows), the ridge and
softmax refits, and training a SubsetEnsemble. Ray against in-process is in
test_experiments_ray.py, sweep cells run again in test_experiments_resume.py.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmkernels
from mmkernels import heads
from mmkernels.nn import SubsetEnsemble
from mmkernels.subsets import all_subsets, subset_mask
from mmkernels.training import fit

REPO = Path(__file__).resolve().parents[2]


def fingerprint(threads: int) -> str:
    """sha256 over every output and gradient of the covered computations."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    dims, batch, hidden = [24, 16, 40], 1500, 32
    xs = [torch.randn(batch, d, generator=gen).clone() for d in dims]
    subsets = all_subsets(3)
    masks = {"dense": torch.rand(batch, 3, generator=gen) < 0.95,  # dense rows
             "gathered": torch.rand(batch, 3, generator=gen) < 0.4}  # present rows gathered
    h = hashlib.sha256()

    def add(t: torch.Tensor) -> None:
        h.update(t.detach().contiguous().numpy().tobytes())

    for sample_mask in masks.values():
        xr = [x.clone().requires_grad_() for x in xs]
        w = (torch.randn(len(subsets), hidden, sum(dims), generator=gen) / 9).requires_grad_()
        out = mmkernels.concat_project(xr, w, subset_mask=subset_mask(subsets, 3),
                                       sample_mask=sample_mask, activation="relu")
        out.square().sum().backward()
        for t in (out, w.grad, *[x.grad for x in xr]):
            add(t)
        ws = [(torch.randn(len(subsets), hidden, d, generator=gen) / 5).requires_grad_()
              for d in dims]
        out = mmkernels.project_concat(xr, ws, subset_mask=subset_mask(subsets, 3),
                                       sample_mask=sample_mask)
        out.square().sum().backward()
        for t in (out, *[w_.grad for w_ in ws]):
            add(t)
    z = torch.randn(7, 800, 16, generator=gen)
    y_reg = torch.randn(800, generator=gen)
    y_cls = torch.randint(0, 4, (800,), generator=gen)
    add(heads.fit(z, y_reg, task="regression").predict(z))
    add(heads.fit(z, y_cls, task="classification", num_classes=4).predict(z))
    model = SubsetEnsemble(dims, 16, 4, fusion="late", seed=3)
    fit(model, xs, torch.randint(0, 4, (batch,), generator=gen), epochs=2, batch_size=256,
        seed=3, progress=False)
    for p in model.parameters():
        add(p)
    return h.hexdigest()


def _in_child(threads: int) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                        str(Path(__file__).parent), *sys.path])}
    code = f"from test_determinism import fingerprint; print(fingerprint({threads}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("threads", [1, 2])
def test_same_seed_same_bits_in_process_and_across_processes(threads: int) -> None:
    here = fingerprint(threads)
    assert fingerprint(threads) == here  # again, on fresh tensors at other addresses
    assert _in_child(threads) == here  # another process
