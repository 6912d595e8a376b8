"""The Context API: a store of named contexts that any layer of a tree can read and write.

Rules (each one is tested in `tests/fluxion/test_context.py`):

1. A tree has one store, held by its root Chain. Every Chain declares the contexts it provides, with their default
   values, in `init_context()`.
2. When a Chain joins a tree (built into it, inserted, or injected as an adapter), the contexts it declares that the
   tree does not have yet are added to the tree's store; values already in the store are kept. This is how an
   adapter injected later sees the contexts of its new ancestors, and brings its own.
3. `set_context(name, value)` from outside a forward updates the root's store: the keys of `value` are merged into
   the context `name` (created if absent). These values persist from one call to the next.
4. `UseContext`/`SetContext` (and `use_context`/`set_context` called by a layer during a forward) read and write the
   root's store, at any depth. Reading a context or key that nobody provides is an error that lists what is
   provided.
5. What a forward writes into the store is per-call state: when the outermost forward returns (or raises), the
   store is restored to what it was before the call, so nothing leaks from one forward into the next. This holds for
   lists, dicts and sets mutated in place too (the forward works on copies of them; tensors are shared).
6. A Chain detached from its tree (popped, removed, ejected) gets a store of its own again, rebuilt from the
   `init_context()` of its subtree.
"""

from typing import Any

Context = dict[str, Any]
Contexts = dict[str, Context]

__all__ = ["Context", "Contexts", "ContextError", "ContextProvider"]


class ContextError(KeyError):
    """A context or key that nobody provides. Its message lists what is provided."""

    def __str__(self) -> str:
        return str(self.args[0])


class ContextProvider:
    """The store of a tree of Chains: named contexts, each a dict of keys to values."""

    def __init__(self) -> None:
        self.contexts: Contexts = {}
        self._forward_depth = 0

    def set_context(self, name: str, value: Context) -> None:
        """Merge the keys of `value` into the context `name`, creating it if needed."""
        self.contexts.setdefault(name, {}).update(value)

    def add_defaults(self, contexts: Contexts) -> None:
        """Add the contexts and keys the store does not have yet; keep the values it has."""
        for name, defaults in contexts.items():
            context = self.contexts.setdefault(name, {})
            for key, value in defaults.items():
                context.setdefault(key, value)

    def get_context(self, name: str) -> Context:
        """The context `name`; a clear error listing what is provided if nobody provides it."""
        try:
            return self.contexts[name]
        except KeyError:
            provided = ", ".join(f"{n!r} (keys: {sorted(c)})" for n, c in self.contexts.items()) or "none"
            raise ContextError(
                f"no context named {name!r} is provided in this tree. Provided contexts: {provided}. "
                f"Declare it in the `init_context()` of an ancestor Chain, or call "
                f"`model.set_context({name!r}, {{...}})` before the forward."
            ) from None

    @property
    def in_forward(self) -> bool:
        return self._forward_depth > 0

    def enter_forward(self) -> Contexts:
        """Start a forward: returns the snapshot that `exit_forward` restores (rule 5).

        The forward works on a copy of the store in which lists, dicts and sets are copied too, so that a layer that
        mutates one in place (e.g. `SetContext(callback=lambda shapes, x: shapes.append(x))`) leaves the snapshot intact.
        Tensors and other values are shared, not copied.
        """
        self._forward_depth += 1
        snapshot = self.contexts
        self.contexts = {
            name: {key: _copy_container(value) for key, value in context.items()} for name, context in snapshot.items()
        }
        return snapshot

    def exit_forward(self, snapshot: Contexts) -> None:
        self._forward_depth -= 1
        if self._forward_depth == 0:
            self.contexts = snapshot


def _copy_container(value: Any) -> Any:
    if isinstance(value, (list, dict, set)):  # a tuple, not `list | dict | set`: torch.compile cannot trace unions
        return value.copy()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return value


def lookup_key(context: Context, context_name: str, key: str) -> Any:
    """`context[key]`, with an error that lists the keys the context has."""
    try:
        return context[key]
    except KeyError:
        raise ContextError(
            f"context {context_name!r} has no key {key!r}; it has: {sorted(context)}. "
            f"Set it with `model.set_context({context_name!r}, {{{key!r}: ...}})` or a `SetContext` earlier in "
            f"the forward."
        ) from None
