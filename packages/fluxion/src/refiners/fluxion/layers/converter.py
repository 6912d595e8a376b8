"""`Converter`: cast a Chain's inputs to the device and dtype of its weights."""

from typing import Any

from torch import Tensor

from refiners.fluxion.layers.module import Module

__all__ = ["Converter"]


class Converter(Module):
    """Move tensor inputs to the device of the parent Chain, and cast floating-point ones to its dtype.

    Put it first in a Chain so callers can pass CPU or float32 tensors to a model that lives elsewhere. Integer and
    boolean tensors (token ids, masks) keep their dtype; inputs that are not tensors pass through unchanged.

    Args:
        set_device: Move tensors to the parent's device.
        set_dtype: Cast floating-point tensors to the parent's dtype.

    Example:
        ```py
        import torch
        import refiners.fluxion.layers as fl

        model = fl.Chain(fl.Converter(), fl.Linear(4, 4, dtype=torch.float64))
        assert model(torch.randn(1, 4, dtype=torch.float32)).dtype == torch.float64
        ```
    """

    def __init__(self, set_device: bool = True, set_dtype: bool = True) -> None:
        super().__init__()
        self.set_device = set_device
        self.set_dtype = set_dtype

    def forward(self, *inputs: Any) -> Any:
        parent = self.parent
        if parent is None:
            raise ValueError(
                "Converter casts its inputs to the device and dtype of its parent Chain, but it has no parent. "
                "Put it in the Chain whose weights set the target, e.g. `fl.Chain(fl.Converter(), fl.Linear(...))`."
            )
        device, dtype = parent.device, parent.dtype
        converted = tuple(
            x.to(
                device=device if self.set_device else x.device,
                dtype=dtype if self.set_dtype and x.is_floating_point() else x.dtype,
            )
            if isinstance(x, Tensor)
            else x
            for x in inputs
        )
        return converted[0] if len(converted) == 1 else converted
