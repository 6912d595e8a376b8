"""The Context API: one rule of `refiners.fluxion.context` per test, and the FOSDEM `MyProvider` example."""

from typing import Any

import pytest
import torch

import refiners.fluxion.layers as fl
from refiners.fluxion.context import ContextError, Contexts


class MyProvider(fl.Chain):
    def init_context(self) -> Contexts:
        return {"my context": {"my key": None}}


def make_my_provider() -> MyProvider:
    # The FOSDEM slide, as written.
    return MyProvider(
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


def test_fosdem_my_provider_prints_6(capsys: pytest.CaptureFixture[str]) -> None:
    m = make_my_provider()
    m.set_context("my context", {"my key": 4})
    m()  # prints 6
    assert capsys.readouterr().out == "6\n"


def test_rule_1_init_context_declares_defaults_held_by_the_root() -> None:
    m = make_my_provider()
    assert m.provider.contexts == {"my context": {"my key": None}}
    inner = m.layer(0, fl.Chain)
    assert inner.provider is m.provider


def test_rule_2_a_chain_joining_a_tree_brings_its_contexts_and_keeps_existing_values() -> None:
    class Provider(fl.Chain):
        def init_context(self) -> Contexts:
            return {"shared": {"a": 1}, "own": {"b": 2}}

    root = fl.Chain(fl.Chain())
    root.set_context("shared", {"a": 10})
    root.append(Provider(fl.UseContext("shared", "a")))
    assert root.provider.contexts == {"shared": {"a": 10}, "own": {"b": 2}}
    assert root(None) == 10


def test_rule_2_an_adapter_injected_later_sees_its_new_ancestors_contexts() -> None:
    class Scale(fl.Chain, fl.Adapter[fl.Linear]):
        def __init__(self, target: fl.Linear) -> None:
            with self.setup_adapter(target):
                super().__init__(
                    target, fl.Lambda(lambda x: x), fl.Sum(fl.Identity(), fl.UseContext("scaling", "offset"))
                )

    class Model(fl.Chain):
        def init_context(self) -> Contexts:
            return {"scaling": {"offset": torch.tensor(5.0)}}

    linear = fl.Linear(2, 2)
    model = Model(fl.Chain(linear))
    adapter = Scale(linear)
    with pytest.raises(RuntimeError):  # not injected: the adapter's own tree provides no "scaling"
        adapter(torch.zeros(1, 2))
    adapter.inject()
    x = torch.randn(1, 2)
    torch.testing.assert_close(model(x), linear(x) + 5.0, atol=0, rtol=0)


def test_rule_3_set_context_from_outside_merges_and_persists() -> None:
    model = fl.Chain(fl.UseContext("c", "x"))
    model.set_context("c", {"x": 1, "y": 2})
    model.set_context("c", {"x": 3})
    assert model.provider.contexts["c"] == {"x": 3, "y": 2}
    assert model() == 3
    assert model() == 3


def test_rule_4_use_and_set_context_work_at_any_depth() -> None:
    deep_set = fl.Chain(fl.Chain(fl.Chain(fl.SetContext("c", "x"))))
    deep_use = fl.Chain(fl.Chain(fl.UseContext("c", "x")))
    model = fl.Chain(deep_set, deep_use)
    model.set_context("c", {"x": None})
    x = torch.randn(2)
    assert model(x) is x


def test_rule_4_unknown_context_or_key_lists_what_is_provided() -> None:
    model = make_my_provider()
    model.append(fl.UseContext("other context", "k"))
    model.set_context("my context", {"my key": 4})
    with pytest.raises(
        fl.ChainError, match=r"no context named 'other context'.*Provided contexts: 'my context' \(keys: \['my key'\]\)"
    ):
        model()
    model = fl.Chain(fl.UseContext("my context", "missing"))
    model.set_context("my context", {"my key": 1})
    with pytest.raises(fl.ChainError, match=r"context 'my context' has no key 'missing'; it has: \['my key'\]") as info:
        model()
    assert info.value.original_type is ContextError


def test_use_context_outside_of_any_chain_says_so() -> None:
    with pytest.raises(RuntimeError, match="is not inside a Chain"):
        fl.UseContext("c", "k")()


def test_rule_5_what_a_forward_writes_does_not_leak_into_the_next() -> None:
    m = make_my_provider()
    m.set_context("my context", {"my key": 4})
    m.pop()  # drop the print
    m.append(fl.UseContext("my context", "my key"))
    assert m() == 6
    assert m() == 6  # not 8: the 6 written during the first call was per-call state
    assert m.provider.contexts["my context"]["my key"] == 4


def test_rule_5_store_is_restored_even_when_the_forward_raises() -> None:
    def boom(_: Any) -> None:
        raise ValueError("boom")

    model = fl.Chain(fl.SetContext("c", "x"), fl.Lambda(boom))
    model.set_context("c", {"x": 0})
    with pytest.raises(fl.ChainError, match="boom"):
        model(1)
    assert model.provider.contexts["c"]["x"] == 0
    assert not model.provider.in_forward


def test_rule_5_calling_a_subchain_directly_is_also_scoped() -> None:
    inner = fl.Chain(fl.SetContext("c", "x"))
    model = fl.Chain(inner)
    model.set_context("c", {"x": 0})
    inner(42)
    assert model.provider.contexts["c"]["x"] == 0


def test_set_context_callback_updates_the_stored_value() -> None:
    model = fl.Chain(
        fl.SetContext("c", "seen", callback=lambda seen, x: seen.append(x)),
        fl.UseContext("c", "seen"),
    )
    model.set_context("c", {"seen": []})
    assert model(1) == [1]


def test_use_context_compose() -> None:
    model = fl.Chain(fl.UseContext("c", "x").compose(lambda x: x * 2).compose(lambda x: x + 1))
    model.set_context("c", {"x": 5})
    assert model() == 11


def test_rule_6_a_detached_chain_gets_a_store_of_its_own() -> None:
    class Provider(fl.Chain):
        def init_context(self) -> Contexts:
            return {"own": {"k": "default"}}

    child = Provider(fl.UseContext("own", "k"))
    root = fl.Chain(child)
    root.set_context("own", {"k": "from root"})
    assert root() == "from root"
    root.remove(child)
    assert child.provider is not root.provider
    assert child() == "default"
    assert "own" in root.provider.contexts  # the root keeps what it had


def test_rule_5_in_place_mutation_of_a_list_does_not_leak() -> None:
    model = fl.Chain(
        fl.SetContext("c", "seen", callback=lambda seen, x: seen.append(x)),
        fl.UseContext("c", "seen"),
    )
    model.set_context("c", {"seen": []})
    assert model(1) == [1]
    assert model(2) == [2]
    assert model.provider.contexts["c"]["seen"] == []
