"""The released DINOv2 models, by size, with and without registers, and their image preprocessing.

Each class fixes the sizes of one of facebook's checkpoints (`dinov2_vits14`, `..._reg`, ...; transformers'
`facebook/dinov2-small`, `facebook/dinov2-with-registers-small`, ...): patch 14, position embeddings learned at 518
pixels, LayerNorm epsilon 1e-6, layer scale; giant's MLP is SwiGLU. The `_reg` models have 4 registers and resample
their position embeddings with antialiasing, as their references do. `TINY` is the architecture at toy size, shared by
the tests, examples and the README.

Example:
    ```py
    import torch
    from refiners.foundationals.dinov2 import DINOv2_small_reg

    model = DINOv2_small_reg(device="meta")  # sizes only; `ViT.from_safetensors` loads converted weights
    assert (model.embedding_dim, model.num_layers, model.num_registers) == (384, 12, 4)
    assert model.num_tokens(224, 224) == 1 + 4 + 16 * 16
    ```
"""

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.functional import interpolate

from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import image_to_tensor
from refiners.foundationals.dinov2.vit import ViT

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DINOv2_small",
    "DINOv2_base",
    "DINOv2_large",
    "DINOv2_giant",
    "DINOv2_small_reg",
    "DINOv2_base_reg",
    "DINOv2_large_reg",
    "DINOv2_giant_reg",
    "DINOV2_CLASSES",
    "TINY",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "preprocess",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PATCH_SIZE = 14
_IMAGE_SIZE = 518


class DINOv2_small(ViT):  # noqa: N801 (the original Refiners' names)
    """DINOv2 ViT-S/14 (`dinov2_vits14`, `facebook/dinov2-small`): 384 wide, 12 layers, 6 heads, 22M parameters.

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            embedding_dim=384,
            patch_size=_PATCH_SIZE,
            image_size=_IMAGE_SIZE,
            num_layers=12,
            num_heads=6,
            device=device,
            dtype=dtype,
        )


class DINOv2_base(ViT):  # noqa: N801 (the original Refiners' names)
    """DINOv2 ViT-B/14 (`dinov2_vitb14`, `facebook/dinov2-base`): 768 wide, 12 layers, 12 heads, 86M parameters.

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            embedding_dim=768,
            patch_size=_PATCH_SIZE,
            image_size=_IMAGE_SIZE,
            num_layers=12,
            num_heads=12,
            device=device,
            dtype=dtype,
        )


class DINOv2_large(ViT):  # noqa: N801 (the original Refiners' names)
    """DINOv2 ViT-L/14 (`dinov2_vitl14`, `facebook/dinov2-large`): 1024 wide, 24 layers, 16 heads, 300M parameters.

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            embedding_dim=1024,
            patch_size=_PATCH_SIZE,
            image_size=_IMAGE_SIZE,
            num_layers=24,
            num_heads=16,
            device=device,
            dtype=dtype,
        )


class DINOv2_giant(ViT):  # noqa: N801 (the original Refiners' names)
    """DINOv2 ViT-g/14 (`dinov2_vitg14`, `facebook/dinov2-giant`): 1536 wide, 40 layers, 24 heads, a SwiGLU MLP of
    4096, 1.1B parameters.

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            embedding_dim=1536,
            patch_size=_PATCH_SIZE,
            image_size=_IMAGE_SIZE,
            num_layers=40,
            num_heads=24,
            feedforward="swiglu",
            device=device,
            dtype=dtype,
        )


class DINOv2_small_reg(ViT):  # noqa: N801 (the original Refiners' names)
    """DINOv2 ViT-S/14 with 4 registers (`dinov2_vits14_reg`, `facebook/dinov2-with-registers-small`).

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            embedding_dim=384,
            patch_size=_PATCH_SIZE,
            image_size=_IMAGE_SIZE,
            num_layers=12,
            num_heads=6,
            num_registers=4,
            interpolate_antialias=True,
            device=device,
            dtype=dtype,
        )


class DINOv2_base_reg(ViT):  # noqa: N801 (the original Refiners' names)
    """DINOv2 ViT-B/14 with 4 registers (`dinov2_vitb14_reg`, `facebook/dinov2-with-registers-base`).

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            embedding_dim=768,
            patch_size=_PATCH_SIZE,
            image_size=_IMAGE_SIZE,
            num_layers=12,
            num_heads=12,
            num_registers=4,
            interpolate_antialias=True,
            device=device,
            dtype=dtype,
        )


class DINOv2_large_reg(ViT):  # noqa: N801 (the original Refiners' names)
    """DINOv2 ViT-L/14 with 4 registers (`dinov2_vitl14_reg`, `facebook/dinov2-with-registers-large`).

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            embedding_dim=1024,
            patch_size=_PATCH_SIZE,
            image_size=_IMAGE_SIZE,
            num_layers=24,
            num_heads=16,
            num_registers=4,
            interpolate_antialias=True,
            device=device,
            dtype=dtype,
        )


class DINOv2_giant_reg(ViT):  # noqa: N801 (the original Refiners' names)
    """DINOv2 ViT-g/14 with 4 registers (`dinov2_vitg14_reg`, `facebook/dinov2-with-registers-giant`).

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            embedding_dim=1536,
            patch_size=_PATCH_SIZE,
            image_size=_IMAGE_SIZE,
            num_layers=40,
            num_heads=24,
            num_registers=4,
            feedforward="swiglu",
            interpolate_antialias=True,
            device=device,
            dtype=dtype,
        )


DINOV2_CLASSES: tuple[type[ViT], ...] = (
    ViT,
    DINOv2_small,
    DINOv2_base,
    DINOv2_large,
    DINOv2_giant,
    DINOv2_small_reg,
    DINOv2_base_reg,
    DINOv2_large_reg,
    DINOv2_giant_reg,
)
"""The classes a converted DINOv2 file may record (see `ViT.from_safetensors`): the presets, and `ViT` for others."""

TINY = ModelConfig.of(ViT, embedding_dim=32, patch_size=14, image_size=56, num_layers=2, num_heads=2)
"""DINOv2's architecture at toy size (32 wide, 2 layers, a 4 x 4 grid of learned positions), for tests and examples."""


def _rgb(image: "Image.Image") -> "Image.Image":
    """`image` in RGB, transparency composited onto white (transformers' `convert_to_rgb`, not Pillow's `convert`,
    which keeps the colours under transparent pixels)."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    from PIL import Image

    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def preprocess(image: "Image.Image", size: int = 224) -> Tensor:
    """An image as DINOv2 takes it: `(1, 3, size, size)`, as transformers' `AutoImageProcessor` for DINOv2 does.

    The shorter side is resized to `size * 8 // 7` pixels (256 for 224: facebook's evaluation transform, transformers'
    `BitImageProcessor` with `shortest_edge=256`), bicubic with antialiasing, rounded to 8 bits; the centre
    `size` x `size` square is cropped, then normalized with ImageNet's mean and standard deviation.

    Args:
        image: Any PIL image (converted to RGB, transparent pixels made white).
        size: The side of the square the model sees; a multiple of 14 keeps every pixel in a patch (224, 448, 518).
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    pixels = (image_to_tensor(_rgb(image)) * 255).round().to(torch.uint8)
    height, width = pixels.shape[-2:]
    short = size * 8 // 7
    # The longer side truncated, as transformers' `get_resize_output_image_size` (torchvision's Resize) computes it.
    resized = (int(short * height / width), short) if width <= height else (short, int(short * width / height))
    if resized != (height, width):
        # uint8 in, uint8 out (rounded), as torchvision's bicubic resize of an 8-bit image on the CPU.
        pixels = interpolate(pixels, size=resized, mode="bicubic", align_corners=False, antialias=True)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    pixels = pixels[..., top : top + size, left : left + size]
    # The rescaling by 1/255 folded into the statistics, as transformers' fused rescale-and-normalize.
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (pixels.float() - mean) / std
