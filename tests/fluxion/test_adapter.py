"""The Adapter API: inject, eject, stacking, exact restoration."""

import pytest
import torch

import refiners.fluxion.layers as fl


class Double(fl.Chain, fl.Adapter[fl.Linear]):
    def __init__(self, target: fl.Linear) -> None:
        with self.setup_adapter(target):
            super().__init__(target, fl.Lambda(lambda x: 2 * x))


class AddOne(fl.Chain, fl.Adapter[fl.Linear]):
    def __init__(self, target: fl.Linear) -> None:
        with self.setup_adapter(target):
            super().__init__(target, fl.Lambda(lambda x: x + 1))


def make_model() -> fl.Chain:
    return fl.Chain(fl.Linear(3, 3), fl.ReLU(), fl.Chain(fl.Linear(3, 3), fl.SiLU()))


def snapshot(model: fl.Chain) -> tuple[str, list[fl.Module], dict[str, torch.Tensor]]:
    return repr(model), [m for m, _ in model.walk()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_tree(model: fl.Chain, before: tuple[str, list[fl.Module], dict[str, torch.Tensor]]) -> None:
    text, modules, state = before
    assert repr(model) == text
    now = [m for m, _ in model.walk()]
    assert len(now) == len(modules) and all(a is b for a, b in zip(now, modules, strict=True))
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    for module, parent in model.walk():
        assert module.parent is parent


def test_setup_does_not_touch_the_model_and_inject_eject_restore_it() -> None:
    model = make_model()
    before = snapshot(model)
    target = model.layer("Chain.Linear", fl.Linear)
    x = torch.randn(2, 3)
    expected = model(x)
    adapter = Double(target)
    assert target.parent is model["Chain"]
    assert_same_tree(model, before)
    assert adapter.inject() is adapter
    assert model["Chain.Double"] is adapter and target.parent is adapter and adapter.parent is model["Chain"]
    hidden = torch.relu(model.layer(0, fl.Linear)(x))
    torch.testing.assert_close(model(x), torch.nn.functional.silu(2 * target(hidden)), atol=0, rtol=0)
    adapter.eject()
    assert adapter.parent is None and adapter.target is target
    assert_same_tree(model, before)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    adapter.inject()  # an ejected adapter can be injected again
    adapter.eject()
    assert_same_tree(model, before)


@pytest.mark.parametrize("order", ["inner first", "outer first"])
def test_stacked_adapters_eject_in_any_order(order: str) -> None:
    model = make_model()
    before = snapshot(model)
    target = model.layer(0, fl.Linear)
    x = torch.randn(2, 3)
    first = Double(target).inject()
    second = AddOne(target).inject()
    assert second.parent is first and target.parent is second
    torch.testing.assert_close(model[0](x), 2 * (target(x) + 1), atol=0, rtol=0)
    if order == "inner first":
        second.eject()
        assert target.parent is first
        torch.testing.assert_close(model[0](x), 2 * target(x), atol=0, rtol=0)
        first.eject()
    else:
        first.eject()
        assert model[0] is second and second.parent is model
        torch.testing.assert_close(model[0](x), target(x) + 1, atol=0, rtol=0)
        second.eject()
    assert_same_tree(model, before)


def test_inject_into_a_chain_that_does_not_hold_the_target_fails_clearly() -> None:
    model = make_model()
    adapter = Double(model.layer(0, fl.Linear))
    with pytest.raises(ValueError, match=r"not a child of it \(the target is in Chain\)"):
        adapter.inject(model.layer("Chain", fl.Chain))
    lone = Double(fl.Linear(3, 3))
    with pytest.raises(ValueError, match=r"is in no Chain. Pass the Chain to inject into"):
        lone.inject()
    adapter.inject()
    with pytest.raises(ValueError, match="already injected"):
        adapter.inject()
    adapter.eject()
    with pytest.raises(ValueError, match="not injected"):
        adapter.eject()


def test_adapter_must_be_a_chain() -> None:
    class NotAChain(fl.Adapter[fl.Linear]):
        def __init__(self, target: fl.Linear) -> None:
            with self.setup_adapter(target):
                pass

    with pytest.raises(TypeError, match="must also be a Chain subclass"):
        NotAChain(fl.Linear(1, 1))


def test_fosdem_my_adapter_example() -> None:
    # The FOSDEM slide, with its `fl.Chain(...)` filled in.
    class MyAdapter(fl.Sum, fl.Adapter[fl.Linear]):
        def __init__(self, target: fl.Linear) -> None:
            with self.setup_adapter(target):
                super().__init__(fl.Chain(fl.Linear(target.in_features, target.out_features)), target)

    my_model = fl.Chain(fl.Conv2d(1, 2, 3), fl.Flatten(start_dim=1), fl.Linear(8, 4), fl.ReLU())
    before = snapshot(my_model)
    x = torch.randn(1, 1, 4, 4)
    expected = my_model(x)

    # Find the target and its parent in the chain.
    # For simplicity let us assume it is the only Linear.
    for target, parent in my_model.walk(fl.Linear):  # noqa: B007
        break

    adapter = MyAdapter(target)  # pyright: ignore[reportPossiblyUnboundVariable]
    torch.testing.assert_close(my_model(x), expected, atol=0, rtol=0)  # the original chain is unmodified
    adapter.inject(parent)  # pyright: ignore[reportPossiblyUnboundVariable]
    added = adapter.layer("Chain.Linear", fl.Linear)
    flat = torch.flatten(my_model[0](x), 1)
    torch.testing.assert_close(my_model(x), torch.relu(added(flat) + target(flat)), atol=0, rtol=0)  # pyright: ignore[reportPossiblyUnboundVariable]
    adapter.eject()
    assert_same_tree(my_model, before)


def test_structural_copy_of_an_injected_adapter_points_at_the_copied_target() -> None:
    model = make_model()
    adapter = Double(model.layer(0, fl.Linear)).inject()
    clone = model.structural_copy()
    clone_adapter = clone.layer("Double", Double)
    assert clone_adapter is not adapter
    assert clone_adapter.target is clone["Double.Linear"]
    assert clone_adapter.target.weight is adapter.target.weight
    clone_adapter.eject()
    assert isinstance(clone[0], fl.Linear) and isinstance(model[0], Double)
