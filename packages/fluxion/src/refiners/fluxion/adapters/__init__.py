"""Adapters: patch a model by wrapping some of its layers (`Adapter`), e.g. with LoRAs (`LoraAdapter`)."""

# `refiners.fluxion.layers` imports `adapter.py` (for `fl.Adapter`), and `adapter.py` imports the layers: load the
# layers first so that importing this package before them (`from refiners.fluxion.adapters.lora import ...`) works.
import refiners.fluxion.layers  # noqa: F401  # isort: skip  # pyright: ignore[reportUnusedImport]
from refiners.fluxion.adapters.adapter import Adapter
from refiners.fluxion.adapters.lora import (
    Conv2dLora,
    LinearLora,
    Lora,
    LoraAdapter,
    LoraScaling,
    SingleLoraAdapter,
    add_loras_to,
    enable_lora_hotswap,
    lora_parameters,
)

__all__ = [
    "Adapter",
    "Lora",
    "LinearLora",
    "Conv2dLora",
    "LoraScaling",
    "LoraAdapter",
    "SingleLoraAdapter",
    "add_loras_to",
    "enable_lora_hotswap",
    "lora_parameters",
]
