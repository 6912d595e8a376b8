"""The base classes of every fluxion layer."""

import copy
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from refiners.fluxion.context import Context, ContextProvider

if TYPE_CHECKING:
    from refiners.fluxion.layers.chain import Chain

__all__ = ["Module", "WeightedModule", "ContextModule"]

_SIMPLE_TYPES = (int, float, str, bool)
_MISSING = object()


def _is_simple(value: Any) -> bool:
    if isinstance(value, _SIMPLE_TYPES) or value is None:
        return True
    return isinstance(value, tuple) and all(isinstance(v, _SIMPLE_TYPES) for v in value)  # pyright: ignore


class Module(torch.nn.Module):
    """A `torch.nn.Module` that knows its parent Chain, reads as one line, and loads safetensors.

    Layers are built declaratively: a subclass sets its hyperparameters in `__init__` and implements `forward`.
    Every layer that owns weights takes `device` and `dtype` keywords (defaults: CPU, float32).
    """

    _parameters: dict[str, Any]
    _buffers: dict[str, Any]
    _modules: dict[str, Any]  # pyright: ignore[reportIncompatibleVariableOverride]
    _parent: "Chain | None" = None
    _tag: ClassVar[str] = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

    if TYPE_CHECKING:
        # For the type checker only (attributes read as `Any`): at run time, a pass-through here would add a Python
        # frame to every `weight`/`bias` lookup of every layer.
        def __getattr__(self, name: str) -> Any: ...

    @property
    def parent(self) -> "Chain | None":
        """The Chain this module is a child of, or None for a root."""
        return self._parent

    def _set_parent(self, parent: "Chain | None") -> None:
        # Not through torch's __setattr__: a parent must not become a submodule (that would be a cycle).
        object.__setattr__(self, "_parent", parent)

    def get_parents(self) -> "list[Chain]":
        """The Chains above this module, from its parent up to the root of its tree (empty for a root)."""
        parents: list[Chain] = []
        module: Module = self
        while (parent := module.parent) is not None:
            parents.append(parent)
            module = parent
        return parents

    def get_path(self) -> str:
        """The dotted path of this module from the root of its tree, e.g. `BasicModel.HiddenLayer.Linear`."""
        parts: list[str] = []
        module: Module = self
        while (parent := module.parent) is not None:
            parts.append(parent.key_of(module))
            module = parent
        parts.append(module.__class__.__name__)
        return ".".join(reversed(parts))

    def structural_copy(self) -> Self:
        """A copy of this module that shares its weights (parameters and buffers) but has no parent."""
        memo: dict[int, Module] = {}
        clone = self._structural_copy(memo)
        clone._remap_after_copy(memo)
        return clone

    def _structural_copy(self, memo: "dict[int, Module]") -> Self:
        clone = object.__new__(type(self))
        clone.__dict__ = {
            key: copy.copy(value) if isinstance(value, dict) else value  # pyright: ignore[reportUnknownArgumentType]
            for key, value in self.__dict__.items()
        }
        clone._set_parent(None)
        memo[id(self)] = clone
        return clone

    def _remap_after_copy(self, memo: "dict[int, Module]") -> None:
        """Point references to other modules of the tree at their copies: an adapter's target."""
        # Here rather than in `Adapter`, which comes after `Module` in an adapter's MRO.
        if (targets := self.__dict__.get("_target")) is not None:
            object.__setattr__(self, "_target", [memo.get(id(target), target) for target in targets])

    def load_from_safetensors(self, tensors_path: str | Path, strict: bool = True) -> Self:
        """Load weights from a safetensors file, tensor by tensor, straight onto this module's device.

        Args:
            tensors_path: The `.safetensors` file.
            strict: Fail, listing them, on missing, unexpected or wrongly shaped tensors. When False, load what
                fits and leave the rest.
        """
        from refiners.fluxion.utils import load_state_dict_from_safetensors

        load_state_dict_from_safetensors(self, tensors_path, strict=strict)
        return self

    def basic_attributes(self) -> dict[str, Any]:
        """The hyperparameters shown in `repr`: `__init__` arguments stored as attributes, when not the default."""
        attributes: dict[str, Any] = {}
        for cls in type(self).__mro__:
            if cls in (Module, WeightedModule, ContextModule) or not issubclass(cls, Module):
                continue
            if "__init__" not in cls.__dict__:
                continue
            for name, parameter in inspect.signature(cls.__init__).parameters.items():
                if name in ("self", "device", "dtype") or name in attributes or name.startswith("_"):
                    continue
                if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                    continue
                if name in self._parameters and self._parameters[name] is None and parameter.default is True:
                    attributes[name] = False  # a disabled weight, e.g. `Linear(..., bias=False)`
                    continue
                if name in self._parameters or name in self._buffers or name in self._modules:
                    continue  # weights, not hyperparameters
                value = getattr(self, name, _MISSING)
                if value is _MISSING or not _is_simple(value):
                    continue
                default = parameter.default
                if default is not parameter.empty and (
                    value == default or (isinstance(value, tuple) and all(v == default for v in value))  # pyright: ignore
                ):
                    continue
                attributes[name] = value
            break
        return attributes

    def short_repr(self) -> str:
        """One line: the class and its hyperparameters (a Chain's `repr` is the tree of these lines)."""
        attributes = ", ".join(f"{name}={_format(value)}" for name, value in self.basic_attributes().items())
        tag = f"({self._tag}) " if self._tag else ""
        return f"{tag}{self.__class__.__name__}({attributes})"

    def __str__(self) -> str:
        return self.short_repr()

    def __repr__(self) -> str:
        return str(self)


def _format(value: Any) -> str:
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return repr(value)


class WeightedModule(Module):
    """A module that owns a `weight` parameter: its `device` and `dtype` are the weight's."""

    weight: torch.nn.Parameter | torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def short_repr(self) -> str:
        attributes = self.basic_attributes() | {"device": self.device, "dtype": self.dtype}
        text = ", ".join(f"{name}={_format(value)}" for name, value in attributes.items())
        return f"{self.__class__.__name__}({text})"


class ContextModule(Module):
    """A module that reads or writes the Context store of the tree it lives in (see `refiners.fluxion.context`)."""

    @property
    def provider(self) -> ContextProvider:
        """The store of this module's tree: the one its root Chain holds."""
        root: Module = self
        while (parent := root.parent) is not None:
            root = parent
        provider = getattr(root, "_provider", None)
        if not isinstance(provider, ContextProvider):
            raise RuntimeError(
                f"{self.__class__.__name__} reads or writes contexts but is not inside a Chain. "
                f"Put it in a Chain (e.g. `fl.Chain({self.__class__.__name__}(...))`) that provides the context."
            )
        return provider

    def use_context(self, context_name: str) -> Context:
        """The context `context_name` of this module's tree."""
        return self.provider.get_context(context_name)

    def set_context(self, context: str, value: Context) -> None:
        """Merge `value` into the context `context` of this module's tree."""
        self.provider.set_context(context, value)
