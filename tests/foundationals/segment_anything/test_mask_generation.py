"""AutomaticMaskGenerator against `segment_anything.SamAutomaticMaskGenerator`, on a toy SAM converted from the
reference (see `sam_references`), and `box_nms` against `torchvision.ops.nms`."""

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sam_references import TINY, build_reference, convert_reference
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from torchvision.ops import nms

from refiners.foundationals.segment_anything import AutomaticMaskGenerator, SegmentAnything, box_nms


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Sam, SegmentAnything]:
    reference = build_reference(TINY)
    _, sam = convert_reference(reference, tmp_path_factory.mktemp("sam"))
    return reference, sam


# Random weights predict low IoUs and unstable masks: the thresholds are lowered so that many masks go through
# every stage (filters, edge rejection, NMS within and across crops).
SETTINGS: dict[str, dict[str, Any]] = {
    "default crops": {
        "points_per_side": 8,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
        "box_nms_thresh": 0.95,
    },
    "filtered": {
        "points_per_side": 8,
        "points_per_batch": 20,
        "pred_iou_thresh": 0.2,
        "stability_score_offset": 0.05,
        "stability_score_thresh": 0.3,
        "box_nms_thresh": 0.98,
    },
    "one crop layer": {
        "points_per_side": 6,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
        "crop_n_layers": 1,
        "box_nms_thresh": 0.9,
        "crop_nms_thresh": 0.9,
    },
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_masks_match_sam_automatic_mask_generator(models: tuple[Sam, SegmentAnything], setting: str) -> None:
    reference, sam = models
    array = np.random.default_rng(1).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    expected: list[dict[str, Any]] = SamAutomaticMaskGenerator(reference, **SETTINGS[setting]).generate(array)
    actual = AutomaticMaskGenerator(sam, **SETTINGS[setting]).generate(Image.fromarray(array))
    assert len(expected) >= 2, "the setting should keep several masks to compare"
    assert len(actual) == len(expected)
    for ours, theirs in zip(actual, expected, strict=True):
        assert np.array_equal(ours.mask.numpy(), theirs["segmentation"])
        assert ours.area == theirs["area"]
        assert list(ours.box) == theirs["bbox"]
        assert list(ours.crop_box) == theirs["crop_box"]
        assert [list(ours.point)] == theirs["point_coords"]
        assert ours.predicted_iou == pytest.approx(theirs["predicted_iou"], abs=1e-4 * 50)
        assert ours.stability_score == pytest.approx(theirs["stability_score"], abs=1e-6)


def test_box_nms_matches_torchvision() -> None:
    generator = torch.Generator().manual_seed(0)
    corners = torch.randint(0, 100, (300, 2, 2), generator=generator).float()
    boxes = torch.cat([corners.amin(dim=1), corners.amax(dim=1)], dim=1)
    scores = torch.rand(300, generator=generator)
    for threshold in (0.1, 0.5, 0.7, 0.95):
        assert torch.equal(box_nms(boxes, scores, threshold), nms(boxes, scores, threshold))
    assert box_nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
