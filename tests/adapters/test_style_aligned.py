"""StyleAligned keeps its defining properties on the toy SD1 and SDXL (no packaged reference exists): the reference
image is generated as it would be alone, the others' attention moves towards its statistics, one attention and one
GroupNorm equal `sa_handler.py`'s equations computed by hand, and ejecting restores the UNet."""

import inspect
import math
import re
import textwrap
from typing import Any

import pytest
import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.adapters.style_aligned import (
    FullAttentionShareAdapter,
    FullSharedAttention,
    SharedGroupNorm,
    StyleAlignedAdapter,
    StyleAlignedAttention,
    transformer_layers,
)
from refiners.foundationals.latent_diffusion import LatentDiffusionModel, StableDiffusion_1
from refiners.foundationals.latent_diffusion.model import DENOISING_CONTEXT, GUIDED_KEY
from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY as SD1_TINY
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import StableDiffusion_XL
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.presets import TINY as SDXL_TINY

STEPS = 3
BATCH = 2  # the reference and one image
# 16x16 latents: the toys' lowest resolution is 2x2 (at 1x1, a GroupNorm's statistics are ill-conditioned, and the
# token statistics of AdaIN undefined).
SIZE = 128


def build(family: str) -> tuple[LatentDiffusionModel[Any, Any], dict[str, Tensor]]:
    """A toy model with random weights, and random prompt conditioning for `BATCH` guided latents."""
    torch.manual_seed(0)
    if family == "sd1":
        return StableDiffusion_1(**SD1_TINY.build()), {"clip_text_embedding": torch.randn(2 * BATCH, 77, 32)}
    sdxl = StableDiffusion_XL(**SDXL_TINY.build(), default_size=64)
    return sdxl, {
        "clip_text_embedding": torch.randn(2 * BATCH, 77, sdxl.unet.context_embedding_dim),
        "pooled_text_embedding": torch.randn(2 * BATCH, 48),
        **sdxl.micro_conditioning((SIZE, SIZE)),
    }


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def toy(request: pytest.FixtureRequest) -> tuple[LatentDiffusionModel[Any, Any], dict[str, Tensor], Tensor]:
    """The model, its conditioning, and its plain generation."""
    model, conditioning = build(request.param)
    return model, conditioning, generate(model, conditioning)


def generate(model: LatentDiffusionModel[Any, Any], conditioning: dict[str, Tensor]) -> Tensor:
    model.set_num_inference_steps(STEPS)
    x = model.init_latents((SIZE, SIZE), batch_size=BATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for step in model.steps:
            x = model(x, step, condition_scale=7.5, **conditioning)
    return x


def test_the_reference_is_generated_as_alone_and_eject_restores(
    toy: tuple[LatentDiffusionModel[Any, Any], dict[str, Tensor], Tensor],
) -> None:
    model, conditioning, plain = toy
    before, keys = repr(model.unet), list(model.unet.state_dict())
    # The SD1 notebook's settings (GroupNorms shared), with the demos' shift.
    adapter = StyleAlignedAdapter(target=model.unet, shared_score_shift=math.log(2)).inject()
    styled = generate(model, conditioning)
    adapter.eject()
    scale = plain.abs().max().item()
    torch.testing.assert_close(styled[0], plain[0], atol=1e-5 * scale, rtol=0)
    assert (styled[1] - plain[1]).abs().max() > 1e-2 * scale
    assert repr(model.unet) == before and list(model.unet.state_dict()) == keys
    assert torch.equal(generate(model, conditioning), plain)


def test_the_reference_weighed_zero_is_the_plain_generation(
    toy: tuple[LatentDiffusionModel[Any, Any], dict[str, Tensor], Tensor],
) -> None:
    # Logits of the reference's tokens shifted by -inf: every self-attention attends to its own tokens alone.
    model, conditioning, plain = toy
    adapter = StyleAlignedAdapter(
        target=model.unet,
        adain_queries=False,
        adain_keys=False,
        shared_score_shift=-math.inf,
        share_group_norm=False,
    ).inject()
    unshared = generate(model, conditioning)
    adapter.eject()
    torch.testing.assert_close(unshared, plain, atol=1e-5 * plain.abs().max().item(), rtol=0)


def attention_outputs(model: LatentDiffusionModel[Any, Any], conditioning: dict[str, Tensor]) -> list[Tensor]:
    """Each self-attention's output in one guided UNet pass, in `transformer_layers`' order."""
    attentions = [layer.ensure_find(fl.SelfAttention) for layer in transformer_layers(model.unet)]
    outputs: dict[int, Tensor] = {}

    def record(module: torch.nn.Module, _: Any, output: Tensor) -> None:
        outputs[id(module)] = output

    hooks = [attention.register_forward_hook(record) for attention in attentions]
    model.set_num_inference_steps(STEPS)
    x = torch.randn(BATCH, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(x, model.steps[0], condition_scale=7.5, **conditioning)
    for hook in hooks:
        hook.remove()
    return [outputs[id(attention)] for attention in attentions]


def distance_to_reference(outputs: list[Tensor]) -> float:
    """The mean over the layers and both halves of the relative distance between the image's per-channel mean and
    std (over the tokens) and the reference's."""
    distances: list[float] = []
    for output in outputs:
        for image, reference in ((1, 0), (3, 2)):  # each half of the guided batch
            mean, std = output.mean(dim=1), output.std(dim=1)
            distances.append(((mean[image] - mean[reference]).abs().mean() / mean[reference].abs().mean()).item())
            distances.append(((std[image] - std[reference]).abs().mean() / std[reference].mean()).item())
    return sum(distances) / len(distances)


def test_the_attention_moves_towards_the_reference(
    toy: tuple[LatentDiffusionModel[Any, Any], dict[str, Tensor], Tensor],
) -> None:
    model, conditioning, _ = toy
    plain = distance_to_reference(attention_outputs(model, conditioning))
    adapter = StyleAlignedAdapter(target=model.unet, share_group_norm=False).inject()
    styled = distance_to_reference(attention_outputs(model, conditioning))
    adapter.eject()
    # Measured: 0.22 to 0.15 (SD1), 0.31 to 0.18 (SDXL).
    assert styled < 0.8 * plain


def by_hand(query: Tensor, key: Tensor, value: Tensor, heads: int, guided: bool, scale: float, shift: float) -> Tensor:
    """`sa_handler.py`'s shared attention, per head, AdaIN on queries, keys and values."""

    def split(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # (batch, heads, tokens, dim)

    q, k, v = split(query), split(key), split(value)
    half = q.shape[0] // 2 if guided else q.shape[0]
    outputs: list[Tensor] = []

    def adain(f: Tensor, row: int, reference: int) -> Tensor:
        mean, std = f[row].mean(dim=-2), (f[row].var(dim=-2) + 1e-5).sqrt()
        reference_mean, reference_std = f[reference].mean(dim=-2), (f[reference].var(dim=-2) + 1e-5).sqrt()
        return (f[row] - mean[:, None]) / std[:, None] * reference_std[:, None] + reference_mean[:, None]

    for row in range(q.shape[0]):
        r = row // half * half
        own_q, own_k, own_v = adain(q, row, r), adain(k, row, r), adain(v, row, r)
        reference_k = k[r] if row == r else scale * k[r]  # already its own AdaIN: the reference's is itself
        keys, values = torch.cat([own_k, reference_k], dim=-2), torch.cat([own_v, v[r]], dim=-2)
        logits = own_q @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1])
        logits[..., k.shape[-2] :] += shift
        outputs.append((logits.softmax(dim=-1) @ values).transpose(0, 1).reshape(q.shape[2], -1))
    return torch.stack(outputs)


@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
def test_one_attention_equals_the_equations(guided: bool) -> None:
    heads, scale, shift = 2, 1.5, math.log(2)
    attention = fl.ScaledDotProductAttention(num_heads=heads)
    chain = fl.Chain(attention)
    StyleAlignedAttention(attention, adain_values=True, shared_score_scale=scale, shared_score_shift=shift).inject()
    chain.set_context(DENOISING_CONTEXT, {GUIDED_KEY: guided})
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(4, 6, 8, generator=generator) * 2 + 1 for _ in range(3))
    expected = by_hand(query, key, value, heads, guided, scale, shift)
    torch.testing.assert_close(chain(query, key, value), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
def test_full_attention_share_attends_to_the_whole_half(guided: bool) -> None:
    heads = 2
    attention = fl.ScaledDotProductAttention(num_heads=heads)
    chain = fl.Chain(attention)
    FullSharedAttention(attention).inject()
    chain.set_context(DENOISING_CONTEXT, {GUIDED_KEY: guided})
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(4, 6, 8, generator=generator) for _ in range(3))
    half = 2 if guided else 4
    expected: list[Tensor] = []
    for row in range(4):
        rows = slice(row // half * half, row // half * half + half)

        def heads_of(x: Tensor) -> Tensor:
            return x.reshape(-1, heads, 4).transpose(0, 1)  # (heads, tokens, dim)

        keys, values = heads_of(key[rows].reshape(-1, 8)), heads_of(value[rows].reshape(-1, 8))
        attended = (heads_of(query[row]) @ keys.transpose(-2, -1) / 2).softmax(dim=-1) @ values
        expected.append(attended.transpose(0, 1).reshape(6, 8))
    torch.testing.assert_close(chain(query, key, value), torch.stack(expected), atol=1e-5, rtol=0)


def test_no_sharing_at_minus_infinity_is_the_plain_attention() -> None:
    attention = fl.ScaledDotProductAttention(num_heads=2)
    chain = fl.Chain(attention)
    query, key, value = (torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    plain = chain(query, key, value)
    StyleAlignedAttention(attention, adain_queries=False, adain_keys=False, shared_score_shift=-math.inf).inject()
    torch.testing.assert_close(chain(query, key, value), plain, atol=1e-6, rtol=0)


def test_a_group_norm_normalises_with_the_reference() -> None:
    norm = fl.GroupNorm(channels=4, num_groups=2, eps=1e-5)
    assert norm.weight is not None and norm.bias is not None
    torch.nn.init.normal_(norm.weight)
    chain = fl.Chain(norm)
    SharedGroupNorm(norm).inject()
    chain.set_context(DENOISING_CONTEXT, {GUIDED_KEY: True})
    x = torch.randn(4, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    expected = torch.empty_like(x)
    for row in range(4):
        reference = row // 2 * 2
        for group in (slice(0, 2), slice(2, 4)):
            both = torch.cat([x[row, group].flatten(), x[reference, group].flatten()])
            mean, variance = both.mean(), both.var(unbiased=False)
            expected[row, group] = (x[row, group] - mean) / (variance + 1e-5).sqrt()
    expected = expected * norm.weight[:, None, None] + norm.bias[:, None, None]
    torch.testing.assert_close(chain(x), expected, atol=1e-5, rtol=0)


def test_only_self_level_keeps_sa_handler_layers_plain() -> None:
    unet = build("sd1")[0].unet
    count = len(transformer_layers(unet))  # 16: diffusers' `_get_switch_vec(16, level)`
    assert count == 16

    def shared(level: float) -> list[int]:
        adapter = StyleAlignedAdapter(target=unet, share_group_norm=False, only_self_level=level)
        layers = [layer.ensure_find(fl.ScaledDotProductAttention) for layer in transformer_layers(unet)]
        return [layers.index(attention.target) for attention in adapter.attentions]

    assert shared(0.0) == list(range(16))
    assert shared(1.0) == []
    assert shared(0.25) == [i for i in range(16) if i % 4 != 0]  # every fourth kept plain, from the first
    assert shared(0.75) == [0, 4, 8, 12]


def test_full_attention_share_ejects_exactly() -> None:
    model, conditioning = build("sd1")
    x = torch.randn(BATCH, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(2))
    model.set_num_inference_steps(STEPS)

    def step() -> Tensor:
        with torch.no_grad():
            return model(x, model.steps[0], condition_scale=7.5, **conditioning)

    plain, keys = step(), list(model.unet.state_dict())
    adapter = FullAttentionShareAdapter(target=model.unet).inject()
    shared = step()
    adapter.eject()
    assert (shared - plain).abs().max() > 1e-3 * plain.abs().max()
    assert list(model.unet.state_dict()) == keys and torch.equal(step(), plain)


def test_injection_errors() -> None:
    unet = build("sd1")[0].unet
    adapter = StyleAlignedAdapter(target=unet)
    with pytest.raises(ValueError, match="not injected"):
        adapter.eject()
    adapter.inject()
    with pytest.raises(ValueError, match="already injected"):
        adapter.inject()
    adapter.eject()
    with pytest.raises(ValueError, match="only_self_level"):
        StyleAlignedAdapter(target=unet, only_self_level=1.5)


def test_docstring_example_runs() -> None:
    (example,) = re.findall(r"```py\n(.*?)```", inspect.getdoc(StyleAlignedAdapter) or "", flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), "StyleAlignedAdapter's example", "exec"), {"__name__": "example"})
