"""Reference-only control keeps its defining properties on the toy SD1 and SDXL (no packaged reference exists): a
reference identical to the generation changes nothing, `style_fidelity` 1 leaves the negative half plain and never
touches the positive half, the generation's attention moves towards the reference's, and ejecting restores the
model."""

import inspect
import re
import textwrap
from typing import Any

import pytest
import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.adapters.reference_only import (
    REFERENCE_ONLY_CONTEXT,
    WRITING_KEY,
    ReferenceAdaIN,
    ReferenceAttention,
    ReferenceOnlyAdapter,
)
from refiners.adapters.style_aligned import transformer_layers
from refiners.foundationals.latent_diffusion import LatentDiffusionModel, StableDiffusion_1
from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY as SD1_TINY
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import StableDiffusion_XL
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.presets import TINY as SDXL_TINY

STEPS = 3
BATCH = 2
SIZE = 128  # 16x16 latents: the toys' lowest resolution is 2x2
LATENTS = (4, SIZE // 8, SIZE // 8)


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
def toy(request: pytest.FixtureRequest) -> tuple[LatentDiffusionModel[Any, Any], dict[str, Tensor]]:
    return build(request.param)


def reference_latents() -> Tensor:
    return torch.randn(1, *LATENTS, generator=torch.Generator().manual_seed(7)) * 2 + 1


def generate(model: LatentDiffusionModel[Any, Any], conditioning: dict[str, Tensor]) -> Tensor:
    model.set_num_inference_steps(STEPS)
    x = model.init_latents((SIZE, SIZE), batch_size=BATCH, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for step in model.steps:
            x = model(x, step, condition_scale=7.5, generator=generator, **conditioning)
    return x


def test_generation_and_eject(toy: tuple[LatentDiffusionModel[Any, Any], dict[str, Tensor]]) -> None:
    model, conditioning = toy
    x = torch.randn(BATCH, *LATENTS, generator=torch.Generator().manual_seed(5))
    plain, plain_step = generate(model, conditioning), one_step(model, conditioning, x)
    before, keys = repr(model.unet), list(model.unet.state_dict())
    adapter = ReferenceOnlyAdapter(target=model, style_fidelity=0.5, reference_adain=True).inject()
    adapter.set_reference(reference_latents())
    controlled = generate(model, conditioning)
    adapter.eject()
    assert (controlled - plain).abs().max() > 1e-2 * plain.abs().max()
    assert repr(model.unet) == before and list(model.unet.state_dict()) == keys and model.step_preparations == []
    assert torch.equal(one_step(model, conditioning, x), plain_step)


def one_step(
    model: LatentDiffusionModel[Any, Any], conditioning: dict[str, Tensor], x: Tensor, seed: int = 3
) -> Tensor:
    """The noise prediction of one guided step on `x` at the first step (DDIM's next latents are linear in it)."""
    model.set_num_inference_steps(STEPS)
    with torch.no_grad():
        return model(
            x, model.steps[0], condition_scale=7.5, generator=torch.Generator().manual_seed(seed), **conditioning
        )


@pytest.mark.parametrize("reference_adain", [False, True], ids=["attention", "attention+adain"])
def test_a_reference_identical_to_the_generation_changes_nothing(
    toy: tuple[LatentDiffusionModel[Any, Any], dict[str, Tensor]], reference_adain: bool
) -> None:
    # The latents are the reference noised with the noise the adapter draws from the step's generator: each
    # self-attention attends to its own tokens twice, which is attending to them once, and each block's output has
    # the statistics it is given.
    model, conditioning = toy
    model.set_num_inference_steps(STEPS)
    reference = reference_latents()
    noise = torch.randn(BATCH, *LATENTS, generator=torch.Generator().manual_seed(3))
    x = model.solver.add_noise(reference.expand(BATCH, *LATENTS), noise, model.steps[0])
    plain = one_step(model, conditioning, x)
    adapter = ReferenceOnlyAdapter(target=model, style_fidelity=0.0, reference_adain=reference_adain).inject()
    adapter.set_reference(reference)
    same = one_step(model, conditioning, x)
    other = one_step(model, conditioning, x, seed=4)  # other noise: the reference's latents differ
    adapter.eject()
    scale = plain.abs().max().item()
    torch.testing.assert_close(same, plain, atol=1e-5 * scale, rtol=0)
    assert (other - plain).abs().max() > 1e-3 * scale


def predictions(model: LatentDiffusionModel[Any, Any], conditioning: dict[str, Tensor], x: Tensor) -> Tensor:
    """The UNet's output for the guided batch (negative half, then positive half) at the first step."""
    outputs: list[Tensor] = []
    hook = model.unet.register_forward_hook(lambda _, __, output: outputs.append(output))
    one_step(model, conditioning, x)
    hook.remove()
    return outputs[-1]  # the generation's pass comes after the reference's


@pytest.mark.parametrize("reference_adain", [False, True], ids=["attention", "attention+adain"])
def test_style_fidelity_weighs_the_negative_half_only(
    toy: tuple[LatentDiffusionModel[Any, Any], dict[str, Tensor]], reference_adain: bool
) -> None:
    model, conditioning = toy
    x = torch.randn(BATCH, *LATENTS, generator=torch.Generator().manual_seed(5))
    plain = predictions(model, conditioning, x)
    by_fidelity: dict[float, Tensor] = {}
    for style_fidelity in (0.0, 1.0):
        adapter = ReferenceOnlyAdapter(
            target=model, style_fidelity=style_fidelity, reference_adain=reference_adain
        ).inject()
        adapter.set_reference(reference_latents())
        by_fidelity[style_fidelity] = predictions(model, conditioning, x)
        adapter.eject()
    scale = plain.abs().max().item()
    negative, positive = slice(0, BATCH), slice(BATCH, 2 * BATCH)
    # 1: the negative half attends to itself alone; the positive half always attends to the reference too.
    torch.testing.assert_close(by_fidelity[1.0][negative], plain[negative], atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(by_fidelity[1.0][positive], by_fidelity[0.0][positive], atol=1e-5 * scale, rtol=0)
    assert (by_fidelity[0.0][negative] - plain[negative]).abs().max() > 1e-2 * scale
    assert (by_fidelity[0.0][positive] - plain[positive]).abs().max() > 1e-2 * scale


def test_the_attention_moves_towards_the_reference(
    toy: tuple[LatentDiffusionModel[Any, Any], dict[str, Tensor]],
) -> None:
    model, conditioning = toy
    attentions = [layer.ensure_find(fl.SelfAttention) for layer in transformer_layers(model.unet)]
    x = torch.randn(BATCH, *LATENTS, generator=torch.Generator().manual_seed(5))
    outputs: dict[int, list[Tensor]] = {id(attention): [] for attention in attentions}

    def record(module: torch.nn.Module, _: Any, output: Tensor) -> None:
        outputs[id(module.target if isinstance(module, ReferenceAttention) else module)].append(output)

    hooks = [attention.register_forward_hook(record) for attention in attentions]
    one_step(model, conditioning, x)
    for hook in hooks:
        hook.remove()
    plain = [outputs[id(attention)].pop() for attention in attentions]
    adapter = ReferenceOnlyAdapter(target=model, style_fidelity=0.0).inject()
    adapter.set_reference(reference_latents())
    hooks = [reading.register_forward_hook(record) for reading in adapter.attentions]
    one_step(model, conditioning, x)
    adapter.eject()
    for hook in hooks:
        hook.remove()
    # Each layer's output in the reference's pass, then in the generation's.
    written, read = zip(*(outputs[id(attention)] for attention in attentions), strict=True)

    def distance(generation: list[Tensor] | tuple[Tensor, ...]) -> float:
        return sum((g - w).pow(2).mean().sqrt().item() for g, w in zip(generation, written, strict=True))

    # Measured: 0.92 to 0.73 (SD1), 1.8 to 1.1 (SDXL), summed over the layers.
    assert distance(read) < 0.85 * distance(plain)


def test_attention_auto_machine_weight_takes_the_widest_layers() -> None:
    model, _ = build("sdxl")
    layers = transformer_layers(model.unet)
    adapter = ReferenceOnlyAdapter(target=model, attention_auto_machine_weight=0.5)
    chosen = [attention.target for attention in adapter.attentions]
    assert len(chosen) == len(layers) // 2
    widths = sorted((layer.embedding_dim for layer in layers), reverse=True)
    assert sorted(layer.embedding_dim for layer in layers if layer.ensure_find(fl.SelfAttention) in chosen) == sorted(
        widths[: len(layers) // 2]
    )


def test_adain_gives_the_reference_statistics() -> None:
    block = fl.Chain(fl.Identity())
    model = fl.Chain(block)
    adapter = ReferenceAdaIN(block, style_fidelity=0.0).inject()
    generator = torch.Generator().manual_seed(0)
    reference, x = torch.randn(2, 3, 4, 5, generator=generator) * 3 + 2, torch.randn(2, 3, 4, 5, generator=generator)
    model.set_context(REFERENCE_ONLY_CONTEXT, {WRITING_KEY: True})
    assert torch.equal(model(reference), reference)
    model.set_context(REFERENCE_ONLY_CONTEXT, {WRITING_KEY: False})
    output = model(x)
    torch.testing.assert_close(output.mean(dim=(2, 3)), reference.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(output.std(dim=(2, 3)), reference.std(dim=(2, 3)), atol=1e-5, rtol=0)
    # Each channel keeps its pattern: the output is an affine function of the input, per channel.
    normalised = (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)
    expected = normalised * reference.std(dim=(2, 3), keepdim=True) + reference.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)
    adapter.eject()


def test_adain_blocks_follow_diffusers_weights() -> None:
    # SD1's weights (4 levels): down blocks 2, 1.5, 1, 0.5; up blocks 0, 0.5, 1, 1.5; the middle block 0. At 1, the
    # down blocks of the two lowest resolutions (2 residual blocks each), the up blocks of the three lowest (3 each)
    # and the middle block.
    model, _ = build("sd1")
    unet = model.unet
    adapter = ReferenceOnlyAdapter(target=model, reference_adain=True, gn_auto_machine_weight=1.0)
    down_blocks = [block for block in list(unet.layer("DownBlocks", fl.Chain))[1:] if isinstance(block, fl.Chain)]
    resnets = [block for block in down_blocks if block.find(fl.Downsample) is None]
    up_blocks = list(unet.layer("UpBlocks", fl.Chain))
    expected = [*resnets[4:], *up_blocks[:9], unet.layer("MiddleBlock", fl.Chain)]
    adapted = [a.target for a in adapter.adains]
    assert len(adapted) == 14
    for target, block in zip(adapted, expected, strict=True):
        assert target is block or target.parent is block
    assert len(ReferenceOnlyAdapter(target=model, reference_adain=True, gn_auto_machine_weight=0.0).adains) == 4
    assert (
        len(ReferenceOnlyAdapter(target=model, reference_adain=True, gn_auto_machine_weight=2.0).adains) == 8 + 12 + 1
    )


def test_errors() -> None:
    model, conditioning = build("sd1")
    adapter = ReferenceOnlyAdapter(target=model)
    with pytest.raises(ValueError, match="not injected"):
        adapter.eject()
    adapter.inject()
    with pytest.raises(ValueError, match="already injected"):
        adapter.inject()
    x = torch.randn(BATCH, *LATENTS)
    with pytest.raises(ValueError, match="no reference"):
        one_step(model, conditioning, x)
    adapter.set_reference(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="do not fit"):
        one_step(model, conditioning, x)
    adapter.eject()
    with pytest.raises(ValueError, match="style_fidelity"):
        ReferenceOnlyAdapter(target=model, style_fidelity=2.0)
    with pytest.raises(ValueError, match="nothing looks at the reference"):
        ReferenceOnlyAdapter(target=model, attention_auto_machine_weight=0.0)


def test_docstring_example_runs() -> None:
    (example,) = re.findall(r"```py\n(.*?)```", inspect.getdoc(ReferenceOnlyAdapter) or "", flags=re.DOTALL)
    exec(compile(textwrap.dedent(example), "ReferenceOnlyAdapter's example", "exec"), {"__name__": "example"})
