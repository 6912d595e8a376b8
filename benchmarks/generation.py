"""A whole Stable Diffusion 1.5 generation: StableDiffusion_1 vs diffusers' StableDiffusionPipeline, CPU float32.

Both sides hold the very same weight tensors (diffusers' UNet and autoencoder with random weights; ours built on the
meta device and given those tensors, converted by key only), run the same solver (DDIM, SD1.5's schedule) for 20
steps from the same initial noise, with classifier-free guidance (scale 7.5) on one prompt, so the UNet runs on a
batch of 2. The text embeddings are given (random, `(1, 77, 768)` each for the prompt and the negative prompt): a
generation is the denoising loop and the decoding of the latents to a PIL image. Latents 32x32 (256x256 images).

Before timing, one untimed generation on each side checks that the final latents agree (atol = 1e-3 of their scale:
20 guided steps of random weights amplify float32 rounding). Then generations alternate, round after round, in one
process (who goes first alternates too); the ratio is taken per round and its median reported. Target:
ours/diffusers <= 1.0 (wall time); the process CPU time is reported beside it.

Usage:
    uv run python benchmarks/generation.py [--rounds N] [--steps N] [--size N] [--threads N] [--json PATH]
    uv run python benchmarks/generation.py --smoke  # toy models, 2 steps: checks it runs, measures nothing
"""

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from _machine import Timing, cpu_model, interleaved
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor

from refiners.converters.autoencoder import convert_diffusers_autoencoder
from refiners.converters.reference_check import SD15_UNET_CONFIG, SD15_VAE_CONFIG
from refiners.converters.unet import convert_diffusers_unet
from refiners.foundationals.clip import CLIPTextEncoder, CLIPTextEncoderL
from refiners.foundationals.latent_diffusion import (
    DDIM,
    LatentDiffusionAutoencoder,
    SD1Autoencoder,
    SD1UNet,
    StableDiffusion_1,
)

__all__ = ["Result", "build_pair", "measure", "main"]

TARGET_RATIO = 1.0
GUIDANCE_SCALE = 7.5
# SD1.5's scheduler_config.json, as DDIMScheduler reads it.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
# The same architecture at toy size, for --smoke.
TINY_CONTEXT_DIM = 32
TINY_UNET_CONFIG: dict[str, Any] = SD15_UNET_CONFIG | {
    "block_out_channels": [32, 32, 64, 64],
    "cross_attention_dim": TINY_CONTEXT_DIM,
}
TINY_VAE_CONFIG: dict[str, Any] = SD15_VAE_CONFIG | {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}


@dataclass
class Result:
    """Medians over rounds, in seconds per generation (wall, and process CPU time)."""

    variant: str
    ours_s: float
    diffusers_s: float
    ratio: float
    ours_cpu_s: float
    diffusers_cpu_s: float
    cpu_ratio: float
    rounds: int
    max_latent_difference: float
    load_average: float


def build_pair(tiny: bool, steps: int) -> tuple[StableDiffusion_1, StableDiffusionPipeline]:
    """diffusers' pipeline with random weights, and ours holding the same weight tensors.

    Args:
        tiny: Toy-size models (for --smoke) instead of SD1.5's.
        steps: The number of inference steps of both solvers.
    """
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG)).eval()
    vae = AutoencoderKL(**(TINY_VAE_CONFIG if tiny else SD15_VAE_CONFIG)).eval()
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,  # pyright: ignore[reportArgumentType] (the embeddings are given)
        tokenizer=None,  # pyright: ignore[reportArgumentType]
        unet=unet,
        scheduler=cast(Any, DDIMScheduler.from_config(SCHEDULER_CONFIG)),
        safety_checker=None,  # pyright: ignore[reportArgumentType]
        feature_extractor=None,  # pyright: ignore[reportArgumentType]
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)

    if tiny:
        our_unet = SD1UNet(channels=(32, 32, 64, 64), context_embedding_dim=TINY_CONTEXT_DIM, device="meta")
        lda = LatentDiffusionAutoencoder(
            0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1, device="meta"
        )
        encoder = CLIPTextEncoder(embedding_dim=TINY_CONTEXT_DIM, num_layers=1, num_attention_heads=4, device="meta")
    else:
        our_unet, lda, encoder = SD1UNet(device="meta"), SD1Autoencoder(device="meta"), CLIPTextEncoderL(device="meta")
    our_unet.load_state_dict(convert_diffusers_unet(unet.state_dict(), our_unet), strict=True, assign=True)
    lda.load_state_dict(convert_diffusers_autoencoder(vae.state_dict(), lda), strict=True, assign=True)
    # The text encoder stays on the meta device: the embeddings are given, as they are to diffusers.
    ours = StableDiffusion_1(unet=our_unet, lda=lda, clip_text_encoder=encoder, solver=DDIM(num_inference_steps=steps))
    return ours, pipeline


def measure(ours: StableDiffusion_1, theirs: StableDiffusionPipeline, size: int, steps: int, rounds: int) -> Result:
    """Check that both generate the same latents, then time `rounds` generations of each, alternately.

    Args:
        ours: Our pipeline, its solver set to `steps` steps.
        theirs: diffusers' pipeline, with the same weights.
        size: Height and width of the latents.
        steps: The number of inference steps.
        rounds: Number of (ours, diffusers) measurement pairs; who goes first alternates.
    """
    generator = torch.Generator().manual_seed(size)
    dim = ours.unet.context_embedding_dim
    noise = torch.randn(1, 4, size, size, generator=generator)
    negative, positive = torch.randn(1, 77, dim, generator=generator), torch.randn(1, 77, dim, generator=generator)
    clip_text_embedding = torch.cat([negative, positive])

    def our_latents() -> Tensor:
        ours.set_num_inference_steps(steps)
        x = ours.init_latents((size * 8, size * 8), noise=noise)
        for step in ours.steps:
            x = ours(x, step=step, clip_text_embedding=clip_text_embedding, condition_scale=GUIDANCE_SCALE)
        return x

    def their_output(output_type: str) -> Any:
        output: Any = theirs(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            latents=noise,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            height=size * 8,
            width=size * 8,
            output_type=output_type,
        )
        return output.images

    def run_ours() -> object:
        return ours.lda.decode_latents(our_latents())

    def run_theirs() -> object:
        return their_output("pil")

    with torch.no_grad():
        # The comparison is only fair if both compute the same thing; this run is also the warmup.
        expected = their_output("latent")
        actual = our_latents()
        difference = (actual - expected).abs().max().item()
        torch.testing.assert_close(actual, expected, atol=1e-3 * expected.abs().max().item(), rtol=0)
        timings = interleaved(run_ours, run_theirs, rounds, _report)
    return Result(
        variant=f"{steps} steps, latents {size}x{size}",
        ours_s=timings.ours_s,
        diffusers_s=timings.reference_s,
        ratio=timings.ratio,
        ours_cpu_s=timings.ours_cpu_s,
        diffusers_cpu_s=timings.reference_cpu_s,
        cpu_ratio=timings.cpu_ratio,
        rounds=rounds,
        max_latent_difference=difference,
        load_average=os.getloadavg()[0],
    )


def _report(round_index: int, ours: Timing, theirs: Timing) -> None:
    print(f"round {round_index}: ours {ours[0]:.2f} s, diffusers {theirs[0]:.2f} s")


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="measurement pairs (default: 3)")
    parser.add_argument("--steps", type=int, default=20, help="inference steps (default: 20)")
    parser.add_argument("--size", type=int, default=32, help="latent height and width (default: 32, 256 px)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="toy models, 2 steps, one round: checks it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.size, args.threads = 1, 2, 8, 1
    torch.set_num_threads(args.threads)

    ours, theirs = build_pair(tiny=args.smoke, steps=args.steps)
    results = [measure(ours, theirs, args.size, args.steps, args.rounds)]
    machine = f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    model = "toy models (smoke)" if args.smoke else "SD1.5"
    print(f"StableDiffusion_1 vs diffusers StableDiffusionPipeline, {model}, DDIM, guidance {GUIDANCE_SCALE}, CPU")
    print(f"({machine}); median of {args.rounds} interleaved rounds; target ours/diffusers <= {TARGET_RATIO}")
    for r in results:
        print(
            f"{r.variant}: ours {r.ours_s:.2f} s, diffusers {r.diffusers_s:.2f} s, ratio {r.ratio:.3f}; "
            f"CPU ours {r.ours_cpu_s:.2f} s, diffusers {r.diffusers_cpu_s:.2f} s, ratio {r.cpu_ratio:.3f}; "
            f"max |latents difference| {r.max_latent_difference:.2e}; load {r.load_average:.1f}"
        )
    if args.json is not None:
        payload = {"machine": machine, "target_ratio": TARGET_RATIO, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
