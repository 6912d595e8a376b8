"""`refiners-convert dinov2` on both layouts of DINOv2 checkpoints: facebook's original `.pth` and transformers'
folders, each converted and compared with transformers' tokens.

facebook's files are written from a transformers model by `dinov2_references.facebook_state_dict` (no download);
the first tests prove that file right with an independent reader of facebook's layout, timm's DINOv2 ViTs
(`checkpoint_filter_fn`), which must compute transformers' tokens from it.
"""

import json
import re
import shlex
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from dinov2_references import Reference, facebook_state_dict, random_reference, save_facebook, tokens
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from transformers import Dinov2Config, Dinov2Model

from refiners.converters.cli import main as refiners_convert
from refiners.converters.dinov2 import convert_dinov2, convert_dinov2_weights, open_dinov2_source
from refiners.fluxion.utils import save_to_safetensors
from refiners.foundationals.dinov2 import DINOv2_small, ViT

ROOT = Path(__file__).resolve().parents[2]

# Reduced depth and a 4 x 4 grid of learned positions (56 pixels), so that timm runs at its native size.
SMALL_GRID = {"num_hidden_layers": 2, "image_size": 56}
TIMM_MODELS = {
    "small": "vit_small_patch14_dinov2",
    "small_reg": "vit_small_patch14_reg4_dinov2",
    "giant": "vit_giant_patch14_dinov2",
}


def _scale_tolerance(expected: torch.Tensor) -> float:
    return 1e-4 * expected.abs().max().item()


@pytest.fixture(scope="module", params=list(TIMM_MODELS))
def reduced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Reference, Path]:
    """A reduced reference (2 layers, 56 pixels), its transformers folder and its facebook `.pth`."""
    name: str = request.param
    reference = random_reference(name, **SMALL_GRID)
    folder = tmp_path_factory.mktemp(f"dinov2_{name}")
    reference.save_pretrained(folder / "transformers")
    save_facebook(folder / "transformers", folder / "facebook.pth")
    return name, reference, folder


def test_the_facebook_file_is_what_timm_reads_as_transformers_model(
    reduced: tuple[str, Reference, Path],
) -> None:
    name, reference, folder = reduced
    vit = timm.create_model(TIMM_MODELS[name], pretrained=False, img_size=56, depth=2, num_classes=0).eval()
    assert isinstance(vit, VisionTransformer)
    state_dict = torch.load(folder / "facebook.pth", weights_only=True)
    vit.load_state_dict(checkpoint_filter_fn(state_dict, vit), strict=True)
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    expected = tokens(reference, images)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images), expected, atol=_scale_tolerance(expected), rtol=0)


def test_both_layouts_convert_to_the_same_weights(reduced: tuple[str, Reference, Path]) -> None:
    _, reference, folder = reduced
    from_facebook = convert_dinov2_weights(open_dinov2_source(folder / "facebook.pth"))
    from_transformers = convert_dinov2_weights(open_dinov2_source(folder / "transformers"))
    assert (from_facebook.layout, from_transformers.layout) == ("facebook", "transformers")
    assert from_facebook.config == from_transformers.config
    assert from_facebook.tensors.keys() == from_transformers.tensors.keys()
    for key, tensor in from_facebook.tensors.items():
        assert torch.equal(tensor, from_transformers.tensors[key]), key
    path, _ = convert_dinov2(folder / "facebook.pth", folder / "from_facebook.safetensors")
    ours = ViT.from_safetensors(path)
    for height, width in [(56, 56), (98, 70)]:
        images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
        expected = tokens(reference, images)
        with torch.no_grad():
            torch.testing.assert_close(ours(images), expected, atol=_scale_tolerance(expected), rtol=0)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Reference, Path]:
    """DINOv2-small's real config, random weights: a transformers folder and a facebook `.pth`."""
    reference = random_reference("small")
    folder = tmp_path_factory.mktemp("dinov2_small_files")
    reference.save_pretrained(folder / "dinov2-small")
    save_facebook(folder / "dinov2-small", folder / "dinov2_vits14_pretrain.pth")
    return reference, folder


def test_the_command_converts_facebooks_file(small_files: tuple[Reference, Path], tmp_path: Path) -> None:
    reference, folder = small_files
    dest = tmp_path / "out" / "dinov2_small.safetensors"
    assert refiners_convert(["dinov2", "--from", str(folder / "dinov2_vits14_pretrain.pth"), "--to", str(dest)]) == 0
    ours = ViT.from_safetensors(dest)
    assert type(ours) is DINOv2_small
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    expected = tokens(reference, images)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), expected, atol=_scale_tolerance(expected), rtol=0)


def test_dtype_casts_the_weights(small_files: tuple[Reference, Path], tmp_path: Path) -> None:
    _, folder = small_files
    dest = tmp_path / "half.safetensors"
    assert (
        refiners_convert(["dinov2", "--from", str(folder / "dinov2-small"), "--to", str(dest), "--dtype", "float16"])
        == 0
    )
    assert {tensor.dtype for tensor in load_file(dest).values()} == {torch.float16}


def test_an_unused_tensor_is_a_one_line_error(
    small_files: tuple[Reference, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, folder = small_files
    state_dict = facebook_state_dict(folder / "dinov2-small")
    state_dict["head.weight"] = torch.zeros(1000, 384)
    del state_dict["blocks.3.ls2.gamma"]
    torch.save(state_dict, tmp_path / "with_head.pth")
    dest = tmp_path / "never.safetensors"
    assert refiners_convert(["dinov2", "--from", str(tmp_path / "with_head.pth"), "--to", str(dest)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        error.startswith("refiners-convert: error: ")
        and "1 tensors that DINOv2_small() does not use: head.weight" in error
    )
    assert not dest.exists()
    del state_dict["head.weight"]
    torch.save(state_dict, tmp_path / "without_gamma.pth")
    assert refiners_convert(["dinov2", "--from", str(tmp_path / "without_gamma.pth"), "--to", str(dest)]) == 1
    assert "lacks 1 tensors that DINOv2_small() needs: blocks.3.ls2.gamma" in capsys.readouterr().err
    assert not dest.exists()


def test_other_sources_are_refused_with_what_to_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=1)
    Dinov2Model(config).save_pretrained(tmp_path / "backbone")
    other = json.loads((tmp_path / "backbone" / "config.json").read_text()) | {"architectures": ["Dinov2Backbone"]}
    (tmp_path / "backbone" / "config.json").write_text(json.dumps(other))
    dest = str(tmp_path / "out.safetensors")
    assert refiners_convert(["dinov2", "--from", str(tmp_path / "backbone"), "--to", dest]) == 1
    assert "holds a Dinov2Backbone, not a Dinov2Model or Dinov2WithRegistersModel or" in capsys.readouterr().err
    Dinov2Model(config).save_pretrained(tmp_path / "edited")
    edited = json.loads((tmp_path / "edited" / "config.json").read_text()) | {"num_hidden_layers": 2}
    (tmp_path / "edited" / "config.json").write_text(json.dumps(edited))
    assert refiners_convert(["dinov2", "--from", str(tmp_path / "edited"), "--to", dest]) == 1
    assert "config has num_hidden_layers=2 but its weights (or a DINOv2 ViT) have 1" in capsys.readouterr().err
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    assert refiners_convert(["dinov2", "--from", str(tmp_path / "other.pth"), "--to", dest]) == 1
    assert "is not a DINOv2 checkpoint" in capsys.readouterr().err
    assert refiners_convert(["dinov2", "--from", str(tmp_path / "other.pth"), "--to", str(tmp_path / "x.pt")]) == 1
    assert "the destination must be a .safetensors file" in capsys.readouterr().err


def test_a_converted_file_is_refused_and_a_file_without_record_does_not_load(
    small_files: tuple[Reference, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, folder = small_files
    converted = tmp_path / "dinov2_small.safetensors"
    assert refiners_convert(["dinov2", "--from", str(folder / "dinov2-small"), "--to", str(converted)]) == 0
    assert refiners_convert(["dinov2", "--from", str(converted), "--to", str(tmp_path / "again.safetensors")]) == 1
    assert (
        "already holds refiners weights (written by refiners-convert dinov2): load it with ViT.from_safetensors("
        in (capsys.readouterr().err)
    )
    save_to_safetensors(tmp_path / "bare.safetensors", load_file(converted))
    with pytest.raises(ValueError, match="records no model"):
        ViT.from_safetensors(tmp_path / "bare.safetensors")


def test_a_hub_id_downloads_the_config_and_weights_only(
    small_files: tuple[Reference, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, folder = small_files
    requests: list[tuple[str, list[str]]] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        requests.append((repo_id, allow_patterns))
        return str(folder / "dinov2-small")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    source = open_dinov2_source("facebook/dinov2-small")
    assert source.layout == "transformers" and source.config is not None
    assert requests == [
        (
            "facebook/dinov2-small",
            ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
        )
    ]


def _readme_dinov2_commands() -> list[str]:
    blocks = re.findall(r"^```bash\n(.*?)^```$", (ROOT / "README.md").read_text(), flags=re.MULTILINE | re.DOTALL)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("uv run refiners-convert dinov2")]


def test_the_readme_dinov2_commands_run(
    small_files: tuple[Reference, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, folder = small_files
    commands = _readme_dinov2_commands()
    assert len(commands) == 2, commands
    # The README's sources, laid out where the commands look: a local folder is read before the Hub.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "facebook").mkdir()
    (tmp_path / "facebook" / "dinov2-small").symlink_to(folder / "dinov2-small")
    (tmp_path / "dinov2_vits14_pretrain.pth").symlink_to(folder / "dinov2_vits14_pretrain.pth")
    for command in commands:
        arguments = shlex.split(command)
        assert arguments[:3] == ["uv", "run", "refiners-convert"]
        assert refiners_convert(arguments[3:]) == 0, command
        ours = ViT.from_safetensors(arguments[arguments.index("--to") + 1])
        images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
        expected = tokens(reference, images)
        with torch.no_grad():
            torch.testing.assert_close(ours(images), expected, atol=_scale_tolerance(expected), rtol=0)
