"""The fused bottleneck kernels (``unipelt.kernels.bottleneck``).

Their checks run in Triton's CPU interpreter, which must be switched on before Triton is imported: a pytest
process of its own runs ``tests/interpreted/fused_bottleneck_checks.py`` with ``TRITON_INTERPRET=1``. The
tests here check that run, and what this process (no GPU, no interpreter) does: the unfused path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unipelt
from conftest import benchmark_script, build, inputs, logits
from unipelt.kernels import bottleneck as kb

CHECKS = Path(__file__).parent / "interpreted" / "fused_bottleneck_checks.py"


def test_the_kernels_pass_their_checks_in_tritons_interpreter() -> None:
    if sys.platform != "linux":  # the test extra installs Triton on Linux, where CI runs
        pytest.importorskip("triton", reason="Triton (pip install triton) runs on Linux only")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-rfs",
                          str(CHECKS)],
                         env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 45, summary  # every check of the file ran
    assert not re.search(r"skipped|xfail|deselected", summary), summary


def test_without_a_gpu_or_the_interpreter_the_adapters_run_unfused(monkeypatch) -> None:
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    assert not kb.available(x, torch.bfloat16, 8, "relu")
    called = []
    monkeypatch.setattr(kb, "bottleneck_add", lambda *a, **k: called.append(1))
    model = unipelt.attach(build("bert"), {"method": "houlsby", "bottleneck": 8})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model, inputs("bert"))
    assert not called and torch.isfinite(out).all()


def test_the_kernel_benchmarks_say_they_need_a_gpu() -> None:
    with pytest.raises(SystemExit, match="needs a GPU with Triton"):
        benchmark_script("fused_bottleneck").main(["--bottlenecks", "8"])
    script = Path(__file__).parent.parent / "benchmarks" / "fused_model_check.py"
    run = subprocess.run([sys.executable, str(script), "houlsby"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "needs a GPU" in run.stderr
