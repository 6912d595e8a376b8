"""Rendering of a tree of layers, for `repr` and for located errors."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from refiners.fluxion.layers.module import Module

__all__ = ["render_tree", "describe_inputs"]

_MARK = "  <-- failed here"


def render_tree(module: "Module", depth: int | None = None, marked: "Module | None" = None) -> str:
    """A readable tree: `(TAG)` for combinators, `#n` for repeated classes, `(xN)` for folded identical siblings.

    Args:
        module: The root to render.
        depth: How many levels of children to show (None: all).
        marked: A child to point at (used by located errors).
    """
    head, *children = _lines(module, depth, marked)
    return "\n".join([head, *(f"  {line}" for line in children)])


def _lines(module: "Module", depth: int | None, marked: "Module | None") -> list[str]:
    from refiners.fluxion.layers.chain import Chain

    head = module.short_repr()
    if not isinstance(module, Chain) or depth == 0 or len(module) == 0:
        return [head]
    child_depth = None if depth is None else depth - 1
    groups: list[tuple[list[str], list[str], bool]] = []  # (keys, lines, is marked)
    for key, child in module._modules.items():
        lines = _lines(child, child_depth, marked)
        is_marked = child is marked
        previous = groups[-1] if groups else None
        if previous is not None and previous[1] == lines and not is_marked and not previous[2]:
            previous[0].append(key)
        else:
            groups.append(([key], lines, is_marked))
    rendered = [head]
    for index, (keys, lines, is_marked) in enumerate(groups):
        last = index == len(groups) - 1
        name = type(module._modules[keys[0]]).__name__
        first_line = lines[0] + _numbering(keys, name) + (_MARK if is_marked else "")
        rendered.append(("└── " if last else "├── ") + first_line)
        rendered.extend(("    " if last else "│   ") + line for line in lines[1:])
    return rendered


def _numbering(keys: list[str], class_name: str) -> str:
    if keys[0] == class_name:
        return ""
    numbers = [key.removeprefix(f"{class_name}_") for key in keys]
    if len(keys) == 1:
        return f" #{numbers[0]}"
    return f" #{numbers[0]}-{numbers[-1]} (x{len(keys)})"


def describe_inputs(inputs: Sequence[Any]) -> str:
    """A one-line summary of a layer's inputs: shapes, dtypes and devices of tensors, types of the rest."""
    if not inputs:
        return "(no inputs)"
    return ", ".join(describe_value(value) for value in inputs)


def describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"Tensor(shape={tuple(value.shape)}, dtype={dtype}, device={value.device})"
    if isinstance(value, tuple | list):
        inner = ", ".join(describe_value(v) for v in value)  # pyright: ignore[reportUnknownVariableType]
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__}(...)"
