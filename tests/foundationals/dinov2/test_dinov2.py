"""DINOv2 equals transformers' `Dinov2Model` / `Dinov2WithRegistersModel`: the released configs with random weights,
saved with `save_pretrained`, converted by `refiners-convert dinov2`'s conversion, compared token for token.

Images are small (224 x 224, and other sizes to exercise the resampling of the position embeddings, learned for a
37 x 37 grid) and one per batch; each model is built once per module. Tolerance: 1e-4 of the reference's largest
token value (absolute), or tighter.
"""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from dinov2_references import Reference, random_reference, tokens
from PIL import Image
from transformers import AutoImageProcessor, BitImageProcessor

from refiners.converters.dinov2 import convert_dinov2
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors
from refiners.foundationals.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TINY,
    DINOv2_base,
    DINOv2_giant,
    DINOv2_giant_reg,
    DINOv2_large,
    DINOv2_large_reg,
    DINOv2_small,
    DINOv2_small_reg,
    ViT,
    preprocess,
)

Pair = tuple[ViT, Reference]


def _assert_same_tokens(ours: ViT, reference: Reference, height: int, width: int, seed: int = 0) -> float:
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    expected = tokens(reference, images)
    with torch.no_grad():
        actual = ours(images)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=1e-4 * scale, rtol=0)
    return (actual - expected).abs().max().item() / scale


def _converted(tmp_path_factory: pytest.TempPathFactory, name: str, **overrides: int) -> Pair:
    reference = random_reference(name, **overrides)
    folder = tmp_path_factory.mktemp(f"dinov2_{name}")
    reference.save_pretrained(folder / "transformers")
    path, _ = convert_dinov2(folder / "transformers", folder / "dinov2.safetensors")
    return ViT.from_safetensors(path), reference


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return _converted(tmp_path_factory, "small")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return _converted(tmp_path_factory, "base")


@pytest.fixture(scope="module")
def small_reg(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return _converted(tmp_path_factory, "small_reg")


@pytest.fixture(scope="module")
def giant_two_layers(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return _converted(tmp_path_factory, "giant_reg", num_hidden_layers=2)


def test_small_equals_transformers(small: Pair) -> None:
    ours, reference = small
    assert type(ours) is DINOv2_small  # the file records the released size by its class
    _assert_same_tokens(ours, reference, 224, 224)


def test_base_equals_transformers(base: Pair) -> None:
    ours, reference = base
    assert type(ours) is DINOv2_base
    _assert_same_tokens(ours, reference, 224, 224)


@pytest.mark.parametrize("size", [(168, 308), (70, 42)], ids=["wide", "tall-and-small"])
def test_position_embeddings_resampled_as_transformers(small: Pair, size: tuple[int, int]) -> None:
    # Bicubic resampling of the learned 37 x 37 grid to 12 x 22 and 5 x 3 patches. (The grid used as it is, at its
    # native size, is compared in tests/converters/test_dinov2_conversion.py, on a 4 x 4 grid.)
    _assert_same_tokens(*small, *size)


def test_registers_equal_transformers(small_reg: Pair) -> None:
    ours, reference = small_reg
    assert type(ours) is DINOv2_small_reg and ours.num_registers == 4
    _assert_same_tokens(ours, reference, 224, 224)
    _assert_same_tokens(ours, reference, 154, 252)  # antialiased resampling (transformers' registers models)


def test_giant_swiglu_at_reduced_depth_equals_transformers(giant_two_layers: Pair) -> None:
    ours, reference = giant_two_layers
    # Giant's width and SwiGLU MLP (4096), 2 of its 40 layers: recorded as a ViT with these arguments.
    assert type(ours) is ViT and (ours.embedding_dim, ours.feedforward, ours.feedforward_dim) == (1536, "swiglu", 4096)
    assert ours.num_layers == 2 and ours.num_registers == 4
    _assert_same_tokens(ours, reference, 112, 98)


def test_converted_file_records_its_model(tmp_path: Path) -> None:
    # The file alone builds the model: `ViT.from_safetensors` reads this record.
    reference = random_reference("small_reg", num_hidden_layers=1)
    reference.save_pretrained(tmp_path / "folder")
    path, conversion = convert_dinov2(tmp_path / "folder", tmp_path / "one_layer.safetensors")
    assert ModelConfig.from_metadata(load_metadata_from_safetensors(path)) == conversion.config
    assert str(conversion.config) == (
        "ViT(embedding_dim=384, patch_size=14, image_size=518, num_layers=1, num_heads=6, norm_eps=1e-06, "
        "mlp_ratio=4, num_registers=4, feedforward='gelu', interpolate_antialias=True)"
    )
    with pytest.raises(ValueError, match="weights are for a ViT, which is not one of the models expected here"):
        DINOv2_small.from_safetensors(path)


@pytest.mark.parametrize(
    ("preset", "sizes"),
    [
        (DINOv2_small, (384, 12, 6, 1536, 0)),
        (DINOv2_base, (768, 12, 12, 3072, 0)),
        (DINOv2_large, (1024, 24, 16, 4096, 0)),
        (DINOv2_giant, (1536, 40, 24, 4096, 0)),
        (DINOv2_large_reg, (1024, 24, 16, 4096, 4)),
        (DINOv2_giant_reg, (1536, 40, 24, 4096, 4)),
    ],
)
def test_presets_have_the_released_sizes(preset: Callable[..., ViT], sizes: tuple[int, ...]) -> None:
    model = preset(device="meta")
    assert (model.embedding_dim, model.num_layers, model.num_heads, model.feedforward_dim, model.num_registers) == sizes
    assert model.patch_size == 14 and model.grid_size == 37
    parameters = sum(parameter.numel() for parameter in model.parameters())
    expected = {384: 22e6, 768: 86e6, 1024: 304e6, 1536: 1136e6}[model.embedding_dim]
    assert abs(parameters - expected) / expected < 0.01


def test_tiny_preset_runs_at_any_size() -> None:
    model = TINY.build([ViT])
    assert model(torch.randn(2, 3, 70, 28)).shape == (2, 1 + 5 * 2, 32)
    # Images in float32 (what `preprocess` gives) go to the weights' dtype.
    assert TINY.build([ViT], dtype=torch.float64)(torch.randn(1, 3, 56, 56)).dtype == torch.float64


def _images() -> list[Image.Image]:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (301, 457, 3), generator=generator, dtype=torch.uint8).numpy()
    gradient = torch.linspace(0, 255, 640).round().to(torch.uint8).expand(480, 640).contiguous().numpy()
    return [
        Image.fromarray(noise),  # landscape, odd sizes
        Image.fromarray(noise).transpose(Image.Transpose.ROTATE_90),  # portrait
        Image.fromarray(gradient, mode="L"),  # grayscale
        Image.fromarray(noise[:256, :256]),  # already 256: no resize
        Image.fromarray(torch.cat((torch.from_numpy(noise), torch.from_numpy(noise[..., :1])), dim=2).numpy()),  # RGBA
    ]


@pytest.mark.parametrize("index", range(5), ids=["landscape", "portrait", "grayscale", "square-256", "transparent"])
def test_preprocess_equals_transformers_image_processor(tmp_path: Path, index: int) -> None:
    image = _images()[index]
    # facebook/dinov2-small's preprocessor_config.json.
    config = (
        '{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true, "do_convert_rgb": true, '
        '"do_normalize": true, "do_rescale": true, "do_resize": true, "image_mean": [0.485, 0.456, 0.406], '
        '"image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3, '
        '"rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256}}'
    )
    (tmp_path / "preprocessor_config.json").write_text(config)
    auto = AutoImageProcessor.from_pretrained(tmp_path)
    bit = BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    ours = preprocess(image)
    assert ours.shape == (1, 3, 224, 224)
    for processor in (auto, bit):
        expected = processor(images=image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_preprocess_at_another_size_crops_that_size() -> None:
    image = _images()[0]
    processor = BitImageProcessor(
        size={"shortest_edge": 512},
        crop_size={"height": 448, "width": 448},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(preprocess(image, 448), expected, atol=1e-6, rtol=0)


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["large", "large_reg", "giant", "giant_reg"])
def test_full_size_large_variants_equal_transformers(tmp_path: Path, name: str) -> None:
    """The large and giant models at full size (giant: 1.1B parameters), one at a time: never two copies in memory."""
    reference = random_reference(name)
    reference.save_pretrained(tmp_path / "transformers")
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = tokens(reference, images)
    del reference
    path, _ = convert_dinov2(tmp_path / "transformers", tmp_path / "dinov2.safetensors")
    ours = ViT.from_safetensors(path)
    assert type(ours).__name__ == f"DINOv2_{name}"
    with torch.no_grad():
        actual = ours(images)
    scale = expected.abs().max().item()
    print(f"{name}: max abs difference {(actual - expected).abs().max().item():.3g}, scale {scale:.3g}")
    torch.testing.assert_close(actual, expected, atol=1e-4 * scale, rtol=0)
