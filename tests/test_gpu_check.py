"""benchmarks/gpu_check.sh: valid bash, and on a machine without CUDA it says so and exits 2 after recording the
machine (the GPU run itself happens only on a lent GPU; benchmarks/RESULTS.md records it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("bash") is None, reason="checks the no-GPU path")
def test_gpu_check_without_cuda_reports_and_exits_2(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels")}
    env.pop("GPU_CHECK_ALLOW_CPU", None)
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "no CUDA device" in summary and f"results: {tmp_path}" in summary
    machine = (tmp_path / "machine.txt").read_text()
    assert f"torch {torch.__version__}" in machine and "available False" in machine
    assert not (tmp_path / "kernels.txt").exists()  # nothing was benchmarked on the CPU
