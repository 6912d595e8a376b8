"""SD1UNet computes what diffusers' UNet2DConditionModel computes, on weights converted from a diffusers folder.

The reference is built from the real SD1.5 `unet/config.json` with random weights, saved with `save_pretrained` as a
download would look, then freed before our model is loaded from the folder's safetensors file (one full-size model
in memory at a time). The inpainting variant (9 input channels) is checked on a small config of the same
architecture, at an odd size.
"""

import gc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.converters.engine import ConversionError, convert_state_dict
from refiners.converters.reference_check import SD15_UNET_CONFIG
from refiners.converters.unet import convert_diffusers_unet, diffusers_unet_key_map
from refiners.fluxion.utils import load_from_safetensors
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.foundationals.latent_diffusion.unet import RESIDUALS_KEY, UNET_CONTEXT

# The same architecture at toy size, as the inpainting UNet (latents + mask + masked-image latents).
SMALL_CHANNELS = (32, 32, 64, 64)
SMALL_CONTEXT_DIM = 16
SMALL_INPAINTING_CONFIG: dict[str, Any] = SD15_UNET_CONFIG | {
    "block_out_channels": list(SMALL_CHANNELS),
    "cross_attention_dim": SMALL_CONTEXT_DIM,
    "in_channels": 9,
}

# Relative to the output's scale: atol = RELATIVE_ATOL * max |reference|.
RELATIVE_ATOL = 1e-4


@dataclass
class Case:
    latents: Tensor
    timestep: Tensor | int
    text_embedding: Tensor
    expected: Tensor


@dataclass
class Reference:
    folder: Path
    num_parameters: int
    cases: dict[str, Case]


def make_inputs(generator: torch.Generator, shape: tuple[int, ...], context_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    latents = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, 1000, (shape[0],), generator=generator)
    text_embedding = torch.randn(shape[0], 77, context_dim, generator=generator)
    return latents, timesteps, text_embedding


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=RELATIVE_ATOL * expected.abs().max().item(), rtol=0)


def run(unet: SD1UNet, latents: Tensor, timestep: Tensor | int, text_embedding: Tensor) -> Tensor:
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text_embedding)
    with torch.no_grad():
        return unet(latents)


@pytest.fixture(scope="module")
def sd15_reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """diffusers' SD1.5 UNet with random weights: its outputs on the test inputs, and its `save_pretrained` folder."""
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    generator = torch.Generator().manual_seed(1)
    cases: dict[str, Case] = {}
    latents, timesteps, text_embedding = make_inputs(generator, (2, 4, 8, 8), 768)
    # One timestep per batch element, and a single int timestep for the whole batch at a non-square size.
    inputs: dict[str, tuple[Tensor, Tensor | int, Tensor]] = {
        "8x8, one timestep per element": (latents, timesteps, text_embedding),
        "16x24, one timestep for the batch": (torch.randn(2, 4, 16, 24, generator=generator), 321, text_embedding),
    }
    with torch.no_grad():
        for name, (x, timestep, embedding) in inputs.items():
            expected = reference(x, timestep, encoder_hidden_states=embedding).sample
            cases[name] = Case(x, timestep, embedding, expected)
    folder = tmp_path_factory.mktemp("sd15") / "unet"
    reference.save_pretrained(folder)
    num_parameters = sum(p.numel() for p in reference.parameters())
    del reference
    gc.collect()
    return Reference(folder=folder, num_parameters=num_parameters, cases=cases)


@pytest.fixture(scope="module")
def sd15_unet(sd15_reference: Reference) -> SD1UNet:
    """Ours, built on the meta device (no allocation, no random init) and given the converted tensors."""
    unet = SD1UNet(in_channels=4, device="meta")
    source = load_from_safetensors(sd15_reference.folder / "diffusion_pytorch_model.safetensors")
    target_shapes = {key: tensor.shape for key, tensor in unet.state_dict().items()}
    converted = convert_state_dict(source, diffusers_unet_key_map(unet), target_shapes, what="diffusers UNet")
    del source
    unet.load_state_dict(converted, strict=True, assign=True)
    return unet


@pytest.mark.slow
@pytest.mark.parametrize("case", ["8x8, one timestep per element", "16x24, one timestep for the batch"])
def test_sd15_unet_matches_diffusers(sd15_reference: Reference, sd15_unet: SD1UNet, case: str) -> None:
    inputs = sd15_reference.cases[case]
    actual = run(sd15_unet, inputs.latents, inputs.timestep, inputs.text_embedding)
    assert_matches(actual, inputs.expected)


@pytest.mark.slow
def test_sd15_unet_has_the_reference_parameters(sd15_reference: Reference, sd15_unet: SD1UNet) -> None:
    assert all(parameter.device.type == "cpu" for parameter in sd15_unet.parameters())
    assert sum(p.numel() for p in sd15_unet.parameters()) == sd15_reference.num_parameters


def test_builds_on_the_meta_device() -> None:
    unet = SD1UNet(in_channels=9, device="meta")
    assert all(tensor.is_meta for tensor in [*unet.parameters(), *unet.buffers()])
    assert unet.layer("DownBlocks.Chain_1.Conv2d", fl.Conv2d).weight.shape == (320, 9, 3, 3)


# -- inpainting (9 input channels), on a small config --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_inpainting_state_dict(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tensor]:
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("inpainting") / "unet"
    UNet2DConditionModel(**SMALL_INPAINTING_CONFIG).save_pretrained(folder)
    return load_from_safetensors(folder / "diffusion_pytorch_model.safetensors")


def test_inpainting_unet_matches_diffusers(small_inpainting_state_dict: dict[str, Tensor]) -> None:
    reference = UNet2DConditionModel(**SMALL_INPAINTING_CONFIG).eval()
    reference.load_state_dict(small_inpainting_state_dict)
    unet = SD1UNet(in_channels=9, channels=SMALL_CHANNELS, context_embedding_dim=SMALL_CONTEXT_DIM, device="meta")
    unet.load_state_dict(convert_diffusers_unet(small_inpainting_state_dict, unet), strict=True, assign=True)
    # An odd size: each upsampling must restore the exact size of its mirror downsampling's input.
    latents, timesteps, text_embedding = make_inputs(torch.Generator().manual_seed(3), (2, 9, 15, 23), 16)
    with torch.no_grad():
        expected = reference(latents, timesteps, encoder_hidden_states=text_embedding).sample
    assert_matches(run(unet, latents, timesteps, text_embedding), expected)
    # The skip connections of the forward are not kept in the model's store after it.
    assert unet.provider.get_context(UNET_CONTEXT)[RESIDUALS_KEY] == [None] * 12


def test_converting_an_inpainting_checkpoint_for_4_channels_fails(
    small_inpainting_state_dict: dict[str, Tensor],
) -> None:
    unet = SD1UNet(in_channels=4, channels=SMALL_CHANNELS, context_embedding_dim=SMALL_CONTEXT_DIM, device="meta")
    with pytest.raises(ConversionError, match=re.escape("conv_in.weight (32, 9, 3, 3) does not fit")) as error:
        convert_diffusers_unet(small_inpainting_state_dict, unet)
    assert "SD1UNet(in_channels=9)" in str(error.value)
    # The engine alone, with the key map, names the same tensor and both shapes.
    shapes = {key: tensor.shape for key, tensor in unet.state_dict().items()}
    expected = re.escape("conv_in.weight (32, 9, 3, 3) -> DownBlocks.Chain_1.Conv2d.weight (32, 4, 3, 3)")
    with pytest.raises(ConversionError, match=expected):
        convert_state_dict(small_inpainting_state_dict, diffusers_unet_key_map(unet), shapes)


# -- side inputs -------------------------------------------------------------------------------------------------


@pytest.fixture
def small_unet() -> SD1UNet:
    torch.manual_seed(4)
    return SD1UNet(channels=SMALL_CHANNELS, context_embedding_dim=SMALL_CONTEXT_DIM)


def test_forward_without_timestep_says_what_to_set(small_unet: SD1UNet) -> None:
    small_unet.set_clip_text_embedding(torch.randn(1, 77, SMALL_CONTEXT_DIM))
    with pytest.raises(fl.ChainError, match="context 'diffusion' has no key 'timestep'"):
        small_unet(torch.randn(1, 4, 8, 8))


def test_forward_without_text_embedding_says_what_to_set(small_unet: SD1UNet) -> None:
    small_unet.set_timestep(10)
    with pytest.raises(fl.ChainError, match="context 'cross_attention_block' has no key 'clip_text_embedding'"):
        small_unet(torch.randn(1, 4, 8, 8))


def test_set_clip_text_embedding_rejects_a_wrong_shape(small_unet: SD1UNet) -> None:
    with pytest.raises(ValueError, match=re.escape("must be (batch, sequence, 16), got shape (1, 77, 768)")):
        small_unet.set_clip_text_embedding(torch.randn(1, 77, 768))


def test_set_timestep_rejects_a_matrix(small_unet: SD1UNet) -> None:
    with pytest.raises(ValueError, match=re.escape("a scalar or a (batch,) tensor")):
        small_unet.set_timestep(torch.zeros(2, 1))


def test_rejects_widths_the_group_norms_cannot_split() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        SD1UNet(channels=(48, 64, 64, 64), device="meta")


def test_docstring_example_runs() -> None:
    examples = re.findall(r"```py\n(.*?)```", SD1UNet.__doc__ or "", flags=re.DOTALL)
    assert examples
    for example in examples:
        lines = example.splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        exec(compile("\n".join(line[indent:] for line in lines), "<SD1UNet example>", "exec"), {})
