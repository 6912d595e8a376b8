"""`refiners-convert sam` and `hq-sam` from the command line: sizes read off the checkpoint, the model recorded in
the file, `.pth` and `.safetensors` sources, and one-line errors for keys that do not fit (nothing written)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sam_references import TINY, build_hq_reference, build_reference, save_reference
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from refiners.converters.cli import main
from refiners.converters.segment_anything import build_original_sam, original_sam_arguments
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors
from refiners.foundationals.segment_anything import SegmentAnything, SegmentAnythingB, SegmentAnythingH


@pytest.fixture(scope="module")
def reference() -> Sam:
    return build_reference(TINY)


def test_sam_command_writes_the_model_it_records(
    reference: Sam, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save_reference(reference, tmp_path / "sam.pth")
    assert main(["sam", "--from", str(checkpoint), "--to", str(tmp_path / "sam.safetensors")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "sam.safetensors")
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(tmp_path / "sam.safetensors"))
    assert config == ModelConfig("SegmentAnything", SegmentAnything(**TINY.arguments, device="meta")._arguments())
    sam = SegmentAnything.from_safetensors(tmp_path / "sam.safetensors")
    assert sam.num_layers == 2 and sam.global_attention_indices == (1,)
    # A .safetensors source holding the same tensors converts to the same file.
    save_file(
        {key: tensor.contiguous() for key, tensor in reference.state_dict().items()}, tmp_path / "sam_st.safetensors"
    )
    assert (
        main(["sam", "--from", str(tmp_path / "sam_st.safetensors"), "--to", str(tmp_path / "again.safetensors")]) == 0
    )
    first, second = (
        load_from_safetensors(tmp_path / "sam.safetensors"),
        load_from_safetensors(tmp_path / "again.safetensors"),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def test_unused_keys_are_a_one_line_error(reference: Sam, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = reference.state_dict() | {"mask_decoder.extra.weight": torch.zeros(2)}
    torch.save(state, tmp_path / "extra.pth")
    assert main(["sam", "--from", str(tmp_path / "extra.pth"), "--to", str(tmp_path / "out.safetensors")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "mask_decoder.extra.weight" in error and error.startswith("refiners-convert: error:")
    assert not (tmp_path / "out.safetensors").exists()


def test_hq_sam_checkpoints_go_to_their_command(
    reference: Sam, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save_reference(build_hq_reference(reference), tmp_path / "sam_hq.pth")
    assert main(["sam", "--from", str(checkpoint), "--to", str(tmp_path / "sam.safetensors")]) == 1
    assert "refiners-convert hq-sam" in capsys.readouterr().err
    assert main(["hq-sam", "--from", str(checkpoint), "--to", str(tmp_path / "hq.safetensors")]) == 0
    keys = set(load_from_safetensors(tmp_path / "hq.safetensors"))
    assert "HQTokenAdapter.HQToken.weight" in keys and all(
        key.startswith(("HQTokenAdapter.", "HQMaskPrediction.")) for key in keys
    )
    plain = save_reference(reference, tmp_path / "sam.pth")
    assert main(["hq-sam", "--from", str(plain), "--to", str(tmp_path / "hq2.safetensors")]) == 1
    assert "not an HQ-SAM checkpoint" in capsys.readouterr().err


def test_real_sizes_are_read_as_their_presets() -> None:
    with torch.device("meta"):
        vit_b, vit_h = sam_model_registry["vit_b"](), sam_model_registry["vit_h"]()
    assert type(build_original_sam(vit_b.state_dict())) is SegmentAnythingB
    assert type(build_original_sam(vit_h.state_dict())) is SegmentAnythingH
    assert original_sam_arguments(vit_b.state_dict())["global_attention_indices"] == (2, 5, 8, 11)
