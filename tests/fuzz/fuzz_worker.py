"""The child side of the op-boundary fuzzer (tests/fuzz/fuzz_boundary.py).

Reads one case per line (JSON) on stdin, runs it, answers one JSON line on stdout:
    {"status": "ok"}                                  the call matched its oracle
    {"status": "raised", "type": ..., "msg": ...}     the call raised a Python exception
    {"status": "mismatch", "msg": ...}                the call returned a wrong result
A case is read whole before it runs, so when this process dies (a signal, an abort) or hangs,
the parent knows the case that did it. The parent decides whether the outcome was the expected
one (a valid case must be "ok"; an invalid one must raise, naming the argument).

A case: {"op": NAME, "seed": INT, "args": {...}, "grad": BOOL}. Argument values are plain JSON,
None, or specs built here: {"T": shape, "dtype", "dev", "lay", "fill", "p", "hi"} is a tensor,
{"L": [...]} a list, {"tuple": [...]} a tuple, {"str": ...} / {"num": ...} plain values.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' shared helpers (oracle.py)

import torch  # noqa: E402
from oracle import assert_matches_oracle  # noqa: E402

import mmkernels  # noqa: E402
from mmkernels import reference  # noqa: E402

DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
    "float16": torch.float16, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
    "bool": torch.bool, "complex64": torch.complex64,
}
FLOATS = (torch.float32, torch.float64, torch.bfloat16)


class Mismatch(Exception):
    """A result that differs from the oracle (as opposed to an exception of the op itself)."""


# ---- building the arguments -------------------------------------------------------------------


def _values(shape: list[int], spec: dict, gen: torch.Generator) -> torch.Tensor:
    dtype = DTYPES[spec.get("dtype", "float32")]
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < spec.get("p", 0.6)
    if not (dtype.is_floating_point or dtype.is_complex):
        t = torch.randint(0, max(1, spec.get("hi", 3)), shape, generator=gen)
        if spec.get("fill") == "cycle":  # 0, 1, ..., hi - 1, 0, 1, ...: every label present
            t = torch.arange(t.numel()).remainder(max(1, spec.get("hi", 3))).view(shape)
        return (t + spec.get("shift", 0)).to(dtype)
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    fill = spec.get("fill", "randn")
    if fill == "zero":
        t.zero_()
    elif fill == "big":
        t *= 1e30
    return t.to(dtype)


def _inject(t: torch.Tensor, fill: str, gen: torch.Generator) -> None:
    """Non-finite values at random visible entries (after the layout, so they are seen)."""
    if fill not in ("nan", "inf", "-inf") or t.numel() == 0 or not t.dtype.is_floating_point:
        return
    bad = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[fill]
    count = min(16, max(1, t.numel() // 7))
    for i in torch.randint(0, t.numel(), (count,), generator=gen).tolist():
        index = []
        for size in reversed(t.shape):
            index.append(i % size)
            i //= size
        t[tuple(reversed(index))] = bad


def make_tensor(spec: dict, gen: torch.Generator) -> torch.Tensor:
    shape = list(spec["T"])
    lay = spec.get("lay", "contig")
    if lay == "t" and len(shape) >= 2:
        base = _values(shape[:-2] + [shape[-1], shape[-2]], spec, gen)
        t = base.transpose(-1, -2)
    elif lay == "step" and len(shape) >= 1:
        base = _values(shape[:-1] + [2 * shape[-1]], spec, gen)
        t = base[..., ::2]
    elif lay == "expand" and len(shape) >= 1:
        # Broadcast rows; dims of a huge size are broadcast too (they exist only as views).
        base = [1] + [1 if s > 2**20 else s for s in shape[1:]]
        t = _values(base, spec, gen).expand(shape)
    elif lay == "offset":
        n = 1
        for s in shape:
            n *= s
        t = _values([n + 5], spec, gen)[5:].view(shape)
    else:
        t = _values(shape, spec, gen)
    _inject(t, spec.get("fill", "randn"), gen)
    dev = spec.get("dev", "cpu")
    if dev != "cpu":
        t = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=dev)
    return t


def build(value, gen: torch.Generator):
    if isinstance(value, dict):
        if "T" in value:
            return make_tensor(value, gen)
        if "L" in value:
            return [build(v, gen) for v in value["L"]]
        if "tuple" in value:
            return tuple(build(v, gen) for v in value["tuple"])
        if "stack" in value:
            return torch.stack([build(v, gen) for v in value["stack"]])
        if "str" in value:
            return value["str"]
        if "num" in value:
            return float(value["num"]) if isinstance(value["num"], str) else value["num"]
        return {k: build(v, gen) for k, v in value.items()}
    if isinstance(value, list):
        return [build(v, gen) for v in value]
    return value


# ---- comparing ---------------------------------------------------------------------------------


def compare(ours, same, oracle, what: str, reduction: int) -> None:
    """ours vs the float64 oracle, as tests' oracle.py; non-finite entries must agree exactly."""
    if not isinstance(ours, torch.Tensor):
        raise Mismatch(f"{what}: expected a tensor, got {type(ours).__name__}")
    if ours.device.type == "meta" or oracle.device.type == "meta":
        if ours.shape != oracle.shape or ours.dtype != same.dtype or ours.device != oracle.device:
            raise Mismatch(f"{what}: {tuple(ours.shape)} {ours.dtype} {ours.device} != "
                           f"{tuple(oracle.shape)} {same.dtype} {oracle.device}")
        return
    if ours.shape != oracle.shape:
        raise Mismatch(f"{what}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}")
    o64, r64, s64 = ours.detach().double(), oracle.detach().double(), same.detach().double()
    bad = ~torch.isfinite(r64)
    if bad.any() or not torch.isfinite(o64).all():
        tests = (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf))
        for name, test in tests:
            if not torch.equal(test(o64), test(r64)):
                n = int((test(o64) != test(r64)).sum())
                raise Mismatch(f"{what}: {name} pattern differs from the oracle at {n} entries")
        o64, r64 = o64.masked_fill(bad, 0), r64.masked_fill(bad, 0)
        s64 = torch.where(torch.isfinite(s64), s64, r64)
    try:
        assert_matches_oracle(o64.to(ours.dtype) if ours.dtype != torch.float64 else o64,
                              s64.to(same.dtype), r64, what, reduction)
    except AssertionError as e:
        raise Mismatch(str(e)) from None


def _float_leaves(args) -> list[torch.Tensor]:
    out = []
    for v in args:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_float_leaves(v))
    return [t for t in out if t.dtype in FLOATS and t.device.type == "cpu"]


def _convert(v, fn):
    if isinstance(v, torch.Tensor):
        return fn(v) if v.dtype in FLOATS else v
    if isinstance(v, list):
        return [_convert(x, fn) for x in v]
    if isinstance(v, tuple):
        return tuple(_convert(x, fn) for x in v)
    return v


def _leaf(fn):
    return lambda t: fn(t.detach()).requires_grad_(True)


# ---- the ops ---------------------------------------------------------------------------------

FUSED = {"concat_project": (mmkernels.concat_project, reference.concat_project),
         "project_concat": (mmkernels.project_concat, reference.project_concat)}


def _fused_call(op: str, a: dict, fn):
    names = ("weight", "bias") if op == "concat_project" else ("weights", "biases")
    kw = {k: a[k] for k in ("subset_mask", "sample_mask", "activation") if k in a}
    pos = [a["xs"], a[names[0]]] + ([a[names[1]]] if names[1] in a else [])
    return fn(*pos, **kw)


def _differentiable(a: dict, op: str) -> list:
    names = ("xs", "weight", "bias") if op == "concat_project" else ("xs", "weights", "biases")
    return [a[n] for n in names if n in a and a[n] is not None]


def _reduction(a: dict) -> int:
    xs = a["xs"] if isinstance(a.get("xs"), list) else []
    D = sum(int(x.shape[-1]) for x in xs if x.dim() == 2)
    B = int(xs[0].shape[0]) if xs and xs[0].dim() else 1
    S = int(a["subset_mask"].shape[0]) if isinstance(a.get("subset_mask"), torch.Tensor) else 1
    return max(1, D, S * B)


def run_fused(case: dict, a: dict, gen: torch.Generator) -> None:
    op = case["op"]
    ours_fn, ref_fn = FUSED[op]
    grad = case.get("grad", False)
    grad_leaves = []
    if grad:
        for group in _differentiable(a, op):
            for t in group if isinstance(group, list) else [group]:
                if isinstance(t, torch.Tensor) and t.dtype in FLOATS and t.device.type == "cpu":
                    t.requires_grad_(True)
                    grad_leaves.append(t)
    out = _fused_call(op, a, ours_fn)
    # The oracle: the reference in float64 and in the same dtype, on copies of the inputs.
    a64 = {k: _convert(v, _leaf(lambda t: t.double())) for k, v in a.items()}
    asame = {k: _convert(v, _leaf(lambda t: t.clone())) for k, v in a.items()}
    if "activation" in a:
        a64["activation"] = asame["activation"] = a["activation"]
    ref64 = _fused_call(op, a64, ref_fn)
    refsame = _fused_call(op, asame, ref_fn)
    red = _reduction(a)
    compare(out, refsame, ref64, f"{op} forward", red)
    if not grad or not grad_leaves or out.device.type == "meta":
        return
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(g.to(out.dtype))
    refsame.backward(g.to(refsame.dtype))
    ref64.backward(g)
    l64 = _float_leaves(_differentiable(a64, op))
    lsame = _float_leaves(_differentiable(asame, op))
    for i, (t, t64, ts) in enumerate(zip(grad_leaves, l64, lsame)):
        z64 = t64.grad if t64.grad is not None else torch.zeros_like(t64)
        zs = ts.grad if ts.grad is not None else torch.zeros_like(ts)
        if t.grad is None:
            raise Mismatch(f"{op}: input {i} ({tuple(t.shape)}) got no gradient")
        compare(t.grad, zs, z64, f"{op} grad of input {i} {tuple(t.shape)}", red)


def run_fused_op(case: dict, a: dict, gen: torch.Generator) -> None:
    """torch.ops.mmkernels.<op> called directly, positional as in the schema."""
    name = case["op"][:-3]
    out = getattr(torch.ops.mmkernels, name)(*[a[k] for k in case["order"]])
    if case.get("expect_ok"):
        kw = _ops_kwargs(a)
        kw64 = {k: _convert(v, lambda t: t.double()) for k, v in kw.items()}
        compare(out, _fused_call(name, kw, FUSED[name][1]),
                _fused_call(name, kw64, FUSED[name][1]), f"{name} (op)", _reduction(a))


def _ops_kwargs(a: dict) -> dict:
    out = dict(a)
    if "biases" in out and out["biases"] == []:
        out["biases"] = None
    return out


def run_backward_op(case: dict, a: dict, gen: torch.Generator) -> None:
    name = case["op"][:-3]  # concat_project_backward / project_concat_backward
    fwd = name[: -len("_backward")]
    if isinstance(a.get("out"), str) and a["out"] == "FORWARD":
        fa = dict(a)
        if fwd == "concat_project":
            fa["bias"] = None
        a["out"] = _fused_call(fwd, fa, FUSED[fwd][0]).detach()
    args = [a[k] for k in case["order"]]
    res = getattr(torch.ops.mmkernels, name)(*args)
    if not case.get("expect_ok"):
        return
    # The oracle: autograd of the reference (no bias: the backward op takes none).
    mask = a["output_mask"]
    wname = "weight" if fwd == "concat_project" else "weights"
    ref = {}
    for tag, conv in (("64", lambda t: t.double()), ("same", lambda t: t.clone())):
        xs = [conv(x.detach()).requires_grad_() for x in a["xs"]]
        ws = a[wname]
        ws = ([conv(w.detach()).requires_grad_() for w in ws] if isinstance(ws, list)
              else conv(ws.detach()).requires_grad_())
        bs = None
        if fwd == "project_concat":
            bs = [torch.zeros(w.shape[:-1], dtype=w.dtype, requires_grad=True) for w in ws]
        kw = {k: a[k] for k in ("subset_mask", "sample_mask", "activation")}
        o = (reference.concat_project(xs, ws, None, **kw) if fwd == "concat_project"
             else reference.project_concat(xs, ws, bs, **kw))
        o.backward(conv(a["grad_out"].detach()))
        ref[tag] = (xs, ws, bs)
    red = _reduction(a)
    grad_xs, grad_w, grad_b = res
    if mask[0]:
        for k, gx in enumerate(grad_xs):
            compare(gx, ref["same"][0][k].grad, ref["64"][0][k].grad, f"{name} grad_xs[{k}]", red)
    if mask[1]:
        if fwd == "concat_project":
            compare(grad_w, ref["same"][1].grad, ref["64"][1].grad, f"{name} grad_weight", red)
        else:
            for k, gw in enumerate(grad_w):
                compare(gw, ref["same"][1][k].grad, ref["64"][1][k].grad,
                        f"{name} grad_weights[{k}]", red)
    if mask[2]:
        if fwd == "concat_project":
            # The bias gradient: column sums of act'(out) * grad_out (over subsets if shared).
            exp = {}
            for tag, dt in (("64", torch.float64), ("same", a["out"].dtype)):
                gg = a["grad_out"].to(dt)
                d = gg * (a["out"] > 0) if a["activation"] == "relu" else gg
                exp[tag] = d.sum(-2) if a[wname].dim() == 3 else d.sum(tuple(range(d.dim() - 1)))
            compare(grad_b, exp["same"], exp["64"], f"{name} grad_bias", red)
        else:
            for k, gb in enumerate(grad_b):
                compare(gb, ref["same"][2][k].grad, ref["64"][2][k].grad,
                        f"{name} grad_biases[{k}]", red)


def run_gram(case: dict, a: dict, gen: torch.Generator) -> None:
    G, R = torch.ops.mmkernels.gram(a["z"], a["y"])
    if not case.get("expect_ok"):
        return
    for tag in ("64", "same"):
        dt = torch.float64 if tag == "64" or a["z"].dtype == torch.float64 else torch.float32
        z = a["z"].to(dt)
        y = a["y"].to(dt)
        y = y.unsqueeze(1) if y.dim() == 1 else y
        z1 = torch.cat([z, torch.ones(*z.shape[:2], 1, dtype=dt)], 2)
        gram = z1.transpose(1, 2) @ z1
        rhs = z1.transpose(1, 2) @ y.unsqueeze(0).expand(z.shape[0], *y.shape)
        a["ref" + tag] = (gram, rhs)
    n = int(a["z"].shape[1])
    compare(G, a["refsame"][0], a["ref64"][0], "gram G", n)
    compare(R, a["refsame"][1], a["ref64"][1], "gram R", n)


def run_softmax(case: dict, a: dict, gen: torch.Generator) -> None:
    keys = ("z", "y", "w", "b", "sample_weight", "l2")
    args = [a[k] for k in keys]
    if "subset_index" in a:
        args.append(a["subset_index"])
    loss, gw, gb = torch.ops.mmkernels.softmax_regression_loss_grad(*args)
    if not case.get("expect_ok"):
        return
    refs = {}
    for tag in ("64", "same"):
        dt = torch.float64 if tag == "64" else a["w"].dtype
        z = a["z"].to(dt)
        if a.get("subset_index") is not None:
            z = z[a["subset_index"]]
        w = a["w"].detach().to(dt).requires_grad_()
        b = a["b"].detach().to(dt).requires_grad_()
        logits = torch.baddbmm(b.unsqueeze(1), z, w)
        ce = -torch.log_softmax(logits, -1).gather(
            2, a["y"].view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(2)
        if a["sample_weight"] is not None:
            ce = ce * a["sample_weight"].to(dt)
        total = ce.sum(1) + 0.5 * a["l2"] * w.square().sum((1, 2))
        total.sum().backward()
        refs[tag] = (total.detach(), w.grad, b.grad)
    n = int(a["z"].shape[1]) * max(1, int(a["z"].shape[2]))
    for i, what in enumerate(("loss", "grad_w", "grad_b")):
        compare((loss, gw, gb)[i], refs["same"][i], refs["64"][i], f"softmax {what}", n)


def run_lbfgs(case: dict, a: dict, gen: torch.Generator) -> None:
    args = [a[k] for k in ("grad", "s", "y", "rho", "gamma", "diag", "rows")]
    d = torch.ops.mmkernels.lbfgs_direction(*args)
    if not case.get("expect_ok"):
        return

    def f64(t):
        if t is None or isinstance(t, torch.Tensor):
            return t if t is None or not t.is_floating_point() else t.double()
        return [x.double() for x in t]

    oracle = reference.lbfgs_direction(*[f64(t) for t in args])
    # each entry is the end of 2 m + 1 dot products of length P, one after another
    compare(d, reference.lbfgs_direction(*args), oracle, "lbfgs_direction",
            int(a["grad"].shape[1]) * (2 * len(a["s"]) + 1))


def run_heads(case: dict, a: dict, gen: torch.Generator) -> None:
    from mmkernels import heads

    kw = {k: a[k] for k in ("l2", "class_weight", "num_classes", "tol", "max_iter") if k in a}
    h = heads.fit(a["z"], a["y"], task=a["task"], **kw)
    zp = a.get("z_predict", a["z"])
    pred = h.predict(zp)
    risk = h.risk(zp, a.get("y_predict", a["y"]))
    if a["task"] == "classification":
        h.accuracy(zp, a.get("y_predict", a["y"]))
    if not case.get("expect_ok"):
        return
    S, n = int(a["z"].shape[0]), int(a["z"].shape[1])
    if risk.shape != (S,) or not torch.isfinite(risk).all():
        raise Mismatch(f"heads risk: expected finite [S={S}], got {risk}")
    if pred.shape[:2] != (S, n):
        raise Mismatch(f"heads predict: expected [S={S}, n={n}, ...], got {tuple(pred.shape)}")
    # The fitted objective is at most the best constant head's: risk <= that bound (+ slack).
    y = a["y"].double()
    if a["task"] == "regression":
        yy = y.reshape(n, -1)
        bound = (yy - yy.mean(0)).square().mean()
    else:
        C = max(int(a["y"].max()) + 1, a.get("num_classes") or 0)
        bound = torch.tensor(math.log(C), dtype=torch.float64)
    slack = 1e-6 if a["z"].dtype == torch.float64 else 2e-3
    if (risk > bound * (1 + slack) + slack).any():
        raise Mismatch(f"heads risk {risk.tolist()} exceeds the constant head's {float(bound)}")


def run_refit_quality(case: dict, a: dict, gen: torch.Generator) -> None:
    from mmkernels.eta import refit_quality

    H, K = a.pop("hidden"), len(a["train_xs"]) if isinstance(a["train_xs"], list) else 1
    subsets = a.get("subsets")
    S = len(subsets) if isinstance(subsets, list) else 2 ** K - 1
    torch.manual_seed(case["seed"])
    proj = [torch.randn(S, x.shape[1] if x.dim() == 2 else 1, H, dtype=torch.float64)
            for x in (a["train_xs"] if isinstance(a["train_xs"], list) else [])]

    def encoder(xs):
        return sum(torch.einsum("nd,sdh->snh", x.double(), p) for x, p in zip(xs, proj)).tanh()

    kw = {k: v for k, v in a.items() if k not in ("train_xs", "train_y", "test_xs", "test_y")}
    table = refit_quality(encoder, a["train_xs"], a["train_y"], a["test_xs"], a["test_y"], **kw)
    if case.get("expect_ok"):
        rows = table.subsets if hasattr(table, "subsets") else None
        if rows is not None and len(rows) != S:
            raise Mismatch(f"refit_quality: {len(rows)} rows, expected {S}")
        table.to_markdown()


def run_selftest(case: dict, a: dict, gen: torch.Generator) -> None:
    """Misbehaves on purpose, to test that the parent attributes crashes and hangs."""
    if a["do"] == "abort":
        os.abort()
    if a["do"] == "hang":
        import time

        time.sleep(3600)


RUNNERS = {"_selftest": run_selftest, "concat_project": run_fused, "project_concat": run_fused,
           "concat_project_op": run_fused_op, "project_concat_op": run_fused_op,
           "concat_project_backward_op": run_backward_op,
           "project_concat_backward_op": run_backward_op,
           "gram": run_gram, "softmax": run_softmax, "heads": run_heads,
           "refit_quality": run_refit_quality, "lbfgs": run_lbfgs}


def run_case(case: dict) -> dict:
    gen = torch.Generator().manual_seed(case["seed"])
    try:
        a = build(case["args"], gen)
    except Exception as e:  # noqa: BLE001 - the fuzzer's own fault, not the op's
        return {"status": "setup-error", "msg": f"building the arguments: {type(e).__name__}: {e}"}
    try:
        RUNNERS[case["op"]](case, a, gen)
    except Mismatch as e:
        return {"status": "mismatch", "msg": str(e)}
    except Exception as e:  # noqa: BLE001 - every exception is an outcome to report
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else ""
        return {"status": "raised", "type": type(e).__name__, "msg": str(e)[:2000],
                "where": where}
    return {"status": "ok"}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("MMKERNELS_FUZZ_THREADS", "2")))
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    for line in sys.stdin:
        if not line.strip():
            continue
        result = run_case(json.loads(line))
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
