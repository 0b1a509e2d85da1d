"""Every class of invalid argument raises an error that names the argument and shows what was
expected next to what was given; meta tensors (the Meta kernels, which torch.compile's fake
tensors use) and every device raise the very same error, since all run one C++ plan."""

from __future__ import annotations

import pytest
import torch

import mmkernels

B, DIMS, H = 4, [3, 5], 6


def xs(dtype=torch.float32):
    return [torch.randn(B, d, dtype=dtype) for d in DIMS]


def early(**kw):
    args = dict(xs=xs(), weight=torch.randn(H, sum(DIMS)), bias=None)
    args.update(kw)
    return mmkernels.concat_project(args.pop("xs"), args.pop("weight"), args.pop("bias"), **args)


def late(**kw):
    args = dict(xs=xs(), weights=[torch.randn(2, 3), torch.randn(4, 5)], biases=None)
    args.update(kw)
    return mmkernels.project_concat(args.pop("xs"), args.pop("weights"), args.pop("biases"), **args)


CASES = [
    ("empty xs", lambda: early(xs=[]), "xs must hold at least one modality tensor"),
    ("empty xs late", lambda: late(xs=[], weights=[]), "xs must hold at least one modality"),
    (
        "1-d modality",
        lambda: early(xs=[torch.randn(B), torch.randn(B, 5)]),
        r"xs\[0\] must be 2-d \[B, d_k\], got shape \[4\]",
    ),
    (
        "rows disagree",
        lambda: early(xs=[torch.randn(B, 3), torch.randn(B + 1, 5)]),
        r"xs\[1\] has 5 rows, expected B = 4",
    ),
    (
        "integer dtype",
        lambda: early(xs=[torch.ones(B, 3, dtype=torch.long), torch.randn(B, 5)]),
        r"xs\[0\] must be float32, float64 or bfloat16, got Long",
    ),
    (
        "mixed dtypes",
        lambda: early(xs=[torch.randn(B, 3), torch.randn(B, 5, dtype=torch.float64)]),
        r"xs\[1\] has dtype Double, expected Float \(the dtype of xs\[0\]\)",
    ),
    (
        "weight dtype",
        lambda: early(weight=torch.randn(H, 8, dtype=torch.float64)),
        r"weight has dtype Double, expected Float",
    ),
    (
        "weight width",
        lambda: early(weight=torch.randn(H, 9)),
        r"weight's last dim must be D = sum of modality dims = 8, got shape \[6, 9\]",
    ),
    (
        "weight rank",
        lambda: early(weight=torch.randn(8)),
        r"weight must be \[H, D\] or \[S, H, D\] with D = sum of modality dims = 8, "
        r"got shape \[8\]",
    ),
    (
        "3-d weight without subsets",
        lambda: early(weight=torch.randn(2, H, 8)),
        r"a 3-d weight \[S, H, D\] needs subset_mask \[S, K\]",
    ),
    (
        "S disagrees",
        lambda: early(weight=torch.randn(2, H, 8), subset_mask=torch.ones(3, 2, dtype=torch.bool)),
        r"weight has S = 2 subsets, expected S = 3 \(the rows of subset_mask\)",
    ),
    (
        "bias shape",
        lambda: early(bias=torch.randn(H + 1)),
        r"bias must have shape \[6\] \(\[H\], from weight\), got \[7\]",
    ),
    (
        "subset_mask dtype",
        lambda: early(subset_mask=torch.ones(3, 2)),
        r"subset_mask must be a bool tensor, got Float",
    ),
    (
        "subset_mask K",
        lambda: early(subset_mask=torch.ones(3, 3, dtype=torch.bool)),
        r"subset_mask must have shape \[3, 2\] \(\[S, K\] with K = len\(xs\)\), got \[3, 3\]",
    ),
    (
        "subset_mask rank",
        lambda: early(subset_mask=torch.ones(2, dtype=torch.bool)),
        r"subset_mask must be 2-d \[S, K\] with K = 2, got shape \[2\]",
    ),
    (
        "sample_mask dtype",
        lambda: early(sample_mask=torch.ones(B, 2, dtype=torch.uint8)),
        r"sample_mask must be a bool tensor, got Byte",
    ),
    (
        "sample_mask rows",
        lambda: early(sample_mask=torch.ones(B + 2, 2, dtype=torch.bool)),
        r"sample_mask must have shape \[4, 2\] \(\[B, K\]: B rows of xs, K = len\(xs\)\), "
        r"got \[6, 2\]",
    ),
    (
        "activation",
        lambda: early(activation="gelu"),
        r'activation must be "relu" or "none", got "gelu"',
    ),
    (
        "weights count",
        lambda: late(weights=[torch.randn(2, 3)]),
        r"weights must hold K = 2 tensors \(one per modality\), got 1",
    ),
    (
        "weights width",
        lambda: late(weights=[torch.randn(2, 3), torch.randn(4, 6)]),
        r"weights\[1\]'s last dim must be d_1 = 5 \(the width of xs\[1\]\), got shape \[4, 6\]",
    ),
    (
        "weights rank mix",
        lambda: late(weights=[torch.randn(2, 3), torch.randn(1, 4, 5)]),
        r"weights\[1\] must be 2-d like weights\[0\], got shape \[1, 4, 5\]",
    ),
    (
        "3-d weights without subsets",
        lambda: late(weights=[torch.randn(2, 2, 3), torch.randn(2, 4, 5)]),
        r"3-d weights \[S, H_k, d_k\] need subset_mask \[S, K\]",
    ),
    (
        "biases count",
        lambda: late(biases=[torch.randn(2)]),
        r"biases must hold K = 2 tensors \(one per modality\), got 1",
    ),
    (
        "biases shape",
        lambda: late(biases=[torch.randn(2), torch.randn(5)]),
        r"biases\[1\] must have shape \[4\] \(weights\[k\]'s shape without its last dim\), "
        r"got \[5\]",
    ),
    (
        # Two errors: the plan's order decides which one is reported, on every device.
        "weight width and subset_mask dtype",
        lambda: early(weight=torch.randn(H, 9), subset_mask=torch.ones(3, 2)),
        r"weight's last dim must be D = sum of modality dims = 8, got shape \[6, 9\]",
    ),
    (
        "weights width and sample_mask rows",
        lambda: late(weights=[torch.randn(2, 3), torch.randn(4, 6)],
                     sample_mask=torch.ones(B + 1, 2, dtype=torch.bool)),
        r"sample_mask must have shape \[4, 2\]",
    ),
    (
        "backward grad_out shape",
        lambda: backward("concat_project", grad_shape=[B, H + 1]),
        r"concat_project_backward: grad_out must have shape \[4, 6\] \(the output's shape\), "
        r"got \[4, 7\]",
    ),
    (
        "backward out dtype",
        lambda: backward("project_concat", out_dtype=torch.float64),
        r"project_concat_backward: out has dtype Double, expected Float",
    ),
    (
        "backward xs rows",
        lambda: backward("project_concat", inputs=[torch.randn(B, 3), torch.randn(B + 1, 5)]),
        r"project_concat: xs\[1\] has 5 rows, expected B = 4",
    ),
]


def backward(op, grad_shape=None, out_dtype=torch.float32, inputs=None):
    """A call of a backward op; the grad_out and out of a valid forward unless told."""
    x = xs() if inputs is None else inputs
    if op == "concat_project":
        weight, width = torch.randn(H, sum(DIMS)), H
    else:
        weight, width = [torch.randn(2, 3), torch.randn(4, 5)], 6
    grad = torch.randn(*(grad_shape or [B, width]))
    out = torch.randn(B, width, dtype=out_dtype)
    fn = getattr(torch.ops.mmkernels, op + "_backward")
    return fn(grad, out, x, weight, None, None, "relu", [True, True, True])


@pytest.mark.parametrize("call,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_argument_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def raised(call, device: str) -> tuple[type, str]:
    """The exception a case raises with every tensor it builds on `device`."""
    with torch.device(device):
        try:
            call()
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            return type(e), str(e)
    raise AssertionError(f"no error on {device}")


OTHER_DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", OTHER_DEVICES)
@pytest.mark.parametrize("call", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_every_device_raises_the_same_error(call, device):
    assert raised(call, device) == raised(call, "cpu")


def test_float16_is_refused_on_cpu():
    with pytest.raises(ValueError, match=r"xs\[0\] must be float32, float64 or bfloat16, got Half"
                                         r" \(float16 is supported on CUDA only\)"):
        early(xs=xs(torch.float16), weight=torch.randn(H, 8, dtype=torch.float16))


def test_float16_passes_the_meta_kernels():
    """A meta tensor stands for no device; float16 is valid on CUDA, so meta accepts it."""
    with torch.device("meta"):
        out = early(xs=xs(torch.float16), weight=torch.randn(H, 8, dtype=torch.float16))
    assert out.shape == (B, H) and out.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch_names_the_argument():
    with pytest.raises(ValueError, match=r"weight is on cuda:0, expected cpu"):
        early(weight=torch.randn(H, 8, device="cuda"))


def test_backward_op_checks_grad_shape():
    x = xs()
    w = torch.randn(H, 8)
    out = mmkernels.concat_project(x, w)
    with pytest.raises(ValueError, match=r"grad_out must have shape \[4, 6\]"):
        torch.ops.mmkernels.concat_project_backward(
            torch.randn(4, 7), out, x, w, None, None, "relu", [True, True, True]
        )
