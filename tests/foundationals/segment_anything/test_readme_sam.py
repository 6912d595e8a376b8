"""The README's Segment Anything section word for word, on a toy SAM: `segment_anything`'s reference at toy sizes
saved as `sam_vit_b_01ec64.pth` (and its HQ-SAM twin as `sam_hq_vit_b.pth`), converted by the section's commands."""

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sam_references import build_hq_reference, build_reference, save_reference

from refiners.converters.cli import main

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_segment_anything_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    section = text[text.index("## Segment Anything\n") : text.index("## Import paths")]
    commands = re.findall(r"`uv run (refiners-convert [\w-]+ --from \S+ --to \S+)`", section)
    assert [command.split()[1] for command in commands] == ["sam", "hq-sam"]
    monkeypatch.chdir(tmp_path)
    reference = build_reference()
    save_reference(reference, tmp_path / "sam_vit_b_01ec64.pth")
    save_reference(build_hq_reference(reference), tmp_path / "sam_hq_vit_b.pth")
    for command in commands:
        assert main(command.split()[1:]) == 0
    array = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "photo.jpg", quality=95)
    namespace: dict[str, Any] = {"__name__": "readme"}
    blocks = re.findall(r"^```py\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 2
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md, Segment Anything block {index}", "exec"), namespace)
    assert namespace["masks"].shape == (1, 1, 180, 240) and namespace["masks"].dtype == torch.bool
    assert namespace["hq_masks"].shape == (1, 1, 180, 240)
    assert all(mask.mask.shape == (180, 240) for mask in namespace["everything"])
