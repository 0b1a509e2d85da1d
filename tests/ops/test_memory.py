"""The Python side of the memory budget: the same figure as the fused ops', and its error."""

from __future__ import annotations

import pytest
import torch

from mmkernels.memory import MemoryBudgetError, check_memory, format_bytes, memory_budget


def test_budget_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "1.5g")
    assert memory_budget() == (1.5 * 2**30, "MMKERNELS_MEMORY_BUDGET=1.5g")
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "off")
    assert memory_budget()[0] == float("inf")
    check_memory("anything", 1 << 60)  # no limit
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="MMKERNELS_MEMORY_BUDGET must be a byte count"):
        check_memory("anything", 1)


def test_default_is_most_of_the_available_memory(monkeypatch) -> None:
    monkeypatch.delenv("MMKERNELS_MEMORY_BUDGET", raising=False)
    budget, source = memory_budget()
    assert 0 < budget < float("inf") and "available" in source


def test_error_states_bytes_and_budget(monkeypatch) -> None:
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "1M")
    check_memory("small", 1 << 20)
    with pytest.raises(MemoryBudgetError, match=r"big needs 2.0 MiB \(2097152 bytes\), more than "
                                                r"the memory budget of 1.0 MiB \(1048576 bytes: "
                                                r"MMKERNELS_MEMORY_BUDGET=1M\)"):
        check_memory("big", 2 << 20)
    # One except clause catches every budget refusal; loaders still raise ValueErrors.
    assert issubclass(MemoryBudgetError, torch.OutOfMemoryError)
    assert issubclass(MemoryBudgetError, ValueError)
    assert format_bytes(512) == "512 B" and format_bytes(3 << 40) == "3.0 TiB"
