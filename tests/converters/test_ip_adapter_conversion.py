"""`refiners-convert ip-adapter`: h94's files (base, plus, FaceID) to refiners weights with metadata, which
`SD1IPAdapter` loads to compute what diffusers' UNet computes with the original file (`_load_ip_adapter_weights`, the
UNet half of `load_ip_adapter`); stray keys and other families' files are refused with what is wrong."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from ip_adapter_files import FACE_DIM, faceid_weights, h94_weights, save_bin
from torch import Tensor
from toy_sd1 import ours, save_toy_sd1
from toy_sdxl import UNET_CONFIG

from refiners.adapters.ip_adapter import SD1IPAdapter
from refiners.converters.cli import main
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.clip import CLIPImageEncoder
from refiners.foundationals.latent_diffusion import SD1UNet

CLIP_DIM, CLIP_WIDTH = 40, 48  # the toy image encoder's embedding (base) and hidden states (plus)
SIZE = 128  # pixels: the toy SD1 UNet's lowest resolution is then 2x2


@dataclass
class Toy:
    folder: Path
    reference: UNet2DConditionModel
    unet: SD1UNet


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Toy:
    folder = tmp_path_factory.mktemp("ip_conversion")
    diffusers_folder, converted = save_toy_sd1(folder)
    reference: Any = UNet2DConditionModel.from_pretrained(diffusers_folder / "unet")
    unet = ours(converted).unet
    assert isinstance(unet, SD1UNet)
    return Toy(folder, reference.eval(), unet)


def files(unet: Any, kind: str) -> dict[str, Tensor]:
    if kind == "faceid":
        return faceid_weights(unet)
    return h94_weights(unet, CLIP_WIDTH if kind == "plus" else CLIP_DIM, kind == "plus")


def embeds(kind: str) -> Tensor:
    """diffusers' `image_embeds` for one image of each of two latents (negative, positive), of each kind's shape."""
    generator = torch.Generator().manual_seed(3)
    shape = {"base": (2, 1, CLIP_DIM), "plus": (2, 1, 9, CLIP_WIDTH), "faceid": (2, 1, FACE_DIM)}[kind]
    return torch.randn(shape, generator=generator)


def convert(source: Path, dest: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    status = main(["ip-adapter", "--from", str(source), "--to", str(dest)])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["base", "plus", "faceid"])
def test_the_converted_file_matches_diffusers(
    toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    tensors = files(toy.reference, kind)
    source = save_bin(tensors, tmp_path / f"ip-adapter-{kind}.bin")
    status, err = convert(source, tmp_path / "converted.safetensors", capsys)
    assert status == 0, err
    converted = tmp_path / "converted.safetensors"
    assert f"load it with SD1IPAdapter or SDXLIPAdapter(target=unet, weights='{converted}')" in err
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(converted))
    assert config is not None
    assert config.class_name == {"base": "ImageProjection", "plus": "PerceiverResampler"}.get(
        kind, "FaceIDImageProjection"
    )

    reference: Any = UNet2DConditionModel.from_pretrained(toy.folder / "toy-sd1" / "unet").eval()
    nested: dict[str, dict[str, Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in tensors.items():
        group, _, rest = key.partition(".")
        nested[group][rest] = tensor
    reference._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=generator)
    text = torch.randn(2, 77, reference.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        expected = reference(sample, 500, text, added_cond_kwargs={"image_embeds": [embeds(kind)]}).sample

    encoder = None
    if kind != "faceid":  # sizes the adapter checks; not run here (the embeddings are given)
        encoder = CLIPImageEncoder(
            embedding_dim=CLIP_WIDTH, output_dim=CLIP_DIM, num_layers=2, num_attention_heads=4, device="meta"
        )
    unet = toy.unet
    adapter = SD1IPAdapter(target=unet, weights=converted, fine_grained=kind == "plus", clip_image_encoder=encoder)
    if kind == "faceid":
        original = SD1IPAdapter(target=unet, weights=source)
        assert adapter.lora.keys() == original.lora.keys()
        assert all(torch.equal(adapter.lora[key], tensor) for key, tensor in original.lora.items())
    with torch.no_grad():
        unet.set_timestep(500)
        unet.set_clip_text_embedding(text)
        plain = unet(sample)
        adapter.inject()
        adapter.set_clip_image_embedding(embeds(kind))
        actual = unet(sample)
        adapter.eject()
    tolerance = 1e-4 * expected.abs().max().item()
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance, f"max abs difference {difference:.3g} (tolerance {tolerance:.3g})"
    assert (actual - plain).abs().max() > 10 * tolerance
    print(f"{kind}: max abs difference {difference:.3g}, {difference / expected.abs().max().item():.3g} of the scale")


def test_bad_files_are_refused(toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stray = h94_weights(toy.reference, CLIP_DIM, False) | {"image_proj.extra.weight": torch.ones(1)}
    save_to_safetensors(tmp_path / "stray.safetensors", stray)
    status, err = convert(tmp_path / "stray.safetensors", tmp_path / "out.safetensors", capsys)
    assert status == 1 and not (tmp_path / "out.safetensors").exists()
    assert err.strip() == (
        "refiners-convert: error: 1 tensors of the IP-Adapter file are not used: image_proj.extra.weight"
    )

    sdxl_unet = UNet2DConditionModel(**UNET_CONFIG)
    save_bin(faceid_weights(sdxl_unet), tmp_path / "ip-adapter-faceid_sdxl.bin")
    status, err = convert(tmp_path / "ip-adapter-faceid_sdxl.bin", tmp_path / "sdxl.safetensors", capsys)
    assert status == 0, err
    with pytest.raises(ValueError, match=r"take 80-wide context \(\d+ cross-attentions\), but this UNet's take 32"):
        SD1IPAdapter(target=toy.unet, weights=tmp_path / "sdxl.safetensors")

    converted = load_from_safetensors(tmp_path / "sdxl.safetensors")
    metadata = load_metadata_from_safetensors(tmp_path / "sdxl.safetensors")
    save_to_safetensors(tmp_path / "stray_refiners.safetensors", converted | {"extra": torch.ones(1)}, metadata)
    with pytest.raises(ValueError, match=r"1 tensors of .*stray_refiners.safetensors are not used: extra$"):
        SD1IPAdapter(target=toy.unet, weights=tmp_path / "stray_refiners.safetensors")

    status, err = convert(tmp_path / "sdxl.safetensors", tmp_path / "again.safetensors", capsys)
    assert status == 1 and "already holds refiners weights" in err
    status, err = convert(tmp_path / "missing.bin", tmp_path / "x.safetensors", capsys)
    assert status == 1 and "no such file: " in err
    assert load_from_safetensors(tmp_path / "sdxl.safetensors")  # the SDXL file was written whole
