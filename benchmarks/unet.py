"""SD1UNet vs diffusers' UNet2DConditionModel: one denoising forward, same weights, SD1.5 config, CPU float32.

Both models hold the very same weight tensors (ours is built on the meta device and given diffusers' tensors,
converted by key only), and their outputs are checked to match before timing. Batch 2 (a negative and a positive
prompt), text embedding (2, 77, 768), latents 32x32 and 64x64 (256 and 512 pixel images). Runs of ours and diffusers'
alternate, round after round, in one process, so that drifts of the machine hit both alike; the ratio is taken per
round and its median reported. Target: ours/diffusers <= 1.0 (wall time). The CPU time of the process (all threads)
is reported beside it: on a machine shared with other jobs it is the steadier of the two.

Usage:
    uv run python benchmarks/unet.py [--rounds N] [--warmup N] [--threads N] [--json PATH]
    uv run python benchmarks/unet.py --smoke  # a tiny UNet, one forward each: checks it runs, measures nothing
"""

import argparse
import gc
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _machine import cpu_model, interleaved
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor

from refiners.converters.reference_check import SD15_UNET_CONFIG
from refiners.converters.unet import convert_diffusers_unet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet

__all__ = ["Result", "build_pair", "measure", "timed_pair", "run", "main"]

TARGET_RATIO = 1.0
BATCH = 2
SIZES = (32, 64)
# The same architecture at toy size, for --smoke.
TINY_CHANNELS = (32, 32, 64, 64)
TINY_CONTEXT_DIM = 16
TINY_UNET_CONFIG: dict[str, Any] = SD15_UNET_CONFIG | {
    "block_out_channels": list(TINY_CHANNELS),
    "cross_attention_dim": TINY_CONTEXT_DIM,
}


@dataclass
class Result:
    """The timings of one latent size: medians over rounds, in seconds per forward (wall, and process CPU time)."""

    variant: str
    ours_s: float
    diffusers_s: float
    ratio: float
    ours_cpu_s: float
    diffusers_cpu_s: float
    cpu_ratio: float
    rounds: int
    load_average: float


def build_pair(tiny: bool = False) -> tuple[SD1UNet, UNet2DConditionModel]:
    """diffusers' UNet with random weights, and ours holding the same weight tensors.

    Args:
        tiny: Build the toy-size UNet (for --smoke) instead of SD1.5's.
    """
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG)).eval()
    if tiny:
        ours = SD1UNet(channels=TINY_CHANNELS, context_embedding_dim=TINY_CONTEXT_DIM, device="meta")
    else:
        ours = SD1UNet(device="meta")
    ours.load_state_dict(convert_diffusers_unet(theirs.state_dict(), ours), strict=True, assign=True)
    return ours, theirs


def measure(ours: SD1UNet, theirs: UNet2DConditionModel, size: int, rounds: int, warmup: int) -> Result:
    """Time ours and diffusers' alternately on `size`x`size` latents, `rounds` forwards each after `warmup` each.

    Args:
        ours: Our UNet.
        theirs: diffusers' UNet, with the same weights.
        size: Height and width of the latents.
        rounds: Number of (ours, diffusers) measurement pairs; who goes first alternates.
        warmup: Forwards of each model before measuring.
    """
    generator = torch.Generator().manual_seed(size)
    context_dim = ours.context_embedding_dim
    latents = torch.randn(BATCH, 4, size, size, generator=generator)
    timesteps = torch.tensor([999, 500])
    text_embedding = torch.randn(BATCH, 77, context_dim, generator=generator)
    ours.set_timestep(timesteps)
    ours.set_clip_text_embedding(text_embedding)

    def run_ours() -> Tensor:
        return ours(latents)

    def run_theirs() -> Tensor:
        return theirs(latents, timesteps, encoder_hidden_states=text_embedding).sample

    return timed_pair(run_ours, run_theirs, f"latents {size}x{size}", rounds, warmup)


def timed_pair(
    run_ours: Callable[[], Tensor], run_theirs: Callable[[], Tensor], variant: str, rounds: int, warmup: int
) -> Result:
    """Check that both compute the same (1e-4 of the output's scale), warm up, then time them interleaved.

    Args:
        run_ours: One forward of ours.
        run_theirs: The same forward of the reference.
        variant: The row's name.
        rounds: Number of (ours, reference) measurement pairs.
        warmup: Forwards of each before measuring.
    """
    with torch.no_grad():
        # The comparison is only fair if both compute the same thing.
        expected = run_theirs()
        atol = 1e-4 * expected.abs().max().item()
        torch.testing.assert_close(run_ours(), expected, atol=atol, rtol=0)
        del expected
        for _ in range(warmup):
            run_ours()
            run_theirs()
        timings = interleaved(run_ours, run_theirs, rounds)
    return Result(
        variant=variant,
        ours_s=timings.ours_s,
        diffusers_s=timings.reference_s,
        ratio=timings.ratio,
        ours_cpu_s=timings.ours_cpu_s,
        diffusers_cpu_s=timings.reference_cpu_s,
        cpu_ratio=timings.cpu_ratio,
        rounds=rounds,
        load_average=os.getloadavg()[0],
    )


def run(
    argv: list[str] | None,
    description: str,
    build: Callable[[bool], tuple[Any, Any]],
    time_size: Callable[[Any, Any, int, int, int], Result],
    titles: tuple[str, str],
    sizes: tuple[int, ...],
) -> list[Result]:
    """The command line of a UNet benchmark: parse it, build the pair, time each latent size, print and save the table.

    Args:
        argv: The arguments (default: the command line).
        description: The script's documentation, for `--help`.
        build: `build(tiny)`: ours and the reference, holding the same weights.
        time_size: `time_size(ours, reference, size, rounds, warmup)`: one row.
        titles: What is compared (`"SD1UNet vs diffusers UNet2DConditionModel"`) and the full-size model's name.
        sizes: The default latent sizes.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="measurement pairs per latent size (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="forwards of each model before measuring (default: 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(sizes), help=f"latent sizes (default: {sizes})")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a tiny UNet, one forward each: checks it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.warmup, args.sizes, args.threads = 1, 0, [8], 1
    torch.set_num_threads(args.threads)

    ours, theirs = build(args.smoke)
    gc.collect()
    results = [time_size(ours, theirs, size, args.rounds, args.warmup) for size in args.sizes]
    machine = f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    comparison, model = titles
    print(f"{comparison}, {'tiny UNet (smoke)' if args.smoke else model}, batch {BATCH}, float32, CPU ({machine})")
    print(f"median of {args.rounds} interleaved rounds, {args.warmup} warmup; target ours/diffusers <= {TARGET_RATIO}")
    print(
        f"{'variant':<16} {'ours (s)':>9} {'diffusers (s)':>14} {'ours/diffusers':>15} {'CPU: ours (s)':>14} "
        f"{'diffusers (s)':>14} {'ours/diffusers':>15} {'load':>5}"
    )
    for r in results:
        print(
            f"{r.variant:<16} {r.ours_s:>9.3f} {r.diffusers_s:>14.3f} {r.ratio:>15.3f} {r.ours_cpu_s:>14.3f} "
            f"{r.diffusers_cpu_s:>14.3f} {r.cpu_ratio:>15.3f} {r.load_average:>5.1f}"
        )
    if args.json is not None:
        payload = {"machine": machine, "target_ratio": TARGET_RATIO, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> list[Result]:
    titles = ("SD1UNet vs diffusers UNet2DConditionModel", "SD1.5 UNet")
    return run(argv, __doc__ or "", build_pair, measure, titles, SIZES)


if __name__ == "__main__":
    main()
