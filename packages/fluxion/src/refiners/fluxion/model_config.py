"""How to build a model again: its class and constructor arguments, recorded in the metadata of its weights file.

A weights file that records its model's constructor call loads without sizes written by hand: read the record,
build the model on the "meta" device (nothing allocated, no random initialization), load the tensors into it.

The record is three entries of a safetensors header's string metadata (version 1 of the scheme):

- `refiners.model.version`: `"1"`;
- `refiners.model.class`: the class's name, e.g. `"SD1UNet"`;
- `refiners.model.arguments`: the constructor's keyword arguments as a JSON object, tuples as lists, without
  `device` and `dtype` (chosen when loading), e.g. `{"in_channels": 4, "channels": [32, 32, 64, 64], ...}`.

A reader refuses another version, or other keys under `refiners.model.`, rather than guess what they mean. The class
is looked up by name among the classes the reader accepts: a file never decides what code is imported.
"""

import inspect
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

import torch

__all__ = ["ModelConfig", "MODEL_CONFIG_PREFIX", "MODEL_CONFIG_VERSION"]

MODEL_CONFIG_PREFIX = "refiners.model."
MODEL_CONFIG_VERSION = 1

_VERSION = f"{MODEL_CONFIG_PREFIX}version"
_CLASS = f"{MODEL_CONFIG_PREFIX}class"
_ARGUMENTS = f"{MODEL_CONFIG_PREFIX}arguments"
# Chosen by the caller of `build`, not recorded: the same file loads on any device, in any dtype.
_LOAD_TIME_ARGUMENTS = ("device", "dtype")

ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def _frozen(value: Any, where: str) -> Any:
    """`value` with lists as tuples, checked to be what JSON holds (a record must survive the round trip); a nested
    config (a component given to the constructor, e.g. SDXL's two text encoders) as a `ModelConfig`."""
    if value is None or isinstance(value, bool | int | float | str | ModelConfig):
        return value
    if isinstance(value, dict) and set(value) == {"class", "arguments"}:  # pyright: ignore[reportUnknownArgumentType]
        return ModelConfig(value["class"], value["arguments"])  # pyright: ignore[reportUnknownArgumentType]
    if isinstance(value, list | tuple):
        return tuple(_frozen(item, where) for item in value)  # pyright: ignore[reportUnknownVariableType]
    raise TypeError(
        f"{where} is a {type(value).__name__}: a model config holds JSON values only (numbers, strings, booleans, "
        "None, and lists or tuples of them) and the configs of components"
    )


def _json(value: Any) -> Any:
    if isinstance(value, ModelConfig):
        return {"class": value.class_name, "arguments": {name: _json(item) for name, item in value.arguments.items()}}
    return [_json(item) for item in value] if isinstance(value, tuple) else value  # pyright: ignore[reportUnknownVariableType]


@dataclass(frozen=True)
class ModelConfig:
    """A model's constructor call: its class's name and keyword arguments, as recorded in a weights file's metadata.

    Args:
        class_name: The model class's name, e.g. `"SD1UNet"`.
        arguments: The constructor's keyword arguments but `device` and `dtype`: numbers, strings, booleans, None,
            and sequences of them (stored as tuples, which is how they come back from a file), or the `ModelConfig`
            of a component the constructor takes (built first, with the same classes, device and dtype).

    Example:
        ```py
        import torch
        import refiners.fluxion.layers as fl
        from refiners.fluxion.model_config import ModelConfig

        config = ModelConfig.of(fl.Linear, in_features=8, out_features=2)
        metadata = config.to_metadata()  # what a converter writes next to the tensors
        assert metadata["refiners.model.class"] == "Linear"
        assert ModelConfig.from_metadata(metadata) == config
        linear = config.build([fl.Linear, fl.Conv2d], device="meta")  # sized by the record, nothing allocated
        assert linear.weight.shape == (2, 8) and linear.weight.is_meta
        assert str(config) == "Linear(in_features=8, out_features=2)"
        ```
    """

    class_name: str
    arguments: Mapping[str, Any] = field(default_factory=dict[str, Any])

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_]\w*", self.class_name):
            raise ValueError(f"a model config's class name must be a Python identifier, got {self.class_name!r}")
        if reserved := [name for name in _LOAD_TIME_ARGUMENTS if name in self.arguments]:
            raise ValueError(
                f"a model config does not record {' and '.join(reserved)}: they are chosen when the model is built"
            )
        frozen = {name: _frozen(value, f"{self.class_name}'s {name}") for name, value in self.arguments.items()}
        object.__setattr__(self, "arguments", frozen)

    @classmethod
    def of(cls, model_class: type[torch.nn.Module], /, **arguments: Any) -> Self:
        """The config of `model_class(**arguments)`, checked against the constructor's signature.

        Raises:
            TypeError: The constructor takes no such arguments, or a value is not a JSON value.
        """
        try:
            inspect.signature(model_class).bind_partial(**arguments)
        except TypeError as error:
            raise TypeError(f"{model_class.__name__} cannot be built with {sorted(arguments)}: {error}") from error
        return cls(model_class.__name__, arguments)

    def to_metadata(self) -> dict[str, str]:
        """The record, as safetensors metadata entries (see the module's documentation for the scheme)."""
        arguments = {name: _json(value) for name, value in self.arguments.items()}
        return {
            _VERSION: str(MODEL_CONFIG_VERSION),
            _CLASS: self.class_name,
            _ARGUMENTS: json.dumps(arguments),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> Self | None:
        """The record of a weights file's metadata, or None if it has none (a file written before records were).

        Args:
            metadata: A safetensors header's metadata; keys outside `refiners.model.` are ignored (they describe
                other things, e.g. a tokenizer).

        Raises:
            ValueError: The record is of another version of the scheme, incomplete, or unreadable.
        """
        fields = {key: value for key, value in metadata.items() if key.startswith(MODEL_CONFIG_PREFIX)}
        if not fields:
            return None
        if (version := fields.get(_VERSION)) != str(MODEL_CONFIG_VERSION):
            raise ValueError(
                f"the model config was written with version {version!r} of the metadata scheme ({_VERSION}); this "
                f"version of refiners reads version {MODEL_CONFIG_VERSION}: update refiners, or convert the weights "
                "again with this version"
            )
        if unknown := sorted(set(fields) - {_VERSION, _CLASS, _ARGUMENTS}):
            raise ValueError(
                f"unknown model config metadata {', '.join(unknown)} (version 1 has {_CLASS}, {_ARGUMENTS})"
            )
        if _CLASS not in fields or _ARGUMENTS not in fields:
            raise ValueError(f"the model config is incomplete: it needs {_CLASS} and {_ARGUMENTS}")
        try:
            arguments = json.loads(fields[_ARGUMENTS])
        except json.JSONDecodeError as error:
            raise ValueError(f"{_ARGUMENTS} is not valid JSON: {error}") from error
        if not isinstance(arguments, dict):
            raise ValueError(f"{_ARGUMENTS} must be a JSON object of keyword arguments, got {fields[_ARGUMENTS]!r}")
        try:
            return cls(fields[_CLASS], arguments)  # pyright: ignore[reportUnknownArgumentType]
        except TypeError as error:
            raise ValueError(str(error)) from error

    def build(
        self,
        classes: Iterable[type[ModelT]],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ModelT:
        """Build the model: `class_name(**arguments, device=device, dtype=dtype)`.

        Args:
            classes: The classes the caller accepts; `class_name` must be one of their names.
            device: Where the weights live; `"meta"` builds the structure only, to load weights into.
            dtype: The weights' dtype.

        Raises:
            ValueError: `class_name` is not among `classes`, or its constructor does not take `arguments`.
        """
        candidates = {model_class.__name__: model_class for model_class in classes}
        if (model_class := candidates.get(self.class_name)) is None:
            raise ValueError(
                f"the weights are for a {self.class_name}, which is not one of the models expected here "
                f"({', '.join(candidates)}): they belong to another model"
            )
        arguments = {
            name: value.build(candidates.values(), device=device, dtype=dtype)
            if isinstance(value, ModelConfig)
            else value
            for name, value in self.arguments.items()
        } | {"device": device, "dtype": dtype}
        try:
            inspect.signature(model_class).bind(**arguments)
        except TypeError as error:
            raise ValueError(
                f"{self} does not fit {model_class.__name__}'s constructor ({error}): the weights were written by "
                "another version of refiners; convert them again"
            ) from error
        return model_class(**arguments)

    def __str__(self) -> str:
        arguments = (
            f"{name}={value if isinstance(value, ModelConfig) else repr(value)}"
            for name, value in self.arguments.items()
        )
        return f"{self.class_name}({', '.join(arguments)})"
