"""scripts/gpu_check.sh (issue 16) fits the device budget: every stage runs under `timeout`
with its predicted time stated, the limits (plus each timeout's grace) sum to at most 7
minutes, it builds sm_90 only with 16 jobs, and its test stage runs CUDA test files only
(each skipped without a GPU, so none of them is a CPU test run again)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _stages(text: str) -> list[tuple[str, int, int, str]]:
    """(name, predicted s, limit s, the rest of the command) of each `stage` call."""
    joined = text.replace("\\\n", " ")
    return [(m[1], int(m[2]), int(m[3]), m[4])
            for m in re.finditer(r"^stage (\w+) (\d+) (\d+) (.*)$", joined, flags=re.M)]


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_stage_is_timed_and_the_whole_fits_seven_minutes() -> None:
    text = SCRIPT.read_text()
    stages = _stages(text)
    assert [s[0] for s in stages] == ["build", "tests", "bench"]
    grace = int(re.search(r"timeout --kill-after=(\d+)", text)[1])
    assert sum(limit + grace for _, _, limit, _ in stages) <= 7 * 60 - 10
    for name, predicted, limit, _ in stages:
        assert 0 < predicted < limit, name
        stated = rf"\d\. {name}\s.*?predicted\s+~{predicted} s\s+limit {limit} s"
        assert re.search(stated, text, flags=re.S), f"{name}: its predicted time and limit"


def test_builds_sm90_only_with_16_jobs_in_place() -> None:
    text = SCRIPT.read_text()
    assert "TORCH_CUDA_ARCH_LIST=9.0 " in text and "MAX_JOBS=16" in text
    build = dict((s[0], s[3]) for s in _stages(text))["build"]
    assert "build_ext --inplace" in build


def test_runs_cuda_tests_only() -> None:
    tests = dict((s[0], s[3]) for s in _stages(SCRIPT.read_text()))["tests"]
    files = re.findall(r"tests/\S+\.py", tests)
    assert files
    for f in files:
        source = (ROOT / f).read_text()
        assert "torch.cuda.is_available()" in source and "pytestmark" in source, f
