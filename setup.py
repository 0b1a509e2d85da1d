"""Builds mmkernels._C from the sources listed in csrc/sources.txt.

CUDA is built when torch is a CUDA build and nvcc is found (never decided by whether a GPU is
present); MMKERNELS_WITH_CUDA=0/1 forces the choice and TORCH_CUDA_ARCH_LIST picks the archs.
Install with `pip install --no-build-isolation .` so the build uses the torch already installed.

Incremental development builds (scripts/setup_env.sh): `python setup.py build_ext --inplace`
keeps ninja's objects under build/, so a second build compiles only what changed (every header
is a dependency), and `MMKERNELS_BUILD_EXT=0 pip install -e .` then installs the package around
the in-place extension without compiling it again in a temporary folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent


def read_sources() -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {"common": [], "cuda": []}
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, path = line.split()
        kinds[kind].append(path)
    return kinds


def header_dependencies() -> list[str]:
    """Every header and the source list: a change to any of them must relink the extension
    (setuptools skips an extension whose sources are older than it; ninja's depfiles then
    recompile only the objects that include the changed header)."""
    headers = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".hpp")]
    return sorted(str(p.relative_to(ROOT)) for p in headers) + ["csrc/sources.txt"]


def want_cuda() -> bool:
    forced = os.environ.get("MMKERNELS_WITH_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise SystemExit(f"MMKERNELS_WITH_CUDA must be 0 or 1, got {forced!r}")
        return forced == "1"
    nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and nvcc


def extension() -> cpp_extension.CppExtension:
    sources = read_sources()
    with_cuda = want_cuda()
    macros = [("MMKERNELS_TORCH_VERSION", f'"{torch.__version__}"')]
    # -fopenmp at compile time only: at::parallel_for is an inline OpenMP region, serial
    # without it; the GOMP symbols then resolve to the OpenMP runtime torch itself loads.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    link: list[str] = []
    # MMKERNELS_SANITIZE=address: an AddressSanitizer build (scripts/sanitize_check.sh).
    sanitize = os.environ.get("MMKERNELS_SANITIZE")
    if sanitize:
        if with_cuda:
            raise SystemExit("MMKERNELS_SANITIZE is for CPU builds (set MMKERNELS_WITH_CUDA=0)")
        cxx = ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
               "-fvisibility=hidden", "-fopenmp"]
        link = [f"-fsanitize={sanitize}"]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "mmkernels._C",
            sources["common"],
            include_dirs=[str(ROOT / "csrc" / "include")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            depends=header_dependencies(),
        )
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    macros += [("MMKERNELS_WITH_CUDA", None), ("MMKERNELS_CUDA_ARCHS", f'"{archs}"')]
    return cpp_extension.CUDAExtension(
        "mmkernels._C",
        sources["common"] + sources["cuda"],
        include_dirs=[str(ROOT / "csrc" / "include")],
        define_macros=macros,
        # MMKERNELS_NVCC_FLAGS: extra nvcc flags, e.g. "-Xptxas -v" (scripts/cuda_build_check.sh
        # reads the register and spill report of the fused kernels from it).
        extra_compile_args={"cxx": cxx, "nvcc": [
            "-O3", "--expt-relaxed-constexpr", "-lineinfo",
            *os.environ.get("MMKERNELS_NVCC_FLAGS", "").split()]},
        depends=header_dependencies(),
    )


def extensions() -> list[cpp_extension.CppExtension]:
    """The native extension, or none with MMKERNELS_BUILD_EXT=0 (an editable install around an
    extension already built in place by `setup.py build_ext --inplace`)."""
    build = os.environ.get("MMKERNELS_BUILD_EXT", "1")
    if build not in ("0", "1"):
        raise SystemExit(f"MMKERNELS_BUILD_EXT must be 0 or 1, got {build!r}")
    return [extension()] if build == "1" else []


setup(
    packages=find_packages(include=["mmkernels", "mmkernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
