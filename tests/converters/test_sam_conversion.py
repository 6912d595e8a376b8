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


def test_check_compares_with_segment_anything(
    reference: Sam, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save_reference(reference, tmp_path / "sam.pth")
    assert main(["sam", "--from", str(checkpoint), "--to", str(tmp_path / "sam.safetensors"), "--check"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "max abs difference" in line]
    assert [line.split(":")[1].strip() for line in lines] == ["image embedding", "masks"]
    assert all(line.endswith(": ok") for line in lines)


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


def test_transformers_sam_model_folder(tmp_path: Path) -> None:
    """A transformers `SamModel` folder (save_pretrained) converts to a model that computes what SamModel computes."""
    from sam_references import randomize
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            global_attn_indexes=[1],
            window_size=6,
            image_size=128,
            output_channels=32,
            mlp_dim=128,
            num_pos_feats=16,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=128, patch_size=16),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, iou_head_hidden_dim=32),
    )
    reference = SamModel(config).eval()
    randomize(reference, seed=3)
    reference.save_pretrained(tmp_path / "sam-hf")
    assert main(["sam", "--from", str(tmp_path / "sam-hf"), "--to", str(tmp_path / "sam.safetensors")]) == 0
    sam = SegmentAnything.from_safetensors(tmp_path / "sam.safetensors")
    assert sam.num_layers == 2 and sam.global_attention_indices == (1,) and sam.window_size == 6
    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    points = torch.tensor([[[[40.0, 30.0], [90.0, 60.0]]]])
    with torch.no_grad():
        expected = reference.get_image_embeddings(pixels)
        actual = sam.image_encoder(pixels)
        outputs = reference(image_embeddings=expected, input_points=points, input_labels=torch.tensor([[[1, 0]]]))
        coordinates = torch.cat([points[0], torch.zeros(1, 1, 2)], dim=1)
        masks, iou = sam.decode(expected, coordinates, torch.tensor([[1, 0, -1]]))
    for ours, theirs in ((actual, expected), (masks, outputs.pred_masks[0]), (iou, outputs.iou_scores[0])):
        torch.testing.assert_close(ours, theirs, atol=1e-4 * theirs.abs().max().item(), rtol=0)
