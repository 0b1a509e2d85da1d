"""The extension's build information and the errors of a missing or mismatched build."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

import mmkernels
from mmkernels import _native


def test_build_info_reports_torch_and_cuda():
    info = mmkernels.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    if torch.version.cuda is None:  # a CPU torch can never have produced a CUDA build
        assert info["cuda"] is False and info["cuda_archs"] == ""
    assert set(info) >= {"torch_version", "cuda", "cuda_archs", "torch_runtime"}


def test_ops_are_registered_with_the_dispatcher():
    for name in [
        "concat_project",
        "concat_project_backward",
        "project_concat",
        "project_concat_backward",
    ]:
        assert hasattr(torch.ops.mmkernels, name)


def test_missing_extension_says_how_to_rebuild(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named '{name}'")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(
        ImportError,
        match=r"mmkernels._C .* was not found.*pip install "
        r"--no-build-isolation",
    ):
        _native.load()


def test_extension_for_another_torch_is_refused(monkeypatch):
    fake = SimpleNamespace(build_info=lambda: {"torch_version": "1.0.0"})
    monkeypatch.setattr(importlib, "import_module", lambda name: fake)
    with pytest.raises(ImportError, match=r"built against torch 1.0.0 but torch .* is imported"):
        _native.load()


def test_undefined_symbol_is_explained(monkeypatch):
    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match=r"probably built against another torch"):
        _native.load()
