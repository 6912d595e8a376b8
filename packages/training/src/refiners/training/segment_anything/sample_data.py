"""A generated segmentation dataset: colored shapes on colored backgrounds, and their masks, for tests and demos."""

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from refiners.training.segment_anything.data import IMAGES_FOLDER, MASKS_FOLDER

__all__ = ["make_mask_folder"]


def _shape(kind: int, size: int, generator: torch.Generator) -> Tensor:
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    low, high = size // 6, size - size // 6
    x0, y0 = (int(v) for v in torch.randint(low, size // 2, (2,), generator=generator))
    x1, y1 = (int(v) for v in torch.randint(size // 2 + 2, high, (2,), generator=generator))
    if kind == 0:  # a rectangle
        return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2  # an ellipse
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1


def make_mask_folder(folder: str | Path, n: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write `n` images of `size` x `size` pixels, each a rectangle or an ellipse of one color on a noisy background
    of another, to `folder/images/NNN.png`, and the shape's binary mask (0 or 255) to `folder/masks/NNN.png`.

    Args:
        folder: The dataset folder (created if needed).
        n: The number of images.
        size: Their side in pixels.
        seed: The seed of the shapes, colors and noise.

    Returns:
        The folder.
    """
    root = Path(folder)
    (root / IMAGES_FOLDER).mkdir(parents=True, exist_ok=True)
    (root / MASKS_FOLDER).mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for index in range(n):
        mask = _shape(index % 2, size, generator)
        background, foreground = torch.rand(2, 3, 1, 1, generator=generator) * 255
        noise = torch.randn(3, size, size, generator=generator) * 12
        pixels = torch.where(mask, foreground, background) + noise
        rgb = pixels.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
        Image.frombytes("RGB", (size, size), bytes(rgb.flatten().tolist())).save(
            root / IMAGES_FOLDER / f"{index:03d}.png"
        )
        gray = (mask.to(torch.uint8) * 255).contiguous()
        Image.frombytes("L", (size, size), bytes(gray.flatten().tolist())).save(
            root / MASKS_FOLDER / f"{index:03d}.png"
        )
    return root
