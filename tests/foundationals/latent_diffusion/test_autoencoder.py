"""SD1Autoencoder computes what diffusers' AutoencoderKL computes, on weights converted from a diffusers folder.

The reference is built from the real SD1.5 `vae/config.json` with random weights (norm weights randomized too, so
that a swapped GroupNorm would show), saved with `save_pretrained` as a download would look; ours is built on the
meta device and loaded from the converted safetensors file. Both full-size models (84M parameters each) are shared
by the whole module.
"""

import re
import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from PIL import Image
from torch import Tensor

from refiners.converters.autoencoder import convert_diffusers_autoencoder, diffusers_autoencoder_key_map
from refiners.converters.engine import ConversionError
from refiners.fluxion.utils import image_to_tensor, load_from_safetensors, save_to_safetensors, tensor_to_image
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder, SD1Autoencoder

# runwayml/stable-diffusion-v1-5, vae/config.json (less the `_class_name`/`_diffusers_version` bookkeeping).
SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SCALING_FACTOR = 0.18215

# Relative to the output's scale: atol = RELATIVE_ATOL * max |reference|.
RELATIVE_ATOL = 1e-4


@dataclass
class Models:
    reference: AutoencoderKL
    lda: SD1Autoencoder
    checkpoint: dict[str, Tensor]


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=RELATIVE_ATOL * expected.abs().max().item(), rtol=0)


def smooth_images(generator: torch.Generator, batch: int, height: int, width: int) -> Tensor:
    """Images in [-1, 1] with large smooth structures (upsampled noise), closer to photographs than white noise."""
    coarse = torch.randn(batch, 3, max(height // 8, 1), max(width // 8, 1), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(-1, 1)


def reference_encode(reference: AutoencoderKL, x: Tensor) -> Tensor:
    return reference.encode(x).latent_dist.mean * SCALING_FACTOR  # pyright: ignore[reportAttributeAccessIssue]


def reference_decode(reference: AutoencoderKL, latents: Tensor) -> Tensor:
    decoded = reference.decode(latents / SCALING_FACTOR)  # pyright: ignore[reportArgumentType]
    return decoded.sample  # pyright: ignore[reportAttributeAccessIssue]


def use_tiling(reference: AutoencoderKL, tile_size: int, overlap: int) -> None:
    """diffusers' tiled VAE with our tile size and overlap, in pixels (its defaults are 512 and 0.25 * 512)."""
    reference.enable_tiling()
    reference.tile_sample_min_size = tile_size
    reference.tile_latent_min_size = tile_size // 8
    reference.tile_overlap_factor = overlap / tile_size


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    torch.manual_seed(0)
    reference = AutoencoderKL(**SD15_VAE_CONFIG).eval()
    with torch.no_grad():
        # diffusers initializes norms to weight 1 and bias 0: random ones make every GroupNorm distinguishable.
        for module in reference.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
    folder = tmp_path_factory.mktemp("sd15") / "vae"
    reference.save_pretrained(folder)
    checkpoint = load_from_safetensors(folder / "diffusion_pytorch_model.safetensors")

    lda = SD1Autoencoder(device="meta")
    converted = tmp_path_factory.mktemp("refiners") / "lda.safetensors"
    save_to_safetensors(converted, convert_diffusers_autoencoder(checkpoint, lda))
    lda.load_from_safetensors(converted)
    return Models(reference=reference, lda=lda, checkpoint=checkpoint)


# -- structure and conversion ----------------------------------------------------------------------------------


def test_builds_on_meta_device() -> None:
    lda = SD1Autoencoder(device="meta")
    assert all(tensor.is_meta for tensor in lda.state_dict().values())
    assert (lda.encoder_scale, lda.downscale_factor, lda.latent_channels) == (SCALING_FACTOR, 8, 4)
    assert isinstance(lda, LatentDiffusionAutoencoder)


def test_loaded_weights_are_the_checkpoints(models: Models) -> None:
    # Materialized from the meta device: every tensor on CPU, and as many values as diffusers' model has.
    state = models.lda.state_dict()
    assert all(tensor.device.type == "cpu" for tensor in state.values())
    assert len(state) == len(models.checkpoint)
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in models.reference.parameters())


def test_attention_weights_as_1x1_convolutions(models: Models) -> None:
    """Older checkpoints store the mid-block attention projections as 1x1 convolution weights: they are flattened."""
    projections = ("to_q", "to_k", "to_v", "to_out.0")
    as_convolutions = {
        key: tensor[:, :, None, None] if any(f".{name}.weight" in key for name in projections) else tensor
        for key, tensor in models.checkpoint.items()
    }
    assert sum(tensor.dim() == 4 and tensor.shape[2:] == (1, 1) for tensor in as_convolutions.values()) > 8
    from_convolutions = convert_diffusers_autoencoder(as_convolutions, models.lda)
    from_linears = convert_diffusers_autoencoder(models.checkpoint, models.lda)
    assert from_convolutions.keys() == from_linears.keys()
    for key, tensor in from_linears.items():
        assert torch.equal(from_convolutions[key], tensor), key


def test_key_map_rejects_a_checkpoint_that_does_not_fit(models: Models) -> None:
    incomplete = dict(models.checkpoint)
    del incomplete["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"]
    incomplete["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"decoder\.up_blocks\.2\.resnets\.0\.conv_shortcut\.weight"):
        convert_diffusers_autoencoder(incomplete, models.lda)
    with pytest.raises(ConversionError, match=r"decoder\.extra\.weight"):
        convert_diffusers_autoencoder(incomplete, models.lda)


def test_key_map_is_derived_from_structure() -> None:
    """A smaller autoencoder of the same family (3 blocks, 1 Resnet per block) gets a map of its own size."""
    small = LatentDiffusionAutoencoder(
        encoder_scale=1.0, block_out_channels=(32, 64, 64), layers_per_block=1, device="meta"
    )
    key_map = diffusers_autoencoder_key_map(small)
    assert sorted(key_map.mapping.values()) == sorted(small.state_dict())
    assert "decoder.up_blocks.1.upsamplers.0.conv.weight" in key_map.mapping
    assert "decoder.up_blocks.2.upsamplers.0.conv.weight" not in key_map.mapping


# -- parity with diffusers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (32, 48)], ids=["32x32", "32x48"])
def test_encode(models: Models, size: tuple[int, int]) -> None:
    x = smooth_images(torch.Generator().manual_seed(1), 1, *size)
    with torch.no_grad():
        expected = reference_encode(models.reference, x)
        assert_matches(models.lda.encode(x), expected)
    assert expected.shape == (1, 4, size[0] // 8, size[1] // 8)


def test_encode_sample(models: Models) -> None:
    x = smooth_images(torch.Generator().manual_seed(2), 2, 32, 32)
    with torch.no_grad():
        posterior = models.reference.encode(x).latent_dist  # pyright: ignore[reportAttributeAccessIssue]
        expected = posterior.sample(generator=torch.Generator().manual_seed(3)) * SCALING_FACTOR
        actual = models.lda.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert_matches(actual, expected)
    assert not torch.allclose(actual, posterior.mean * SCALING_FACTOR)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 4, 6)], ids=["1x4x8x8", "2x4x4x6"])
def test_decode(models: Models, shape: tuple[int, int, int, int]) -> None:
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference_decode(models.reference, latents)
        assert_matches(models.lda.decode(latents), expected)
    assert expected.shape == (shape[0], 3, shape[2] * 8, shape[3] * 8)


def test_forward_reconstructs(models: Models) -> None:
    """Called as a Chain, the autoencoder is diffusers' `forward`: decode the posterior's mean."""
    x = smooth_images(torch.Generator().manual_seed(5), 1, 32, 32)
    with torch.no_grad():
        expected = models.reference(x).sample  # pyright: ignore[reportAttributeAccessIssue]
        assert_matches(models.lda(x), expected)


# -- PIL images ------------------------------------------------------------------------------------------------


def pil_images(count: int, width: int, height: int) -> list[Image.Image]:
    images = (smooth_images(torch.Generator().manual_seed(6), count, height, width) + 1) / 2
    return [tensor_to_image(image[None]) for image in images]


def test_image_to_latents(models: Models) -> None:
    image = pil_images(1, 48, 32)[0]
    processor = VaeImageProcessor()
    with torch.no_grad():
        latents = models.lda.image_to_latents(image)
        assert torch.equal(latents, models.lda.encode(image_to_tensor(image) * 2 - 1))
        expected = reference_encode(models.reference, processor.preprocess(image))  # pyright: ignore[reportArgumentType]
    assert_matches(latents, expected)


def test_images_to_latents(models: Models) -> None:
    images = pil_images(2, 32, 32)
    with torch.no_grad():
        batch = models.lda.images_to_latents(images)
        singles = torch.cat([models.lda.image_to_latents(image) for image in images])
    assert batch.shape == (2, 4, 4, 4)
    torch.testing.assert_close(batch, singles, atol=RELATIVE_ATOL * singles.abs().max().item(), rtol=0)


def test_decode_latents(models: Models) -> None:
    latents = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        image = models.lda.decode_latents(latents)
        tensor_path = tensor_to_image((models.lda.decode(latents) + 1) / 2)
        expected = VaeImageProcessor().postprocess(reference_decode(models.reference, latents), output_type="pil")
    assert isinstance(expected, list)
    expected = expected[0]
    assert image.size == (48, 32) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(tensor_path))
    # diffusers rounds the same values: at most an off-by-one where float noise crosses a rounding boundary.
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_latents_to_images(models: Models) -> None:
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        images = models.lda.latents_to_images(latents)
        singles = [models.lda.decode_latents(latent[None]) for latent in latents]
    assert len(images) == 2
    for image, single in zip(images, singles, strict=True):
        difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(single, dtype=np.int16))
        assert difference.max() <= 1


# -- tiles -----------------------------------------------------------------------------------------------------


def ramp(length: int) -> Tensor:
    """The weight of the second of two tiles that overlap by `length` samples (the first's is `1 - ramp`)."""
    return (torch.arange(length, dtype=torch.float32) + 0.5) / length


def test_tiled_decode_blends_two_tiles_linearly(models: Models) -> None:
    """32x48 output in 32x32 tiles overlapping by 16 pixels: two tiles, cross-faded over their overlap.

    The tiles are decoded by diffusers, so this checks the tiling and blending against an explicit formula.
    """
    latents = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        left = reference_decode(models.reference, latents[..., :4])
        right = reference_decode(models.reference, latents[..., 2:])
        actual = models.lda.tiled_decode(latents, tile_size=32, overlap=16)
    weight = ramp(16)
    expected = torch.cat(
        [left[..., :16], left[..., 16:] * (1 - weight) + right[..., :16] * weight, right[..., 16:]], dim=-1
    )
    assert_matches(actual, expected)


def test_tiled_encode_blends_two_tiles_linearly(models: Models) -> None:
    """48x32 image (height x width) in 32x32 tiles overlapping by 16 pixels, i.e. 2 latents."""
    x = smooth_images(torch.Generator().manual_seed(10), 1, 48, 32)
    with torch.no_grad():
        top = reference_encode(models.reference, x[:, :, :32])
        bottom = reference_encode(models.reference, x[:, :, 16:])
        actual = models.lda.tiled_encode(x, tile_size=32, overlap=16)
    weight = ramp(2)[:, None]
    expected = torch.cat([top[:, :, :2], top[:, :, 2:] * (1 - weight) + bottom[:, :, :2] * weight, bottom[:, :, 2:]], 2)
    assert_matches(actual, expected)


def test_tiled_is_exact_within_one_tile(models: Models) -> None:
    x = smooth_images(torch.Generator().manual_seed(11), 1, 32, 48)
    with torch.no_grad():
        latents = models.lda.encode(x)
        assert torch.equal(models.lda.tiled_encode(x, tile_size=(32, 48), overlap=8), latents)
        assert torch.equal(models.lda.tiled_decode(latents), models.lda.decode(latents))


def test_tiling_is_as_close_to_untiled_as_diffusers(models: Models) -> None:
    """A 48x64 image (height x width) in 32x32 tiles overlapping by 8 pixels: a 2x3 grid of full tiles for us, a 2x3
    grid whose last row and column are thinner (24 and 16 pixels) for diffusers' tiled VAE with the same settings.

    Tiling is an approximation (each tile is normalized and attended over on its own), so both tiled results are
    compared with the untiled one: ours must not be further from it than diffusers' (mean absolute difference). Over
    seeds 12-14, ours is 0.70-0.84 times diffusers' for encoding and 0.87-0.89 times for decoding.
    """
    x = smooth_images(torch.Generator().manual_seed(12), 1, 48, 64)
    reference = models.reference
    with torch.no_grad():
        latents = reference_encode(reference, x)
        image = reference_decode(reference, latents)
        assert_matches(models.lda.encode(x), latents)
        assert_matches(models.lda.decode(latents), image)
        ours_latents = models.lda.tiled_encode(x, tile_size=32, overlap=8)
        ours_image = models.lda.tiled_decode(latents, tile_size=32, overlap=8)
        use_tiling(reference, tile_size=32, overlap=8)
        try:
            diffusers_latents = reference_encode(reference, x)
            diffusers_image = reference_decode(reference, latents)
        finally:
            reference.disable_tiling()
    assert ours_latents.shape == diffusers_latents.shape == latents.shape
    assert ours_image.shape == diffusers_image.shape == image.shape
    ours_error, diffusers_error = (ours_latents - latents).abs().mean(), (diffusers_latents - latents).abs().mean()
    assert 0 < ours_error <= diffusers_error
    ours_error, diffusers_error = (ours_image - image).abs().mean(), (diffusers_image - image).abs().mean()
    assert 0 < ours_error <= diffusers_error


def test_tiled_pil_methods(models: Models) -> None:
    image = pil_images(1, 48, 32)[0]
    with torch.no_grad():
        latents = models.lda.tiled_image_to_latents(image, tile_size=32, overlap=16)
        assert torch.equal(latents, models.lda.tiled_encode(image_to_tensor(image) * 2 - 1, tile_size=32, overlap=16))
        decoded = models.lda.tiled_decode_latents(latents, tile_size=32, overlap=16)
        tensor_path = tensor_to_image((models.lda.tiled_decode(latents, tile_size=32, overlap=16) + 1) / 2)
    assert np.array_equal(np.asarray(decoded), np.asarray(tensor_path))


def test_docstring_example_runs() -> None:
    docstring = LatentDiffusionAutoencoder.__doc__
    assert docstring is not None
    (example,) = re.findall(r"```py\n(.*?)```", docstring, flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), "<LatentDiffusionAutoencoder example>", "exec"), {})


# -- errors ----------------------------------------------------------------------------------------------------


def test_size_not_a_multiple_of_8() -> None:
    lda = SD1Autoencoder(device="meta")
    with pytest.raises(ValueError, match=r"multiples of 8, got 100x70 \(width x height\).*resize or crop.*96x64"):
        lda.image_to_latents(Image.new("RGB", (100, 70)))
    with pytest.raises(ValueError, match=r"multiples of 8, got 40x36.*x\[\.\.\., :32, :40\]"):
        lda.encode(torch.zeros(1, 3, 36, 40, device="meta"))
    with pytest.raises(ValueError, match=r"multiples of 8, got 20x16"):
        lda.tiled_image_to_latents(Image.new("RGB", (20, 16)))


def test_wrong_inputs() -> None:
    lda = SD1Autoencoder(device="meta")
    with pytest.raises(ValueError, match=r"3 channels, got a 'RGBA' image: convert it first"):
        lda.image_to_latents(Image.new("RGBA", (32, 32)))
    with pytest.raises(ValueError, match=r"encode takes images \(batch, 3, height, width\).*\(3, 32, 32\)"):
        lda.encode(torch.zeros(3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match=r"decode takes latents \(batch, 4, height, width\), got shape \(1, 8, 4, 4\)"):
        lda.decode(torch.zeros(1, 8, 4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"batch of one, got a batch of 2: use latents_to_images"):
        lda.decode_latents(torch.zeros(2, 4, 4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"generator but sample=False: pass sample=True"):
        lda.encode(torch.zeros(1, 3, 32, 32, device="meta"), generator=torch.Generator())


def test_wrong_tiles() -> None:
    lda = SD1Autoencoder(device="meta")
    latents = torch.zeros(1, 4, 8, 8, device="meta")
    with pytest.raises(ValueError, match=r"multiples of 8.*tile_size=100, overlap=16"):
        lda.tiled_decode(latents, tile_size=100, overlap=16)
    with pytest.raises(ValueError, match=r"multiples of 8.*overlap=12"):
        lda.tiled_decode(latents, tile_size=64, overlap=12)
    with pytest.raises(ValueError, match=r"overlap must be smaller than the tile, got overlap=64"):
        lda.tiled_decode(latents, tile_size=(64, 128), overlap=64)
