"""The how-to guide works: its example method (docs/snippets/new_method.py), written in the guide's words and
entered in the invariant matrix as the guide says, passes every test of the matrix on every family."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_guides_example_method_passes_the_invariant_matrix() -> None:
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_invariants.py", "-p", "no:warnings",
                          "-p", "no:cacheprovider", "-k", "ffn_scale"],
                         cwd=ROOT, env={**os.environ, "UNIPELT_GUIDE_METHOD": "1"}, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    families = 10  # tests/conftest.py FAMILIES: identity, one step, count, save/load, merge, detach, copy each
    assert passed and int(passed.group(1)) >= 6 * families, run.stdout[-2000:]
    assert not re.search(r"\d+ (failed|error)", run.stdout)
