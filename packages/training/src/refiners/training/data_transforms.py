"""The image transform of text-to-image training: resize, crop, flip, scale to [-1, 1]; reproducible from a seed.

It follows diffusers' `train_text_to_image.py` (torchvision's `Resize(resolution, BILINEAR)`, then `CenterCrop` or
`RandomCrop`, `RandomHorizontalFlip`, `ToTensor`, `Normalize([0.5], [0.5])`) with Pillow alone, to the pixel.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from PIL import Image
from torch import Tensor

from refiners.fluxion.utils import image_to_tensor
from refiners.training.errors import Setting, TrainingSetupError

__all__ = [
    "Interpolation",
    "Crop",
    "ImageTransform",
    "resized_size",
    "center_crop_offsets",
    "seeded_generator",
]

Interpolation = Literal["bilinear", "bicubic", "lanczos"]

_FILTERS: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# The Stable Diffusion autoencoder downsamples by 8: a side that is not a multiple of 8 has no exact latent.
RESOLUTION_MULTIPLE = 8


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (width, height) that brings the shorter side to `resolution`, keeping the aspect ratio.

    The longer side is truncated, as torchvision's `Resize(int)` does (`int(resolution * long / short)`).

    Args:
        width: The image width.
        height: The image height.
        resolution: The target length of the shorter side.
    """
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def center_crop_offsets(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (left, top) corner of the centered `resolution` x `resolution` crop.

    Half-pixel offsets round half to even, as torchvision's `CenterCrop` does (`int(round((height - size) / 2))`).

    Args:
        width: The image width (at least `resolution`).
        height: The image height (at least `resolution`).
        resolution: The side of the crop.
    """
    return round((width - resolution) / 2), round((height - resolution) / 2)


def seeded_generator(*keys: int | str) -> torch.Generator:
    """A CPU generator seeded from `keys`, e.g. `(seed, epoch, index, "crop")`.

    The keys are hashed rather than summed, so that distinct keys never share a seed (`seed=1, epoch=0` and
    `seed=0, epoch=1` would with `seed + epoch`) and nearby keys give unrelated streams.

    Args:
        *keys: What the randomness depends on, and nothing else.
    """
    digest = hashlib.blake2b(json.dumps(keys).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@dataclass(frozen=True)
class Crop:
    """Where `ImageTransform` takes its square from an image: what SDXL's micro-conditioning (time ids) records.

    Attributes:
        original_size: `(height, width)` of the upright image, before the resize.
        resized_size: `(height, width)` after the resize (the shorter side at the resolution).
        top: The crop's top row in the resized image.
        left: The crop's left column in the resized image, before any flip.
        flipped: Whether the crop is flipped horizontally.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    top: int
    left: int
    flipped: bool

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """`(top, left)` of the crop as diffusers' `train_text_to_image_lora_sdxl.py` records it (`crop_top_lefts`).

        That script flips the resized image, then crops it, and records the corner in the flipped image; this
        transform crops, then flips the crop (as SD1's `train_text_to_image.py` does, to the pixel). The same pixels
        sit at `width - left - side` in the flipped image: that is the corner recorded for a flipped crop, so the time
        ids say where the pixels the UNet sees come from.
        """
        if not self.flipped:
            return self.top, self.left
        side = min(self.resized_size)
        return self.top, self.resized_size[1] - self.left - side


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square, maybe flip, and scale the pixels to [-1, 1].

    Random choices come from the generator passed in, drawn in torchvision's order (crop top, crop left, then flip),
    so that a generator seeded from (seed, epoch, item) makes the same image on every run.

    Args:
        resolution: The side of the square output, a multiple of 8.
        center_crop: Crop the center; otherwise a random square (the whole image along its shorter side).
        random_flip: Flip horizontally with probability 1/2.
        interpolation: The resampling filter of the resize ("bilinear" is diffusers' choice).

    Example:
        ```py
        import torch
        from PIL import Image

        from refiners.training.data_transforms import ImageTransform

        transform = ImageTransform(resolution=16)
        image = transform(Image.new("RGB", (48, 32), (255, 0, 0)), torch.Generator())
        assert image.shape == (3, 16, 16) and image[0].eq(1).all() and image[1:].eq(-1).all()
        ```
    """

    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    interpolation: Interpolation = "bilinear"

    def __post_init__(self) -> None:
        resolution = self.resolution
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TrainingSetupError(Setting("resolution"), f" must be a positive int, got {resolution!r}")
        if resolution % RESOLUTION_MULTIPLE != 0:
            below = resolution - resolution % RESOLUTION_MULTIPLE
            suggestion = f"{below} or {below + RESOLUTION_MULTIPLE}" if below else str(RESOLUTION_MULTIPLE)
            raise TrainingSetupError(
                Setting("resolution"),
                f" must be a multiple of {RESOLUTION_MULTIPLE} (the autoencoder downsamples by "
                f"{RESOLUTION_MULTIPLE}), got {resolution}: use {suggestion}",
            )
        if self.interpolation not in _FILTERS:
            raise TrainingSetupError(
                Setting("interpolation"), f" must be one of {', '.join(_FILTERS)}, got {self.interpolation!r}"
            )

    @property
    def is_random(self) -> bool:
        """Whether two calls on the same image may differ (a random crop or flip)."""
        return not self.center_crop or self.random_flip

    @property
    def fingerprint(self) -> str:
        """A string that changes whenever the output of the transform would: a part of cache keys."""
        return json.dumps(asdict(self), sort_keys=True)

    def crop(self, width: int, height: int, generator: torch.Generator) -> Crop:
        """Where the square of an image of `width` x `height` is taken, drawn from `generator` as `__call__` draws.

        Only the image's size is needed: the crop of an item is known without decoding it.

        Args:
            width: The upright image's width.
            height: The upright image's height.
            generator: The source of the random crop and flip (not drawn from when both are off).
        """
        resolution = self.resolution
        resized_width, resized_height = resized_size(width, height, resolution)
        if self.center_crop:
            left, top = center_crop_offsets(resized_width, resized_height, resolution)
        else:
            top = int(torch.randint(0, resized_height - resolution + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, resized_width - resolution + 1, (1,), generator=generator).item())
        flipped = self.random_flip and torch.rand(1, generator=generator).item() < 0.5
        return Crop((height, width), (resized_height, resized_width), top, left, flipped)

    def with_crop(self, image: Image.Image, generator: torch.Generator) -> tuple[Tensor, Crop]:
        """The transformed image (see `__call__`) and where it was taken from (see `Crop`).

        Args:
            image: An RGB image.
            generator: The source of the random crop and flip (not drawn from when both are off).
        """
        crop = self.crop(*image.size, generator)
        resolution = self.resolution
        size = (crop.resized_size[1], crop.resized_size[0])
        if size != image.size:
            image = image.resize(size, _FILTERS[self.interpolation])
        image = image.crop((crop.left, crop.top, crop.left + resolution, crop.top + resolution))
        # ToTensor then Normalize(0.5, 0.5): (x - 0.5) / 0.5 is exactly x * 2 - 1 in floating point.
        tensor = image_to_tensor(image)[0] * 2 - 1
        return (tensor.flip(-1) if crop.flipped else tensor), crop

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Tensor:
        """The transformed image, a `3 x resolution x resolution` float32 tensor in [-1, 1].

        Args:
            image: An RGB image.
            generator: The source of the random crop and flip (not drawn from when both are off).
        """
        return self.with_crop(image, generator)[0]
