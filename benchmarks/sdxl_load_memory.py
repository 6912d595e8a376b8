"""Peak memory of `StableDiffusion_XL.from_folder`, relative to the weights' size.

The folder is what `refiners-convert sdxl` writes (`clip_text`, `autoencoder`, `unet` `.safetensors`, each recording
its model's constructor call), made here from SDXL base's presets with random weights (float32, about 13 GB). The load
then runs in a fresh Python process, which takes its peak resident set size after its imports as the baseline, loads
the folder (components built on the "meta" device, then given the files' tensors), reads every weight once (a lazily
mapped page would not count otherwise) and reports the peak's growth. Target: <= 1.1 times the weights.

Usage:
    uv run python benchmarks/sdxl_load_memory.py [--json PATH] [--keep DIR]
    uv run python benchmarks/sdxl_load_memory.py --smoke  # SDXL's TINY preset: checks it runs, measures nothing
"""

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from load_memory import _peak_mib  # pyright: ignore[reportPrivateUsage]

TARGET_RATIO = 1.1
FILES = {"unet": "unet.safetensors", "lda": "autoencoder.safetensors", "clip_text_encoder": "clip_text.safetensors"}


@dataclass
class Result:
    """The peak RSS growth of `from_folder` over the baseline after imports, in MiB, and over the weights' size."""

    variant: str
    weights_mib: float
    growth_mib: float
    ratio: float


def write_folder(folder: Path, tiny: bool) -> None:
    """Random weights of SDXL base (or the TINY preset) as `refiners-convert sdxl` writes them."""

    from refiners.fluxion.utils import save_to_safetensors
    from refiners.foundationals.latent_diffusion.stable_diffusion_xl.presets import SDXL_BASE, TINY

    preset = TINY if tiny else SDXL_BASE
    for name, file in FILES.items():
        config = getattr(preset, name)
        model = preset.build()[name] if tiny else config.build(_classes(name), device="cpu")
        tensors = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
        save_to_safetensors(folder / file, tensors, config.to_metadata())
        del model, tensors


def _classes(name: str) -> tuple[type, ...]:
    from refiners.foundationals.latent_diffusion.stable_diffusion_xl.model import (
        SDXL_AUTOENCODER_CLASSES,
        SDXL_TEXT_ENCODER_CLASSES,
        SDXL_UNET_CLASSES,
    )

    classes = {
        "unet": SDXL_UNET_CLASSES,
        "lda": SDXL_AUTOENCODER_CLASSES,
        "clip_text_encoder": SDXL_TEXT_ENCODER_CLASSES,
    }
    return classes[name]


def measure_child(folder: Path) -> dict[str, float]:
    """Load the folder in this (fresh) process; the peak RSS before and after, in MiB."""
    import torch

    from refiners.foundationals.latent_diffusion.stable_diffusion_xl import StableDiffusion_XL

    baseline = _peak_mib()
    sdxl = StableDiffusion_XL.from_folder(folder)
    with torch.no_grad():
        for tensor in sdxl.state_dict().values():
            assert tensor.device.type == "cpu"
            tensor.sum()
    return {"baseline_mib": baseline, "peak_mib": _peak_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="SDXL's TINY preset: check that the script runs")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--keep", type=Path, help="write the weights in this folder and keep them (reused if there)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child: load this folder
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # child: write the weights there
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure_child(args.measure)))
        return
    if args.write is not None:
        write_folder(args.write, args.smoke)
        return
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        if not all((folder / file).is_file() for file in FILES.values()):
            # In its own process, as a download would be: nothing of it stays in the measuring process.
            write = [sys.executable, __file__, "--write", str(folder), *(["--smoke"] if args.smoke else [])]
            subprocess.run(write, capture_output=True, text=True, check=True)
        weights_mib = sum((folder / file).stat().st_size for file in FILES.values()) / 2**20
        command = [sys.executable, __file__, "--measure", str(folder)]
        child = subprocess.run(command, capture_output=True, text=True, check=True)
        measured = json.loads(child.stdout.splitlines()[-1])
    growth = measured["peak_mib"] - measured["baseline_mib"]
    result = Result("tiny (smoke)" if args.smoke else "SDXL base", weights_mib, growth, growth / weights_mib)
    print(
        f"StableDiffusion_XL.from_folder, {result.variant}: weights {result.weights_mib:.0f} MiB, peak RSS growth "
        f"{result.growth_mib:.0f} MiB, ratio {result.ratio:.3f} (target <= {TARGET_RATIO})"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"target_ratio": TARGET_RATIO, "results": [asdict(result)]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
