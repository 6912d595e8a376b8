"""A tour of refiners.fluxion in one run: Chain, tree editing, LoRA inject/eject, and the Context API.

It follows the FOSDEM 2024 talk: the same small model, the same edits. Every claim it prints is also asserted.

Usage:
    uv run python examples/framework_demo.py
"""

import torch

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import SingleLoraAdapter
from refiners.fluxion.context import Contexts
from refiners.fluxion.utils import manual_seed

__all__ = ["BasicModel", "ConvLayer", "HiddenLayer", "OutputLayer", "MyProvider", "main"]

channels, kernel_size = 128, 3
hidden_layer_in, hidden_layer_out, output_size = 21632, 200, 10


class BasicModel(fl.Chain):
    """The talk's model: no `forward` to write, the constructor lays out what it computes."""

    def __init__(self) -> None:
        super().__init__(
            fl.Conv2d(1, channels, kernel_size),
            fl.ReLU(),
            fl.MaxPool2d(2),
            fl.Flatten(start_dim=1),
            fl.Linear(hidden_layer_in, hidden_layer_out),
            fl.ReLU(),
            fl.Linear(hidden_layer_out, output_size),
            fl.Lambda(lambda x: torch.nn.functional.softmax(x, dim=0)),
        )


class ConvLayer(fl.Chain):
    pass


class HiddenLayer(fl.Chain):
    pass


class OutputLayer(fl.Chain):
    pass


class MyProvider(fl.Chain):
    """A Chain that provides the context "my context" to every layer below it."""

    def init_context(self) -> Contexts:
        return {"my context": {"my key": None}}


def section(title: str) -> None:
    print(f"\n=== {title} ===")


def main() -> None:
    manual_seed(0)
    x = torch.randn(4, 1, 28, 28)

    section("1. Chain: a model is its constructor")
    m = BasicModel()
    print(repr(m))
    with torch.no_grad():
        y = m(x)
    print(f"output: {tuple(y.shape)}, column sums (softmax over dim 0): {y.sum(dim=0)[:3].tolist()}...")

    section("2. Edit the tree: insert, pop, insert_after_type, append")
    m.insert(0, ConvLayer(m.pop(0), m.pop(0), m.pop(0)))
    m.insert_after_type(ConvLayer, HiddenLayer(m.pop(1), m.pop(1), m.pop(1)))
    m.append(OutputLayer(m.pop(2), m.pop(2)))
    print(repr(m))
    with torch.no_grad():
        torch.testing.assert_close(m(x), y, atol=0, rtol=0)
    print("same layers, same weights, same output; new state-dict keys:", list(m.state_dict())[:2], "...")

    section("3. Adapter: inject a LoRA into every Linear, then eject it")
    adapters = [SingleLoraAdapter(target=linear, rank=4).inject(parent) for linear, parent in m.walk(fl.Linear)]
    print(repr(m))
    with torch.no_grad():
        torch.testing.assert_close(m(x), y, atol=0, rtol=0)
        print("a fresh LoRA starts as a no-op (its `up` is zero): output unchanged")
        for adapter in adapters:
            torch.nn.init.normal_(adapter.lora.up.weight, std=0.1)
        adapted = m(x)
    change = (adapted - y).abs().max().item()
    assert change > 0
    print(f"with trained-looking LoRA weights the output moves: max |change| = {change:.3g}")
    for adapter in adapters:
        adapter.eject()
    with torch.no_grad():
        torch.testing.assert_close(m(x), y, atol=0, rtol=0)
    assert all(isinstance(layer, fl.Linear) for layer in (m.HiddenLayer[1], m.OutputLayer[0]))
    print("after eject: the original Linears are back in place and the output is exactly the same")

    section("4. Context: pass data to deeply nested layers")
    provider = MyProvider(
        fl.Chain(
            fl.Sum(
                fl.UseContext("my context", "my key"),
                fl.Lambda(lambda: 2),
            ),
            fl.SetContext("my context", "my key"),
        ),
        fl.Chain(
            fl.UseContext("my context", "my key"),
            fl.Lambda(print),
        ),
    )
    provider.set_context("my context", {"my key": 4})
    print("m() prints: ", end="")
    provider()  # prints 6


if __name__ == "__main__":
    main()
