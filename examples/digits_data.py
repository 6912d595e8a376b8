"""The handwritten digits of scikit-learn as a training folder, and the independent judge of generated digits.

scikit-learn ships 1,797 handwritten digits offline (`sklearn.datasets.load_digits`: 8x8, values 0 to 16, ten
classes). They are split once, stratified with a fixed seed, into:

- the generator's split (two thirds): upscaled to 64x64 (bilinear), drawn dark on white, written as PNGs with the
  captions "a handwritten digit zero" ... "a handwritten digit nine" in a `metadata.jsonl`, the layout
  `refiners-train`'s `CaptionedImageDataModule` reads;
- the judge's split (one third): a scikit-learn SVM trained on it alone classifies images brought back to 8x8 (the
  mean of each 8x8 block). It never sees the generator's images, and knows nothing of refiners.

This is demo and test code: scikit-learn is a development dependency, never a runtime one of the packages.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

if TYPE_CHECKING:
    from refiners.foundationals.latent_diffusion.stable_diffusion_1 import StableDiffusion_1

__all__ = [
    "WORDS",
    "SIZE",
    "caption",
    "Split",
    "splits",
    "make_digits_folder",
    "Judge",
    "to_images",
    "to_features",
    "generate",
    "digit_accuracies",
]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE = 64
"""The side of the training images: the autoencoder's x8 and the UNet's three down-samplings fit (8x8 latents)."""
_SPLIT_SEED = 0
_JUDGE_FRACTION = 1 / 3


def caption(digit: int) -> str:
    """The caption of a digit's images: "a handwritten digit seven"."""
    return f"a handwritten digit {WORDS[digit]}"


@dataclass(frozen=True)
class Split:
    """Digits of one split: `features` (n, 64) in [0, 16] as scikit-learn has them, and their `labels` (n,)."""

    features: NDArray[np.float64]
    labels: NDArray[np.int64]


def splits() -> tuple[Split, Split]:
    """The generator's split and the judge's, always the same (stratified, seed 0)."""
    features, labels = load_digits(return_X_y=True)
    train_x, judge_x, train_y, judge_y = train_test_split(
        features, labels, test_size=_JUDGE_FRACTION, stratify=labels, random_state=_SPLIT_SEED
    )
    floats, ints = np.float64, np.int64
    return (
        Split(np.asarray(train_x, dtype=floats), np.asarray(train_y, dtype=ints)),
        Split(np.asarray(judge_x, dtype=floats), np.asarray(judge_y, dtype=ints)),
    )


def to_images(features: NDArray[np.float64]) -> torch.Tensor:
    """Digits `(n, 64)` in [0, 16] to images `(n, 3, 64, 64)` in [0, 1]: bilinear upscaling, dark ink on white."""
    small = torch.tensor(features, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    large = F.interpolate(small, size=SIZE, mode="bilinear", align_corners=False).clamp(0, 1)
    return (1.0 - large).repeat(1, 3, 1, 1)


def to_features(images: torch.Tensor) -> NDArray[np.float64]:
    """Images `(n, 3, H, W)` in [0, 1] (H, W multiples of 8) back to digits `(n, 64)` in [0, 16]: the mean of each
    block of an 8x8 grid of the grey level."""
    grey = images.float().mean(dim=1, keepdim=True).clamp(0, 1)
    ink = 1.0 - F.adaptive_avg_pool2d(grey, 8)
    return (ink.reshape(len(images), 64) * 16.0).double().numpy()


def make_digits_folder(
    folder: str | Path, digits: tuple[int, ...] = tuple(range(10)), phrase: str | None = None
) -> Path:
    """Write the generator's split as a `refiners-train` folder: PNGs and `metadata.jsonl`.

    Args:
        folder: Where to write (created).
        digits: Which digits to write (default: all ten).
        phrase: Caption every image with this phrase instead of its digit's caption (e.g. "a lucky number").

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, _ = splits()
    images = to_images(train.features)
    lines: list[str] = []
    for index, (image, label) in enumerate(zip(images, train.labels, strict=True)):
        if int(label) not in digits:
            continue
        name = f"{index:04d}.png"
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": phrase or caption(int(label))}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


class Judge:
    """A scikit-learn SVM trained on the judge's split (never the generator's), classifying images of digits.

    Attributes:
        accuracy: Its accuracy on the generator's split (images it never saw), through the same image round trip
            (`to_images`, 8-bit rounding, `to_features`) as generated images.
    """

    def __init__(self) -> None:
        train, held_out = splits()
        classifier = SVC(gamma=0.001, C=10.0)  # pyright: ignore[reportArgumentType] (a float gamma is valid)
        self.classifier = classifier.fit(held_out.features, held_out.labels)
        images = torch.tensor((to_images(train.features).numpy() * 255).round() / 255, dtype=torch.float32)
        self.accuracy = float((self.classifier.predict(to_features(images)) == train.labels).mean())

    def classify(self, images: torch.Tensor) -> list[int]:
        """The digit of each image `(n, 3, H, W)` in [0, 1]."""
        return [int(label) for label in self.classifier.predict(to_features(images))]


def generate(
    sd: "StableDiffusion_1",
    prompts: list[str],
    images_per_prompt: int,
    seed: int,
    steps: int = 20,
    guidance_scale: float = 3.0,
) -> torch.Tensor:
    """Images `(len(prompts) * images_per_prompt, 3, 64, 64)` in [0, 1], prompt by prompt (DPM-Solver++ by default)."""
    with torch.no_grad():
        latents = sd.generate_latents(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            num_images_per_prompt=images_per_prompt,
            progress=False,
        )
        return ((sd.lda.decode(latents) + 1) / 2).clamp(0, 1)


def digit_accuracies(
    sd: "StableDiffusion_1", judge: Judge, images_per_digit: int = 20, seed: int = 0, **options: Any
) -> list[float]:
    """For each digit, the fraction of the images generated from its caption that the judge classifies as it."""
    images = generate(sd, [caption(digit) for digit in range(10)], images_per_digit, seed, **options)
    labels = judge.classify(images)
    return [
        sum(label == digit for label in labels[digit * images_per_digit : (digit + 1) * images_per_digit])
        / images_per_digit
        for digit in range(10)
    ]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the digits' training images and captions (metadata.jsonl).")
    parser.add_argument("folder", help="where to write them")
    parser.add_argument("--digits", type=int, nargs="+", default=list(range(10)), help="which digits (default: all)")
    parser.add_argument("--phrase", default=None, help='caption every image with this phrase (e.g. "a lucky number")')
    args = parser.parse_args()
    print(f"wrote {make_digits_folder(args.folder, tuple(args.digits), args.phrase)}")
