"""The main job: a model we trained ourselves, and proof that a LoRA trained with `refiners-train` learns what it was
shown. No download: everything is in the repository.

1. Load the shipped handwritten digits model (`models/digits`: Stable Diffusion 1.x's architecture, trained from
   scratch on scikit-learn's digits with `configs/digits-autoencoder.yaml` and `configs/digits-unet.yaml`) in one call,
   and the judge: a scikit-learn SVM trained on digits the model never saw (`examples/digits_data.py`).
2. Generate the ten digits ("a handwritten digit zero" ... "nine"), save them as a grid, and print the judge's score.
3. Fine-tune a LoRA with `refiners-train` and `configs/digits-lora.yaml` on the sevens, captioned "a lucky number".
4. Generate "a lucky number" before and after, with the judge's counts; the ten digits again with the LoRA (nothing
   forgotten); eject the LoRA and get the base model's images back, bit for bit.
5. The converters both ways: export the model as a diffusers folder (`refiners-convert sd1-to-diffusers`), convert that
   back (`refiners-convert sd1 --from diffusers --to refiners --check`, each component against diffusers and
   transformers), and get the same images.

Usage:
    uv run python examples/digits_demo.py [--output outputs/digits-demo] [--steps 100]
"""

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import torch
from digits_data import Judge, caption, generate, make_digits_folder
from PIL import Image

from refiners.adapters.lora import SDLoraManager
from refiners.fluxion.utils import load_from_safetensors
from refiners.foundationals.latent_diffusion import StableDiffusion_1

__all__ = ["main", "grid"]

ROOT = Path(__file__).resolve().parents[1]
LUCKY = "a lucky number"
PER_ROW = 8
STEPS, GUIDANCE = 20, 3.0  # DPM-Solver++ steps and classifier-free guidance of every generation here
_TOTAL = 5
_START = time.monotonic()


@contextmanager
def _step(number: int, title: str) -> Generator[None]:
    print(f"\n[{number}/{_TOTAL}] {title}", flush=True)
    start = time.monotonic()
    yield
    print(f"[{number}/{_TOTAL}] done in {time.monotonic() - start:.0f} s", flush=True)


def _run(name: str, module: str, *arguments: str, cwd: Path) -> None:
    """Run one of the workspace's commands as a user would, showing it and its output as it comes."""
    script = Path(sys.executable).with_name(name)  # the virtual environment's console script
    command = [str(script)] if script.is_file() else [sys.executable, "-m", module]
    print(f"$ (cd {cwd} && {shlex.join([name, *arguments])})", flush=True)
    subprocess.run([*command, *arguments], cwd=cwd, check=True)


def grid(images: torch.Tensor, per_row: int) -> Image.Image:
    """Images `(n, 3, H, W)` in [0, 1] as one picture, `per_row` a row."""
    rows = images.reshape(-1, per_row, *images.shape[1:])
    tiles = rows.permute(2, 0, 3, 1, 4).reshape(images.shape[1], rows.shape[0] * images.shape[2], -1)
    return Image.fromarray((tiles.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def _counts(labels: list[int]) -> str:
    return " ".join(f"{digit}:{labels.count(digit)}" for digit in range(10) if labels.count(digit))


def _digits(sd: StableDiffusion_1, judge: Judge, path: Path) -> float:
    """The ten digits, `PER_ROW` each: saved as a grid (a row per digit); the judge's mean accuracy."""
    images = generate(
        sd, [caption(digit) for digit in range(10)], PER_ROW, seed=0, steps=STEPS, guidance_scale=GUIDANCE
    )
    grid(images, PER_ROW).save(path)
    labels = judge.classify(images)
    scores = [sum(label == digit for label in labels[digit * PER_ROW : (digit + 1) * PER_ROW]) for digit in range(10)]
    print("  judged right, per digit: " + "  ".join(f"{digit}:{score}/{PER_ROW}" for digit, score in enumerate(scores)))
    accuracy = sum(scores) / (10 * PER_ROW)
    print(f"  accuracy {accuracy:.0%} -> {path}")
    return accuracy


def _lucky(sd: StableDiffusion_1, judge: Judge, path: Path) -> list[int]:
    images = generate(sd, [LUCKY], 4 * PER_ROW, seed=2, steps=STEPS, guidance_scale=GUIDANCE)
    grid(images, PER_ROW).save(path)
    labels = judge.classify(images)
    print(f"  {LUCKY!r}: {labels.count(7)}/{len(labels)} sevens (judged {_counts(labels)}) -> {path}")
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description="The digits model, and a LoRA that learns a new phrase.")
    parser.add_argument("--output", type=Path, default=Path("outputs/digits-demo"), help="where everything is written")
    parser.add_argument("--steps", type=int, default=100, help="LoRA training steps")
    args = parser.parse_args()
    output: Path = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)

    with _step(1, "Load the shipped digits model (models/digits) and the judge"):
        sd = StableDiffusion_1.from_folder(ROOT / "models" / "digits")
        judge = Judge()
        print(
            f"  model: {sd.default_size}x{sd.default_size} images; judge: {judge.accuracy:.1%} right on digits it never saw"
        )

    with _step(2, f"The ten digits, {PER_ROW} each (DPM-Solver++ {STEPS} steps, guidance {GUIDANCE})"):
        _digits(sd, judge, output / "digits.png")

    with _step(3, f"Fine-tune a LoRA on the sevens, captioned {LUCKY!r}, with refiners-train ({args.steps} steps)"):
        folder = make_digits_folder(output / "lucky", digits=(7,), phrase=LUCKY)
        print(f"  {folder}: {len(list(folder.glob('*.png')))} sevens")
        arguments = [
            "fit", "--config", str(ROOT / "configs" / "digits-lora.yaml"),
            "--model.weights", str(ROOT / "models" / "digits"), "--data.data_dir", "lucky",
            "--export.dirpath", "lora", "--trainer.max_steps", str(args.steps),
        ]  # fmt: skip
        _run("refiners-train", "refiners.training.cli", *arguments, cwd=output)
        lora = output / "lora" / "lora.safetensors"

    with _step(4, f"{LUCKY!r} before and after the LoRA; the digits with it; then ejected"):
        plain = generate(sd, [caption(3)], 4, seed=3, steps=STEPS, guidance_scale=GUIDANCE)
        before = _lucky(sd, judge, output / "lucky-before.png")
        manager = SDLoraManager(sd)
        manager.add_loras("lucky", load_from_safetensors(lora))
        after = _lucky(sd, judge, output / "lucky-after.png")
        print("  the ten digits with the LoRA:")
        _digits(sd, judge, output / "digits-with-lora.png")
        manager.remove_loras("lucky")
        restored = torch.equal(plain, generate(sd, [caption(3)], 4, seed=3, steps=STEPS, guidance_scale=GUIDANCE))
        print(f"  LoRA ejected: the base model's images are {'back, bit for bit' if restored else 'NOT back'}")
        assert restored and after.count(7) > before.count(7)

    with _step(5, "Export the model as a diffusers folder, convert it back with refiners-convert: the same images"):
        _run("refiners-convert", "refiners.converters.cli", "sd1-to-diffusers", "--from", str(ROOT / "models" / "digits"),
             "--to", "diffusers", cwd=output)  # fmt: skip
        _run("refiners-convert", "refiners.converters.cli", "sd1", "--from", "diffusers", "--to", "refiners", "--check",
             cwd=output)  # fmt: skip
        back = StableDiffusion_1.from_folder(output / "refiners")
        same = torch.equal(plain, generate(back, [caption(3)], 4, seed=3, steps=STEPS, guidance_scale=GUIDANCE))
        print(
            f"  the model converted there and back draws {'the same images, bit for bit' if same else 'OTHER images'}"
        )
        assert same

    print(f"\nDone in {time.monotonic() - _START:.0f} s. Everything is in {output}:")
    print("  digits.png, digits-with-lora.png  the ten digits (a row each), without and with the LoRA")
    print("  lucky-before.png, lucky-after.png  'a lucky number' without and with the LoRA")
    print("  lucky/                             the sevens and their captions (metadata.jsonl)")
    print(
        "  lora/                              the LoRA: lora.safetensors (refiners), lora-peft.safetensors (diffusers)"
    )


if __name__ == "__main__":
    main()
