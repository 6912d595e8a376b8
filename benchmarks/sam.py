"""SegmentAnything vs segment_anything's Sam: the image encoder's forward, and the decoder per prompt.

Both models hold the same weights: segment_anything's `Sam` from `sam_model_registry` (ViT-B by default) with random
weights, converted with `refiners-convert sam`'s code, and their outputs are checked to match (1e-4 of the output's
scale) before timing. Two rows:

- `image encoder`: one 1024x1024 image through the ViT (`SAMViT` vs `ImageEncoderViT`);
- `decoder, N prompts`: N one-point prompts decoded at once on one image embedding, prompt encoding included
  (`SegmentAnything.decode` vs `prompt_encoder` + `mask_decoder`), reported per prompt.

Runs of ours and the reference alternate, round after round, in one process; the ratio is taken per round and its
median reported (see `_machine.interleaved`). Target: ours/segment_anything <= 1.0 (wall time); the process CPU time
is reported beside it.

Usage:
    uv run python benchmarks/sam.py [--model vit_b|vit_l|vit_h] [--rounds N] [--warmup N] [--threads N] [--json PATH]
    uv run python benchmarks/sam.py --smoke  # a toy SAM, one round: checks it runs, measures nothing
"""

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from _machine import cpu_model, interleaved
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sam_references import TINY, build_reference, randomize
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from refiners.converters.segment_anything import build_original_sam, convert_original_sam
from refiners.foundationals.segment_anything import SegmentAnything

__all__ = ["Result", "build_pair", "main"]

TARGET_RATIO = 1.0
PROMPTS = 16


@dataclass
class Result:
    """One row: medians over rounds, in seconds per call (per prompt for the decoder), wall and process CPU time."""

    variant: str
    ours_s: float
    segment_anything_s: float
    ratio: float
    ours_cpu_s: float
    segment_anything_cpu_s: float
    cpu_ratio: float
    rounds: int
    load_average: float


def build_pair(model: str | None) -> tuple[SegmentAnything, Sam]:
    """segment_anything's `Sam` (`model` of `sam_model_registry`, or the tests' toy SAM when None), random weights,
    and ours holding the converted weights."""
    torch.manual_seed(0)
    if model is None:
        theirs = build_reference(TINY)
    else:
        theirs = sam_model_registry[model]()
        randomize(theirs, seed=0)
        theirs.eval()
    state = theirs.state_dict()
    ours = build_original_sam(state)
    ours.load_state_dict(convert_original_sam(state, ours), strict=True, assign=True)
    return ours, theirs


def _timed(
    run_ours: Callable[[], Tensor], run_theirs: Callable[[], Tensor], variant: str, rounds: int, warmup: int, per: int
) -> Result:
    with torch.no_grad():
        expected = run_theirs()
        torch.testing.assert_close(run_ours(), expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
        del expected
        for _ in range(warmup):
            run_ours()
            run_theirs()
        timings = interleaved(run_ours, run_theirs, rounds)
    return Result(
        variant=variant,
        ours_s=timings.ours_s / per,
        segment_anything_s=timings.reference_s / per,
        ratio=timings.ratio,
        ours_cpu_s=timings.ours_cpu_s / per,
        segment_anything_cpu_s=timings.reference_cpu_s / per,
        cpu_ratio=timings.cpu_ratio,
        rounds=rounds,
        load_average=os.getloadavg()[0],
    )


def measure(ours: SegmentAnything, theirs: Sam, rounds: int, warmup: int, prompts: int) -> list[Result]:
    """Time the image encoder and the decoder (see the module's documentation)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, ours.image_size, ours.image_size, generator=generator)
    encoder = _timed(
        lambda: ours.image_encoder(image), lambda: theirs.image_encoder(image), "image encoder", rounds, warmup, 1
    )
    with torch.no_grad():
        embedding = theirs.image_encoder(image)
    points = torch.rand(prompts, 1, 2, generator=generator) * ours.image_size
    labels = torch.ones(prompts, 1, dtype=torch.int)
    coordinates, types = ours.prompt_points((ours.image_size, ours.image_size), foreground_points=points)

    def run_ours() -> Tensor:
        return ours.decode(embedding, coordinates.float(), types)[0]

    def run_theirs() -> Tensor:
        sparse, dense = theirs.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        masks, _ = theirs.mask_decoder(
            image_embeddings=embedding,
            image_pe=theirs.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        return masks

    decoder = _timed(run_ours, run_theirs, f"decoder, {prompts} prompts", rounds, warmup, prompts)
    return [encoder, decoder]


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["vit_b", "vit_l", "vit_h"], default="vit_b", help="default: vit_b")
    parser.add_argument("--rounds", type=int, default=3, help="measurement pairs per row (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="calls of each before measuring (default: 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help=f"prompts decoded at once (default: {PROMPTS})")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a toy SAM, one round: checks it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.warmup, args.threads, args.prompts = 1, 0, 1, 2
    torch.set_num_threads(args.threads)
    ours, theirs = build_pair(None if args.smoke else args.model)
    gc.collect()
    results = measure(ours, theirs, args.rounds, args.warmup, args.prompts)
    machine = f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    print(f"SegmentAnything vs segment_anything Sam, {'toy SAM (smoke)' if args.smoke else args.model}, float32, CPU")
    print(f"({machine}); median of {args.rounds} interleaved rounds, target ours/segment_anything <= {TARGET_RATIO}")
    print(
        f"{'variant':<22} {'ours (s)':>10} {'SAM (s)':>10} {'ratio':>7} {'CPU ours':>10} {'CPU SAM':>10} {'ratio':>7}"
    )
    for r in results:
        print(
            f"{r.variant:<22} {r.ours_s:>10.4f} {r.segment_anything_s:>10.4f} {r.ratio:>7.3f} {r.ours_cpu_s:>10.4f} "
            f"{r.segment_anything_cpu_s:>10.4f} {r.cpu_ratio:>7.3f}  load {r.load_average:.1f}"
        )
    if args.json is not None:
        payload = {"machine": machine, "target_ratio": TARGET_RATIO, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
