"""The names Meta's original checkpoints (`sam_vit_b_01ec64.pth`, ...) give SAM's weights, derived from the model.

`original_sam_modules` pairs each module prefix of the original `Sam` state dict (`image_encoder.blocks.3.attn.qkv`,
`mask_decoder.transformer.layers.1.norm4`, ...) with the refiners layer that plays its role, found by type and in
order in the tree: it holds for every size (depth, width, global attention indices, decoder depth, number of
masks). `original_sam_parameters` lists every original key with the layer and the name of the tensor it fills: the
names are kept (`weight`, `bias`, `rel_pos_h`, ...) but for the position embeddings and the point embeddings.
"""

import refiners.fluxion.layers as fl
from refiners.foundationals.segment_anything.image_encoder import (
    FusedSelfAttention,
    Neck,
    PatchEncoder,
    PositionalEncoding,
    RelativePositionAttention,
    TransformerLayer,
)
from refiners.foundationals.segment_anything.mask_decoder import (
    Hypernetworks,
    ImageToTokenAttention,
    IoUPrediction,
    IoUToken,
    MaskDecoder,
    MaskTokens,
    MaskUpscaling,
    TokenFeedForward,
    TokenSelfAttention,
    TokenToImageAttention,
    TwoWayAttentionBlock,
    TwoWayTransformer,
)
from refiners.foundationals.segment_anything.model import SegmentAnything
from refiners.foundationals.segment_anything.prompt_encoder import (
    MaskEncoder,
    NoMaskEmbedding,
    PointPositions,
    PointTypeEmbedding,
)

__all__ = [
    "original_sam_modules",
    "original_sam_parameters",
    "original_mask_decoder_modules",
    "original_attention_modules",
    "original_mlp_modules",
    "module_tensors",
]

_POINT_TYPES = {
    "not_a_point_embed.weight": "padding",
    "point_embeddings.0.weight": "background",
    "point_embeddings.1.weight": "foreground",
    "point_embeddings.2.weight": "box_top_left",
    "point_embeddings.3.weight": "box_bottom_right",
}


def module_tensors(prefix: str, module: fl.Module) -> dict[str, tuple[fl.Module, str]]:
    """`{prefix}.{name}` for each parameter and buffer of `module` itself (not of its children)."""
    names = [name for name, _ in module.named_parameters(recurse=False)]
    names += [name for name, _ in module.named_buffers(recurse=False)]
    return {f"{prefix}.{name}": (module, name) for name in names}


def original_attention_modules(prefix: str, attention: fl.Attention) -> dict[str, fl.Module]:
    """The original two-way transformer attention's projections (`q_proj`, `k_proj`, `v_proj`, `out_proj`)."""
    query, key, value = attention.layer("Distribute", fl.Distribute)
    return {
        f"{prefix}.q_proj": query,
        f"{prefix}.k_proj": key,
        f"{prefix}.v_proj": value,
        f"{prefix}.out_proj": attention.layer("Linear", fl.Linear),
    }


def original_mlp_modules(prefix: str, mlp: fl.MultiLinear) -> dict[str, fl.Module]:
    """An original `MLP`'s layers (`{prefix}.layers.{i}`)."""
    return {f"{prefix}.layers.{index}": linear for index, linear in enumerate(mlp.layers(fl.Linear))}


def _image_encoder_modules(sam: SegmentAnything) -> dict[str, fl.Module]:
    encoder = sam.image_encoder
    modules: dict[str, fl.Module] = {
        "image_encoder.patch_embed.proj": encoder.ensure_find(PatchEncoder).layer("Conv2d", fl.Conv2d),
    }
    for index, layer in enumerate(encoder.layers(TransformerLayer)):
        prefix = f"image_encoder.blocks.{index}"
        attention = layer.ensure_find(FusedSelfAttention)
        feedforward = layer.layer("Residual_2", fl.Residual)
        modules |= {
            f"{prefix}.norm1": layer.layer(("Residual_1", "LayerNorm"), fl.LayerNorm),
            f"{prefix}.attn.qkv": attention.layer("Linear_1", fl.Linear),
            f"{prefix}.attn": attention.layer("RelativePositionAttention", RelativePositionAttention),
            f"{prefix}.attn.proj": attention.layer("Linear_2", fl.Linear),
            f"{prefix}.norm2": feedforward.layer("LayerNorm", fl.LayerNorm),
            f"{prefix}.mlp.lin1": feedforward.layer("Linear_1", fl.Linear),
            f"{prefix}.mlp.lin2": feedforward.layer("Linear_2", fl.Linear),
        }
    neck = encoder.ensure_find(Neck)
    for index, module in enumerate(child for child in neck if not isinstance(child, fl.Permute)):
        modules[f"image_encoder.neck.{index}"] = module
    return modules


def _prompt_encoder_modules(sam: SegmentAnything) -> dict[str, fl.Module]:
    modules: dict[str, fl.Module] = {
        "prompt_encoder.pe_layer": sam.point_encoder.ensure_find(PointPositions),
        "prompt_encoder.no_mask_embed": sam.ensure_find(NoMaskEmbedding),
    }
    # The original Sequential numbers the activations too (0 conv, 1 norm, 2 GELU, 3 conv, ...).
    for index, module in enumerate(sam.ensure_find(MaskEncoder)):
        if not isinstance(module, fl.Activation):
            modules[f"prompt_encoder.mask_downscaling.{index}"] = module
    return modules


def original_mask_decoder_modules(decoder: MaskDecoder) -> dict[str, fl.Module]:
    """The original `MaskDecoder`'s modules, without the `mask_decoder.` prefix."""
    transformer = decoder.ensure_find(TwoWayTransformer)
    modules: dict[str, fl.Module] = {
        "iou_token": decoder.ensure_find(IoUToken),
        "mask_tokens": decoder.ensure_find(MaskTokens),
    }
    for index, block in enumerate(transformer.layers(TwoWayAttentionBlock)):
        prefix = f"transformer.layers.{index}"
        self_attention = block.ensure_find(TokenSelfAttention)
        token_to_image = block.ensure_find(TokenToImageAttention)
        feedforward = block.ensure_find(TokenFeedForward)
        image_to_token = block.ensure_find(ImageToTokenAttention)
        mlp = feedforward.ensure_find(fl.Residual)
        modules |= original_attention_modules(f"{prefix}.self_attn", self_attention.ensure_find(fl.Attention))
        modules |= original_attention_modules(
            f"{prefix}.cross_attn_token_to_image", token_to_image.ensure_find(fl.Attention)
        )
        modules |= original_attention_modules(
            f"{prefix}.cross_attn_image_to_token", image_to_token.ensure_find(fl.Attention)
        )
        modules |= {
            f"{prefix}.norm1": self_attention.ensure_find(fl.LayerNorm),
            f"{prefix}.norm2": token_to_image.ensure_find(fl.LayerNorm),
            f"{prefix}.mlp.lin1": mlp.layer("Linear_1", fl.Linear),
            f"{prefix}.mlp.lin2": mlp.layer("Linear_2", fl.Linear),
            f"{prefix}.norm3": feedforward.ensure_find(fl.LayerNorm),
            f"{prefix}.norm4": image_to_token.ensure_find(fl.LayerNorm),
        }
    final = transformer.layer(-1, TokenToImageAttention)
    modules |= original_attention_modules("transformer.final_attn_token_to_image", final.ensure_find(fl.Attention))
    modules["transformer.norm_final_attn"] = final.ensure_find(fl.LayerNorm)
    for index, module in enumerate(decoder.ensure_find(MaskUpscaling)):
        if not isinstance(module, fl.Activation):
            modules[f"output_upscaling.{index}"] = module
    for index, mlp in enumerate(decoder.ensure_find(Hypernetworks).layers(fl.MultiLinear)):
        modules |= original_mlp_modules(f"output_hypernetworks_mlps.{index}", mlp)
    modules |= original_mlp_modules(
        "iou_prediction_head", decoder.ensure_find(IoUPrediction).ensure_find(fl.MultiLinear)
    )
    return modules


def original_sam_modules(sam: SegmentAnything) -> dict[str, fl.Module]:
    """Each module prefix of an original `Sam` state dict, paired with the refiners layer that holds its weights
    under the same names (`{prefix}.weight` fills the layer's `weight`)."""
    decoder = original_mask_decoder_modules(sam.mask_decoder)
    return (
        _image_encoder_modules(sam)
        | _prompt_encoder_modules(sam)
        | {f"mask_decoder.{name}": module for name, module in decoder.items()}
    )


def original_sam_parameters(sam: SegmentAnything) -> dict[str, tuple[fl.Module, str]]:
    """Every key of an original `Sam` state dict, paired with the refiners layer and tensor name it fills."""
    parameters: dict[str, tuple[fl.Module, str]] = {}
    for prefix, module in original_sam_modules(sam).items():
        parameters |= module_tensors(prefix, module)
    positions = sam.image_encoder.ensure_find(PositionalEncoding).layer("Parameter", fl.Parameter)
    parameters["image_encoder.pos_embed"] = (positions, "weight")
    point_types = sam.point_encoder.ensure_find(PointTypeEmbedding)
    parameters |= {f"prompt_encoder.{key}": (point_types, name) for key, name in _POINT_TYPES.items()}
    return parameters
