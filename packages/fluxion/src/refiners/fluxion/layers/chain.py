"""`Chain`: a model as a tree of layers, built declaratively, that you can read, search and edit."""

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Self, TypeVar, overload

import torch
from torch.utils.checkpoint import _StopRecomputationError  # pyright: ignore[reportPrivateUsage]

from refiners.fluxion.context import ContextProvider, Contexts
from refiners.fluxion.layers.module import ContextModule, Module
from refiners.fluxion.layers.tree import describe_inputs, render_tree

__all__ = ["Chain", "ChainError", "Return"]

T = TypeVar("T", bound=Module)


class ChainError(RuntimeError):
    """An exception raised inside a layer, located: the layer's path, a tree excerpt, and a summary of its inputs.

    The original exception is chained as `__cause__`, and its type is kept in `original_type`.
    """

    def __init__(self, message: str, path: str, original_type: type[BaseException]) -> None:
        super().__init__(message)
        self.path = path
        self.original_type = original_type


# Not wrapped in a ChainError: already located, or control flow that torch catches by type (activation checkpointing
# stops its recomputation early by raising this through the layers).
_PASS_THROUGH = (ChainError, _StopRecomputationError)


class Return(Module):
    """Ends the enclosing Chain early: the Chain returns this layer's input and skips the layers after it."""

    def forward(self, *args: Any) -> Any:
        return args[0] if len(args) == 1 else args


class Chain(ContextModule):
    """A sequence of layers run one after the other; the output of one is the input of the next.

    A tuple output is unpacked into the next layer's positional arguments. Children are keyed by class name, with a
    numeric suffix when a class repeats (`Linear_1`, `Linear_2`): these keys are the state-dict paths.

    Args:
        *args: The children, as modules or iterables (e.g. generators) of modules.

    Example:
        ```py
        import torch
        import refiners.fluxion.layers as fl

        model = fl.Chain(fl.Linear(8, 16), fl.ReLU(), fl.Linear(16, 4))
        assert list(model.state_dict()) == ["Linear_1.weight", "Linear_1.bias", "Linear_2.weight", "Linear_2.bias"]
        assert model(torch.randn(2, 8)).shape == (2, 4)
        ```
    """

    _tag = "CHAIN"
    _modules: dict[str, Module]  # pyright: ignore[reportIncompatibleVariableOverride]
    _provider: ContextProvider
    # A child that stays in its current tree while this Chain holds it: an adapter's target before `inject`.
    _foreign_child: Module | None = None

    def __init__(self, *args: Module | Iterable[Module]) -> None:
        super().__init__()
        self._provider = ContextProvider()
        self._provider.add_defaults(self.init_context())
        self._regenerate_keys(_flatten(args))

    def init_context(self) -> Contexts:
        """The contexts this Chain provides, with their default values. Override to declare some."""
        return {}

    def __setattr__(self, name: str, value: Any) -> None:
        # torch registers a module assigned to an attribute as a child: in a Chain it would run in `forward` and
        # repeat its weights in the state dict under a second key. Replacing an existing child by its key (what
        # torch's wrappers such as FSDP do) is still allowed.
        if isinstance(value, torch.nn.Module) and name not in self.__dict__.get("_modules", {}):
            raise ValueError(
                f"cannot assign a {type(value).__name__} to {type(self).__name__}.{name}: a module set as an attribute "
                f"of a Chain would become one of its layers (run in forward, saved twice). Add a layer with "
                f"`append`/`insert`, or hold a module without registering it in a list (`self.{name} = [module]`)."
            )
        super().__setattr__(name, value)

    # -- running -----------------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        provider = self.provider
        if provider.in_forward:
            return super().__call__(*args, **kwargs)
        snapshot = provider.enter_forward()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            provider.exit_forward(snapshot)

    def forward(self, *args: Any) -> Any:
        result: Any = args
        layer: Module | None = None
        try:
            for layer in self._modules.values():
                result = layer(*result) if isinstance(result, tuple) else layer(result)
                if isinstance(layer, Return):
                    break
        except _PASS_THROUGH:
            raise
        except Exception as error:
            assert layer is not None
            raise self._locate(layer, result, error) from error
        if result is args and len(args) == 1:
            return args[0]
        return result

    def _call_layer(self, layer: Module, *args: Any) -> Any:
        """Call a child, locating any exception it raises (for combinators' forwards)."""
        try:
            return layer(*args)
        except _PASS_THROUGH:
            raise
        except Exception as error:
            raise self._locate(layer, args, error) from error

    def _locate(self, layer: Module, inputs: Any, error: Exception) -> ChainError:
        path = layer.get_path()
        excerpt = render_tree(self, depth=1, marked=layer)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)  # pyright: ignore[reportUnknownVariableType]
        message = (
            f"{type(error).__name__} in {path}: {error}\n\n"
            f"{excerpt}\n\n"
            f"inputs of {path}: {describe_inputs(inputs)}"  # pyright: ignore[reportUnknownArgumentType]
        )
        return ChainError(message, path=path, original_type=type(error))

    # -- context -----------------------------------------------------------------------------------------------

    @property
    def provider(self) -> ContextProvider:
        root: Module = self
        while (parent := root.parent) is not None:
            root = parent
        assert isinstance(root, Chain)
        return root._provider

    def set_context(self, context: str, value: Contexts | dict[str, Any]) -> None:
        """Merge `value` into the context `context` of this Chain's tree (see `refiners.fluxion.context`)."""
        self.provider.set_context(context, value)

    def _subtree_contexts(self) -> Contexts:
        provider = ContextProvider()
        provider.add_defaults(self.init_context())
        for module, _ in self.walk(Chain, recurse=True):
            provider.add_defaults(module.init_context())
        return provider.contexts

    # -- structure ---------------------------------------------------------------------------------------------

    def _regenerate_keys(self, modules: Iterable[Module]) -> None:
        modules = list(modules)
        for module in modules:
            if not isinstance(module, Module):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise TypeError(
                    f"{self.__class__.__name__} children must be refiners.fluxion Modules, got "
                    f"{type(module).__name__}. Wrap plain torch modules or functions, e.g. `fl.Lambda(func)`."
                )
        counts = Counter(type(module).__name__ for module in modules)
        seen: Counter[str] = Counter()
        keyed: dict[str, Module] = {}
        for module in modules:
            name = type(module).__name__
            seen[name] += 1
            keyed[f"{name}_{seen[name]}" if counts[name] > 1 else name] = module
        for module in modules:
            self._adopt(module)
        self._modules = keyed

    def _adopt(self, module: Module) -> None:
        if module.parent is self or module is self._foreign_child:
            return
        if (current := module.parent) is not None and any(child is module for child in current):
            raise ValueError(
                f"cannot add {module.__class__.__name__} to {self.__class__.__name__}: it already belongs to "
                f"{current.get_path()} (a module has one parent). Remove it there first "
                f"(`parent.remove(module)` or `parent.pop(index)`), or add a copy (`module.structural_copy()`)."
            )
        module._set_parent(self)
        if isinstance(module, Chain):
            self.provider.add_defaults(module._provider.contexts)

    def _release(self, module: Module) -> None:
        if module.parent is not self:
            return
        module._set_parent(None)
        if isinstance(module, Chain):
            module._provider = ContextProvider()
            module._provider.add_defaults(module._subtree_contexts())

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __contains__(self, module: object) -> bool:
        return any(child is module for child in self._modules.values())

    @overload
    def __getitem__(self, key: int | str) -> Module: ...

    @overload
    def __getitem__(self, key: slice) -> Self: ...

    def __getitem__(self, key: int | str | slice) -> Module | Self:
        """A child by position or key (a dotted key goes down the tree); a slice is a structural copy."""
        if isinstance(key, slice):
            copy = self.structural_copy()
            kept = list(copy)[key]
            for module in copy:
                if all(module is not k for k in kept):
                    copy._release(module)
            copy._regenerate_keys(kept)
            return copy
        if isinstance(key, int):
            return list(self._modules.values())[key]
        head, _, rest = key.partition(".")
        if head not in self._modules:
            raise KeyError(f"{self.__class__.__name__} has no child {head!r}; its children are {list(self._modules)}")
        child = self._modules[head]
        if not rest:
            return child
        if not isinstance(child, Chain):
            raise KeyError(f"{child.get_path()} is not a Chain: cannot look up {rest!r} in it")
        return child[rest]

    def key_of(self, module: Module) -> str:
        """The key of a child in this Chain."""
        for key, child in self._modules.items():
            if child is module:
                return key
        raise ValueError(f"{module.__class__.__name__} is not a child of {self.get_path()}")

    def layer(self, key: int | str | Sequence[int | str], layer_type: type[T] = Module) -> T:
        """A layer by position or (dotted) key, or by a path of those (`("Sum", "Chain_2", 0)`), checked to be a `layer_type`."""
        steps: Sequence[int | str] = (key,) if isinstance(key, int | str) else key
        module: Module = self
        for step in steps:
            if not isinstance(step, int | str):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise TypeError(
                    f"a layer's key is an int (position), a str (key, dotted or not) or a tuple of those, got "
                    f"{type(step).__name__} ({step!r}) in {key!r}"
                )
            if not isinstance(module, Chain):
                raise KeyError(f"{module.get_path()} is not a Chain: cannot look up {step!r} in it")
            module = module[step]
        if not isinstance(module, layer_type):
            raise TypeError(f"{module.get_path()} is a {type(module).__name__}, not a {layer_type.__name__}")
        return module

    @overload
    def walk(self, predicate: type[T], recurse: bool = False) -> Iterator[tuple[T, "Chain"]]: ...  # pragma: no cover

    @overload
    def walk(
        self, predicate: Callable[[Module, "Chain"], bool] | None = None, recurse: bool = False
    ) -> Iterator[tuple[Module, "Chain"]]: ...  # pragma: no cover

    def walk(
        self, predicate: type[T] | Callable[[Module, "Chain"], bool] | None = None, recurse: bool = False
    ) -> Iterator[tuple[Any, "Chain"]]:
        """Yield `(module, parent)` for every module of the tree (depth first) that matches `predicate`.

        Args:
            predicate: A layer type, or a function of `(module, parent)`; None matches every module. A function
                that raises `StopIteration` skips that module and everything below it.
            recurse: Also look inside the Chains that match (non-matching Chains are always searched).

        The tree may be edited during the walk (e.g. to inject adapters on what it yields): each level is read
        before its modules are yielded.
        """
        if predicate is None:
            match: Callable[[Module, Chain], bool] = lambda _module, _parent: True  # noqa: E731
        elif isinstance(predicate, type):
            layer_type = predicate
            match = lambda module, _parent: isinstance(module, layer_type)  # noqa: E731
        else:
            match = predicate
        for child in list(self):
            try:
                matched = match(child, self)
            except StopIteration:
                continue  # the predicate's way to prune this subtree (as in the original Refiners)
            if matched:
                yield child, self
            if isinstance(child, Chain) and (recurse or not matched):
                yield from child.walk(match, recurse)

    def layers(self, layer_type: type[T], recurse: bool = False) -> Iterator[T]:
        """Every module of type `layer_type` in the tree (see `walk`)."""
        for module, _ in self.walk(layer_type, recurse):
            yield module

    def find(self, layer_type: type[T]) -> T | None:
        """The first module of type `layer_type` in the tree (depth first), or None."""
        return next(self.layers(layer_type), None)

    def ensure_find(self, layer_type: type[T]) -> T:
        """Like `find`, but raise when there is none."""
        found = self.find(layer_type)
        if found is None:
            present = sorted({type(module).__name__ for module, _ in self.walk(recurse=True)})
            raise LookupError(f"no {layer_type.__name__} in {self.get_path()}; it contains: {present}")
        return found

    def find_parent(self, module: Module) -> "Chain | None":
        """The Chain of this tree that has `module` as a child, or None."""
        if module in self:
            return self
        for chain, _ in self.walk(Chain, recurse=True):
            if module in chain:
                return chain
        return None

    def ensure_find_parent(self, module: Module) -> "Chain":
        """Like `find_parent`, but raise when `module` is not in this tree."""
        parent = self.find_parent(module)
        if parent is None:
            raise LookupError(f"{module.__class__.__name__} is not in the tree of {self.get_path()}")
        return parent

    def insert(self, index: int, module: Module) -> None:
        """Insert `module` at position `index` (negative counts from the end, as for lists)."""
        modules = list(self)
        if index < 0:
            index = max(0, len(modules) + index + 1)
        modules.insert(index, module)
        self._regenerate_keys(modules)

    def append(self, module: Module) -> None:
        """Add `module` at the end."""
        self.insert(len(self), module)

    def _index_of_type(self, module_type: type[Module]) -> int:
        for index, child in enumerate(self):
            if isinstance(child, module_type):
                return index
        raise ValueError(
            f"{self.get_path()} has no child of type {module_type.__name__}; its children are: "
            f"{[type(child).__name__ for child in self]}"
        )

    def insert_before_type(self, module_type: type[Module], module: Module) -> None:
        """Insert `module` right before the first child of type `module_type`."""
        self.insert(self._index_of_type(module_type), module)

    def insert_after_type(self, module_type: type[Module], module: Module) -> None:
        """Insert `module` right after the first child of type `module_type`."""
        self.insert(self._index_of_type(module_type) + 1, module)

    def pop(self, index: int = -1) -> Module:
        """Remove and return the child at `index`; it leaves the tree (no parent)."""
        modules = list(self)
        module = modules.pop(index)
        self._release(module)
        self._regenerate_keys(modules)
        return module

    def remove(self, module: Module) -> None:
        """Remove the child `module`; it leaves the tree (no parent)."""
        self.pop(self._index_of(module))

    def _index_of(self, module: Module) -> int:
        for index, child in enumerate(self):
            if child is module:
                return index
        raise ValueError(f"{module.__class__.__name__} is not a child of {self.get_path()}")

    def replace(self, old_module: Module, new_module: Module) -> None:
        """Put `new_module` in place of the child `old_module`, which leaves the tree."""
        modules = list(self)
        index = self._index_of(old_module)
        self._release(old_module)
        modules[index] = new_module
        self._regenerate_keys(modules)

    def structural_copy(self) -> Self:
        """A new tree of Chains with the same structure, whose layers share this tree's weights."""
        memo: dict[int, Module] = {}
        clone = self._structural_copy(memo)
        for module in [clone, *(m for m, _ in clone.walk(recurse=True))]:
            module._remap_after_copy(memo)
        return clone

    def _structural_copy(self, memo: dict[int, Module]) -> Self:
        children = [child._structural_copy(memo) for child in self]
        clone = super()._structural_copy(memo)
        clone._set_parent(None)
        clone._modules = {}
        clone._provider = ContextProvider()
        clone._regenerate_keys(children)
        clone._provider.add_defaults(self.provider.contexts if self.parent is None else self._subtree_contexts())
        return clone

    # -- reading -----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device of the first weight of the tree (CPU when it has none)."""
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point weight of the tree (float32 when it has none)."""
        for tensor in [*self.parameters(), *self.buffers()]:
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    def __repr__(self) -> str:
        return render_tree(self)

    def __str__(self) -> str:
        return render_tree(self)


def _flatten(args: Iterable[Module | Iterable[Module]]) -> list[Module]:
    modules: list[Module] = []
    for arg in args:
        if isinstance(arg, Module):
            modules.append(arg)
        elif isinstance(arg, Iterable):  # pyright: ignore[reportUnnecessaryIsInstance]
            modules.extend(_flatten(arg))  # pyright: ignore[reportArgumentType]
        else:
            raise TypeError(f"Chain children must be Modules or iterables of Modules, got {type(arg).__name__}")
    return modules
