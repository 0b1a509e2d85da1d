"""The CUDA emulator itself (csrc/emulator): its mma.sync and ldmatrix against the fragment
layouts of the PTX ISA, and defects it must catch in the fused kernels (a missing barrier, an
off-by-one tile index). The kernels' own property tests are in tests/ops/test_cuda_emulated.py."""

from __future__ import annotations

import ctypes

import cuda_emulator as emu
import numpy as np
import pytest
import torch
from cuda_cases import run_case, sample_case

# ---- fragment layouts, written from the PTX ISA's tables (g = lane // 4, t = lane % 4) -------


def mma_positions(kind: str, wrong: bool = False):
    """Row-major element indices of every lane's A, B (k-major: index k * 8 + n) and C/D
    fragment elements, lane-major, in register order."""
    K = 8 if kind == "tf32" else 16
    a, b, c = [], [], []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        if wrong:  # a plausible mistake: the group and thread roles swapped in A
            g, t = lane % 8, lane // 8
        if kind == "tf32":
            a += [(g + 8 * (j % 2)) * K + t + 4 * (j // 2) for j in range(4)]
            b += [(t + 4 * j) * 8 + lane // 4 for j in range(2)]
        else:
            a += [(g + 8 * (j % 2)) * K + 2 * t + 8 * (j // 2) + h
                  for j in range(4) for h in range(2)]
            gl, tl = lane // 4, lane % 4
            b += [(2 * tl + 8 * j + h) * 8 + gl for j in range(2) for h in range(2)]
        gl, tl = lane // 4, lane % 4
        c += [(gl + 8 * (j // 2)) * 8 + 2 * tl + j % 2 for j in range(4)]
    return [np.asarray(v, dtype=np.int32) for v in (a, b, c)]


def run_mma(kind: str, A: np.ndarray, B: np.ndarray, C: np.ndarray, wrong: bool = False):
    a_pos, b_pos, c_pos = mma_positions(kind, wrong)
    D = C.astype(np.float32).copy()
    err = ctypes.create_string_buffer(1024)
    code = emu.lib().mmk_emu_mma(
        {"bf16": 0, "f16": 1, "tf32": 2}[kind],
        *(np.ascontiguousarray(m, dtype=np.float32).ctypes.data_as(ctypes.c_void_p)
          for m in (A, B)),
        *(p.ctypes.data_as(ctypes.c_void_p) for p in (a_pos, b_pos, c_pos)),
        D.ctypes.data_as(ctypes.c_void_p),
        err,
        len(err),
    )
    emu.check(code, err)
    return D


def rounded(x: np.ndarray, kind: str) -> np.ndarray:
    t = torch.from_numpy(x.astype(np.float32))
    if kind == "bf16":
        return t.bfloat16().double().numpy()
    if kind == "f16":
        return t.half().double().numpy()
    bits = t.view(torch.int32)  # cvt.rna.tf32.f32: nearest, ties away from zero
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double().numpy()


@pytest.mark.parametrize("kind", ["bf16", "f16", "tf32"])
def test_mma_matches_the_matrix_product(kind: str) -> None:
    rng = np.random.default_rng(0)
    K = 8 if kind == "tf32" else 16
    for _ in range(5):
        A, B = rng.standard_normal((16, K)), rng.standard_normal((K, 8))
        C = rng.standard_normal((16, 8))
        D = run_mma(kind, A, B, C)
        expected = rounded(A, kind) @ rounded(B, kind) + C.astype(np.float32)
        np.testing.assert_allclose(D, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["bf16", "tf32"])
def test_a_wrong_fragment_layout_fails(kind: str) -> None:
    """The check is sensitive: operands packed with the wrong lane roles give another product."""
    rng = np.random.default_rng(1)
    K = 8 if kind == "tf32" else 16
    A, B, C = rng.standard_normal((16, K)), rng.standard_normal((K, 8)), np.zeros((16, 8))
    D = run_mma(kind, A, B, C, wrong=True)
    expected = rounded(A, kind) @ rounded(B, kind)
    assert np.abs(D - expected).max() > 0.1


def run_ldmatrix(trans: bool, pad: int, M: np.ndarray) -> np.ndarray:
    out = np.zeros((32, 4), dtype=np.uint32)
    src = np.ascontiguousarray(M, dtype=np.uint16)
    err = ctypes.create_string_buffer(1024)
    code = emu.lib().mmk_emu_ldmatrix(int(trans), pad, src.ctypes.data_as(ctypes.c_void_p),
                                      out.ctypes.data_as(ctypes.c_void_p), err, len(err))
    emu.check(code, err)
    return out


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_follows_the_ptx_layout(trans: bool) -> None:
    """Four 8x8 b16 matrices (rows 8i..8i+7); lane l gets, of matrix i, row l // 4 and columns
    2 (l % 4) + {0, 1}, or with .trans the rows 2 (l % 4) + {0, 1} of column l // 4."""
    rng = np.random.default_rng(2)
    M = rng.integers(0, 2**16, size=(32, 8), dtype=np.uint16)
    got = run_ldmatrix(trans, 8, M)
    for lane in range(32):
        for i in range(4):
            if trans:
                row = 8 * i + 2 * (lane % 4)
                lo, hi = M[row, lane // 4], M[row + 1, lane // 4]
            else:
                row = 8 * i + lane // 4
                lo, hi = M[row, 2 * (lane % 4)], M[row, 2 * (lane % 4) + 1]
            assert got[lane, i] == int(lo) | (int(hi) << 16), (lane, i)


def test_ldmatrix_rejects_unaligned_rows() -> None:
    M = np.zeros((32, 8), dtype=np.uint16)
    with pytest.raises(emu.EmulatorError, match="16-byte aligned"):
        run_ldmatrix(False, 4, M)  # rows of 24 bytes


# ---- defects the emulator must catch in the fused kernels ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("late", [False, True])
def test_the_correct_kernels_pass(dtype: torch.dtype, late: bool) -> None:
    run_case(sample_case(late, dtype), check=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("stage", ["forward", "backward"])
def test_a_missing_barrier_is_reported_as_a_race(dtype: torch.dtype, stage: str) -> None:
    with pytest.raises(emu.EmulatorError, match="race|cp.async|no thread has written"):
        run_case(sample_case(False, dtype), fault="skip_barrier", stage=stage)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("stage", ["forward", "backward"])
def test_an_off_by_one_tile_index_is_caught(dtype: torch.dtype, stage: str) -> None:
    """Tiles shifted by one row (or column of grad_W) leave an element unwritten or wrong."""
    with pytest.raises((AssertionError, emu.EmulatorError)):
        run_case(sample_case(True, dtype), fault="off_by_one_tile", stage=stage, check=True)


def test_the_emulator_ran_warps_and_barriers() -> None:
    before = emu.stats()
    run_case(sample_case(False, torch.bfloat16))
    after = emu.stats()
    assert after["barriers"] > before["barriers"]
    assert after["collectives"] > before["collectives"]
