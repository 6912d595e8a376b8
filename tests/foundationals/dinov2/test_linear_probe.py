"""`LinearProbe` equals transformers' `Dinov2ForImageClassification` / `Dinov2WithRegistersForImageClassification`
(the class token and the mean of the patch tokens, registers left out, into one Linear), and trains as a linear
probe: the head learns, the backbone stays bit for bit what it was. `refiners-convert dinov2` converts transformers'
classifiers (the Hub's `facebook/dinov2-small-imagenet1k-1-layer`...) to a `LinearProbe` file."""

from pathlib import Path
from typing import Any

import pytest
import torch
from dinov2_references import CONFIGS
from transformers import (
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
)

from refiners.converters.cli import main as refiners_convert
from refiners.foundationals.dinov2 import LinearProbe, ViT

Classifier = Dinov2ForImageClassification | Dinov2WithRegistersForImageClassification


def _classifier(name: str) -> Classifier:
    config: dict[str, Any] = CONFIGS[name] | {"num_hidden_layers": 2, "num_labels": 10}
    torch.manual_seed(0)
    if "num_register_tokens" in config:
        model: Classifier = Dinov2WithRegistersForImageClassification(Dinov2WithRegistersConfig(**config))
    else:
        model = Dinov2ForImageClassification(Dinov2Config(**config))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1 or parameter.shape[0] == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("name", ["small", "small_reg"])
def test_a_converted_classifier_equals_transformers(tmp_path: Path, name: str) -> None:
    classifier = _classifier(name)
    classifier.save_pretrained(tmp_path / "classifier")
    assert (
        refiners_convert(
            ["dinov2", "--from", str(tmp_path / "classifier"), "--to", str(tmp_path / "probe.safetensors")]
        )
        == 0
    )
    probe = LinearProbe.from_safetensors(tmp_path / "probe.safetensors")
    assert probe.num_classes == 10 and probe.backbone.num_registers == (4 if name == "small_reg" else 0)
    images = torch.randn(2, 3, 126, 98, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = classifier(pixel_values=images).logits
        torch.testing.assert_close(probe(images), expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    with pytest.raises(ValueError, match="weights are for a LinearProbe"):
        ViT.from_safetensors(tmp_path / "probe.safetensors")


def test_a_linear_probe_trains_the_head_only() -> None:
    torch.manual_seed(0)
    backbone = ViT(embedding_dim=32, patch_size=14, image_size=56, num_layers=2, num_heads=2, num_registers=4)
    probe = LinearProbe(backbone, num_classes=2)
    before = {key: tensor.clone() for key, tensor in backbone.state_dict().items()}
    # Two classes of images a linear head on DINOv2's features can tell apart: dark and bright.
    images = torch.cat((torch.rand(8, 3, 56, 56) - 1, torch.rand(8, 3, 56, 56)))
    labels = torch.tensor([0] * 8 + [1] * 8)
    backbone.requires_grad_(False)
    optimizer = torch.optim.SGD(probe.head_parameters(), lr=0.5)
    losses: list[float] = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(probe(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(tensor, before[key]) for key, tensor in backbone.state_dict().items())
