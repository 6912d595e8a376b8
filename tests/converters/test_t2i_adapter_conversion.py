"""`refiners-convert t2i-adapter`: diffusers' T2IAdapter folders and files, TencentARC's layout, SDXL's.

The T2I-Adapters are diffusers' `T2IAdapter` of each kind at the toy UNets' widths, with random weights. The
TencentARC-layout files are written from them by the correspondence of diffusers' `convert_original_t2i_adapter.py`
(written out here, independently of the converter: `conv_in`, a flat `body.{k}` of `num_res_blocks` blocks per stage
for the full adapter; `body.{i}.in_conv`, `body.{i}.body.{j}`, `body.{i}.out_conv` for the light one); converted,
they equal the folder's conversion, tensor for tensor, and the converted encoders compute diffusers' features.
"""

import re
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from diffusers.models.adapter import T2IAdapter
from toy_models import UNET_CHANNELS

from refiners.adapters.t2i_adapter import FullT2IEncoder, FullT2IEncoderXL, LightT2IEncoder, SD1T2IAdapter, T2IEncoder
from refiners.converters.cli import main
from refiners.converters.engine import ConversionError
from refiners.converters.t2i_adapter import T2I_ENCODERS, convert_t2i_adapter
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY
from refiners.foundationals.latent_diffusion.unet_names import diffusers_unet_modules

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"adapter_type": "full_adapter", "channels": list(UNET_CHANNELS), "num_res_blocks": 2},
    "light": {"adapter_type": "light_adapter", "channels": list(UNET_CHANNELS[:3]), "num_res_blocks": 3},
    "full_xl": {"adapter_type": "full_adapter_xl", "channels": [32, 64, 96, 96], "downscale_factor": 16},
}
CLASSES: dict[str, type[T2IEncoder]] = {"full": FullT2IEncoder, "light": LightT2IEncoder, "full_xl": FullT2IEncoderXL}


def build(kind: str, folder: Path, seed: int = 0) -> T2IAdapter:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = T2IAdapter(**CONFIGS[kind]).eval()
    adapter.save_pretrained(folder)
    return adapter


def tencentarc_layout(adapter: T2IAdapter) -> dict[str, torch.Tensor]:
    """diffusers' names back to TencentARC's, as `convert_original_t2i_adapter.py` maps them the other way."""
    config: Any = adapter.config
    per_stage = config.num_res_blocks
    light = config.adapter_type == "light_adapter"
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.state_dict().items():
        name = key.removeprefix("adapter.")
        if match := re.fullmatch(r"body\.(\d+)\.resnets\.(\d+)\.(.*)", name):
            i, j, rest = int(match[1]), int(match[2]), match[3]
            name = f"body.{i}.body.{j}.{rest}" if light else f"body.{i * per_stage + j}.{rest}"
        elif (match := re.fullmatch(r"body\.(\d+)\.in_conv\.(.*)", name)) and not light:
            name = f"body.{int(match[1]) * per_stage}.in_conv.{match[2]}"
        tensors[name] = tensor.contiguous()
    return tensors


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_the_folder_converts_with_its_model_recorded_and_checks(kind: str, tmp_path: Path) -> None:
    reference = build(kind, tmp_path / "diffusers")
    dest = tmp_path / "t2i.safetensors"
    assert main(["t2i-adapter", "--from", str(tmp_path / "diffusers"), "--to", str(dest), "--check"]) == 0
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(dest))
    assert config is not None and config.class_name == CLASSES[kind].__name__
    encoder = config.build(T2I_ENCODERS)
    encoder.load_state_dict(load_from_safetensors(dest))
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = reference(image), encoder(image)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6 * e.abs().max().item(), rtol=0)


@pytest.mark.parametrize(("kind", "name"), [("full", "t2iadapter_toy.pth"), ("light", "t2iadapter_toy.safetensors")])
def test_the_tencentarc_layout_converts_as_the_folder(kind: str, name: str, tmp_path: Path) -> None:
    reference = build(kind, tmp_path / "diffusers", seed=2)
    expected, _ = convert_t2i_adapter(tmp_path / "diffusers", tmp_path / "from-folder.safetensors")
    original = tmp_path / name
    tensors = tencentarc_layout(reference)
    if original.suffix == ".safetensors":
        save_to_safetensors(original, tensors)
    else:
        torch.save(tensors, original)
    # Its sizes read from the tensors (TencentARC's full adapters have 2 residual blocks per stage).
    assert main(["t2i-adapter", "--from", str(original), "--to", str(tmp_path / "from-file.safetensors")]) == 0
    actual, wanted = load_from_safetensors(tmp_path / "from-file.safetensors"), load_from_safetensors(expected)
    assert actual.keys() == wanted.keys() and all(torch.equal(actual[key], wanted[key]) for key in wanted)
    assert load_metadata_from_safetensors(tmp_path / "from-file.safetensors") == load_metadata_from_safetensors(
        expected
    )


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_diffusers_file_alone_is_sized_from_its_tensors(kind: str, tmp_path: Path) -> None:
    build(kind, tmp_path / "diffusers")
    expected, _ = convert_t2i_adapter(tmp_path / "diffusers", tmp_path / "from-folder.safetensors")
    file = tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors"
    converted, _ = convert_t2i_adapter(file, tmp_path / "from-file.safetensors")
    assert load_metadata_from_safetensors(converted) == load_metadata_from_safetensors(expected)


def test_unknown_keys_are_listed_on_one_line(tmp_path: Path) -> None:
    reference = build("full", tmp_path / "diffusers")
    for name, tensors in [
        ("diffusers.safetensors", {**reference.state_dict(), "adapter.extra_block.weight": torch.zeros(1)}),
        ("tencentarc.safetensors", {**tencentarc_layout(reference), "body.0.skep.weight": torch.zeros(1)}),
    ]:
        save_to_safetensors(tmp_path / name, {k: v.contiguous() for k, v in tensors.items()})
        with pytest.raises(ConversionError) as error:
            convert_t2i_adapter(tmp_path / name, tmp_path / "out.safetensors")
        assert "\n" not in str(error.value)
        assert "adapter.extra_block.weight" in str(error.value) or "body.0.skep.weight" in str(error.value)
        assert not (tmp_path / "out.safetensors").exists()


def test_a_hub_id_downloads_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id that is not a local path is downloaded (config and weights only), then read as a folder."""
    build("full", tmp_path / "diffusers")
    asked: list[tuple[str, list[str]]] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        asked.append((repo_id, allow_patterns))
        return str(tmp_path / "diffusers")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert main(["t2i-adapter", "--from", "TencentARC/t2iadapter_depth_sd15v2", "--to", "depth.safetensors"]) == 0
    assert asked == [("TencentARC/t2iadapter_depth_sd15v2", ["config.json", "diffusion_pytorch_model.safetensors"])]
    unet = TINY.unet.build((SD1UNet,))
    adapter = SD1T2IAdapter(unet, name="depth", weights="depth.safetensors")
    assert isinstance(adapter.encoder, FullT2IEncoder)


def test_bad_sources_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build("full", tmp_path / "diffusers")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--from", str(tmp_path / "empty"), "--to", str(tmp_path / "a.safetensors")], "not a diffusers T2IAdapter"),
        (["--from", str(tmp_path / "diffusers"), "--to", str(tmp_path / "a.pt")], "must be a .safetensors file"),
    ]
    for arguments, message in cases:
        assert main(["t2i-adapter", *arguments]) == 1
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and message in error


def test_the_unet_keeps_its_diffusers_names_with_a_t2i_adapter_injected() -> None:
    """LoRA loaders and converters name the UNet's layers by structure: an injected T2I-Adapter changes none of them."""
    unet = TINY.unet.build((SD1UNet,), device="meta")
    before = {name: id(module) for name, module in diffusers_unet_modules(unet).items()}
    adapters = [SD1T2IAdapter(unet, name=kind, kind=kind).inject() for kind in ("full_adapter", "light_adapter")]
    assert {name: id(module) for name, module in diffusers_unet_modules(unet).items()} == before
    for adapter in adapters:
        adapter.eject()
