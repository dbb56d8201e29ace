"""The GPU check script runs end to end in its dry-run mode (no GPU, no build, quick CPU benchmarks)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.kernels


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_check: 0 step(s) failed" in proc.stdout
    record = json.loads((tmp_path / "commit_tokens.json").read_text())
    assert record["benchmark"] == "commit_tokens" and record["rows"]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("commit_tokens")]
    assert summary and all("speedup=" in line for line in summary), proc.stdout
