"""The README's section on FreeU, self-attention guidance and MultiDiffusion, word for word but for the number of steps
(3 instead of 30, to keep the test short) and StyleAligned's size (128 pixels instead of 512: at the toy's native 64,
its middle block's map is a single token, whose AdaIN statistics are undefined), on the toy SD1 (converted as
`sd15/`)."""

import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from toy_sd1 import save_toy_sd1

HEADING = "## Guidance without training: FreeU, self-attention guidance, MultiDiffusion"


def test_the_readme_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index(HEADING)
    section = readme[start : readme.index("\n## ", start)]
    section, replaced = re.subn(r"(num_inference_steps=|set_num_inference_steps\()30\b", r"\g<1>3", section)
    assert replaced == 5
    section, replaced = re.subn(r"height=512, width=512", "height=128, width=128", section)
    assert replaced == 1
    _, converted = save_toy_sd1(tmp_path)
    (tmp_path / "sd15").symlink_to(converted, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    blocks = re.findall(r"^```py\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 6
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md, guidance block {index}", "exec"), namespace)
    assert Image.open(tmp_path / "freeu_cat.png").size == (64, 64)  # the toy's native size
    assert Image.open(tmp_path / "sag_cat.png").size == (64, 64)
    assert Image.open(tmp_path / "panorama.png").size == (256, 64)  # four windows wide
    assert Image.open(tmp_path / "lake.png").size == (64, 64)
    assert [Image.open(tmp_path / f"aligned_{name}.png").size for name in ("house", "cat", "tree")] == [(128, 128)] * 3
    assert Image.open(tmp_path / "reference_dog.png").size == (64, 64)
