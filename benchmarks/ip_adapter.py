"""A UNet step with an IP-Adapter (base, SD1.5), ours vs diffusers, same weights, CPU float32.

SD1UNet + SD1IPAdapter against diffusers' UNet2DConditionModel with the same IP-Adapter file loaded by
`_load_ip_adapter_weights` (what `load_ip_adapter` does to the UNet: `IPAdapterAttnProcessor2_0` in every
cross-attention, the image projection as `encoder_hid_proj`). The file is an h94-layout base IP-Adapter
(`ip-adapter_sd15.bin`'s keys and shapes: a 1024-wide CLIP ViT-H embedding projected to 4 tokens) with random
weights, sized for the UNet; ours reads the same tensors. Both get the same (negative, positive) image embedding, as
the pipelines build it. diffusers projects the embedding in every UNet forward, ours once (`set_clip_image_embedding`):
each as its pipeline runs a step. SD1.5's architecture (depths, heads, 768-wide text embedding) at reduced widths by
default (`--channels`, 128/256/512/512, as `controlnet.py`), batch 2, latents 32x32, outputs checked equal (1e-4 of
the output's scale) before timing, interleaved rounds after a warmup, median of the per-round ratios. Target:
ours/diffusers <= 1.0 (wall time).

Usage:
    uv run python benchmarks/ip_adapter.py [--channels C C C C] [--rounds N] [--warmup N] [--sizes S ...] [--json PATH]
    uv run python benchmarks/ip_adapter.py --smoke  # a tiny UNet, one forward each: checks it runs
"""

import argparse
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor
from unet import TINY_CHANNELS, TINY_UNET_CONFIG, Result, run, timed_pair

from refiners.adapters.ip_adapter import SD1IPAdapter
from refiners.converters.reference_check import SD15_UNET_CONFIG
from refiners.converters.unet import convert_diffusers_unet
from refiners.foundationals.clip import CLIPImageEncoderH
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet

BATCH = 2
SIZES = (32,)
CHANNELS = (128, 256, 512, 512)
CLIP_DIM = 1024  # CLIP ViT-H's image embedding, what ip-adapter_sd15 projects
TOKENS = 4

Pair = tuple[tuple[SD1UNet, SD1IPAdapter, Tensor], tuple[UNet2DConditionModel, Tensor]]


def h94_base_weights(unet: UNet2DConditionModel, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """A base IP-Adapter file's tensors (h94's layout, as `torch.load` gives them), random, sized for `unet`."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape: int) -> Tensor:
        return 0.5 * torch.randn(*shape, generator=generator)

    cross_dim: int = unet.config["cross_attention_dim"]
    image_proj = {
        "proj.weight": random(TOKENS * cross_dim, CLIP_DIM) / 8,
        "proj.bias": random(TOKENS * cross_dim),
        "norm.weight": 1 + random(cross_dim),
        "norm.bias": random(cross_dim),
    }
    ip_adapter: dict[str, Tensor] = {}
    # h94 numbers the cross-attentions 1, 3, 5... in the order diffusers lists its attention processors.
    for index, name in enumerate(name for name in unet.attn_processors if name.endswith("attn2.processor")):
        shape = unet.get_parameter(name.replace("processor", "to_k.weight")).shape
        ip_adapter[f"{2 * index + 1}.to_k_ip.weight"] = random(*shape)
        ip_adapter[f"{2 * index + 1}.to_v_ip.weight"] = random(*shape)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def build_pair_at(channels: tuple[int, ...], tiny: bool) -> Pair:
    """diffusers' UNet with the IP-Adapter loaded; ours with the same UNet tensors and the same file."""
    config: dict[str, Any] = TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG | {"block_out_channels": list(channels)}
    first, second, third, fourth = config["block_out_channels"]
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**config).eval()
    ours_channels = (first, second, third, fourth)
    ours = SD1UNet(channels=ours_channels, context_embedding_dim=config["cross_attention_dim"], device="meta")
    ours.load_state_dict(convert_diffusers_unet(theirs.state_dict(), ours), strict=True, assign=True)
    weights = h94_base_weights(theirs)
    theirs._load_ip_adapter_weights([weights], low_cpu_mem_usage=False)  # pyright: ignore[reportPrivateUsage]
    flat = {f"{group}.{key}": tensor for group, tensors in weights.items() for key, tensor in tensors.items()}
    # The image encoder is only asked its output width: the embedding is given, as a pipeline's cached one would be.
    adapter = SD1IPAdapter(ours, weights=flat, clip_image_encoder=CLIPImageEncoderH(device="meta")).inject()
    positive = torch.randn(1, 1, CLIP_DIM, generator=torch.Generator().manual_seed(2))
    embedding = torch.cat([torch.zeros_like(positive), positive])  # (negative, positive), one image each
    return (ours, adapter, embedding), (theirs, embedding)


def measure(ours: Any, theirs: Any, size: int, rounds: int, warmup: int) -> Result:
    (unet, adapter, embedding), (reference_unet, reference_embedding) = ours, theirs
    generator = torch.Generator().manual_seed(size)
    latents = torch.randn(BATCH, 4, size, size, generator=generator)
    timesteps = torch.tensor([999, 500])
    text_embedding = torch.randn(BATCH, 77, unet.context_embedding_dim, generator=generator)
    with torch.no_grad():
        adapter.set_clip_image_embedding(embedding)
    unet.set_timestep(timesteps)
    unet.set_clip_text_embedding(text_embedding)
    added = {"image_embeds": [reference_embedding]}

    def run_ours() -> Tensor:
        return unet(latents)

    def run_theirs() -> Tensor:
        return reference_unet(latents, timesteps, encoder_hidden_states=text_embedding, added_cond_kwargs=added).sample

    return timed_pair(run_ours, run_theirs, f"latents {size}x{size}", rounds, warmup)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--channels", type=int, nargs=4, default=list(CHANNELS))
    extra, rest = parser.parse_known_args(argv)
    channels = TINY_CHANNELS if "--smoke" in rest else tuple(extra.channels)
    titles = (
        "SD1UNet + SD1IPAdapter vs diffusers UNet2DConditionModel + IP-Adapter processors",
        f"SD1.5 UNet at widths {'/'.join(map(str, channels))}, base IP-Adapter",
    )
    return run(rest, __doc__ or "", lambda tiny: build_pair_at(channels, tiny), measure, titles, SIZES)


if __name__ == "__main__":
    main()
