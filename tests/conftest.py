"""Hypothesis runs derandomised in CI (reproducible failures) and randomised elsewhere."""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # the tests' shared helpers (oracle.py)

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The CLI sets torch's (process-wide) thread count; give later tests back their own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
