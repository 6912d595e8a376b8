"""A linear classifier on DINOv2 features: the paper's linear evaluation, transformers'
`Dinov2ForImageClassification` and facebook's `dinov2_vits14_lc` heads (with one layer of features).

The head reads the class token and the mean of the patch tokens (registers left out), side by side, `(batch,
2 * embedding_dim)`, and maps them to class logits with one `Linear`. Train it with the backbone frozen
(`LinearProbe.head_parameters`).

Example:
    ```py
    import torch
    from refiners.foundationals.dinov2 import TINY, ViT
    from refiners.foundationals.dinov2.linear_probe import LinearProbe

    probe = LinearProbe(TINY.build([ViT]), num_classes=10)
    logits = probe(torch.randn(2, 3, 56, 56))
    assert logits.shape == (2, 10)
    assert [p.shape for p in probe.head_parameters()] == [(10, 64), (10,)]
    ```
"""

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors
from refiners.foundationals.dinov2.dinov2 import DINOV2_CLASSES
from refiners.foundationals.dinov2.vit import ViT

__all__ = ["ClassAndPatchMean", "LinearProbe"]


class ClassAndPatchMean(fl.Module):
    """Tokens `(batch, 1 + num_registers + patches, dim)` to `(batch, 2 * dim)`: the class token and the mean of the
    patch tokens, concatenated.

    Args:
        num_registers: The register tokens after the class token, left out of the mean.
    """

    def __init__(self, num_registers: int = 0) -> None:
        super().__init__()
        self.num_registers = num_registers

    def forward(self, tokens: Tensor) -> Tensor:
        patches = tokens[:, 1 + self.num_registers :]
        if patches.shape[1] == 0:
            raise ValueError(f"no patch tokens after the class token and {self.num_registers} registers")
        return torch.cat((tokens[:, 0], patches.mean(dim=1)), dim=1)


class LinearProbe(fl.Chain):
    """A DINOv2 backbone, then a linear classifier on its class token and mean patch token.

    Args:
        backbone: The DINOv2 model (e.g. `DINOv2_small.from_safetensors(path)`).
        num_classes: The number of logits.
        device: Where the classifier lives (default: the backbone's device).
        dtype: The classifier's dtype (default: the backbone's).
    """

    def __init__(
        self,
        backbone: ViT,
        num_classes: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.num_classes = num_classes
        super().__init__(
            backbone,
            ClassAndPatchMean(backbone.num_registers),
            fl.Linear(
                2 * backbone.embedding_dim,
                num_classes,
                device=device if device is not None else backbone.device,
                dtype=dtype if dtype is not None else backbone.dtype,
            ),
        )

    @classmethod
    def from_safetensors(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "LinearProbe":
        """The probe a converted file records (`refiners-convert dinov2` of a transformers image classifier, e.g.
        `facebook/dinov2-small-imagenet1k-1-layer`), built at its sizes on the "meta" device and loaded.

        Args:
            path: The `.safetensors` file.
            device: Where the weights go (default: CPU).
            dtype: The weights' dtype (default: float32).

        Raises:
            ValueError: The file records no model, or another model than a `LinearProbe`.
        """
        config = ModelConfig.from_metadata(load_metadata_from_safetensors(path))
        if config is None or config.class_name != cls.__name__:
            recorded = "no model" if config is None else f"a {config.class_name}"
            raise ValueError(
                f"{path} records {recorded}, not a {cls.__name__}: load a backbone with ViT.from_safetensors, and "
                "convert an image classifier with `refiners-convert dinov2`"
            )
        probe = config.build((cls, *DINOV2_CLASSES), device="meta", dtype=dtype)
        assert isinstance(probe, LinearProbe)
        probe.load_from_safetensors(path)
        return probe.to(device=device) if device is not None else probe

    @property
    def backbone(self) -> ViT:
        """The DINOv2 model."""
        return self.ensure_find(ViT)

    @property
    def head(self) -> fl.Linear:
        """The classifier (transformers' `classifier`, facebook's `linear_head`)."""
        return self.layer(-1, fl.Linear)

    def head_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters a linear probe trains: the classifier's (the backbone stays frozen)."""
        return self.head.parameters()
