"""Captioned image folders: discovery in both conventions, transforms to the pixel, seeded randomness, batches,
caching, and every error."""

import inspect
import io
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.testing import assert_close

import refiners.training
from refiners.training import data, data_transforms, image_folder, sample_data
from refiners.training.data import (
    CaptionedImageDataModule,
    CaptionedImageDataset,
    EpochSampler,
    ItemKey,
    TrainingBatch,
)
from refiners.training.image_folder import ImageFolderError, find_captioned_images
from refiners.training.sample_data import SampleImageFolder, make_image_folder

IMAGES = 24  # in each folder of conftest.py

# -- helpers ---------------------------------------------------------------------------------------------------


def _expected(image: Image.Image) -> Tensor:
    """torchvision's `ToTensor()` then `Normalize([0.5] * 3, [0.5] * 3)`, written out for an RGB image."""
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return (pixels.permute(2, 0, 1).float().div(255) - 0.5) / 0.5


def _noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, channels), dtype=torch.uint8, generator=generator)
    return Image.frombytes(mode, (width, height), bytes(pixels.flatten().tolist()))


def _write(folder: Path, files: dict[str, str | bytes]) -> Path:
    """Write text or bytes files; names ending in an image extension with an empty value get a small image."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content == "" and path.suffix.lower() in image_folder.IMAGE_EXTENSIONS:
            image_format = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), path.suffix[1:].upper())
            _noise_image(16, 16).save(path, format=image_format)
        else:
            path.write_text(content, encoding="utf-8")
    return folder


def _metadata(*lines: dict[str, Any] | str) -> str:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"


def _field(batch: TrainingBatch, key: str) -> Any:
    """A field of a batch that the test expects there (`TrainingBatch` keys are optional)."""
    assert key in batch, f"the batch has no {key!r}: {sorted(batch)}"
    return batch[key]  # pyright: ignore[reportUnknownVariableType]


def _relative(root: Path, files: list[image_folder.CaptionedImageFile]) -> dict[str, str]:
    return {file.path.relative_to(root).as_posix(): file.caption for file in files}


# -- discovery -------------------------------------------------------------------------------------------------


def test_discovers_both_conventions(image_folder: SampleImageFolder) -> None:
    files = find_captioned_images(image_folder.path)
    assert _relative(image_folder.path, files) == image_folder.captions
    assert [file.path.name for file in files] == sorted(file.path.name for file in files)


def test_discovers_nested_folders(nested_folder: SampleImageFolder) -> None:
    files = find_captioned_images(nested_folder.path)
    assert _relative(nested_folder.path, files) == nested_folder.captions
    assert {Path(name).parent.name for name in _relative(nested_folder.path, files)} == {"circle", "square", "triangle"}


def test_extensions_in_any_case_hidden_and_other_files_skipped(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "A.PNG": "",
            "A.txt": "upper png",
            "b.JpEg": "",
            "b.txt": "mixed jpeg",
            "c.webp": "",
            "c.txt": "webp",
            "d.bmp": "",
            "d.txt": "bmp",
            ".hidden/e.png": "",  # no caption: an error if it were read
            ".f.png": "",
            "notes.md": "not an image",
            "g.gif": "",  # not a supported extension
        },
    )
    assert _relative(tmp_path, find_captioned_images(tmp_path)) == {
        "A.PNG": "upper png",
        "b.JpEg": "mixed jpeg",
        "c.webp": "webp",
        "d.bmp": "bmp",
    }


def test_metadata_in_a_subfolder_is_relative_to_it(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "root.png": "",
            "sub/deeper/x.png": "",
            "metadata.jsonl": _metadata({"file_name": "root.png", "text": "at the root"}),
            "sub/metadata.jsonl": _metadata({"file_name": "deeper/x.png", "text": "  in sub  "}),
        },
    )
    assert _relative(tmp_path, find_captioned_images(tmp_path)) == {
        "root.png": "at the root",
        "sub/deeper/x.png": "in sub",
    }


def test_metadata_takes_precedence_over_sidecars(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "both.png": "",
            "both.txt": "from the sidecar",
            "sidecar_only.png": "",
            "sidecar_only.txt": "only a sidecar\n",
            "metadata.jsonl": _metadata({"file_name": "both.png", "text": "from the metadata", "extra": 1}),
        },
    )
    assert _relative(tmp_path, find_captioned_images(tmp_path)) == {
        "both.png": "from the metadata",
        "sidecar_only.png": "only a sidecar",
    }


def test_caption_column(tmp_path: Path) -> None:
    _write(
        tmp_path, {"a.png": "", "metadata.jsonl": _metadata({"file_name": "a.png", "prompt": "a prompt", "text": "x"})}
    )
    assert find_captioned_images(tmp_path, caption_column="prompt")[0].caption == "a prompt"


# -- transforms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "resized", "box"),
    [
        # 50 x 32 -> shorter side 16: 25 x 16 (16 * 50 / 32 = 25); the center crop starts at round(4.5) = 4.
        ((50, 32), (25, 16), (4, 0, 20, 16)),
        # 32 x 50, the same turned: the crop starts 4 rows down.
        ((32, 50), (16, 25), (0, 4, 16, 20)),
        # 45 x 30 -> 24 x 16; the crop starts at 4.
        ((45, 30), (24, 16), (4, 0, 20, 16)),
        # 37 x 24 -> int(16 * 37 / 24) = int(24.67) = 24 x 16: torchvision truncates.
        ((37, 24), (24, 16), (4, 0, 20, 16)),
        # Smaller than the resolution: 12 x 10 -> int(16 * 12 / 10) = 19 x 16; the crop starts at round(1.5) = 2.
        ((12, 10), (19, 16), (2, 0, 18, 16)),
        # Already square at the resolution: untouched.
        ((16, 16), (16, 16), (0, 0, 16, 16)),
    ],
)
def test_resize_and_center_crop_match_pil_to_the_pixel(
    tmp_path: Path, size: tuple[int, int], resized: tuple[int, int], box: tuple[int, int, int, int]
) -> None:
    image = _noise_image(*size)
    image.save(tmp_path / "image.png")
    (tmp_path / "image.txt").write_text("noise")
    dataset = CaptionedImageDataset(tmp_path, resolution=16)
    expected = image.resize(resized, Image.Resampling.BILINEAR) if resized != size else image
    item = dataset[0]
    assert item["image"].dtype == torch.float32
    assert_close(item["image"], _expected(expected.crop(box)), atol=0, rtol=0)
    assert item["caption"] == "noise" and item["path"] == str(tmp_path / "image.png")


@pytest.mark.parametrize(
    ("interpolation", "resample"), [("bicubic", Image.Resampling.BICUBIC), ("lanczos", Image.Resampling.LANCZOS)]
)
def test_interpolation(
    tmp_path: Path, interpolation: data_transforms.Interpolation, resample: Image.Resampling
) -> None:
    image = _noise_image(50, 32)
    image.save(tmp_path / "image.png")
    (tmp_path / "image.txt").write_text("noise")
    dataset = CaptionedImageDataset(tmp_path, resolution=16, interpolation=interpolation)
    assert_close(dataset[0]["image"], _expected(image.resize((25, 16), resample).crop((4, 0, 20, 16))), atol=0, rtol=0)


def test_exif_orientation_and_alpha(tmp_path: Path) -> None:
    # Stored 16 wide and 24 high, with EXIF orientation 6 ("rotate 90 degrees clockwise to display"): upright it is
    # 24 x 16, which needs no resize at resolution 16 and is center-cropped from column 4.
    stored = _noise_image(16, 24, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.png", exif=exif)
    # RGBA: the alpha channel is dropped, the color channels kept as they are (diffusers' `convert("RGB")`).
    rgba = _noise_image(16, 16, seed=2, mode="RGBA")
    rgba.save(tmp_path / "transparent.png")
    _write(tmp_path, {"rotated.txt": "rotated", "transparent.txt": "transparent"})
    dataset = CaptionedImageDataset(tmp_path, resolution=16)
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (24, 16)
    assert_close(dataset[0]["image"], _expected(upright.crop((4, 0, 20, 16))), atol=0, rtol=0)
    assert_close(dataset[1]["image"], _expected(Image.merge("RGB", rgba.split()[:3])), atol=0, rtol=0)


def _crops(image: Image.Image, resolution: int) -> list[Tensor]:
    width, height = image.size
    return [
        _expected(image.crop((left, top, left + resolution, top + resolution)))
        for top in range(height - resolution + 1)
        for left in range(width - resolution + 1)
    ]


def test_random_crop_is_a_crop_and_reproducible(metadata_folder: SampleImageFolder) -> None:
    def images(seed: int, epoch: int) -> list[Tensor]:
        dataset = CaptionedImageDataset(metadata_folder.path, resolution=16, center_crop=False, seed=seed)
        return [dataset[ItemKey(index, epoch)]["image"] for index in range(len(dataset))]

    reference = images(seed=0, epoch=0)
    offsets: set[int] = set()
    for index, file in enumerate(find_captioned_images(metadata_folder.path)):
        with Image.open(file.path) as opened:
            image = opened.convert("RGB")
        resized = image.resize(data_transforms.resized_size(*image.size, 16), Image.Resampling.BILINEAR)
        matches = [offset for offset, crop in enumerate(_crops(resized, 16)) if torch.equal(crop, reference[index])]
        assert matches, f"item {index} is not a 16 x 16 crop of its resized image"
        offsets.add(matches[0])
    assert len(offsets) > 3, "random crops should start at various offsets"
    assert all(torch.equal(a, b) for a, b in zip(reference, images(seed=0, epoch=0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(reference, images(seed=1, epoch=0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(reference, images(seed=0, epoch=1), strict=True))


def test_random_flip_is_a_mirror_and_reproducible(sidecar_folder: SampleImageFolder) -> None:
    plain = CaptionedImageDataset(sidecar_folder.path, resolution=16)

    def flips(seed: int, epoch: int) -> list[bool]:
        dataset = CaptionedImageDataset(sidecar_folder.path, resolution=16, random_flip=True, seed=seed)
        flipped: list[bool] = []
        for index in range(len(dataset)):
            image, original = dataset[ItemKey(index, epoch)]["image"], plain[index]["image"]
            assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
            flipped.append(not torch.equal(image, original))
        return flipped

    reference = flips(seed=0, epoch=0)
    assert 0 < sum(reference) < len(reference)
    assert flips(seed=0, epoch=0) == reference
    assert flips(seed=1, epoch=0) != reference
    assert flips(seed=0, epoch=1) != reference


def test_caption_dropout(metadata_folder: SampleImageFolder) -> None:
    dataset = CaptionedImageDataset(metadata_folder.path, resolution=16, caption_dropout=0.5)
    captions = [dataset.caption(index, epoch=0) for index in range(len(dataset))]
    originals = [file.caption for file in dataset.files]
    assert 0 < captions.count("") < len(captions)
    assert all(caption in ("", original) for caption, original in zip(captions, originals, strict=True))
    assert [dataset[index]["caption"] for index in range(len(dataset))] == captions
    assert [dataset.caption(index, epoch=1) for index in range(len(dataset))] != captions
    always = CaptionedImageDataset(metadata_folder.path, resolution=16, caption_dropout=1.0)
    assert {always.caption(index) for index in range(len(always))} == {""}


def test_sampler_order_depends_on_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochSampler(10, seed=seed)
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert {key.epoch for key in keys} == {epoch}
        return [key.index for key in keys]

    assert sorted(order(0, 0)) == list(range(10))
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)
    assert [key.index for key in EpochSampler(4, shuffle=False)] == [0, 1, 2, 3]


# -- the data module -------------------------------------------------------------------------------------------

# Each image's original size and crop corner (SDXL's micro-conditioning), in every batch: see test_sdxl_training.py.
GEOMETRY = ("original_sizes", "crop_top_lefts")


def test_datamodule_batches(image_folder: SampleImageFolder) -> None:
    module = CaptionedImageDataModule(image_folder.path, resolution=16, batch_size=5, seed=3)
    module.setup("fit")
    loader = module.train_dataloader()
    batches: list[TrainingBatch] = list(loader)
    assert len(batches) == 5 and [len(_field(batch, "captions")) for batch in batches] == [5, 5, 5, 5, 4]
    for batch in batches:
        assert set(batch) == {"images", "captions", *GEOMETRY}
        images = _field(batch, "images")
        assert images.shape == (len(_field(batch, "captions")), 3, 16, 16) and images.dtype == torch.float32
        assert images.min() >= -1 and images.max() <= 1
    captions = [caption for batch in batches for caption in _field(batch, "captions")]
    assert sorted(captions) == sorted(image_folder.captions.values())
    # The batches follow the sampler's order: item by item, they are the dataset's items of that epoch.
    assert module.dataset is not None
    keys = list(loader.sampler)  # pyright: ignore[reportArgumentType]
    stacked = torch.cat([_field(batch, "images") for batch in batches])
    for row, key in enumerate(keys):
        assert isinstance(key, ItemKey)
        assert torch.equal(stacked[row], module.dataset[key]["image"]) and captions[row] == module.dataset.caption(
            key.index
        )


def test_datamodule_hyperparameters() -> None:
    module = CaptionedImageDataModule(Path("some/folder"), resolution=64, batch_size=4, seed=7, cache_dir=Path("c"))
    assert module.hparams["resolution"] == 64 and module.hparams["seed"] == 7 and not module.hparams["cache_latents"]
    # Strings, not paths: checkpoints store the hyperparameters and `torch.load(weights_only=True)` refuses paths.
    assert module.hparams["data_dir"] == "some/folder" and module.hparams["cache_dir"] == "c"


class _Encoders:
    """Fake encoders that record each call: latents are 8 x 8 average pools, embeddings derive from the text."""

    def __init__(self) -> None:
        self.images: list[Tensor] = []
        self.latents: list[Tensor] = []
        self.captions: list[str] = []
        self.embeddings: list[Tensor] = []

    def encode_images(self, images: Tensor) -> Tensor:
        latents = torch.nn.functional.avg_pool2d(images, 8) * 0.18215
        self.images.extend(images)
        self.latents.extend(latents)
        return latents

    def encode_texts(self, captions: list[str]) -> Tensor:
        codes = [[float(len(caption)), float(sum(map(ord, caption)))] for caption in captions]
        embeddings = torch.tensor(codes).unsqueeze(1).expand(-1, 3, -1).clone()
        self.captions.extend(captions)
        self.embeddings.extend(embeddings)
        return embeddings

    def latent_of(self, image: Tensor) -> Tensor:
        (row,) = [row for row, seen in enumerate(self.images) if torch.equal(seen, image)]
        return self.latents[row]


def _cached_module(folder: Path, **kwargs: Any) -> CaptionedImageDataModule:
    options: dict[str, Any] = {"resolution": 16, "batch_size": 4, "random_flip": False}
    options.update(kwargs)
    return CaptionedImageDataModule(folder, cache_latents=True, cache_text_embeddings=True, **options)


def test_caching_encodes_once_and_batches_carry_the_encodings(metadata_folder: SampleImageFolder) -> None:
    encoders = _Encoders()
    module = _cached_module(metadata_folder.path)
    module.precompute(encoders.encode_images, encoders.encode_texts)
    dataset = module.dataset
    assert dataset is not None
    # Each image once; each distinct caption once (the folder repeats some).
    assert len(encoders.images) == IMAGES
    assert sorted(encoders.captions) == sorted(set(metadata_folder.captions.values()))
    loader = module.train_dataloader()
    for _ in range(2):  # the encodings serve every epoch
        batches: list[TrainingBatch] = list(loader)
        keys = list(loader.sampler)  # pyright: ignore[reportArgumentType]
        latents = torch.cat([_field(batch, "latents") for batch in batches])
        embeddings = torch.cat([_field(batch, "text_embeddings") for batch in batches])
        assert all(set(batch) == {"latents", "text_embeddings", *GEOMETRY} for batch in batches)
        assert latents.shape == (IMAGES, 3, 2, 2) and embeddings.shape == (IMAGES, 3, 2)
        for row, key in enumerate(keys):
            assert isinstance(key, ItemKey)
            assert torch.equal(latents[row], encoders.latent_of(dataset.image(key.index)))
            caption = dataset.files[key.index].caption
            assert torch.equal(embeddings[row], encoders.embeddings[encoders.captions.index(caption)])
    assert len(encoders.images) == IMAGES and len(encoders.captions) == len(set(metadata_folder.captions.values()))


def test_caching_one_side_only(metadata_folder: SampleImageFolder) -> None:
    encoders = _Encoders()
    module = CaptionedImageDataModule(
        metadata_folder.path, resolution=16, batch_size=6, random_flip=True, cache_text_embeddings=True
    )
    module.precompute(encode_texts=encoders.encode_texts)
    batch: TrainingBatch = next(iter(module.train_dataloader()))
    assert set(batch) == {"images", "text_embeddings", *GEOMETRY} and _field(batch, "images").shape == (6, 3, 16, 16)
    assert encoders.images == []


def test_caching_with_caption_dropout_uses_the_empty_caption(metadata_folder: SampleImageFolder) -> None:
    encoders = _Encoders()
    module = _cached_module(metadata_folder.path, caption_dropout=0.5, seed=1)
    module.precompute(encoders.encode_images, encoders.encode_texts)
    assert encoders.captions.count("") == 1
    empty = encoders.embeddings[encoders.captions.index("")]
    loader = module.train_dataloader()
    keys = list(loader.sampler)  # pyright: ignore[reportArgumentType]
    embeddings = torch.cat([_field(batch, "text_embeddings") for batch in loader])
    dataset = module.dataset
    assert dataset is not None
    dropped = 0
    for row, key in enumerate(keys):
        assert isinstance(key, ItemKey)
        if dataset.caption_dropped(key.index, key.epoch):
            dropped += 1
            assert torch.equal(embeddings[row], empty)
        else:
            caption = dataset.files[key.index].caption
            assert torch.equal(embeddings[row], encoders.embeddings[encoders.captions.index(caption)])
    assert 0 < dropped < IMAGES


def test_disk_cache(metadata_folder: SampleImageFolder, tmp_path: Path) -> None:
    encoders = _Encoders()
    first = _cached_module(metadata_folder.path, cache_dir=tmp_path / "cache")
    first.precompute(encoders.encode_images, encoders.encode_texts, fingerprint="vae-1")
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == IMAGES

    def refuse(_: Any) -> Tensor:
        raise AssertionError("the disk cache should have served this")

    again = _cached_module(metadata_folder.path, cache_dir=tmp_path / "cache")
    again.precompute(refuse, refuse, fingerprint="vae-1")
    assert first._latents is not None and again._latents is not None
    assert all(torch.equal(a, b) for a, b in zip(first._latents, again._latents, strict=True))
    assert first._text_encodings is not None and again._text_encodings is not None
    assert all(
        torch.equal(a["text_embeddings"], b["text_embeddings"])
        for a, b in zip(first._text_encodings, again._text_encodings, strict=True)
    )
    # Other encoders or another transform miss the cache.
    other = _Encoders()
    _cached_module(metadata_folder.path, cache_dir=tmp_path / "cache").precompute(
        other.encode_images, other.encode_texts, fingerprint="vae-2"
    )
    assert len(other.images) == IMAGES
    larger = _Encoders()
    _cached_module(metadata_folder.path, cache_dir=tmp_path / "cache", resolution=24).precompute(
        larger.encode_images, refuse, fingerprint="vae-1"
    )
    assert len(larger.images) == IMAGES


class _Model(L.LightningModule):
    """A LightningModule that records what it trains on; with `encoders`, it provides them for caching."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, Tensor, list[str]]] = []

    def training_step(self, batch: TrainingBatch, batch_index: int) -> Tensor:
        tensor = _field(batch, "latents" if "latents" in batch else "images")
        self.seen.append((self.current_epoch, tensor.clone(), batch.get("captions", [])))
        return (self.weight * tensor.mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _CachingModel(_Model):
    def __init__(self) -> None:
        super().__init__()
        self.encoders = _Encoders()

    def encode_images(self, images: Tensor) -> Tensor:
        return self.encoders.encode_images(images)

    def encode_texts(self, captions: list[str]) -> Tensor:
        return self.encoders.encode_texts(captions)


def _trainer(max_epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_trainer_asks_the_module_for_encoders(metadata_folder: SampleImageFolder) -> None:
    model = _CachingModel()
    module = CaptionedImageDataModule(
        metadata_folder.path, resolution=16, batch_size=12, random_flip=False, cache_latents=True
    )
    _trainer(max_epochs=1).fit(model, module)
    assert len(model.encoders.images) == IMAGES
    assert [len(captions) for _, _, captions in model.seen] == [12, 12]
    assert all(latents.shape == (12, 3, 2, 2) for _, latents, _ in model.seen)


def test_resume_sees_the_data_of_the_uninterrupted_run(sidecar_folder: SampleImageFolder, tmp_path: Path) -> None:
    # Workers prefetch batches as soon as Lightning creates the iterator, before it calls `set_epoch`: the
    # restored epoch must reach the sampler before that.
    def module() -> CaptionedImageDataModule:
        return CaptionedImageDataModule(
            sidecar_folder.path, resolution=16, batch_size=8, num_workers=1, center_crop=False, random_flip=True
        )

    uninterrupted = _Model()
    _trainer(max_epochs=3).fit(uninterrupted, module())
    interrupted, resumed = _Model(), _Model()
    trainer = _trainer(max_epochs=2)
    trainer.fit(interrupted, module())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    _trainer(max_epochs=3).fit(resumed, module(), ckpt_path=tmp_path / "last.ckpt")
    assert [epoch for epoch, _, _ in uninterrupted.seen] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for (epoch, images, captions), (epoch_, images_, captions_) in zip(
        uninterrupted.seen, interrupted.seen + resumed.seen, strict=True
    ):
        assert epoch == epoch_ and captions == captions_
        assert_close(images, images_, atol=0, rtol=0)
    assert not torch.equal(uninterrupted.seen[0][1], uninterrupted.seen[6][1])


# -- errors ----------------------------------------------------------------------------------------------------


def test_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageFolderError, match=r"does not exist: pass the folder that holds the training images"):
        find_captioned_images(tmp_path / "nowhere")
    _write(tmp_path, {"file.txt": "a caption"})
    with pytest.raises(ImageFolderError, match=r"is not a folder"):
        find_captioned_images(tmp_path / "file.txt")
    with pytest.raises(ImageFolderError, match=r"no images found in .* \(searched recursively for \.bmp, \.jpeg"):
        CaptionedImageDataset(tmp_path)


def test_images_without_captions(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "captioned.png": "",
            "captioned.txt": "fine",
            "sub/lonely.jpg": "",
            **{f"z{index}.png": "" for index in range(6)},
        },
    )
    pattern = (
        r"7 image\(s\) in .* have no caption: sub/lonely\.jpg, z0\.png, z1\.png, z2\.png, z3\.png and 2 more\. "
        r"Give each one a caption: a sidecar file sub/lonely\.txt next to sub/lonely\.jpg, or a line "
        r'\{"file_name": "sub/lonely\.jpg", "text": "\.\.\."\} in .*metadata\.jsonl'
    )
    with pytest.raises(ImageFolderError, match=pattern):
        find_captioned_images(tmp_path)


@pytest.mark.parametrize(
    ("metadata", "pattern"),
    [
        (
            _metadata({"file_name": "a.png", "text": "ok"}, "{not json", {"file_name": "b.png", "text": "ok"}),
            r"metadata\.jsonl, line 2 is not valid JSON \(.*\): each line must be one JSON object",
        ),
        (
            _metadata({"file_name": "a.png", "text": "ok"}, "", '["a.png", "x"]'),
            r"line 3 is a JSON list, not an object",
        ),
        (
            _metadata({"file_name": "a.png", "caption": "ok"}),
            r"line 1 lacks text \(its fields: file_name, caption\): .*; pass caption_column=<field> to read captions",
        ),
        (_metadata({"text": "no file"}), r"line 1 lacks file_name \(its fields: text\)"),
        (_metadata({"file_name": "a.png", "text": 3}), r"line 1 has a file_name or caption that is no string"),
        (
            _metadata({"file_name": "a.png", "text": "ok"}, {"file_name": "./a.png", "text": "again"}),
            r"line 2 gives a second caption to \./a\.png \(first in line 1\): keep one line per image",
        ),
        (
            _metadata(
                {"file_name": "a.png", "text": "ok"},
                {"file_name": "gone.png", "text": "x"},
                {"file_name": "notes.md", "text": "x"},
            ),
            r"names 2 file\(s\) that are not images of the folder: gone\.png \(line 2\), notes\.md \(line 3\), not a "
            r"supported image\. file_name is relative to the folder of metadata\.jsonl",
        ),
    ],
    ids=["malformed", "not-an-object", "no-caption", "no-file-name", "not-a-string", "duplicate", "missing-files"],
)
def test_bad_metadata(tmp_path: Path, metadata: str, pattern: str) -> None:
    _write(tmp_path, {"a.png": "", "b.png": "", "b.txt": "b", "notes.md": "x", "metadata.jsonl": metadata})
    with pytest.raises(ImageFolderError, match=pattern):
        find_captioned_images(tmp_path)


def test_metadata_csv_and_bad_sidecar(tmp_path: Path) -> None:
    _write(tmp_path / "csv", {"a.png": "", "metadata.csv": "file_name,text\na.png,x\n"})
    with pytest.raises(ImageFolderError, match=r"metadata\.csv is not read; convert it to metadata\.jsonl"):
        find_captioned_images(tmp_path / "csv")
    _write(tmp_path / "latin1", {"a.png": "", "a.txt": "caf\xe9".encode("latin-1")})
    with pytest.raises(ImageFolderError, match=r"the caption file .*a\.txt is not UTF-8 text .*: save it as UTF-8"):
        find_captioned_images(tmp_path / "latin1")


def _truncated_png() -> bytes:
    stream = io.BytesIO()
    _noise_image(16, 16).save(stream, format="PNG")
    return stream.getvalue()[:200]  # the header is intact, the pixel data cut short


def test_unreadable_images(tmp_path: Path) -> None:
    files = {"good.png": "", "good.txt": "good", "garbage.png": b"not an image at all", "garbage.txt": "garbage"}
    _write(tmp_path / "garbage", files)
    with pytest.raises(
        ImageFolderError, match=r"1 image\(s\) in .* cannot be read: garbage\.png \(.*\)\. .*skip_unreadable=True"
    ):
        CaptionedImageDataset(tmp_path / "garbage")
    with pytest.warns(UserWarning, match=r"leaving out 1 unreadable image\(s\) of .*: garbage\.png"):
        dataset = CaptionedImageDataset(tmp_path / "garbage", resolution=16, skip_unreadable=True)
    assert [file.path.name for file in dataset.files] == ["good.png"]
    module = CaptionedImageDataModule(tmp_path / "garbage", resolution=16, skip_unreadable=True)
    with pytest.warns(UserWarning, match=r"leaving out 1 unreadable image\(s\)"):
        module.setup("fit")
    assert module.dataset is not None and len(module.dataset) == 1

    # A cut file passes the header check; reading it fails, naming it, unless it was left out.
    _write(tmp_path / "truncated", {"cut.png": _truncated_png(), "cut.txt": "cut", "good.png": "", "good.txt": "g"})
    dataset = CaptionedImageDataset(tmp_path / "truncated", resolution=16)
    with pytest.raises(ImageFolderError, match=r"cannot read the image .*cut\.png \(OSError: .*\): replace or remove"):
        dataset[0]
    with pytest.warns(UserWarning, match=r"leaving out 1 unreadable image\(s\) of .*: cut\.png"):
        dataset = CaptionedImageDataset(tmp_path / "truncated", resolution=16, skip_unreadable=True)
    assert len(dataset) == 1 and dataset[0]["caption"] == "g"

    _write(tmp_path / "none", {"a.png": b"\x89PNG broken", "a.txt": "a"})
    with pytest.raises(ImageFolderError, match=r"no image of .* can be read: a\.png"):
        CaptionedImageDataset(tmp_path / "none", skip_unreadable=True)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"resolution": 500},
            r"resolution must be a multiple of 8 \(the autoencoder downsamples by 8\), got 500: use 496 or 504",
        ),
        ({"resolution": 4}, r"got 4: use 8"),
        ({"resolution": 0}, r"resolution must be a positive int, got 0"),
        ({"interpolation": "nearest"}, r"interpolation must be one of bilinear, bicubic, lanczos, got 'nearest'"),
        ({"caption_dropout": 1.5}, r"caption_dropout is a probability, in \[0, 1\]; got 1\.5"),
    ],
)
def test_bad_dataset_arguments(metadata_folder: SampleImageFolder, kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        CaptionedImageDataset(metadata_folder.path, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"resolution": 100}, r"multiple of 8 .* use 96 or 104"),
        ({"batch_size": 0}, r"batch_size must be at least 1, got 0"),
        ({"num_workers": -1}, r"num_workers must be 0 \(load in the training process\) or more, got -1"),
        ({"caption_dropout": -0.1}, r"caption_dropout is a probability"),
        (
            {"cache_latents": True},
            r"cache_latents=True encodes each image once, which would freeze one draw of the random flips: pass "
            r"center_crop=True and random_flip=False",
        ),
        (
            {"cache_latents": True, "center_crop": False},
            r"freeze one draw of the random crops and random flips",
        ),
    ],
)
def test_bad_datamodule_arguments(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        CaptionedImageDataModule("any/folder", **kwargs)


def test_caching_without_encoders(metadata_folder: SampleImageFolder) -> None:
    module = _cached_module(metadata_folder.path)
    with pytest.raises(
        ValueError, match=r"caching latents or text embeddings needs encoders: give the LightningModule"
    ):
        module.train_dataloader()
    with pytest.raises(ValueError, match=r"cache_latents=True: precompute needs encode_images"):
        module.precompute(encode_texts=_Encoders().encode_texts)
    with pytest.raises(ValueError, match=r"cache_text_embeddings=True: precompute needs encode_texts"):
        module.precompute(encode_images=_Encoders().encode_images)
    with pytest.raises(
        ValueError,
        match=r"the encoder of latents must return one tensor per input, stacked on the first dimension: "
        r"got shape \(1, 4\) for 4 inputs",
    ):
        _cached_module(metadata_folder.path).precompute(lambda images: torch.zeros(1, 4), _Encoders().encode_texts)


def test_trainer_without_encoders(metadata_folder: SampleImageFolder) -> None:
    module = CaptionedImageDataModule(metadata_folder.path, resolution=16, random_flip=False, cache_latents=True)
    with pytest.raises(ValueError, match=r"needs encoders: .*encode_images\(images\) -> latents"):
        _trainer(max_epochs=1).fit(_Model(), module)


# -- the sample data -------------------------------------------------------------------------------------------


def test_sample_images_show_their_caption(metadata_folder: SampleImageFolder) -> None:
    colors = sample_data._COLORS | sample_data._BACKGROUNDS
    sizes: set[tuple[int, int]] = set()
    for name, caption in metadata_folder.captions.items():
        color, shape, background = re.fullmatch(r"an? (\w+) (\w+) on a (\w+) background", caption).groups()  # pyright: ignore[reportOptionalMemberAccess]
        assert shape in sample_data._SHAPES
        with Image.open(metadata_folder.path / name) as image:
            sizes.add(image.size)
            if image.format == "PNG":  # lossless: the exact colors are there
                pixels = set(image.convert("RGB").get_flattened_data())
                assert {colors[color], colors[background]} <= pixels
    assert sizes == {(40, 40), (40, 30), (30, 40)}
    assert {Path(name).suffix for name in metadata_folder.captions} == {".png", ".jpg"}


def test_sample_folder_is_reproducible(tmp_path: Path) -> None:
    first = make_image_folder(tmp_path / "a", n=4, size=16, seed=5).captions
    second = make_image_folder(tmp_path / "b", n=4, size=16, seed=5).captions
    assert first == second
    for name in first:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert make_image_folder(tmp_path / "c", n=4, size=16, seed=6).captions != first


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"n": 0}, r"needs n >= 1 images, got 0"),
        ({"size": 4}, r"needs size >= 8 pixels, got 4"),
        ({"convention": "csv"}, r"convention must be 'metadata' or 'sidecar', got 'csv'"),
    ],
)
def test_sample_folder_errors(tmp_path: Path, kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make_image_folder(tmp_path, **kwargs)


# -- docstring examples ----------------------------------------------------------------------------------------

EXAMPLES = [
    (f"{module.__name__}.{name}", block)
    for module in (data, data_transforms, image_folder, sample_data)
    for name in module.__all__
    for block in re.findall(r"```py\n(.*?)\s*```", inspect.getdoc(getattr(module, name)) or "", flags=re.DOTALL)
]


def test_there_are_examples() -> None:
    assert {name.rsplit(".", 1)[-1] for name, _ in EXAMPLES} >= {
        "CaptionedImageDataset",
        "CaptionedImageDataModule",
        "ImageTransform",
        "make_image_folder",
    }


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_docstring_example(name: str, code: str) -> None:
    exec(compile(textwrap.dedent(code), f"<example of {name}>", "exec"), {"__name__": "example"})


def test_package_exports() -> None:
    assert refiners.training.CaptionedImageDataModule is CaptionedImageDataModule
    assert refiners.training.make_image_folder is make_image_folder
    assert all(hasattr(refiners.training, name) for name in refiners.training.__all__)
