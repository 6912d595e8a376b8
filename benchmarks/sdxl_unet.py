"""SDXLUNet vs diffusers' UNet2DConditionModel: one denoising forward, same weights, SDXL base config, CPU float32.

As `unet.py` for SD1.5: both models hold the very same weight tensors (ours built on the meta device and given
diffusers' tensors, converted by key only), their outputs are checked to match before timing, and runs alternate
round after round in one process; the ratio is taken per round and its median reported. Batch 2 (negative and
positive prompt), text embedding (2, 77, 2048), pooled (2, 1280), time ids (2, 6), latents 32x32 (256-pixel images:
the full 128x128 does not fit a 2-core machine's patience). Target: ours/diffusers <= 1.0 (wall time).

Usage:
    uv run python benchmarks/sdxl_unet.py [--rounds N] [--warmup N] [--threads N] [--sizes S ...] [--json PATH]
    uv run python benchmarks/sdxl_unet.py --smoke  # a tiny SDXL UNet, one forward each: checks it runs
"""

from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor
from unet import Result, run, timed_pair

from refiners.converters.reference_check import SDXL_UNET_CONFIG
from refiners.converters.unet import convert_diffusers_unet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXLUNet

TARGET_RATIO = 1.0
BATCH = 2
TINY: dict[str, Any] = {
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [1, 2, 4],
    "transformer_layers_per_block": [1, 2, 2],
    "cross_attention_dim": 32,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,
}


def build_pair(tiny: bool = False) -> tuple[SDXLUNet, UNet2DConditionModel]:
    """diffusers' SDXL UNet with random weights, and ours holding the same weight tensors."""
    torch.manual_seed(0)
    config: dict[str, Any] = SDXL_UNET_CONFIG | (TINY if tiny else {})
    theirs = UNet2DConditionModel(**config).eval()
    if tiny:
        ours = SDXLUNet(
            channels=(32, 64, 64),
            num_attention_heads=(1, 2, 4),
            transformer_depths=(1, 2, 2),
            context_embedding_dim=32,
            pooled_embedding_dim=16,
            time_embedding_dim=8,
            device="meta",
        )
    else:
        ours = SDXLUNet(device="meta")
    ours.load_state_dict(convert_diffusers_unet(theirs.state_dict(), ours), strict=True, assign=True)
    return ours, theirs


def measure(ours: SDXLUNet, theirs: UNet2DConditionModel, size: int, rounds: int, warmup: int) -> Result:
    generator = torch.Generator().manual_seed(size)
    latents = torch.randn(BATCH, 4, size, size, generator=generator)
    timesteps = torch.tensor([999, 500])
    text = torch.randn(BATCH, 77, ours.context_embedding_dim, generator=generator)
    pooled = torch.randn(BATCH, ours.pooled_embedding_dim, generator=generator)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * BATCH)
    ours.set_timestep(timesteps)
    ours.set_clip_text_embedding(text)
    ours.set_pooled_text_embedding(pooled)
    ours.set_time_ids(time_ids)
    conditions = {"text_embeds": pooled, "time_ids": time_ids}

    def run_ours() -> Tensor:
        return ours(latents)

    def run_theirs() -> Tensor:
        return theirs(latents, timesteps, encoder_hidden_states=text, added_cond_kwargs=conditions).sample

    return timed_pair(run_ours, run_theirs, f"latents {size}x{size}", rounds, warmup)


def main(argv: list[str] | None = None) -> list[Result]:
    titles = ("SDXLUNet vs diffusers UNet2DConditionModel", "SDXL base UNet")
    return run(argv, __doc__ or "", build_pair, measure, titles, (32,))


if __name__ == "__main__":
    main()
