"""Peak memory of loading Stable Diffusion 1.5's weights into StableDiffusion_1, relative to the weights' size.

The weights are made first, as a user's download would look: diffusers' `UNet2DConditionModel` and `AutoencoderKL`
and transformers' `CLIPTextModel` from SD1.5's configs with random weights (float32), saved with `save_pretrained`,
then converted with the refiners key maps to the three files of the seed README's Hello World (`unet`, `lda`,
`clip`), written with `save_to_safetensors`. Each measurement then runs in a fresh Python process: it imports what
it needs, takes its peak resident set size (`ru_maxrss`) as the baseline, loads, and reports the peak's growth.

- **meta** (the recommended path): `StableDiffusion_1(device="meta")`, then `load_from_safetensors` per component.
- **naive**: `StableDiffusion_1(device="cpu")` (a random initialization), then the same loads.
- **diffusers**: `from_pretrained` of the three saved folders (diffusers' and transformers' own loading).

The ratio is the peak's growth over the size of the weights (the sum of the three files' tensors). Target: <= 1.3
for the meta path.

Usage:
    uv run python benchmarks/load_memory.py [--json PATH] [--keep DIR]
    uv run python benchmarks/load_memory.py --smoke  # toy sizes: checks it runs, measures nothing meaningful
"""

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refiners.converters.reference_check import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

__all__ = ["Result", "main"]

TARGET_RATIO = 1.3
METHODS = ("meta", "naive", "diffusers")
COMPONENTS = ("unet", "lda", "clip")

# The same architectures at toy size, for --smoke.
TINY_UNET_CONFIG: dict[str, Any] = SD15_UNET_CONFIG | {
    "block_out_channels": [32, 32, 64, 64],
    "cross_attention_dim": 32,
}
TINY_VAE_CONFIG: dict[str, Any] = SD15_VAE_CONFIG | {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
TINY_TEXT_CONFIG: dict[str, Any] = SD15_TEXT_ENCODER_CONFIG | {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 1,
    "vocab_size": 1000,
}


@dataclass
class Result:
    """One loading path: the peak RSS growth over the baseline after imports, in MiB, and over the weights' size."""

    variant: str
    baseline_mib: float
    peak_mib: float
    weights_mib: float
    ratio: float


def _sd_components(tiny: bool, device: str) -> dict[str, Any]:
    """Our StableDiffusion_1 components: SD1.5's (the defaults) or the toy ones."""
    from refiners.foundationals.clip import CLIPTextEncoder
    from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder, SD1UNet

    if not tiny:
        return {}
    return {
        "unet": SD1UNet(channels=(32, 32, 64, 64), context_embedding_dim=32, device=device),
        "lda": LatentDiffusionAutoencoder(
            0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1, device=device
        ),
        "clip_text_encoder": CLIPTextEncoder(
            embedding_dim=32,
            vocabulary_size=1000,
            num_layers=1,
            num_attention_heads=4,
            feedforward_dim=64,
            gelu_approximation="quick",
            device=device,
        ),
    }


def write_weights(folder: Path, tiny: bool) -> None:
    """Random SD1.5 weights saved as diffusers/transformers folders, and converted to our three files.

    Args:
        folder: Where `unet/`, `vae/`, `text_encoder/` and `{unet,lda,clip}.safetensors` are written.
        tiny: Toy sizes (for --smoke).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from refiners.converters.autoencoder import convert_diffusers_autoencoder
    from refiners.converters.clip_text import convert_transformers_clip_text
    from refiners.converters.unet import convert_diffusers_unet
    from refiners.fluxion.utils import save_to_safetensors
    from refiners.foundationals.latent_diffusion import StableDiffusion_1

    torch.manual_seed(0)
    ours = StableDiffusion_1(**_sd_components(tiny, "meta"), device="meta")
    unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG))
    unet.save_pretrained(folder / "unet")
    save_to_safetensors(folder / "unet.safetensors", convert_diffusers_unet(unet.state_dict(), ours.unet))
    del unet
    vae = AutoencoderKL(**(TINY_VAE_CONFIG if tiny else SD15_VAE_CONFIG))
    vae.save_pretrained(folder / "vae")
    save_to_safetensors(folder / "lda.safetensors", convert_diffusers_autoencoder(vae.state_dict(), ours.lda))
    del vae
    text = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT_CONFIG if tiny else SD15_TEXT_ENCODER_CONFIG)))
    text.save_pretrained(folder / "text_encoder")
    clip = convert_transformers_clip_text(text.state_dict(), ours.clip_text_encoder)
    save_to_safetensors(folder / "clip.safetensors", clip)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_child(method: str, folder: Path, tiny: bool) -> dict[str, float]:
    """Load the weights one way in this (fresh) process; the peak RSS before and after, in MiB."""
    import torch

    if method == "diffusers":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        baseline = _peak_mib()
        models: list[torch.nn.Module] = [
            UNet2DConditionModel.from_pretrained(folder / "unet"),
            AutoencoderKL.from_pretrained(folder / "vae"),
            CLIPTextModel.from_pretrained(folder / "text_encoder"),
        ]
    else:
        from refiners.foundationals.latent_diffusion import StableDiffusion_1

        baseline = _peak_mib()
        device = "meta" if method == "meta" else "cpu"
        sd = StableDiffusion_1(**_sd_components(tiny, device), device=device)
        sd.clip_text_encoder.load_from_safetensors(folder / "clip.safetensors")
        sd.lda.load_from_safetensors(folder / "lda.safetensors")
        sd.unet.load_from_safetensors(folder / "unet.safetensors")
        models = [sd.unet, sd.lda, sd.clip_text_encoder]
    # Everything loaded is on CPU (no weight left on the meta device), and read once: safetensors may map the file
    # lazily, and a weight that was never paged in would not count.
    with torch.no_grad():
        for model in models:
            for tensor in model.state_dict().values():
                assert tensor.device.type == "cpu"
                tensor.sum()
    return {"baseline_mib": baseline, "peak_mib": _peak_mib()}


def _weights_mib(folder: Path) -> float:
    from safetensors import safe_open

    total = 0
    for component in COMPONENTS:
        with safe_open(str(folder / f"{component}.safetensors"), framework="pt") as handle:
            keys: list[str] = handle.keys()
            total += sum(math.prod(handle.get_slice(key).get_shape()) * 4 for key in keys)  # float32
    return total / 2**20


def _run_self(*arguments: str) -> str:
    command = [sys.executable, __file__, *arguments]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes: check that the script runs")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument(
        "--keep", type=Path, help="write (or reuse) the weights in this folder instead of a temporary one"
    )
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # child: write the weights there
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)  # child: one measurement
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    smoke_flag = ["--smoke"] if args.smoke else []

    if args.write is not None:
        write_weights(args.write, tiny=args.smoke)
        return
    if args.measure is not None:
        print(json.dumps(measure_child(args.measure, args.folder, tiny=args.smoke)))
        return

    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "unet.safetensors").is_file():
            _run_self("--write", str(folder), *smoke_flag)
        weights_mib = _weights_mib(folder)
        results: list[Result] = []
        for method in METHODS:
            child = json.loads(_run_self("--measure", method, "--folder", str(folder), *smoke_flag).splitlines()[-1])
            growth = child["peak_mib"] - child["baseline_mib"]
            results.append(Result(method, child["baseline_mib"], growth, weights_mib, growth / weights_mib))

    print(f"weights: {weights_mib:.1f} MiB (float32); peak RSS growth over the baseline after imports")
    print(f"{'variant':<10} {'baseline MiB':>13} {'peak MiB':>10} {'peak/weights':>13}")
    for result in results:
        print(
            f"{result.variant:<10} {result.baseline_mib:>13.1f} {result.peak_mib:>10.1f} {result.ratio:>13.3f}"
            + (f"   target <= {TARGET_RATIO}" if result.variant == "meta" else "")
        )
    if args.json is not None:
        machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
        import torch

        machine["torch"] = torch.__version__
        report = {"benchmark": "load_memory", "smoke": args.smoke, "target_ratio": TARGET_RATIO, "machine": machine}
        args.json.write_text(json.dumps(report | {"results": [asdict(result) for result in results]}, indent=2))


if __name__ == "__main__":
    main()
