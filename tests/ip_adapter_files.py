"""IP-Adapter files as h94 publishes them, sized for a diffusers UNet, from random weights (base, plus, FaceID).

Importable from any test as `ip_adapter_files`: the IP-Adapter tests write them, and the converter's test converts them.
"""

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FACE_DIM, HIDDEN, RANK = 512, 1024, 4  # insightface's embedding, the released files' MLP width; a small LoRA rank
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
# Four layers, as every released plus file (diffusers builds four); two heads of 64: wider inside than the tokens.
PLUS_WIDTH, PLUS_HEADS, PLUS_TOKENS, PLUS_LAYERS = 64, 2, 8, 4


def _random(*shape: int) -> Tensor:
    return torch.randn(*shape) * 0.5


def h94_weights(unet: Any, clip_dim: int, fine_grained: bool, seed: int = 0) -> dict[str, Tensor]:
    """An IP-Adapter file's tensors in the h94 layout, sized for the diffusers `unet`, from random weights.

    The cross-attentions are numbered as diffusers lists its attention processors (the oracle of the numbering).
    """
    generator = torch.random.fork_rng(devices=[])
    with generator:
        torch.manual_seed(seed)
        cross_dim = unet.config.cross_attention_dim
        tensors: dict[str, Tensor] = {}
        if fine_grained:
            inner = PLUS_HEADS * 64
            tensors |= {
                "image_proj.latents": _random(1, PLUS_TOKENS, PLUS_WIDTH),
                "image_proj.proj_in.weight": _random(PLUS_WIDTH, clip_dim),
                "image_proj.proj_in.bias": _random(PLUS_WIDTH),
                "image_proj.proj_out.weight": _random(cross_dim, PLUS_WIDTH),
                "image_proj.proj_out.bias": _random(cross_dim),
                "image_proj.norm_out.weight": 1 + _random(cross_dim),
                "image_proj.norm_out.bias": _random(cross_dim),
            }
            for index in range(PLUS_LAYERS):
                prefix = f"image_proj.layers.{index}"
                for norm in ("0.norm1", "0.norm2", "1.0"):
                    tensors[f"{prefix}.{norm}.weight"] = 1 + _random(PLUS_WIDTH)
                    tensors[f"{prefix}.{norm}.bias"] = _random(PLUS_WIDTH)
                tensors |= {
                    f"{prefix}.0.to_q.weight": _random(inner, PLUS_WIDTH) / 4,
                    f"{prefix}.0.to_kv.weight": _random(2 * inner, PLUS_WIDTH) / 4,
                    f"{prefix}.0.to_out.weight": _random(PLUS_WIDTH, inner) / 4,
                    f"{prefix}.1.1.weight": _random(4 * PLUS_WIDTH, PLUS_WIDTH) / 4,
                    f"{prefix}.1.3.weight": _random(PLUS_WIDTH, 4 * PLUS_WIDTH) / 8,
                }
        else:
            tensors |= {
                "image_proj.proj.weight": _random(4 * cross_dim, clip_dim),
                "image_proj.proj.bias": _random(4 * cross_dim),
                "image_proj.norm.weight": 1 + _random(cross_dim),
                "image_proj.norm.bias": _random(cross_dim),
            }
        key_id = 1
        for name in unet.attn_processors:
            if name.endswith("attn2.processor"):
                to_k = unet.get_submodule(name.removesuffix(".processor")).to_k
                tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = _random(*to_k.weight.shape)
                tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = _random(*to_k.weight.shape)
                key_id += 2
    return tensors


def save_bin(tensors: dict[str, Tensor], path: Path) -> Path:
    nested: dict[str, dict[str, Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in tensors.items():
        group, _, rest = key.partition(".")
        nested[group][rest] = tensor
    torch.save(nested, path)
    return path


def faceid_weights(unet: Any, seed: int = 0) -> dict[str, Tensor]:
    """A FaceID file's tensors in the h94 layout, sized for the diffusers `unet`, from random weights: the image
    projection, the cross-attentions' `to_k_ip`/`to_v_ip` and a LoRA of every attention processor, numbered as
    diffusers lists them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cross_dim = unet.config.cross_attention_dim
        tensors = {
            "image_proj.proj.0.weight": torch.randn(HIDDEN, FACE_DIM) * 0.5,
            "image_proj.proj.0.bias": torch.randn(HIDDEN) * 0.1,
            "image_proj.proj.2.weight": torch.randn(4 * cross_dim, HIDDEN) * 0.1,
            "image_proj.proj.2.bias": torch.randn(4 * cross_dim) * 0.1,
            "image_proj.norm.weight": 1 + torch.randn(cross_dim) * 0.5,
            "image_proj.norm.bias": torch.randn(cross_dim) * 0.5,
        }
        for key_id, name in enumerate(unet.attn_processors):
            attention = unet.get_submodule(name.removesuffix(".processor"))
            if name.endswith("attn2.processor"):
                tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn_like(attention.to_k.weight) * 0.5
                tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn_like(attention.to_k.weight) * 0.5
            for projection in PROJECTIONS:
                linear = attention.to_out[0] if projection == "to_out" else getattr(attention, projection)
                down = torch.randn(RANK, linear.in_features) * 0.15
                tensors[f"ip_adapter.{key_id}.{projection}_lora.down.weight"] = down
                tensors[f"ip_adapter.{key_id}.{projection}_lora.up.weight"] = (
                    torch.randn(linear.out_features, RANK) * 0.15
                )
    return tensors
