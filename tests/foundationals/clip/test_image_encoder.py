"""`CLIPImageEncoder` and `preprocess_image` against transformers' `CLIPVisionModelWithProjection` and
`CLIPImageProcessor`, from configs of the released encoders with random weights, converted by `refiners-convert
clip-image`."""

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from refiners.converters.cli import main
from refiners.converters.clip_image import convert_clip_image
from refiners.converters.engine import ConversionError
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.clip import CLIPImageEncoder, CLIPImageEncoderG, CLIPImageEncoderH, preprocess_image

# h94/IP-Adapter's models/image_encoder (OpenCLIP ViT-H/14) and sdxl_models/image_encoder (ViT-bigG/14).
H_CONFIG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "image_size": 224,
    "layer_norm_eps": 1e-5,
}
G_CONFIG: dict[str, Any] = H_CONFIG | {
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_hidden_layers": 48,
    "projection_dim": 1280,
}
# ViT-H's config at reduced width and depth (heads of 16, as ViT-H has 16 heads of 80).
REDUCED_H_CONFIG: dict[str, Any] = H_CONFIG | {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "projection_dim": 48,
}
TOLERANCE = 1e-5  # relative to the reference output's scale


def _reference(config: dict[str, Any], seed: int = 0) -> CLIPVisionModelWithProjection:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).eval()
        with torch.no_grad():  # default init gives every norm the same weights, which hides swaps
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.add_(0.1 * torch.randn_like(module.weight))
                    module.bias.add_(0.1 * torch.randn_like(module.bias))
    return model


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> float:
    difference = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert difference <= TOLERANCE * scale, f"max abs difference {difference:.3g} for a scale of {scale:.3g}"
    return difference


@pytest.fixture(scope="module")
def reduced_h(tmp_path_factory: pytest.TempPathFactory) -> tuple[CLIPVisionModelWithProjection, Path]:
    reference = _reference(REDUCED_H_CONFIG)
    folder = tmp_path_factory.mktemp("clip_image") / "image_encoder"
    reference.save_pretrained(folder)
    return reference, folder


def test_the_encoder_equals_transformers(reduced_h: tuple[CLIPVisionModelWithProjection, Path], tmp_path: Path) -> None:
    reference, folder = reduced_h
    assert main(["clip-image", "--from", str(folder), "--to", str(tmp_path / "encoder.safetensors")]) == 0
    encoder = CLIPImageEncoder.from_safetensors(tmp_path / "encoder.safetensors")
    assert (encoder.embedding_dim, encoder.num_layers, encoder.output_dim) == (64, 3, 48)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(pixel_values=images, output_hidden_states=True)
        _assert_close(encoder(images), expected.image_embeds)
        _assert_close(encoder.with_penultimate_output()(images), expected.hidden_states[-2])


def test_a_weights_file_alone_needs_a_presets_sizes(
    reduced_h: tuple[CLIPVisionModelWithProjection, Path], tmp_path: Path
) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.safetensors").write_bytes((reduced_h[1] / "model.safetensors").read_bytes())
    with pytest.raises(ConversionError, match=r"no config.json and its sizes \(64 wide, 3 layers\) are not those"):
        convert_clip_image(alone / "model.safetensors", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_unused_keys_are_listed_on_one_line(
    reduced_h: tuple[CLIPVisionModelWithProjection, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = {k: v.contiguous() for k, v in reduced_h[0].state_dict().items()}
    tensors["logit_scale"] = torch.ones(())
    tensors["text_model.final_layer_norm.weight"] = torch.ones(4)
    folder = tmp_path / "extra"
    folder.mkdir()
    (folder / "config.json").write_text((reduced_h[1] / "config.json").read_text())
    save_to_safetensors(folder / "model.safetensors", tensors)
    assert main(["clip-image", "--from", str(folder), "--to", str(tmp_path / "out.safetensors")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "2 tensors that CLIPImageEncoder(" in error and "logit_scale, text_model.final_layer_norm.weight" in error
    assert not (tmp_path / "out.safetensors").exists()


def test_the_presets_match_the_released_configs() -> None:
    for preset, config in [(CLIPImageEncoderH, H_CONFIG), (CLIPImageEncoderG, G_CONFIG)]:
        with torch.device("meta"):
            reference = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
        ours = preset(device="meta")
        assert (ours.embedding_dim, ours.num_layers, ours.output_dim) == (
            config["hidden_size"],
            config["num_hidden_layers"],
            config["projection_dim"],
        )
        shapes = sorted(tuple(p.shape) for p in ours.parameters())
        assert shapes == sorted(
            tuple(v.shape) if k != "vision_model.embeddings.class_embedding" else (1, *v.shape)
            for k, v in reference.state_dict().items()
            if not k.endswith("position_ids")
        )


def test_missing_layers_are_listed(tmp_path: Path) -> None:
    folder = tmp_path / "h"
    two_layers: dict[str, Any] = H_CONFIG | {"num_hidden_layers": 2}
    reference = CLIPVisionModelWithProjection(CLIPVisionConfig(**two_layers))
    reference.config.num_hidden_layers = 32  # ViT-H's config, two layers' weights
    reference.save_pretrained(folder)
    with pytest.raises(
        ConversionError,
        match=r"lacks 480 tensors that CLIPImageEncoderH\(\) needs: vision_model.encoder.layers.2.layer_norm1.weight, ",
    ):
        convert_clip_image(folder, tmp_path / "h.safetensors")


@pytest.mark.parametrize("size", [(640, 480), (300, 517), (224, 224), (1000, 223), (97, 131)])
def test_preprocess_equals_transformers(size: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(size[0])
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    expected = CLIPImageProcessor()(images=image, return_tensors="pt")["pixel_values"]
    actual = preprocess_image(image)
    assert actual.shape == (1, 3, 224, 224)
    # The same 8-bit resize and crop; the normalization differs by float rounding only.
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_preprocess_takes_several_images() -> None:
    images = [Image.new("RGB", (300, 200), (10, 200, 30)), Image.new("L", (100, 400), 128)]
    expected = CLIPImageProcessor()(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(preprocess_image(images), expected, atol=1e-6, rtol=0)


def test_the_recorded_config_rebuilds_the_encoder(
    reduced_h: tuple[CLIPVisionModelWithProjection, Path], tmp_path: Path
) -> None:
    path, config, count = convert_clip_image(reduced_h[1], tmp_path / "sub" / "encoder.safetensors")
    assert ModelConfig.from_metadata(load_metadata_from_safetensors(path)) == config
    assert config.class_name == "CLIPImageEncoder" and count == len(
        CLIPImageEncoder.from_safetensors(path).state_dict()
    )


@pytest.mark.heavy
def test_full_size_clip_image_encoder_h_equals_transformers(tmp_path: Path) -> None:
    reference = _reference(H_CONFIG)
    reference.save_pretrained(tmp_path / "h")
    assert main(["clip-image", "--from", str(tmp_path / "h"), "--to", str(tmp_path / "h.safetensors")]) == 0
    encoder = CLIPImageEncoder.from_safetensors(tmp_path / "h.safetensors")
    assert isinstance(encoder, CLIPImageEncoderH)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = reference(pixel_values=images, output_hidden_states=True)
        _assert_close(encoder(images), expected.image_embeds)
        _assert_close(encoder.with_penultimate_output()(images), expected.hidden_states[-2])


def test_a_hub_id_with_a_subfolder_downloads_the_encoder_alone(
    reduced_h: tuple[CLIPVisionModelWithProjection, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    shutil.copytree(reduced_h[1], snapshot / "models" / "image_encoder")
    calls: list[tuple[str, list[str]]] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    path, config, _ = convert_clip_image("h94/IP-Adapter/models/image_encoder", tmp_path / "h.safetensors")
    assert calls[0][0] == "h94/IP-Adapter" and "models/image_encoder/config.json" in calls[0][1]
    assert all(pattern.startswith("models/image_encoder/") for _, patterns in calls for pattern in patterns)
    assert config.arguments["embedding_dim"] == 64 and path.is_file()
