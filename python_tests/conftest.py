"""Hypothesis runs derandomised in CI (reproducible failures) and randomised elsewhere."""

import os
import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # the tests' shared helpers (oracle.py)

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
