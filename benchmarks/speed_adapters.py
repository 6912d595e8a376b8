"""DeepCache and ToMe: steps per second, ours and diffusers', plain and with each, on the same SD1.5 weights, CPU.

SD1.5's architecture at reduced widths (UNet 128 to 512 channels instead of 320 to 1280, autoencoder 64 to 256
instead of 128 to 512; attention, depths and text width as SD1.5's), so that a step takes about a second of CPU at
256x256 (32x32 latents, 1024 tokens at the highest resolution, where ToMe merges). Six variants of one DDIM generation with classifier-free guidance (batch 2 in the UNet), from the same noise and
text embeddings: ours plain, ours + `DeepCacheAdapter`, ours + `ToMeAdapter`, diffusers' `StableDiffusionPipeline`
plain, + `DeepCacheSDHelper` (the `deepcache` package), + `tomesd.apply_patch`. Both sides hold the very same weight
tensors (random weights, converted by key as in `generation.py`). Only the denoising loop is
timed; each round runs the six variants once, in an order that rotates from round to round, and the medians over
rounds are reported.

Before timing, each adapter run of ours is checked against diffusers' with its reference (max |difference| of the
final latents over their scale, reported). The image quality of an adapter is the PSNR of its decoded final image
against the plain run's (images in [0, 1]; random weights make images of noise, so the PSNR says how far the
adapter moves the output, not how good it looks). DeepCache: `cache_interval=3`, `cache_branch_id=0`; ToMe: ratio
0.5, tomesd's defaults otherwise, destinations drawn from a generator seeded alike on both sides.

Usage:
    uv run python benchmarks/speed_adapters.py [--rounds N] [--steps N] [--size N] [--threads N] [--json PATH]
    uv run python benchmarks/speed_adapters.py --smoke  # toy models, 3 steps: checks it runs, measures nothing
"""

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import tomesd  # pyright: ignore[reportMissingTypeStubs]
import torch
from _machine import Timing, cpu_model, timed
from DeepCache import DeepCacheSDHelper
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from generation import GUIDANCE_SCALE, SCHEDULER_CONFIG
from generation import build_pair as build_toy_pair
from torch import Tensor

from refiners.adapters.deepcache import DeepCacheAdapter
from refiners.adapters.tome import ToMeAdapter
from refiners.converters.autoencoder import convert_diffusers_autoencoder
from refiners.converters.reference_check import SD15_UNET_CONFIG, SD15_VAE_CONFIG
from refiners.converters.unet import convert_diffusers_unet
from refiners.foundationals.clip import CLIPTextEncoderL
from refiners.foundationals.latent_diffusion import DDIM, LatentDiffusionAutoencoder, SD1UNet, StableDiffusion_1

__all__ = ["Result", "main"]

CACHE_INTERVAL, CACHE_BRANCH_ID = 3, 0
TOME_RATIO = 0.5
TOME_SEED = 0


UNET_CHANNELS = (128, 256, 512, 512)
VAE_CHANNELS = (64, 128, 256, 256)


def build_pair(smoke: bool, steps: int) -> tuple[StableDiffusion_1, StableDiffusionPipeline]:
    """diffusers' pipeline with random weights at the reduced widths, and ours holding the same weight tensors.

    Args:
        smoke: `generation.py`'s toy models instead.
        steps: The number of inference steps of our solver.
    """
    if smoke:
        return build_toy_pair(tiny=True, steps=steps)
    torch.manual_seed(0)
    unet_config: dict[str, Any] = {**SD15_UNET_CONFIG, "block_out_channels": list(UNET_CHANNELS)}
    vae_config: dict[str, Any] = {**SD15_VAE_CONFIG, "block_out_channels": list(VAE_CHANNELS)}
    unet = UNet2DConditionModel(**unet_config).eval()
    vae = AutoencoderKL(**vae_config).eval()
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
    our_unet = SD1UNet(channels=UNET_CHANNELS, device="meta")
    lda = LatentDiffusionAutoencoder(0.18215, block_out_channels=VAE_CHANNELS, layers_per_block=2, device="meta")
    our_unet.load_state_dict(convert_diffusers_unet(unet.state_dict(), our_unet), strict=True, assign=True)
    lda.load_state_dict(convert_diffusers_autoencoder(vae.state_dict(), lda), strict=True, assign=True)
    # The text encoder stays on the meta device: the embeddings are given, as they are to diffusers.
    encoder = CLIPTextEncoderL(device="meta")
    return StableDiffusion_1(unet=our_unet, lda=lda, clip_text_encoder=encoder, solver=DDIM(steps)), pipeline


@dataclass
class Result:
    """One variant: medians over rounds of the denoising loop's wall and process CPU time, and its quality."""

    variant: str
    steps_per_s: float
    wall_s: float
    cpu_s: float
    speedup: float
    psnr_db: float
    max_difference_to_reference: float
    rounds: int
    load_average: float


@dataclass
class Variant:
    """A generation: `setup` before it (untimed), `denoise` (timed, returns the latents), `teardown` after."""

    name: str
    denoise: Callable[[], Tensor]
    decode: Callable[[Tensor], Tensor]
    setup: Callable[[], object] = lambda: None
    teardown: Callable[[], object] = lambda: None

    def run(self) -> tuple[Timing, Tensor]:
        self.setup()
        try:
            latents: list[Tensor] = []
            timing = timed(lambda: latents.append(self.denoise()))
        finally:
            self.teardown()
        return timing, latents[0]


def variants(ours: StableDiffusion_1, theirs: StableDiffusionPipeline, size: int, steps: int) -> list[Variant]:
    """The six generations, on the same noise and text embeddings."""
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

    def their_latents() -> Tensor:
        output: Any = theirs(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            latents=noise,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            height=size * 8,
            width=size * 8,
            output_type="latent",
        )
        return output.images

    def our_image(latents: Tensor) -> Tensor:
        return ours.lda.decode(latents)

    def their_image(latents: Tensor) -> Tensor:
        return theirs.vae.decode(latents / theirs.vae.config.scaling_factor).sample  # pyright: ignore

    held: dict[str, Any] = {}

    def inject_deepcache() -> None:
        held["deepcache"] = DeepCacheAdapter(ours.unet, CACHE_INTERVAL, CACHE_BRANCH_ID).inject()

    def enable_helper() -> None:
        helper = DeepCacheSDHelper(pipe=theirs)
        helper.set_params(cache_interval=CACHE_INTERVAL, cache_branch_id=CACHE_BRANCH_ID)
        helper.enable()
        held["helper"] = helper

    def inject_tome() -> None:
        seeded = torch.Generator().manual_seed(TOME_SEED)
        held["tome"] = ToMeAdapter(ours.unet, ratio=TOME_RATIO, generator=seeded).inject()

    def apply_tomesd() -> None:
        tomesd.apply_patch(cast(Any, theirs), ratio=TOME_RATIO)
        theirs.unet._tome_info["args"]["generator"] = torch.Generator().manual_seed(TOME_SEED)  # pyright: ignore

    return [
        Variant("ours", our_latents, our_image),
        Variant("ours + DeepCache", our_latents, our_image, inject_deepcache, lambda: held.pop("deepcache").eject()),
        Variant("ours + ToMe", our_latents, our_image, inject_tome, lambda: held.pop("tome").eject()),
        Variant("diffusers", their_latents, their_image),
        Variant(
            "diffusers + DeepCacheSDHelper",
            their_latents,
            their_image,
            enable_helper,
            lambda: held.pop("helper").disable(),
        ),
        Variant(
            "diffusers + tomesd",
            their_latents,
            their_image,
            apply_tomesd,
            lambda: tomesd.remove_patch(cast(Any, theirs)),
        ),
    ]


def psnr(image: Tensor, reference: Tensor) -> float:
    """The PSNR in dB of two images in [-1, 1], mapped to [0, 1] and clamped."""
    a, b = ((x.clamp(-1, 1) + 1) / 2 for x in (image, reference))
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def measure(
    ours: StableDiffusion_1, theirs: StableDiffusionPipeline, size: int, steps: int, rounds: int
) -> list[Result]:
    """Check each adapter of ours against its reference, then time `rounds` rounds of the six variants.

    Args:
        ours: Our pipeline.
        theirs: diffusers' pipeline, with the same weights.
        size: Height and width of the latents.
        steps: The number of inference steps.
        rounds: The number of rounds; each runs every variant once.
    """
    table = variants(ours, theirs, size, steps)
    with torch.no_grad():
        # The comparison is only fair if both compute the same thing; this run is also the warmup.
        latents = {variant.name: variant.run()[1] for variant in table}
        images = {variant.name: variant.decode(latents[variant.name]) for variant in table}
        differences: dict[str, float] = {}
        for ours_name, their_name in zip(table[:3], table[3:], strict=True):
            expected = latents[their_name.name]
            difference = (latents[ours_name.name] - expected).abs().max().item() / expected.abs().max().item()
            differences[ours_name.name] = differences[their_name.name] = difference
        print(
            "ours vs reference, max |difference| / scale: " + ", ".join(f"{n} {d:.1e}" for n, d in differences.items())
        )
        timings: dict[str, list[Timing]] = {variant.name: [] for variant in table}
        for round_index in range(rounds):
            shift = round_index % len(table)
            for variant in table[shift:] + table[:shift]:
                timings[variant.name].append(variant.run()[0])
            print(f"round {round_index}: " + ", ".join(f"{n} {t[-1][0]:.2f} s" for n, t in timings.items()))
    results: list[Result] = []
    for index, variant in enumerate(table):
        plain = table[0 if index < 3 else 3].name
        wall = statistics.median(wall for wall, _ in timings[variant.name])
        results.append(
            Result(
                variant=variant.name,
                steps_per_s=steps / wall,
                wall_s=wall,
                cpu_s=statistics.median(cpu for _, cpu in timings[variant.name]),
                speedup=statistics.median(
                    p[0] / v[0] for p, v in zip(timings[plain], timings[variant.name], strict=True)
                ),
                psnr_db=psnr(images[variant.name], images[plain]),
                max_difference_to_reference=differences[variant.name],
                rounds=rounds,
                load_average=os.getloadavg()[0],
            )
        )
    return results


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the six variants (default: 3)")
    parser.add_argument("--steps", type=int, default=10, help="inference steps (default: 10)")
    parser.add_argument("--size", type=int, default=32, help="latent height and width (default: 32, 256 px)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="toy models, 3 steps, one round: checks it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.size, args.threads = 1, 3, 16, 1
    torch.set_num_threads(args.threads)

    ours, theirs = build_pair(args.smoke, args.steps)
    results = measure(ours, theirs, args.size, args.steps, args.rounds)
    machine = f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    model = "toy models (smoke)" if args.smoke else f"SD1.5 at widths {UNET_CHANNELS}"
    print(f"DeepCache and ToMe, ours and diffusers', {model}, {args.steps} DDIM steps, latents {args.size}x{args.size}")
    print(f"({machine}); medians of {args.rounds} rounds")
    print(
        f"{'variant':<30} {'steps/s':>8} {'wall (s)':>9} {'CPU (s)':>8} {'speedup':>8} {'PSNR (dB)':>10} "
        f"{'vs reference':>13} {'load':>5}"
    )
    for r in results:
        print(
            f"{r.variant:<30} {r.steps_per_s:>8.3f} {r.wall_s:>9.2f} {r.cpu_s:>8.2f} {r.speedup:>8.2f} "
            f"{r.psnr_db:>10.1f} {r.max_difference_to_reference:>13.1e} {r.load_average:>5.1f}"
        )
    if args.json is not None:
        payload = {"machine": machine, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
