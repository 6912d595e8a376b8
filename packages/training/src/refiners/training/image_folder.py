"""Captioned image folders: find the images and their captions, with errors that say how to fix the folder.

A folder is read in either of two conventions (both may be mixed in one folder):

- Hugging Face `imagefolder`: a `metadata.jsonl` with one JSON object per line, whose `file_name` is the image path
  relative to the folder holding that `metadata.jsonl`, and whose `text` (or another `caption_column`) is the caption.
- Sidecar files: `photo.txt` next to `photo.jpg` holds its caption.

When an image has both, the `metadata.jsonl` line wins. Images are found recursively (`.jpg`, `.jpeg`, `.png`, `.webp`,
`.bmp`, in any case); hidden files and folders (a name starting with ".") are skipped, so a cache may live inside.
"""

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from refiners.training.errors import Setting, TrainingSetupError

__all__ = [
    "IMAGE_EXTENSIONS",
    "METADATA_FILE",
    "ImageFolderError",
    "CaptionedImageFile",
    "find_captioned_images",
    "open_image",
    "upright_size",
    "readable_images",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
METADATA_FILE = "metadata.jsonl"
# How many offending files an error lists before it says "and N more".
_MAX_LISTED = 5


class ImageFolderError(TrainingSetupError):
    """A training image folder cannot be read as it is: the message says what, where, and how to fix it."""


@dataclass(frozen=True)
class CaptionedImageFile:
    """An image file of a training folder and its caption.

    Attributes:
        path: The image file.
        caption: Its caption (from `metadata.jsonl` or a `.txt` sidecar), stripped of surrounding whitespace.
    """

    path: Path
    caption: str


def find_captioned_images(folder: str | Path, caption_column: str = "text") -> list[CaptionedImageFile]:
    """Every image under `folder` with its caption, sorted by relative path (see the module docstring).

    Args:
        folder: The image folder.
        caption_column: The `metadata.jsonl` field that holds captions.

    Raises:
        ImageFolderError: The folder is missing or holds no image; a `metadata.jsonl` line is not valid JSON, lacks
            `file_name` or the caption, names a missing file or names one file twice; an image has no caption.
    """
    root = Path(folder)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ImageFolderError(f"the image folder {root} {what}: pass the folder that holds the training images")
    images, metadata_files = _walk(root)
    if not images:
        raise ImageFolderError(
            f"no images found in {root} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}, in any "
            "case, skipping hidden folders): check the path, or add images"
        )
    known = {_normalized(path) for path in images}
    captions: dict[Path, str] = {}
    for metadata_file in metadata_files:
        _read_metadata(metadata_file, caption_column, known, captions)
    files: list[CaptionedImageFile] = []
    uncaptioned: list[Path] = []
    for path in images:
        caption = captions.get(_normalized(path))
        if caption is None and (sidecar := path.with_suffix(".txt")).is_file():
            caption = _read_sidecar(sidecar)
        if caption is None:
            uncaptioned.append(path)
        else:
            files.append(CaptionedImageFile(path=path, caption=caption))
    if uncaptioned:
        example = uncaptioned[0].relative_to(root)
        raise ImageFolderError(
            f"{len(uncaptioned)} image(s) in {root} have no caption: {_listing(uncaptioned, root)}. Give each one "
            f"a caption: a sidecar file {example.with_suffix('.txt').as_posix()} next to {example.as_posix()}, or a "
            f'line {{"file_name": "{example.as_posix()}", "{caption_column}": "..."}} in {root / METADATA_FILE}'
        )
    return files


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    images: list[Path] = []
    metadata_files: list[Path] = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            path = Path(directory) / name
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
            elif name == METADATA_FILE:
                metadata_files.append(path)
            elif name == "metadata.csv":
                # Hugging Face also accepts a CSV; reading captions from only some files would be worse than failing.
                raise ImageFolderError(
                    f"{path}: metadata.csv is not read; convert it to {METADATA_FILE} (one JSON object per line "
                    'with "file_name" and "text"), e.g. with pandas: '
                    "`pd.read_csv(path).to_json(jsonl_path, orient='records', lines=True)`"
                )
    images.sort(key=lambda path: path.relative_to(root).as_posix())
    metadata_files.sort(key=lambda path: path.relative_to(root).as_posix())
    return images, metadata_files


def _normalized(path: Path) -> Path:
    return Path(os.path.normpath(path.absolute()))


def _read_metadata(metadata_file: Path, caption_column: str, known: set[Path], captions: dict[Path, str]) -> None:
    """Add the captions of a `metadata.jsonl` to `captions`, checking every line."""
    missing: list[str] = []
    origin: dict[Path, int] = {}
    with metadata_file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{metadata_file}, line {number}"
            try:
                record: Any = json.loads(line)
            except json.JSONDecodeError as error:
                raise ImageFolderError(
                    f"{where} is not valid JSON ({error.msg}): each line must be one JSON object, e.g. "
                    f'{{"file_name": "image.png", "{caption_column}": "a caption"}}'
                ) from error
            if not isinstance(record, dict):
                raise ImageFolderError(f"{where} is a JSON {type(record).__name__}, not an object with file_name")
            fields: dict[str, Any] = record
            file_name, caption = fields.get("file_name"), fields.get(caption_column)
            if not isinstance(file_name, str) or not isinstance(caption, str):
                absent = [key for key, value in (("file_name", file_name), (caption_column, caption)) if value is None]
                problem = f"lacks {' and '.join(absent)}" if absent else "has a file_name or caption that is no string"
                hint = ("; pass ", Setting("caption_column", "<field>"), " to read captions from another field")
                raise ImageFolderError(
                    f"{where} {problem} (its fields: {', '.join(fields) or 'none'}): each line needs a string "
                    f'"file_name" and a string "{caption_column}"',
                    *(hint if caption_column in absent else ()),
                )
            path = _normalized(metadata_file.parent / file_name)
            if path not in known:
                missing.append(f"{file_name} (line {number})" + (", not a supported image" if path.exists() else ""))
                continue
            if (previous := origin.get(path)) is not None or path in captions:
                other = f"line {previous}" if previous is not None else "another metadata.jsonl"
                raise ImageFolderError(
                    f"{where} gives a second caption to {file_name} (first in {other}): keep one line per image"
                )
            origin[path] = number
            captions[path] = caption.strip()
    if missing:
        raise ImageFolderError(
            f"{metadata_file} names {len(missing)} file(s) that are not images of the folder: "
            f"{_listing(missing)}. file_name is relative to the folder of {METADATA_FILE}; fix the names, or "
            f"remove the lines of deleted images (supported images: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )


def _read_sidecar(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as error:
        raise ImageFolderError(
            f"the caption file {path} is not UTF-8 text ({error.reason}): save it as UTF-8"
        ) from error


def _listing(items: Sequence[Path | str], root: Path | None = None) -> str:
    names = [item.relative_to(root).as_posix() if isinstance(item, Path) and root else str(item) for item in items]
    listed = ", ".join(names[:_MAX_LISTED])
    return listed + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def open_image(path: Path) -> Image.Image:
    """An image file as an upright RGB image: its EXIF orientation applied, alpha dropped (as diffusers does)."""
    try:
        with Image.open(path) as file:
            image = ImageOps.exif_transpose(file)
            return image.convert("RGB")
    except Exception as error:  # Pillow raises many kinds on bad files (OSError, SyntaxError, struct.error, ...).
        raise ImageFolderError(
            f"cannot read the image {path} ({type(error).__name__}: {error}): replace or remove the file, or pass ",
            Setting("skip_unreadable", True),
            " to leave unreadable images out (with a warning)",
        ) from error


# EXIF orientations that turn the image a quarter (transpose, rotate 90, transverse, rotate 270): width and height swap.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112


def upright_size(path: Path) -> tuple[int, int]:
    """`(width, height)` of `open_image(path)`, read from the file's header (EXIF orientation applied), not decoded."""
    try:
        with Image.open(path) as file:
            width, height = file.size
            turned = file.getexif().get(_ORIENTATION_TAG) in _QUARTER_TURNS
    except Exception as error:  # see `open_image`
        raise ImageFolderError(
            f"cannot read the image {path} ({type(error).__name__}: {error}): replace or remove the file, or pass ",
            Setting("skip_unreadable", True),
            " to leave unreadable images out (with a warning)",
        ) from error
    return (height, width) if turned else (width, height)


def readable_images(files: list[CaptionedImageFile], root: Path, skip_unreadable: bool) -> list[CaptionedImageFile]:
    """`files` if every image can be opened, else an error naming those that cannot.

    Args:
        files: Images of the folder `root`.
        root: The folder (for the messages).
        skip_unreadable: Decode every image fully, and leave out, with a warning, those that fail; otherwise read
            only the headers (the whole image is decoded when used).
    """
    unreadable: list[tuple[CaptionedImageFile, Exception]] = []
    for file in files:
        try:
            with Image.open(file.path) as image:
                if skip_unreadable:
                    image.load()
        except Exception as error:  # see `open_image`
            unreadable.append((file, error))
    if not unreadable:
        return files
    listing = _listing([f"{file.path.relative_to(root).as_posix()} ({error})" for file, error in unreadable])
    if not skip_unreadable:
        raise ImageFolderError(
            f"{len(unreadable)} image(s) in {root} cannot be read: {listing}. Replace or remove them, or pass ",
            Setting("skip_unreadable", True),
            " to leave them out (with a warning)",
        )
    if len(unreadable) == len(files):
        raise ImageFolderError(f"no image of {root} can be read: {listing}")
    warnings.warn(f"leaving out {len(unreadable)} unreadable image(s) of {root}: {listing}", stacklevel=3)
    left_out = {id(file) for file, _ in unreadable}
    return [file for file in files if id(file) not in left_out]
