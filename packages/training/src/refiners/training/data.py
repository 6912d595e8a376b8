"""A Dataset and a LightningDataModule of captioned images for text-to-image training, reproducible from a seed.

The folder conventions are in `refiners.training.image_folder`; the transform in `refiners.training.data_transforms`.
"""

import hashlib
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Required, TypedDict, cast, runtime_checkable

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from refiners.fluxion.utils import load_from_safetensors, save_to_safetensors
from refiners.training.data_transforms import Crop, ImageTransform, Interpolation, seeded_generator
from refiners.training.errors import Setting, TrainingSetupError
from refiners.training.image_folder import find_captioned_images, open_image, readable_images, upright_size

__all__ = [
    "ItemKey",
    "CaptionedImage",
    "CaptionedImageDataset",
    "EpochSampler",
    "ResumableDataLoader",
    "TrainingItem",
    "TrainingBatch",
    "TextEncodings",
    "collate_training_items",
    "CachingEncoders",
    "CaptionedImageDataModule",
]


# -- the dataset -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemKey:
    """An item of a dataset as seen in one epoch: random crops, flips and caption dropout depend on both."""

    index: int
    epoch: int


class CaptionedImage(TypedDict):
    """An item of `CaptionedImageDataset`: the image, its caption and file, and where the image was cut from."""

    image: Tensor  # 3 x resolution x resolution, float32 in [-1, 1]
    caption: str
    path: str
    original_size: tuple[int, int]  # (height, width) before the resize
    crop_top_left: tuple[int, int]  # (top, left), see `Crop.crop_top_left`


class CaptionedImageDataset(Dataset[CaptionedImage]):
    """The images of a folder with their captions (see `find_captioned_images`), transformed for training.

    Each image is made upright (EXIF orientation), converted to RGB, resized so that its shorter side is
    `resolution`, cropped to a square (center or random), maybe flipped, and scaled to [-1, 1]. The random choices
    of an item depend only on (`seed`, epoch, index): index the dataset with an `ItemKey(index, epoch)` (as
    `EpochSampler` does) for a new draw each epoch; a plain int index means epoch 0.

    Each item also records the image's original size and the corner of its crop, as diffusers'
    `train_text_to_image_lora_sdxl.py` does (`original_sizes`, `crop_top_lefts`): SDXL's time ids are made from
    them (see `Crop`).

    Args:
        folder: The image folder.
        resolution: The side of the square images, a multiple of 8.
        center_crop: Crop the center; otherwise a random square.
        random_flip: Flip horizontally with probability 1/2.
        caption_dropout: The probability of replacing a caption with "" (to train classifier-free guidance).
        caption_column: The `metadata.jsonl` field that holds captions.
        interpolation: The resize filter ("bilinear" as diffusers' training script).
        seed: The seed of the random crops, flips and caption dropout.
        skip_unreadable: Decode every image once now and leave out, with a warning, those that fail; otherwise
            only image headers are read now, and an unreadable image raises `ImageFolderError`.

    Example:
        ```py
        import tempfile

        from refiners.training.data import CaptionedImageDataset
        from refiners.training.sample_data import make_image_folder

        with tempfile.TemporaryDirectory() as folder:
            make_image_folder(folder, n=4, convention="sidecar")
            dataset = CaptionedImageDataset(folder, resolution=32)
            item = dataset[0]
            assert item["image"].shape == (3, 32, 32) and item["caption"].endswith(" background")
            landscape = dataset[1]  # 64 x 48, resized to 42 x 32 and cropped 5 pixels from the left
            assert landscape["original_size"] == (48, 64) and landscape["crop_top_left"] == (0, 5)
        ```
    """

    def __init__(
        self,
        folder: str | Path,
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        caption_column: str = "text",
        interpolation: Interpolation = "bilinear",
        seed: int = 0,
        skip_unreadable: bool = False,
    ) -> None:
        self.transform = ImageTransform(resolution, center_crop, random_flip, interpolation)
        if not 0.0 <= caption_dropout <= 1.0:
            raise TrainingSetupError(Setting("caption_dropout"), f" is a probability, in [0, 1]; got {caption_dropout}")
        self.folder = Path(folder)
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.files = readable_images(find_captioned_images(folder, caption_column), self.folder, skip_unreadable)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | ItemKey) -> CaptionedImage:
        index, epoch = (key.index, key.epoch) if isinstance(key, ItemKey) else (key, 0)
        image, crop = self.image_with_crop(index, epoch)
        return CaptionedImage(
            image=image,
            caption=self.caption(index, epoch),
            path=str(self.files[index].path),
            original_size=crop.original_size,
            crop_top_left=crop.crop_top_left,
        )

    def image(self, index: int, epoch: int = 0) -> Tensor:
        """The transformed image of item `index` in `epoch`: `3 x resolution x resolution`, float32 in [-1, 1]."""
        return self.image_with_crop(index, epoch)[0]

    def image_with_crop(self, index: int, epoch: int = 0) -> tuple[Tensor, Crop]:
        """The transformed image of item `index` in `epoch` and where it was cut from."""
        index = range(len(self))[index]
        generator = seeded_generator(self.seed, epoch, index, "image")
        return self.transform.with_crop(open_image(self.files[index].path), generator)

    def crop(self, index: int, epoch: int = 0) -> Crop:
        """Where the image of item `index` in `epoch` is cut from, as `image` cuts it, from the file's header alone
        (for cached latents: the image is not decoded)."""
        index = range(len(self))[index]
        generator = seeded_generator(self.seed, epoch, index, "image")
        return self.transform.crop(*upright_size(self.files[index].path), generator)

    def caption(self, index: int, epoch: int = 0) -> str:
        """The caption of item `index` in `epoch`: "" when dropped out."""
        index = range(len(self))[index]
        return "" if self.caption_dropped(index, epoch) else self.files[index].caption

    def caption_dropped(self, index: int, epoch: int = 0) -> bool:
        """Whether caption dropout replaces the caption of item `index` in `epoch` (drawn apart from the image's
        crop and flip, so that it is the same whether or not the image is loaded)."""
        if self.caption_dropout == 0.0:
            return False
        index = range(len(self))[index]
        generator = seeded_generator(self.seed, epoch, index, "caption")
        return torch.rand(1, generator=generator).item() < self.caption_dropout


class EpochSampler(Sampler[ItemKey]):
    """Every index once per epoch, as `ItemKey(index, epoch)`, in an order drawn from (`seed`, epoch).

    Lightning calls `set_epoch` before each epoch. As the epoch travels with each key, data loader workers
    (persistent or not) apply that epoch's augmentations without being told the epoch themselves.

    Args:
        length: The size of the dataset.
        seed: The seed of the order.
        shuffle: Shuffle each epoch; otherwise indices come in order.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__()
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[ItemKey]:
        epoch = self.epoch
        if not self.shuffle:
            return iter([ItemKey(index, epoch) for index in range(self.length)])
        order = torch.randperm(self.length, generator=seeded_generator(self.seed, epoch, "order")).tolist()
        return iter([ItemKey(index, epoch) for index in order])


# -- batches and caching ---------------------------------------------------------------------------------------


class TrainingItem(TypedDict, total=False):
    """An item as the data module serves it: `image` or cached `latents`, `caption` or cached `text_embeddings` (and
    `pooled_text_embeddings` for SDXL), and the image's `original_size` `(height, width)` and `crop_top_left`
    `(top, left)` (int64 tensors of 2)."""

    image: Tensor
    caption: str
    latents: Tensor
    text_embeddings: Tensor
    pooled_text_embeddings: Tensor
    original_size: Tensor
    crop_top_left: Tensor


class TrainingBatch(TypedDict, total=False):
    """A batch of `TrainingItem`s: `images` (B x 3 x H x W in [-1, 1]) or `latents`, `captions` (a list) or
    `text_embeddings`, `original_sizes` and `crop_top_lefts` (B x 2, SDXL's micro-conditioning, which SD1 does not
    read), each stacked along a first batch dimension."""

    images: Tensor
    captions: list[str]
    latents: Tensor
    text_embeddings: Tensor
    pooled_text_embeddings: Tensor
    original_sizes: Tensor
    crop_top_lefts: Tensor


class TextEncodings(TypedDict, total=False):
    """What a text encoder makes of captions, for caching: `text_embeddings` (and SDXL's `pooled_text_embeddings`),
    each stacked along a first batch dimension. `CachingEncoders.encode_texts` returns it, or the bare embeddings."""

    text_embeddings: Required[Tensor]
    pooled_text_embeddings: Tensor


class _ResumingBatches:
    """A loader's batches of indices, less those of the epoch being resumed that were served before the checkpoint."""

    def __init__(self, loader: "ResumableDataLoader", batches: Any) -> None:
        self.loader = loader
        self.batches = batches

    def __len__(self) -> int:  # the whole epoch: Lightning counts the skipped batches as done
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        return self.loader.start_epoch(iter(self.batches))


class ResumableDataLoader(DataLoader[TrainingItem]):
    """A `DataLoader` that resumes mid-epoch: Lightning's stateful loader interface (`state_dict`, `load_state_dict`).

    It counts the batches it has served in the current epoch, and a checkpoint stores that count with the epoch. The
    loader restored from it skips that many batches of that epoch, by their indices (nothing is loaded for them): a
    run resumed from a checkpoint taken at any step sees the batches the uninterrupted run saw, whatever the sampler
    (ours, or Lightning's distributed wrapper around it, whose shards are skipped rank by rank).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._served = 0
        self._resume: tuple[int, int] | None = None

    @property
    def _index_sampler(self) -> Any:
        # What the DataLoader's iterators draw each epoch's indices from (torch's private hook, there since 1.x; a
        # test fails if it stops being read): the batch sampler, less the batches to skip.
        return _ResumingBatches(self, super()._index_sampler)

    def start_epoch(self, batches: Iterator[Any]) -> Iterator[Any]:
        """Called when an iteration over the loader starts: skip what a restored checkpoint had served."""
        self._epoch = int(getattr(self.sampler, "epoch", 0))
        resume, self._resume = self._resume, None
        self._served = resume[1] if resume is not None and resume[0] == self._epoch else 0
        return itertools.islice(batches, self._served, None)

    def __iter__(self) -> Any:
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))


def collate_training_items(items: list[TrainingItem]) -> TrainingBatch:
    """Stack the tensors of `items` and list their captions.

    Args:
        items: Items with the same keys.
    """
    batch = TrainingBatch()
    if images := [item["image"] for item in items if "image" in item]:
        batch["images"] = torch.stack(images)
    if latents := [item["latents"] for item in items if "latents" in item]:
        batch["latents"] = torch.stack(latents)
    if text_embeddings := [item["text_embeddings"] for item in items if "text_embeddings" in item]:
        batch["text_embeddings"] = torch.stack(text_embeddings)
    if pooled := [item["pooled_text_embeddings"] for item in items if "pooled_text_embeddings" in item]:
        batch["pooled_text_embeddings"] = torch.stack(pooled)
    if original_sizes := [item["original_size"] for item in items if "original_size" in item]:
        batch["original_sizes"] = torch.stack(original_sizes)
    if crop_top_lefts := [item["crop_top_left"] for item in items if "crop_top_left" in item]:
        batch["crop_top_lefts"] = torch.stack(crop_top_lefts)
    if any("caption" in item for item in items):
        batch["captions"] = [item["caption"] for item in items if "caption" in item]
    return batch


@runtime_checkable
class CachingEncoders(Protocol):
    """What a LightningModule provides for `CaptionedImageDataModule` to cache latents and text embeddings.

    Both take a batch and return one tensor per element, stacked along the first dimension; they should be
    deterministic (e.g. the mean of the autoencoder's posterior), since their output is reused every epoch.
    """

    def encode_images(self, images: Tensor) -> Tensor:
        """Latents of `images` (B x 3 x H x W in [-1, 1], on CPU): B x ..."""
        ...

    def encode_texts(self, captions: list[str]) -> Tensor | TextEncodings:
        """Embeddings of `captions`: B x ..., or `TextEncodings` (SDXL's embeddings and pooled embeddings)."""
        ...


def _text_encodings(encoded: Mapping[str, Tensor]) -> TextEncodings:
    """`encoded` as `TextEncodings`, or an error naming what it holds instead."""
    allowed = TextEncodings.__annotations__.keys()
    if "text_embeddings" not in encoded or not encoded.keys() <= allowed:
        raise ValueError(
            f"encode_texts must return the text embeddings, or a dict of {', '.join(allowed)} (text_embeddings "
            f"required); got {', '.join(sorted(encoded))}"
        )
    encodings = TextEncodings(text_embeddings=encoded["text_embeddings"])
    if (pooled := encoded.get("pooled_text_embeddings")) is not None:
        encodings["pooled_text_embeddings"] = pooled
    return encodings


class _TrainingItems(Dataset[TrainingItem]):
    def __init__(
        self,
        dataset: CaptionedImageDataset,
        latents: list[Tensor] | None,
        text_encodings: list[TextEncodings] | None,
        empty_text_encodings: TextEncodings | None,
    ) -> None:
        self.dataset = dataset
        self.latents = latents
        self.text_encodings = text_encodings
        self.empty_text_encodings = empty_text_encodings

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | ItemKey) -> TrainingItem:
        # A plain index comes from a sampler Lightning substituted for ours (e.g. with `overfit_batches`).
        index, epoch = (key.index, key.epoch) if isinstance(key, ItemKey) else (key, 0)
        item = TrainingItem()
        if self.latents is None:
            item["image"], crop = self.dataset.image_with_crop(index, epoch)
        else:
            item["latents"], crop = self.latents[index], self.dataset.crop(index, epoch)
        item["original_size"] = torch.tensor(crop.original_size)
        item["crop_top_left"] = torch.tensor(crop.crop_top_left)
        if self.text_encodings is None:
            item["caption"] = self.dataset.caption(index, epoch)
            return item
        if self.empty_text_encodings is not None and self.dataset.caption_dropped(index, epoch):
            encodings = self.empty_text_encodings
        else:
            encodings = self.text_encodings[index]
        item["text_embeddings"] = encodings["text_embeddings"]
        if (pooled := encodings.get("pooled_text_embeddings")) is not None:
            item["pooled_text_embeddings"] = pooled
        return item


def _encode_once(
    keys: list[str],
    encode: Callable[[list[int]], Tensor | Mapping[str, Tensor]],
    batch_size: int,
    what: str,
    folder: Path | None,
) -> list[dict[str, Tensor]]:
    """The encodings of each key (`{what: tensor}`, or the tensors by name when `encode` returns a dict of them),
    encoded in batches of `batch_size`, each distinct key once (or read from `folder`)."""
    found: dict[str, dict[str, Tensor]] = {}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for key in dict.fromkeys(keys):
            if (path := folder / f"{key}.safetensors").is_file():
                found[key] = load_from_safetensors(path)
    first: dict[str, int] = {}
    for position, key in enumerate(keys):
        if key not in found:
            first.setdefault(key, position)
    pending = list(first.items())
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        with torch.no_grad():
            encoded = encode([position for _, position in chunk])
        named: dict[str, Any] = {what: encoded} if isinstance(encoded, Tensor) else dict(encoded)  # pyright: ignore[reportUnknownArgumentType]
        for name, tensor in named.items():
            if not isinstance(tensor, Tensor) or tensor.shape[0] != len(chunk):
                got = f"shape {tuple(tensor.shape)}" if isinstance(tensor, Tensor) else type(tensor).__name__  # pyright: ignore[reportUnknownArgumentType]
                raise ValueError(
                    f"the encoder of {what} must return one tensor per input, stacked on the first dimension: got "
                    f"{got} for {len(chunk)} inputs" + (f" (its {name})" if name != what else "")
                )
        for row, (key, _) in enumerate(chunk):
            found[key] = {name: tensor[row].detach().cpu().contiguous() for name, tensor in named.items()}
            if folder is not None:
                save_to_safetensors(folder / f"{key}.safetensors", found[key])
    return [found[key] for key in keys]


def _digest(*parts: bytes | str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        hasher.update(len(data).to_bytes(8, "little") + data)
    return hasher.hexdigest()


# -- the data module -------------------------------------------------------------------------------------------


class CaptionedImageDataModule(LightningDataModule):
    """The training data of a text-to-image fine-tuning: a `CaptionedImageDataset`, batched and shuffled by seed.

    Batches are `TrainingBatch` dicts: `images` (B x 3 x resolution x resolution, float32 in [-1, 1]), `captions`
    (a list of B strings), and each image's `original_sizes` and `crop_top_lefts` (B x 2, for SDXL). The order of
    each epoch and every random crop, flip and caption dropout depend only on `seed` and the epoch, so that a run
    resumed from a checkpoint sees the data the uninterrupted run would have.

    Caching: with `cache_latents` (`cache_text_embeddings`), batches carry `latents` (`text_embeddings`, and SDXL's
    `pooled_text_embeddings`: see `TextEncodings`) in place of `images` (`captions`), computed once before training
    by the LightningModule's `encode_images` (`encode_texts`), see `CachingEncoders`, or by whatever `precompute` is
    given first. A cached latent is one fixed view of an image: caching latents refuses random crops and flips
    rather than silently freezing one draw (the sizes and crops of SDXL's time ids are read from the files' headers).
    With caption dropout, the embedding of "" is cached too. With `cache_dir`, encodings are also stored there, one
    file each, keyed by the image file's content and the transform (or by the caption) and `precompute`'s
    `fingerprint`: use one `cache_dir` per set of encoder weights, or name them in `fingerprint`.

    Args:
        data_dir: The image folder (see `refiners.training.data`).
        resolution: The side of the square training images, a multiple of 8.
        batch_size: Items per batch (also the batch size of the encoders when caching).
        num_workers: Data loader worker processes (0 loads in the training process).
        center_crop: Crop the center; otherwise a random square.
        random_flip: Flip horizontally with probability 1/2.
        seed: The seed of the order, the augmentations and caption dropout.
        caption_dropout: The probability of replacing a caption with "".
        caption_column: The `metadata.jsonl` field that holds captions.
        skip_unreadable: Leave out, with a warning, the images that cannot be decoded (all are decoded once in
            `setup`); otherwise an unreadable image raises `ImageFolderError`.
        cache_latents: Encode the images once; batches carry `latents`.
        cache_text_embeddings: Encode the captions once; batches carry `text_embeddings`.
        cache_dir: Where to also store encodings, to reuse them across runs.

    Example:
        ```py
        import tempfile

        from refiners.training.data import CaptionedImageDataModule
        from refiners.training.sample_data import make_image_folder

        with tempfile.TemporaryDirectory() as folder:
            make_image_folder(folder, n=4)
            data = CaptionedImageDataModule(folder, resolution=32, batch_size=2)
            data.setup("fit")
            batch = next(iter(data.train_dataloader()))
            assert batch["images"].shape == (2, 3, 32, 32) and len(batch["captions"]) == 2
        ```
    """

    def __init__(
        self,
        data_dir: str | Path,
        resolution: int = 512,
        batch_size: int = 1,
        num_workers: int = 0,
        center_crop: bool = True,
        random_flip: bool = True,
        seed: int = 0,
        caption_dropout: float = 0.0,
        caption_column: str = "text",
        skip_unreadable: bool = False,
        cache_latents: bool = False,
        cache_text_embeddings: bool = False,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Checkpoints store these, and `torch.load(weights_only=True)` refuses pathlib objects: keep strings.
        self.hparams["data_dir"] = str(data_dir)
        self.hparams["cache_dir"] = None if cache_dir is None else str(cache_dir)
        # Checked now, so that a bad configuration fails before any model is built.
        transform = ImageTransform(resolution, center_crop, random_flip)
        if batch_size < 1:
            raise TrainingSetupError(Setting("batch_size"), f" must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise TrainingSetupError(
                Setting("num_workers"), f" must be 0 (load in the training process) or more, got {num_workers}"
            )
        if not 0.0 <= caption_dropout <= 1.0:
            raise TrainingSetupError(Setting("caption_dropout"), f" is a probability, in [0, 1]; got {caption_dropout}")
        if cache_latents and transform.is_random:
            random = " and ".join(
                name for name, on in (("random crops", not center_crop), ("random flips", random_flip)) if on
            )
            raise TrainingSetupError(
                Setting("cache_latents", True),
                f" encodes each image once, which would freeze one draw of the {random}: pass ",
                Setting("center_crop", True),
                " and ",
                Setting("random_flip", False),
                " to cache latents, or ",
                Setting("cache_latents", False),
                " to keep the augmentations",
            )
        self.data_dir = Path(data_dir)
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.caption_column = caption_column
        self.skip_unreadable = skip_unreadable
        self.cache_latents = cache_latents
        self.cache_text_embeddings = cache_text_embeddings
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.dataset: CaptionedImageDataset | None = None
        self._latents: list[Tensor] | None = None
        self._text_encodings: list[TextEncodings] | None = None
        self._empty_text_encodings: TextEncodings | None = None

    def setup(self, stage: str) -> None:
        if self.dataset is None:
            self.dataset = CaptionedImageDataset(
                self.data_dir,
                resolution=self.resolution,
                center_crop=self.center_crop,
                random_flip=self.random_flip,
                caption_dropout=self.caption_dropout,
                caption_column=self.caption_column,
                seed=self.seed,
                skip_unreadable=self.skip_unreadable,
            )

    @property
    def needs_encoders(self) -> bool:
        """Whether caching is on and the encodings are not computed yet."""
        return (self.cache_latents and self._latents is None) or (
            self.cache_text_embeddings and self._text_encodings is None
        )

    def precompute(
        self,
        encode_images: Callable[[Tensor], Tensor] | None = None,
        encode_texts: Callable[[list[str]], Tensor | TextEncodings] | None = None,
        fingerprint: str = "",
    ) -> None:
        """Compute (or read from `cache_dir`) the latents and text embeddings that caching asks for.

        `train_dataloader` calls it with the LightningModule's encoders when they are missing; call it yourself
        to use other encoders, or to cache outside a Trainer.

        Args:
            encode_images: Latents of a batch of images (needed with `cache_latents`).
            encode_texts: Embeddings of a list of captions (needed with `cache_text_embeddings`), or
                `TextEncodings` (SDXL: the embeddings and the pooled embeddings).
            fingerprint: Names the encoders in the `cache_dir` keys (e.g. their checkpoint's hash).
        """
        if self.dataset is None:
            self.setup("fit")
        assert self.dataset is not None
        dataset = self.dataset
        if self.cache_latents and self._latents is None:
            if encode_images is None:
                raise ValueError("cache_latents=True: precompute needs encode_images, a function images -> latents")
            keys = [
                _digest("latents", file.path.read_bytes(), dataset.transform.fingerprint, fingerprint)
                for file in dataset.files
            ]
            self._latents = [
                encoded["latents"]
                for encoded in _encode_once(
                    keys,
                    lambda positions: encode_images(torch.stack([dataset.image(position) for position in positions])),
                    self.batch_size,
                    "latents",
                    self._cache_subfolder("latents"),
                )
            ]
        if self.cache_text_embeddings and self._text_encodings is None:
            if encode_texts is None:
                raise ValueError(
                    "cache_text_embeddings=True: precompute needs encode_texts, a function captions -> embeddings"
                )
            captions = [file.caption for file in dataset.files]
            dropout = self.caption_dropout > 0
            if dropout:
                captions.append("")  # the embedding of a dropped-out caption, last
            keys = [_digest("text_embeddings", caption, fingerprint) for caption in captions]
            encodings = [
                _text_encodings(encoded)
                for encoded in _encode_once(
                    keys,
                    lambda positions: cast(
                        Tensor | Mapping[str, Tensor], encode_texts([captions[position] for position in positions])
                    ),
                    self.batch_size,
                    "text_embeddings",
                    self._cache_subfolder("text_embeddings"),
                )
            ]
            self._text_encodings = encodings[: len(dataset)]
            self._empty_text_encodings = encodings[-1] if dropout else None

    def _cache_subfolder(self, what: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / what

    def train_dataloader(self) -> DataLoader[TrainingItem]:
        if self.dataset is None:
            self.setup("fit")
        assert self.dataset is not None
        if self.needs_encoders:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if not isinstance(module, CachingEncoders):
                raise ValueError(
                    "caching latents or text embeddings needs encoders: give the LightningModule the methods "
                    "encode_images(images) -> latents and encode_texts(captions) -> embeddings (see "
                    "CachingEncoders), or call datamodule.precompute(...) before training"
                )
            self.precompute(module.encode_images, module.encode_texts)
        items = _TrainingItems(self.dataset, self._latents, self._text_encodings, self._empty_text_encodings)
        sampler = EpochSampler(len(items), seed=self.seed)
        if self.trainer is not None:
            # Lightning starts the first iterator (and its workers' prefetching) before it calls `set_epoch`: when
            # it resumes from a checkpoint, the sampler must already be at the restored epoch.
            sampler.set_epoch(self.trainer.current_epoch)
        return ResumableDataLoader(
            items,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_training_items,
            persistent_workers=self.num_workers > 0,
        )
