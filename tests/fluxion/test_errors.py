"""An exception raised inside a layer tells where: path, tree excerpt with the layer marked, input summary."""

import pytest
import torch
import torch.utils.checkpoint

import refiners.fluxion.layers as fl


class Encoder(fl.Chain):
    def __init__(self) -> None:
        super().__init__(fl.Linear(8, 4), fl.ReLU(), fl.Linear(16, 2))


def test_error_names_the_path_marks_the_layer_and_summarizes_inputs() -> None:
    model = fl.Chain(fl.Linear(8, 8), Encoder())
    with pytest.raises(fl.ChainError) as info:
        model(torch.randn(3, 8))
    error = info.value
    message = str(error)
    assert error.path == "Chain.Encoder.Linear_2"
    assert error.original_type is RuntimeError
    assert isinstance(error.__cause__, RuntimeError)
    assert message.startswith("RuntimeError in Chain.Encoder.Linear_2: ")
    assert "(3x4 and 16x2)" in message
    marked = [line for line in message.splitlines() if "<-- failed here" in line]
    assert marked == ["  └── Linear(in_features=16, out_features=2, device=cpu, dtype=float32) #2  <-- failed here"]
    assert "(CHAIN) Encoder()" in message
    assert "inputs of Chain.Encoder.Linear_2: Tensor(shape=(3, 4), dtype=float32, device=cpu)" in message


def test_error_in_a_combinator_child_is_located_once() -> None:
    model = fl.Chain(fl.Sum(fl.Linear(4, 4), fl.Linear(3, 4)))
    with pytest.raises(fl.ChainError) as info:
        model(torch.randn(2, 4))
    assert info.value.path == "Chain.Sum.Linear_2"
    assert str(info.value).count("<-- failed here") == 1


def test_error_summarizes_several_inputs_of_any_type() -> None:
    def fail(x: torch.Tensor, y: int) -> torch.Tensor:
        raise ValueError("bad value")

    model = fl.Chain(fl.Lambda(lambda x: (x, 3)), fl.Lambda(fail))
    with pytest.raises(fl.ChainError, match=r"ValueError in Chain.Lambda_2: bad value") as info:
        model(torch.zeros(2, dtype=torch.int64))
    assert "Tensor(shape=(2,), dtype=int64, device=cpu), 3" in str(info.value)


def test_activation_checkpointing_early_stop_passes_through_chains() -> None:
    # torch.utils.checkpoint stops recomputation early by raising an internal exception through the layers: a Chain
    # must not wrap it, or the backward fails.
    model = fl.Chain(fl.Linear(4, 4), fl.Chain(fl.ReLU(), fl.Linear(4, 4)), fl.Linear(4, 1))
    x = torch.randn(3, 4, requires_grad=True)
    with torch.utils.checkpoint.set_checkpoint_early_stop(True):
        checkpointed = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    checkpointed.sum().backward()
    assert x.grad is not None
    expected_grad = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(x.grad, expected_grad, atol=0, rtol=0)
