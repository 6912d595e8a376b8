"""HQSAMAdapter against `segment_anything_hq`: the reference is built from its classes at toy sizes (SAM's weights
those of the plain reference, HQ-SAM's own drawn at random, the zero-initialized ones included), saved as the
original `.pth` is, and converted with `refiners-convert hq-sam`'s and `sam`'s code."""

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sam_references import TINY, build_hq_reference, build_reference, convert_reference, save_reference
from segment_anything_hq import SamPredictor as HQSamPredictor
from torch import Tensor

from refiners.adapters.hq_sam import HQSAMAdapter
from refiners.converters.segment_anything import convert_hq_sam_file
from refiners.foundationals.segment_anything import SegmentAnything

IMAGE_SIZE = (90, 150)
PROMPTS: dict[str, dict[str, Any]] = {
    "point": {"foreground_points": [(40.0, 30.0)]},
    "point and box": {"foreground_points": [(40.0, 30.0)], "box_points": [(10.0, 10.0), (120.0, 70.0)]},
}


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[SegmentAnything, HQSAMAdapter, HQSamPredictor, Image.Image]:
    folder = tmp_path_factory.mktemp("hq_sam")
    reference = build_reference(TINY)
    _, sam = convert_reference(reference, folder)
    hq_reference = build_hq_reference(reference)
    converted = convert_hq_sam_file(save_reference(hq_reference, folder / "sam_hq.pth"), folder / "hq.safetensors")
    adapter = HQSAMAdapter(target=sam, weights=converted.path)
    array = np.random.default_rng(0).integers(0, 256, (*IMAGE_SIZE, 3), dtype=np.uint8)
    predictor = HQSamPredictor(hq_reference)  # pyright: ignore[reportArgumentType] (segment_anything_hq's Sam)
    predictor.set_image(array)
    return sam, adapter, predictor, Image.fromarray(array)


def _predict(sam: SegmentAnything, image: Image.Image, prompt: str, multimask_output: bool) -> tuple[Tensor, ...]:
    with torch.no_grad():
        return sam.predict(image, **PROMPTS[prompt], multimask_output=multimask_output, binarize=False)


@pytest.mark.parametrize("hq_mask_only", [False, True])
@pytest.mark.parametrize("multimask_output", [True, False])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_hq_sam_matches_segment_anything_hq(
    setup: tuple[SegmentAnything, HQSAMAdapter, HQSamPredictor, Image.Image],
    prompt: str,
    multimask_output: bool,
    hq_mask_only: bool,
) -> None:
    sam, adapter, predictor, image = setup
    plain = _predict(sam, image, prompt, multimask_output)
    foreground, box = PROMPTS[prompt]["foreground_points"], PROMPTS[prompt].get("box_points")
    logits, iou, low_res = predictor.predict(
        point_coords=np.array(foreground),
        point_labels=np.ones(len(foreground)),
        box=np.array(box, dtype=float).reshape(4) if box else None,
        multimask_output=multimask_output,
        return_logits=True,
        hq_token_only=hq_mask_only,
    )
    adapter.hq_mask_only = hq_mask_only
    adapter.inject()
    try:
        ours = _predict(sam, image, prompt, multimask_output)
    finally:
        adapter.eject()
    for actual, expected, what in zip(ours, (logits, iou, low_res), ("masks", "IoU", "low-res masks"), strict=True):
        expected = torch.as_tensor(expected)
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual[0], expected, atol=1e-4 * scale, rtol=0, msg=lambda m, w=what: f"{w}: {m}")
    # HQ-SAM moves the output (one mask per prompt, not SAM's), and ejecting gives SAM back exactly.
    assert ours[0].shape[1] == 1 and not torch.allclose(ours[0][:, 0], plain[0][:, 0], atol=1e-2)
    for again, before in zip(_predict(sam, image, prompt, multimask_output), plain, strict=True):
        assert torch.equal(again, before)


def test_inject_eject_restores_the_tree(
    setup: tuple[SegmentAnything, HQSAMAdapter, HQSamPredictor, Image.Image],
) -> None:
    sam, adapter, _, image = setup
    keys, text = list(sam.state_dict()), repr(sam)
    adapter.inject()
    assert "HQMaskPrediction" in repr(sam)
    with torch.no_grad():
        embedding = sam.compute_image_embedding(image)
    assert embedding.shape[1] == sam.prompt_embedding_dim + sam.embedding_dim  # SAM's channels, then the ViT's
    with pytest.raises(ValueError, match="already injected"):
        adapter.inject()
    adapter.eject()
    assert list(sam.state_dict()) == keys and repr(sam) == text


def test_weights_that_do_not_fit_are_listed(
    setup: tuple[SegmentAnything, HQSAMAdapter, HQSamPredictor, Image.Image],
) -> None:
    sam, adapter, _, _ = setup
    tensors = adapter.state_dict()
    tensors["HQTokenAdapter.HQToken.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected \['HQTokenAdapter.HQToken.extra'\]"):
        HQSAMAdapter(target=sam, weights=tensors)


def test_docstring_example_runs() -> None:
    import inspect
    import re
    import textwrap

    (example,) = re.findall(r"```py\n(.*?)```", inspect.getdoc(HQSAMAdapter) or "", flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), "HQSAMAdapter's example", "exec"), {"__name__": "example"})
