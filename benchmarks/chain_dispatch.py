"""What a `fl.Chain` costs over `torch.nn.Sequential`: the same deep MLP, the same weights, batch 1, on the CPU.

At batch 1 the layers are small, so Python dispatch is a sizeable part of the time: this measures the overhead of
Chain's `__call__`/`forward` (context store, tuple unpacking, error location) per layer. Runs of ours and
torch's alternate, round after round, in one process, so that drifts of the machine hit both alike; the ratio is
taken per round and its median reported. Times are this process's CPU time by default (`--clock wall` for elapsed
time), so that other work on a shared machine does not count. Target: ours/torch <= 1.10.

Usage:
    uv run python benchmarks/chain_dispatch.py [--rounds N] [--calls N] [--json PATH]
    uv run python benchmarks/chain_dispatch.py --smoke  # a few iterations: checks it runs, measures nothing
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from _machine import cpu_model

import refiners.fluxion.layers as fl

__all__ = ["Result", "build_pair", "measure", "main"]

TARGET_RATIO = 1.10
WIDTH = 256
NARROW = 8
BLOCKS = 64


@dataclass
class Result:
    """The timings of one variant: medians over rounds, in microseconds per forward; `ratio` is the median of the
    per-round ratios ours/torch."""

    variant: str
    ours_us: float
    torch_us: float
    ratio: float
    rounds: int
    calls_per_round: int


def build_pair(nested: bool, blocks: int = BLOCKS, width: int = WIDTH) -> tuple[fl.Chain, torch.nn.Sequential]:
    """A Chain of `blocks` x (Linear + ReLU) and the same `torch.nn.Sequential`, sharing weight values.

    Args:
        nested: One sub-Chain (sub-Sequential) per block; otherwise all layers side by side.
        blocks: Number of Linear + ReLU blocks.
        width: Features of every Linear.
    """
    ours_blocks = [(fl.Linear(width, width), fl.ReLU()) for _ in range(blocks)]
    theirs_blocks = [(torch.nn.Linear(width, width), torch.nn.ReLU()) for _ in range(blocks)]
    with torch.no_grad():
        for (ours_linear, _), (theirs_linear, _) in zip(ours_blocks, theirs_blocks, strict=True):
            theirs_linear.weight.copy_(ours_linear.weight)
            theirs_linear.bias.copy_(ours_linear.bias)
    if nested:
        return (
            fl.Chain(fl.Chain(*block) for block in ours_blocks),
            torch.nn.Sequential(*(torch.nn.Sequential(*block) for block in theirs_blocks)),
        )
    return (
        fl.Chain(layer for block in ours_blocks for layer in block),
        torch.nn.Sequential(*(layer for block in theirs_blocks for layer in block)),
    )


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def _time_calls(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, calls: int, clock: str) -> float:
    now = CLOCKS[clock]
    start = now()
    for _ in range(calls):
        model(x)
    return (now() - start) / calls


def measure(variant: str, nested: bool, width: int, rounds: int, calls: int, warmup: int, clock: str) -> Result:
    """Time ours and torch's alternately, `rounds` times `calls` forwards each, after `warmup` forwards each.

    Args:
        variant: The name shown in the table.
        nested: See `build_pair`.
        width: See `build_pair`.
        rounds: Number of (ours, torch) measurement pairs; who goes first alternates.
        calls: Forwards per measurement.
        warmup: Forwards of each model before measuring.
        clock: `"cpu"` (this process's CPU time: time spent waiting for a core on a busy machine is not counted) or
            `"wall"`.
    """
    ours, theirs = build_pair(nested, width=width)
    x = torch.randn(1, width)
    with torch.no_grad():
        # The comparison is only fair if both compute the same thing.
        torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)
        for _ in range(warmup):
            ours(x)
            theirs(x)
        ours_times: list[float] = []
        theirs_times: list[float] = []
        for round_index in range(rounds):
            if round_index % 2 == 0:
                ours_times.append(_time_calls(ours, x, calls, clock))
                theirs_times.append(_time_calls(theirs, x, calls, clock))
            else:
                theirs_times.append(_time_calls(theirs, x, calls, clock))
                ours_times.append(_time_calls(ours, x, calls, clock))
    ratios = [o / t for o, t in zip(ours_times, theirs_times, strict=True)]
    return Result(
        variant=variant,
        ours_us=statistics.median(ours_times) * 1e6,
        torch_us=statistics.median(theirs_times) * 1e6,
        ratio=statistics.median(ratios),
        rounds=rounds,
        calls_per_round=calls,
    )


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=201, help="measurement pairs per variant (default: 201)")
    parser.add_argument("--calls", type=int, default=10, help="forwards per measurement (default: 10)")
    parser.add_argument("--warmup", type=int, default=50, help="forwards of each model before measuring")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: CPU time of this process, robust to other work on the machine (default); wall: elapsed time",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a few iterations, to check the benchmark runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.calls, args.warmup = 2, 2, 1
    torch.set_num_threads(args.threads)

    timing = (args.rounds, args.calls, args.warmup, args.clock)
    results = [
        measure(f"nested: {BLOCKS} x Chain(Linear, ReLU)", True, WIDTH, *timing),
        measure(f"flat: {BLOCKS} x (Linear, ReLU)", False, WIDTH, *timing),
        # Not a target: with tiny layers the forward is almost all dispatch, so this shows the overhead undiluted.
        measure(f"nested, width {NARROW} (dispatch only)", True, NARROW, *timing),
    ]
    machine = f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    print(f"Chain vs torch.nn.Sequential, Linear({WIDTH}, {WIDTH}) unless said, batch 1, CPU ({machine})")
    print(
        f"median of {args.rounds} interleaved rounds of {args.calls} forwards, {args.clock} time; "
        f"target ours/torch <= {TARGET_RATIO}"
    )
    print(f"{'variant':<36} {'ours (us)':>10} {'torch (us)':>11} {'ours/torch':>11}")
    for result in results:
        print(f"{result.variant:<36} {result.ours_us:>10.1f} {result.torch_us:>11.1f} {result.ratio:>11.3f}")
    if args.json is not None:
        payload = {
            "machine": machine,
            "clock": args.clock,
            "target_ratio": TARGET_RATIO,
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
