"""A UNet eager, compiled whole (`torch.compile`) and compiled by regions (`compile_repeated_blocks`): warm-up, speed.

The SD1 family's TINY UNet (or SDXL's with `--family sdxl`), CPU, float32, batch 2 (a negative and a positive
prompt), latents 32x32, a 77-token text embedding, inductor. Each variant gets its own UNet with the same weights.
The warm-up is the variant's first forward, compilation included: Dynamo's caches are reset and inductor's on-disk
caches are off, so every compilation is cold (inductor's one-time set-up in the process is paid before, by a
trivial compilation). The speed is the median of `--rounds` forwards after it (wall and process CPU time: on a
machine shared with other jobs the CPU time is the steadier), as steps per second. Every variant's output is
checked equal to the eager one within 1e-5 of its scale, and the graphs Dynamo hands to inductor are counted. There
is no target: the point is the trade-off (a whole-model compile costs the longest warm-up, regional compilation a
fraction of it).

Usage:
    uv run python benchmarks/compile.py [--family sd1|sdxl] [--rounds N] [--size N] [--threads N] [--json PATH]
    uv run python benchmarks/compile.py --smoke  # "eager" backend (no code generation), 8x8: checks it runs
"""

import argparse
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config
from _machine import cpu_model, timed
from torch import Tensor

from refiners.fluxion.compilation import compile_repeated_blocks
from refiners.foundationals.latent_diffusion.stable_diffusion_1 import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY as SD1_TINY
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXLUNet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.presets import TINY as SDXL_TINY
from refiners.foundationals.latent_diffusion.unet import UNet

__all__ = ["Result", "build", "measure", "main"]

BATCH = 2
VARIANTS = ("eager", "full compile", "regional compile")


@dataclass
class Result:
    """One variant: its first forward (warm-up, compilation included) and the median forward after it, in seconds."""

    variant: str
    warmup_s: float
    warmup_cpu_s: float
    step_s: float
    step_cpu_s: float
    steps_per_s: float
    graphs: int
    max_difference: float
    rounds: int
    load_average: float


class CountingBackend:
    """A `torch.compile` backend that counts the graphs it receives and hands them to another backend."""

    def __init__(self, backend: str) -> None:
        self.graphs = 0
        self._backend: Any = torch._dynamo.lookup_backend(backend)  # pyright: ignore[reportPrivateImportUsage]

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        self.graphs += 1
        return self._backend(graph, example_inputs)


def build(family: str) -> UNet:
    """The family's TINY UNet with seeded random weights, its side inputs set (the same at each call)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    unet: UNet
    if family == "sd1":
        unet = SD1_TINY.unet.build((SD1UNet,))
    else:
        unet = SDXL_TINY.unet.build((SDXLUNet,))
        assert isinstance(unet, SDXLUNet)
        unet.set_pooled_text_embedding(torch.randn(BATCH, unet.pooled_embedding_dim, generator=generator))
        unet.set_time_ids(torch.randn(BATCH, unet.num_time_ids, generator=generator))
    unet.set_timestep(torch.tensor([999, 500]))
    unet.set_clip_text_embedding(torch.randn(BATCH, 77, unet.context_embedding_dim, generator=generator))
    return unet


def measure(
    family: str, variant: str, size: int, rounds: int, backend: str, expected: Tensor | None
) -> tuple[Result, Tensor]:
    """Build a fresh UNet, compile it as `variant` says, time its first forward, then `rounds` more.

    Returns the timings and the first output.

    Args:
        family: "sd1" or "sdxl".
        variant: One of `VARIANTS`.
        size: Height and width of the latents.
        rounds: Forwards timed after the warm-up.
        backend: The `torch.compile` backend ("inductor"; "eager" for the smoke run).
        expected: The eager output, to check this variant's against (None for the eager variant itself).
    """
    torch.compiler.reset()
    unet = build(family)
    counter = CountingBackend(backend)
    model: Callable[[Tensor], Tensor] = unet
    if variant == "full compile":
        model = torch.compile(unet, backend=counter, fullgraph=True)
    elif variant == "regional compile":
        compile_repeated_blocks(unet, backend=counter, fullgraph=True)
    latents = torch.randn(BATCH, 4, size, size, generator=torch.Generator().manual_seed(2))
    outputs: list[Tensor] = []

    def step() -> None:
        outputs.append(model(latents))

    with torch.no_grad():
        warmup_s, warmup_cpu_s = timed(step)
        steps = [timed(step) for _ in range(rounds)]
    reference = outputs[0] if expected is None else expected
    max_difference = max((output - reference).abs().max().item() for output in outputs)
    scale = reference.abs().max().item()
    if max_difference > 1e-5 * scale:
        raise AssertionError(f"{variant}: output differs from eager by {max_difference} (scale {scale})")
    step_s = statistics.median(wall for wall, _ in steps)
    result = Result(
        variant=variant,
        warmup_s=warmup_s,
        warmup_cpu_s=warmup_cpu_s,
        step_s=step_s,
        step_cpu_s=statistics.median(cpu for _, cpu in steps),
        steps_per_s=1 / step_s,
        graphs=counter.graphs,
        max_difference=max_difference / scale,
        rounds=rounds,
        load_average=os.getloadavg()[0],
    )
    return result, outputs[0]


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1", help="whose TINY UNet (default: sd1)")
    parser.add_argument("--rounds", type=int, default=20, help="forwards timed after the warm-up (default: 20)")
    parser.add_argument("--size", type=int, default=32, help="height and width of the latents (default: 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help='"eager" backend, 8x8, one round: checks it runs')
    args = parser.parse_args(argv)
    backend = "inductor"
    if args.smoke:
        args.rounds, args.size, args.threads, backend = 1, 8, 1, "eager"
    torch.set_num_threads(args.threads)
    inductor_config.fx_graph_cache = False
    inductor_config.autotune_local_cache = False
    if backend == "inductor":
        # Inductor's one-time set-up in this process (its C++ toolchain checks, headers), out of every warm-up.
        torch.compile(lambda x: x.sin() + 1, backend=backend)(torch.randn(4))

    results: list[Result] = []
    expected: Tensor | None = None
    for variant in VARIANTS:
        result, output = measure(args.family, variant, args.size, args.rounds, backend, expected)
        results.append(result)
        expected = output if expected is None else expected
    machine = f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    print(
        f"TINY {args.family.upper()} UNet, batch {BATCH}, latents {args.size}x{args.size}, float32, CPU ({machine}), "
        f"backend {backend}; median of {args.rounds} forwards after the first"
    )
    print(
        f"{'variant':<17} {'warm-up (s)':>11} {'CPU (s)':>8} {'step (ms)':>10} {'CPU (ms)':>9} {'steps/s':>8} "
        f"{'graphs':>7} {'load':>5}"
    )
    for r in results:
        print(
            f"{r.variant:<17} {r.warmup_s:>11.2f} {r.warmup_cpu_s:>8.2f} {1000 * r.step_s:>10.2f} "
            f"{1000 * r.step_cpu_s:>9.2f} {r.steps_per_s:>8.1f} {r.graphs:>7} {r.load_average:>5.1f}"
        )
    if args.json is not None:
        payload = {"machine": machine, "backend": backend, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
