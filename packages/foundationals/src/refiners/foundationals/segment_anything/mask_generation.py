"""Automatic mask generation ("segment everything"), as `segment_anything.SamAutomaticMaskGenerator` does it.

A grid of single foreground points covers the image (and, with `crop_n_layers`, overlapping crops of it, each with
its own embedding); the points are decoded in batches, three masks each; masks whose predicted IoU or stability
(the IoU of the mask thresholded at `+offset` and `-offset`) is too low are dropped, as are masks touching a crop's
inner edge; duplicates are removed by non-maximum suppression of their boxes, within each crop (best predicted IoU
first) and across crops (smallest crop first). `box_nms` is that suppression, in torch alone.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.functional import pad

from refiners.foundationals.segment_anything.model import SegmentAnything

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "GeneratedMask",
    "AutomaticMaskGenerator",
    "box_nms",
    "masks_to_boxes",
    "stability_scores",
    "point_grid",
    "crop_boxes",
]


@dataclass(frozen=True)
class GeneratedMask:
    """A mask of the automatic generation, with what SAM's generator reports of it.

    Attributes:
        mask: `(height, width)` booleans, at the image's size.
        area: Number of pixels of the mask.
        box: The mask's bounding box, `(x, y, width, height)` (inclusive pixel coordinates, as SAM's).
        predicted_iou: The model's prediction of the mask's quality.
        point: The prompt point, `(x, y)` in the image's pixels.
        stability_score: The IoU of the mask's logits thresholded at `+offset` and at `-offset`.
        crop_box: The crop it was found in, `(x, y, width, height)`.
    """

    mask: Tensor
    area: int
    box: tuple[int, int, int, int]
    predicted_iou: float
    point: tuple[float, float]
    stability_score: float
    crop_box: tuple[int, int, int, int]


def box_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression: the indices of the boxes kept, by decreasing score.

    A box is dropped when its IoU with a better-scored kept box is above `iou_threshold`; ties in score keep their
    order. The IoU is `torchvision.ops.nms`'s (areas `(x1 - x0) * (y1 - y0)`, in the boxes' precision).

    Args:
        boxes: `(n, 4)` boxes, `(x0, y0, x1, y1)`.
        scores: `(n,)` scores.
        iou_threshold: The IoU above which the lower-scored box is dropped.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    ordered = boxes[order]
    x0, y0, x1, y1 = ordered.unbind(dim=1)
    areas = (x1 - x0) * (y1 - y0)
    width = (torch.minimum(x1[:, None], x1[None, :]) - torch.maximum(x0[:, None], x0[None, :])).clamp(min=0)
    height = (torch.minimum(y1[:, None], y1[None, :]) - torch.maximum(y0[:, None], y0[None, :])).clamp(min=0)
    intersection = width * height
    # The IoU in the boxes' precision, compared with the threshold in double precision (as torchvision's kernel).
    iou = intersection / (areas[:, None] + areas[None, :] - intersection)
    overlaps = (iou.double() > iou_threshold).tolist()
    suppressed = [False] * len(overlaps)
    kept: list[int] = []
    for index, row in enumerate(overlaps):
        if suppressed[index]:
            continue
        kept.append(index)
        suppressed = [done or over for done, over in zip(suppressed, row, strict=True)]
    return order[torch.tensor(kept, dtype=torch.long, device=boxes.device)]


def masks_to_boxes(masks: Tensor) -> Tensor:
    """`(n, height, width)` boolean masks to their boxes, `(n, 4)` `(x0, y0, x1, y1)` inclusive; zeros if empty."""
    height, width = masks.shape[-2:]
    rows, columns = masks.any(dim=-1), masks.any(dim=-2)
    row_indices = torch.arange(height, device=masks.device)
    column_indices = torch.arange(width, device=masks.device)
    top = torch.where(rows, row_indices, height).amin(dim=-1)
    bottom = torch.where(rows, row_indices, -1).amax(dim=-1)
    left = torch.where(columns, column_indices, width).amin(dim=-1)
    right = torch.where(columns, column_indices, -1).amax(dim=-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    return boxes * rows.any(dim=-1, keepdim=True)


def stability_scores(logits: Tensor, offset: float) -> Tensor:
    """The IoU of each mask's logits thresholded at `+offset` and at `-offset` (SAM's stability score)."""
    intersections = (logits > offset).sum(dim=(-2, -1), dtype=torch.int32)
    unions = (logits > -offset).sum(dim=(-2, -1), dtype=torch.int32)
    return intersections / unions


def point_grid(points_per_side: int) -> Tensor:
    """`(n * n, 2)` points `(x, y)` evenly spaced in `[0, 1]²`, the centers of an `n` x `n` grid (float64)."""
    offset = 1 / (2 * points_per_side)
    # numpy's linspace, to the last bit (SAM's grid): start + i * step, the last point exactly the end.
    step = ((1 - offset) - offset) / max(points_per_side - 1, 1)
    side = torch.arange(points_per_side, dtype=torch.float64) * step + offset
    side[-1] = 1 - offset
    ys, xs = torch.meshgrid(side, side, indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2)


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> list[tuple[int, list[int]]]:
    """The crops, `(layer, [x0, y0, x1, y1])`: the whole image, then `(2^i)²` overlapping crops for layer `i`."""
    crops: list[tuple[int, list[int]]] = [(0, [0, 0, width, height])]
    short_side = min(height, width)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_width = math.ceil((overlap * (per_side - 1) + width) / per_side)
        crop_height = math.ceil((overlap * (per_side - 1) + height) / per_side)
        x0s = [int((crop_width - overlap) * i) for i in range(per_side)]
        y0s = [int((crop_height - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(x0s, y0s):
            crops.append((layer, [x0, y0, min(x0 + crop_width, width), min(y0 + crop_height, height)]))
    return crops


@dataclass
class _Found:
    masks: Tensor
    boxes: Tensor
    ious: Tensor
    points: Tensor
    stability: Tensor

    def filter(self, keep: Tensor) -> "_Found":
        return _Found(self.masks[keep], self.boxes[keep], self.ious[keep], self.points[keep], self.stability[keep])

    @staticmethod
    def cat(parts: "list[_Found]", height: int, width: int) -> "_Found":
        if not parts:
            return _Found(
                torch.zeros(0, height, width, dtype=torch.bool),
                torch.zeros(0, 4, dtype=torch.long),
                torch.zeros(0),
                torch.zeros(0, 2, dtype=torch.float64),
                torch.zeros(0),
            )
        return _Found(*(torch.cat([getattr(part, name) for part in parts]) for name in _Found.__dataclass_fields__))


def _batches(points: Tensor, size: int) -> Iterator[Tensor]:
    for start in range(0, points.shape[0], size):
        yield points[start : start + size]


class AutomaticMaskGenerator:
    """Segment everything in an image, as `segment_anything.SamAutomaticMaskGenerator` (same arguments, defaults
    and outputs; masks are returned as boolean tensors, SAM's `output_mode="binary_mask"`).

    Args:
        sam: The model.
        points_per_side: The grid has `points_per_side²` points (for crops of layer `i`, divided by
            `crop_n_points_downscale_factor^i` on each side).
        points_per_batch: How many points are decoded at once.
        pred_iou_thresh: Masks whose predicted IoU is not above this are dropped.
        stability_score_thresh: Masks whose stability score is below this are dropped.
        stability_score_offset: The logit offset of the stability score.
        box_nms_thresh: Box IoU above which the worse of two masks of a crop is dropped.
        crop_n_layers: Layers of crops (0: the whole image only).
        crop_nms_thresh: Box IoU above which the mask of the larger of two crops is dropped.
        crop_overlap_ratio: How much crops of the first layer overlap, as a share of the image's short side.
        crop_n_points_downscale_factor: See `points_per_side`.
    """

    def __init__(
        self,
        sam: SegmentAnything,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
    ) -> None:
        self.sam = sam
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor

    @torch.no_grad()
    def generate(self, image: "Image.Image") -> list[GeneratedMask]:
        """The masks of `image`, in SAM's order (see the module's documentation)."""
        height, width = image.height, image.width
        found: list[_Found] = []
        crops: list[list[int]] = []
        for layer, crop in crop_boxes(height, width, self.crop_n_layers, self.crop_overlap_ratio):
            part = self._process_crop(image, crop, layer)
            found.append(part)
            crops += [crop] * part.masks.shape[0]
        everything = _Found.cat(found, height, width)
        crop_tensor = torch.tensor(crops, dtype=torch.long).reshape(-1, 4)
        if len(found) > 1:
            # Across crops, the mask of the smaller crop wins (score: one over the crop's area).
            areas = (crop_tensor[:, 2] - crop_tensor[:, 0]) * (crop_tensor[:, 3] - crop_tensor[:, 1])
            keep = box_nms(everything.boxes.float(), 1 / areas, self.crop_nms_thresh)
            everything, crop_tensor = everything.filter(keep), crop_tensor[keep]
        return [
            GeneratedMask(
                mask=everything.masks[index],
                area=int(everything.masks[index].sum()),
                box=_xywh(everything.boxes[index].tolist()),
                predicted_iou=float(everything.ious[index]),
                point=(float(everything.points[index, 0]), float(everything.points[index, 1])),
                stability_score=float(everything.stability[index]),
                crop_box=_xywh(crop_tensor[index].tolist()),
            )
            for index in range(everything.masks.shape[0])
        ]

    def _process_crop(self, image: "Image.Image", crop: list[int], layer: int) -> _Found:
        x0, y0, x1, y1 = crop
        cropped = image.crop((x0, y0, x1, y1))
        crop_size = (y1 - y0, x1 - x0)
        embedding = self.sam.compute_image_embedding(cropped)
        points_per_side = int(self.points_per_side / self.crop_n_points_downscale_factor**layer)
        points = point_grid(points_per_side) * torch.tensor([crop_size[1], crop_size[0]], dtype=torch.float64)
        parts = [
            self._process_batch(embedding, batch, crop, crop_size, (image.height, image.width))
            for batch in _batches(points, self.points_per_batch)
        ]
        found = _Found.cat(parts, image.height, image.width)
        keep = box_nms(found.boxes.float(), found.ious, self.box_nms_thresh)
        found = found.filter(keep)
        offset = torch.tensor([x0, y0, x0, y0])
        return _Found(found.masks, found.boxes + offset, found.ious, found.points + offset[:2], found.stability)

    def _process_batch(
        self,
        embedding: Tensor,
        points: Tensor,
        crop: list[int],
        crop_size: tuple[int, int],
        image_size: tuple[int, int],
    ) -> _Found:
        # One foreground point per prompt, in float64 as SAM's generator gives them (`predict` casts to float32).
        coordinates, types = self.sam.prompt_points(crop_size, foreground_points=points[:, None, :])
        low_res_masks, ious = self.sam.decode(embedding, coordinates, types, multimask_output=True)
        logits = self.sam.postprocess_masks(low_res_masks, crop_size).flatten(0, 1)
        ious = ious.flatten(0, 1)
        points = points.repeat_interleave(low_res_masks.shape[1], dim=0)
        keep = ious > self.pred_iou_thresh if self.pred_iou_thresh > 0 else torch.ones_like(ious, dtype=torch.bool)
        logits, ious, points = logits[keep], ious[keep], points[keep]
        stability = stability_scores(logits, self.stability_score_offset)
        if self.stability_score_thresh > 0:
            keep = stability >= self.stability_score_thresh
            logits, ious, points, stability = logits[keep], ious[keep], points[keep], stability[keep]
        masks = logits > 0
        boxes = masks_to_boxes(masks)
        keep = ~_near_crop_edge(boxes, crop, image_size)
        masks, boxes = masks[keep], boxes[keep]
        x0, y0, x1, y1 = crop
        height, width = image_size
        masks = pad(masks, (x0, width - x1, y0, height - y1), value=False)
        return _Found(masks.cpu(), boxes.cpu(), ious[keep].cpu(), points[keep].cpu(), stability[keep].cpu())


def _near_crop_edge(boxes: Tensor, crop: list[int], image_size: tuple[int, int], tolerance: float = 20.0) -> Tensor:
    """Boxes within `tolerance` pixels of an edge of the crop that is not an edge of the image."""
    x0, y0, _, _ = crop
    height, width = image_size
    uncropped = (boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)).float()
    crop_tensor = torch.tensor(crop, dtype=torch.float32, device=boxes.device)
    image_tensor = torch.tensor([0, 0, width, height], dtype=torch.float32, device=boxes.device)
    near_crop = torch.isclose(uncropped, crop_tensor[None], atol=tolerance, rtol=0)
    near_image = torch.isclose(uncropped, image_tensor[None], atol=tolerance, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def _xywh(box: list[int]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return x0, y0, x1 - x0, y1 - y0
