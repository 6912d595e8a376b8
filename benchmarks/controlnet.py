"""A UNet step with a ControlNet, ours vs diffusers; and the peak memory of SDXL with two ControlNets.

1. Speed: SD1UNet + SD1ControlnetAdapter vs diffusers' UNet2DConditionModel fed the residuals of its ControlNetModel,
   as `StableDiffusionControlNetPipeline` does each step. SD1.5's architecture (its depths, heads, 768-wide text
   embedding) at reduced widths by default (`--channels`, 128/256/512/512: at the full 320/640/1280/1280, `unet.py`'s
   UNet alone takes 10 to 46 s a forward on two busy cores). diffusers' ControlNet is `ControlNetModel.from_unet` with its zero convolutions
   randomised (as tests/adapters/test_controlnet.py does); ours holds the same tensors (converted by the converter's
   key map), and the outputs are checked to match before timing. Batch 2 (negative and positive prompt), latents
   32x32 (a 256x256 condition image, repeated per row as the pipeline does), CPU float32, interleaved rounds after a
   warmup, median of the per-round ratios. Target: ours/diffusers <= 1.0 (wall time).
2. Memory: SDXL's UNet with two ControlNets, one denoising step (batch 2), each side in a fresh Python process: peak
   RSS growth (`VmHWM`) over the baseline after imports. Each side builds its own random weights (the same
   architecture: equal parameter counts are checked), so only memory is compared there. SDXL base's architecture at
   a reduced width (`--memory-scale`, 1/2 by default: the full size is 10 GB of UNet and 2 x 5 GB of ControlNets in
   float32 per side, too much for the 24 GB machine with other jobs on it). Target: ours/diffusers <= 1.0.

Usage:
    uv run python benchmarks/controlnet.py [--channels C C C C] [--rounds N] [--warmup N] [--threads N] [--sizes S ...]
        [--memory-scale F] [--memory-size S] [--no-memory | --memory-only] [--json PATH]
    uv run python benchmarks/controlnet.py --smoke  # a tiny UNet and ControlNet, one forward each: checks it runs
"""

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor
from unet import TINY_CHANNELS, TINY_UNET_CONFIG, Result, run, timed_pair

from refiners.adapters.controlnet import SD1Controlnet, SD1ControlnetAdapter, SDXLControlnet, SDXLControlnetAdapter
from refiners.converters.controlnet import controlnet_config, diffusers_controlnet_modules
from refiners.converters.engine import convert_state_dict
from refiners.converters.reference_check import SD15_UNET_CONFIG, SDXL_UNET_CONFIG
from refiners.converters.unet import convert_diffusers_unet, module_key_map
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXLUNet

BATCH = 2
SIZES = (32,)
CHANNELS = (128, 256, 512, 512)
MEMORY_TARGET_RATIO = 1.0

Pair = tuple[tuple[SD1UNet, SD1ControlnetAdapter], tuple[UNet2DConditionModel, ControlNetModel]]


def randomise_zero_convolutions(controlnet: ControlNetModel, seed: int) -> None:
    """diffusers zero-initialises the condition's last convolution and the residual projections: random weights make
    the ControlNet add something (as in tests/adapters/test_controlnet.py)."""
    generator = torch.Generator().manual_seed(seed)
    zero = [
        controlnet.controlnet_cond_embedding.conv_out,
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
    ]
    with torch.no_grad():
        for module in zero:
            for parameter in module.parameters():
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))


def build_pair_at(channels: tuple[int, ...], tiny: bool) -> Pair:
    """diffusers' UNet and ControlNet with random weights; ours holding the same tensors."""
    config: dict[str, Any] = TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG | {"block_out_channels": list(channels)}
    first, second, third, fourth = config["block_out_channels"]
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**config).eval()
    ours_channels = (first, second, third, fourth)
    ours = SD1UNet(channels=ours_channels, context_embedding_dim=config["cross_attention_dim"], device="meta")
    ours.load_state_dict(convert_diffusers_unet(theirs.state_dict(), ours), strict=True, assign=True)
    reference = ControlNetModel.from_unet(theirs).eval()
    randomise_zero_convolutions(reference, seed=1)
    controlnet = controlnet_config(dict(reference.config)).build((SD1Controlnet,), device="meta")
    key_map = module_key_map(controlnet, diffusers_controlnet_modules(controlnet))
    shapes = {key: tensor.shape for key, tensor in controlnet.state_dict().items()}
    converted = convert_state_dict(reference.state_dict(), key_map, shapes)
    controlnet.load_state_dict(converted, strict=True, assign=True)
    adapter = SD1ControlnetAdapter(ours, name="canny", controlnet=controlnet).inject()
    return (ours, adapter), (theirs, reference)


def measure(ours: Any, theirs: Any, size: int, rounds: int, warmup: int) -> Result:
    (unet, adapter), (reference_unet, reference) = ours, theirs
    generator = torch.Generator().manual_seed(size)
    latents = torch.randn(BATCH, 4, size, size, generator=generator)
    timesteps = torch.tensor([999, 500])
    text_embedding = torch.randn(BATCH, 77, unet.context_embedding_dim, generator=generator)
    image = torch.rand(1, 3, 8 * size, 8 * size, generator=generator)
    adapter.set_controlnet_condition(image)
    unet.set_timestep(timesteps)
    unet.set_clip_text_embedding(text_embedding)
    images = torch.cat([image] * BATCH)  # the pipeline repeats the condition for classifier-free guidance

    def run_ours() -> Tensor:
        return unet(latents)

    def run_theirs() -> Tensor:
        down, middle = reference(
            latents, timesteps, encoder_hidden_states=text_embedding, controlnet_cond=images, return_dict=False
        )
        return reference_unet(
            latents,
            timesteps,
            encoder_hidden_states=text_embedding,
            down_block_additional_residuals=down,
            mid_block_additional_residual=middle,
        ).sample

    return timed_pair(run_ours, run_theirs, f"latents {size}x{size}", rounds, warmup)


# -- SDXL + two ControlNets: peak memory ------------------------------------------------------------------------------


def _high_water_mib() -> float:
    """This process's peak RSS (`VmHWM`), in MiB. Not `getrusage`'s `ru_maxrss`: Linux keeps that across `exec`, so a
    child would start from its parent's peak (here, the speed benchmark's UNets)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: the peak memory is measured on Linux only")


@dataclass
class MemoryResult:
    """Peak RSS growth over the baseline after imports (MiB) of building SDXL's UNet + two ControlNets and one step."""

    variant: str
    ours_parameters: int
    diffusers_parameters: int
    ours_growth_mib: float
    diffusers_growth_mib: float
    ratio: float


def _sdxl_config(scale: float) -> dict[str, Any]:
    """SDXL base's UNet config at `scale` of its widths (1/2 at least: a width must split in 32 groups and its heads);
    0 for the smoke test's toy (32/64/128 wide, one transformer layer per level)."""
    if scale == 0:
        toy = {"attention_head_dim": [1, 2, 4], "transformer_layers_per_block": [1, 1, 1]}
        return SDXL_UNET_CONFIG | toy | {"block_out_channels": [32, 64, 128]}
    return SDXL_UNET_CONFIG | {"block_out_channels": [round(c * scale) for c in SDXL_UNET_CONFIG["block_out_channels"]]}


def memory_child(side: str, scale: float, size: int) -> dict[str, float]:
    """Build the UNet and two ControlNets on `side`'s classes, run one step; the peak RSS before and after (MiB)."""
    torch.set_num_threads(2)
    config = _sdxl_config(scale)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(BATCH, 4, size, size, generator=generator)
    text = torch.randn(BATCH, 77, config["cross_attention_dim"], generator=generator)
    pooled = torch.randn(BATCH, 1280, generator=generator)
    time_ids = torch.tensor([[8.0 * size, 8.0 * size, 0, 0, 8.0 * size, 8.0 * size]] * BATCH)
    images = [torch.rand(1, 3, 8 * size, 8 * size, generator=generator) for _ in range(2)]
    timesteps = torch.tensor([999, 999])
    baseline = _high_water_mib()
    with torch.no_grad():
        if side == "diffusers":
            unet = UNet2DConditionModel(**config).eval()
            controlnets = [ControlNetModel.from_unet(unet).eval() for _ in range(2)]
            parameters = sum(p.numel() for m in [unet, *controlnets] for p in m.parameters())
            added = {"text_embeds": pooled, "time_ids": time_ids}
            down: list[Tensor] | None = None
            middle: Tensor | None = None
            # What MultiControlNetModel does: each ControlNet's residuals, summed.
            for controlnet, image in zip(controlnets, images, strict=True):
                d, m = controlnet(
                    latents,
                    timesteps,
                    encoder_hidden_states=text,
                    controlnet_cond=torch.cat([image] * BATCH),
                    added_cond_kwargs=added,
                    return_dict=False,
                )
                down = list(d) if down is None else [a + b for a, b in zip(down, d, strict=True)]
                middle = m if middle is None else middle + m
            unet(
                latents,
                timesteps,
                encoder_hidden_states=text,
                added_cond_kwargs=added,
                down_block_additional_residuals=down,
                mid_block_additional_residual=middle,
            )
        else:
            shape: dict[str, Any] = {
                "channels": tuple(config["block_out_channels"]),
                "num_attention_heads": tuple(config["attention_head_dim"]),
                "transformer_depths": tuple(config["transformer_layers_per_block"]),
            }
            ours = SDXLUNet(**shape)
            adapters = [
                SDXLControlnetAdapter(ours, name=name, controlnet=SDXLControlnet(**shape)).inject()
                for name in ("canny", "depth")
            ]
            parameters = sum(p.numel() for p in ours.parameters())
            for adapter, image in zip(adapters, images, strict=True):
                adapter.set_controlnet_condition(image)
            ours.set_timestep(timesteps)
            ours.set_clip_text_embedding(text)
            ours.set_pooled_text_embedding(pooled)
            ours.set_time_ids(time_ids)
            ours(latents)
    return {"baseline_mib": baseline, "peak_mib": _high_water_mib(), "parameters": parameters}


def measure_memory(scale: float, size: int, smoke: bool) -> MemoryResult:
    growth: dict[str, float] = {}
    parameters: dict[str, int] = {}
    for side in ("ours", "diffusers"):
        command = [sys.executable, __file__, "--memory-child", side, "--memory-scale", str(scale), "--sizes", str(size)]
        child = subprocess.run(command, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"the {side} memory child failed:\n{child.stdout}\n{child.stderr}")
        measured = json.loads(child.stdout.splitlines()[-1])
        growth[side] = measured["peak_mib"] - measured["baseline_mib"]
        parameters[side] = int(measured["parameters"])
    width = f"x{scale:g}" if scale else "toy"
    if parameters["ours"] != parameters["diffusers"]:
        raise RuntimeError(f"the two sides do not build the same architecture: {parameters} parameters")
    variant = f"SDXL {width} + 2 ControlNets, {size}x{size}" + (" (smoke)" if smoke else "")
    return MemoryResult(
        variant, parameters["ours"], parameters["diffusers"], growth["ours"], growth["diffusers"],
        growth["ours"] / growth["diffusers"],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--channels", type=int, nargs=4, default=list(CHANNELS))
    parser.add_argument("--memory-scale", type=float, default=0.5)
    parser.add_argument("--memory-size", type=int, default=32)
    parser.add_argument("--memory-child", choices=("ours", "diffusers"))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true")
    extra, rest = parser.parse_known_args(argv)
    smoke = "--smoke" in rest
    if extra.memory_child is not None:
        sizes = argparse.ArgumentParser(add_help=False)
        sizes.add_argument("--sizes", type=int, nargs="+")
        size = sizes.parse_known_args(rest)[0].sizes[0]
        print(json.dumps(memory_child(extra.memory_child, extra.memory_scale, size)))
        return []
    channels = TINY_CHANNELS if smoke else tuple(extra.channels)
    titles = ("SD1UNet + SD1ControlnetAdapter vs diffusers UNet2DConditionModel + ControlNetModel", "SD1.5")
    titles = (titles[0], f"SD1.5 UNet at widths {'/'.join(map(str, channels))}")
    if extra.memory_only:
        results: list[Result] = []
    else:
        results = run(rest, __doc__ or "", lambda tiny: build_pair_at(channels, tiny), measure, titles, SIZES)
    if extra.no_memory:
        return results
    scale, size = (0.0, 8) if smoke else (extra.memory_scale, extra.memory_size)
    memory = measure_memory(scale, size, smoke)
    print(
        f"peak RSS growth, {memory.variant}: ours {memory.ours_growth_mib:.0f} MiB ({memory.ours_parameters} "
        f"parameters), diffusers {memory.diffusers_growth_mib:.0f} MiB ({memory.diffusers_parameters} parameters), "
        f"ours/diffusers {memory.ratio:.3f} (target <= {MEMORY_TARGET_RATIO})"
    )
    json_index = rest.index("--json") + 1 if "--json" in rest else None
    if json_index is not None:
        path = Path(rest[json_index])
        payload: dict[str, Any] = json.loads(path.read_text()) if results else {"results": []}
        payload["memory"] = asdict(memory) | {"target_ratio": MEMORY_TARGET_RATIO}
        path.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
