"""Every example runs, as a user would run it, so that none of them rots."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _run(script: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(script: Path) -> None:
    assert _run(script).strip()


def test_framework_demo_tells_its_story() -> None:
    output = _run(ROOT / "examples" / "framework_demo.py")
    for expected in (
        "(CHAIN) BasicModel()",
        "(CHAIN) HiddenLayer()",
        "(SUM) SingleLoraAdapter()",
        "after eject: the original Linears are back in place and the output is exactly the same",
    ):
        assert expected in output
    # The Context API's seed example: 4 from `set_context`, plus 2, printed by a layer deep in the tree.
    assert output.rstrip().endswith("m() prints: 6")
