"""Layers that read and write the Context store from anywhere in a tree (see `refiners.fluxion.context`)."""

from collections.abc import Callable
from typing import Any, Self

from refiners.fluxion.context import lookup_key
from refiners.fluxion.layers.module import ContextModule

__all__ = ["UseContext", "SetContext"]


class UseContext(ContextModule):
    """Output the value stored under `key` in the context `context`; the layer's inputs are ignored.

    Args:
        context: The context name.
        key: The key in that context.
    """

    def __init__(self, context: str, key: str) -> None:
        super().__init__()
        self.context = context
        self.key = key
        self.func: Callable[[Any], Any] = lambda x: x

    def forward(self, *args: Any) -> Any:
        return self.func(lookup_key(self.use_context(self.context), self.context, self.key))

    def compose(self, func: Callable[[Any], Any]) -> Self:
        """Apply `func` to the value read (composed after any function set before); returns this layer."""
        previous = self.func
        self.func = lambda x: func(previous(x))
        return self


class SetContext(ContextModule):
    """Store this layer's input under `key` in the context `context`, and pass the input through.

    Args:
        context: The context name.
        key: The key in that context.
        callback: If given, called as `callback(current_value, input)` instead of storing the input (e.g. to append
            to a list held in the context).
    """

    def __init__(self, context: str, key: str, callback: Callable[[Any, Any], Any] | None = None) -> None:
        super().__init__()
        self.context = context
        self.key = key
        self.callback = callback

    def forward(self, x: Any, *args: Any) -> Any:
        context = self.use_context(self.context)
        if self.callback is None:
            context[self.key] = x
        else:
            self.callback(lookup_key(context, self.context, self.key), x)
        return (x, *args) if args else x
