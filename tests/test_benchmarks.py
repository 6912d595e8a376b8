"""Every benchmark runs in its smoke mode (a few iterations, no timing checked), so that none of them rots.

A benchmark is a script in benchmarks/ that takes `--smoke` and `--json PATH` (see benchmarks/README.md).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Scripts only: `_*.py` are helpers the benchmarks import.
BENCHMARKS = sorted(path for path in (ROOT / "benchmarks").glob("*.py") if not path.name.startswith("_"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=[path.name for path in BENCHMARKS])
def test_benchmark_smoke(script: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--json", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    results = json.loads(report.read_text())["results"]
    assert results, f"{script.name} wrote no results"
