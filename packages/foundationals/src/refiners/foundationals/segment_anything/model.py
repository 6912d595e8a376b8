"""`SegmentAnything`: the image encoder, the prompt encoders and the mask decoder, and how a user prompts them.

As in the paper's figure: an image goes once through the heavy image encoder (`compute_image_embedding`); then any
number of prompts (foreground and background points, a box, a low-resolution mask) are encoded and decoded against
that embedding, cheaply, into masks and their predicted IoU (`predict`). Both follow `segment_anything.SamPredictor`
(`set_image` then `predict`): the image resized to `image_size` on its longest side with Pillow's bilinear filter,
normalized with ImageNet's pixel statistics, zero-padded at the bottom and right; prompts given in the original
image's pixels; masks returned at the original image's size.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.functional import interpolate, pad

import refiners.fluxion.layers as fl
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors
from refiners.foundationals.segment_anything.image_encoder import SAMViT
from refiners.foundationals.segment_anything.mask_decoder import MaskDecoder
from refiners.foundationals.segment_anything.prompt_encoder import (
    MaskEncoder,
    NoMaskEmbedding,
    PointEncoder,
    PointType,
)

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "Points",
    "SegmentAnything",
    "SegmentAnythingB",
    "SegmentAnythingL",
    "SegmentAnythingH",
    "resized_size",
]

PIXEL_MEAN = (123.675, 116.28, 103.53)
"""SAM's per-channel pixel mean (ImageNet's, in 0-255 units)."""
PIXEL_STD = (58.395, 57.12, 57.375)
"""SAM's per-channel pixel standard deviation (ImageNet's, in 0-255 units)."""

Points = Sequence[tuple[float, float]] | Tensor
"""Prompt points in the original image's pixels, `(x, y)`: a sequence (one prompt), or a tensor `(points, 2)` or
`(prompts, points, 2)` (one row per prompt, decoded as a batch)."""


def resized_size(height: int, width: int, longest_side: int) -> tuple[int, int]:
    """The size, `(height, width)`, of an image resized to `longest_side` on its longest side (rounded as SAM does)."""
    scale = longest_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _point_rows(points: Points | None, what: str) -> Tensor | None:
    if points is None:
        return None
    rows = torch.as_tensor(points, dtype=torch.float64) if not isinstance(points, Tensor) else points.double()
    if rows.dim() == 2:
        rows = rows.unsqueeze(0)
    if rows.dim() != 3 or rows.shape[-1] != 2:
        raise ValueError(
            f"{what} must be (x, y) pairs: a sequence, or a tensor of shape (points, 2) or (prompts, points, 2); "
            f"got shape {tuple(rows.shape)}"
        )
    return rows


class SegmentAnything(fl.Chain):
    """Segment Anything (Kirillov et al., 2023): promptable segmentation of any image.

    The children are the paper's boxes: `SAMViT` (the image encoder), `PointEncoder` and `MaskEncoder` (the prompt
    encoder, with `NoMaskEmbedding` for prompts without a mask) and `MaskDecoder`. The model is not called as a
    whole: `compute_image_embedding` runs the image encoder, `predict` the rest. The presets are `SegmentAnythingB`,
    `SegmentAnythingL` and `SegmentAnythingH`; other sizes are these arguments.

    Args:
        embedding_dim: Width of the ViT.
        num_layers: Number of ViT layers.
        num_heads: Number of ViT attention heads.
        global_attention_indices: The ViT layers with global attention (the others attend within windows).
        window_size: Side of the ViT's attention windows, in patches.
        image_size: Side of the model's input (SAM: 1024); the image embedding is `image_size / patch_size` wide.
        patch_size: Side of the ViT's patches.
        prompt_embedding_dim: Width of the image embedding, of the prompt tokens and of the mask decoder.
        mask_encoder_channels: Hidden channels of the mask prompt's encoder.
        decoder_depth: Number of two-way transformer blocks of the mask decoder.
        decoder_num_heads: Number of attention heads of the mask decoder.
        decoder_feedforward_dim: Hidden size of the mask decoder's MLPs.
        iou_hidden_dim: Hidden size of the IoU prediction's MLP.
        num_multimask_outputs: Number of masks of the multimask output.
        device: Where the weights live.
        dtype: The weights' dtype.

    Example:
        ```py
        import torch
        from PIL import Image
        from refiners.foundationals.segment_anything import SegmentAnything
        from refiners.foundationals.segment_anything.presets import TINY

        sam = TINY.build([SegmentAnything])  # toy sizes, random weights
        image = Image.new("RGB", (96, 64))
        with torch.no_grad():
            masks, scores, low_res_masks = sam.predict(image, foreground_points=[(40, 30)], box_points=[(10, 10), (80, 60)])
        assert masks.shape == (1, 3, 64, 96) and masks.dtype == torch.bool and scores.shape == (1, 3)
        assert low_res_masks.shape == (1, 3, 32, 32)
        ```
    """

    def __init__(
        self,
        embedding_dim: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        global_attention_indices: tuple[int, ...] = (2, 5, 8, 11),
        window_size: int = 14,
        image_size: int = 1024,
        patch_size: int = 16,
        prompt_embedding_dim: int = 256,
        mask_encoder_channels: int = 16,
        decoder_depth: int = 2,
        decoder_num_heads: int = 8,
        decoder_feedforward_dim: int = 2048,
        iou_hidden_dim: int = 256,
        num_multimask_outputs: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.global_attention_indices = tuple(global_attention_indices)
        self.window_size = window_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.prompt_embedding_dim = prompt_embedding_dim
        self.mask_encoder_channels = mask_encoder_channels
        self.decoder_depth = decoder_depth
        self.decoder_num_heads = decoder_num_heads
        self.decoder_feedforward_dim = decoder_feedforward_dim
        self.iou_hidden_dim = iou_hidden_dim
        self.num_multimask_outputs = num_multimask_outputs
        super().__init__(
            SAMViT(
                embedding_dim,
                num_layers,
                num_heads,
                self.global_attention_indices,
                window_size,
                image_size,
                patch_size,
                output_dim=prompt_embedding_dim,
                device=device,
                dtype=dtype,
            ),
            PointEncoder(prompt_embedding_dim, image_size, device=device, dtype=dtype),
            MaskEncoder(prompt_embedding_dim, mask_encoder_channels, device=device, dtype=dtype),
            NoMaskEmbedding(prompt_embedding_dim, device=device, dtype=dtype),
            MaskDecoder(
                prompt_embedding_dim,
                num_multimask_outputs,
                depth=decoder_depth,
                num_heads=decoder_num_heads,
                feedforward_dim=decoder_feedforward_dim,
                iou_hidden_dim=iou_hidden_dim,
                device=device,
                dtype=dtype,
            ),
        )

    def forward(self, *args: Any) -> Any:
        raise TypeError(
            f"{type(self).__name__} is not called as a whole: use `compute_image_embedding(image)` for the image "
            "embedding and `predict(image or embedding, foreground_points=..., ...)` for masks"
        )

    # -- components ----------------------------------------------------------------------------------------------

    @property
    def image_encoder(self) -> SAMViT:
        """The ViT image encoder (it may be wrapped by an adapter: the first `SAMViT` of the tree)."""
        return self.ensure_find(SAMViT)

    @property
    def point_encoder(self) -> PointEncoder:
        return self.ensure_find(PointEncoder)

    @property
    def mask_encoder(self) -> MaskEncoder:
        return self.ensure_find(MaskEncoder)

    @property
    def no_mask_embedding(self) -> NoMaskEmbedding:
        return self.ensure_find(NoMaskEmbedding)

    @property
    def mask_decoder(self) -> MaskDecoder:
        return self.ensure_find(MaskDecoder)

    @property
    def grid_size(self) -> int:
        """Side of the image embedding (SAM: 64)."""
        return self.image_size // self.patch_size

    @property
    def config(self) -> ModelConfig:
        """This model's constructor call, as converters record it next to its weights."""
        preset = type(self) in (SegmentAnythingB, SegmentAnythingL, SegmentAnythingH)
        return ModelConfig(type(self).__name__, {} if preset else self._arguments())

    def _arguments(self) -> dict[str, Any]:
        names = [
            "embedding_dim",
            "num_layers",
            "num_heads",
            "global_attention_indices",
            "window_size",
            "image_size",
            "patch_size",
            "prompt_embedding_dim",
            "mask_encoder_channels",
            "decoder_depth",
            "decoder_num_heads",
            "decoder_feedforward_dim",
            "iou_hidden_dim",
            "num_multimask_outputs",
        ]
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_safetensors(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "SegmentAnything":
        """Build the model its file records (as `refiners-convert sam` writes it) and load the weights.

        Args:
            path: The `.safetensors` file.
            device: Where the weights go.
            dtype: The weights' dtype (default: the file's).
        """
        config = ModelConfig.from_metadata(load_metadata_from_safetensors(path))
        if config is None:
            raise ValueError(
                f"{path} records no model (no refiners.model.* metadata): build the model at its sizes and call "
                "`load_from_safetensors`, or convert the checkpoint again with `refiners-convert sam`"
            )
        classes = (SegmentAnything, SegmentAnythingB, SegmentAnythingL, SegmentAnythingH)
        model = config.build(classes, device="meta", dtype=dtype).load_from_safetensors(path)
        return model.to(device=device) if device is not None else model

    # -- images --------------------------------------------------------------------------------------------------

    def preprocess(self, image: "Image.Image") -> Tensor:
        """The model's input for `image`: resized to `image_size` on its longest side (Pillow's bilinear filter, as
        SAM's `ResizeLongestSide`), normalized, zero-padded at the bottom and right: `(1, 3, image_size, image_size)`.
        """
        from PIL import Image

        rgb = image.convert("RGB")
        height, width = resized_size(rgb.height, rgb.width, self.image_size)
        resized = rgb.resize((width, height), Image.Resampling.BILINEAR)
        pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
        x = pixels.permute(2, 0, 1).unsqueeze(0).to(device=self.device, dtype=torch.float32)
        mean = torch.tensor(PIXEL_MEAN, device=self.device).reshape(1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=self.device).reshape(1, 3, 1, 1)
        x = (x - mean) / std
        return pad(x, (0, self.image_size - width, 0, self.image_size - height)).to(self.dtype)

    def compute_image_embedding(self, image: "Image.Image") -> Tensor:
        """The image embedding of `image`, `(1, prompt_embedding_dim, grid_size, grid_size)`, to `predict` with.

        It is the output of the first child: the image encoder, or an adapter injected on it (which may change what
        the embedding holds, e.g. HQ-SAM's).
        """
        return self.layer(0, fl.Module)(self.preprocess(image))

    def postprocess_masks(self, low_res_masks: Tensor, original_size: tuple[int, int]) -> Tensor:
        """Low-resolution logits `(batch, masks, 4h, 4w)` to logits at the original image's size, as SAM does:
        upscaled to the model's input, cropped to the resized image, resized to `original_size` (bilinear)."""
        height, width = resized_size(*original_size, self.image_size)
        masks = interpolate(low_res_masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return interpolate(masks[..., :height, :width], original_size, mode="bilinear", align_corners=False)

    # -- prompts -------------------------------------------------------------------------------------------------

    def prompt_points(
        self,
        original_size: tuple[int, int],
        foreground_points: Points | None = None,
        background_points: Points | None = None,
        box_points: Points | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The coordinates, in the model's input frame and in float64, and the types of every prompt point:
        `(prompts, points, 2)` and `(prompts, points)`. Foreground points come first, then background points,
        then the box's two corners, or a padding point when there is no box (as SAM's prompt encoder)."""
        groups: list[tuple[Tensor, list[PointType]]] = []
        for points, point_type, what in (
            (foreground_points, PointType.FOREGROUND, "foreground_points"),
            (background_points, PointType.BACKGROUND, "background_points"),
        ):
            if (rows := _point_rows(points, what)) is not None:
                groups.append((rows, [point_type] * rows.shape[1]))
        if (box := _point_rows(box_points, "box_points")) is not None:
            if box.shape[1] != 2:
                raise ValueError(f"box_points are two corners, (x0, y0) and (x1, y1), got {box.shape[1]} points")
            groups.append((box, [PointType.BOX_TOP_LEFT, PointType.BOX_BOTTOM_RIGHT]))
        batch = max((rows.shape[0] for rows, _ in groups), default=1)
        if any(rows.shape[0] not in (1, batch) for rows, _ in groups):
            raise ValueError(
                f"the prompts' batch sizes differ: {[rows.shape[0] for rows, _ in groups]}; give the same number of "
                "prompts (rows) to each kind of point, or one row for all"
            )
        height, width = original_size
        new_height, new_width = resized_size(height, width, self.image_size)
        scale = torch.tensor([new_width / width, new_height / height], dtype=torch.float64)
        coordinates = [rows.expand(batch, -1, -1) * scale for rows, _ in groups]
        types = [torch.tensor(kinds).expand(batch, -1) for _, kinds in groups]
        if box is None and groups:
            coordinates.append(torch.zeros(batch, 1, 2, dtype=torch.float64))
            types.append(torch.full((batch, 1), int(PointType.PADDING)))
        if not coordinates:
            return torch.zeros(batch, 0, 2, dtype=torch.float64), torch.zeros(batch, 0, dtype=torch.long)
        return torch.cat(coordinates, dim=1), torch.cat(types, dim=1)

    def decode(
        self,
        image_embedding: Tensor,
        coordinates: Tensor,
        types: Tensor,
        low_res_mask: Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Run the prompt encoders and the mask decoder: `(low_res_masks, iou_predictions)`.

        Args:
            image_embedding: `(1, prompt_embedding_dim, grid_size, grid_size)`, from `compute_image_embedding`.
            coordinates: `(prompts, points, 2)`, in the model's input frame (see `prompt_points`).
            types: `(prompts, points)`, `PointType` values.
            low_res_mask: `(prompts or 1, 1, 4 * grid_size, 4 * grid_size)` logits, e.g. a previous prediction.
            multimask_output: Decode the multimask output (all masks but the first) or the single mask.
        """
        sparse = self.point_encoder(coordinates.to(self.device), types.to(self.device))
        dense = (
            self.mask_encoder(low_res_mask.to(device=self.device, dtype=self.dtype))
            if low_res_mask is not None
            else self.no_mask_embedding()
        )
        if sparse.shape[0] == 1 and dense.shape[0] > 1:  # mask prompts alone: one row of (no) points for each
            sparse = sparse.expand(dense.shape[0], -1, -1)
        self.mask_decoder.set_inputs(
            image_embedding,
            dense,
            self.point_encoder.dense_positional_embedding(self.grid_size).to(self.dtype),
            multimask_output,
        )
        return self.mask_decoder(sparse)

    def predict(
        self,
        input: "Image.Image | Tensor",
        foreground_points: Points | None = None,
        background_points: Points | None = None,
        box_points: Points | None = None,
        low_res_mask: Tensor | None = None,
        multimask_output: bool = True,
        binarize: bool = True,
        original_size: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Masks for prompts on an image, as `segment_anything.SamPredictor`'s `set_image` then `predict`.

        Args:
            input: The image, or its embedding (from `compute_image_embedding`; then give `original_size`).
            foreground_points: Points on the object, `(x, y)` in the image's pixels (see `Points`).
            background_points: Points off the object.
            box_points: The box around the object, as its corners `[(x0, y0), (x1, y1)]` (or `(prompts, 2, 2)`).
            low_res_mask: A mask prompt, `(prompts or 1, 1, 4 * grid_size, 4 * grid_size)` logits (e.g. a previous
                prediction's `low_res_masks`, one mask per prompt).
            multimask_output: Three masks per prompt (for ambiguous prompts, such as one point) or one.
            binarize: Return boolean masks (logits above 0), else the logits.
            original_size: `(height, width)` of the image, when `input` is its embedding.

        Returns:
            `(masks, iou_predictions, low_res_masks)`: `(prompts, masks, height, width)` at the image's size,
            `(prompts, masks)`, and `(prompts, masks, 4 * grid_size, 4 * grid_size)` logits.
        """
        if isinstance(input, Tensor):
            if original_size is None:
                raise ValueError("predict needs original_size=(height, width) of the image when given its embedding")
            image_embedding = input
        else:
            original_size = (input.height, input.width)
            image_embedding = self.compute_image_embedding(input)
        coordinates, types = self.prompt_points(original_size, foreground_points, background_points, box_points)
        # SamPredictor turns the transformed coordinates into float32 before encoding them.
        low_res_masks, iou_predictions = self.decode(
            image_embedding, coordinates.float(), types, low_res_mask, multimask_output
        )
        masks = self.postprocess_masks(low_res_masks, original_size)
        return (masks > 0 if binarize else masks), iou_predictions, low_res_masks


class SegmentAnythingB(SegmentAnything):
    """SAM ViT-B (`sam_vit_b_01ec64.pth`): 768 wide, 12 layers, 12 heads, global attention at layers 2, 5, 8, 11.

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(768, 12, 12, (2, 5, 8, 11), device=device, dtype=dtype)


class SegmentAnythingL(SegmentAnything):
    """SAM ViT-L (`sam_vit_l_0b3195.pth`): 1024 wide, 24 layers, 16 heads, global attention at 5, 11, 17, 23.

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(1024, 24, 16, (5, 11, 17, 23), device=device, dtype=dtype)


class SegmentAnythingH(SegmentAnything):
    """SAM ViT-H (`sam_vit_h_4b8939.pth`): 1280 wide, 32 layers, 16 heads, global attention at 7, 15, 23, 31.

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(1280, 32, 16, (7, 15, 23, 31), device=device, dtype=dtype)
