"""A small captioned image folder of colored shapes, generated: for tests, examples and first runs of the trainer."""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw

__all__ = ["FolderConvention", "SampleImageFolder", "make_image_folder"]

FolderConvention = Literal["metadata", "sidecar"]


@dataclass(frozen=True)
class SampleImageFolder:
    """A folder written by `make_image_folder`.

    Attributes:
        path: The folder.
        captions: The caption of each image, by its path relative to `path` (POSIX separators), in the order written.
        convention: Where the captions are: "metadata" (`metadata.jsonl`) or "sidecar" (`.txt` files).
    """

    path: Path
    captions: dict[str, str]
    convention: FolderConvention


# Named colors, so that a caption says exactly what the image shows.
_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "purple": (130, 50, 170),
    "orange": (240, 140, 30),
}
_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
_SHAPES = ("circle", "square", "triangle")


def make_image_folder(
    path: str | Path,
    n: int = 24,
    size: int = 64,
    convention: FolderConvention = "metadata",
    subfolders: bool = False,
    seed: int = 0,
) -> SampleImageFolder:
    """Write `n` images of a colored shape on a plain background, each captioned with what it shows.

    The images alternate between PNG and JPEG, and between square, landscape and portrait frames (`size` x `size`,
    `size` x 3/4 `size`, 3/4 `size` x `size`), so that a reader meets both formats and every resize path. Captions
    read like "a red circle on a white background".

    Args:
        path: The folder to fill (created if needed).
        n: How many images.
        size: The longer side of every image, in pixels.
        convention: "metadata" writes one `metadata.jsonl` at the root (the Hugging Face `imagefolder` layout, with
            `file_name` and `text`); "sidecar" writes a `.txt` caption next to each image.
        subfolders: Put each image in a subfolder named after its shape (`circle/0003.png`).
        seed: Draws the colors, shapes and positions: the same seed writes the same folder.

    Returns:
        The folder, with the caption of each image.

    Example:
        ```py
        import tempfile

        from refiners.training.sample_data import make_image_folder

        with tempfile.TemporaryDirectory() as folder:
            sample = make_image_folder(folder, n=3)
            assert list(sample.captions) == ["0000.png", "0001.jpg", "0002.png"]
        ```
    """
    if n < 1:
        raise ValueError(f"make_image_folder needs n >= 1 images, got {n}")
    if size < 8:
        raise ValueError(f"make_image_folder needs size >= 8 pixels, got {size}")
    if convention not in ("metadata", "sidecar"):
        raise ValueError(f"convention must be 'metadata' or 'sidecar', got {convention!r}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    short = size * 3 // 4
    frames = [(size, size), (size, short), (short, size)]
    captions: dict[str, str] = {}
    for index in range(n):
        color, background, shape = rng.choice(list(_COLORS)), rng.choice(list(_BACKGROUNDS)), rng.choice(_SHAPES)
        image = _draw(frames[index % len(frames)], _COLORS[color], _BACKGROUNDS[background], shape, rng)
        name = f"{index:04d}.{'png' if index % 2 == 0 else 'jpg'}"
        relative = f"{shape}/{name}" if subfolders else name
        file = root / relative
        file.parent.mkdir(parents=True, exist_ok=True)
        image.save(file, quality=95)  # PNG ignores `quality`
        caption = f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape} on a {background} background"
        if convention == "sidecar":
            file.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        captions[relative] = caption
    if convention == "metadata":
        lines = [json.dumps({"file_name": relative, "text": caption}) for relative, caption in captions.items()]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return SampleImageFolder(path=root, captions=captions, convention=convention)


def _draw(
    frame: tuple[int, int],
    color: tuple[int, int, int],
    background: tuple[int, int, int],
    shape: str,
    rng: random.Random,
) -> Image.Image:
    width, height = frame
    image = Image.new("RGB", frame, background)
    extent = rng.randint(min(frame) // 3, min(frame) * 2 // 3)
    left, top = rng.randint(0, width - extent), rng.randint(0, height - extent)
    box = (left, top, left + extent - 1, top + extent - 1)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(left + extent // 2, top), (left, box[3]), (box[2], box[3])], fill=color)
    return image
