"""`refiners-convert sam --check`: the converted model against `segment_anything`'s `Sam` on a random input.

`segment_anything` (Meta's package; it imports torchvision) is imported here only, lazily: it is a reference, never a
runtime dependency. The reference is built at the checkpoint's sizes with the settings of
`segment_anything.build_sam._build_sam` and given the checkpoint's tensors; both models then encode one random
image and decode one random point prompt (multimask output), and the largest differences are reported.
"""

import importlib.util
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from refiners.converters.reference_check import Comparison, compare_outputs
from refiners.converters.segment_anything import read_checkpoint
from refiners.foundationals.segment_anything import SegmentAnything

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

__all__ = ["missing_segment_anything", "segment_anything_reference", "compare_sam"]


def missing_segment_anything() -> bool:
    """Whether `segment_anything` (the reference of `--check`) is not installed."""
    return importlib.util.find_spec("segment_anything") is None


def segment_anything_reference(arguments: Mapping[str, Any], *, hq: bool = False) -> "Sam":
    """`segment_anything`'s `Sam` at `SegmentAnything`'s constructor `arguments`, as its builders set it up (random
    weights, eval mode); with `hq`, `segment_anything_hq`'s, whose mask decoder is `MaskDecoderHQ`."""
    import importlib

    modeling: Any = importlib.import_module("segment_anything_hq.modeling" if hq else "segment_anything.modeling")
    arguments = SegmentAnything(**arguments, device="meta")._arguments()
    prompt_dim, image_size = arguments["prompt_embedding_dim"], arguments["image_size"]
    grid_size = image_size // arguments["patch_size"]
    decoder = modeling.MaskDecoderHQ if hq else modeling.MaskDecoder
    sam = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=arguments["num_layers"],
            embed_dim=arguments["embedding_dim"],
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arguments["num_heads"],
            patch_size=arguments["patch_size"],
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(arguments["global_attention_indices"]),
            window_size=arguments["window_size"],
            out_chans=prompt_dim,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid_size, grid_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=arguments["mask_encoder_channels"],
        ),
        mask_decoder=decoder(
            num_multimask_outputs=arguments["num_multimask_outputs"],
            transformer=modeling.TwoWayTransformer(
                depth=arguments["decoder_depth"],
                embedding_dim=prompt_dim,
                mlp_dim=arguments["decoder_feedforward_dim"],
                num_heads=arguments["decoder_num_heads"],
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arguments["iou_hidden_dim"],
            **({"vit_dim": arguments["embedding_dim"]} if hq else {}),
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def compare_sam(source: str | Path, converted: str | Path) -> dict[str, Comparison]:
    """The converted model's image embedding and masks against the reference's, on a random image and point.

    Args:
        source: The checkpoint (what `refiners-convert sam --from` read).
        converted: The converted `.safetensors` file.
    """
    sam = SegmentAnything.from_safetensors(converted)
    reference = segment_anything_reference(sam._arguments())
    tensors = read_checkpoint(source)
    reference.load_state_dict({key: tensors[key] for key in tensors}, strict=True)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, sam.image_size, sam.image_size, generator=generator)
    point = torch.rand(1, 1, 2, generator=generator, dtype=torch.float64) * sam.image_size
    with torch.no_grad():
        expected_embedding = reference.image_encoder(image)
        embedding = sam.image_encoder(image.to(sam.dtype))
        sparse, dense = reference.prompt_encoder(points=(point.float(), torch.ones(1, 1)), boxes=None, masks=None)
        expected_masks, _ = reference.mask_decoder(
            image_embeddings=expected_embedding,
            image_pe=reference.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        coordinates, types = sam.prompt_points((sam.image_size, sam.image_size), foreground_points=point)
        masks, _ = sam.decode(expected_embedding.to(sam.dtype), coordinates.float(), types)
    return {
        "image embedding": compare_outputs(expected_embedding, embedding.float()),
        "masks": compare_outputs(expected_masks, masks.float()),
    }
