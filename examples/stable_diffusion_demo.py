"""Stable Diffusion end to end, on a fresh machine, with no download: convert, generate, fine-tune a LoRA, generate again.

1. Build a toy Stable Diffusion 1.x (SD1.5's architecture at toy sizes, random weights) and save it with diffusers'
   `save_pretrained`: the folder looks like a model downloaded from the Hub.
2. Convert it with `refiners-convert sd1`, checking each component's output against diffusers/transformers.
3. Generate an image with `StableDiffusion_1`.
4. Write a small folder of captioned images (colored shapes) and fine-tune a LoRA on it with `refiners-train` and the
   shipped `configs/tiny-lora.yaml`: the same command that trains on SD1.5 with `configs/sd15-lora.yaml`.
5. Generate again, same prompt and seed, with the LoRA injected; eject it and get the first image back, bit for bit.

It takes under a minute on two idle CPU cores (47 s measured for the whole command, 37 s of it the five steps). With
a real model, steps 1-2 are `refiners-convert sd1 --from runwayml/stable-diffusion-v1-5 --to weights/sd15` and step 4
is `refiners-train fit --config configs/sd15-lora.yaml`.

Usage:
    uv run python examples/stable_diffusion_demo.py [--output outputs/sd-demo] [--steps 24]
"""

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

from refiners.adapters.lora import SD1LoraAdapter
from refiners.converters.toy import save_toy_stable_diffusion_1
from refiners.fluxion.utils import manual_seed
from refiners.foundationals.latent_diffusion import StableDiffusion_1
from refiners.foundationals.latent_diffusion.solvers import DPMSolver
from refiners.training import build_components, make_image_folder

__all__ = ["generate", "main"]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a white background"
SEED = 2
SIZE = 64  # pixels: 8x8 latents
INFERENCE_STEPS = 20

_START = time.monotonic()


@contextmanager
def _step(number: int, title: str) -> Generator[None]:
    """A step of the demo: its title, then (once it ran) how long it took."""
    print(f"\n[{number}/5] {title}", flush=True)
    start = time.monotonic()
    yield
    print(f"[{number}/5] done in {time.monotonic() - start:.0f} s", flush=True)


def _is_torchvision_notice(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed)" in record.getMessage()


def _quiet_third_parties() -> None:
    """Silence what diffusers and transformers print that does not concern the demo's reader, here and in the
    commands it runs: the progress bars of writing and loading weights (the files are tiny), and transformers'
    notice that its image processors fall back to Pillow without torchvision (the demo processes no image with
    them). Their warnings still show; refiners-train quiets Lightning's notices itself."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the commands: read when they import transformers
    # This process imported transformers already (Lightning imports it): its bars are switched off here.
    transformers_logging.disable_progress_bar()
    logging.getLogger("transformers.utils.import_utils").addFilter(lambda record: not _is_torchvision_notice(record))


def _run(name: str, module: str, *arguments: str, cwd: Path) -> None:
    """Run one of the workspace's commands as a user would, showing it and its output as it comes."""
    script = Path(sys.executable).with_name(name)  # the virtual environment's console script
    command = [str(script)] if script.is_file() else [sys.executable, "-m", module]
    print(f"$ (cd {cwd} && {shlex.join([name, *arguments])})", flush=True)
    subprocess.run([*command, *arguments], cwd=cwd, check=True)


def generate(sd: StableDiffusion_1) -> Image.Image:
    """The seed README's Hello World loop at toy size: one prompt, one seed, classifier-free guidance."""
    with torch.no_grad():
        clip_text_embedding = sd.compute_clip_text_embedding(PROMPT)
        manual_seed(SEED)
        x = torch.randn(1, 4, SIZE // 8, SIZE // 8)
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=clip_text_embedding, condition_scale=7.5)
        return sd.lda.decode_latents(x)


def _difference(first: Image.Image, second: Image.Image) -> float:
    """Mean absolute difference of two images' pixels, in [0, 255]."""
    return float(np.abs(np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description="Stable Diffusion end to end: convert, generate, fine-tune a LoRA.")
    parser.add_argument("--output", type=Path, default=Path("outputs/sd-demo"), help="where everything is written")
    parser.add_argument("--steps", type=int, default=24, help="LoRA training steps")
    args = parser.parse_args()
    output: Path = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    _quiet_third_parties()

    with _step(1, "A toy Stable Diffusion 1.x with random weights, saved as a diffusers folder"):
        diffusers_folder = save_toy_stable_diffusion_1(output / "diffusers", seed=0)
        print(f"{diffusers_folder}: {', '.join(sorted(path.name for path in diffusers_folder.iterdir()))}")

    with _step(2, "Convert it to refiners weights, and check them against diffusers and transformers"):
        _run(
            "refiners-convert", "refiners.converters.cli",
            "sd1", "--from", "diffusers", "--to", "refiners", "--check", cwd=output,
        )  # fmt: skip

    with _step(3, f"Generate: {PROMPT!r}, seed {SEED}, {INFERENCE_STEPS} steps"):
        components = build_components("tiny", weights=output / "refiners")  # the toy sizes of configs/tiny-lora.yaml
        sd = components.pipeline(DPMSolver(num_inference_steps=INFERENCE_STEPS))
        assert isinstance(sd, StableDiffusion_1)  # the `tiny` base is Stable Diffusion 1.x's
        before = generate(sd)
        before.save(output / "before.png")
        print(f"wrote {output / 'before.png'} ({before.width}x{before.height})")

    with _step(4, f"Fine-tune a LoRA for {args.steps} steps with refiners-train on a folder of captioned images"):
        images = make_image_folder(output / "images", n=24, size=64)
        print(f"{images.path}: {len(images.captions)} images, e.g. {next(iter(images.captions.values()))!r}")
        _run(
            "refiners-train", "refiners.training.cli",
            "fit", "--config", str(ROOT / "configs" / "tiny-lora.yaml"),
            "--model.weights", "refiners", "--data.data_dir", "images", "--export.dirpath", "lora",
            "--trainer.max_steps", str(args.steps), cwd=output,
        )  # fmt: skip
        lora = output / "lora" / "lora.safetensors"

    with _step(5, "Generate again with the LoRA, then without it"):
        adapter = SD1LoraAdapter.from_safetensors(target=sd, checkpoint_path=lora, scale=1.0)
        adapter.inject()
        after = generate(sd)
        after.save(output / "after.png")
        adapter.eject()
        ejected = generate(sd)
        change, restored = _difference(before, after), _difference(before, ejected)
        print(f"with the LoRA: mean |pixel change| = {change:.2f} / 255 -> {output / 'after.png'}")
        print(f"LoRA ejected: mean |pixel change| = {restored:.2f} / 255 (the base model is untouched)")
        assert change > 0 and restored == 0, (change, restored)

    runs = sorted((output / "outputs" / "tiny-lora" / "tensorboard").glob("version_*"), key=lambda p: p.stat().st_mtime)
    print(f"\nDone in {time.monotonic() - _START:.0f} s. Everything is in {output}:")
    print("  diffusers/            the toy model as diffusers saves it")
    print("  refiners/             its refiners weights (refiners-convert sd1)")
    print("  before.png, after.png the image without and with the LoRA")
    print("  images/               the training images and their captions (metadata.jsonl)")
    print("  lora/                 the LoRA: lora.safetensors (refiners), lora-peft (diffusers), lora-kohya")
    if runs:
        print(f"  {runs[-1].relative_to(output)}/  samples/, checkpoints/, TensorBoard logs")


if __name__ == "__main__":
    main()
