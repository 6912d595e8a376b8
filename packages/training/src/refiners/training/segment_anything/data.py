"""Images and their binary masks for fine-tuning Segment Anything, with the prompts SAM is trained on.

The layout of a dataset folder:

    dataset/
      images/  cat.jpg  dog.png  ...   (any of .jpg, .jpeg, .png, .webp, .bmp)
      masks/   cat.png  dog.png  ...   (the same stems; one object per mask: nonzero pixels, or palette indices)

Each image is prepared as `SegmentAnything.preprocess` prepares it (longest side to the model's `image_size` with
Pillow's bilinear filter, normalized with SAM's pixel statistics, zero-padded at the bottom and right) and its mask
likewise (nearest neighbour, padded with background). The prompt is derived from the mask in the image's own pixels,
then mapped into the model's input frame as `SegmentAnything.prompt_points` maps a user's prompt: its bounding box
(with SAM's training noise, optionally), or points drawn inside the object.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

import torch
from lightning import LightningDataModule
from PIL import Image, ImageOps
from torch import Tensor
from torch.nn.functional import interpolate, pad
from torch.utils.data import Dataset

from refiners.foundationals.segment_anything import PIXEL_MEAN, PIXEL_STD, PointType
from refiners.foundationals.segment_anything.model import resized_size
from refiners.training.data import EpochSampler, ItemKey, ResumableDataLoader
from refiners.training.data_transforms import seeded_generator
from refiners.training.errors import Setting, TrainingSetupError
from refiners.training.image_folder import IMAGE_EXTENSIONS, ImageFolderError, open_image

__all__ = [
    "IMAGES_FOLDER",
    "MASKS_FOLDER",
    "PromptKind",
    "MaskedImageFile",
    "MaskItem",
    "MaskBatch",
    "find_masked_images",
    "read_mask",
    "MaskDataset",
    "MaskDataModule",
]

IMAGES_FOLDER = "images"
MASKS_FOLDER = "masks"

PromptKind = Literal["box", "points"]
"""The prompt derived from each mask: its bounding box, or foreground points drawn inside it."""

# SAM's training boxes (Kirillov et al., 2023, appendix A): noise of standard deviation `box_noise` times the box's
# side on each coordinate, at most this many pixels.
_MAX_BOX_NOISE = 20.0


@dataclass(frozen=True)
class MaskedImageFile:
    """An image of a dataset and the file of its mask."""

    image: Path
    mask: Path


def _invalid(message: str) -> TrainingSetupError:
    return TrainingSetupError(
        message, ": fix or remove the file, or pass ", Setting("skip_invalid", True), " to leave such images out"
    )


def read_mask(path: Path) -> Tensor:
    """The boolean mask `(height, width)` of a mask file, upright (EXIF orientation applied): a pixel is the object
    when it is not zero (a palette image's index, else its grayscale value).

    Args:
        path: The mask file.

    Raises:
        TrainingSetupError: The file cannot be read.
    """
    try:
        with Image.open(path) as file:
            image = ImageOps.exif_transpose(file)
            if image.mode != "P":
                image = image.convert("L")
            values = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            return values.reshape(image.height, image.width) != 0
    except Exception as error:  # Pillow raises many kinds on bad files (OSError, SyntaxError, ...)
        raise _invalid(f"cannot read the mask {path} ({type(error).__name__}: {error})") from error


def find_masked_images(folder: str | Path, skip_invalid: bool = False) -> list[MaskedImageFile]:
    """The images of `folder/images` with their mask in `folder/masks` (same stem), sorted by stem; every mask is
    read once, to check it matches its image and holds an object.

    Args:
        folder: The dataset folder (see the module's documentation).
        skip_invalid: Leave out, with a warning, the images whose mask is missing, unreadable, empty or of another
            size; otherwise the first one is an error that names it.

    Raises:
        TrainingSetupError: The folder does not have the layout, or a mask is not usable (without `skip_invalid`).
    """
    root = Path(folder)
    images_folder, masks_folder = root / IMAGES_FOLDER, root / MASKS_FOLDER
    for needed in (images_folder, masks_folder):
        if not needed.is_dir():
            raise TrainingSetupError(
                f"{root} has no {needed.name}/ folder: a dataset holds images/ and masks/, with the same file names "
                "(masks/cat.png for images/cat.jpg); pass another ",
                Setting("data_dir", "<folder>"),
            )
    images = sorted(
        (path for path in images_folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()),
        key=lambda path: path.stem,
    )
    if not images:
        raise TrainingSetupError(
            f"no images in {images_folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); pass another ",
            Setting("data_dir", "<folder>"),
        )
    masks = {path.stem: path for path in masks_folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS}
    found: list[MaskedImageFile] = []
    for image in images:
        try:
            mask = masks.get(image.stem)
            if mask is None:
                raise _invalid(f"{image} has no mask: expected {masks_folder / image.stem}.png")
            pixels = read_mask(mask)
            try:
                with Image.open(image) as file:
                    size = ImageOps.exif_transpose(file).size
            except Exception as error:  # see `read_mask`
                raise _invalid(f"cannot read the image {image} ({type(error).__name__}: {error})") from error
            if (pixels.shape[1], pixels.shape[0]) != size:
                raise _invalid(
                    f"the mask {mask} is {pixels.shape[1]}x{pixels.shape[0]} but its image {image} is "
                    f"{size[0]}x{size[1]}"
                )
            if not pixels.any():
                raise _invalid(f"the mask {mask} is empty (no nonzero pixel): no prompt can be derived from it")
        except TrainingSetupError:
            if not skip_invalid:
                raise
            warnings.warn(f"{image}: left out (skip_invalid=True)", stacklevel=2)
            continue
        found.append(MaskedImageFile(image, mask))
    if not found:
        raise TrainingSetupError(f"no image of {images_folder} has a usable mask in {masks_folder}")
    return found


class MaskItem(TypedDict):
    """An item of `MaskDataset`, in the model's input frame (`image_size` square): the image, its mask, and the
    prompt derived from the mask (`coordinates` `(points, 2)` as `(x, y)`, `types` of `PointType`)."""

    image: Tensor  # 3 x S x S, normalized, padded
    mask: Tensor  # 1 x S x S, float 0/1, padded with 0
    coordinates: Tensor  # points x 2, float32
    types: Tensor  # points, int64


class MaskBatch(TypedDict):
    """A batch of `MaskItem`s, each stacked along a first batch dimension."""

    images: Tensor
    masks: Tensor
    coordinates: Tensor
    types: Tensor


def _collate(items: list[MaskItem]) -> MaskBatch:
    return MaskBatch(
        images=torch.stack([item["image"] for item in items]),
        masks=torch.stack([item["mask"] for item in items]),
        coordinates=torch.stack([item["coordinates"] for item in items]),
        types=torch.stack([item["types"] for item in items]),
    )


class MaskDataset(Dataset[MaskItem]):
    """The images of a dataset folder with their masks and prompts (see the module's documentation).

    The random draws of an item (the box noise, the points) depend only on (`seed`, epoch, index): index it with an
    `ItemKey(index, epoch)` (as `EpochSampler` does) for new draws each epoch; a plain int index means epoch 0.

    Args:
        folder: The dataset folder.
        image_size: The model's input side (`SegmentAnything.image_size`: 1024 for SAM).
        prompt: The prompt derived from each mask (see `PromptKind`).
        box_noise: The standard deviation of the noise on each box coordinate, as a fraction of the box's side
            (SAM's training: 0.1, at most 20 pixels); 0 for the exact box.
        num_points: The number of points drawn inside the object (`prompt="points"`).
        seed: The seed of the draws.
        skip_invalid: See `find_masked_images`.
    """

    def __init__(
        self,
        folder: str | Path,
        image_size: int = 1024,
        prompt: PromptKind = "box",
        box_noise: float = 0.0,
        num_points: int = 1,
        seed: int = 0,
        skip_invalid: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.image_size = image_size
        self.prompt: PromptKind = prompt
        self.box_noise = box_noise
        self.num_points = num_points
        self.seed = seed
        self.files = find_masked_images(folder, skip_invalid)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | ItemKey) -> MaskItem:
        index, epoch = (key.index, key.epoch) if isinstance(key, ItemKey) else (key, 0)
        file = self.files[index]
        try:
            image = open_image(file.image)
        except ImageFolderError as error:  # its message names `CaptionedImageDataModule`'s flag: name ours
            raise _invalid(f"cannot read the image {file.image} ({error.__cause__})") from error
        mask = read_mask(file.mask)
        height, width = mask.shape
        new_height, new_width = resized_size(height, width, self.image_size)
        generator = seeded_generator(self.seed, epoch, index, "prompt")
        points, types = self.prompt_points(mask, generator)
        scale = torch.tensor([new_width / width, new_height / height], dtype=torch.float64)
        return MaskItem(
            image=self._image(image, new_height, new_width),
            mask=self._mask(mask, new_height, new_width),
            coordinates=(points * scale).float(),
            types=types,
        )

    def prompt_points(self, mask: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The prompt of a mask in its own pixels, `(x, y)` in float64, and the points' types.

        Args:
            mask: The boolean mask `(height, width)`.
            generator: The source of the draws.
        """
        ys, xs = mask.nonzero(as_tuple=True)
        if self.prompt == "points":
            chosen = torch.randint(0, len(xs), (self.num_points,), generator=generator)
            points = torch.stack([xs[chosen], ys[chosen]], dim=1).double()
            # No box: SAM's prompt encoder appends a padding point (see `SegmentAnything.prompt_points`).
            points = torch.cat([points, torch.zeros(1, 2, dtype=torch.float64)])
            types = torch.tensor([int(PointType.FOREGROUND)] * self.num_points + [int(PointType.PADDING)])
            return points, types
        box = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).double()
        if self.box_noise > 0:
            sides = torch.stack([box[2] - box[0], box[3] - box[1]]).repeat(2)
            std = (sides * self.box_noise).clamp(max=_MAX_BOX_NOISE)
            noise = torch.randn(4, generator=generator, dtype=torch.float64) * std
            height, width = mask.shape
            box = (box + noise.clamp(-_MAX_BOX_NOISE, _MAX_BOX_NOISE)).clamp(min=0)
            box = torch.minimum(box, torch.tensor([width - 1, height - 1] * 2, dtype=torch.float64))
        types = torch.tensor([int(PointType.BOX_TOP_LEFT), int(PointType.BOX_BOTTOM_RIGHT)])
        return box.reshape(2, 2), types

    def _image(self, image: Image.Image, height: int, width: int) -> Tensor:
        resized = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
        x = pixels.permute(2, 0, 1).float()
        x = (x - torch.tensor(PIXEL_MEAN).reshape(3, 1, 1)) / torch.tensor(PIXEL_STD).reshape(3, 1, 1)
        return pad(x, (0, self.image_size - width, 0, self.image_size - height))

    def _mask(self, mask: Tensor, height: int, width: int) -> Tensor:
        resized = interpolate(mask[None, None].float(), (height, width), mode="nearest-exact")[0]
        return pad(resized, (0, self.image_size - width, 0, self.image_size - height))


class MaskDataModule(LightningDataModule):
    """The training data of a Segment Anything fine-tuning: a `MaskDataset`, batched and shuffled by seed.

    Batches are `MaskBatch` dicts: `images` `(B, 3, S, S)`, `masks` `(B, 1, S, S)`, and the prompts' `coordinates`
    `(B, points, 2)` and `types` `(B, points)`, in the model's input frame (`S` is `image_size`). The order of each
    epoch and every draw depend only on `seed` and the epoch, and the loader resumes mid-epoch from a checkpoint
    (`ResumableDataLoader`): a resumed run sees the batches the uninterrupted run saw.

    Args:
        data_dir: The dataset folder: `images/` and `masks/` (see `refiners.training.segment_anything.data`).
        image_size: The model's input side: 1024 for SAM's released models (the fine-tuning checks it).
        batch_size: Items per batch.
        num_workers: Data loader worker processes (0 loads in the training process).
        prompt: The prompt derived from each mask: `box` or `points`.
        box_noise: Noise on the box's coordinates, as a fraction of its side (SAM's training: 0.1).
        num_points: Points drawn inside the object, for `prompt="points"`.
        seed: The seed of the order and of the prompts' draws.
        skip_invalid: Leave out, with a warning, the images whose mask is missing, unreadable, empty or of another
            size; otherwise the first one is an error that names it.

    Example:
        ```py
        import tempfile

        from refiners.training.segment_anything import MaskDataModule, make_mask_folder

        with tempfile.TemporaryDirectory() as folder:
            make_mask_folder(folder, n=4, size=48)
            data = MaskDataModule(folder, image_size=64, batch_size=2)
            data.setup("fit")
            batch = next(iter(data.train_dataloader()))
            assert batch["images"].shape == (2, 3, 64, 64) and batch["masks"].shape == (2, 1, 64, 64)
            assert batch["coordinates"].shape == (2, 2, 2)  # a box: two corners
        ```
    """

    def __init__(
        self,
        data_dir: str | Path,
        image_size: int = 1024,
        batch_size: int = 1,
        num_workers: int = 0,
        prompt: PromptKind = "box",
        box_noise: float = 0.0,
        num_points: int = 1,
        seed: int = 0,
        skip_invalid: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams["data_dir"] = str(data_dir)  # `torch.load(weights_only=True)` refuses pathlib objects
        if prompt not in ("box", "points"):
            raise TrainingSetupError(Setting("prompt"), f" must be 'box' or 'points', got {prompt!r}")
        for name, value, least in (("image_size", image_size, 16), ("batch_size", batch_size, 1)):
            if value < least:
                raise TrainingSetupError(Setting(name), f" must be at least {least}, got {value}")
        if num_points < 1:
            raise TrainingSetupError(Setting("num_points"), f" must be at least 1, got {num_points}")
        if num_workers < 0:
            raise TrainingSetupError(Setting("num_workers"), f" must be 0 or more, got {num_workers}")
        if not 0.0 <= box_noise <= 1.0:
            raise TrainingSetupError(
                Setting("box_noise"), f" is a fraction of the box's side, in [0, 1] (SAM: 0.1); got {box_noise}"
            )
        self.data_dir = Path(data_dir)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.prompt: PromptKind = prompt
        self.box_noise = box_noise
        self.num_points = num_points
        self.seed = seed
        self.skip_invalid = skip_invalid
        self.dataset: MaskDataset | None = None

    def setup(self, stage: str) -> None:
        if self.dataset is None:
            self.dataset = MaskDataset(
                self.data_dir,
                image_size=self.image_size,
                prompt=self.prompt,
                box_noise=self.box_noise,
                num_points=self.num_points,
                seed=self.seed,
                skip_invalid=self.skip_invalid,
            )

    def train_dataloader(self) -> ResumableDataLoader:
        if self.dataset is None:
            self.setup("fit")
        assert self.dataset is not None
        sampler = EpochSampler(len(self.dataset), seed=self.seed)
        if self.trainer is not None:
            # As `CaptionedImageDataModule`: a resumed run's first iterator is at the restored epoch.
            sampler.set_epoch(self.trainer.current_epoch)
        return ResumableDataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_collate,
            persistent_workers=self.num_workers > 0,
        )
