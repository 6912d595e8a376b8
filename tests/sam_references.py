"""Segment Anything references for the tests: `segment_anything`'s `Sam` (and `segment_anything_hq`'s) from their
real builders' configs, with random weights, saved as Meta's `.pth` files are, converted with `refiners-convert`'s
code.

The reference is built at the family's `TINY` sizes (or any `SegmentAnything` config) with the classes and the
settings of `segment_anything.build_sam._build_sam`. Every weight is drawn at random, including those SAM
initializes to zero or one (relative and absolute positions, norms), so that each one counts in the outputs.
"""

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from segment_anything.modeling import Sam

with warnings.catch_warnings():
    # segment_anything_hq imports timm's deprecated paths and registers its TinyViT under timm's names: notices that
    # do not concern these tests.
    warnings.filterwarnings("ignore", message="Overwriting tiny_vit", category=UserWarning)
    warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
    import segment_anything_hq  # noqa: F401  # pyright: ignore[reportUnusedImport]

from refiners.converters.segment_anything import convert_sam_file
from refiners.converters.segment_anything_check import segment_anything_reference
from refiners.fluxion.model_config import ModelConfig
from refiners.foundationals.segment_anything import SegmentAnything
from refiners.foundationals.segment_anything.presets import TINY

__all__ = ["TINY", "build_reference", "build_hq_reference", "randomize", "save_reference", "convert_reference"]


def randomize(model: torch.nn.Module, seed: int = 0, names: Callable[[str], bool] = lambda _: True) -> None:
    """Draw every weight (whose name `names` accepts) at random: matrices and kernels N(0, 1 / fan_in) (at least
    0.02² for the position tables, whose fan-in is their whole size), vectors N(0, 0.5²), plus one for norms'
    weights. The pixel statistics, buffers of `Sam`, are kept."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or not names(name) or name in ("pixel_mean", "pixel_std"):
                continue
            fan_in = tensor[0].numel() if tensor.dim() > 1 else 0
            std = max(fan_in**-0.5, 0.02) if fan_in else 0.5
            noise = torch.randn(tensor.shape, generator=generator) * std
            is_norm_weight = name.endswith("weight") and tensor.dim() == 1 and "norm" in name
            is_neck_norm = name.startswith("image_encoder.neck.") and name.split(".")[2] in ("1", "3")
            is_upscaling_norm = ".output_upscaling.1." in name or ".mask_downscaling.1." in name
            is_norm = is_norm_weight or (
                name.endswith("weight") and (is_neck_norm or is_upscaling_norm or ".mask_downscaling.4." in name)
            )
            tensor.copy_(noise + 1.0 if is_norm else noise)


def build_reference(config: ModelConfig = TINY, seed: int = 0) -> Sam:
    """`segment_anything`'s `Sam` at `config`'s sizes (built as `refiners-convert sam --check` builds it, with the
    settings of `segment_anything.build_sam._build_sam`), random weights, in eval mode."""
    sam = segment_anything_reference(config.arguments)
    randomize(sam, seed)
    return sam.eval()


def save_reference(sam: torch.nn.Module, path: Path) -> Path:
    """Save a reference's state dict as Meta's `.pth` files are (`torch.save` of the state dict)."""
    torch.save(sam.state_dict(), path)
    return path


def convert_reference(sam: torch.nn.Module, folder: Path, name: str = "sam") -> tuple[Path, SegmentAnything]:
    """Save `sam` as a `.pth`, convert it with `refiners-convert sam`'s code, load it: `(file, model)`."""
    checkpoint = save_reference(sam, folder / f"{name}.pth")
    converted = convert_sam_file(checkpoint, folder / f"{name}.safetensors")
    return converted.path, SegmentAnything.from_safetensors(converted.path)


def build_hq_reference(sam: Sam, config: ModelConfig = TINY, seed: int = 1) -> torch.nn.Module:
    """`segment_anything_hq`'s `Sam` (with `MaskDecoderHQ`) at `config`'s sizes, SAM's weights taken from `sam`
    (HQ-SAM keeps them frozen) and HQ-SAM's own drawn at random: those HQ-SAM initializes to zero too, so that the
    HQ mask moves the output."""
    hq = segment_anything_reference(config.arguments, hq=True)
    loaded = hq.load_state_dict(sam.state_dict(), strict=False)
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    hq_only = set(loaded.missing_keys)
    randomize(hq, seed, names=hq_only.__contains__)
    return hq.eval()
