"""An SDXL LoRA, loaded and injected: ours (`SDLoraManager.add_loras`) vs diffusers (`load_lora_weights`), same file.

The LoRA is what kohya's scripts write for SDXL: rank 16 on every attention and feed-forward projection of the base
UNet (`to_q`, `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`, `ff.net.2` of its 70 transformer blocks: 700 layers),
kohya names after the SGM UNet (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`), an
`.alpha` per module, random factors. Both UNets hold the very same random weights (SDXL base config; ours built on
the meta device and given diffusers' tensors, as `sdxl_unet.py` does), and the first thing the script does is check
that ours with the LoRA computes what diffusers with the LoRA computes (1e-4 of the output's scale).

- **load + inject**: `SDLoraManager(sdxl).add_loras(name, file)` (a fresh manager each time: the name map is built
  too) against `pipeline.load_lora_weights(file, adapter_name=name)` (which maps the SGM names to diffusers' and
  wraps each layer with PEFT); each is undone between rounds, untimed (`remove_all`, `unload_lora_weights`).
  Target: ours/diffusers <= 0.5, as for SD1.5 (`lora.py`).

Runs of the two alternate, round after round, in one process (who goes first alternates too), so that drifts of the
machine hit both alike; ratios are taken per round and their median reported, with process CPU times beside wall
times. The text encoders and autoencoder play no part (the file has no text-encoder key): theirs are tiny, ours
are on the meta device.

Usage:
    uv run python benchmarks/sdxl_lora.py [--rounds N] [--threads N] [--json PATH]
    uv run python benchmarks/sdxl_lora.py --smoke  # a tiny SDXL UNet, one round: checks it runs, measures nothing
"""

import argparse
import gc
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from _machine import cpu_model, interleaved
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from safetensors.torch import save_file
from sdxl_unet import build_pair
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import refiners.fluxion.layers as fl
from refiners.adapters.lora import SDLoraManager
from refiners.foundationals.clip import CLIPTextEncoder
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import (
    DoubleTextEncoder,
    SDXLAutoencoder,
    SDXLUNet,
    StableDiffusion_XL,
)
from refiners.foundationals.latent_diffusion.unet_names import diffusers_unet_modules, unet_renaming

__all__ = ["Result", "main"]

TARGET_RATIO = 0.5
RANK = 16
ALPHA = 8.0
LORA_TARGETS = (
    *(f"attn{n}.{projection}" for n in (1, 2) for projection in ("to_q", "to_k", "to_v", "to_out.0")),
    "ff.net.0.proj",
    "ff.net.2",
)


@dataclass
class Result:
    """Medians over rounds, in seconds (wall, and process CPU time), and the median of the per-round ratios."""

    variant: str
    ours_s: float
    diffusers_s: float
    ratio: float
    ours_cpu_s: float
    diffusers_cpu_s: float
    cpu_ratio: float
    target: float
    rounds: int
    layers: int
    load_average: float


def kohya_lora(unet: SDXLUNet, path: Path) -> int:
    """Write a rank-16 kohya LoRA (SGM names, alphas) on the attention and feed-forward projections; its layer count."""
    generator = torch.Generator().manual_seed(1)
    renaming = unet_renaming(unet)
    tensors: dict[str, Tensor] = {}
    for name, layer in diffusers_unet_modules(unet).items():
        if not name.endswith(LORA_TARGETS) or not isinstance(layer, fl.Linear):
            continue
        original = renaming.to_original(name)
        assert original is not None, name
        key = "lora_unet_" + original.replace(".", "_")
        # Small updates, as a trained LoRA makes: the outputs stay in range.
        down = torch.randn(RANK, layer.in_features, generator=generator) / layer.in_features**0.5
        up = torch.randn(layer.out_features, RANK, generator=generator) * 0.05 / RANK**0.5
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(RANK)})
    return len(tensors) // 3


def pipeline_of(unet: UNet2DConditionModel) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline around `unet`, with tiny text encoders and autoencoder (the file does not touch them)."""
    tiny_text: dict[str, Any] = {"intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1}
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(block_out_channels=(32,), norm_num_groups=32),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=32, **tiny_text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **tiny_text)),
        tokenizer=None,  # pyright: ignore[reportArgumentType]
        tokenizer_2=None,  # pyright: ignore[reportArgumentType]
        unet=unet,
        scheduler=EulerDiscreteScheduler(),  # pyright: ignore[reportArgumentType]
    )


def text_encoder_for(unet: SDXLUNet) -> DoubleTextEncoder:
    """Text encoders on the meta device, as wide as `unet` reads (SDXL base's, or half and half for the tiny UNet)."""
    if unet.context_embedding_dim == 2048:
        return DoubleTextEncoder(device="meta")
    half = unet.context_embedding_dim // 2
    encoders = (
        CLIPTextEncoder(embedding_dim=half, num_layers=1, num_attention_heads=1, feedforward_dim=half, device="meta")
        for _ in range(2)
    )
    return DoubleTextEncoder(*encoders, projection_dim=unet.pooled_embedding_dim)


def check_parity(sdxl: StableDiffusion_XL, pipeline: StableDiffusionXLPipeline, path: Path) -> None:
    """Ours with the LoRA computes what diffusers with the LoRA computes (atol 1e-4 of the output's scale)."""
    unet, generator = sdxl.unet, torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 77, unet.context_embedding_dim, generator=generator)
    pooled = torch.randn(1, unet.pooled_embedding_dim, generator=generator)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    manager = SDLoraManager(sdxl)
    manager.add_loras("style", path)
    pipeline.load_lora_weights(str(path), adapter_name="style")
    with torch.no_grad():
        conditions = {"text_embeds": pooled, "time_ids": time_ids}
        expected = pipeline.unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=conditions).sample
        unet.set_timestep(torch.tensor([500]))
        unet.set_clip_text_embedding(text)
        unet.set_pooled_text_embedding(pooled)
        unet.set_time_ids(time_ids)
        torch.testing.assert_close(unet(latents), expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
        pipeline.unload_lora_weights()
        # The LoRA does something: without it, the output is another.
        without = pipeline.unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=conditions).sample
        assert (without - expected).abs().max() > 1e-3 * expected.abs().max()
    manager.remove_all()


def measure_load(
    sdxl: StableDiffusion_XL, pipeline: StableDiffusionXLPipeline, path: Path, layers: int, rounds: int
) -> Result:
    def ours() -> None:
        SDLoraManager(sdxl).add_loras("style", path)

    def theirs() -> None:
        pipeline.load_lora_weights(str(path), adapter_name="style")

    def undo(*_: object) -> None:
        # Untimed, after each round: both back to the bare model.
        SDLoraManager(sdxl).remove_all()
        pipeline.unload_lora_weights()
        gc.collect()

    medians = interleaved(ours, theirs, rounds, report=undo)
    return Result(
        variant=f"load + inject ({layers} layers)",
        ours_s=medians.ours_s,
        diffusers_s=medians.reference_s,
        ratio=medians.ratio,
        ours_cpu_s=medians.ours_cpu_s,
        diffusers_cpu_s=medians.reference_cpu_s,
        cpu_ratio=medians.cpu_ratio,
        target=TARGET_RATIO,
        rounds=medians.rounds,
        layers=layers,
        load_average=os.getloadavg()[0],
    )


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    parser.add_argument("--warmup", type=int, default=1, help="loads of each before measuring (default: 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a tiny SDXL UNet, one round: checks it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.warmup, args.threads = 1, 0, 1
    torch.set_num_threads(args.threads)
    # diffusers warns about what it does not load of a file, and PEFT about adapters it re-creates.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()

    ours_unet, theirs_unet = build_pair(tiny=args.smoke)
    sdxl = StableDiffusion_XL(
        unet=ours_unet, lda=SDXLAutoencoder(device="meta"), clip_text_encoder=text_encoder_for(ours_unet)
    )
    pipeline = pipeline_of(theirs_unet)
    gc.collect()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sdxl_lora.safetensors"
        layers = kohya_lora(ours_unet, path)
        check_parity(sdxl, pipeline, path)
        for _ in range(args.warmup):
            measure_load(sdxl, pipeline, path, layers, rounds=1)
        results = [measure_load(sdxl, pipeline, path, layers, args.rounds)]
    machine = f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    model = "tiny SDXL UNet (smoke)" if args.smoke else "SDXL base UNet"
    print(f"kohya LoRA (rank {RANK}, attention and feed-forward projections) on the {model}, float32, CPU ({machine})")
    print(f"median of {args.rounds} interleaved rounds, {args.warmup} warmup; target ours/diffusers <= {TARGET_RATIO}")
    print(
        f"{'variant':<30} {'ours (s)':>9} {'diffusers (s)':>14} {'ours/diffusers':>15} {'CPU: ours (s)':>14} "
        f"{'diffusers (s)':>14} {'ours/diffusers':>15} {'load':>5}"
    )
    for r in results:
        print(
            f"{r.variant:<30} {r.ours_s:>9.3f} {r.diffusers_s:>14.3f} {r.ratio:>15.3f} {r.ours_cpu_s:>14.3f} "
            f"{r.diffusers_cpu_s:>14.3f} {r.cpu_ratio:>15.3f} {r.load_average:>5.1f}"
        )
    if args.json is not None:
        payload = {"machine": machine, "target_ratio": TARGET_RATIO, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
