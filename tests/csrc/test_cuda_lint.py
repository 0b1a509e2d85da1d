"""No host synchronisation on the fused CUDA path (issue 15): the sources under csrc/cuda must
not copy device data to the host, read it there, copy from pageable host memory, or wait for
the device, so that every op call can be captured in a CUDA graph. The cuBLAS fallback
(cublas_fallback.cu, MMKERNELS_CUDA_BACKEND=cublas) reads the subset mask on the host and is
the one file allowed to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
ALLOWED = {"cublas_fallback.cu"}  # synchronises by design; documented in its header comment

# What a host sync (or a pageable host copy, which also blocks and cannot be captured) looks
# like in C++ against ATen and the CUDA runtime.
FORBIDDEN = {
    "copy to the host": r"\.cpu\s*\(|\bkCPU\b|\bDeviceType::CPU\b",
    "read of a device scalar": r"\.item\s*[<(]",
    "host list of a tensor": r"\.tolist\s*\(",
    "host accessor": r"\.accessor\s*<",
    "tensor built from host data": r"\bat::tensor\s*\(|\btorch::tensor\s*\(",
    "synchronous copy": r"\bcudaMemcpy\s*\(|\bcudaMemcpyToSymbol\s*\(|\bcudaMemset\s*\(",
    "device wait": r"[Ss]ynchronize\s*\(",
}


def strip_comments(text: str) -> str:
    """Line comments first (a path such as csrc/cuda/*.cu in one must not open a block)."""
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)


# Read on the raw text: the argument name is usually a comment, /*non_blocking=*/false.
BLOCKING_COPY = r"non_blocking\s*=\s*(\*/)?\s*false"


def violations(text: str) -> list[tuple[int, str, str]]:
    found = []
    raw = text.splitlines()
    for lineno, line in enumerate(strip_comments(text).splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            if re.search(pattern, line):
                found.append((lineno, what, line.strip()))
        if re.search(BLOCKING_COPY, raw[lineno - 1]):
            found.append((lineno, "blocking copy", raw[lineno - 1].strip()))
    return found


def cuda_sources() -> list[Path]:
    """Every source under csrc/cuda but the allowed fallback."""
    suffixes = (".cu", ".cuh", ".cpp", ".h")
    return sorted(p for p in CUDA_DIR.iterdir() if p.suffix in suffixes and p.name not in ALLOWED)


@pytest.mark.parametrize("path", cuda_sources(), ids=lambda p: p.name)
def test_no_host_sync_under_csrc_cuda(path: Path) -> None:
    found = violations(path.read_text())
    assert not found, f"{path.name}: " + "; ".join(f"line {n}: {w}: {s}" for n, w, s in found)


def test_the_allowlist_is_not_stale() -> None:
    """The one allowed file still exists and really does what the lint forbids elsewhere."""
    for name in ALLOWED:
        assert violations((CUDA_DIR / name).read_text()), name


@pytest.mark.parametrize(
    "snippet",
    [
        "bool any = mask.any().item<bool>();",
        "auto m = subset_mask->to(at::kCPU);",
        "auto t = at::tensor(v, at::kInt).to(device);",
        "cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost);",
        "c10::cuda::device_synchronize();",
        "x.to(device, /*non_blocking=*/false);",
    ],
)
def test_the_lint_finds_a_sync(snippet: str) -> None:
    assert violations(snippet)


def test_comments_do_not_count() -> None:
    assert not violations("// never call .cpu() here\n/* nor .item() */ int x = 0;")
