"""DINOv2 references for the tests: transformers' models from the released configs with random weights, saved as a
user's files are (a transformers folder; facebook's original `.pth`).

`CONFIGS` holds the `config.json` entries of the Hub's `facebook/dinov2-{small,base,large,giant}` and
`facebook/dinov2-with-registers-*` that set sizes (the rest are transformers' defaults, which those files repeat).
`random_reference` perturbs every vector parameter (norms, biases, layer scales, tokens): transformers' init sets
them to constants (layer scale 1, registers 0), which would hide a weight mapped to the wrong place.

`facebook_state_dict` writes the tensors of a saved transformers folder with the names and shapes of facebook's
`dinov2/models/vision_transformer.py` (the correspondence of transformers' `convert_dinov2_to_hf.py`, inverted: the
query, key and value stacked into `attn.qkv`, `layer_scale1.lambda1` as `ls1.gamma`, SwiGLU's `weights_in` as
`mlp.w12`). `tests/converters/test_dinov2_conversion.py` proves it: timm's ViT, which reads facebook's files
(`checkpoint_filter_fn`), computes transformers' tokens from them.
"""

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

__all__ = ["CONFIGS", "Reference", "random_reference", "facebook_state_dict", "save_facebook", "tokens"]

Reference = Dinov2Model | Dinov2WithRegistersModel

_SIZES: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "giant": {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "use_swiglu_ffn": True},
}
_COMMON = {"image_size": 518, "patch_size": 14, "mlp_ratio": 4, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}

CONFIGS: dict[str, dict[str, Any]] = {
    **{name: _COMMON | sizes for name, sizes in _SIZES.items()},
    **{f"{name}_reg": _COMMON | sizes | {"num_register_tokens": 4} for name, sizes in _SIZES.items()},
}
"""The released models' configs, by the suffix of their refiners class (`small` for `DINOv2_small`...)."""


def random_reference(name: str, seed: int = 0, **overrides: Any) -> Reference:
    """transformers' model of `CONFIGS[name]` (with `overrides`, e.g. fewer layers), random weights, in eval mode."""
    config = CONFIGS[name] | overrides
    torch.manual_seed(seed)
    if "num_register_tokens" in config:
        model: Reference = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config))
    else:
        model = Dinov2Model(Dinov2Config(**config))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1 or parameter.shape[0] == 1:  # vectors, and the tokens (1, n, dim)
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def tokens(reference: Reference, images: Tensor) -> Tensor:
    """The reference's token sequence (`last_hidden_state`)."""
    with torch.no_grad():
        return reference(pixel_values=images).last_hidden_state


_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_IN_LAYER = {
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
}


def facebook_state_dict(folder: Path) -> dict[str, Tensor]:
    """The tensors of a transformers DINOv2 folder (`save_pretrained`), as facebook's original file holds them."""
    saved = load_file(folder / "model.safetensors")
    converted: dict[str, Tensor] = {}
    for key, tensor in saved.items():
        if key in _EMBEDDINGS:
            converted[_EMBEDDINGS[key]] = tensor
            continue
        match = _LAYER.fullmatch(key)
        assert match is not None, f"unexpected key in a transformers DINOv2 folder: {key}"
        index, name = match.groups()
        if name.startswith(("attention.attention.key", "attention.attention.value")):
            continue  # stacked with the query
        if name.startswith("attention.attention.query"):
            parameter = name.rpartition(".")[2]
            stacked = [
                saved[f"encoder.layer.{index}.attention.attention.{p}.{parameter}"] for p in ("query", "key", "value")
            ]
            converted[f"blocks.{index}.attn.qkv.{parameter}"] = torch.cat(stacked)
            continue
        for theirs, original in _IN_LAYER.items():
            name = name.replace(theirs, original)
        converted[f"blocks.{index}.{name}"] = tensor
    return converted


def save_facebook(folder: Path, path: Path) -> Path:
    """Write `facebook_state_dict(folder)` as facebook's files are written: `torch.save` of the state dict."""
    torch.save(facebook_state_dict(folder), path)
    return path
