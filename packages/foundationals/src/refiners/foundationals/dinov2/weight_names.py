"""The names DINOv2's two checkpoint layouts give the tensors of a `ViT`: facebook's original `.pth` files and
transformers' `Dinov2Model` / `Dinov2WithRegistersModel` folders.

Each function pairs every tensor name of its layout with the weights of a live `ViT` that hold it, found by type and
in order, so the maps hold for every width, depth, MLP kind and number of registers. The converters
(`refiners-convert dinov2`) read them.

- facebook (`dinov2/models/vision_transformer.py`): `cls_token`, `pos_embed`, `register_tokens`,
  `patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}` (giant:
  `mlp.w12`, `mlp.w3`), `norm`. `attn.qkv` stacks the query, key and value projections.
- transformers, as `save_pretrained` writes them (the Hub's layout): `embeddings.{cls_token, position_embeddings,
  register_tokens, patch_embeddings.projection}`, `encoder.layer.N.{norm1, attention.attention.{query, key, value},
  attention.output.dense, layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2, layer_scale2.lambda1}` (giant:
  `mlp.weights_in`, `mlp.weights_out`), `layernorm`.

Both layouts also hold a `mask_token` (iBOT's masked-patch token, used in training only): `MASK_TOKEN_NAMES`.

Example:
    ```py
    from refiners.foundationals.dinov2 import DINOv2_giant_reg
    from refiners.foundationals.dinov2.weight_names import facebook_dinov2_names

    names = facebook_dinov2_names(DINOv2_giant_reg(device="meta"))
    assert [parameter for _, parameter in names["blocks.39.attn.qkv.weight"]] == ["weight"] * 3  # q, k, v
    assert "register_tokens" in names and "blocks.0.mlp.w12.bias" in names
    ```
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

import refiners.fluxion.layers as fl
from refiners.foundationals.dinov2.vit import (
    ClassToken,
    FeedForward,
    LayerScale,
    PatchEncoder,
    PositionalEmbedding,
    RegisterTokens,
    SwiGLUFeedForward,
    TransformerLayer,
    ViT,
)

__all__ = ["Targets", "MASK_TOKEN_NAMES", "facebook_dinov2_names", "transformers_dinov2_names"]

Targets = list[tuple[torch.nn.Module, str]]
"""The layers and parameter names a checkpoint tensor fills: one, or several when the tensor stacks their tensors
along its first dimension (facebook's fused `attn.qkv`)."""

T = TypeVar("T", bound=fl.Module)

MASK_TOKEN_NAMES = {"facebook": "mask_token", "transformers": "embeddings.mask_token"}
"""The mask token of each layout: a training-time input (masked patches), which a `ViT` does not take."""


def _found(chain: fl.Chain, layer_type: type[T], what: str, count: int) -> list[T]:
    layers = [layer for layer, _ in chain.walk(layer_type)]
    if len(layers) != count:
        raise ValueError(f"expected {count} {what}, found {len(layers)}: is this a DINOv2 ViT?")
    return layers


class _Layer:
    """The weights of one `TransformerLayer`, by role."""

    def __init__(self, layer: TransformerLayer) -> None:
        self.norm1, self.norm2 = _found(layer, fl.LayerNorm, "LayerNorms per layer", 2)
        self.scale1, self.scale2 = _found(layer, LayerScale, "LayerScales per layer", 2)
        attention = layer.ensure_find(fl.SelfAttention)
        self.query, self.key, self.value, self.output = _found(attention, fl.Linear, "attention projections", 4)
        mlp = layer.find(SwiGLUFeedForward) or layer.ensure_find(FeedForward)
        self.swiglu = isinstance(mlp, SwiGLUFeedForward)
        self.fc1, self.fc2 = _found(mlp, fl.Linear, "Linears per MLP", 2)


@dataclass(frozen=True)
class _Embeddings:
    """The weights before the transformer layers, by role."""

    class_token: ClassToken
    positions: PositionalEmbedding
    registers: RegisterTokens | None
    projection: fl.Conv2d

    def names(self, class_token: str, positions: str, registers: str, projection: str) -> dict[str, Targets]:
        """Each weight under its layout's name."""
        names: dict[str, Targets] = {
            class_token: [(self.class_token, "weight")],
            positions: [(self.positions, "weight")],
        }
        if self.registers is not None:
            names[registers] = [(self.registers, "weight")]
        names.update(_module(projection, self.projection))
        return names


def _parts(model: ViT) -> tuple[_Embeddings, list[_Layer]]:
    """The embeddings and the layers of `model`."""
    (class_token,) = _found(model, ClassToken, "ClassToken", 1)
    (patch_encoder,) = _found(model, PatchEncoder, "PatchEncoder", 1)
    (positions,) = _found(model, PositionalEmbedding, "PositionalEmbedding", 1)
    registers = _found(model, RegisterTokens, "RegisterTokens", 1 if model.num_registers else 0)
    embeddings = _Embeddings(
        class_token, positions, registers[0] if registers else None, patch_encoder.ensure_find(fl.Conv2d)
    )
    return embeddings, [_Layer(layer) for layer in model.layers(TransformerLayer)]


def _final_norm(model: ViT) -> fl.LayerNorm:
    last = list(model)[-1]
    if not isinstance(last, fl.LayerNorm):
        raise ValueError(f"a DINOv2 ViT ends with its final LayerNorm, but this one ends with {type(last).__name__}")
    return last


def _module(prefix: str, layer: torch.nn.Module) -> Iterator[tuple[str, Targets]]:
    for name, _ in layer.named_parameters(recurse=False):
        yield f"{prefix}.{name}", [(layer, name)]


def facebook_dinov2_names(model: ViT) -> dict[str, Targets]:
    """Every tensor of facebook's layout (`dinov2_vits14.pth`...) and the weights of `model` it fills.

    Args:
        model: The model (its weights are not read: it may live on the "meta" device).

    Raises:
        ValueError: The model is not laid out like a `ViT`.
    """
    embeddings, layers = _parts(model)
    names = embeddings.names("cls_token", "pos_embed", "register_tokens", "patch_embed.proj")
    for index, layer in enumerate(layers):
        block = f"blocks.{index}"
        fc1, fc2 = ("w12", "w3") if layer.swiglu else ("fc1", "fc2")
        for parameter in ("weight", "bias"):
            names[f"{block}.attn.qkv.{parameter}"] = [
                (linear, parameter) for linear in (layer.query, layer.key, layer.value)
            ]
        for prefix, module in (
            (f"{block}.norm1", layer.norm1),
            (f"{block}.attn.proj", layer.output),
            (f"{block}.norm2", layer.norm2),
            (f"{block}.mlp.{fc1}", layer.fc1),
            (f"{block}.mlp.{fc2}", layer.fc2),
        ):
            names.update(_module(prefix, module))
        names[f"{block}.ls1.gamma"] = [(layer.scale1, "weight")]
        names[f"{block}.ls2.gamma"] = [(layer.scale2, "weight")]
    names.update(_module("norm", _final_norm(model)))
    return names


def transformers_dinov2_names(model: ViT) -> dict[str, Targets]:
    """Every tensor of transformers' layout (a `Dinov2Model` or `Dinov2WithRegistersModel` saved with
    `save_pretrained`, the Hub's `facebook/dinov2-*`) and the weights of `model` it fills.

    Args:
        model: The model (its weights are not read: it may live on the "meta" device).

    Raises:
        ValueError: The model is not laid out like a `ViT`.
    """
    embeddings, layers = _parts(model)
    names = embeddings.names(
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        "embeddings.register_tokens",
        "embeddings.patch_embeddings.projection",
    )
    for index, layer in enumerate(layers):
        block = f"encoder.layer.{index}"
        fc1, fc2 = ("weights_in", "weights_out") if layer.swiglu else ("fc1", "fc2")
        for prefix, module in (
            (f"{block}.norm1", layer.norm1),
            (f"{block}.attention.attention.query", layer.query),
            (f"{block}.attention.attention.key", layer.key),
            (f"{block}.attention.attention.value", layer.value),
            (f"{block}.attention.output.dense", layer.output),
            (f"{block}.norm2", layer.norm2),
            (f"{block}.mlp.{fc1}", layer.fc1),
            (f"{block}.mlp.{fc2}", layer.fc2),
        ):
            names.update(_module(prefix, module))
        names[f"{block}.layer_scale1.lambda1"] = [(layer.scale1, "weight")]
        names[f"{block}.layer_scale2.lambda1"] = [(layer.scale2, "weight")]
    names.update(_module("layernorm", _final_norm(model)))
    return names
