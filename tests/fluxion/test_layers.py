"""Every fluxion layer against its torch counterpart: same weights, same inputs, same outputs."""

import inspect
import math
import re
import textwrap
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.testing import assert_close

import refiners.fluxion.layers as fl
from refiners.fluxion.layers import attentions, basics, converter, embedding, norm, sampling
from refiners.fluxion.layers.sampling import InterpolateMode, PushShape

# Tolerances: `atol=0, rtol=0` where both sides run the same op on the same weights (bitwise equal);
# `atol=1e-6, rtol=1e-6` where the computation is equivalent but not the same (another kernel, another order of
# float32 operations).


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def layer_id(value: object) -> str:
    """Test ids that name the layer and are the same in every process (no function addresses, for pytest-xdist)."""
    return value.short_repr() if isinstance(value, fl.Module) else ""


def randomize(module: torch.nn.Module) -> None:
    """Give every weight random values, so that defaults (ones, zeros) cannot hide a swapped or ignored weight."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter))


# -- weighted layers ---------------------------------------------------------------------------------------------


def test_linear() -> None:
    layer = fl.Linear(8, 5)
    reference = torch.nn.Linear(8, 5)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 8)
    assert_close(layer(x), reference(x), atol=0, rtol=0)
    assert fl.Linear(8, 5, bias=False).bias is None


def test_multi_linear() -> None:
    layer = fl.MultiLinear(input_dim=6, output_dim=3, inner_dim=10, num_layers=3, activation=fl.SiLU)
    linears = list(layer.layers(fl.Linear))
    reference = torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.SiLU(), torch.nn.Linear(10, 10), torch.nn.SiLU(), torch.nn.Linear(10, 3)
    )
    for source, target in zip(linears, [reference[0], reference[2], reference[4]], strict=True):
        target.load_state_dict(source.state_dict())
    x = torch.randn(4, 6)
    assert_close(layer(x), reference(x), atol=0, rtol=0)


def test_multi_linear_needs_a_layer() -> None:
    with pytest.raises(ValueError, match="at least one layer"):
        fl.MultiLinear(input_dim=6, output_dim=3, inner_dim=10, num_layers=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"stride": 2, "padding": 1},
        {"padding": "same", "dilation": 2},
        {"groups": 2, "use_bias": False},
        {"padding": 1, "padding_mode": "reflect"},
    ],
)
def test_conv2d(kwargs: dict[str, object]) -> None:
    layer = fl.Conv2d(4, 6, 3, **kwargs)  # pyright: ignore[reportArgumentType]
    torch_kwargs = {("bias" if key == "use_bias" else key): value for key, value in kwargs.items()}
    reference = torch.nn.Conv2d(4, 6, 3, **torch_kwargs)  # pyright: ignore[reportArgumentType]
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 9, 7)
    assert_close(layer(x), reference(x), atol=0, rtol=0)


def test_conv_transpose2d() -> None:
    layer = fl.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    reference = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 5, 6)
    assert_close(layer(x), reference(x), atol=0, rtol=0)
    plain = fl.ConvTranspose2d(4, 6, 3, stride=2, padding=1)
    plain_reference = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1)
    plain_reference.load_state_dict(plain.state_dict())
    assert_close(plain(x, [10, 12]), plain_reference(x, output_size=[10, 12]), atol=0, rtol=0)


def test_embedding() -> None:
    layer = fl.Embedding(num_embeddings=11, embedding_dim=4)
    reference = torch.nn.Embedding(11, 4)
    reference.load_state_dict(layer.state_dict())
    ids = torch.randint(0, 11, (2, 7))
    assert_close(layer(ids), reference(ids), atol=0, rtol=0)


@pytest.mark.parametrize(("shape", "affine"), [(8, True), ([3, 8], True), (8, False)])
def test_layer_norm(shape: int | list[int], affine: bool) -> None:
    layer = fl.LayerNorm(shape, eps=1e-4, elementwise_affine=affine)
    randomize(layer)
    reference = torch.nn.LayerNorm(shape, eps=1e-4, elementwise_affine=affine)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 3, 8)
    assert_close(layer(x), reference(x), atol=0, rtol=0)


def test_layer_norm_2d() -> None:
    layer = fl.LayerNorm2d(6)
    randomize(layer)
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    # Segment Anything's LayerNorm2d (segment_anything/modeling/common.py), written out.
    mean = x.mean(1, keepdim=True)
    variance = (x - mean).pow(2).mean(1, keepdim=True)
    normalized = (x - mean) / torch.sqrt(variance + 1e-6)
    expected = layer.weight[:, None, None] * normalized + layer.bias[:, None, None]
    assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm(affine: bool) -> None:
    layer = fl.GroupNorm(channels=8, num_groups=4, eps=1e-6, affine=affine)
    randomize(layer)
    reference = torch.nn.GroupNorm(num_groups=4, num_channels=8, eps=1e-6, affine=affine)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 5, 5)
    assert_close(layer(x), reference(x), atol=0, rtol=0)


def test_group_norm_needs_divisible_channels() -> None:
    with pytest.raises(ValueError, match=r"6 channels cannot be split into 4 groups"):
        fl.GroupNorm(channels=6, num_groups=4)


@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_2d(affine: bool) -> None:
    layer = fl.InstanceNorm2d(num_features=3, affine=affine)
    randomize(layer)
    reference = torch.nn.InstanceNorm2d(3, affine=affine)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 6, 5)
    assert_close(layer(x), reference(x), atol=0, rtol=0)


# -- attention ---------------------------------------------------------------------------------------------------


def reference_attention(query: Tensor, key: Tensor, value: Tensor, num_heads: int, is_causal: bool) -> Tensor:
    def split(x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)

    output = F.scaled_dot_product_attention(split(query), split(key), split(value), is_causal=is_causal)
    return output.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("slice_size", [None, 3])
@pytest.mark.parametrize("is_optimized", [True, False])
def test_scaled_dot_product_attention(is_causal: bool, slice_size: int | None, is_optimized: bool) -> None:
    layer = fl.ScaledDotProductAttention(
        num_heads=2, is_causal=is_causal, is_optimized=is_optimized, slice_size=slice_size
    )
    # Fewer queries than keys, and values of another width, so that no size can stand in for another.
    query, key, value = torch.randn(2, 7, 8), torch.randn(2, 9, 8), torch.randn(2, 9, 6)
    expected = reference_attention(query, key, value, num_heads=2, is_causal=is_causal)
    # Unsliced, the layer runs torch's kernel on the same inputs; sliced or explicit, it computes the same values in
    # another order.
    tolerance = 0.0 if is_optimized and slice_size is None else 1e-6
    assert_close(layer(query, key, value), expected, atol=tolerance, rtol=tolerance)


def test_scaled_dot_product_attention_bad_inputs() -> None:
    layer = fl.ScaledDotProductAttention(num_heads=3)
    with pytest.raises(ValueError, match=r"\(batch, sequence, embedding\) tensors, but the key has shape \(2, 4\)"):
        layer(torch.randn(2, 4, 6), torch.randn(2, 4), torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="query embedding size 8 cannot be split into 3 heads"):
        layer(torch.randn(2, 4, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="same embedding size, got 6 and 9"):
        layer(torch.randn(2, 4, 6), torch.randn(2, 4, 9), torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match=r"same sequence length .* got 4 and 5"):
        layer(torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="slice_size must be at least 1"):
        fl.ScaledDotProductAttention(slice_size=0)
    with pytest.raises(ValueError, match="at least one head"):
        fl.ScaledDotProductAttention(num_heads=0)


def multihead_reference(attention: fl.Attention) -> torch.nn.MultiheadAttention:
    """`torch.nn.MultiheadAttention` with the weights of `attention`."""
    query, key, value = attention.layer("Distribute", fl.Chain).layers(fl.Linear)
    output = attention.layer("Linear", fl.Linear)
    reference = torch.nn.MultiheadAttention(
        attention.embedding_dim,
        attention.num_heads,
        kdim=attention.key_embedding_dim,
        vdim=attention.value_embedding_dim,
        batch_first=True,
    )
    state = {
        "in_proj_bias": torch.cat([query.bias, key.bias, value.bias]),
        "out_proj.weight": output.weight,
        "out_proj.bias": output.bias,
    }
    if reference._qkv_same_embed_dim:
        state["in_proj_weight"] = torch.cat([query.weight, key.weight, value.weight])
    else:
        state |= {"q_proj_weight": query.weight, "k_proj_weight": key.weight, "v_proj_weight": value.weight}
    reference.load_state_dict(state)
    return reference


def causal_mask(size: int) -> Tensor:
    return torch.nn.Transformer.generate_square_subsequent_mask(size)


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention(is_causal: bool) -> None:
    attention = fl.Attention(embedding_dim=8, num_heads=2, is_causal=is_causal)
    reference = multihead_reference(attention)
    query, key, value = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = causal_mask(5) if is_causal else None
    expected, _ = reference(query, key, value, need_weights=False, attn_mask=mask)
    assert_close(attention(query, key, value), expected, atol=1e-6, rtol=1e-6)


def test_cross_attention_with_other_key_and_value_sizes() -> None:
    attention = fl.Attention(embedding_dim=8, num_heads=4, key_embedding_dim=6, value_embedding_dim=10)
    reference = multihead_reference(attention)
    query, key, value = torch.randn(2, 5, 8), torch.randn(2, 7, 6), torch.randn(2, 7, 10)
    expected, _ = reference(query, key, value, need_weights=False)
    assert_close(attention(query, key, value), expected, atol=1e-6, rtol=1e-6)


def test_attention_state_dict_keys() -> None:
    attention = fl.Attention(embedding_dim=8, num_heads=2, use_bias=False)
    assert list(attention.state_dict()) == [
        "Distribute.Linear_1.weight",
        "Distribute.Linear_2.weight",
        "Distribute.Linear_3.weight",
        "Linear.weight",
        "Linear.bias",
    ]


def test_attention_without_projection_bias() -> None:
    attention = fl.Attention(embedding_dim=8, num_heads=2, inner_dim=12, use_bias=False)
    query_projection, key_projection, value_projection = attention.layer("Distribute", fl.Chain).layers(fl.Linear)
    output_projection = attention.layer("Linear", fl.Linear)
    query, key, value = torch.randn(2, 5, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    heads = reference_attention(
        F.linear(query, query_projection.weight),
        F.linear(key, key_projection.weight),
        F.linear(value, value_projection.weight),
        num_heads=2,
        is_causal=False,
    )
    expected = F.linear(heads, output_projection.weight, output_projection.bias)
    assert_close(attention(query, key, value), expected, atol=1e-6, rtol=1e-6)


def test_attention_needs_divisible_inner_dim() -> None:
    with pytest.raises(ValueError, match="inner_dim=10 is not a multiple of num_heads=4"):
        fl.Attention(embedding_dim=8, num_heads=4, inner_dim=10)


@pytest.mark.parametrize("is_causal", [False, True])
def test_self_attention(is_causal: bool) -> None:
    attention = fl.SelfAttention(embedding_dim=8, num_heads=2, is_causal=is_causal)
    reference = multihead_reference(attention)
    x = torch.randn(2, 6, 8)
    expected, _ = reference(x, x, x, need_weights=False, attn_mask=causal_mask(6) if is_causal else None)
    assert_close(attention(x), expected, atol=1e-6, rtol=1e-6)


def test_self_attention_2d() -> None:
    attention = fl.SelfAttention2d(channels=8, num_heads=2)
    reference = multihead_reference(attention)
    x = torch.randn(2, 8, 3, 5)
    sequence = x.flatten(2).transpose(1, 2)
    expected, _ = reference(sequence, sequence, sequence, need_weights=False)
    assert_close(attention(x), expected.transpose(1, 2).reshape(2, 8, 3, 5), atol=1e-6, rtol=1e-6)
    assert attention.provider.contexts["reshape"] == {"height": None, "width": None}, "per-call state leaked"


def test_self_attention_2d_needs_spatial_input() -> None:
    with pytest.raises(fl.ChainError, match=r"expected a \(batch, channels, height, width\) tensor, got shape"):
        fl.SelfAttention2d(channels=8)(torch.randn(2, 8, 3))


# -- activations -------------------------------------------------------------------------------------------------


def quick_gelu(x: Tensor) -> Tensor:
    # OpenAI CLIP's QuickGELU (clip/model.py).
    return x * torch.sigmoid(1.702 * x)


@pytest.mark.parametrize(
    ("layer", "reference"),
    [
        (fl.ReLU(), torch.nn.ReLU()),
        (fl.SiLU(), torch.nn.SiLU()),
        (fl.Sigmoid(), torch.nn.Sigmoid()),
        (fl.GeLU(), torch.nn.GELU()),
        (fl.GeLU(approximation="tanh"), torch.nn.GELU(approximate="tanh")),
        (fl.GeLU(approximation="quick"), quick_gelu),
        (fl.GLU(), torch.nn.GLU()),
        (fl.GLU(fl.GeLU()), lambda x: x.chunk(2, dim=-1)[0] * F.gelu(x.chunk(2, dim=-1)[1])),
        (fl.Sin(), torch.sin),
        (fl.Cos(), torch.cos),
        (fl.Multiply(scale=2.5, bias=-1.0), lambda x: 2.5 * x - 1.0),
        (fl.Identity(), torch.nn.Identity()),
    ],
    ids=layer_id,
)
def test_element_wise(layer: fl.Module, reference: Callable[[Tensor], Tensor]) -> None:
    x = torch.randn(3, 4, 10) * 3
    assert_close(layer(x), reference(x), atol=0, rtol=0)


def test_glu_needs_even_size() -> None:
    with pytest.raises(ValueError, match="must be even, got 5"):
        fl.GLU(fl.GeLU())(torch.randn(2, 5))


def test_gelu_rejects_unknown_approximation() -> None:
    with pytest.raises(ValueError, match="approximation must be"):
        fl.GeLU(approximation="fast")  # pyright: ignore[reportArgumentType]


# -- shapes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "reference"),
    [
        (fl.Reshape(6, 10), lambda x: x.reshape(2, 6, 10)),
        (fl.Reshape(-1, 5), lambda x: x.reshape(2, -1, 5)),
        (fl.Flatten(), torch.flatten),
        (fl.Flatten(start_dim=1), torch.nn.Flatten()),
        (fl.Flatten(start_dim=1, end_dim=2), lambda x: torch.flatten(x, 1, 2)),
        (fl.Unflatten(dim=2, sizes=(2, -1)), torch.nn.Unflatten(2, (2, -1))),
        (fl.Transpose(1, -1), lambda x: torch.transpose(x, 1, -1)),
        (fl.Permute(2, 0, 4, 3, 1), lambda x: x.permute(2, 0, 4, 3, 1)),
        (fl.Slicing(dim=1, start=1), lambda x: x[:, 1:]),
        (fl.Slicing(dim=2, start=-3, end=-1), lambda x: x[:, :, -3:-1]),
        (fl.Slicing(dim=-1, start=0, end=100, step=2), lambda x: x[..., 0:100:2]),
        (fl.Slicing(dim=1, start=2, end=1), lambda x: x[:, 2:1]),
        (fl.Squeeze(dim=3), lambda x: x.squeeze(3)),
        (fl.Unsqueeze(dim=-2), lambda x: x.unsqueeze(-2)),
    ],
    ids=layer_id,
)
def test_shape_layer(layer: fl.Module, reference: Callable[[Tensor], Tensor]) -> None:
    x = torch.randn(2, 3, 4, 1, 5)
    if isinstance(layer, fl.Reshape):
        x = torch.randn(2, 3, 4, 5)
    assert_close(layer(x), reference(x), atol=0, rtol=0)


def test_reshape_keeps_the_batch_dimension() -> None:
    with pytest.raises(ValueError, match=r"each element has 12 values, which do not fit the shape \(2, 12\)"):
        fl.Reshape(2, 12)(torch.randn(2, 3, 4))


def test_slicing_needs_positive_step() -> None:
    with pytest.raises(ValueError, match="step of at least 1"):
        fl.Slicing(dim=0, step=-1)


def test_parameter() -> None:
    parameter = fl.Parameter(4, 3)
    x = torch.randn(2, 4, 3)
    assert_close(parameter(x), parameter.weight.expand(2, 4, 3), atol=0, rtol=0)
    assert parameter.weight.requires_grad
    residual = fl.Residual(parameter)
    assert_close(residual(x), x + parameter.weight, atol=0, rtol=0)
    assert list(residual.state_dict()) == ["Parameter.weight"]
    assert not fl.Parameter(4, 3, requires_grad=False).weight.requires_grad


# -- sampling ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_interpolate(mode: InterpolateMode) -> None:
    x = torch.randn(2, 3, 5, 7)
    assert_close(fl.Interpolate(mode=mode)(x, (9, 4)), F.interpolate(x, size=(9, 4), mode=mode), atol=0, rtol=0)


def test_pad() -> None:
    x = torch.randn(2, 3, 5, 7)
    assert_close(fl.Pad((0, 1, 2, 0), value=0.5)(x), F.pad(x, (0, 1, 2, 0), value=0.5), atol=0, rtol=0)
    assert_close(fl.Pad((1, 1, 2, 2), mode="replicate")(x), F.pad(x, (1, 1, 2, 2), mode="replicate"), atol=0, rtol=0)


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample(padding: int) -> None:
    downsample = fl.Downsample(channels=4, scale_factor=2, padding=padding)
    conv = downsample.layer("Conv2d", fl.Conv2d)
    x = torch.randn(2, 4, 7, 10)
    # Stable Diffusion pads right and bottom only when the convolution has no padding of its own.
    padded = F.pad(x, (0, 1, 0, 1)) if padding == 0 else x
    expected = F.conv2d(padded, conv.weight, conv.bias, stride=2, padding=padding)
    assert_close(downsample(x), expected, atol=0, rtol=0)
    assert downsample.provider.contexts["sampling"] == {"shapes": []}, "per-call state leaked"


def test_upsample_by_factor() -> None:
    upsample = fl.Upsample(channels=4, upsample_factor=2)
    conv = upsample.layer("Conv2d", fl.Conv2d)
    x = torch.randn(2, 4, 3, 5)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)
    assert_close(upsample(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample_upsample_round_trip_restores_odd_sizes(padding: int) -> None:
    downsample = fl.Downsample(channels=4, scale_factor=2, padding=padding)
    upsample = fl.Upsample(channels=4)
    model = fl.Chain(downsample, fl.SiLU(), upsample)
    down, up = downsample.layer("Conv2d", fl.Conv2d), upsample.layer("Conv2d", fl.Conv2d)
    x = torch.randn(2, 4, 7, 9)
    padded = F.pad(x, (0, 1, 0, 1)) if padding == 0 else x
    hidden = F.silu(F.conv2d(padded, down.weight, down.bias, stride=2, padding=padding))
    expected = F.conv2d(F.interpolate(hidden, size=(7, 9), mode="nearest"), up.weight, up.bias, padding=1)
    output = model(x)
    assert output.shape == (2, 4, 7, 9)
    assert_close(output, expected, atol=0, rtol=0)
    assert model.provider.contexts["sampling"] == {"shapes": []}, "per-call state leaked"


def test_nested_downsamples_restore_sizes_innermost_first() -> None:
    model = fl.Chain(
        fl.Downsample(channels=2, scale_factor=2, padding=1),
        fl.Downsample(channels=2, scale_factor=2, padding=1),
        fl.Upsample(channels=2),
        fl.Lambda(lambda x: (x, x.shape[2:])),
        fl.Return(),
    )
    y, inner_shape = model(torch.randn(1, 2, 11, 13))
    assert inner_shape == (6, 7)
    assert y.shape == (1, 2, 6, 7)


def test_upsample_without_registered_shape() -> None:
    with pytest.raises(fl.ChainError, match="no spatial size left to restore"):
        fl.Upsample(channels=4)(torch.randn(1, 4, 3, 3))


def test_downsample_without_register_shape_leaves_no_shape() -> None:
    downsample = fl.Downsample(channels=2, scale_factor=2, padding=1, register_shape=False)
    assert not any(isinstance(layer, PushShape) for layer in downsample)
    with pytest.raises(fl.ChainError, match="no spatial size left to restore"):
        fl.Chain(downsample, fl.Upsample(channels=2))(torch.randn(1, 2, 4, 4))


@pytest.mark.parametrize(
    ("layer", "reference", "shape"),
    [
        (fl.MaxPool1d(3, stride=2, padding=1), lambda x: F.max_pool1d(x, 3, stride=2, padding=1), (2, 3, 11)),
        (fl.MaxPool2d(2), lambda x: F.max_pool2d(x, 2), (2, 3, 8, 6)),
        (fl.MaxPool2d(3, stride=2, ceil_mode=True), lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True), (2, 3, 8, 6)),
        (fl.AvgPool2d(2, stride=2, ceil_mode=True), lambda x: F.avg_pool2d(x, 2, 2, ceil_mode=True), (2, 3, 7, 5)),
        (fl.ReflectionPad2d(2), lambda x: F.pad(x, (2, 2, 2, 2), mode="reflect"), (2, 3, 5, 6)),
        (fl.ReflectionPad2d((1, 0, 2, 3)), lambda x: F.pad(x, (1, 0, 2, 3), mode="reflect"), (2, 3, 5, 6)),
        (fl.PixelUnshuffle(2), lambda x: F.pixel_unshuffle(x, 2), (2, 3, 8, 6)),
    ],
    ids=layer_id,
)
def test_pooling_and_padding(layer: fl.Module, reference: Callable[[Tensor], Tensor], shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    assert_close(layer(x), reference(x), atol=0, rtol=0)


# -- converter ---------------------------------------------------------------------------------------------------


def test_converter_casts_floating_inputs_to_the_parent_dtype() -> None:
    embedding = fl.Embedding(10, 4, dtype=torch.float64)
    model = fl.Chain(fl.Converter(), fl.Distribute(fl.Identity(), embedding, fl.Identity()))
    x, ids = torch.randn(2, 4), torch.randint(0, 10, (2, 3), dtype=torch.int32)
    converted, converted_ids, scale = model[0](x, ids, 0.5)
    assert converted.dtype == torch.float64
    assert_close(converted, x.to(torch.float64), atol=0, rtol=0)
    assert converted_ids.dtype == torch.int32, "integer ids must keep their dtype"
    assert scale == 0.5, "non-tensor inputs pass through"
    converted, embedded, scale = model(x, ids, 0.5)
    assert_close(embedded, F.embedding(ids, embedding.weight), atol=0, rtol=0)


def test_converter_moves_inputs_to_the_parent_device() -> None:
    model = fl.Chain(fl.Converter(set_dtype=False), fl.Linear(4, 2, device="meta", dtype=torch.float64))
    converted = model[0](torch.randn(2, 4))
    assert converted.device == torch.device("meta")
    assert converted.dtype == torch.float32, "set_dtype=False keeps the dtype"
    output = model(torch.randn(2, 4, dtype=torch.float64))
    assert output.device == torch.device("meta")


def test_converter_without_set_device_keeps_the_device() -> None:
    model = fl.Chain(fl.Converter(set_device=False), fl.Linear(4, 2, device="meta", dtype=torch.float64))
    converted = model[0](torch.randn(2, 4))
    assert converted.device == torch.device("cpu")
    assert converted.dtype == torch.float64


def test_converter_needs_a_parent() -> None:
    with pytest.raises(ValueError, match=r"it has no parent\. Put it in the Chain"):
        fl.Converter()(torch.randn(2))


# -- device, dtype and repr --------------------------------------------------------------------------------------

WEIGHTED_LAYERS: dict[str, Callable[..., fl.Module]] = {
    "Linear": lambda **kw: fl.Linear(4, 4, **kw),
    "MultiLinear": lambda **kw: fl.MultiLinear(4, 4, 8, 2, **kw),
    "Conv2d": lambda **kw: fl.Conv2d(4, 4, 3, padding=1, **kw),
    "ConvTranspose2d": lambda **kw: fl.ConvTranspose2d(4, 4, 3, padding=1, **kw),
    "Embedding": lambda **kw: fl.Embedding(8, 4, **kw),
    "LayerNorm": lambda **kw: fl.LayerNorm(4, **kw),
    "LayerNorm2d": lambda **kw: fl.LayerNorm2d(4, **kw),
    "GroupNorm": lambda **kw: fl.GroupNorm(4, 2, **kw),
    "InstanceNorm2d": lambda **kw: fl.InstanceNorm2d(4, affine=True, **kw),
    "Parameter": lambda **kw: fl.Parameter(5, 4, **kw),
    "Attention": lambda **kw: fl.Attention(4, num_heads=2, key_embedding_dim=6, **kw),
    "SelfAttention": lambda **kw: fl.SelfAttention(4, num_heads=2, **kw),
    "SelfAttention2d": lambda **kw: fl.SelfAttention2d(4, num_heads=2, **kw),
    "Downsample": lambda **kw: fl.Downsample(4, scale_factor=2, **kw),
    "Upsample": lambda **kw: fl.Upsample(4, upsample_factor=2, **kw),
}


def example_input(name: str, dtype: torch.dtype) -> tuple[Tensor, ...]:
    match name:
        case "Embedding":
            return (torch.randint(0, 8, (2, 3)),)
        case "Attention":
            return (
                torch.randn(2, 3, 4, dtype=dtype),
                torch.randn(2, 5, 6, dtype=dtype),
                torch.randn(2, 5, 4, dtype=dtype),
            )
        case "Linear" | "MultiLinear" | "LayerNorm" | "Parameter" | "SelfAttention":
            return (torch.randn(2, 5, 4, dtype=dtype),)
        case _:
            return (torch.randn(2, 4, 6, 6, dtype=dtype),)


@pytest.mark.parametrize("name", WEIGHTED_LAYERS)
def test_weights_follow_device_and_dtype(name: str) -> None:
    layer = WEIGHTED_LAYERS[name](device="meta", dtype=torch.float16)
    tensors = [*layer.parameters(), *layer.buffers()]
    assert tensors
    assert all(tensor.device == torch.device("meta") for tensor in tensors)
    assert all(tensor.dtype == torch.float16 for tensor in tensors if tensor.is_floating_point())
    assert isinstance(layer, fl.WeightedModule | fl.Chain)
    assert (layer.device, layer.dtype) == (torch.device("meta"), torch.float16)


@pytest.mark.parametrize("name", WEIGHTED_LAYERS)
def test_float64_forward(name: str) -> None:
    layer = WEIGHTED_LAYERS[name](device="cpu", dtype=torch.float64)
    assert layer(*example_input(name, torch.float64)).dtype == torch.float64


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (
            fl.Conv2d(1, 128, 3),
            "Conv2d(in_channels=1, out_channels=128, kernel_size=(3, 3), device=cpu, dtype=float32)",
        ),
        (fl.Linear(200, 10), "Linear(in_features=200, out_features=10, device=cpu, dtype=float32)"),
        (fl.Linear(2, 3, dtype=torch.float16), "Linear(in_features=2, out_features=3, device=cpu, dtype=float16)"),
        (fl.MaxPool2d(2), "MaxPool2d(kernel_size=2, stride=2)"),
        (fl.MaxPool1d(3, padding=1), "MaxPool1d(kernel_size=3, stride=3, padding=1)"),
        (fl.Flatten(start_dim=1), "Flatten(start_dim=1)"),
        (fl.Reshape(16, 4), "Reshape(shape=(16, 4))"),
        (fl.Permute(0, 2, 1), "Permute(dims=(0, 2, 1))"),
        (fl.Unflatten(1, (2, 3)), "Unflatten(dim=1, sizes=(2, 3))"),
        (fl.Slicing(dim=1, end=4), "Slicing(dim=1, end=4)"),
        (fl.Multiply(scale=2.0), "Multiply(scale=2.0)"),
        (fl.Parameter(16, 64), "Parameter(dims=(16, 64), device=cpu, dtype=float32)"),
        (fl.Parameter(3, requires_grad=False), "Parameter(dims=(3,), requires_grad=False, device=cpu, dtype=float32)"),
        (fl.Embedding(10, 4), "Embedding(num_embeddings=10, embedding_dim=4, device=cpu, dtype=float32)"),
        (fl.LayerNorm(8), "LayerNorm(normalized_shape=(8,), device=cpu, dtype=float32)"),
        (fl.LayerNorm(8, elementwise_affine=False), "LayerNorm(normalized_shape=(8,), elementwise_affine=False)"),
        (fl.LayerNorm2d(8), "LayerNorm2d(channels=8, device=cpu, dtype=float32)"),
        (fl.GroupNorm(8, 4), "GroupNorm(channels=8, num_groups=4, device=cpu, dtype=float32)"),
        (fl.InstanceNorm2d(4), "InstanceNorm2d(num_features=4)"),
        (fl.GeLU(approximation="tanh"), "GeLU(approximation='tanh')"),
        (
            fl.ScaledDotProductAttention(num_heads=4, is_causal=True),
            "ScaledDotProductAttention(num_heads=4, is_causal=True)",
        ),
        (fl.Attention(8, num_heads=2), "(CHAIN) Attention(embedding_dim=8, num_heads=2)"),
        (fl.Attention(8, key_embedding_dim=4), "(CHAIN) Attention(embedding_dim=8, key_embedding_dim=4)"),
        (fl.SelfAttention2d(8, num_heads=2), "(CHAIN) SelfAttention2d(channels=8, num_heads=2)"),
        (fl.Downsample(8, 2), "(CHAIN) Downsample(channels=8, scale_factor=2)"),
        (fl.Upsample(8, 2), "(CHAIN) Upsample(channels=8, upsample_factor=2)"),
        (fl.Interpolate(), "Interpolate()"),
        (fl.ReflectionPad2d(1), "ReflectionPad2d(padding=(1, 1, 1, 1))"),
        (fl.PixelUnshuffle(2), "PixelUnshuffle(downscale_factor=2)"),
        (fl.Converter(set_dtype=False), "Converter(set_dtype=False)"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_repr(layer: fl.Module, expected: str) -> None:
    assert layer.short_repr() == expected


def test_repr_of_the_slides_basic_model() -> None:
    model = fl.Chain(fl.Conv2d(1, 128, 3), fl.ReLU(), fl.MaxPool2d(2), fl.Flatten(start_dim=1))
    assert repr(model).splitlines()[1:] == [
        "  ├── Conv2d(in_channels=1, out_channels=128, kernel_size=(3, 3), device=cpu, dtype=float32)",
        "  ├── ReLU()",
        "  ├── MaxPool2d(kernel_size=2, stride=2)",
        "  └── Flatten(start_dim=1)",
    ]
    x = torch.randn(2, 1, 8, 8)
    conv = model.layer("Conv2d", fl.Conv2d)
    expected = F.max_pool2d(F.relu(F.conv2d(x, conv.weight, conv.bias)), 2).flatten(1)
    assert_close(model(x), expected, atol=0, rtol=0)


def test_attention_heads_are_head_dim_scaled() -> None:
    # One head of size 4 over a single key: the output is that key's value, whatever the scale; with two keys, the
    # softmax weights must use 1/sqrt(head_dim), not 1/sqrt(embedding_dim).
    layer = fl.ScaledDotProductAttention(num_heads=2)
    query, key, value = torch.randn(1, 1, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    q, k, v = (t.view(1, -1, 2, 4).transpose(1, 2) for t in (query, key, value))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
    expected = (weights @ v).transpose(1, 2).reshape(1, 1, 8)
    assert_close(layer(query, key, value), expected, atol=1e-6, rtol=1e-6)


# -- docstring examples ------------------------------------------------------------------------------------------

LAYER_MODULES = [basics, converter, embedding, norm, attentions, sampling]
EXAMPLES = [
    (f"{module.__name__}.{name}", block)
    for module in LAYER_MODULES
    for name in module.__all__
    for block in re.findall(r"```py\n(.*?)\s*```", inspect.getdoc(getattr(module, name)) or "", flags=re.DOTALL)
]


def test_there_are_examples() -> None:
    assert {name.rsplit(".", 1)[-1] for name, _ in EXAMPLES} >= {"Reshape", "Converter", "Attention", "Upsample"}


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_docstring_example(name: str, code: str) -> None:
    exec(compile(textwrap.dedent(code), f"<example of {name}>", "exec"), {"__name__": "example"})
