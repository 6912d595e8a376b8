"""`refiners-convert controlnet`: diffusers' ControlNetModel folders and files, lllyasviel's layout, SDXL's.

The ControlNets are diffusers' `ControlNetModel.from_unet` of the toy UNets (tests/toy_models.py, tests/toy_sdxl.py),
with random weights. The lllyasviel-layout files are written from them by the correspondence of the original code
(`control_model.` + `input_blocks`..., `input_hint_block`, `zero_convs`, `middle_block_out`), which diffusers' own
reader (`ControlNetModel.from_single_file`) reads back into the same tensors; converted, they equal the folder's
conversion, tensor for tensor.
"""

from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers.models.controlnets.controlnet import ControlNetModel
from toy_models import build_reference
from toy_sdxl import build_pipeline

from refiners.adapters.controlnet import SD1Controlnet, SD1ControlnetAdapter, SDXLControlnet
from refiners.converters.cli import main
from refiners.converters.controlnet import convert_controlnet, original_controlnet_renaming
from refiners.converters.engine import ConversionError
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY
from refiners.foundationals.latent_diffusion.unet_names import diffusers_unet_modules


@pytest.fixture(scope="module")
def sd1_controlnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[ControlNetModel, Path]:
    reference = build_reference()
    controlnet = ControlNetModel.from_unet(reference.unet).eval()
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))  # no two tensors alike, zero convolutions included
    folder = tmp_path_factory.mktemp("controlnet") / "diffusers"
    controlnet.save_pretrained(folder)
    return controlnet, folder


def write_original(controlnet: ControlNetModel, model: SD1Controlnet, path: Path, prefix: str) -> None:
    renaming = original_controlnet_renaming(model)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in controlnet.state_dict().items():
        original = renaming.to_original(key)
        assert original is not None, key
        tensors[prefix + original] = tensor.contiguous()
    if path.suffix == ".safetensors":
        save_to_safetensors(path, tensors)
    else:
        torch.save(tensors, path)


def test_the_folder_converts_with_its_model_recorded(
    sd1_controlnet: tuple[ControlNetModel, Path], tmp_path: Path
) -> None:
    _, folder = sd1_controlnet
    assert main(["controlnet", "--from", str(folder), "--to", str(tmp_path / "canny.safetensors")]) == 0
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(tmp_path / "canny.safetensors"))
    assert config is not None and config.class_name == "SD1Controlnet"
    assert config.arguments["channels"] == TINY.unet.arguments["channels"]
    unet = TINY.unet.build((SD1UNet,))
    adapter = SD1ControlnetAdapter(unet, weights=tmp_path / "canny.safetensors")
    assert isinstance(adapter.controlnet, SD1Controlnet)


@pytest.mark.parametrize(("name", "prefix"), [("control_toy.pth", "control_model."), ("control_toy.safetensors", "")])
def test_the_original_layout_converts_as_the_folder(
    sd1_controlnet: tuple[ControlNetModel, Path], tmp_path: Path, name: str, prefix: str
) -> None:
    controlnet, folder = sd1_controlnet
    expected, config = convert_controlnet(folder, tmp_path / "from-folder.safetensors")
    model = config.build((SD1Controlnet,), device="meta")
    original = tmp_path / name
    write_original(controlnet, model, original, prefix)
    if original.suffix == ".safetensors":  # diffusers reads the file back into the same tensors
        read = ControlNetModel.from_single_file(str(original), config=str(folder), local_files_only=True).state_dict()
        assert read.keys() == controlnet.state_dict().keys()
        assert all(torch.equal(read[key], tensor) for key, tensor in controlnet.state_dict().items())
    # Its sizes read from the tensors, with SD1's rule for heads; the toy's are given by its config.
    converted, _ = convert_controlnet(original, tmp_path / "from-file.safetensors", config=dict(controlnet.config))
    actual, wanted = load_from_safetensors(converted), load_from_safetensors(expected)
    assert actual.keys() == wanted.keys() and all(torch.equal(actual[key], wanted[key]) for key in wanted)


def test_unknown_keys_are_listed_on_one_line(sd1_controlnet: tuple[ControlNetModel, Path], tmp_path: Path) -> None:
    controlnet, _ = sd1_controlnet
    tensors = {**controlnet.state_dict(), "controlnet_extra_block.weight": torch.zeros(1)}
    save_to_safetensors(tmp_path / "extra.safetensors", {k: v.contiguous() for k, v in tensors.items()})
    with pytest.raises(ConversionError) as error:
        convert_controlnet(tmp_path / "extra.safetensors", tmp_path / "out.safetensors", config=dict(controlnet.config))
    assert "\n" not in str(error.value) and "controlnet_extra_block.weight" in str(error.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_an_sdxl_controlnet_file_converts(tmp_path: Path) -> None:
    controlnet = ControlNetModel.from_unet(build_pipeline().unet).eval()
    controlnet.save_pretrained(tmp_path / "diffusers")
    file = tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors"
    (tmp_path / "config.json").write_text((tmp_path / "diffusers" / "config.json").read_text())
    command = ["controlnet", "--from", str(file), "--to", str(tmp_path / "sdxl.safetensors")]
    assert main([*command, "--config", str(tmp_path / "config.json")]) == 0
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(tmp_path / "sdxl.safetensors"))
    assert config is not None
    model = config.build((SDXLControlnet,), device="meta")
    assert model.state_dict().keys() == load_from_safetensors(tmp_path / "sdxl.safetensors").keys()


def test_a_hub_id_downloads_the_folder(
    sd1_controlnet: tuple[ControlNetModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub id that is not a local path is downloaded (config and weights only), then read as a folder."""
    _, folder = sd1_controlnet
    asked: list[tuple[str, list[str]]] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        asked.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    command = ["controlnet", "--from", "lllyasviel/sd-controlnet-canny", "--to", "canny.safetensors"]
    assert main(command) == 0
    assert asked == [("lllyasviel/sd-controlnet-canny", ["config.json", "diffusion_pytorch_model.safetensors"])]
    expected, _ = convert_controlnet(folder, tmp_path / "from-folder.safetensors")
    actual, wanted = load_from_safetensors(tmp_path / "canny.safetensors"), load_from_safetensors(expected)
    assert all(torch.equal(actual[key], wanted[key]) for key in wanted)


def test_the_unet_keeps_its_diffusers_names_with_a_controlnet_injected() -> None:
    """LoRA loaders and converters name the UNet's layers by structure: an injected ControlNet changes none of them."""
    unet = TINY.unet.build((SD1UNet,), device="meta")
    before = {name: id(module) for name, module in diffusers_unet_modules(unet).items()}
    controlnet = SD1Controlnet(**{k: v for k, v in TINY.unet.arguments.items() if k != "in_channels"}, device="meta")
    adapter = SD1ControlnetAdapter(unet, controlnet=controlnet).inject()
    assert {name: id(module) for name, module in diffusers_unet_modules(unet).items()} == before
    adapter.eject()
