"""What the benchmarks share: the machine they ran on, and how they time ours against a reference."""

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Medians", "Timing", "cpu_model", "interleaved", "medians", "timed"]


def cpu_model() -> str:
    """The processor's model name (`lscpu`'s), or what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


Timing = tuple[float, float]
"""The wall time and the process CPU time (all threads) of one call, in seconds."""


def timed(call: Callable[[], object]) -> Timing:
    """Run `call` once and time it (see `Timing`)."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass(frozen=True)
class Medians:
    """Medians over rounds: each side's wall and CPU seconds, and the per-round ratios ours / reference."""

    ours_s: float
    reference_s: float
    ratio: float
    ours_cpu_s: float
    reference_cpu_s: float
    cpu_ratio: float
    rounds: int


def medians(ours: Sequence[Timing], reference: Sequence[Timing]) -> Medians:
    """The `Medians` of paired timings (round i of `ours` with round i of `reference`)."""
    pairs = list(zip(ours, reference, strict=True))
    return Medians(
        ours_s=statistics.median(wall for wall, _ in ours),
        reference_s=statistics.median(wall for wall, _ in reference),
        ratio=statistics.median(o[0] / r[0] for o, r in pairs),
        ours_cpu_s=statistics.median(cpu for _, cpu in ours),
        reference_cpu_s=statistics.median(cpu for _, cpu in reference),
        cpu_ratio=statistics.median(o[1] / max(r[1], 1e-9) for o, r in pairs),
        rounds=len(pairs),
    )


def interleaved(
    ours: Callable[[], object],
    reference: Callable[[], object],
    rounds: int,
    report: Callable[[int, Timing, Timing], None] | None = None,
) -> Medians:
    """Time `rounds` calls of each side, alternately, who goes first alternating too; `report` sees each round."""
    ours_times: list[Timing] = []
    reference_times: list[Timing] = []
    for round_index in range(rounds):
        if round_index % 2 == 0:
            ours_times.append(timed(ours))
            reference_times.append(timed(reference))
        else:
            reference_times.append(timed(reference))
            ours_times.append(timed(ours))
        if report is not None:
            report(round_index, ours_times[-1], reference_times[-1])
    return medians(ours_times, reference_times)
