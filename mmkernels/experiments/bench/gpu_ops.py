"""GPU benchmarks of the fused ops (targets a, b, c and e of issue 16; d, the softmax refit, is
in gpu_refit.py), with rooflines measured in the same run: copy bandwidth (bytes moved by a
device-to-device copy) and GEMM rate (a large matmul in the case's dtype)."""

from __future__ import annotations

import torch

from mmkernels import ops, reference
from mmkernels.experiments.bench.fused_ops import Case, _fwd, _fwd_bwd, grouped_concat
from mmkernels.experiments.bench.timing import median_ms
from mmkernels.subsets import all_subsets, subset_mask


def copy_bandwidth_gbs(device: str = "cuda") -> float:
    """Achieved bandwidth of a 1 GiB device copy (read + write), GB/s."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats=20)
    return 2 * src.numel() * 4 / (ms / 1e3) / 1e9


def gemm_tflops(dtype: torch.dtype, device: str = "cuda") -> float:
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ a, repeats=10)
    return 2 * 8192**3 / (ms / 1e3) / 1e12


def _rand(*shape, dtype, gen, device="cuda", grad=False):
    t = torch.randn(*shape, generator=gen, device=device, dtype=dtype)
    return t.requires_grad_(grad)


def gpu_cases(dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> tuple[list[Case], dict]:
    """Cases a, b and c of issue 16 (and per-subset weights, an extra case); returns them with
    the measured rooflines."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    roof = {
        "copy_gbs": copy_bandwidth_gbs(),
        "gemm_tflops": gemm_tflops(dtype),
        "gemm_tflops_fp32_ieee": None,
        "gemm_tflops_tf32": None,
    }
    size = torch.tensor([], dtype=dtype).element_size()
    dims, hidden, batch = [100, 100, 500], 256, int(100_000 * scale)
    xs = [_rand(batch, d, dtype=dtype, gen=gen) for d in dims]
    w = _rand(hidden, sum(dims), dtype=dtype, gen=gen) / sum(dims) ** 0.5
    b = _rand(hidden, dtype=dtype, gen=gen)
    present = torch.rand(batch, 3, generator=gen, device="cuda") < 0.7
    compiled = torch.compile(reference.concat_project)
    cat = torch.cat([torch.where(present[:, k : k + 1], x, 0) for k, x in enumerate(xs)], 1)
    floor_bytes = (batch * sum(dims) + hidden * sum(dims) + batch * hidden) * size + batch * 3
    cases = [
        Case(
            "a_concat_project_fwd",
            f"dims {dims}, B {batch}, H {hidden}, 70% present, {dtype}",
            {
                "mmkernels": _fwd(lambda: ops.concat_project(xs, w, b, sample_mask=present)),
                "eager": _fwd(lambda: reference.concat_project(xs, w, b, sample_mask=present)),
                "torch.compile": _fwd(lambda: compiled(xs, w, b, sample_mask=present)),
                "addmm_activation(cat)": _fwd(lambda: torch._addmm_activation(b, cat, w.t())),
            },
            {"eager": 3.0, "torch.compile": 1.5, "addmm_activation(cat)": 1.0},
            2 * batch * sum(dims) * hidden / 1e9,
            notes=[
                f"HBM floor {floor_bytes / roof['copy_gbs'] / 1e6:.3f} ms "
                f"({floor_bytes / 1e6:.1f} MB at the measured copy bandwidth)"
            ],
        )
    ]
    floor_a = floor_bytes / roof["copy_gbs"] / 1e6

    dims4 = [100] * 4
    xs4 = [_rand(batch, d, dtype=dtype, gen=gen) for d in dims4]
    w4 = _rand(hidden, 400, dtype=dtype, gen=gen) / 20
    s4 = subset_mask(all_subsets(4), 4, device="cuda")
    store_bytes = 15 * batch * hidden * size
    cases.append(
        Case(
            "b_shared_weight_15_subsets",
            f"dims {dims4}, S 15, B {batch}, H {hidden}, {dtype}",
            {
                "mmkernels": _fwd(lambda: ops.concat_project(xs4, w4, subset_mask=s4)),
                "eager": _fwd(lambda: reference.concat_project(xs4, w4, subset_mask=s4)),
            },
            {},
            2 * batch * 400 * hidden / 1e9,
            notes=[f"store-bound floor {store_bytes / roof['copy_gbs'] / 1e6:.3f} ms"],
        )
    )

    s3 = subset_mask(all_subsets(3), 3, device="cuda")
    ws = _rand(7, hidden, sum(dims), dtype=dtype, gen=gen) / sum(dims) ** 0.5
    used = sum(dims[k] for row in s3.tolist() for k, u in enumerate(row) if u)
    cases.append(
        Case(
            "x_per_subset_7",
            f"dims {dims}, S 7, B {batch}, H {hidden}, {dtype}",
            {
                "mmkernels": _fwd(lambda: ops.concat_project(xs, ws, subset_mask=s3)),
                "eager": _fwd(lambda: reference.concat_project(xs, ws, subset_mask=s3)),
                "composition": _fwd(
                    lambda: grouped_concat(
                        xs, ws, torch.zeros(7, hidden, dtype=dtype, device="cuda"), s3
                    )
                ),
            },
            {"eager": 2.0},
            2 * batch * used * hidden / 1e9,
        )
    )

    xg = [x.detach().requires_grad_(True) for x in xs]
    wg, bg = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
    cases.append(
        Case(
            "c_concat_project_fwd_bwd",
            f"dims {dims}, B {batch}, H {hidden}, 70% present, {dtype}",
            {
                "mmkernels": _fwd_bwd(
                    lambda: ops.concat_project(xg, wg, bg, sample_mask=present), [*xg, wg, bg]
                ),
                "eager": _fwd_bwd(
                    lambda: reference.concat_project(xg, wg, bg, sample_mask=present), [*xg, wg, bg]
                ),
            },
            {"eager": 2.0},
            3 * 2 * batch * sum(dims) * hidden / 1e9,
        )
    )
    roof["floor_a_ms"] = floor_a
    return cases, roof


def fp32_rooflines(scale: float = 1.0) -> list[dict]:
    """Case e: concat_project forward in float32, IEEE and TF32, against the GEMM rate of each."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    dims, hidden, batch = [100, 100, 500], 256, int(100_000 * scale)
    xs = [_rand(batch, d, dtype=torch.float32, gen=gen) for d in dims]
    w = _rand(hidden, sum(dims), dtype=torch.float32, gen=gen)
    present = torch.rand(batch, 3, generator=gen, device="cuda") < 0.7
    rows = []
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for mode, tf32 in (("ieee", False), ("tf32", True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            rate = gemm_tflops(torch.float32)
            ms = median_ms(lambda: ops.concat_project(xs, w, sample_mask=present), repeats=20)
            tflops = 2 * batch * sum(dims) * hidden / (ms / 1e3) / 1e12
            rows.append(
                {
                    "mode": mode,
                    "median_ms": ms,
                    "tflops": tflops,
                    "gemm_tflops": rate,
                    "fraction_of_gemm_rate": tflops / rate,
                }
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return rows
