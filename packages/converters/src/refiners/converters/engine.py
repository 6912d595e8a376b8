"""The one conversion engine: a source state dict, a key map derived from structure, a target model's shapes.

A conversion is a declaration (see `ConversionSpec`): how source keys map to target keys (a function that derives the
map from the target model's structure, never a literal table), which tensors need reshaping, and which source keys are
known to carry nothing the target needs (e.g. `position_ids` buffers). `convert_state_dict` runs it and fails, listing
them, on source keys nobody uses, target keys nobody fills, and shapes that do not fit.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ConversionError", "KeyMap", "convert_state_dict"]

Transform = Callable[[Tensor], Tensor]


class ConversionError(ValueError):
    """A source that does not fit the target: its message lists the offending keys and shapes."""


@dataclass
class KeyMap:
    """Source key -> target key, with optional per-target-key tensor transforms and ignorable source keys.

    Attributes:
        mapping: For each source key, the target key it fills.
        transforms: For some target keys, a function applied to the source tensor (e.g. a reshape).
        ignored: Predicates on source keys that carry nothing the target needs; matched keys are dropped on purpose.
    """

    mapping: dict[str, str] = field(default_factory=dict[str, str])
    transforms: dict[str, Transform] = field(default_factory=dict[str, Transform])
    ignored: list[Callable[[str], bool]] = field(default_factory=list[Callable[[str], bool]])

    def add(self, source: str, target: str, transform: Transform | None = None) -> None:
        if source in self.mapping:
            raise ValueError(f"source key {source!r} is mapped twice ({self.mapping[source]!r} and {target!r})")
        self.mapping[source] = target
        if transform is not None:
            self.transforms[target] = transform

    def is_ignored(self, source_key: str) -> bool:
        return any(predicate(source_key) for predicate in self.ignored)

    def with_prefix(self, source_prefix: str = "", target_prefix: str = "") -> "KeyMap":
        """The same map with prefixes prepended to every source and target key."""
        return KeyMap(
            mapping={source_prefix + s: target_prefix + t for s, t in self.mapping.items()},
            transforms={target_prefix + t: f for t, f in self.transforms.items()},
            ignored=[
                (lambda key, p=predicate: key.startswith(source_prefix) and p(key.removeprefix(source_prefix)))
                for predicate in self.ignored
            ],
        )


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = "\n  ".join(keys[:limit])
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)}:\n  {shown}{more}"


def convert_state_dict(
    source: Mapping[str, Tensor],
    key_map: KeyMap,
    target_shapes: Mapping[str, torch.Size],
    *,
    what: str = "checkpoint",
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Convert `source` into a state dict with exactly the keys and shapes of `target_shapes`.

    Args:
        source: The source tensors (e.g. a diffusers component's state dict).
        key_map: How source keys map to target keys.
        target_shapes: The target model's state-dict shapes (`{k: v.shape for k, v in model.state_dict().items()}`).
        what: What is converted, for error messages (e.g. "diffusers UNet").
        dtype: Cast floating-point tensors to this dtype (default: keep the source dtype).

    Raises:
        ConversionError: Listing unused source keys, missing source keys, unfilled target keys, or wrong shapes.
    """
    unused = [key for key in source if key not in key_map.mapping and not key_map.is_ignored(key)]
    missing_sources = [s for s in key_map.mapping if s not in source]
    produced = {key_map.mapping[s] for s in key_map.mapping if s in source}
    unfilled = [key for key in target_shapes if key not in produced]
    unknown_targets = [t for t in produced if t not in target_shapes]
    problems: list[str] = []
    if unused:
        problems.append(f"source keys that nothing in the target uses, {_listing(unused)}")
    if missing_sources:
        problems.append(f"source keys the target needs but the {what} lacks, {_listing(missing_sources)}")
    if unfilled:
        problems.append(f"target weights left unfilled, {_listing(unfilled)}")
    if unknown_targets:
        problems.append(f"target keys the map names but the model lacks, {_listing(unknown_targets)}")
    converted: dict[str, Tensor] = {}
    wrong_shapes: list[str] = []
    for source_key, target_key in key_map.mapping.items():
        if source_key not in source or target_key not in target_shapes:
            continue
        tensor = source[source_key]
        if (transform := key_map.transforms.get(target_key)) is not None:
            tensor = transform(tensor)
        if tensor.shape != target_shapes[target_key]:
            wrong_shapes.append(
                f"{source_key} {tuple(tensor.shape)} -> {target_key} {tuple(target_shapes[target_key])}"
            )
            continue
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        converted[target_key] = tensor
    if wrong_shapes:
        problems.append(f"tensors whose shapes do not fit, {_listing(wrong_shapes)}")
    if problems:
        raise ConversionError(
            f"the {what} does not fit the target model:\n- "
            + "\n- ".join(problems)
            + "\nCheck that the source is the model you meant to convert (and its variant/config)."
        )
    return converted
