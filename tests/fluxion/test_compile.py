"""`torch.compile(fullgraph=True)` traces a Chain with contexts, a Residual and an injected LoRA without graph breaks."""

import torch

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import SingleLoraAdapter
from refiners.fluxion.context import Contexts


class Conditioned(fl.Chain):
    def init_context(self) -> Contexts:
        return {"conditioning": {"bias": None, "hidden": None}}


def make_model() -> Conditioned:
    return Conditioned(
        fl.Linear(16, 32),
        fl.SetContext("conditioning", "hidden"),
        fl.Residual(fl.Linear(32, 32), fl.SiLU()),
        fl.Sum(fl.Identity(), fl.UseContext("conditioning", "bias")),
        fl.Chain(fl.Sum(fl.Identity(), fl.UseContext("conditioning", "hidden")), fl.GeLU()),
        fl.Linear(32, 8),
    )


def reference(model: Conditioned, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    first = model.layer("Linear_1", fl.Linear)
    residual = model.layer("Residual.Linear", fl.Linear)
    last = model.layer("Linear_2", fl.Linear)
    hidden = first(x)
    y = hidden + torch.nn.functional.silu(residual(hidden)) + bias
    return last(torch.nn.functional.gelu(y + hidden))


def test_compile_fullgraph_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model = make_model()
    linear = model.layer("Residual.Linear", fl.Linear)
    adapter = SingleLoraAdapter(target=linear, rank=4).inject()
    for parameter in adapter.parameters():
        torch.nn.init.normal_(parameter, std=0.1)  # non-zero up projection: the LoRA changes the output
    bias = torch.randn(32)
    model.set_context("conditioning", {"bias": bias})
    x = torch.randn(2, 16)
    expected = model(x)

    explanation = torch._dynamo.explain(model)(x)  # pyright: ignore[reportPrivateImportUsage]
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=1e-6)  # per-call context state did not leak

    adapter.eject()
    torch.testing.assert_close(model(x), reference(model, x, bias), atol=1e-6, rtol=1e-6)
