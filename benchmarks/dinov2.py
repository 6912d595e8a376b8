"""DINOv2 vs transformers' Dinov2Model: one forward, same weights, DINOv2-base's config, CPU float32.

transformers' model gets random weights and is saved with `save_pretrained`; ours is converted from that folder by
`refiners-convert dinov2`'s conversion, and both outputs are checked to match (1e-4 of the output's scale) before
timing. Two inputs: a batch of 4 images at 224 x 224 (the position embeddings resampled from 37 x 37 to 16 x 16
patches, as in classification) and one image at 518 x 518 (the native grid, 1370 tokens, as for dense features).
Runs of ours and transformers' alternate, round after round, in one process, so that drifts of the machine hit both
alike; the ratio is taken per round and its median reported. Target: ours/transformers <= 1.0 (wall time). The CPU
time of the process (all threads) is reported beside it: on a machine shared with other jobs it is the steadier.

Usage:
    uv run python benchmarks/dinov2.py [--rounds N] [--warmup N] [--threads N] [--json PATH]
    uv run python benchmarks/dinov2.py --smoke  # a tiny ViT, one forward each: checks it runs, measures nothing
"""

import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _machine import cpu_model, interleaved
from transformers import Dinov2Config, Dinov2Model

from refiners.converters.dinov2 import convert_dinov2_weights, open_dinov2_source
from refiners.foundationals.dinov2 import DINOV2_CLASSES, ViT

TARGET_RATIO = 1.0
BASE_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 518,
    "patch_size": 14,
}
TINY_CONFIG: dict[str, Any] = BASE_CONFIG | {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
INPUTS = ((4, 224), (1, 518))  # (batch, image size)


@dataclass
class Result:
    """The timings of one input: medians over rounds, in seconds per forward (wall, and process CPU time)."""

    variant: str
    ours_s: float
    transformers_s: float
    ratio: float
    ours_cpu_s: float
    transformers_cpu_s: float
    cpu_ratio: float
    rounds: int
    load_average: float


def build_pair(tiny: bool = False) -> tuple[ViT, Dinov2Model]:
    """transformers' DINOv2 with random weights, and ours converted from its saved folder.

    Args:
        tiny: A 32-wide, 2-layer model (for --smoke) instead of DINOv2-base.
    """
    torch.manual_seed(0)
    theirs = Dinov2Model(Dinov2Config(**(TINY_CONFIG if tiny else BASE_CONFIG))).eval()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        conversion = convert_dinov2_weights(open_dinov2_source(Path(folder)))
    ours = conversion.config.build(DINOV2_CLASSES, device="meta")
    ours.load_state_dict(conversion.tensors, strict=True, assign=True)
    return ours, theirs


def measure(ours: ViT, theirs: Dinov2Model, batch: int, size: int, rounds: int, warmup: int) -> Result:
    """Time ours and transformers' alternately on `batch` images of `size` x `size`."""
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))

    def run_ours() -> torch.Tensor:
        return ours(images)

    def run_theirs() -> torch.Tensor:
        return theirs(pixel_values=images).last_hidden_state

    with torch.no_grad():
        expected = run_theirs()
        torch.testing.assert_close(run_ours(), expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
        for _ in range(warmup):
            run_ours()
            run_theirs()
        timings = interleaved(run_ours, run_theirs, rounds)
    return Result(
        variant=f"{batch} x {size}x{size}",
        ours_s=timings.ours_s,
        transformers_s=timings.reference_s,
        ratio=timings.ratio,
        ours_cpu_s=timings.ours_cpu_s,
        transformers_cpu_s=timings.reference_cpu_s,
        cpu_ratio=timings.cpu_ratio,
        rounds=rounds,
        load_average=os.getloadavg()[0],
    )


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="measurement pairs per input (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="forwards of each model before measuring (default: 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a tiny ViT, one forward each: checks it runs")
    args = parser.parse_args(argv)
    inputs = INPUTS
    if args.smoke:
        args.rounds, args.warmup, args.threads, inputs = 1, 0, 1, ((1, 56),)
    torch.set_num_threads(args.threads)

    ours, theirs = build_pair(args.smoke)
    results = [measure(ours, theirs, batch, size, args.rounds, args.warmup) for batch, size in inputs]
    machine = f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    model = "tiny ViT (smoke)" if args.smoke else "DINOv2-base"
    print(f"DINOv2 ViT vs transformers Dinov2Model, {model}, float32, CPU ({machine})")
    print(
        f"median of {args.rounds} interleaved rounds, {args.warmup} warmup; target ours/transformers <= {TARGET_RATIO}"
    )
    print(
        f"{'input':<14} {'ours (s)':>9} {'transformers (s)':>17} {'ours/theirs':>12} {'CPU: ours (s)':>14} "
        f"{'transformers (s)':>17} {'ours/theirs':>12} {'load':>5}"
    )
    for r in results:
        print(
            f"{r.variant:<14} {r.ours_s:>9.3f} {r.transformers_s:>17.3f} {r.ratio:>12.3f} {r.ours_cpu_s:>14.3f} "
            f"{r.transformers_cpu_s:>17.3f} {r.cpu_ratio:>12.3f} {r.load_average:>5.1f}"
        )
    if args.json is not None:
        payload = {"machine": machine, "target_ratio": TARGET_RATIO, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
