"""SDXLUNet computes what diffusers' UNet2DConditionModel computes with SDXL's architecture, on converted weights.

The reference is built from SDXL's config at reduced widths (three resolutions, no attention at the first, several
transformer layers per block, linear projections, the text-time embedding) with random weights.
"""

import gc
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor
from toy_sdxl import POOLED_DIM, UNET_CONFIG, WIDTH_G, WIDTH_L

from refiners.converters.reference_check import SDXL_UNET_CONFIG
from refiners.converters.unet import convert_diffusers_unet
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_from_safetensors
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXLRefinerUNet, SDXLUNet
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.presets import TINY

RELATIVE_ATOL = 1e-4


def toy_unet(in_channels: int = 4, device: str | None = None) -> SDXLUNet:
    """The family's TINY preset's UNet (the toy reference's `UNET_CONFIG`), with `in_channels`."""
    config = ModelConfig(TINY.unet.class_name, {**TINY.unet.arguments, "in_channels": in_channels})
    return config.build((SDXLUNet,), device=device)


def run(unet: SDXLUNet, x: Tensor, timestep: Tensor, text: Tensor, pooled: Tensor, time_ids: Tensor) -> Tensor:
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text)
    unet.set_pooled_text_embedding(pooled)
    unet.set_time_ids(time_ids)
    with torch.no_grad():
        return unet(x)


@pytest.mark.parametrize("in_channels", [4, 9])
def test_toy_sdxl_unet_matches_diffusers(in_channels: int) -> None:
    torch.manual_seed(0)
    config: dict[str, Any] = {**UNET_CONFIG, "in_channels": in_channels}
    reference = UNet2DConditionModel(**config).eval()
    unet = toy_unet(in_channels, device="meta")
    unet.load_state_dict(convert_diffusers_unet(reference.state_dict(), unet), strict=True, assign=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, in_channels, 12, 20, generator=generator)  # a non-square size
    timestep = torch.tensor([999, 321])
    text = torch.randn(2, 77, WIDTH_L + WIDTH_G, generator=generator)
    pooled = torch.randn(2, POOLED_DIM, generator=generator)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 16.0, 32.0, 1024.0, 1024.0]])
    with torch.no_grad():
        expected = reference(
            x, timestep, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
    actual = run(unet, x, timestep, text, pooled, time_ids)
    torch.testing.assert_close(actual, expected, atol=RELATIVE_ATOL * expected.abs().max().item(), rtol=0)
    # The text-time embedding matters: other time ids give another prediction.
    other = run(unet, x, timestep, text, pooled, time_ids.flip(0))
    assert (other - actual).abs().max() > 1e-3 * expected.abs().max()


def test_refiner_unet_sizes_match_diffusers() -> None:
    # The refiner's config at full size, on the meta device: every tensor's name maps and every shape fits.
    config: dict[str, Any] = SDXL_UNET_CONFIG | {
        "block_out_channels": [384, 768, 1536, 1536],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [6, 12, 24, 24],
        "transformer_layers_per_block": 4,
        "cross_attention_dim": 1280,
        "projection_class_embeddings_input_dim": 2560,
    }
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    unet = SDXLRefinerUNet(device="meta")
    converted = convert_diffusers_unet(reference.state_dict(), unet)
    assert len(converted) == len(unet.state_dict())
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in reference.parameters())


def test_time_ids_of_the_wrong_width_are_refused() -> None:
    unet = toy_unet(device="meta")
    with pytest.raises(ValueError, match=re.escape("the time ids must be (batch, 6), got shape (1, 5)")):
        unet.set_time_ids(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=re.escape(f"the pooled text embedding must be (batch, {POOLED_DIM})")):
        unet.set_pooled_text_embedding(torch.zeros(1, 1280))


def test_base_unet_sizes_match_diffusers() -> None:
    # SDXL base at full size (2.6 B parameters), on the meta device: every name maps and every shape fits.
    with torch.device("meta"):
        reference = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    unet = SDXLUNet(device="meta")
    converted = convert_diffusers_unet(reference.state_dict(), unet)
    assert len(converted) == len(unet.state_dict())
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.slow
@pytest.mark.heavy
def test_full_size_base_unet_matches_diffusers(tmp_path: Path) -> None:
    """SDXL base's UNet at full size (2.6 B parameters): the reference's output is recorded, the reference saved as a
    download looks and freed, then ours is built on meta and given the converted file, so that peak memory stays
    near one model."""
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**SDXL_UNET_CONFIG).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 77, 2048, generator=generator)
    pooled = torch.randn(1, 1280, generator=generator)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    with torch.no_grad():
        expected = reference(
            x, 500, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
    reference.save_pretrained(tmp_path / "unet", max_shard_size="20GB")  # one file, as the Hub's
    del reference
    gc.collect()
    unet = SDXLUNet(device="meta")
    source = load_from_safetensors(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    unet.load_state_dict(convert_diffusers_unet(source, unet), strict=True, assign=True)
    del source
    actual = run(unet, x, torch.tensor([500]), text, pooled, time_ids)
    difference = (actual - expected).abs().max().item()
    print(f"full-size SDXL UNet: max abs difference {difference:.3g}, output scale {expected.abs().max().item():.3g}")
    torch.testing.assert_close(actual, expected, atol=RELATIVE_ATOL * expected.abs().max().item(), rtol=0)
