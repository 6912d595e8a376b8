"""transformers' CLIP text models (`CLIPTextModel`, `CLIPTextModelWithProjection`) to `CLIPTextEncoder` weights.

The key map is derived from the encoder's structure: `transformers_clip_text_modules` (in `refiners.foundationals`,
where the LoRA loaders read it too) matches each transformers module with the refiners layer that plays its role
(found by type, in order), so it holds for every width and depth, and for encoders with adapters injected (e.g.
`TextEncoderWithPooling`, which receives `text_projection`).
"""

from collections.abc import Mapping

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.converters.engine import KeyMap, convert_state_dict
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder
from refiners.foundationals.clip.text_encoder_names import TRANSFORMERS_CLIP_TEXT_PREFIX, transformers_clip_text_modules

__all__ = ["TRANSFORMERS_CLIP_TEXT_PREFIX", "transformers_clip_text_key_map", "convert_transformers_clip_text"]


def _path(root: fl.Chain, module: fl.Module) -> str:
    """The state-dict prefix of `module` in `root` (e.g. `TransformerLayer_3.Residual_1.LayerNorm`)."""
    parts: list[str] = []
    while module is not root:
        parent = module.parent
        if parent is None:
            raise ValueError(f"{type(module).__name__} is not inside {type(root).__name__}")
        parts.append(parent.key_of(module))
        module = parent
    return ".".join(reversed(parts))


def transformers_clip_text_key_map(
    encoder: CLIPTextEncoder, source_prefix: str = TRANSFORMERS_CLIP_TEXT_PREFIX
) -> KeyMap:
    """The key map from a transformers CLIP text model's state dict to `encoder`'s.

    `embeddings.position_ids` (a buffer of `0..76` that older transformers versions saved) is ignored on purpose.
    `text_projection.weight` (of `CLIPTextModelWithProjection`) is mapped when the encoder has a
    `TextEncoderWithPooling` injected, to its projection.

    Args:
        encoder: The target encoder (its weights are not read: it may live on the "meta" device).
        source_prefix: The prefix of the text transformer's keys in the source (`""` for a `CLIPTextModel` saved by
            transformers 5).
    """
    key_map = KeyMap(ignored=[lambda key: key == f"{source_prefix}embeddings.position_ids"])
    for source, module in transformers_clip_text_modules(encoder, prefix=source_prefix).items():
        target = _path(encoder, module)
        for name, _ in module.named_parameters(recurse=False):
            key_map.add(f"{source}.{name}", f"{target}.{name}")
    return key_map


def convert_transformers_clip_text(
    source: Mapping[str, Tensor], encoder: CLIPTextEncoder, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Convert a transformers CLIP text model's state dict into `encoder`'s (see `transformers_clip_text_key_map`).

    Both layouts of the keys are accepted: `text_model.*` (Hub checkpoints, `CLIPTextModelWithProjection`) and
    unprefixed (a `CLIPTextModel` saved by transformers 5).

    Args:
        source: The source tensors, e.g. `load_from_safetensors("text_encoder/model.safetensors")`.
        encoder: The target encoder (only its state-dict shapes are read: it may live on the "meta" device).
        dtype: Cast floating-point tensors to this dtype (default: keep the source's).

    Raises:
        ConversionError: The source is not a CLIP text model that fits `encoder`; the message lists the keys.
    """
    prefix = TRANSFORMERS_CLIP_TEXT_PREFIX if any(k.startswith(TRANSFORMERS_CLIP_TEXT_PREFIX) for k in source) else ""
    return convert_state_dict(
        source,
        transformers_clip_text_key_map(encoder, source_prefix=prefix),
        {key: tensor.shape for key, tensor in encoder.state_dict().items()},
        what=f"transformers CLIP text model (for {type(encoder).__name__})",
        dtype=dtype,
    )
