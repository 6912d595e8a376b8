"""A UNet step with a T2I-Adapter, ours vs diffusers: SD1UNet + SD1T2IAdapter vs UNet2DConditionModel given
`down_intrablock_additional_residuals`, same weights, SD1.5 config and a full adapter (`full_adapter`, TencentARC's
SD1.5 sizes), CPU float32.

As `unet.py`: both UNets hold the very same weight tensors, the adapters' encoders the same weights (converted by the
converter's key map), their outputs are checked to match before timing, and runs alternate round after round in one
process; the ratio is taken per round and its median reported. The features are computed once, as both pipelines do;
each diffusers step gets copies of them, as `StableDiffusionAdapterPipeline` passes them (`state.clone()`). Batch 2
(negative and positive prompt), text embedding (2, 77, 768), latents 32x32 (256-pixel images). Target:
ours/diffusers <= 1.0 (wall time).

Usage:
    uv run python benchmarks/t2i_adapter.py [--rounds N] [--warmup N] [--threads N] [--sizes S ...] [--json PATH]
    uv run python benchmarks/t2i_adapter.py --smoke  # a tiny UNet and adapter, one forward each: checks it runs
"""

from typing import Any

import torch
from diffusers.models.adapter import T2IAdapter
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor
from unet import TINY_CHANNELS, Result, run, timed_pair
from unet import build_pair as build_unets

from refiners.adapters.t2i_adapter import FullT2IEncoder, SD1T2IAdapter
from refiners.converters.engine import convert_state_dict
from refiners.converters.unet import module_key_map
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet

BATCH = 2
SIZES = (32,)

Pair = tuple[tuple[SD1UNet, SD1T2IAdapter], tuple[UNet2DConditionModel, T2IAdapter]]


def build_pair(tiny: bool = False) -> Pair:
    """The UNets of `unet.py`, with a T2I-Adapter each: diffusers' random one, and ours holding its weights."""
    ours, theirs = build_unets(tiny)
    channels = TINY_CHANNELS if tiny else (320, 640, 1280, 1280)
    torch.manual_seed(1)
    reference = T2IAdapter(adapter_type="full_adapter", channels=list(channels)).eval()
    encoder = FullT2IEncoder(channels=channels, device="meta")
    key_map = module_key_map(encoder, dict(encoder.diffusers_modules()))
    shapes = {key: tensor.shape for key, tensor in encoder.state_dict().items()}
    encoder.load_state_dict(convert_state_dict(reference.state_dict(), key_map, shapes), strict=True, assign=True)
    adapter = SD1T2IAdapter(ours, name="depth", encoder=encoder).inject()
    return (ours, adapter), (theirs, reference)


def measure(ours: Any, theirs: Any, size: int, rounds: int, warmup: int) -> Result:
    (unet, adapter), (reference_unet, reference) = ours, theirs
    generator = torch.Generator().manual_seed(size)
    latents = torch.randn(BATCH, 4, size, size, generator=generator)
    timesteps = torch.tensor([999, 500])
    text_embedding = torch.randn(BATCH, 77, unet.context_embedding_dim, generator=generator)
    image = torch.rand(1, 3, 8 * size, 8 * size, generator=generator)
    with torch.no_grad():
        adapter.set_condition_features(adapter.compute_condition_features(image))
        features = [torch.cat([feature] * BATCH) for feature in reference(image)]
    unet.set_timestep(timesteps)
    unet.set_clip_text_embedding(text_embedding)

    def run_ours() -> Tensor:
        return unet(latents)

    def run_theirs() -> Tensor:
        residuals = [feature.clone() for feature in features]
        return reference_unet(
            latents, timesteps, encoder_hidden_states=text_embedding, down_intrablock_additional_residuals=residuals
        ).sample

    return timed_pair(run_ours, run_theirs, f"latents {size}x{size}", rounds, warmup)


def main(argv: list[str] | None = None) -> list[Result]:
    titles = ("SD1UNet + SD1T2IAdapter vs diffusers UNet2DConditionModel + T2IAdapter", "SD1.5 UNet, full adapter")
    return run(argv, __doc__ or "", build_pair, measure, titles, SIZES)


if __name__ == "__main__":
    main()
