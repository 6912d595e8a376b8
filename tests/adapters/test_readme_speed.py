"""The README's section on DeepCache and ToMe, word for word but for the number of steps (6 instead of 30, so that
DeepCache still reuses features), on the toy SD1 (converted as `sd15/`)."""

import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from toy_sd1 import save_toy_sd1

HEADING = "## Speed: DeepCache, ToMe, compile"


def test_the_readme_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index(HEADING)
    # DeepCache and ToMe come first; the subsections after them (### torch.compile) have tests of their own.
    section = re.split(r"\n##+ ", readme[start + len(HEADING) :])[0]
    section, replaced = re.subn(r"num_inference_steps=30\b", "num_inference_steps=6", section)
    assert replaced == 2
    _, converted = save_toy_sd1(tmp_path)
    (tmp_path / "sd15").symlink_to(converted, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    blocks = re.findall(r"^```py\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 2
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md, speed block {index}", "exec"), namespace)
    assert Image.open(tmp_path / "deepcache_cat.png").size == (64, 64)  # the toy's native size
    assert Image.open(tmp_path / "tome_cat.png").size == (64, 64)
