"""LoRA: outputs against the merged-weight formula and PEFT, fuse/unfuse exactness, named LoRAs, eject, errors."""

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model  # pyright: ignore[reportMissingTypeStubs]

import refiners.fluxion.adapters.lora as lora_module
import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import (
    Conv2dLora,
    LinearLora,
    Lora,
    LoraAdapter,
    SingleLoraAdapter,
    add_loras_to,
    lora_parameters,
)
from refiners.fluxion.layers.conv import PaddingMode

ATOL, RTOL = 1e-5, 1e-5


def randomize(lora: Lora[Any], seed: int) -> None:
    """Give `up` (zero at creation) random values, so that the LoRA changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        up = lora.up.weight
        up.copy_(torch.randn(up.shape, generator=generator, dtype=torch.float32).to(up.dtype))


def reference_delta(lora: Lora[Any]) -> torch.Tensor:
    """`scale * alpha / rank * up @ down`, written out in torch (a 1x1 `up` kernel contracts over the rank)."""
    down, up = lora.down.weight.detach().float(), lora.up.weight.detach().float()
    factor = lora.scale * lora.alpha / lora.rank
    if down.dim() == 2:
        return factor * up @ down
    return factor * torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)


def snapshot(model: fl.Chain) -> tuple[str, list[fl.Module], dict[str, torch.Tensor]]:
    return repr(model), [m for m, _ in model.walk()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_tree(model: fl.Chain, before: tuple[str, list[fl.Module], dict[str, torch.Tensor]]) -> None:
    text, modules, state = before
    assert repr(model) == text
    now = [m for m, _ in model.walk()]
    assert len(now) == len(modules) and all(a is b for a, b in zip(now, modules, strict=True))
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# -- outputs against the formula -------------------------------------------------------------------------------


@pytest.mark.parametrize(("alpha", "scale"), [(None, 1.0), (8.0, 0.5), (2.0, -1.5)])
def test_linear_lora_adds_the_merged_weight_update(alpha: float | None, scale: float) -> None:
    model = fl.Chain(fl.Linear(12, 7), fl.ReLU())
    linear = model.layer(0, fl.Linear)
    adapter = SingleLoraAdapter(target=linear, rank=3, alpha=alpha, scale=scale).inject()
    randomize(adapter.lora, seed=1)
    x = torch.randn(5, 12)
    merged = linear.weight + reference_delta(adapter.lora)
    expected = torch.relu(x @ merged.T + linear.bias)
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=RTOL)
    assert adapter.lora.factor == scale * (3 if alpha is None else alpha) / 3


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "padding_mode"),
    [(1, 1, 1, "zeros"), (2, 1, 1, "zeros"), (1, 2, 2, "zeros"), (2, 0, 1, "zeros"), (1, 1, 1, "reflect")],
)
def test_conv2d_lora_convolves_with_the_merged_kernel(
    stride: int, padding: int, dilation: int, padding_mode: PaddingMode
) -> None:
    conv = fl.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode)
    model = fl.Chain(conv)
    adapter = SingleLoraAdapter(target=conv, rank=2, alpha=4.0, scale=0.75).inject()
    lora = adapter.lora
    assert isinstance(lora, Conv2dLora)
    assert (lora.stride, lora.padding, lora.dilation, lora.padding_mode) == (
        conv.stride,
        conv.padding,
        conv.dilation,
        padding_mode,
    )
    randomize(lora, seed=2)
    x = torch.randn(2, 4, 9, 9)
    kernel = conv.weight + reference_delta(lora)
    if padding_mode == "reflect":
        expected = F.conv2d(F.pad(x, (padding,) * 4, mode="reflect"), kernel, conv.bias, stride, 0, dilation)
    else:
        expected = F.conv2d(x, kernel, conv.bias, stride, padding, dilation)
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=RTOL)


def test_a_fresh_lora_is_initialised_like_peft_and_changes_nothing() -> None:
    base = torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.Conv2d(3, 5, 3, padding=1))
    torch.manual_seed(0)
    peft_model: Any = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"]))
    peft_layers: list[Any] = [peft_model.base_model.model[0], peft_model.base_model.model[1]]

    linear, conv = fl.Linear(12, 7), fl.Conv2d(3, 5, 3, padding=1)
    model = fl.Chain(fl.Chain(linear), fl.Chain(conv))
    x, image = torch.randn(3, 12), torch.randn(2, 3, 6, 6)
    expected_linear, expected_conv = linear(x), conv(image)
    # PEFT draws lora_A, then lora_B, then re-initialises lora_A, layer after layer: the same draws as ours.
    torch.manual_seed(0)
    adapters = [SingleLoraAdapter(linear, rank=4, alpha=8).inject(), SingleLoraAdapter(conv, rank=4, alpha=8).inject()]
    for adapter, peft_layer in zip(adapters, peft_layers, strict=True):
        assert torch.equal(adapter.lora.down.weight, peft_layer.lora_A["default"].weight)
        assert torch.equal(adapter.lora.up.weight, peft_layer.lora_B["default"].weight)
        assert not adapter.lora.up.weight.any()
    assert torch.equal(model.layer(0, fl.Chain)(x), expected_linear)
    assert torch.equal(model.layer(1, fl.Chain)(image), expected_conv)


# -- PEFT ------------------------------------------------------------------------------------------------------


def flatten(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def peft_reference_and_ours() -> tuple[Any, fl.Chain]:
    base = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3, stride=2, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 10),
        torch.nn.ReLU(),
        torch.nn.Linear(10, 5),
    )
    config = LoraConfig(r=3, lora_alpha=7, target_modules=["0", "2", "4", "6"], init_lora_weights=False)
    peft_model: Any = get_peft_model(base, config)
    ours = fl.Chain(
        fl.Conv2d(3, 6, 3, padding=1),
        fl.ReLU(),
        fl.Conv2d(6, 4, 3, stride=2, padding=1),
        fl.Lambda(flatten),
        fl.Linear(4 * 4 * 4, 10),
        fl.ReLU(),
        fl.Linear(10, 5),
    )
    for index, layer in enumerate(ours):
        if isinstance(layer, fl.Linear | fl.Conv2d):
            base_layer = peft_model.base_model.model[index].base_layer
            with torch.no_grad():
                layer.weight.copy_(base_layer.weight)
                assert layer.bias is not None
                layer.bias.copy_(base_layer.bias)
    for index, layer in enumerate(list(ours)):
        if isinstance(layer, fl.Linear | fl.Conv2d):
            peft_layer = peft_model.base_model.model[index]
            lora = Lora.from_weights(
                "default", down=peft_layer.lora_A["default"].weight, up=peft_layer.lora_B["default"].weight, alpha=7
            )
            LoraAdapter(layer, lora).inject()
    return peft_model, ours


def test_outputs_match_peft_on_linear_and_conv_layers() -> None:
    peft_model, ours = peft_reference_and_ours()
    assert len(list(ours.layers(LoraAdapter))) == 4
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = peft_model(x)
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=RTOL)


def test_fused_weights_match_peft_merged_weights() -> None:
    peft_model, ours = peft_reference_and_ours()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = peft_model(x)
    merged: Any = peft_model.merge_and_unload()
    adapters = list(ours.layers(LoraAdapter))
    for adapter in adapters:
        adapter.fuse()
    fused_targets = [adapter.target for adapter in adapters]
    peft_targets = [layer for layer in merged if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d)]
    for target, peft_target in zip(fused_targets, peft_targets, strict=True):
        torch.testing.assert_close(target.weight, peft_target.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=RTOL)


# -- named LoRAs -----------------------------------------------------------------------------------------------


def test_named_loras_each_with_their_scale() -> None:
    linear = fl.Linear(6, 4)
    model = fl.Chain(linear)
    style, subject = LinearLora("style", 6, 4, rank=2), LinearLora("subject", 6, 4, rank=3, alpha=1.5, scale=0.25)
    adapter = LoraAdapter(linear, style, subject).inject()
    randomize(style, seed=3)
    randomize(subject, seed=4)
    x = torch.randn(3, 6)

    def expected(*loras: Lora[Any]) -> torch.Tensor:
        weight = linear.weight + sum((reference_delta(lora) for lora in loras), torch.zeros(4, 6))
        return x @ weight.T + linear.bias

    assert adapter.names == ["style", "subject"] and adapter.loras == {"style": style, "subject": subject}
    assert adapter.scales == {"style": 1.0, "subject": 0.25}
    torch.testing.assert_close(model(x), expected(style, subject), atol=ATOL, rtol=RTOL)

    adapter.set_scale("style", -2.0)
    assert style.scale == -2.0 and adapter.scales == {"style": -2.0, "subject": 0.25}
    torch.testing.assert_close(model(x), expected(style, subject), atol=ATOL, rtol=RTOL)

    removed = adapter.remove_lora("subject")
    assert removed is subject and subject.parent is None and adapter.names == ["style"]
    torch.testing.assert_close(model(x), expected(style), atol=ATOL, rtol=RTOL)

    adapter.add_lora(subject)
    assert adapter.names == ["style", "subject"] and subject.parent is adapter
    torch.testing.assert_close(model(x), expected(style, subject), atol=ATOL, rtol=RTOL)


def test_loras_can_be_added_and_removed_before_inject_without_touching_the_model() -> None:
    model = fl.Chain(fl.Linear(6, 4), fl.ReLU())
    before = snapshot(model)
    linear = model.layer(0, fl.Linear)
    adapter = LoraAdapter(linear, LinearLora("a", 6, 4, rank=2))
    adapter.add_lora(LinearLora("b", 6, 4, rank=2))
    adapter.remove_lora("a")
    assert linear.parent is model and adapter.names == ["b"]
    assert_same_tree(model, before)
    adapter.inject()
    assert linear.parent is adapter and model[0] is adapter
    adapter.eject()
    assert_same_tree(model, before)


# -- fuse / unfuse ---------------------------------------------------------------------------------------------

FORWARD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fuse_folds_loras_into_the_weight_and_unfuse_restores_it_bit_for_bit(kind: str, dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    target = fl.Linear(16, 8, dtype=dtype) if kind == "linear" else fl.Conv2d(4, 8, 3, padding=1, dtype=dtype)
    model = fl.Chain(target)
    adapter = LoraAdapter(
        target,
        Lora.from_target("a", target, rank=4, alpha=2.0),
        Lora.from_target("b", target, rank=2, scale=0.5),
    ).inject()
    for seed, lora in enumerate(adapter.loras.values()):
        randomize(lora, seed)
    x = torch.randn(3, 16, dtype=dtype) if kind == "linear" else torch.randn(2, 4, 6, 6, dtype=dtype)
    parameter, original = target.weight, target.weight.detach().clone()
    unfused_output = model(x)

    adapter.fuse()
    assert all(lora.is_fused for lora in adapter.loras.values())
    deltas = reference_delta(adapter.loras["a"]) + reference_delta(adapter.loras["b"])
    expected_weight = (original.float() + deltas).to(dtype)  # computed in float32, rounded once
    torch.testing.assert_close(target.weight, expected_weight, atol=1e-6, rtol=1e-6)
    tolerance = FORWARD_TOLERANCE[dtype]
    torch.testing.assert_close(model(x), unfused_output, atol=tolerance, rtol=tolerance)

    adapter.unfuse("a")
    expected_weight = (original.float() + reference_delta(adapter.loras["b"])).to(dtype)
    torch.testing.assert_close(target.weight, expected_weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), unfused_output, atol=tolerance, rtol=tolerance)

    adapter.unfuse()
    assert target.weight is parameter and target.weight.dtype == dtype
    assert torch.equal(target.weight, original)
    assert torch.equal(model(x), unfused_output)


def test_a_thousand_fuse_unfuse_cycles_leave_the_weight_bit_identical() -> None:
    target = fl.Linear(8, 8, dtype=torch.bfloat16)
    adapter = SingleLoraAdapter(target, rank=2, scale=0.3)
    randomize(adapter.lora, seed=6)
    original = target.weight.detach().clone()
    for _ in range(1000):
        adapter.fuse()
        adapter.unfuse()
    assert torch.equal(target.weight, original)


def test_a_model_cast_while_fused_unfuses_to_its_cast_original_weight() -> None:
    model = fl.Chain(fl.Linear(8, 8))
    adapter = SingleLoraAdapter(model.layer(0, fl.Linear), rank=2)
    adapter.inject()
    randomize(adapter.lora, seed=6)
    original = adapter.target.weight.detach().clone()
    adapter.fuse()
    model.to(dtype=torch.bfloat16)
    adapter.unfuse()
    assert torch.equal(adapter.target.weight, original.to(torch.bfloat16))


def test_a_fused_lora_is_not_applied_again_and_follows_its_scale() -> None:
    linear = fl.Linear(6, 4)
    model = fl.Chain(linear)
    adapter = SingleLoraAdapter(linear, rank=2).inject()
    randomize(adapter.lora, seed=7)
    original = linear.weight.detach().clone()
    x = torch.randn(3, 6)

    def expected() -> torch.Tensor:
        return x @ (original + reference_delta(adapter.lora)).T + linear.bias

    adapter.fuse("default")
    adapter.fuse()  # fusing a fused LoRA changes nothing
    torch.testing.assert_close(model(x), expected(), atol=ATOL, rtol=RTOL)
    adapter.set_scale("default", 3.0)  # re-fused at the new scale
    torch.testing.assert_close(linear.weight, original + reference_delta(adapter.lora), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), expected(), atol=ATOL, rtol=RTOL)
    lora = adapter.remove_lora("default")  # removing a fused LoRA unfuses it
    assert not lora.is_fused and torch.equal(linear.weight, original)


@pytest.mark.parametrize("order", ["first_fused_first", "last_fused_first"])
def test_stacked_adapters_fuse_and_unfuse_in_any_order(order: str) -> None:
    linear = fl.Linear(6, 4, dtype=torch.float16)
    model = fl.Chain(linear)
    first = SingleLoraAdapter(linear, rank=2, name="first").inject()
    second = SingleLoraAdapter(linear, rank=3, name="second").inject()
    randomize(first.lora, seed=8)
    randomize(second.lora, seed=9)
    original = linear.weight.detach().clone()
    first.fuse()
    second.fuse()
    both = (original.float() + reference_delta(first.lora) + reference_delta(second.lora)).to(torch.float16)
    torch.testing.assert_close(linear.weight, both, atol=1e-6, rtol=1e-6)
    leaving, staying = (first, second) if order == "first_fused_first" else (second, first)
    leaving.unfuse()
    one = (original.float() + reference_delta(staying.lora)).to(torch.float16)
    torch.testing.assert_close(linear.weight, one, atol=1e-6, rtol=1e-6)
    staying.unfuse()
    assert torch.equal(linear.weight, original)
    assert model[0] is first


# -- eject -----------------------------------------------------------------------------------------------------


def make_model() -> fl.Chain:
    return fl.Chain(fl.Linear(6, 6), fl.ReLU(), fl.Chain(fl.Conv2d(6, 6, 1), fl.Linear(6, 3)))


def test_eject_restores_the_tree_exactly_even_when_fused() -> None:
    model = make_model()
    before = snapshot(model)
    adapters = add_loras_to(model, fl.Linear, rank=2)
    add_loras_to(model, fl.Linear, rank=3, name="other")
    assert repr(model) != before[0]
    for adapter in adapters:
        for lora in adapter.loras.values():
            randomize(lora, seed=10)
        adapter.fuse("other")
    for adapter in adapters:
        adapter.eject()
    assert_same_tree(model, before)


@pytest.mark.parametrize("eject_first", ["outer", "inner"])
def test_stacked_adapters_eject_in_any_order(eject_first: str) -> None:
    model = make_model()
    before = snapshot(model)
    linear = model.layer("Chain.Linear", fl.Linear)
    outer = SingleLoraAdapter(linear, rank=2, name="outer").inject()
    inner = SingleLoraAdapter(linear, rank=2, name="inner").inject()
    assert model["Chain.SingleLoraAdapter"] is outer and outer[0] is inner and inner[0] is linear
    randomize(outer.lora, seed=11)
    randomize(inner.lora, seed=12)
    x = torch.randn(2, 6)
    hidden = model.layer(0, fl.Linear)(x).relu()
    expected = hidden @ (linear.weight + reference_delta(outer.lora) + reference_delta(inner.lora)).T + linear.bias
    torch.testing.assert_close(
        model.layer("Chain.SingleLoraAdapter", LoraAdapter)(hidden), expected, atol=ATOL, rtol=RTOL
    )

    first, second = (outer, inner) if eject_first == "outer" else (inner, outer)
    first.eject()
    remaining = model.layer("Chain.SingleLoraAdapter", LoraAdapter)
    assert remaining is second and second.target is linear and linear.parent is second
    expected = hidden @ (linear.weight + reference_delta(second.lora)).T + linear.bias
    torch.testing.assert_close(remaining(hidden), expected, atol=ATOL, rtol=RTOL)
    second.eject()
    assert_same_tree(model, before)


# -- add_loras_to, lora_parameters -----------------------------------------------------------------------------


class Scaler(fl.Module):
    """Not a LoRA, though its parameter is named like one."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_x = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lora_x


def test_add_loras_to_selects_layers_and_reuses_existing_adapters() -> None:
    model = make_model()
    convs = add_loras_to(model, lambda layer, _parent: isinstance(layer, fl.Conv2d), rank=2, alpha=4.0)
    assert [type(lora) for adapter in convs for lora in adapter.loras.values()] == [Conv2dLora]
    linears = add_loras_to(model, fl.Linear, rank=2)
    everything = add_loras_to(model, fl.WeightedModule, rank=1, name="second")
    assert len(linears) == 2 and len(everything) == 3
    assert {id(a) for a in everything} == {id(a) for a in [*convs, *linears]}
    for adapter in everything:
        assert adapter.names == ["default", "second"]
        assert not any(isinstance(module, LoraAdapter) for module, _ in adapter.walk())  # no adapter in an adapter
    assert all(lora.alpha == 4.0 for adapter in convs for lora in adapter.loras.values() if lora.name == "default")


def test_lora_parameters_are_found_by_type() -> None:
    model = fl.Chain(make_model(), Scaler())
    adapters = add_loras_to(model, fl.Linear, rank=2)
    adapters[0].add_lora(LinearLora("extra", 6, 6, rank=1))
    expected = [weight for adapter in adapters for lora in adapter.loras.values() for weight in lora.parameters()]
    found = lora_parameters(model)
    assert len(found) == len(expected) == 6
    assert {id(p) for p in found} == {id(p) for p in expected}
    scaler = model.layer(1, Scaler)
    assert all(p is not scaler.lora_x for p in found)
    assert "Scaler.lora_x" in dict(model.named_parameters())
    assert lora_parameters(adapters[0].loras["extra"]) == list(adapters[0].loras["extra"].parameters())


# -- the seed README -------------------------------------------------------------------------------------------


class ViT(fl.Chain):
    """The seed README's toy ViT, small."""

    def __init__(self, embedding_dim: int = 16, patch_size: int = 4, image_size: int = 8, num_layers: int = 2) -> None:
        num_patches = image_size // patch_size
        super().__init__(
            fl.Conv2d(in_channels=3, out_channels=embedding_dim, kernel_size=patch_size, stride=patch_size),
            fl.Reshape(num_patches**2, embedding_dim),
            fl.Residual(fl.Parameter(num_patches**2, embedding_dim)),
            *(
                fl.Chain(
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(
                        fl.Parallel(fl.Identity(), fl.Identity(), fl.Identity()),
                        fl.Attention(
                            embedding_dim=embedding_dim,
                            num_heads=2,
                            key_embedding_dim=embedding_dim,
                            value_embedding_dim=embedding_dim,
                        ),
                    ),
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(
                        fl.Linear(embedding_dim, embedding_dim * 4),
                        fl.GeLU(),
                        fl.Linear(embedding_dim * 4, embedding_dim),
                    ),
                )
                for _ in range(num_layers)
            ),
            fl.Reshape(embedding_dim, num_patches, num_patches),
        )


def test_seed_readme_loop_puts_loras_on_attention_linears() -> None:
    torch.manual_seed(13)
    vit = ViT()
    reference = copy.deepcopy(vit)
    x = torch.randn(2, 3, 8, 8)
    before = vit(x)

    for layer in vit.layers(fl.Attention):
        for linear, parent in layer.walk(fl.Linear):
            SingleLoraAdapter(target=linear, rank=64).inject(parent)

    adapters = list(vit.layers(SingleLoraAdapter))
    assert len(adapters) == 2 * 4  # query, key, value and output projections of both blocks
    assert all(isinstance(adapter.parent, fl.Distribute | fl.Attention) for adapter in adapters)
    assert torch.equal(vit(x), before)
    # The reference: the same ViT with each projection's weight replaced by W + scale * alpha / rank * up @ down.
    reference_linears = [
        linear for attention in reference.layers(fl.Attention) for linear, _ in attention.walk(fl.Linear)
    ]
    for index, (adapter, reference_linear) in enumerate(zip(adapters, reference_linears, strict=True)):
        randomize(adapter.lora, seed=index)
        with torch.no_grad():
            adapter.lora.up.weight.mul_(0.01)
            reference_linear.weight.add_(reference_delta(adapter.lora))
    torch.testing.assert_close(vit(x), reference(x), atol=ATOL, rtol=RTOL)
    assert len(lora_parameters(vit)) == 2 * len(adapters)


# -- docstring examples ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("documented", [lora_module, LoraAdapter, SingleLoraAdapter], ids=lambda d: d.__name__)
def test_docstring_examples_run(documented: Any) -> None:
    examples = re.findall(r"```py\n(.*?)```", documented.__doc__, flags=re.DOTALL)
    assert examples
    for example in examples:
        exec(compile(_dedent(example), f"<{documented.__name__} example>", "exec"), {})


def _dedent(code: str) -> str:
    lines = code.splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


# -- errors ----------------------------------------------------------------------------------------------------


def test_a_lora_that_does_not_fit_its_target_is_refused_with_both_shapes() -> None:
    model = fl.Chain(fl.Linear(8, 6), fl.Conv2d(3, 4, 3))
    linear, conv = model.layer(0, fl.Linear), model.layer(1, fl.Conv2d)
    with pytest.raises(
        ValueError,
        match=r"LinearLora 'x' \(down \(2, 8\), up \(5, 2\)\) does not fit Linear at Chain.Linear \(weight \(6, 8\)\): the LoRA maps 8 to 5 features, the layer maps 8 to 6",
    ):
        LoraAdapter(linear, LinearLora("x", 8, 5, rank=2))
    with pytest.raises(
        ValueError,
        match=r"the LoRA maps 3 to 4 channels with a \(1, 1\) kernel, the layer maps 3 to 4 channels with a \(3, 3\) kernel",
    ):
        LoraAdapter(conv, Conv2dLora("x", 3, 4, rank=2))
    adapter = SingleLoraAdapter(linear, rank=2)
    with pytest.raises(ValueError, match=r"Conv2dLora 'c' .* a Conv2dLora updates a Conv2d, not a Linear"):
        adapter.add_lora(Conv2dLora("c", 8, 6, rank=2))
    assert not LinearLora("x", 8, 5).is_compatible(linear) and LinearLora("x", 8, 6).is_compatible(linear)


def test_from_weights_checks_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"down \(4, 8\) and up \(6, 3\) disagree on the rank"):
        Lora.from_weights("x", down=torch.zeros(4, 8), up=torch.zeros(6, 3))
    with pytest.raises(ValueError, match=r"must both be matrices \(Linear\) or both 4D kernels \(Conv2d\)"):
        Lora.from_weights("x", down=torch.zeros(4, 8), up=torch.zeros(6, 4, 1, 1))
    with pytest.raises(ValueError, match=r"a Conv2d LoRA's `up` must be a 1x1 kernel"):
        Lora.from_weights("x", down=torch.zeros(4, 8, 3, 3), up=torch.zeros(6, 4, 3, 3))
    with pytest.raises(TypeError, match=r"LinearLora.from_weights got weights of a Conv2dLora"):
        LinearLora.from_weights("x", down=torch.zeros(4, 8, 3, 3), up=torch.zeros(6, 4, 1, 1))


def test_unknown_or_repeated_names_are_refused() -> None:
    adapter = LoraAdapter(fl.Linear(4, 4), LinearLora("a", 4, 4, rank=1), LinearLora("b", 4, 4, rank=1))
    calls: list[Callable[[], object]] = [
        lambda: adapter.set_scale("c", 1.0),
        lambda: adapter.remove_lora("c"),
        lambda: adapter.fuse("c"),
        lambda: adapter.unfuse("c"),
    ]
    for call in calls:
        with pytest.raises(LookupError, match=r"LoraAdapter has no LoRA named 'c'; its LoRAs are \['a', 'b'\]"):
            call()
    with pytest.raises(ValueError, match=r"LoRA names must be distinct within an adapter: \['a'\]"):
        adapter.add_lora(LinearLora("a", 4, 4, rank=1))
    with pytest.raises(ValueError, match=r"LoRA names must be distinct within an adapter: \['x'\]"):
        LoraAdapter(fl.Linear(4, 4), LinearLora("x", 4, 4), LinearLora("x", 4, 4))


def test_unsupported_targets_and_ranks_are_refused() -> None:
    model = fl.Chain(fl.Conv2d(4, 4, 3, groups=2), fl.ConvTranspose2d(4, 4, 3), fl.Linear(4, 4), fl.ReLU())
    with pytest.raises(ValueError, match=r"Chain.Conv2d: it is a grouped convolution \(groups=2\)"):
        SingleLoraAdapter(model.layer(0, fl.Conv2d))
    with pytest.raises(
        TypeError, match=r"Chain.ConvTranspose2d: it is a ConvTranspose2d, and LoRAs update Linear and Conv2d"
    ):
        SingleLoraAdapter(model.layer(1, fl.ConvTranspose2d))
    with pytest.raises(TypeError, match=r"Conv2dLora cannot update Chain.Linear, a Linear: use LinearLora.from_target"):
        Conv2dLora.from_target("x", model.layer(2, fl.Linear))
    with pytest.raises(ValueError, match=r"LoRA 'x': rank must be a positive integer, got 0"):
        LinearLora("x", 4, 4, rank=0)
    with pytest.raises(TypeError, match=r"add_loras_to selected Chain.ReLU, a ReLU: LoRAs update Linear and Conv2d"):
        add_loras_to(model, lambda layer, _parent: isinstance(layer, fl.ReLU))
    with pytest.raises(LookupError, match=r"add_loras_to found no layer to update in Chain"):
        add_loras_to(model, fl.MultiLinear)  # pyright: ignore[reportArgumentType]
    adapter = SingleLoraAdapter(model.layer(2, fl.Linear), rank=1)
    adapter.add_lora(LinearLora("b", 4, 4, rank=1))
    with pytest.raises(LookupError, match=r"holds 2 LoRAs \(\['default', 'b'\]\); use `loras\[name\]`"):
        _ = adapter.lora
