"""The host emulator of the CUDA kernels (csrc/emulator): builds it with ninja (incrementally:
a second build compiles nothing) and drives it through ctypes.

The library is the kernels' own source (csrc/cuda/*.cuh) compiled as host C++ against the
emulator's shim; `run_forward` / `run_backward` take torch CPU tensors and fill the same
FusedProblem the CUDA op files fill from CUDA tensors; `run_gram` / `run_softmax` /
`run_lbfgs_direction` do the same for the head-refit kernels (GramProblem, SoftmaxProblem) and
the solvers' L-BFGS direction (LbfgsProblem).

    python tests/cuda_emulator.py            # build (scripts/setup_env.sh runs this)
    MMKERNELS_EMULATOR_SANITIZE=1 ...        # the AddressSanitizer + UBSan build instead
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["csrc/emulator/emulator.cpp", "csrc/emulator/driver.cpp"]
MAX_K = 16
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
FAULTS = {"none": 0, "skip_barrier": 1, "off_by_one_tile": 2}


def sanitized() -> bool:
    return os.environ.get("MMKERNELS_EMULATOR_SANITIZE", "") not in ("", "0")


def build_dir() -> Path:
    return ROOT / "build" / ("emulator-asan" if sanitized() else "emulator")


def _ninja_file(out: Path) -> str:
    cxx = os.environ.get("CXX", "g++")
    flags = "-std=c++17 -fPIC -Wall -Wextra -Werror"
    if sanitized():
        flags += " -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined"
        flags += " -fno-sanitize-recover=undefined"
        link = "-fsanitize=address,undefined"
    else:
        flags += " -O2"
        link = ""
    lines = [
        f"cxx = {cxx}",
        f"flags = {flags}",
        "rule cc",
        "  command = $cxx $flags -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = emulator: compile $in",
        "rule link",
        f"  command = $cxx -shared $in -o $out {link}",
        "  description = emulator: link $out",
    ]
    objs = []
    for src in SOURCES:
        obj = Path(src).stem + ".o"
        objs.append(obj)
        lines.append(f"build {obj}: cc {ROOT / src}")
    lines.append(f"build libmmk_emu.so: link {' '.join(objs)}")
    return "\n".join(lines) + "\n"


def build() -> Path:
    """Builds (or confirms up to date) the emulator library; returns its path."""
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    ninja_file = out / "build.ninja"
    text = _ninja_file(out)
    if not ninja_file.exists() or ninja_file.read_text() != text:
        ninja_file.write_text(text)
    ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
    proc = subprocess.run([ninja, "-C", str(out)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed:\n{proc.stdout}")
    return out / "libmmk_emu.so"


class FusedProblem(ctypes.Structure):
    """Mirror of mmkernels::cuda::FusedProblem (csrc/cuda/fused_params.h)."""

    _fields_ = [
        ("late", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("allow_tf32", ctypes.c_int32),
        ("relu", ctypes.c_int32),
        ("K", ctypes.c_int32),
        ("has_subsets", ctypes.c_int32),
        ("per_subset", ctypes.c_int32),
        ("has_bias", ctypes.c_int32),
        ("B", ctypes.c_int64),
        ("S", ctypes.c_int64),
        ("dims", ctypes.c_int64 * MAX_K),
        ("widths", ctypes.c_int64 * MAX_K),
        ("x", ctypes.c_void_p * MAX_K),
        ("ldx", ctypes.c_int64 * MAX_K),
        ("weight", ctypes.c_void_p * MAX_K),
        ("bias", ctypes.c_void_p * MAX_K),
        ("subset_mask", ctypes.c_void_p),
        ("sample_mask", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("grad_out", ctypes.c_void_p),
        ("grad_x", ctypes.c_void_p * MAX_K),
        ("grad_weight", ctypes.c_void_p * MAX_K),
        ("grad_bias", ctypes.c_void_p * MAX_K),
        ("workspace", ctypes.c_void_p),
        ("num_sms", ctypes.c_int32),
    ]


class GramProblem(ctypes.Structure):
    """Mirror of mmkernels::cuda::GramProblem (csrc/cuda/heads_params.h)."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("S", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("H", ctypes.c_int64),
        ("T", ctypes.c_int64),
        ("z", ctypes.c_void_p),
        ("z_ss", ctypes.c_int64),
        ("z_ld", ctypes.c_int64),
        ("y", ctypes.c_void_p),
        ("G", ctypes.c_void_p),
        ("R", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("num_sms", ctypes.c_int32),
    ]


class SoftmaxProblem(ctypes.Structure):
    """Mirror of mmkernels::cuda::SoftmaxProblem (csrc/cuda/heads_params.h)."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("acc", ctypes.c_int32),
        ("S", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("H", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("C", ctypes.c_int64),
        ("z", ctypes.c_void_p),
        ("z_ss", ctypes.c_int64),
        ("z_ld", ctypes.c_int64),
        ("y", ctypes.c_void_p),
        ("w", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("sw", ctypes.c_void_p),
        ("subset_index", ctypes.c_void_p),
        ("l2", ctypes.c_double),
        ("loss", ctypes.c_void_p),
        ("grad_w", ctypes.c_void_p),
        ("grad_b", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("num_sms", ctypes.c_int32),
    ]


class LbfgsProblem(ctypes.Structure):
    """Mirror of mmkernels::cuda::LbfgsProblem (csrc/cuda/heads_params.h)."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("k", ctypes.c_int64),
        ("P", ctypes.c_int64),
        ("m", ctypes.c_int64),
        ("grad", ctypes.c_void_p),
        ("s", ctypes.POINTER(ctypes.c_void_p)),
        ("y", ctypes.POINTER(ctypes.c_void_p)),
        ("rho", ctypes.POINTER(ctypes.c_void_p)),
        ("gamma", ctypes.c_void_p),
        ("diag", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("num_sms", ctypes.c_int32),
        ("rows", ctypes.c_void_p),
        ("rows_n", ctypes.POINTER(ctypes.c_int64)),
    ]


_LIB = None


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        path = build()
        handle = ctypes.CDLL(str(path))
        handle.mmk_emu_stat.restype = ctypes.c_longlong
        handle.mmk_emu_backward_workspace_elems.restype = ctypes.c_int64
        assert handle.mmk_emu_problem_bytes() == ctypes.sizeof(FusedProblem), (
            "tests/csrc/emulator.py's FusedProblem does not match csrc/cuda/fused_params.h"
        )
        assert handle.mmk_emu_problem_offset_workspace() == FusedProblem.workspace.offset
        assert handle.mmk_emu_gram_problem_bytes() == ctypes.sizeof(GramProblem)
        assert handle.mmk_emu_softmax_problem_bytes() == ctypes.sizeof(SoftmaxProblem)
        assert (handle.mmk_emu_softmax_problem_offset_workspace()
                == SoftmaxProblem.workspace.offset)
        assert handle.mmk_emu_lbfgs_problem_bytes() == ctypes.sizeof(LbfgsProblem)
        assert (handle.mmk_emu_lbfgs_problem_offset_workspace()
                == LbfgsProblem.workspace.offset)
        handle.mmk_emu_lbfgs_workspace_elems.restype = ctypes.c_int64
        handle.mmk_emu_gram_workspace_elems.restype = ctypes.c_int64
        handle.mmk_emu_softmax_workspace_elems.restype = ctypes.c_int64
        _LIB = handle
    return _LIB


class EmulatorError(RuntimeError):
    """The emulator caught a defect (race, deadlock, out-of-bounds, divergence...)."""


def check(code: int, err: ctypes.Array) -> None:
    if code != 0:
        raise EmulatorError(err.value.decode())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def problem(
    xs: list[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    subset_mask: torch.Tensor | None,
    sample_mask: torch.Tensor | None,
    *,
    late: bool,
    relu: bool,
    allow_tf32: bool = False,
    num_sms: int = 4,
) -> tuple[FusedProblem, list]:
    """A FusedProblem over CPU tensors, and the tensors it points into (keep them alive)."""
    keep: list = []
    f = FusedProblem()
    f.late, f.relu, f.allow_tf32 = int(late), int(relu), int(allow_tf32)
    f.dtype = DTYPE_CODES[xs[0].dtype]
    f.K = len(xs)
    f.B = xs[0].shape[0]
    f.has_subsets = int(subset_mask is not None)
    f.S = subset_mask.shape[0] if subset_mask is not None else 1
    f.per_subset = int(weights[0].dim() == 3)
    f.has_bias = int(len(biases) > 0)
    f.num_sms = num_sms
    for k, x in enumerate(xs):
        assert x.stride(1) == 1
        f.x[k], f.ldx[k], f.dims[k] = x.data_ptr(), x.stride(0), x.shape[1]
        f.widths[k] = weights[0].shape[-2] if not late else weights[k].shape[-2]
    for k, w in enumerate(weights):
        w = w.contiguous()
        keep.append(w)
        f.weight[k] = w.data_ptr()
    for k, b in enumerate(biases):
        b = b.contiguous()
        keep.append(b)
        f.bias[k] = b.data_ptr()
    for name, m in (("subset_mask", subset_mask), ("sample_mask", sample_mask)):
        if m is not None:
            m = m.contiguous()
            keep.append(m)
            setattr(f, name, m.data_ptr())
    keep.extend(xs)
    return f, keep


def run_forward(f: FusedProblem, out: torch.Tensor, fault: str = "none") -> None:
    f.out = out.data_ptr()
    err = ctypes.create_string_buffer(4096)
    check(lib().mmk_emu_forward(ctypes.byref(f), FAULTS[fault], err, len(err)), err)


def run_backward(f: FusedProblem, out: torch.Tensor, grad_out: torch.Tensor, grads: dict,
                 fault: str = "none") -> None:
    """grads: {"x": [K tensors or None], "weight": [...], "bias": [...]}, preallocated."""
    f.out, f.grad_out = out.data_ptr(), grad_out.data_ptr()
    for key, field in (("x", f.grad_x), ("weight", f.grad_weight), ("bias", f.grad_bias)):
        for k, t in enumerate(grads.get(key, [])):
            field[k] = _ptr(t)
    elems = lib().mmk_emu_backward_workspace_elems(ctypes.byref(f))
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    ws = torch.full((max(int(elems), 1),), float("nan"), dtype=acc)
    f.workspace = ws.data_ptr()
    err = ctypes.create_string_buffer(4096)
    check(lib().mmk_emu_backward(ctypes.byref(f), FAULTS[fault], err, len(err)), err)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype (csrc/include/mmkernels/accumulation.h)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_gram(z: torch.Tensor, y: torch.Tensor,
             num_sms: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """mmkernels::gram's CUDA kernels on CPU tensors z [S, n, H] (unit stride along H) and y
    [n] or [n, T]; G and R are poisoned (NaN) before the kernels run."""
    assert z.dim() == 3 and (z.shape[2] <= 1 or z.stride(2) == 1)
    acc = _acc(z.dtype)
    y2 = (y.unsqueeze(1) if y.dim() == 1 else y).to(acc).contiguous()
    S, n, H = z.shape
    T = y2.shape[1]
    G = torch.full((S, H + 1, H + 1), float("nan"), dtype=acc)
    R = torch.full((S, H + 1, T), float("nan"), dtype=acc)
    f = GramProblem(dtype=DTYPE_CODES[z.dtype], S=S, n=n, H=H, T=T, z=z.data_ptr(),
                    z_ss=z.stride(0), z_ld=z.stride(1), y=y2.data_ptr(), G=G.data_ptr(),
                    R=R.data_ptr(), num_sms=num_sms)
    ws = torch.full((max(int(lib().mmk_emu_gram_workspace_elems(ctypes.byref(f))), 1),),
                    float("nan"), dtype=acc)
    f.workspace = ws.data_ptr()
    err = ctypes.create_string_buffer(4096)
    check(lib().mmk_emu_gram(ctypes.byref(f), err, len(err)), err)
    return G, R


def run_softmax(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                sw: torch.Tensor | None, l2: float, subset_index: torch.Tensor | None = None,
                num_sms: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmkernels::softmax_regression_loss_grad's CUDA kernels on CPU tensors; outputs are
    poisoned (NaN) before the kernels run."""
    acc = w.dtype
    w, b = w.contiguous(), b.contiguous()
    sw = None if sw is None else sw.to(acc).contiguous()
    y = y.contiguous()
    index = None if subset_index is None else subset_index.contiguous()
    S, n, H = z.shape
    K, C = w.shape[0], w.shape[2]
    loss = torch.full((K,), float("nan"), dtype=acc)
    gw = torch.full((K, H, C), float("nan"), dtype=acc)
    gb = torch.full((K, C), float("nan"), dtype=acc)
    f = SoftmaxProblem(dtype=DTYPE_CODES[z.dtype], acc=DTYPE_CODES[acc], S=S, n=n, H=H, K=K, C=C,
                       z=z.data_ptr(), z_ss=z.stride(0), z_ld=z.stride(1), y=y.data_ptr(),
                       w=w.data_ptr(), b=b.data_ptr(), sw=_ptr(sw), subset_index=_ptr(index),
                       l2=l2, loss=loss.data_ptr(), grad_w=gw.data_ptr(), grad_b=gb.data_ptr(),
                       num_sms=num_sms)
    err = ctypes.create_string_buffer(4096)
    elems = int(lib().mmk_emu_softmax_workspace_elems(ctypes.byref(f), err, len(err)))
    check(int(elems < 0), err)
    ws = torch.full((max(elems, 1),), float("nan"), dtype=acc)
    f.workspace = ws.data_ptr()
    check(lib().mmk_emu_softmax(ctypes.byref(f), err, len(err)), err)
    return loss, gw, gb


def run_lbfgs_direction(grad: torch.Tensor, s: list[torch.Tensor], y: list[torch.Tensor],
                        rho: list[torch.Tensor], gamma: torch.Tensor,
                        diag: torch.Tensor | None = None, num_sms: int = 4,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    """mmkernels::lbfgs_direction's CUDA kernel on CPU tensors (made contiguous, as the op
    does); the output and the alpha workspace are poisoned (NaN) before the kernel runs.
    num_sms bounds the grid (32 blocks each), as the SM count does on a GPU; rows as the op's
    (pair j of problem i is row rows[j, i] of s[j], y[j], rho[j])."""
    grad, gamma = grad.contiguous(), gamma.contiguous()
    s, y, rho = ([t.contiguous() for t in ts] for ts in (s, y, rho))
    diag = None if diag is None else diag.contiguous()
    k, P = grad.shape
    m = len(s)
    out = torch.full((k, P), float("nan"), dtype=grad.dtype)
    arrays = [(ctypes.c_void_p * max(m, 1))(*[t.data_ptr() for t in ts]) for ts in (s, y, rho)]
    as_ptr = [ctypes.cast(a, ctypes.POINTER(ctypes.c_void_p)) for a in arrays]
    f = LbfgsProblem(dtype=DTYPE_CODES[grad.dtype], k=k, P=P, m=m, grad=grad.data_ptr(),
                     s=as_ptr[0], y=as_ptr[1], rho=as_ptr[2], gamma=gamma.data_ptr(),
                     diag=_ptr(diag), out=out.data_ptr(), num_sms=num_sms)
    rows_n = (ctypes.c_int64 * max(m, 1))(*[t.shape[0] for t in s])
    if rows is not None:
        rows = rows.contiguous()
        f.rows = rows.data_ptr()
        f.rows_n = ctypes.cast(rows_n, ctypes.POINTER(ctypes.c_int64))
    ws = torch.full((max(int(lib().mmk_emu_lbfgs_workspace_elems(ctypes.byref(f))), 1),),
                    float("nan"), dtype=grad.dtype)
    f.workspace = ws.data_ptr()
    err = ctypes.create_string_buffer(4096)
    check(lib().mmk_emu_lbfgs(ctypes.byref(f), err, len(err)), err)
    return out


def stats() -> dict:
    names = ["blocks", "threads", "barriers", "collectives", "switches"]
    return {n: int(lib().mmk_emu_stat(i)) for i, n in enumerate(names)}


if __name__ == "__main__":
    print(build())
