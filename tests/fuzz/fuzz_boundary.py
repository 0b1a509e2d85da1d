"""The op-boundary fuzzer (issue 8, section 1): case generators and the parent side.

Hypothesis draws cases (valid and invalid argument sets for every public op and head
function); each case runs in a worker subprocess (tests/fuzz/fuzz_worker.py) that is reused
across cases and restarted after a crash. The parent sends one case at a time and waits for its
answer with a timeout, so a crash (signal, abort), a hang or garbage on the pipe is attributed
to exactly the case that caused it.

Verdicts: a valid case must match the oracle (mmkernels.reference / a float64 computation,
tolerances of oracle.py); an invalid case must raise ValueError, TypeError, RuntimeError or
IndexError (or their subclasses) whose message names the offending argument. Anything else is a
failure: an exception from a valid call, an invalid call accepted, a wrong result, a signal, a
hang.

    python tests/fuzz/fuzz_boundary.py --examples 2000        # a longer run, all targets
    python tests/fuzz/fuzz_boundary.py --replay case.json     # run one case (as printed)

Under pytest (tests/fuzz/test_fuzz_boundary.py) the budget is small; MMKERNELS_FUZZ_SCALE
multiplies it (e.g. 20 for a deep run).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import strategies as st

HERE = Path(__file__).parent
ROOT = HERE.parents[1]  # the repository
CASE_TIMEOUT_S = float(os.environ.get("MMKERNELS_FUZZ_TIMEOUT", "60"))
ERRORS = ("ValueError", "TypeError", "RuntimeError", "IndexError", "OutOfMemoryError",
          "NotImplementedError")
FLOATS = ["float32", "float64", "bfloat16"]
STATS = {"cases": 0, "valid": 0, "invalid": 0, "restarts": 0}


# ---- the worker ---------------------------------------------------------------------------------


class Worker:
    """One long-lived child running cases; restarted after it dies or hangs."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.stderr_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"mmk-fuzz-{os.getpid()}.err"

    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "fuzz_worker.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._err, env=env, cwd=str(ROOT))

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
            self._err.close()

    def _stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_bytes()[-3000:].decode(errors="replace")
        except OSError:
            return ""

    def run(self, case: dict, timeout: float = CASE_TIMEOUT_S) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.stop()
            self._start()
            # The first case pays for the import of torch.
            timeout += 120
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write((json.dumps(case) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                STATS["restarts"] += 1
                return {"status": "hang", "msg": f"no answer within {timeout:.0f} s"}
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                break
        line = fd.readline()
        if not line:
            rc = self.proc.wait()
            tail = self._stderr_tail()
            self.stop()
            STATS["restarts"] += 1
            return {"status": "crash", "rc": rc, "msg": f"worker died with rc {rc}: {tail}"}
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            self.stop()
            return {"status": "crash", "rc": None, "msg": f"garbage on the pipe: {line[:200]!r}"}


_WORKER: Worker | None = None


def worker() -> Worker:
    global _WORKER
    if _WORKER is None:
        _WORKER = Worker()
    return _WORKER


def verdict(case: dict, result: dict) -> str | None:
    """None when the outcome is the one the case expects, else what went wrong."""
    expect = case["expect"]
    status = result["status"]
    if status in ("crash", "hang"):
        return f"{status}: {result['msg']}"
    if status == "setup-error":
        return f"the fuzzer could not build the case: {result['msg']}"
    if status == "mismatch":
        return f"wrong result: {result['msg']}"
    if expect == "ok":
        if status == "raised":
            return f"a valid call raised {result['type']}: {result['msg']} ({result['where']})"
        return None
    if status == "ok":
        return f"an invalid call ({case['why']}) was accepted; expected an error naming {expect}"
    if result["type"] not in ERRORS:
        return f"raised {result['type']} (not a clear error type): {result['msg']}"
    if not any(name in result["msg"] for name in expect):
        return (f"the error does not name the argument ({case['why']}; expected one of "
                f"{expect}): {result['type']}: {result['msg']}")
    return None


def check(case: dict) -> None:
    """Runs one case in the worker; AssertionError with a replayable case when it fails."""
    STATS["cases"] += 1
    STATS["valid" if case["expect"] == "ok" else "invalid"] += 1
    result = worker().run(case)
    problem = verdict(case, result)
    if problem:
        raise AssertionError(f"{problem}\nreplay: {json.dumps(case)}")


# ---- tensor specs -------------------------------------------------------------------------------


def T(shape, dtype="float32", **kw) -> dict:  # noqa: N802 - reads like a type
    return {"T": list(shape), "dtype": dtype, **kw}


def mask(shape, p=0.6, **kw) -> dict:
    return T(shape, "bool", p=p, **kw)


def draw_layout(draw, rank: int) -> str:
    choices = ["contig", "contig", "contig", "offset", "step", "expand"]
    if rank >= 2:
        choices.append("t")
    return draw(st.sampled_from(choices)) if rank >= 1 else "contig"


def draw_tensor(draw, shape, dtype, fills=("randn",)) -> dict:
    return T(shape, dtype, lay=draw_layout(draw, len(shape)), fill=draw(st.sampled_from(fills)))


SMALL_B = st.one_of(st.integers(0, 9), st.sampled_from([1, 600, 1100, 2100]))


# ---- the fused ops ------------------------------------------------------------------------------


@st.composite
def fused_case(draw, api=None) -> dict:
    """concat_project / project_concat through the public function ("public"), the op
    ("op"), or the backward op ("backward")."""
    op = draw(st.sampled_from(["concat_project", "project_concat"]))
    api = api or draw(st.sampled_from(["public", "public", "op", "backward"]))
    K = draw(st.integers(1, 4))
    B = draw(SMALL_B)
    dims = [draw(st.integers(0, 6)) for _ in range(K)]
    dtype = draw(st.sampled_from(FLOATS))
    subsets = draw(st.booleans())
    S = draw(st.integers(0, 5)) if subsets else 1
    per_subset = subsets and draw(st.booleans())
    lead = [S] if per_subset else []
    act = draw(st.sampled_from(["relu", "none"]))
    fills = ("randn", "randn", "randn", "zero", "nan", "inf", "-inf", "big")
    if api == "backward":
        # The reference's autograd multiplies absent non-finite values by zero (NaN), which
        # the kernels never read: the backward oracle holds for finite inputs only.
        fills = ("randn", "zero")
    xs = [draw_tensor(draw, [B, d], dtype, fills) for d in dims]
    a: dict = {"xs": {"L": xs}}
    if op == "concat_project":
        H = draw(st.integers(0, 7))
        widths = [H]
        a["weight"] = draw_tensor(draw, lead + [H, sum(dims)], dtype)
        a["bias"] = draw_tensor(draw, lead + [H], dtype) if draw(st.booleans()) else None
    else:
        widths = [draw(st.integers(0, 5)) for _ in range(K)]
        a["weights"] = {"L": [draw_tensor(draw, lead + [h, d], dtype)
                              for h, d in zip(widths, dims)]}
        a["biases"] = ({"L": [draw_tensor(draw, lead + [h], dtype) for h in widths]}
                       if draw(st.booleans()) else None)
    a["subset_mask"] = (mask([S, K], draw(st.sampled_from([0.0, 0.5, 1.0])),
                             lay=draw_layout(draw, 2)) if subsets else None)
    a["sample_mask"] = (mask([B, K], draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])),
                             lay=draw_layout(draw, 2)) if draw(st.booleans()) else None)
    a["activation"] = act
    wname, bname = ("weight", "bias") if op == "concat_project" else ("weights", "biases")
    width = widths[0] if op == "concat_project" else sum(widths)
    out_shape = ([S] if subsets else []) + [B, width]
    case = {"op": op, "seed": draw(st.integers(0, 2**31 - 1)), "args": a, "expect": "ok",
            "why": "valid", "grad": False}
    if api == "backward":
        a.pop(bname)
        a["grad_out"] = draw_tensor(draw, out_shape, dtype)
        a["out"] = "FORWARD"
        a["output_mask"] = [draw(st.booleans()) for _ in range(3)]
        case["op"] = op + "_backward_op"
        case["order"] = ["grad_out", "out", "xs", wname, "subset_mask", "sample_mask",
                         "activation", "output_mask"]
    elif api == "op":
        case["op"] = op + "_op"
        if op == "project_concat" and a["biases"] is None:
            a["biases"] = {"L": []}
        case["order"] = ["xs", wname, bname, "subset_mask", "sample_mask", "activation"]
    else:
        # Gradients are compared where the oracle is stable: finite inputs, and no bfloat16
        # relu (a bfloat16 rounding can flip the sign of a near-zero pre-activation).
        finite = all(x["fill"] in ("randn", "zero") for x in xs)
        case["grad"] = finite and not (dtype == "bfloat16" and act == "relu")
    mutate = draw(st.sampled_from(["none"] * 4 + FUSED_MUTATIONS + (
        BACKWARD_MUTATIONS if api == "backward" else PUBLIC_MUTATIONS if api == "public" else [])))
    if mutate != "none":
        if api == "backward":
            a["out"] = draw_tensor(draw, out_shape, dtype)
        expect = apply_fused_mutation(draw, mutate, case, a, op, K, B, S, dims, dtype,
                                      per_subset, wname, bname, out_shape)
        if expect is not None:
            case["expect"], case["why"] = expect, mutate
            case["grad"] = False
        elif api == "backward":
            a["out"] = "FORWARD"  # still valid: out must then be the forward's
    case["expect_ok"] = case["expect"] == "ok"
    return case


FUSED_MUTATIONS = ["xs_dtype", "xs_rank", "xs_rows", "w_dtype", "w_width", "w_rank", "w_S",
                   "w3_no_subsets", "bias_shape", "bias_dtype", "list_count", "subset_dtype",
                   "subset_K", "subset_rank", "sample_dtype", "sample_rows", "sample_K",
                   "activation", "meta_one", "all_meta", "xs_empty", "none_weight", "huge",
                   "zero_B"]
FUSED_MUTATIONS = [m for m in FUSED_MUTATIONS
                   if m not in os.environ.get("MMKERNELS_FUZZ_SKIP", "").split(",")]
PUBLIC_MUTATIONS = ["xs_tensor", "xs_item", "weight_type"]
BACKWARD_MUTATIONS = ["grad_shape", "out_shape", "grad_dtype", "grad_meta", "out_none"]
BAD_DTYPES = ["int64", "float16", "complex64", "bool", "int32"]


def _other_float(draw, dtype: str) -> str:
    return draw(st.sampled_from([d for d in FLOATS + ["int64"] if d != dtype]))


def apply_fused_mutation(draw, m, case, a, op, K, B, S, dims, dtype, per_subset, wname, bname,
                         out_shape):
    """Makes the case invalid (returns the argument names its error must mention), or
    returns None when the mutation does not apply and the case stays valid."""
    xs = a["xs"]["L"]
    k = draw(st.integers(0, K - 1))
    weights = [a[wname]] if op == "concat_project" else a[wname]["L"]
    kw = 0 if op == "concat_project" else k
    wlabel = "weight" if op == "concat_project" else f"weights[{k}]"
    lead = [S] if per_subset else []
    if m == "xs_dtype":
        xs[k]["dtype"] = draw(st.sampled_from(BAD_DTYPES + [d for d in FLOATS if d != dtype]))
        if xs[k]["dtype"] in FLOATS and K == 1:
            xs[k]["dtype"] = "int64"
        return [f"xs[{k}]", "xs[0]", "xs[1]"] if xs[k]["dtype"] in FLOATS else [f"xs[{k}]"]
    if m == "xs_rank":
        xs[k]["T"] = draw(st.sampled_from([[], [B], [B, dims[k], 1]]))
        xs[k]["lay"] = "contig"
        return [f"xs[{k}]"]
    if m == "xs_rows":
        if K == 1:
            return None
        k = draw(st.integers(1, K - 1))
        xs[k]["T"][0] = B + draw(st.sampled_from([1, 2, 7]))
        return [f"xs[{k}]"]
    if m == "w_dtype":
        weights[kw]["dtype"] = _other_float(draw, dtype)
        return [wlabel]
    if m == "w_width":
        weights[kw]["T"][-1] += draw(st.sampled_from([1, 3]))
        return [wlabel, "weight"]
    if m == "w_rank":
        weights[kw]["T"] = draw(st.sampled_from([[], [5], [1, 1, 2, 3]]))
        weights[kw]["lay"] = "contig"
        return [wlabel, "weight"]
    if m == "w_S":
        if not per_subset:
            return None
        weights[kw]["T"][0] = S + 1
        return [wlabel, "subset_mask"]
    if m == "w3_no_subsets":
        if not per_subset:
            return None
        a["subset_mask"] = None
        return ["subset_mask"]
    if m == "bias_shape":
        if a.get(bname) is None or (op == "project_concat" and not a[bname]["L"]):
            return None
        b = a[bname] if op == "concat_project" else a[bname]["L"][k]
        b["T"] = draw(st.sampled_from([b["T"][:-1] + [b["T"][-1] + 1], [], lead + [2, 2]]))
        b["lay"] = "contig"
        return ["bias" if op == "concat_project" else f"biases[{k}]"]
    if m == "bias_dtype":
        if a.get(bname) is None or (op == "project_concat" and not a[bname]["L"]):
            return None
        b = a[bname] if op == "concat_project" else a[bname]["L"][k]
        b["dtype"] = _other_float(draw, dtype)
        return ["bias" if op == "concat_project" else f"biases[{k}]"]
    if m == "list_count":
        if op == "concat_project":
            return None
        which = draw(st.sampled_from([wname, bname]))
        if which == bname and (a.get(bname) is None or not a[bname]["L"]):
            which = wname
        lst = a[which]["L"]
        if draw(st.booleans()) and len(lst) > 0 and which == wname:  # biases=[] means none
            lst.pop()
        else:
            lst.append(T([1, 1], dtype))
        return [which]
    if m == "subset_dtype":
        if a["subset_mask"] is None:
            return None
        a["subset_mask"]["dtype"] = draw(st.sampled_from(["float32", "uint8", "int64"]))
        return ["subset_mask"]
    if m == "subset_K":
        if a["subset_mask"] is None:
            return None
        a["subset_mask"]["T"][1] = K + draw(st.sampled_from([1, 2]))
        return ["subset_mask"]
    if m == "subset_rank":
        if a["subset_mask"] is None:
            return None
        a["subset_mask"]["T"] = draw(st.sampled_from([[], [K], [S, K, 1]]))
        a["subset_mask"]["lay"] = "contig"
        return ["subset_mask"]
    if m == "sample_dtype":
        if a["sample_mask"] is None:
            return None
        a["sample_mask"]["dtype"] = draw(st.sampled_from(["float32", "uint8", "int64"]))
        return ["sample_mask"]
    if m == "sample_rows":
        if a["sample_mask"] is None:
            return None
        a["sample_mask"]["T"][0] = B + draw(st.sampled_from([1, 5]))
        return ["sample_mask"]
    if m == "sample_K":
        if a["sample_mask"] is None:
            return None
        a["sample_mask"]["T"] = draw(st.sampled_from([[B, K + 1], [B], [B, K, 1]]))
        a["sample_mask"]["lay"] = "contig"
        return ["sample_mask"]
    if m == "activation":
        a["activation"] = draw(st.sampled_from(["gelu", "", "RELU", "relu "]))
        return ["activation"]
    if m == "meta_one":
        # One argument on another device than xs[0] (meta is the other device on a CPU box).
        names = [f"xs[{i}]" for i in range(K)] + [f"{wname}[{i}]" if op != "concat_project"
                                                  else wname for i in range(len(weights))]
        specs = list(xs) + list(weights)
        for name in ("subset_mask", "sample_mask", "grad_out"):
            if isinstance(a.get(name), dict):
                names.append(name)
                specs.append(a[name])
        if op == "concat_project" and a.get(bname):
            names.append(bname)
            specs.append(a[bname])
        i = draw(st.integers(0, len(specs) - 1))
        if i == 0:  # xs[0] on meta: then everything else is "on the wrong device"
            specs[0]["dev"] = "meta"
            return ["is on cpu", "is on meta", "xs[0]"]
        specs[i]["dev"] = "meta"
        return [names[i]]
    if m == "all_meta":
        if case["op"].endswith("_backward_op"):
            return None
        for spec in _tensor_specs(a):
            spec["dev"] = "meta"
        case["grad"] = False
        return None  # still valid: the fake kernels give the shape, the oracle compares it
    if m == "xs_empty":
        a["xs"] = {"L": []}
        return ["xs"]
    if m == "none_weight":
        a[wname] = None
        return [wname]
    if m == "zero_B":
        for x in xs:
            x["T"][0] = 0
        if a["sample_mask"] is not None:
            a["sample_mask"]["T"][0] = 0
        if isinstance(a.get("grad_out"), dict):
            a["grad_out"]["T"][-2] = 0
            if isinstance(a.get("out"), dict):
                a["out"]["T"][-2] = 0
        return None
    if m == "huge":
        # An output far beyond any memory: must be refused before anything is allocated.
        if S == 0:
            return None
        big = draw(st.sampled_from([2**31, 2**40]))
        for x in xs:
            x["T"][0] = big
            x["lay"] = "expand"
        a["sample_mask"] = None
        if isinstance(a.get("grad_out"), dict):
            a["grad_out"]["T"][-2] = big
            a["grad_out"]["lay"] = "expand"
            a["out"]["T"][-2] = big
            a["out"]["lay"] = "expand"
        if op == "concat_project":
            a[wname]["T"][-2] = max(8, a[wname]["T"][-2])
            if a.get(bname):
                a[bname]["T"][-1] = a[wname]["T"][-2]
        else:
            for i, w in enumerate(weights):
                w["T"][-2] = max(8, w["T"][-2])
                if a.get(bname) and a[bname]["L"]:
                    a[bname]["L"][i]["T"][-1] = w["T"][-2]
        if all(d == 0 for d in dims):
            xs[0]["T"][1] = 1
            if op == "concat_project":
                a[wname]["T"][-1] += 1
            else:
                weights[0]["T"][-1] = 1
        if isinstance(a.get("grad_out"), dict):
            width = sum(w["T"][-2] for w in weights)
            a["grad_out"]["T"][-1] = a["out"]["T"][-1] = width
        return ["memory budget"]
    if m == "xs_tensor":
        a["xs"] = xs[0]
        return ["xs"]
    if m == "xs_item":
        xs[k] = {"num": 1.5}
        return ["xs"]
    if m == "weight_type":
        a[wname] = {"str": "w"} if op == "concat_project" else {"L": [{"num": 2.0}] * K}
        return [wname]
    if m == "grad_shape":
        a["grad_out"]["T"] = draw(st.sampled_from([out_shape[:-1] + [out_shape[-1] + 1], [],
                                                   [1] + out_shape]))
        a["grad_out"]["lay"] = "contig"
        return ["grad_out"]
    if m == "out_shape":
        a["out"]["T"] = out_shape[:-1] + [out_shape[-1] + 2]
        return ["out"]
    if m == "grad_dtype":
        a["grad_out"]["dtype"] = _other_float(draw, dtype)
        return ["grad_out"]
    if m == "grad_meta":
        a["grad_out"]["dev"] = "meta"
        return ["grad_out"]
    if m == "out_none":
        a["out"] = None
        return ["out"]
    raise AssertionError(m)


def _tensor_specs(v) -> list[dict]:
    if isinstance(v, dict):
        if "T" in v:
            return [v]
        return [s for x in v.values() for s in _tensor_specs(x)]
    if isinstance(v, list):
        return [s for x in v for s in _tensor_specs(x)]
    return []


# ---- the head-refit ops and functions -----------------------------------------------------------


@st.composite
def gram_case(draw) -> dict:
    S, n, H = draw(st.integers(0, 3)), draw(st.integers(0, 9)), draw(st.integers(0, 5))
    zdt = draw(st.sampled_from(FLOATS))
    ydt = draw(st.sampled_from(FLOATS))
    yshape = [n] if draw(st.booleans()) else [n, draw(st.integers(0, 3))]
    a = {"z": draw_tensor(draw, [S, n, H], zdt), "y": draw_tensor(draw, yshape, ydt)}
    case = {"op": "gram", "seed": draw(st.integers(0, 2**31 - 1)), "args": a, "expect": "ok",
            "why": "valid"}
    m = draw(st.sampled_from(["none"] * 3 + ["z_rank", "z_dtype", "y_rows", "y_rank", "y_dtype",
                                             "y_meta", "z_meta", "all_meta", "y_none"]))
    expect = {"z_rank": ["z"], "z_dtype": ["z"], "y_rows": ["y"], "y_rank": ["y"],
              "y_dtype": ["y"], "y_meta": ["y"], "z_meta": ["z", "y"], "y_none": ["y"]}.get(m)
    if m == "z_rank":
        a["z"]["T"], a["z"]["lay"] = draw(st.sampled_from([[n, H], [], [S, n, H, 1]])), "contig"
    elif m == "z_dtype":
        a["z"]["dtype"] = draw(st.sampled_from(BAD_DTYPES))
    elif m == "y_rows":
        a["y"]["T"][0] = n + 1
    elif m == "y_rank":
        a["y"]["T"], a["y"]["lay"] = draw(st.sampled_from([[], [n, 1, 1]])), "contig"
    elif m == "y_dtype":
        a["y"]["dtype"] = draw(st.sampled_from(BAD_DTYPES))
    elif m in ("y_meta", "z_meta"):
        a[m[0]]["dev"] = "meta"
    elif m == "all_meta":
        a["z"]["dev"] = a["y"]["dev"] = "meta"
    elif m == "y_none":
        a["y"] = None
    if expect:
        case["expect"], case["why"] = expect, m
    case["expect_ok"] = case["expect"] == "ok" and m != "all_meta"
    return case


@st.composite
def softmax_case(draw) -> dict:
    S, n, H = draw(st.integers(0, 3)), draw(st.integers(0, 9)), draw(st.integers(0, 5))
    C = draw(st.sampled_from([1, 2, 3, 8, 9, 17, 33, 40]))
    zdt, wdt = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(["float32", "float64"]))
    pick = draw(st.booleans()) and S > 0
    Kp = draw(st.integers(0, 4)) if pick else S
    a = {"z": draw_tensor(draw, [S, n, H], zdt),
         "y": T([n], "int64", hi=C, lay=draw_layout(draw, 1)),
         "w": draw_tensor(draw, [Kp, H, C], wdt), "b": draw_tensor(draw, [Kp, C], wdt),
         "sample_weight": (draw_tensor(draw, [n], draw(st.sampled_from(FLOATS)))
                           if draw(st.booleans()) else None),
         "l2": draw(st.sampled_from([0.0, 0.5, 3.0]))}
    if pick:
        a["subset_index"] = T([Kp], "int64", hi=S)
    case = {"op": "softmax", "seed": draw(st.integers(0, 2**31 - 1)), "args": a, "expect": "ok",
            "why": "valid"}
    m = draw(st.sampled_from(["none"] * 3 + [
        "y_high", "y_dtype", "w_rank", "w_C0", "w_dtype", "b_shape", "sw_shape", "l2", "z_rank",
        "idx_range", "idx_dtype", "meta_y", "meta_w", "meta_sw", "meta_idx", "y_shape"]))
    names = {"y_high": ["y"], "y_dtype": ["y"], "w_rank": ["w"], "w_C0": ["w"], "w_dtype": ["w"],
             "b_shape": ["b"], "sw_shape": ["sample_weight"], "l2": ["l2"], "z_rank": ["z"],
             "idx_range": ["subset_index"], "idx_dtype": ["subset_index"], "meta_y": ["y"],
             "meta_w": ["w", "b"], "meta_sw": ["sample_weight"], "meta_idx": ["subset_index"],
             "y_shape": ["y"]}
    applies = True
    if m == "y_high":
        applies = n > 0
        if draw(st.booleans()):
            a["y"]["shift"] = C + draw(st.sampled_from([0, 5]))
        else:
            a["y"]["hi"], a["y"]["shift"] = 1, -1
    elif m == "y_dtype":
        a["y"]["dtype"] = draw(st.sampled_from(["int32", "float32", "uint8"]))
    elif m == "w_rank":
        a["w"]["T"], a["w"]["lay"] = [Kp, H * C], "contig"
    elif m == "w_C0":
        a["w"]["T"][2] = 0
        a["b"]["T"][1] = 0
    elif m == "w_dtype":
        a["w"]["dtype"] = draw(st.sampled_from(["bfloat16", "float16", "int64"]))
    elif m == "b_shape":
        a["b"]["T"], a["b"]["lay"] = [Kp, C + 1], "contig"
    elif m == "sw_shape":
        a["sample_weight"] = T([n + 1])
    elif m == "l2":
        a["l2"] = {"num": draw(st.sampled_from(["nan", "inf", "-1.0"]))}
    elif m == "z_rank":
        a["z"]["T"], a["z"]["lay"] = [n, H], "contig"
    elif m == "idx_range":
        applies = pick and Kp > 0
        if applies:
            a["subset_index"] = T([Kp], "int64", hi=1, shift=draw(st.sampled_from([S, -1])))
    elif m == "idx_dtype":
        applies = pick
        if applies:
            a["subset_index"]["dtype"] = "int32"
    elif m == "meta_y":
        a["y"]["dev"] = "meta"
    elif m == "meta_w":
        a["w"]["dev"] = "meta"
    elif m == "meta_sw":
        applies = a["sample_weight"] is not None
        if applies:
            a["sample_weight"]["dev"] = "meta"
    elif m == "meta_idx":
        applies = pick
        if applies:
            a["subset_index"]["dev"] = "meta"
    elif m == "y_shape":
        a["y"]["T"] = [n, 1]
    if m != "none" and applies:
        case["expect"], case["why"] = names[m], m
    case["expect_ok"] = case["expect"] == "ok"
    return case


@st.composite
def heads_case(draw) -> dict:
    task = draw(st.sampled_from(["regression", "classification"]))
    S, n, H = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(0, 4))
    zdt = draw(st.sampled_from(FLOATS))
    a: dict = {"z": draw_tensor(draw, [S, n, H], zdt), "task": task}
    if task == "regression":
        a["y"] = T([n] if draw(st.booleans()) else [n, draw(st.integers(1, 3))],
                   draw(st.sampled_from(["float32", "float64"])))
    else:
        a["y"] = T([n], "int64", hi=draw(st.integers(1, 4)))
    if draw(st.booleans()):
        a["l2"] = draw(st.sampled_from([0.0, 0.1, 1.0]))
    case = {"op": "heads", "seed": draw(st.integers(0, 2**31 - 1)), "args": a, "expect": "ok",
            "why": "valid"}
    m = draw(st.sampled_from(["none"] * 3 + ["task", "l2", "z_rank", "z_dtype", "z_S0", "z_n0",
                                             "z_nan", "y_rows", "y_dtype", "predict_H",
                                             "num_classes", "tol", "max_iter", "class_weight"]))
    expect = {"task": ["task"], "l2": ["l2"], "z_rank": ["Z"], "z_dtype": ["Z"], "z_S0": ["Z"],
              "z_n0": ["Z", "n = 0"], "z_nan": ["Z", "NaN"], "y_rows": ["y"], "y_dtype": ["y"],
              "predict_H": ["Z"], "num_classes": ["num_classes"], "tol": ["tol"],
              "max_iter": ["max_iter"], "class_weight": ["class_weight"]}.get(m)
    if m == "task":
        a["task"] = draw(st.sampled_from(["ridge", "", "Regression"]))
    elif m == "l2":
        a["l2"] = {"num": draw(st.sampled_from(["nan", "-1.0", "inf"]))}
    elif m == "z_rank":
        a["z"]["T"], a["z"]["lay"] = [n, H], "contig"
    elif m == "z_dtype":
        a["z"]["dtype"] = draw(st.sampled_from(["float16", "int64"]))
    elif m == "z_S0":
        a["z"]["T"][0] = 0
    elif m == "z_n0":
        a["z"]["T"][1] = 0
        a["y"]["T"][0] = 0
    elif m == "z_nan":
        a["z"]["fill"] = "nan"
        expect = None if H == 0 else expect
    elif m == "y_rows":
        a["y"]["T"][0] = n + 2
    elif m == "y_dtype":
        a["y"]["dtype"] = "float32" if task == "classification" else "int64"
    elif m == "predict_H":
        a["z_predict"] = T([S, n, H + 1], zdt)
    elif m in ("num_classes", "tol", "max_iter", "class_weight"):
        if task != "classification":
            expect = None
        elif m == "num_classes":
            a["y"]["shift"] = 1  # every label >= 1
            a["num_classes"] = 1
        elif m == "tol":
            a["tol"] = {"num": draw(st.sampled_from(["0.0", "nan", "-1.0"]))}
        elif m == "max_iter":
            a["max_iter"] = -1
        else:
            a["class_weight"] = draw(st.sampled_from([{"str": "uniform"}, T([99])]))
    if expect:
        case["expect"], case["why"] = expect, m
    case["expect_ok"] = case["expect"] == "ok"
    return case


@st.composite
def refit_quality_case(draw) -> dict:
    task = draw(st.sampled_from(["regression", "classification"]))
    K, n, nt = draw(st.integers(1, 3)), draw(st.integers(4, 10)), draw(st.integers(2, 6))
    dims = [draw(st.integers(1, 3)) for _ in range(K)]
    a: dict = {"train_xs": {"L": [T([n, d]) for d in dims]},
               "test_xs": {"L": [T([nt, d]) for d in dims]}, "task": task,
               "hidden": draw(st.integers(1, 3))}
    if task == "regression":
        a["train_y"], a["test_y"] = T([n], "float64"), T([nt], "float64")
    else:
        # Random labels: a test class may be missing from the training labels.
        a["train_y"] = T([n], "int64", hi=2, fill="randn")
        a["test_y"] = T([nt], "int64", hi=2)
    case = {"op": "refit_quality", "seed": draw(st.integers(0, 2**31 - 1)), "args": a,
            "expect": "ok", "why": "valid"}
    m = draw(st.sampled_from(["none"] * 3 + ["task", "train_empty", "test_count", "subsets_empty",
                                             "subsets_range", "names", "bayes_risk",
                                             "memory_budget", "train_y_rows", "reference"]))
    expect = {"task": ["task"], "train_empty": ["train_xs"], "test_count": ["test_xs"],
              "subsets_empty": ["subsets"], "subsets_range": ["subsets"], "names": ["names"],
              "bayes_risk": ["bayes_risk"], "memory_budget": ["memory_budget"],
              "train_y_rows": ["y"], "reference": ["reference"]}.get(m)
    if m == "task":
        a["task"] = "ridge"
    elif m == "train_empty":
        a["train_xs"] = {"L": []}
    elif m == "test_count":
        a["test_xs"]["L"].append(T([nt, 1]))
    elif m == "subsets_empty":
        a["subsets"] = []
    elif m == "subsets_range":
        a["subsets"] = [[0], [K + draw(st.integers(0, 2))]]
    elif m == "names":
        a["names"] = ["only_one", "two", "three", "four", "five", "six", "seven", "eight"][
            : 2 ** K]  # one too many
    elif m == "bayes_risk":
        a["bayes_risk"] = {"num": "nan"}
    elif m == "memory_budget":
        a["memory_budget"] = draw(st.sampled_from([0, -5]))
    elif m == "train_y_rows":
        a["train_y"]["T"][0] = n + 1
    elif m == "reference":
        a["reference"] = "no-such-subset"
    if expect:
        case["expect"], case["why"] = expect, m
    case["expect_ok"] = case["expect"] == "ok"
    return case


@st.composite
def lbfgs_case(draw) -> dict:
    """mmkernels::lbfgs_direction: k problems of P parameters, m stored pairs, any layout."""
    k = draw(st.integers(0, 4))
    P = draw(st.one_of(st.integers(0, 40), st.sampled_from([129, 1030])))
    m = draw(st.integers(0, 5))
    dt = draw(st.sampled_from(["float32", "float64"]))
    fills = ("randn", "randn", "zero")

    def vec(shape):
        return draw_tensor(draw, shape, dt, fills)

    # With rows, each pair holds n >= k rows (a history that kept finished problems' rows).
    with_rows = draw(st.booleans())
    n = k + draw(st.integers(0, 3)) if with_rows else k
    a = {"grad": vec([k, P]), "s": {"L": [vec([n, P]) for _ in range(m)]},
         "y": {"L": [vec([n, P]) for _ in range(m)]},
         "rho": {"L": [vec([n]) for _ in range(m)]}, "gamma": vec([k]),
         "diag": vec([k, P]) if draw(st.booleans()) else None,
         "rows": T([m, k], "int64", hi=max(n, 1), lay=draw_layout(draw, 2)) if with_rows
         else None}
    case = {"op": "lbfgs", "seed": draw(st.integers(0, 2**31 - 1)), "args": a, "expect": "ok",
            "why": "valid"}
    mut = draw(st.sampled_from(["none"] * 3 + [
        "grad_rank", "grad_dtype", "pairs", "s_shape", "y_dtype", "rho_shape", "gamma_shape",
        "diag_shape", "meta_s", "meta_grad", "rows_dtype", "rows_shape", "rows_range"]))
    j = draw(st.integers(0, max(0, m - 1)))
    names = {"grad_rank": ["grad"], "grad_dtype": ["grad"], "pairs": ["rho"],
             "s_shape": [f"s[{j}]"], "y_dtype": [f"y[{j}]"], "rho_shape": [f"rho[{j}]"],
             "gamma_shape": ["gamma"], "diag_shape": ["diag"], "meta_s": [f"s[{j}]"],
             "meta_grad": ["s[0]", "gamma", "rows"], "rows_dtype": ["rows"],
             "rows_shape": ["rows"], "rows_range": [f"rows[{j}]"]}
    applies = True
    if mut == "grad_rank":
        a["grad"]["T"], a["grad"]["lay"] = [k * P], "contig"
    elif mut == "grad_dtype":
        a["grad"]["dtype"] = draw(st.sampled_from(["bfloat16", "int64", "float16"]))
    elif mut == "pairs":
        applies = m > 0
        a["rho"]["L"] = a["rho"]["L"][:-1]
    elif mut in ("s_shape", "y_dtype", "rho_shape", "meta_s"):
        applies = m > 0
        if applies:
            key = {"s_shape": "s", "y_dtype": "y", "rho_shape": "rho", "meta_s": "s"}[mut]
            t = a[key]["L"][j]
            if mut == "y_dtype":
                t["dtype"] = "float64" if dt == "float32" else "float32"
            elif mut == "meta_s":
                t["dev"] = "meta"
            else:
                t["T"][-1] += 1
                t["lay"] = "contig"
    elif mut == "gamma_shape":
        a["gamma"]["T"], a["gamma"]["lay"] = [k, 1], "contig"
    elif mut == "diag_shape":
        applies = a["diag"] is not None
        if applies:
            a["diag"]["T"], a["diag"]["lay"] = [k, P + 1], "contig"
    elif mut == "meta_grad":
        a["grad"]["dev"] = "meta"
    elif mut in ("rows_dtype", "rows_shape", "rows_range"):
        applies = with_rows and (mut != "rows_range" or (m > 0 and k > 0))
        if applies and mut == "rows_dtype":
            a["rows"]["dtype"] = "int32"
        elif applies and mut == "rows_shape":
            a["rows"]["T"], a["rows"]["lay"] = [m + 1, k], "contig"
        elif applies:  # every row of pair j one past the end
            rows_j = {"T": [k], "dtype": "int64", "hi": 1, "shift": n}
            a["rows"] = {"stack": [rows_j if i == j else T([k], "int64", hi=max(n, 1))
                                        for i in range(m)]}
    if mut != "none" and applies:
        case["expect"], case["why"] = names[mut], mut
    case["expect_ok"] = case["expect"] == "ok"
    return case


TARGETS = {
    # name: (strategy, examples in the CI budget)
    "fused_public": (fused_case(api="public"), 2400),
    "fused_op": (fused_case(api="op"), 900),
    "fused_backward": (fused_case(api="backward"), 1400),
    "gram": (gram_case(), 800),
    "softmax": (softmax_case(), 1000),
    "heads": (heads_case(), 500),
    "refit_quality": (refit_quality_case(), 200),
    "lbfgs": (lbfgs_case(), 400),
}


def scale() -> float:
    return float(os.environ.get("MMKERNELS_FUZZ_SCALE", "1"))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from hypothesis import HealthCheck, given, settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=None, help="examples per target")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--replay", help="a JSON file (or string) holding one case")
    args = ap.parse_args(argv)
    if args.replay:
        text = Path(args.replay).read_text() if os.path.exists(args.replay) else args.replay
        case = json.loads(text)
        result = worker().run(case)
        print(json.dumps(result))
        print(verdict(case, result) or "as expected")
        worker().stop()
        return 0
    failures = 0
    t0 = time.time()
    for name in args.targets.split(","):
        strategy, n = TARGETS[name]
        n = args.examples or int(n * scale())

        @settings(max_examples=n, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(case):
            check(case)

        start = STATS["cases"]
        try:
            run()
            print(f"{name}: {STATS['cases'] - start} cases, no failure", flush=True)
        except AssertionError as e:
            failures += 1
            print(f"{name}: FAILED after {STATS['cases'] - start} cases:\n{e}", flush=True)
    worker().stop()
    print(f"total {STATS} in {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
