"""LoRA hotswap, eagerly: padding keeps the update, swapped weights equal a plain LoRA, and what is refused.

Under `torch.compile` (no recompilation on the SD1 UNet): `tests/foundationals/latent_diffusion/test_unet_compile.py`.
"""

import pytest
import torch

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import (
    Conv2dLora,
    LinearLora,
    LoraAdapter,
    LoraScaling,
    SingleLoraAdapter,
    enable_lora_hotswap,
)


def model_with_loras() -> tuple[fl.Chain, LinearLora, Conv2dLora]:
    torch.manual_seed(0)
    model = fl.Chain(fl.Conv2d(3, 8, 3, padding=1), fl.SiLU(), fl.Flatten(1), fl.Linear(8 * 4 * 4, 4))
    conv = SingleLoraAdapter(model.layer("Conv2d", fl.Conv2d), rank=2, alpha=3.0, scale=0.7).inject().lora
    linear = SingleLoraAdapter(model.layer("Linear", fl.Linear), rank=3).inject().lora
    for lora in (conv, linear):
        torch.nn.init.normal_(lora.up.weight, std=0.1)
    assert isinstance(linear, LinearLora) and isinstance(conv, Conv2dLora)
    return model, linear, conv


def test_padding_keeps_the_update_and_the_output() -> None:
    model, linear, conv = model_with_loras()
    x = torch.randn(2, 3, 4, 4)
    expected, expected_delta = model(x), conv.delta_weight()
    assert enable_lora_hotswap(model, target_rank=5) == [conv, linear]
    assert (conv.rank, conv.alpha, linear.rank, linear.alpha) == (5, 7.5, 5, 5.0)
    assert tuple(conv.down.weight.shape) == (5, 3, 3, 3) and tuple(linear.up.weight.shape) == (4, 5)
    torch.testing.assert_close(conv.delta_weight(), expected_delta)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


def test_swapped_weights_equal_a_plain_lora() -> None:
    model, linear, _ = model_with_loras()
    enable_lora_hotswap(model, target_rank=4)
    down, up = torch.randn(2, linear.in_features), torch.randn(linear.out_features, 2)
    linear.swap_weights(down, up, alpha=1.0)
    plain = LinearLora.from_weights("plain", down, up, alpha=1.0)
    assert linear.factor == plain.factor  # 1.0 / 2: the new LoRA's, whatever the padding
    x = torch.randn(3, linear.in_features)
    torch.testing.assert_close(linear(x), plain(x), atol=1e-6, rtol=0)


def test_the_factor_tensor_is_changed_in_place_kept_in_float32_and_not_saved() -> None:
    model, linear, _ = model_with_loras()
    enable_lora_hotswap(model)
    scaling = linear.layer("LoraScaling", LoraScaling)
    factor = scaling.factor
    assert isinstance(factor, torch.Tensor)
    adapter = linear.parent
    assert isinstance(adapter, LoraAdapter)
    adapter.set_scale("default", 0.25)
    assert scaling.factor is factor and factor.item() == 0.25 * linear.alpha / linear.rank
    model.to(dtype=torch.bfloat16)
    assert isinstance(scaling.factor, torch.Tensor) and scaling.factor.dtype == torch.float32
    assert not any(key.endswith("factor") for key in model.state_dict())


def test_what_cannot_be_swapped_is_refused() -> None:
    model, linear, conv = model_with_loras()
    with pytest.raises(ValueError, match="lower than the rank of"):
        enable_lora_hotswap(model, target_rank=2)
    with pytest.raises(ValueError, match=r"pad it first \(`pad_rank\(4\)`"):
        linear.swap_weights(torch.randn(4, linear.in_features), torch.randn(linear.out_features, 4))
    with pytest.raises(ValueError, match="equal shapes but for the rank"):
        conv.swap_weights(torch.randn(2, 3, 1, 1), torch.randn(8, 2, 1, 1))
    with pytest.raises(ValueError, match="cannot be padded to the lower rank"):
        linear.pad_rank(1)
    with pytest.raises(LookupError, match="found no LoRA"):
        enable_lora_hotswap(fl.Chain(fl.Linear(2, 2)))
