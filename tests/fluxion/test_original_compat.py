"""Regressions found by running the original Refiners' framework tests against ours (issue #16).

Bugs, then calls that ran in the original and must not silently mean something else here (each one either keeps the
original's meaning or fails with a message), then the original's pieces that were missing.
"""

import inspect
from typing import Any

import pytest
import torch

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import Conv2dLora, LinearLora, LoraAdapter, SingleLoraAdapter
from refiners.foundationals.clip.common import FeedForward, TransformerLayer
from refiners.foundationals.clip.text_encoder import (
    CLIPTextEncoder,
    CLIPTextEncoderG,
    CLIPTextEncoderH,
    CLIPTextEncoderL,
)
from refiners.foundationals.latent_diffusion.cross_attention import CrossAttentionBlock2d

# -- bugs ------------------------------------------------------------------------------------------------------------


def test_structural_copy_remaps_targets_of_nested_adapters() -> None:
    model = fl.Chain(fl.Chain(fl.Linear(4, 4)))
    linear = model.layer("Chain.Linear", fl.Linear)
    SingleLoraAdapter(target=linear, rank=2).inject()
    copy = model.structural_copy()
    adapter = copy.layer("Chain.SingleLoraAdapter", SingleLoraAdapter)
    assert adapter.target is not linear and adapter.target.weight is linear.weight
    adapter.eject()
    assert copy.layer("Chain.Linear", fl.Linear) is adapter.target
    # The original tree still holds its own adapter, untouched.
    assert isinstance(model.layer("Chain.SingleLoraAdapter"), SingleLoraAdapter)
    model.layer("Chain.SingleLoraAdapter", SingleLoraAdapter).eject()
    assert model.layer("Chain.Linear", fl.Linear) is linear


def test_slicing_remaps_targets_of_nested_adapters() -> None:
    model = fl.Chain(fl.Chain(fl.Linear(4, 4)), fl.ReLU())
    SingleLoraAdapter(target=model.layer("Chain.Linear", fl.Linear), rank=2).inject()
    head = model[:1]
    head.layer("Chain.SingleLoraAdapter", SingleLoraAdapter).eject()
    assert isinstance(head.layer("Chain.Linear"), fl.Linear)


def test_assigning_a_module_to_a_chain_attribute_is_refused() -> None:
    chain = fl.Chain(fl.Linear(2, 2))
    x = torch.randn(1, 2)
    before = chain(x)
    with pytest.raises(ValueError, match=r"cannot assign a Linear to Chain\.proj: .*`self\.proj = \[module\]`"):
        chain.proj = chain.Linear
    assert list(chain.state_dict()) == ["Linear.weight", "Linear.bias"]
    assert torch.equal(chain(x), before)
    chain.held = [chain.Linear]  # the way to hold a module without registering it
    assert len(chain) == 1


def test_replacing_a_child_by_its_key_is_still_allowed() -> None:
    # torch's wrappers (FSDP's auto-wrapping, activation checkpointing) replace children with setattr.
    chain = fl.Chain(fl.Linear(2, 2), fl.ReLU())
    identity = fl.Identity()
    chain.ReLU = identity
    assert chain[1] is identity


def test_lora_adapter_scale_assignment_sets_the_scales() -> None:
    linear = fl.Linear(8, 4)
    model = fl.Chain(linear)
    adapter = LoraAdapter(linear, LinearLora("a", 8, 4, rank=2), LinearLora("b", 8, 4, rank=2)).inject()
    with torch.no_grad():
        for lora in adapter.loras.values():
            lora.up.weight.normal_()
    x = torch.randn(3, 8)
    adapter.scale = {"a": 0.0}  # the original's spelling
    assert adapter.scales == {"a": 0.0, "b": 1.0}
    adapter.scales = {"b": 0.0}
    assert adapter.scales == {"a": 0.0, "b": 0.0}
    torch.testing.assert_close(model(x), linear(x), atol=0, rtol=0)
    with pytest.raises(LookupError, match=r"no LoRA named 'c'; its LoRAs are \['a', 'b'\]"):
        adapter.scales = {"a": 1.0, "c": 1.0}
    assert adapter.scales == {"a": 0.0, "b": 0.0}  # nothing changed


def test_remove_lora_of_an_unknown_name_lists_the_names() -> None:
    linear = fl.Linear(8, 4)
    adapter = LoraAdapter(linear, LinearLora("a", 8, 4, rank=2))
    with pytest.raises(LookupError, match=r"no LoRA named 'b'; its LoRAs are \['a'\]"):
        adapter.remove_lora("b")


# -- positional parameters in the original's order -------------------------------------------------------------------


def _positional(cls: type) -> list[str]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD][1:]


@pytest.mark.parametrize(
    ("cls", "original"),
    [
        (
            fl.SelfAttention,
            ["embedding_dim", "inner_dim", "num_heads", "use_bias", "is_causal", "is_optimized", "device", "dtype"],
        ),
        (fl.ScaledDotProductAttention, ["num_heads", "is_causal", "is_optimized", "slice_size"]),
        (LinearLora, ["name", "in_features", "out_features", "rank", "scale", "device", "dtype"]),
        (Conv2dLora, ["name", "in_channels", "out_channels", "rank", "scale"]),
        (fl.LayerNorm, ["normalized_shape", "eps", "device", "dtype"]),
        (fl.GroupNorm, ["channels", "num_groups", "eps", "device", "dtype"]),
        (fl.InstanceNorm2d, ["num_features", "eps", "device", "dtype"]),
        (fl.MultiLinear, ["input_dim", "output_dim", "inner_dim", "num_layers", "device", "dtype"]),
        (fl.Interpolate, ["mode", "antialias"]),
        (fl.Unflatten, ["dim", "sizes"]),
        (FeedForward, ["embedding_dim", "feedforward_dim", "device", "dtype"]),
        (
            TransformerLayer,
            ["embedding_dim", "feedforward_dim", "num_attention_heads", "layer_norm_eps", "device", "dtype"],
        ),
        (
            CrossAttentionBlock2d,
            [
                *("channels", "context_embedding_dim", "context_key", "num_attention_heads", "num_attention_layers"),
                *("num_groups", "use_bias", "use_linear_projection", "device", "dtype"),
            ],
        ),
        (CLIPTextEncoderL, ["device", "dtype"]),
        (CLIPTextEncoderH, ["device", "dtype"]),
        (CLIPTextEncoderG, ["device", "dtype"]),
    ],
)
def test_positional_parameters_follow_the_original(cls: type, original: list[str]) -> None:
    # What we add beyond the original is keyword only, so that a positional call means what it meant there.
    assert _positional(cls)[: len(original)] == original
    assert _positional(cls) == original


def test_self_attention_second_positional_is_inner_dim() -> None:
    attention = fl.SelfAttention(64, 8)
    assert (attention.inner_dim, attention.num_heads) == (8, 1)


def test_scaled_dot_product_attention_positional_order() -> None:
    attention = fl.ScaledDotProductAttention(2, False, False, 3)
    assert (attention.is_optimized, attention.slice_size) == (False, 3)


def test_lora_fifth_positional_is_scale() -> None:
    lora = LinearLora("a", 8, 4, 2, 0.5)
    assert (lora.scale, lora.alpha, lora.factor) == (0.5, 2.0, 0.5)
    conv = Conv2dLora("a", 8, 4, 2, 0.5)
    assert (conv.scale, conv.alpha) == (0.5, 2.0)


def test_conv2d_lora_original_positional_kernels_fail() -> None:
    # The original's `Conv2dLora(name, in, out, rank, scale, kernel_size=(down, up), stride, padding)`.
    with pytest.raises(TypeError, match="positional argument"):
        Conv2dLora("a", 8, 4, 2, 1.0, (1, 3), (1, 1), (0, 1))  # pyright: ignore[reportCallIssue]


def test_conv2d_lora_kernel_size_is_the_target_kernel_and_says_so() -> None:
    target = fl.Conv2d(8, 4, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match=r"a Conv2dLora's `kernel_size` is its target's, not the original"):
        LoraAdapter(target, Conv2dLora("a", 8, 4, rank=2, kernel_size=(1, 3)))
    LoraAdapter(target, Conv2dLora("a", 8, 4, rank=2, kernel_size=3))


def test_clip_text_encoder_positional_gelu_flag_fails() -> None:
    # The original's 8th positional is `use_quick_gelu: bool`; here it is `device`.
    with pytest.raises((RuntimeError, TypeError)):
        CLIPTextEncoder(32, 77, 1000, 1, 4, 64, 1e-5, True)  # pyright: ignore[reportArgumentType]


# -- smaller gaps ----------------------------------------------------------------------------------------------------


def test_layer_accepts_tuple_paths_with_positions() -> None:
    inner = fl.Chain(fl.Linear(2, 2))
    model = fl.Chain(fl.Sum(fl.Chain(fl.ReLU()), inner))
    assert model.layer(("Sum", "Chain_2"), fl.Chain) is inner
    assert model.layer(("Sum", 1, 0), fl.Linear) is inner.Linear
    assert model.layer(["Sum", "Chain_2.Linear"], fl.Linear) is inner.Linear
    with pytest.raises(TypeError, match=r"Chain\.Sum\.Chain_2\.Linear is a Linear, not a ReLU"):
        model.layer(("Sum", 1, 0), fl.ReLU)
    with pytest.raises(TypeError, match=r"an int \(position\), a str .* got float \(1\.0\)"):
        model.layer(("Sum", 1.0), fl.Chain)  # pyright: ignore[reportArgumentType]
    with pytest.raises(KeyError, match="is not a Chain"):
        model.layer(("Sum", 1, 0, 0))


def test_walk_predicate_raising_stop_iteration_prunes_the_subtree() -> None:
    skipped = fl.Chain(fl.Linear(2, 2))
    model = fl.Chain(skipped, fl.Chain(fl.Linear(2, 2)), fl.Linear(2, 2))

    def predicate(module: fl.Module, parent: fl.Chain) -> bool:
        if module is skipped:
            raise StopIteration
        return isinstance(module, fl.Linear)

    found = [module for module, _ in model.walk(predicate)]
    assert found == [model.Chain_2.Linear, model.Linear]


def test_get_arg() -> None:
    chain = fl.Chain(fl.Parallel(fl.Identity(), fl.Lambda(lambda x: x * 2)), fl.GetArg(1))
    x = torch.randn(2)
    assert torch.equal(chain(x), x * 2)


def test_get_parents() -> None:
    linear = fl.Linear(2, 2)
    inner = fl.Chain(linear)
    outer = fl.Chain(inner)
    assert linear.get_parents() == [inner, outer]
    assert outer.get_parents() == []
    use = fl.UseContext("c", "k")
    chain = fl.Chain(use)
    assert use.get_parents() == [chain]  # a ContextModule, as in the original's documentation


def test_interpolate_antialias_matches_torch() -> None:
    x = torch.randn(1, 3, 32, 32)
    layer = fl.Interpolate(mode="bilinear", antialias=True)
    expected = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)
    torch.testing.assert_close(layer(x, (8, 8)), expected, atol=0, rtol=0)
    assert not torch.allclose(fl.Interpolate(mode="bilinear")(x, (8, 8)), expected)


def test_unflatten_with_sizes_at_call_time() -> None:
    x = torch.randn(2, 12)
    assert fl.Unflatten(1)(x, (3, 4)).shape == (2, 3, 4)
    torch.testing.assert_close(fl.Unflatten(1)(x, (3, 4)), fl.Unflatten(1, (3, 4))(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="got them both at construction and at call time"):
        fl.Unflatten(1, (3, 4))(x, (3, 4))
    with pytest.raises(ValueError, match="got them neither"):
        fl.Unflatten(1)(x)


def test_parameter_requires_grad_is_a_setter() -> None:
    layer = fl.Parameter(3)
    layer.requires_grad = False
    assert layer.weight.requires_grad is False and layer.requires_grad is False
    layer.requires_grad = True
    assert layer.weight.requires_grad


def test_positional_device_still_reaches_the_weights() -> None:
    # `fl.LayerNorm(8, 1e-5, "meta")`: the original's third positional is the device.
    layers: list[Any] = [
        fl.LayerNorm(8, 1e-5, "meta"),
        fl.GroupNorm(8, 4, 1e-5, "meta"),
        fl.InstanceNorm2d(8, 1e-5, "meta", None),
        fl.MultiLinear(4, 4, 8, 2, "meta"),
        LinearLora("a", 8, 4, 2, 1.0, "meta"),
        FeedForward(8, 16, "meta"),
    ]
    for layer in layers:
        assert all(p.device.type == "meta" for p in layer.parameters()), layer
