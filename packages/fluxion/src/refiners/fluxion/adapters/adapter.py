"""The Adapter API: patch a model by wrapping one of its layers, and undo it exactly."""

from collections.abc import Generator
from contextlib import contextmanager
from typing import Generic, Self, TypeVar, cast

from refiners.fluxion.layers.chain import Chain
from refiners.fluxion.layers.module import Module

__all__ = ["Adapter"]

T = TypeVar("T", bound=Module)


class Adapter(Generic[T]):
    """A Chain that wraps a target layer; `inject` puts it in the target's place, `eject` restores the target.

    Mix it into a Chain subclass and build the Chain inside `setup_adapter(target)`, with the target among its
    children. Until `inject`, the model is untouched: the target stays where it is. Several adapters can wrap the
    same target (each one injected into the previous) and be ejected in any order; after `eject` the tree is what
    it was before `inject` (same modules, same keys, same weights).

    Example:
        ```py
        import torch
        import refiners.fluxion.layers as fl

        class Double(fl.Chain, fl.Adapter[fl.Linear]):
            def __init__(self, target: fl.Linear) -> None:
                with self.setup_adapter(target):
                    super().__init__(target, fl.Lambda(lambda x: 2 * x))

        model = fl.Chain(fl.Linear(4, 4), fl.ReLU())
        x = torch.randn(1, 4)
        before = model(x)
        adapter = Double(model.layer(0, fl.Linear)).inject()
        assert torch.equal(model(x), torch.relu(2 * model.Double.Linear(x)))
        adapter.eject()
        assert torch.equal(model(x), before)
        ```
    """

    _target: list[T]

    @contextmanager
    def setup_adapter(self, target: T) -> Generator[None]:
        """Build the adapter's Chain inside this block: the target is held without leaving its tree."""
        if not isinstance(self, Chain):
            raise TypeError(
                f"{type(self).__name__} must also be a Chain subclass, e.g. `class A(fl.Chain, fl.Adapter[T])`"
            )
        object.__setattr__(self, "_foreign_child", target)
        try:
            yield
        finally:
            object.__setattr__(self, "_foreign_child", None)
        object.__setattr__(self, "_target", [target])

    @property
    def target(self) -> T:
        """The layer this adapter wraps."""
        return self._target[0]

    def inject(self, parent: Chain | None = None) -> Self:
        """Put this adapter in the place of its target in `parent` (default: the target's current parent)."""
        adapter = self._as_chain
        target = self.target
        if adapter.parent is not None:
            raise ValueError(
                f"{type(self).__name__} is already injected (in {adapter.parent.get_path()}); eject it first"
            )
        parent = parent if parent is not None else target.parent
        if parent is None:
            raise ValueError(
                f"cannot inject {type(self).__name__}: its target {type(target).__name__} is in no Chain. Pass the "
                f"Chain to inject into: `adapter.inject(parent)`."
            )
        if target not in parent:
            where = target.parent.get_path() if target.parent is not None else "no Chain"
            raise ValueError(
                f"cannot inject {type(self).__name__} into {parent.get_path()}: its target {type(target).__name__} is "
                f"not a child of it (the target is in {where}). Call `inject()` without a parent, or pass the "
                f"target's parent."
            )
        parent.replace(target, adapter)
        target._set_parent(adapter)
        return self

    def eject(self) -> None:
        """Remove this adapter from the tree and put back what it wrapped, as it was before `inject`."""
        adapter = self._as_chain
        parent = adapter.parent
        if parent is None:
            raise ValueError(f"{type(self).__name__} is not injected: nothing to eject")
        occupant = self._slot_occupant()
        occupant._set_parent(None)
        parent.replace(adapter, occupant)
        # Hold the target again without taking it from its tree, so the adapter can be injected anew.
        object.__setattr__(adapter, "_foreign_child", self.target)
        try:
            adapter._regenerate_keys(self.target if child is occupant else child for child in adapter)
        finally:
            object.__setattr__(adapter, "_foreign_child", None)

    def _slot_occupant(self) -> Module:
        """The child of this adapter that stands for the target: the target itself, or adapters stacked on it."""
        adapter = self._as_chain
        module: Module = self.target
        while module.parent is not adapter:
            if module.parent is None:
                raise RuntimeError(f"the target of {type(self).__name__} is no longer inside it")
            module = module.parent
        return module

    @property
    def _as_chain(self) -> Chain:
        return cast(Chain, self)
