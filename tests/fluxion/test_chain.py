"""Chain: construction, keys, tree API, combinators, structural copies."""

import pytest
import torch

import refiners.fluxion.layers as fl


class Block(fl.Chain):
    def __init__(self, width: int = 4) -> None:
        super().__init__(fl.Linear(width, width), fl.ReLU())


def make_model() -> fl.Chain:
    return fl.Chain(fl.Linear(4, 4), Block(), fl.Linear(4, 4), fl.Chain(fl.SiLU(), Block()))


def test_keys_follow_class_names_with_suffix_for_repeats() -> None:
    model = make_model()
    assert list(model._modules) == ["Linear_1", "Block", "Linear_2", "Chain"]
    assert list(model.state_dict()) == [
        "Linear_1.weight",
        "Linear_1.bias",
        "Block.Linear.weight",
        "Block.Linear.bias",
        "Linear_2.weight",
        "Linear_2.bias",
        "Chain.Block.Linear.weight",
        "Chain.Block.Linear.bias",
    ]


def test_forward_equals_the_same_computation_in_torch() -> None:
    model = make_model()
    x = torch.randn(3, 4)
    linear_1, block, linear_2, chain = model
    assert isinstance(linear_1, fl.Linear) and isinstance(linear_2, fl.Linear)
    inner = chain.layer("Block.Linear", fl.Linear)
    block_linear = model.layer("Block.Linear", fl.Linear)
    expected = torch.relu(block_linear(linear_1(x)))
    expected = linear_2(expected)
    expected = torch.relu(inner(torch.nn.functional.silu(expected)))
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert isinstance(block, Block)


def test_construction_from_generators_and_nested_iterables() -> None:
    model = fl.Chain((fl.Linear(2, 2) for _ in range(3)), [fl.ReLU(), fl.SiLU()])
    assert [type(m).__name__ for m in model] == ["Linear", "Linear", "Linear", "ReLU", "SiLU"]
    assert list(model._modules)[:3] == ["Linear_1", "Linear_2", "Linear_3"]


def test_non_module_child_is_rejected() -> None:
    with pytest.raises(TypeError, match="must be Modules"):
        fl.Chain(torch.nn.Linear(2, 2))  # pyright: ignore[reportArgumentType]


def test_indexing_by_position_key_and_path() -> None:
    model = make_model()
    assert model[0] is model["Linear_1"]
    assert model[-1] is model["Chain"]
    assert model["Chain.Block.Linear"] is model.layer("Chain.Block.Linear", fl.Linear)
    with pytest.raises(KeyError, match="has no child 'Nope'"):
        model["Nope"]
    with pytest.raises(TypeError, match="not a Conv2d"):
        model.layer(0, fl.Conv2d)


def test_slice_is_a_structural_copy_sharing_weights() -> None:
    model = make_model()
    head = model[:2]
    assert type(head) is fl.Chain
    assert len(head) == 2 and len(model) == 4
    linear = head.layer(0, fl.Linear)
    assert linear is not model[0]
    assert linear.weight is model.layer(0, fl.Linear).weight
    assert linear.parent is head and model[0].parent is model
    x = torch.randn(1, 4)
    torch.testing.assert_close(head(x), model[1](model[0](x)), atol=0, rtol=0)


def test_structural_copy_is_a_new_tree_with_shared_weights() -> None:
    model = make_model()
    clone = model.structural_copy()
    originals = [m for m, _ in model.walk()]
    copies = [m for m, _ in clone.walk()]
    assert len(originals) == len(copies)
    assert all(a is not b for a, b in zip(originals, copies, strict=True))
    assert all(b.parent is not None and b.parent is not a.parent for a, b in zip(originals, copies, strict=True))
    for (name, p), (name_copy, p_copy) in zip(model.named_parameters(), clone.named_parameters(), strict=True):
        assert name == name_copy and p is p_copy
    clone.pop(0)
    assert len(model) == 4 and repr(model) == repr(make_model())


def test_walk_layers_find() -> None:
    model = make_model()
    linears = list(model.layers(fl.Linear))
    assert len(linears) == 4
    pairs = list(model.walk(Block))
    assert [parent for _, parent in pairs] == [model, model["Chain"]]
    # Non-matching chains are searched; matching ones only with recurse=True.
    assert len(list(model.walk(Block))) == 2
    assert len(list(model.walk(lambda m, _: isinstance(m, fl.Chain)))) == 2  # Chain.Block is inside a match
    assert len(list(model.walk(lambda m, _: isinstance(m, fl.Chain), recurse=True))) == 3
    assert model.find(fl.SiLU) is model["Chain.SiLU"]
    assert model.find(fl.Conv2d) is None
    with pytest.raises(LookupError, match="no Conv2d in Chain; it contains"):
        model.ensure_find(fl.Conv2d)
    inner_linear = model["Chain.Block.Linear"]
    assert model.find_parent(inner_linear) is model["Chain.Block"]
    assert model.ensure_find_parent(inner_linear) is model["Chain.Block"]
    with pytest.raises(LookupError, match="not in the tree"):
        model.ensure_find_parent(fl.ReLU())


def test_walk_allows_editing_the_tree_while_walking() -> None:
    model = make_model()
    for linear, parent in model.walk(fl.Linear):
        parent.replace(linear, fl.Chain(fl.Linear(4, 4), fl.Linear(4, 4)))
    assert len(list(model.layers(fl.Linear))) == 8


def test_insert_append_pop_remove_replace() -> None:
    model = fl.Chain(fl.Linear(2, 2), fl.ReLU())
    silu = fl.SiLU()
    model.insert(1, silu)
    assert [type(m) for m in model] == [fl.Linear, fl.SiLU, fl.ReLU]
    assert silu.parent is model
    model.insert(-1, fl.Sigmoid())  # -1 is the end, as for `list.insert(len, x)` with negative counting from the end
    assert type(model[-1]) is fl.Sigmoid
    model.insert_before_type(fl.ReLU, fl.GeLU())
    assert [type(m) for m in model] == [fl.Linear, fl.SiLU, fl.GeLU, fl.ReLU, fl.Sigmoid]
    model.insert_after_type(fl.Linear, fl.Linear(2, 2))
    assert list(model._modules)[:2] == ["Linear_1", "Linear_2"]
    popped = model.pop()
    assert type(popped) is fl.Sigmoid and popped.parent is None
    model.remove(silu)
    assert silu.parent is None and silu not in model
    relu = model.ensure_find(fl.ReLU)
    tanh_like = fl.Sigmoid()
    model.replace(relu, tanh_like)
    assert relu.parent is None and tanh_like.parent is model
    model.append(relu)
    assert model[-1] is relu


def test_insert_type_errors_list_children() -> None:
    model = fl.Chain(fl.Linear(2, 2))
    with pytest.raises(ValueError, match=r"has no child of type Conv2d; its children are: \['Linear'\]"):
        model.insert_after_type(fl.Conv2d, fl.ReLU())
    with pytest.raises(ValueError, match="has no child of type Conv2d"):
        model.insert_before_type(fl.Conv2d, fl.ReLU())


def test_adding_a_module_that_already_has_a_parent_fails_with_the_way_out() -> None:
    linear = fl.Linear(2, 2)
    first = fl.Chain(linear)
    with pytest.raises(ValueError, match=r"already belongs to Chain.*parent.remove\(module\).*structural_copy"):
        fl.Chain(linear)
    other = fl.Chain()
    with pytest.raises(ValueError, match="already belongs to"):
        other.append(linear)
    first.remove(linear)
    other.append(linear)
    assert linear.parent is other


def test_len_iter_contains_device_dtype() -> None:
    model = make_model()
    assert len(model) == 4
    assert list(iter(model)) == list(model._modules.values())
    assert model[0] in model and fl.ReLU() not in model
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    half = fl.Chain(fl.Linear(2, 2, dtype=torch.float16))
    assert half.dtype == torch.float16
    assert fl.Chain(fl.ReLU()).device == torch.device("cpu")


def test_combinators_equal_their_definitions() -> None:
    a, b = fl.Linear(4, 4), fl.Linear(4, 4)
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    wa, wb = a.structural_copy(), b.structural_copy()
    parallel_out = fl.Parallel(a, b)(x)
    torch.testing.assert_close(parallel_out, (wa(x), wb(x)), atol=0, rtol=0)
    a2, b2 = wa.structural_copy(), wb.structural_copy()
    torch.testing.assert_close(fl.Distribute(a2, b2)(x, y), (wa(x), wb(y)), atol=0, rtol=0)
    torch.testing.assert_close(fl.Sum(wa.structural_copy(), wb.structural_copy())(x), wa(x) + wb(x), atol=0, rtol=0)
    torch.testing.assert_close(fl.Residual(wa.structural_copy())(x), x + wa(x), atol=0, rtol=0)
    cat = fl.Concatenate(wa.structural_copy(), wb.structural_copy(), dim=1)(x)
    torch.testing.assert_close(cat, torch.cat([wa(x), wb(x)], dim=1), atol=0, rtol=0)
    matmul = fl.Matmul(wa.structural_copy(), fl.Lambda(lambda t: t.transpose(0, 1)))(x)
    torch.testing.assert_close(matmul, wa(x) @ x.T, atol=0, rtol=0)
    assert fl.Passthrough(wa.structural_copy(), fl.ReLU())(x) is x
    torch.testing.assert_close(fl.Lambda(torch.tanh)(x), torch.tanh(x), atol=0, rtol=0)
    with pytest.raises(fl.ChainError, match="distributes its inputs one per child"):
        fl.Chain(fl.Distribute(fl.ReLU(), fl.ReLU()))(x)


def test_tuple_outputs_are_unpacked_into_the_next_layer() -> None:
    model = fl.Chain(fl.Lambda(lambda x: (x, 2 * x)), fl.Lambda(lambda a, b: a + b))
    x = torch.randn(3)
    torch.testing.assert_close(model(x), 3 * x, atol=0, rtol=0)


def test_return_ends_the_enclosing_chain_early() -> None:
    calls: list[str] = []
    inner = fl.Chain(fl.Lambda(lambda x: x + 1), fl.Return(), fl.Lambda(lambda x: calls.append("skipped") or x))
    model = fl.Chain(inner, fl.Lambda(lambda x: x * 10))
    assert model(torch.tensor(1.0)).item() == 20.0
    assert calls == []


def test_empty_chain_is_identity() -> None:
    x = torch.randn(2)
    assert fl.Chain()(x) is x
