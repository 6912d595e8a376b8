"""`refiners-convert` on Stable Diffusion 1.x models of other sizes than SD1.5: the targets are sized from the source's
configs. The source is the toy model of `refiners.converters.toy`, saved by diffusers' own `save_pretrained`."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from transformers import CLIPTextModel

from refiners.converters.architecture import autoencoder_for, clip_text_for, describe, unet_for
from refiners.converters.cli import main
from refiners.converters.engine import ConversionError
from refiners.converters.sources import DiffusersFolder, SourceError, read_tokenizer
from refiners.converters.stable_diffusion import convert_stable_diffusion_1, convert_unet
from refiners.converters.toy import (
    save_toy_stable_diffusion_1,
    write_byte_level_vocabulary,
)
from refiners.foundationals.clip import CLIPTextEncoder
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.training.module import build_components

PROMPTS = ["a red circle on a white background", "A Photo, of an ASTRONAUT!  riding\ta horse", ""]


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_toy_stable_diffusion_1(tmp_path_factory.mktemp("toy") / "diffusers", seed=3)


@pytest.fixture(scope="module")
def toy_converted(toy_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("toy-converted")
    assert main(["sd1", "--from", str(toy_folder), "--to", str(destination), "--check"]) == 0
    return destination


def _copy_with_config(toy_folder: Path, destination: Path, component: str, changes: dict[str, Any]) -> Path:
    """The toy folder (by symlinks) with `changes` in one component's config."""
    destination.mkdir()
    for path in toy_folder.iterdir():
        (destination / path.name).symlink_to(path, target_is_directory=path.is_dir())
    (destination / component).unlink()
    (destination / component).mkdir()
    for path in (toy_folder / component).iterdir():
        (destination / component / path.name).symlink_to(path)
    config = json.loads((toy_folder / component / "config.json").read_text()) | changes
    (destination / component / "config.json").unlink()
    (destination / component / "config.json").write_text(json.dumps(config))
    return destination


def test_targets_are_sized_from_the_configs(toy_folder: Path) -> None:
    source = DiffusersFolder(toy_folder)
    assert describe(unet_for(source, 4)) == (
        "SD1UNet(in_channels=4, channels=(32, 32, 64, 64), context_embedding_dim=32, num_attention_heads=4)"
    )
    assert describe(autoencoder_for(source)) == (
        "LatentDiffusionAutoencoder(encoder_scale=0.18215, in_channels=3, out_channels=3, latent_channels=4, "
        "block_out_channels=(32, 32, 32, 32), layers_per_block=1, num_groups=32)"
    )
    assert describe(clip_text_for(source)) == (
        "CLIPTextEncoder(embedding_dim=32, max_sequence_length=77, vocabulary_size=514, num_layers=2, "
        "num_attention_heads=4, feedforward_dim=64, layer_norm_eps=1e-05, gelu_approximation='quick')"
    )
    # SD1.5's sizes read as the classes of SD1.5.
    assert describe(SD1UNet(in_channels=9, device="meta")) == "SD1UNet(in_channels=9)"


def test_converted_toy_model_matches_diffusers(toy_folder: Path, toy_converted: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    unet = SD1UNet(4, channels=(32, 32, 64, 64), context_embedding_dim=32, num_attention_heads=4, device="meta")
    unet.load_from_safetensors(toy_converted / "unet.safetensors")
    reference_unet = UNet2DConditionModel.from_pretrained(toy_folder / "unet").eval()
    latents, text = torch.randn(2, 4, 8, 12, generator=generator), torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([10, 900])
    unet.set_timestep(timesteps)
    unet.set_clip_text_embedding(text)
    with torch.no_grad():
        expected = reference_unet(latents, timesteps, encoder_hidden_states=text).sample
        torch.testing.assert_close(unet(latents), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)

    lda = LatentDiffusionAutoencoder(0.18215, block_out_channels=(32,) * 4, layers_per_block=1, device="meta")
    lda.load_from_safetensors(toy_converted / "autoencoder.safetensors")
    reference_vae = AutoencoderKL.from_pretrained(toy_folder / "vae").eval()
    image = torch.rand(1, 3, 48, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        expected = reference_vae(image, sample_posterior=False).sample
        torch.testing.assert_close(lda(image), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)

    # The text encoder reads text: the tokenizer (saved by transformers 5 as tokenizer.json alone) is in the file.
    assert not (toy_folder / "tokenizer" / "vocab.json").exists()
    encoder = CLIPTextEncoder(
        embedding_dim=32, vocabulary_size=514, num_layers=2, num_attention_heads=4, feedforward_dim=64,
        gelu_approximation="quick", device="meta",
    )  # fmt: skip
    encoder.load_from_safetensors(toy_converted / "clip_text.safetensors")
    tokenizer: Any = transformers.CLIPTokenizer.from_pretrained(toy_folder / "tokenizer")
    reference_text = CLIPTextModel.from_pretrained(toy_folder / "text_encoder").eval()
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference_text(ids).last_hidden_state
        assert encoder.tokenizer is not None and torch.equal(encoder.tokenizer(PROMPTS), ids)
        torch.testing.assert_close(encoder(PROMPTS), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def test_toy_model_is_the_trainers_tiny_base(toy_converted: Path) -> None:
    # `refiners-train` with `base: tiny` loads the conversion: same shapes, same tokenizer.
    components = build_components("tiny", weights=toy_converted)
    random = build_components("tiny")
    for (name, loaded), (_, built) in zip(components.items(), random.items(), strict=True):
        shapes = {key: value.shape for key, value in built.state_dict().items()}
        assert {key: value.shape for key, value in loaded.state_dict().items()} == shapes, name
    assert components.clip_text_encoder.tokenizer is not None and random.clip_text_encoder.tokenizer is not None
    for prompt in PROMPTS:
        assert torch.equal(components.clip_text_encoder.tokenizer(prompt), random.clip_text_encoder.tokenizer(prompt))


def test_tokenizer_json_with_merges_matches_transformers(tmp_path: Path) -> None:
    # A byte-level vocabulary plus merges spelling a few words, saved by transformers 5 (tokenizer.json alone).
    vocabulary_file, merges_file = write_byte_level_vocabulary(tmp_path / "files")
    vocabulary: dict[str, int] = json.loads(vocabulary_file.read_text())
    merges: list[str] = []
    for word in ("red", "circle", "astronaut", "horse"):
        merged, *rest = [*word[:-1], word[-1] + "</w>"]
        for piece in rest:
            merges.append(f"{merged} {piece}")
            merged += piece
            vocabulary.setdefault(merged, len(vocabulary))
    vocabulary_file.write_text(json.dumps(vocabulary))
    merges_file.write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    reference: Any = transformers.CLIPTokenizer(str(vocabulary_file), str(merges_file), model_max_length=77)
    reference.save_pretrained(tmp_path / "saved")
    assert sorted(path.name for path in (tmp_path / "saved").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tokenizer = read_tokenizer(tmp_path / "saved")
    expected = reference(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(tokenizer(PROMPTS), expected)
    assert tokenizer.vocabulary_size == len(vocabulary)
    assert {vocabulary["red</w>"], vocabulary["circle</w>"]} <= set(expected[0].tolist())  # the merges are used


@pytest.mark.parametrize(
    ("component", "changes", "message"),
    [
        ("unet", {"transformer_layers_per_block": 2}, "transformer_layers_per_block=2 (SD1: 1)"),
        ("unet", {"use_linear_projection": True}, "use_linear_projection=True (SD1: False)"),
        ("unet", {"time_cond_proj_dim": 256}, "time_cond_proj_dim=256 (SD1: None)"),
        ("unet", {"attention_head_dim": [4, 4, 8, 8]}, "attention_head_dim=[4, 4, 8, 8]"),
        ("unet", {"block_out_channels": [32, 64, 64]}, "block_out_channels=[32, 64, 64] (SD1: four resolutions)"),
        ("vae", {"use_quant_conv": False}, "use_quant_conv=False (SD1: True)"),
        ("text_encoder", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new' (SD1: 'quick_gelu')"),
    ],
)
def test_other_architectures_are_refused(
    toy_folder: Path, tmp_path: Path, component: str, changes: dict[str, Any], message: str
) -> None:
    folder = _copy_with_config(toy_folder, tmp_path / "changed", component, changes)
    with pytest.raises(ConversionError, match=r"not of the Stable Diffusion 1\.x architecture") as error:
        convert_stable_diffusion_1(folder, tmp_path / "out")
    assert message in str(error.value)


def test_text_widths_must_agree(toy_folder: Path, tmp_path: Path) -> None:
    folder = _copy_with_config(toy_folder, tmp_path / "changed", "unet", {"cross_attention_dim": 64})
    with pytest.raises(ConversionError, match="attends to 64-wide text embeddings but its text encoder is 32 wide"):
        convert_stable_diffusion_1(folder, tmp_path / "out")


def test_known_widths_still_name_the_model(toy_folder: Path, tmp_path: Path) -> None:
    folder = _copy_with_config(toy_folder, tmp_path / "changed", "unet", {"cross_attention_dim": 1024})
    with pytest.raises(ConversionError, match=r"looks like Stable Diffusion 2\.x"):
        convert_unet(folder, tmp_path / "unet.safetensors")


def test_unreadable_tokenizer_json(tmp_path: Path) -> None:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(SourceError, match=r"is not the tokenizer\.json of a BPE tokenizer"):
        read_tokenizer(folder)
