"""SegmentAnything against `segment_anything`'s `Sam` and `SamPredictor`: the reference is built from its real
config (at toy sizes; the ViT-B image encoder at its real widths in one test), random weights, saved as Meta's `.pth`
files are, converted with `refiners-convert sam`'s code."""

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sam_references import TINY, build_reference, convert_reference, randomize, save_reference
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import Sam
from torch import Tensor

from refiners.converters.segment_anything import convert_sam_file
from refiners.fluxion.model_config import ModelConfig
from refiners.foundationals.segment_anything import (
    SegmentAnything,
    SegmentAnythingB,
    SegmentAnythingH,
    SegmentAnythingL,
)

TOLERANCE = 1e-4  # of the reference output's scale
IMAGE_SIZE = (90, 150)  # height, width: not square, not the model's size, so resizing and padding run


def assert_close_to(actual: Tensor, expected: Tensor, what: str) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=TOLERANCE * scale, rtol=0, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def reference() -> Sam:
    return build_reference(TINY)


@pytest.fixture(scope="module")
def sam(reference: Sam, tmp_path_factory: pytest.TempPathFactory) -> SegmentAnything:
    _, model = convert_reference(reference, tmp_path_factory.mktemp("sam"))
    return model


@pytest.fixture(scope="module")
def image_array() -> np.ndarray[Any, Any]:
    return np.random.default_rng(0).integers(0, 256, (*IMAGE_SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictor(reference: Sam, image_array: np.ndarray[Any, Any]) -> SamPredictor:
    predictor = SamPredictor(reference)
    predictor.set_image(image_array)
    return predictor


@pytest.fixture(scope="module")
def embedding(sam: SegmentAnything, image_array: np.ndarray[Any, Any]) -> Tensor:
    with torch.no_grad():
        return sam.compute_image_embedding(Image.fromarray(image_array))


def test_image_embedding_matches_reference(embedding: Tensor, predictor: SamPredictor) -> None:
    assert predictor.features is not None
    assert_close_to(embedding, predictor.features, "image embedding")


PROMPTS: dict[str, dict[str, Any]] = {
    "one point": {"foreground_points": [(40.0, 30.0)]},
    "points": {"foreground_points": [(40.0, 30.0), (100.0, 60.0)], "background_points": [(10.0, 80.0)]},
    "box": {"box_points": [(10.0, 10.0), (120.0, 70.0)]},
    "point and box": {"foreground_points": [(40.0, 30.0)], "box_points": [(10.0, 10.0), (120.0, 70.0)]},
}


def _reference_prompt(prompt: dict[str, Any]) -> dict[str, Any]:
    foreground, background = prompt.get("foreground_points", []), prompt.get("background_points", [])
    box = prompt.get("box_points")
    points = foreground + background
    return {
        "point_coords": np.array(points, dtype=float) if points else None,
        "point_labels": np.array([1] * len(foreground) + [0] * len(background)) if points else None,
        "box": np.array(box, dtype=float).reshape(4) if box else None,
    }


@pytest.mark.parametrize("multimask_output", [True, False])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_predict_matches_sam_predictor(
    sam: SegmentAnything,
    predictor: SamPredictor,
    embedding: Tensor,
    prompt: str,
    multimask_output: bool,
) -> None:
    arguments = _reference_prompt(PROMPTS[prompt])
    logits, iou, low_res = predictor.predict(**arguments, multimask_output=multimask_output, return_logits=True)
    binary, _, _ = predictor.predict(**arguments, multimask_output=multimask_output)
    with torch.no_grad():
        ours_logits, ours_iou, ours_low_res = sam.predict(
            embedding,
            **PROMPTS[prompt],
            multimask_output=multimask_output,
            binarize=False,
            original_size=IMAGE_SIZE,
        )
        ours_binary, _, _ = sam.predict(
            embedding, **PROMPTS[prompt], multimask_output=multimask_output, original_size=IMAGE_SIZE
        )
    assert ours_logits.shape == (1, 3 if multimask_output else 1, *IMAGE_SIZE)
    assert_close_to(ours_logits[0], torch.as_tensor(logits), "mask logits")
    assert_close_to(ours_iou[0], torch.as_tensor(iou), "IoU predictions")
    assert_close_to(ours_low_res[0], torch.as_tensor(low_res), "low-resolution logits")
    assert torch.equal(ours_binary[0], torch.as_tensor(binary))


def test_predict_on_the_image_computes_its_embedding(
    sam: SegmentAnything, embedding: Tensor, image_array: np.ndarray[Any, Any]
) -> None:
    with torch.no_grad():
        from_image = sam.predict(Image.fromarray(image_array), **PROMPTS["points"])
        from_embedding = sam.predict(embedding, **PROMPTS["points"], original_size=IMAGE_SIZE)
    for actual, expected in zip(from_image, from_embedding, strict=True):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_mask_prompt_matches_sam_predictor(sam: SegmentAnything, predictor: SamPredictor, embedding: Tensor) -> None:
    _, _, low_res = predictor.predict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]))
    mask_input = np.asarray(low_res)[:1]  # SamPredictor.predict returns numpy arrays (it is annotated as tensors)
    logits, iou, _ = predictor.predict(
        point_coords=np.array([[100.0, 60.0]]),
        point_labels=np.array([1]),
        mask_input=mask_input,
        multimask_output=False,
        return_logits=True,
    )
    with torch.no_grad():
        ours_logits, ours_iou, _ = sam.predict(
            embedding,
            foreground_points=[(100.0, 60.0)],
            low_res_mask=torch.as_tensor(mask_input)[None],
            multimask_output=False,
            binarize=False,
            original_size=IMAGE_SIZE,
        )
    assert_close_to(ours_logits[0], torch.as_tensor(logits), "mask logits with a mask prompt")
    assert_close_to(ours_iou[0], torch.as_tensor(iou), "IoU predictions with a mask prompt")


def test_mask_prompts_alone_batched(sam: SegmentAnything, predictor: SamPredictor, embedding: Tensor) -> None:
    _, _, low_res = predictor.predict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]))
    masks = np.asarray(low_res)[:2, None]  # two mask prompts, no point
    with torch.no_grad():
        logits, iou, _ = sam.predict(
            embedding, low_res_mask=torch.as_tensor(masks), binarize=False, original_size=IMAGE_SIZE
        )
    assert logits.shape == (2, 3, *IMAGE_SIZE)
    for index in range(2):
        expected, expected_iou, _ = predictor.predict(mask_input=masks[index], return_logits=True)
        assert_close_to(logits[index], torch.as_tensor(expected), f"mask logits of mask prompt {index}")
        assert_close_to(iou[index], torch.as_tensor(expected_iou), f"IoU predictions of mask prompt {index}")


def test_batched_prompts_on_one_embedding(sam: SegmentAnything, predictor: SamPredictor, embedding: Tensor) -> None:
    points = torch.tensor([[[40.0, 30.0]], [[100.0, 60.0]], [[12.0, 80.0]]])
    boxes = torch.tensor([[[10.0, 10.0], [120.0, 70.0]], [[50.0, 20.0], [140.0, 85.0]], [[0.0, 0.0], [30.0, 40.0]]])
    with torch.no_grad():
        logits, iou, _ = sam.predict(
            embedding, foreground_points=points, box_points=boxes, binarize=False, original_size=IMAGE_SIZE
        )
    assert logits.shape == (3, 3, *IMAGE_SIZE)
    for index in range(3):
        expected, expected_iou, _ = predictor.predict(
            point_coords=points[index].numpy(),
            point_labels=np.array([1]),
            box=boxes[index].reshape(4).numpy(),
            return_logits=True,
        )
        assert_close_to(logits[index], torch.as_tensor(expected), f"mask logits of prompt {index}")
        assert_close_to(iou[index], torch.as_tensor(expected_iou), f"IoU predictions of prompt {index}")


def test_model_is_the_papers_figure(sam: SegmentAnything) -> None:
    assert [type(child).__name__ for child in sam] == [
        "SAMViT",
        "PointEncoder",
        "MaskEncoder",
        "NoMaskEmbedding",
        "MaskDecoder",
    ]
    with pytest.raises(TypeError, match="compute_image_embedding"):
        sam(torch.zeros(1, 3, 128, 128))


def test_real_prompt_encoder_and_decoder(image_array: np.ndarray[Any, Any], tmp_path: Path) -> None:
    """SAM's prompt encoder and mask decoder at their real sizes (256 wide, 8 heads, 2048-wide MLPs, 1024 inputs, a
    64x64 embedding), behind a small ViT."""
    config = ModelConfig.of(SegmentAnything, embedding_dim=32, num_layers=2, num_heads=2, global_attention_indices=(1,))
    reference = build_reference(config, seed=4)
    _, sam = convert_reference(reference, tmp_path)
    predictor = SamPredictor(reference)
    predictor.set_image(image_array)
    arguments = _reference_prompt(PROMPTS["point and box"])
    logits, iou, _ = predictor.predict(**arguments, return_logits=True)
    with torch.no_grad():
        ours_logits, ours_iou, _ = sam.predict(Image.fromarray(image_array), **PROMPTS["point and box"], binarize=False)
    assert_close_to(ours_logits[0], torch.as_tensor(logits), "mask logits")
    assert_close_to(ours_iou[0], torch.as_tensor(iou), "IoU predictions")


@pytest.mark.slow
def test_vit_b_image_encoder_at_real_widths(tmp_path: Path) -> None:
    """ViT-B's image encoder at its real widths and input size (1024), against `sam_model_registry["vit_b"]`."""
    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"]()
    randomize(reference, seed=2)
    converted = convert_sam_file(save_reference(reference, tmp_path / "sam_vit_b.pth"), tmp_path / "sam_b.safetensors")
    assert converted.description == "SegmentAnythingB()"
    sam = SegmentAnything.from_safetensors(converted.path)
    assert type(sam) is SegmentAnythingB
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = time.monotonic()
        expected = reference.image_encoder(x)
        reference_time = time.monotonic() - start
        start = time.monotonic()
        actual = sam.image_encoder(x)
        ours_time = time.monotonic() - start
    print(f"ViT-B image encoder: reference {reference_time:.1f} s, ours {ours_time:.1f} s")
    assert_close_to(actual, expected, "ViT-B image embedding")


@pytest.mark.heavy
@pytest.mark.parametrize(("kind", "preset"), [("vit_l", SegmentAnythingL), ("vit_h", SegmentAnythingH)])
def test_large_image_encoders_at_real_widths(tmp_path: Path, kind: str, preset: type[SegmentAnything]) -> None:
    """ViT-L's and ViT-H's image encoders at their real widths (1024 input), against `sam_model_registry` (run once:
    `uv run pytest --heavy -k large_image_encoders -s`)."""
    torch.manual_seed(0)
    reference = sam_model_registry[kind]()
    randomize(reference, seed=2)
    converted = convert_sam_file(save_reference(reference, tmp_path / f"sam_{kind}.pth"), tmp_path / "sam.safetensors")
    sam = SegmentAnything.from_safetensors(converted.path)
    assert type(sam) is preset
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.image_encoder(x)
        del reference
        actual = sam.image_encoder(x)
    relative = ((actual - expected).abs().max() / expected.abs().max()).item()
    print(f"{kind} image encoder: max abs difference {relative:.2e} of the output's scale")
    assert_close_to(actual, expected, f"{kind} image embedding")


@pytest.mark.gpu
def test_predict_on_cuda_matches_cpu(sam: SegmentAnything, image_array: np.ndarray[Any, Any]) -> None:
    on_gpu = SegmentAnything(**sam._arguments(), device="cuda")
    on_gpu.load_state_dict(sam.state_dict())
    image = Image.fromarray(image_array)
    with torch.no_grad():
        expected = sam.predict(image, **PROMPTS["point and box"], binarize=False)
        actual = on_gpu.predict(image, **PROMPTS["point and box"], binarize=False)
    for ours, theirs in zip(actual, expected, strict=True):
        assert ours.device.type == "cuda"
        # cuDNN's convolutions may use TF32: a looser tolerance than the CPU's.
        torch.testing.assert_close(ours.cpu(), theirs, atol=1e-2 * theirs.abs().max().item(), rtol=0)
