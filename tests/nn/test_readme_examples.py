"""The README's examples of the modules and of training, run exactly as they are written there
(extracted from README.md), with checks of what they claim."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch._dynamo

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example(heading: str) -> str:
    """The first ```python block after the README heading that starts with ``heading``."""
    text = README.read_text()
    start = next((m.end() for m in re.finditer(r"^#+ .*$", text, re.M)
                  if m.group(0).lstrip("# ").startswith(heading)), None)
    assert start is not None, f"README.md has no section {heading!r}"
    block = re.search(r"^```python\n(.*?)^```", text[start:], re.M | re.S)
    assert block is not None, f"README.md's section {heading!r} has no python example"
    return block.group(1)


def run_example(heading: str) -> dict:
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(readme_example(heading), f"README.md ({heading})", "exec"), namespace)
    return namespace


def test_training_loop_example_with_missing_data_autocast_and_compile(capsys):
    torch._dynamo.reset()
    try:
        ns = run_example("Your own training loop")
    finally:
        torch._dynamo.reset()
    assert "loss" in capsys.readouterr().out
    present = ns["present"]
    assert all(torch.isnan(ns["feats"][k][~present[k]]).all() for k in ns["dims"])  # real NaN
    assert 0 < int(present["audio"].sum()) < ns["n"]
    assert ns["n"] % ns["loader"].batch_size != 0  # a partial last batch went through
    assert ns["logits"].dtype == torch.bfloat16
    assert math.isfinite(ns["loss"].item())
    assert all(torch.isfinite(p).all() for p in ns["model"].parameters()), \
        "NaN in absent rows reached a parameter"
    assert ns["accuracy"] > 0.8  # chance is 0.5; about 0.9 with these settings


def test_every_subset_example_trains_all_subsets_and_reports_their_quality(capsys):
    ns = run_example("Every subset at once")
    printed = capsys.readouterr().out
    result, model = ns["result"], ns["model"]
    assert result.epochs_run == 20 and result.history["train_loss"].shape == (20, 7)
    assert all(name in printed for name in model.subset_names)
