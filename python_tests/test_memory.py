"""The memory budget: where it comes from and what its error says."""

from __future__ import annotations

import pytest

from mmkernels.memory import (
    MemoryBudgetError,
    available_memory,
    check_memory,
    format_bytes,
    memory_budget,
)


@pytest.mark.parametrize("raw, expected", [("1000", 1000), ("16M", 16 << 20), ("1.5g", 3 << 29),
                                           ("2T", 2 << 40), ("4k", 4096)])
def test_budget_from_the_environment(monkeypatch, raw: str, expected: int) -> None:
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", raw)
    assert memory_budget() == expected


@pytest.mark.parametrize("raw", ["lots", "-5", "0", "12Q"])
def test_bad_budget_names_the_variable(monkeypatch, raw: str) -> None:
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", raw)
    with pytest.raises(ValueError, match="MMKERNELS_MEMORY_BUDGET="):
        memory_budget()


def test_default_is_half_the_available_memory(monkeypatch) -> None:
    monkeypatch.delenv("MMKERNELS_MEMORY_BUDGET", raising=False)
    avail = available_memory()
    assert avail is not None and avail > 0
    assert abs(memory_budget() - avail // 2) < avail // 10  # available memory drifts


def test_check_states_bytes_and_budget(monkeypatch) -> None:
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "1M")
    check_memory("small", 1 << 20)
    with pytest.raises(MemoryBudgetError, match=r"big needs 2.0 MiB \(2097152 bytes\) but the "
                                                r"memory budget is 1.0 MiB"):
        check_memory("big", 2 << 20)
    assert isinstance(MemoryBudgetError("x"), ValueError)
    assert format_bytes(512) == "512 B" and format_bytes(3 << 40) == "3.0 TiB"
