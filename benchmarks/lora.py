"""LoRA on the SD1.5 UNet: loading it (ours vs diffusers' `load_lora_weights`, same file), and what it costs a forward.

The LoRA is rank 16 on every attention and feed-forward projection of the UNet (`to_q`, `to_k`, `to_v`, `to_out.0`,
`ff.net.0.proj`, `ff.net.2`: 160 layers), trained-looking (random `lora_A` and `lora_B`, PEFT's `LoraConfig`), saved
with diffusers' `save_lora_weights`. Both UNets hold the very same random weights (SD1.5 config; ours is built on the
meta device and given diffusers' tensors), and the first thing the script does is check that ours with the LoRA
computes what diffusers with the LoRA computes.

- **load + inject**: `SDLoraManager(sd).add_loras(name, file)` (a fresh manager each time: the name map is built
  too) against `pipeline.load_lora_weights(file, adapter_name=name)`; each is undone between rounds, untimed
  (`remove_all`, `unload_lora_weights`). Target: ours/diffusers <= 0.5.
- **forward**: ours with the LoRA unfused and fused against ours without it, batch 2 (a negative and a positive
  prompt), CPU float32. Targets: unfused/base <= 1.15, fused/base <= 1.0 (within noise: the fused model is the bare
  model with other weights).
- **switch**: from one loaded LoRA to another by their scales (`update_scales`), unfused and fused (the weights are
  fused again), against diffusers' `set_adapters`; no reload.

Runs of the variants alternate, round after round, in one process, so that drifts of the machine hit all alike;
ratios are taken per round and their medians reported, with process CPU times beside wall times.

Usage:
    uv run python benchmarks/lora.py [--rounds N] [--forward-rounds N] [--size N] [--threads N] [--json PATH]
    uv run python benchmarks/lora.py --smoke  # a tiny UNet, one round of each: checks it runs, measures nothing
"""

import argparse
import gc
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from _machine import Timing, cpu_model, medians, timed
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig  # pyright: ignore[reportMissingTypeStubs]
from peft.utils import get_peft_model_state_dict  # pyright: ignore[reportMissingTypeStubs]
from transformers import CLIPTextConfig, CLIPTextModel

from refiners.adapters.lora import SDLoraManager
from refiners.converters.reference_check import SD15_UNET_CONFIG
from refiners.converters.unet import convert_diffusers_unet
from refiners.foundationals.clip import CLIPTextEncoder
from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder, SD1UNet, StableDiffusion_1

__all__ = ["Result", "main"]

TARGETS = {"load_ratio": 0.5, "unfused_ratio": 1.15, "fused_ratio": 1.0}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
RANK = 16
BATCH = 2
TINY_CHANNELS = (32, 32, 64, 64)
TINY_UNET_CONFIG: dict[str, Any] = SD15_UNET_CONFIG | {
    "block_out_channels": list(TINY_CHANNELS),
    "cross_attention_dim": 32,
}


@dataclass
class Result:
    """Medians over rounds, in seconds (wall, and process CPU time), and the median of the per-round ratios."""

    variant: str
    ours_s: float
    reference_s: float
    ratio: float
    ours_cpu_s: float
    reference_cpu_s: float
    cpu_ratio: float
    reference: str
    target: float | None
    rounds: int
    load_average: float


@dataclass
class Setup:
    ours: StableDiffusion_1
    pipeline: StableDiffusionPipeline
    files: tuple[Path, Path]


def _config_dict(config: Any) -> dict[str, Any]:
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}


def _save_lora(unet: UNet2DConditionModel, folder: Path, seed: int) -> Path:
    """A rank-16 LoRA on the attention and feed-forward projections, saved as diffusers' training scripts do."""
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=LORA_TARGETS, init_lora_weights=False)
    torch.manual_seed(seed)
    unet.add_adapter(config, adapter_name="trained")
    layers: dict[str, Any] = get_peft_model_state_dict(unet, adapter_name="trained")
    # Small updates, as a trained LoRA makes: the outputs stay in range.
    layers = {key: value * 0.05 if ".lora_B." in key else value for key, value in layers.items()}
    folder.mkdir(parents=True)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, unet_lora_adapter_metadata=_config_dict(config)
    )
    unet.unload_lora()
    return folder / "pytorch_lora_weights.safetensors"


def build(folder: Path, tiny: bool) -> Setup:
    """diffusers' UNet with random weights in a pipeline, ours holding the same tensors, and two LoRA files."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG)).eval()
    files = (_save_lora(unet, folder / "a", seed=1), _save_lora(unet, folder / "b", seed=2))
    context_dim = unet.config["cross_attention_dim"]
    # The pipeline's other components are tiny: only the UNet is measured (the files have no text-encoder part).
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=context_dim, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1)
    )
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,  # pyright: ignore[reportArgumentType]
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),  # pyright: ignore[reportArgumentType]
        safety_checker=None,  # pyright: ignore[reportArgumentType]
        feature_extractor=None,  # pyright: ignore[reportArgumentType]
        requires_safety_checker=False,
    )
    if tiny:
        ours_unet = SD1UNet(channels=TINY_CHANNELS, context_embedding_dim=context_dim, device="meta")
    else:
        ours_unet = SD1UNet(device="meta")
    ours_unet.load_state_dict(convert_diffusers_unet(unet.state_dict(), ours_unet), strict=True, assign=True)
    ours = StableDiffusion_1(
        unet=ours_unet,
        lda=LatentDiffusionAutoencoder(0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1, device="meta"),
        clip_text_encoder=CLIPTextEncoder(
            embedding_dim=context_dim, num_layers=1, num_attention_heads=4, feedforward_dim=64, device="meta"
        ),
    )
    return Setup(ours, pipeline, files)


def _result(
    variant: str,
    ours: list[Timing],
    reference: list[Timing],
    reference_name: str,
    target: float | None,
) -> Result:
    timings = medians(ours, reference)
    return Result(
        variant=variant,
        ours_s=timings.ours_s,
        reference_s=timings.reference_s,
        ratio=timings.ratio,
        ours_cpu_s=timings.ours_cpu_s,
        reference_cpu_s=timings.reference_cpu_s,
        cpu_ratio=timings.cpu_ratio,
        reference=reference_name,
        target=target,
        rounds=timings.rounds,
        load_average=os.getloadavg()[0],
    )


def check_parity(setup: Setup, size: int) -> None:
    """Ours with the LoRA computes what diffusers with the LoRA computes (atol 1e-4 of the output's scale)."""
    ours, unet = setup.ours, setup.pipeline.unet
    generator = torch.Generator().manual_seed(size)
    latents = torch.randn(BATCH, 4, size, size, generator=generator)
    timesteps = torch.tensor([999, 500])
    text_embedding = torch.randn(BATCH, 77, ours.unet.context_embedding_dim, generator=generator)
    manager = SDLoraManager(ours)
    manager.add_loras("a", setup.files[0])
    setup.pipeline.load_lora_weights(str(setup.files[0]), adapter_name="a")
    with torch.no_grad():
        expected = unet(latents, timesteps, encoder_hidden_states=text_embedding).sample
        ours.unet.set_timestep(timesteps)
        ours.unet.set_clip_text_embedding(text_embedding)
        torch.testing.assert_close(ours.unet(latents), expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    manager.remove_all()
    setup.pipeline.unload_lora_weights()


def measure_load(setup: Setup, rounds: int) -> Result:
    path = setup.files[0]
    ours_times: list[Timing] = []
    theirs_times: list[Timing] = []

    def ours() -> None:
        SDLoraManager(setup.ours).add_loras("a", path)

    def theirs() -> None:
        setup.pipeline.load_lora_weights(str(path), adapter_name="a")

    for index in range(rounds):
        for name in ("ours", "theirs") if index % 2 == 0 else ("theirs", "ours"):
            if name == "ours":
                ours_times.append(timed(ours))
                SDLoraManager(setup.ours).remove_all()
            else:
                theirs_times.append(timed(theirs))
                setup.pipeline.unload_lora_weights()
            gc.collect()
    return _result("load + inject (rank 16, 160 layers)", ours_times, theirs_times, "diffusers", TARGETS["load_ratio"])


def measure_forward(setup: Setup, size: int, rounds: int, warmup: int) -> list[Result]:
    sd = setup.ours
    generator = torch.Generator().manual_seed(size)
    latents = torch.randn(BATCH, 4, size, size, generator=generator)
    sd.unet.set_timestep(torch.tensor([999, 500]))
    sd.unet.set_clip_text_embedding(torch.randn(BATCH, 77, sd.unet.context_embedding_dim, generator=generator))
    manager = SDLoraManager(sd)

    def forward() -> None:
        with torch.no_grad():
            sd.unet(latents)

    times: dict[str, list[Timing]] = {"base": [], "unfused": [], "fused": []}
    orders = [("base", "unfused", "fused"), ("fused", "unfused", "base"), ("unfused", "base", "fused")]
    for index in range(warmup + rounds):
        for state in orders[index % len(orders)]:
            manager.remove_all()
            if state != "base":
                manager.add_loras("a", setup.files[0])
                if state == "fused":
                    manager.fuse()
            gc.collect()
            timing = timed(forward)
            if index >= warmup:
                times[state].append(timing)
    manager.remove_all()
    variant = f"forward {size}x{size}, batch {BATCH}"
    return [
        _result(f"{variant}: unfused", times["unfused"], times["base"], "no LoRA", TARGETS["unfused_ratio"]),
        _result(f"{variant}: fused", times["fused"], times["base"], "no LoRA", TARGETS["fused_ratio"]),
    ]


def measure_switch(setup: Setup, rounds: int) -> list[Result]:
    """From LoRA a to LoRA b by scales, both loaded: ours unfused, ours fused, diffusers' `set_adapters`."""
    manager = SDLoraManager(setup.ours)
    manager.add_loras("a", setup.files[0])
    manager.add_loras("b", setup.files[1], scale=0.0)
    pipeline = setup.pipeline
    pipeline.load_lora_weights(str(setup.files[0]), adapter_name="a")
    pipeline.load_lora_weights(str(setup.files[1]), adapter_name="b")
    unfused: list[Timing] = []
    fused: list[Timing] = []
    theirs: list[Timing] = []
    for index in range(rounds):
        to_b, to_a = {"a": 0.0, "b": 1.0}, {"a": 1.0, "b": 0.0}
        first, second = (to_b, to_a) if index % 2 == 0 else (to_a, to_b)
        unfused.append(timed(partial(manager.update_scales, first)))
        manager.fuse()
        fused.append(timed(partial(manager.update_scales, second)))
        manager.unfuse()
        theirs.append(timed(partial(pipeline.set_adapters, ["a", "b"], [first["a"], first["b"]])))
    manager.remove_all()
    pipeline.unload_lora_weights()
    return [
        _result("switch LoRAs by scale: unfused", unfused, theirs, "diffusers set_adapters", None),
        _result("switch LoRAs by scale: fused (re-fuses)", fused, theirs, "diffusers set_adapters", None),
    ]


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="load and switch rounds (default: 7)")
    parser.add_argument("--forward-rounds", type=int, default=3, help="forward rounds per variant (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="forward rounds before measuring (default: 1)")
    parser.add_argument("--size", type=int, default=32, help="latent height and width (default: 32, 256 pixels)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a tiny UNet, one round of each: checks it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.forward_rounds, args.warmup, args.size, args.threads = 1, 1, 0, 8, 1
    torch.set_num_threads(args.threads)
    # diffusers warns, loading a second adapter, that the first one's keys are not in the second's file.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as folder:
        setup = build(Path(folder), tiny=args.smoke)
        check_parity(setup, size=8)
        results = [measure_load(setup, args.rounds)]
        results += measure_switch(setup, args.rounds)
        results += measure_forward(setup, args.size, args.forward_rounds, args.warmup)
    machine = f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    model = "tiny UNet (smoke)" if args.smoke else "SD1.5 UNet"
    print(f"LoRA (rank {RANK}, attention and feed-forward projections) on the {model}, float32, CPU ({machine})")
    print(f"{'variant':<44} {'ours (s)':>9} {'ref (s)':>9} {'ratio':>7} {'CPU ratio':>9} {'target':>7}  reference")
    for r in results:
        target = f"<= {r.target}" if r.target is not None else "-"
        print(
            f"{r.variant:<44} {r.ours_s:>9.4f} {r.reference_s:>9.4f} {r.ratio:>7.3f} {r.cpu_ratio:>9.3f} "
            f"{target:>7}  {r.reference} (load {r.load_average:.1f})"
        )
    if args.json is not None:
        payload = {"machine": machine, "targets": TARGETS, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
