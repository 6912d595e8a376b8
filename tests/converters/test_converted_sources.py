"""Converting what `refiners-convert` already converted says so, and how to load it instead.

The toy Stable Diffusion 1.x (`refiners.converters.toy`, saved as diffusers saves it) is converted with
`refiners-convert sd1`, and its output fed back: as a folder to `sd1` and the component commands, and file by file.
The toy's own diffusers and transformers files are not taken for refiners weights.
"""

from pathlib import Path

import pytest
import torch

from refiners.converters.cli import main
from refiners.converters.sources import SingleFile, SourceError, open_source
from refiners.converters.stable_diffusion import convert_stable_diffusion_1
from refiners.converters.toy import save_toy_stable_diffusion_1
from refiners.fluxion.utils import save_to_safetensors

FILES = "autoencoder.safetensors, clip_text.safetensors, unet.safetensors"
MODELS = "SD1UNet, SD1Autoencoder, CLIPTextEncoderL"


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_toy_stable_diffusion_1(tmp_path_factory.mktemp("toy") / "diffusers")


@pytest.fixture(scope="module")
def converted(toy_folder: Path) -> Path:
    folder = toy_folder.parent / "converted"
    assert main(["sd1", "--from", str(toy_folder), "--to", str(folder)]) == 0
    return folder


def refused(capsys: pytest.CaptureFixture[str], *arguments: str | Path) -> str:
    """The one line `refiners-convert` prints on stderr when it exits with 1, having written nothing."""
    capsys.readouterr()
    assert main([*map(str, arguments)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    return err.removeprefix("refiners-convert: error: ").removesuffix("\n")


def test_a_converted_folder_is_refused(converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = (
        f"{converted} already holds refiners weights ({FILES}): load it with "
        f'StableDiffusion_1.from_folder("{converted}") instead of converting it again'
    )
    dest = tmp_path / "again"
    assert refused(capsys, "sd1", "--from", converted, "--to", dest) == expected
    for command in ("unet", "autoencoder", "clip-text"):
        assert refused(capsys, command, "--from", converted, "--to", dest / f"{command}.safetensors") == expected
    assert not dest.exists()
    with pytest.raises(SourceError) as error:
        convert_stable_diffusion_1(converted, dest)
    assert str(error.value) == expected


def test_a_converted_file_is_refused(converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "again.safetensors"
    for command, name, model in [
        ("unet", "unet.safetensors", "SD1UNet"),
        ("autoencoder", "autoencoder.safetensors", "SD1Autoencoder"),
        ("clip-text", "clip_text.safetensors", "CLIPTextEncoderL"),
    ]:
        file = converted / name
        assert refused(capsys, command, "--from", file, "--to", dest) == (
            f'{file} already holds refiners weights: load it with {model}(...).load_from_safetensors("{file}") '
            "instead of converting it again"
        )
    file = converted / "unet.safetensors"
    assert refused(capsys, "sd1", "--from", file, "--to", tmp_path / "folder") == (
        f'{file} already holds refiners weights: load it with the load_from_safetensors("{file}") of its model '
        f"({MODELS}) instead of converting it again"
    )
    assert not dest.exists() and not (tmp_path / "folder").exists()


def test_diffusers_transformers_and_lora_files_are_not_taken_for_refiners_weights(
    toy_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = sorted(toy_folder.glob("*/*.safetensors"))
    assert [file.relative_to(toy_folder).as_posix() for file in files] == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    for file in files:
        assert open_source(file) == SingleFile(file)
    # A folder of LoRAs (kohya's layout, and refiners' own: dotted diffusers names) is not a converted model.
    loras = tmp_path / "loras"
    loras.mkdir()
    module = "mid_block.attentions.0.proj_in"
    pair = {"lora_down.weight": torch.zeros(2, 8), "lora_up.weight": torch.zeros(8, 2)}
    save_to_safetensors(
        loras / "kohya.safetensors", {f"lora_unet_{module.replace('.', '_')}.{k}": v for k, v in pair.items()}
    )
    save_to_safetensors(loras / "refiners.safetensors", {f"unet.{module}.{k}": v for k, v in pair.items()})
    assert refused(capsys, "unet", "--from", loras, "--to", tmp_path / "unet.safetensors").startswith(
        f"{loras} is not a diffusers folder: it has neither model_index.json"
    )
