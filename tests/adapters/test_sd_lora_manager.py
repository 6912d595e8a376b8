"""`SDLoraManager`: several LoRAs on Stable Diffusion 1.x with their scales, per-block scales, filters, removal, and
exact fuse/unfuse.

The models are the SD1.5 architecture at toy size with random weights (tests/toy_models.py); the LoRAs are trained
with PEFT on the diffusers UNet and the transformers text encoder and saved with diffusers' `save_lora_weights`. The
references are diffusers' own multi-adapter scales (`set_adapters`, with its per-block weights) on the same files:
UNet and text-encoder outputs agree within 1e-4 of their scale. Fusing is checked bit for bit: the fused weight is
the original plus the update computed in float32, rounded once to the stored dtype, and unfusing gives back the
original weight exactly, however many times it is done.
"""

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from peft import LoraConfig  # pyright: ignore[reportMissingTypeStubs]
from peft.utils import get_peft_model_state_dict  # pyright: ignore[reportMissingTypeStubs]
from torch import Tensor
from toy_models import (
    TEXT_WIDTH,
    VOCABULARY_SIZE,
    Reference,
    build_reference,
    convert_reference,
    toy_sd,
)
from transformers import CLIPTextModel

from refiners.adapters.lora import SD1LoraAdapter, SDLoraManager, sd1_lora_targets
from refiners.fluxion.adapters.lora import LinearLora, LoraAdapter
from refiners.fluxion.utils import load_from_safetensors
from refiners.foundationals.latent_diffusion import StableDiffusion_1

RELATIVE_ATOL = 1e-4

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def reference() -> Reference:
    return build_reference()


@pytest.fixture(scope="module")
def converted(reference: Reference) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return convert_reference(reference)


@pytest.fixture
def sd(converted: tuple[dict[str, Tensor], dict[str, Tensor]]) -> StableDiffusion_1:
    """Ours, fresh for each test (fusing writes into the weights)."""
    return toy_sd(converted)


def save_peft_lora(
    folder: Path, reference: Reference, seed: int, unet_targets: list[str], text_targets: list[str]
) -> Path:
    """A LoRA trained with PEFT on copies of the reference models, saved by diffusers' `save_lora_weights`."""
    unet, text_encoder = copy.deepcopy(reference.unet), copy.deepcopy(reference.text_encoder)
    unet_config = LoraConfig(r=4, lora_alpha=2, target_modules=unet_targets, init_lora_weights=False)
    text_config = LoraConfig(r=2, lora_alpha=3, target_modules=text_targets, init_lora_weights=False)
    torch.manual_seed(seed)
    unet.add_adapter(unet_config)
    text_encoder.add_adapter(text_config)
    folder.mkdir()
    unet_layers: dict[str, Any] = get_peft_model_state_dict(unet)
    text_encoder_layers: dict[str, Any] = get_peft_model_state_dict(text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_encoder_layers,
        unet_lora_adapter_metadata=config_dict(unet_config),
        text_encoder_lora_adapter_metadata=config_dict(text_config),
    )
    return folder / "pytorch_lora_weights.safetensors"


def config_dict(config: Any) -> dict[str, Any]:
    """A PEFT config as diffusers' savers write it in `lora_adapter_metadata` (sets as lists)."""
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}


@dataclass
class Files:
    style: Path  # attention and convolutions of the UNet, the text encoder's attention
    subject: Path  # attention and feed-forward of the UNet, the text encoder's MLP and queries


@pytest.fixture(scope="module")
def files(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Files:
    folder = tmp_path_factory.mktemp("loras")
    style = save_peft_lora(folder / "style", reference, 1, [*ATTENTION, "conv1", "proj_in"], ["q_proj", "out_proj"])
    subject = save_peft_lora(folder / "subject", reference, 2, [*ATTENTION, "ff.net.2"], ["q_proj", "fc1"])
    return Files(style, subject)


# -- running both ----------------------------------------------------------------------------------------------


@dataclass
class Outputs:
    unet: Tensor
    text_encoder: Tensor


LATENTS = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1))
TIMESTEPS = torch.tensor([999, 250])
TEXT_EMBEDDING = torch.randn(2, 77, TEXT_WIDTH, generator=torch.Generator().manual_seed(2))
TOKEN_IDS = torch.randint(0, VOCABULARY_SIZE, (2, 77), generator=torch.Generator().manual_seed(3))


def diffusers_outputs(unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> Outputs:
    with torch.no_grad():
        noise = unet(LATENTS, TIMESTEPS, encoder_hidden_states=TEXT_EMBEDDING).sample
        hidden_states = text_encoder(TOKEN_IDS).last_hidden_state
    return Outputs(noise, hidden_states)


def our_outputs(sd: StableDiffusion_1) -> Outputs:
    with torch.no_grad():
        sd.unet.set_timestep(TIMESTEPS)
        sd.unet.set_clip_text_embedding(TEXT_EMBEDDING.to(sd.dtype))
        noise = sd.unet(LATENTS.to(sd.dtype)).float()
        hidden_states = sd.clip_text_encoder(TOKEN_IDS).float()
    return Outputs(noise, hidden_states)


def assert_same_outputs(ours: Outputs, expected: Outputs, relative_atol: float = RELATIVE_ATOL) -> None:
    for name in ("unet", "text_encoder"):
        actual, reference = getattr(ours, name), getattr(expected, name)
        atol = relative_atol * reference.abs().max().item()
        torch.testing.assert_close(actual, reference, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


class Diffusers:
    """Copies of the reference models with LoRAs loaded by name, as `load_lora_weights(..., adapter_name=...)`."""

    def __init__(self, reference: Reference) -> None:
        self.unet = copy.deepcopy(reference.unet)
        self.text_encoder = copy.deepcopy(reference.text_encoder)

    def load(self, name: str, source: Path, text_encoder: bool = True, zeroed: str | None = None) -> None:
        """Load `source` under `name`; with `zeroed`, the updates of the modules with `zeroed` in their name are
        made zero (their `lora_B` is), as if they were left out."""
        loaded: Any = StableDiffusionPipeline.lora_state_dict(str(source), return_lora_metadata=True)
        state_dict, alphas, metadata = loaded
        if zeroed is not None:
            state_dict = {
                key: torch.zeros_like(value) if zeroed in key and ".lora_B." in key else value
                for key, value in state_dict.items()
            }
        StableDiffusionPipeline.load_lora_into_unet(
            state_dict, alphas, unet=self.unet, adapter_name=name, metadata=metadata
        )
        if text_encoder:
            StableDiffusionPipeline.load_lora_into_text_encoder(
                state_dict, alphas, text_encoder=self.text_encoder, adapter_name=name, metadata=metadata
            )

    def set_adapters(self, names: list[str], unet: list[Any], text_encoder: list[float]) -> None:
        self.unet.set_adapters(names, weights=unet)
        set_adapters_for_text_encoder(names, self.text_encoder, text_encoder)

    def outputs(self) -> Outputs:
        return diffusers_outputs(self.unet, self.text_encoder)


# -- scales ----------------------------------------------------------------------------------------------------


def test_several_loras_with_their_scales(reference: Reference, files: Files, sd: StableDiffusion_1) -> None:
    manager = SDLoraManager(sd)
    manager.add_loras("style", files.style, scale=0.6)
    manager.add_loras("subject", files.subject, scale=1.3)
    assert manager.names == ["style", "subject"] and manager.scales == {"style": 0.6, "subject": 1.3}
    # Both on the same layer: one LoraAdapter holds them.
    to_q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    adapter = manager.get_loras("style")[to_q].parent
    assert isinstance(adapter, LoraAdapter) and adapter.names == ["style", "subject"]
    diffusers = Diffusers(reference)
    diffusers.load("style", files.style)
    diffusers.load("subject", files.subject)
    diffusers.set_adapters(["style", "subject"], [0.6, 1.3], [0.6, 1.3])
    assert_same_outputs(our_outputs(sd), diffusers.outputs())
    # Switching between loaded LoRAs is a matter of scales: no reload.
    manager.update_scales({"style": 0.0, "subject": 1.0})
    diffusers.set_adapters(["style", "subject"], [0.0, 1.0], [0.0, 1.0])
    assert_same_outputs(our_outputs(sd), diffusers.outputs())
    manager.set_scale("style", 1.0)
    manager.set_scale("subject", 0.0)
    diffusers.set_adapters(["style", "subject"], [1.0, 0.0], [1.0, 0.0])
    assert_same_outputs(our_outputs(sd), diffusers.outputs())


def test_block_scales(reference: Reference, tmp_path: Path, sd: StableDiffusion_1) -> None:
    # diffusers' per-block weights act on the transformers: a LoRA of attention projections, where both agree.
    path = save_peft_lora(tmp_path / "attention", reference, 3, ATTENTION, ["q_proj", "v_proj"])
    diffusers = Diffusers(reference)
    diffusers.load("attention", path)
    unet_weights = {"down": 0.5, "mid": 0.0, "up": {"block_1": [0.2, 0.4, 0.6], "block_2": 1.5}}
    diffusers.set_adapters(["attention"], [unet_weights], [0.7])
    manager = SDLoraManager(sd)
    block_scales = {
        "text_encoder": 0.7,
        "unet.down_blocks": 0.5,
        "unet.mid_block": 0.0,
        "unet.up_blocks.1.attentions.0": 0.2,
        "unet.up_blocks.1.attentions.1": 0.4,
        "unet.up_blocks.1.attentions.2": 0.6,
        "unet.up_blocks.2": 1.5,
    }
    manager.add_loras("attention", path, block_scales=block_scales)
    assert manager.block_scales("attention") == block_scales
    assert_same_outputs(our_outputs(sd), diffusers.outputs())
    # The LoRA's scale multiplies its block scales; a selector overrides those before it; globs select too.
    manager.set_scale("attention", 2.0)
    manager.set_block_scales("attention", {"unet": 0.5, "unet.up_blocks.3": 0.25, "unet.*.attn2.*": 0.0})
    loras = manager.get_loras("attention")
    assert loras["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"].scale == 1.0
    assert loras["unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0"].scale == 0.5
    assert loras["unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k"].scale == 0.0
    assert loras["text_encoder.text_model.encoder.layers.1.self_attn.q_proj"].scale == 2.0
    with pytest.raises(ValueError, match=r"block_scales \['unet.down_block'\] select\(s\) no layer of the model"):
        manager.set_block_scales("attention", {"unet.down_block": 0.5})


# -- filters and removal ---------------------------------------------------------------------------------------


def test_include_and_exclude(reference: Reference, files: Files, sd: StableDiffusion_1) -> None:
    base = our_outputs(sd)
    manager = SDLoraManager(sd)
    manager.add_loras("style", files.style, include=["unet"])
    assert all(module.startswith("unet.") for module in manager.get_loras("style"))
    diffusers = Diffusers(reference)
    diffusers.load("style", files.style, text_encoder=False)
    ours, expected = our_outputs(sd), diffusers.outputs()
    assert ours.text_encoder.equal(base.text_encoder)
    assert_same_outputs(ours, expected)
    # Excluded tensors are skipped on purpose, not reported as unmatched.
    manager.add_loras("subject", files.subject, exclude=["text_encoder", "unet.*.attn2.*"])
    assert not any(".attn2." in module for module in manager.get_loras("subject"))
    diffusers.load("subject", files.subject, text_encoder=False, zeroed=".attn2.")
    diffusers.set_adapters(["style", "subject"], [1.0, 1.0], [1.0, 1.0])
    assert_same_outputs(our_outputs(sd), diffusers.outputs())
    with pytest.raises(ValueError, match=r"include \['unet.down_block'\] select\(s\) no layer"):
        manager.add_loras("typo", files.subject, include=["unet.down_block"])
    with pytest.raises(ValueError, match="'empty' has nothing to load once include/exclude are applied"):
        manager.add_loras("empty", files.subject, include=["unet.down_blocks.3"])
    assert manager.names == ["style", "subject"]


def test_removing_loras_restores_the_model(reference: Reference, files: Files, sd: StableDiffusion_1) -> None:
    base = our_outputs(sd)
    state_dict = sd.unet.state_dict()
    manager = SDLoraManager(sd)
    manager.add_loras("style", files.style)
    manager.add_loras("subject", files.subject, scale=0.5)
    manager.fuse("subject")
    manager.remove_loras("style")
    assert manager.names == ["subject"]
    diffusers = Diffusers(reference)
    diffusers.load("subject", files.subject)
    diffusers.set_adapters(["subject"], [0.5], [0.5])
    assert_same_outputs(our_outputs(sd), diffusers.outputs())
    manager.remove_all()
    assert manager.names == [] and manager.scales == {}
    after = our_outputs(sd)
    assert after.unet.equal(base.unet) and after.text_encoder.equal(base.text_encoder)
    assert not any(isinstance(module, LoraAdapter) for module in [*sd.unet.modules(), *sd.clip_text_encoder.modules()])
    # The same tree, keys and tensors as before.
    restored = sd.unet.state_dict()
    assert list(restored) == list(state_dict)
    assert all(restored[key] is value or restored[key].equal(value) for key, value in state_dict.items())
    with pytest.raises(LookupError, match=r"no LoRA named 'style' on the model; its LoRAs are \[\]"):
        manager.remove_loras("style")


def test_the_manager_sees_the_loras_of_an_sd1_lora_adapter(files: Files, sd: StableDiffusion_1) -> None:
    adapter = SD1LoraAdapter.from_safetensors(target=sd, checkpoint_path=files.style, scale=0.8, name="style")
    manager = SDLoraManager(sd)
    assert manager.names == []
    adapter.inject()
    assert manager.names == ["style"] and manager.scales == {"style": 0.8}
    with pytest.raises(ValueError, match="a LoRA named 'style' is already on the model"):
        manager.add_loras("style", files.subject)
    with pytest.raises(ValueError, match="'style' is already injected"):
        adapter.inject()
    adapter.eject()
    assert manager.names == []
    with pytest.raises(ValueError, match="'style' is not injected"):
        adapter.eject()


# -- fuse / unfuse ---------------------------------------------------------------------------------------------


def weights(sd: StableDiffusion_1) -> dict[str, Tensor]:
    """A copy of the weight of every layer a LoRA may update (by module name: their keys change while LoRAs are in)."""
    return {
        name: layer.weight.detach().clone() for name, layer in sd1_lora_targets(sd.unet, sd.clip_text_encoder).items()
    }


def assert_same_weights(sd: StableDiffusion_1, expected: dict[str, Tensor]) -> None:
    actual = weights(sd)
    assert list(actual) == list(expected)
    for name, weight in expected.items():
        assert torch.equal(actual[name], weight), name


def test_fuse_and_unfuse_in_float32(reference: Reference, files: Files, sd: StableDiffusion_1) -> None:
    original = weights(sd)
    manager = SDLoraManager(sd)
    manager.add_loras("style", files.style, scale=0.6)
    manager.add_loras("subject", files.subject, scale=1.3)
    unfused = our_outputs(sd)
    manager.fuse()
    assert manager.fused == ["style", "subject"]
    assert_same_outputs(our_outputs(sd), unfused)
    # A fused LoRA at another scale is fused again.
    manager.set_scale("style", 0.2)
    diffusers = Diffusers(reference)
    diffusers.load("style", files.style)
    diffusers.load("subject", files.subject)
    diffusers.set_adapters(["style", "subject"], [0.2, 1.3], [0.2, 1.3])
    assert_same_outputs(our_outputs(sd), diffusers.outputs())
    manager.unfuse("style")
    assert manager.fused == ["subject"]
    assert_same_outputs(our_outputs(sd), diffusers.outputs())
    manager.unfuse()
    assert_same_weights(sd, original)


def test_fuse_and_unfuse_in_bfloat16(files: Files, sd: StableDiffusion_1) -> None:
    sd.unet.to(dtype=torch.bfloat16)
    sd.clip_text_encoder.to(dtype=torch.bfloat16)
    original = weights(sd)
    manager = SDLoraManager(sd)
    manager.add_loras("style", files.style, scale=0.7)
    manager.add_loras("subject", files.subject)
    to_q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    style, subject = manager.get_loras("style")[to_q], manager.get_loras("subject")[to_q]
    assert isinstance(style, LinearLora) and isinstance(subject, LinearLora) and style.dtype == torch.bfloat16
    layer = manager.modules[to_q]
    before = layer.weight.detach().clone()
    unfused = our_outputs(sd)
    manager.fuse()
    # The updates in float32, from the bfloat16 LoRA weights, added to the float32 weight: one rounding.
    tensors = load_lora_tensors(files, to_q)
    merged = before.float()
    for name, lora, scale in (("style", style, 0.7), ("subject", subject, 1.0)):
        down, up = tensors[name]
        merged = merged + scale * lora.alpha / lora.rank * (
            up.to(torch.bfloat16).float() @ down.to(torch.bfloat16).float()
        )
    assert torch.equal(layer.weight, merged.to(torch.bfloat16))
    assert_same_outputs(our_outputs(sd), unfused, relative_atol=3e-2)
    manager.unfuse()
    assert_same_weights(sd, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_thousand_fuse_unfuse_cycles_change_nothing(files: Files, sd: StableDiffusion_1, dtype: torch.dtype) -> None:
    sd.unet.to(dtype=dtype)
    original = weights(sd)
    manager = SDLoraManager(sd)
    # Two LoRAs on the layers of the middle block, fused and unfused together and one by one.
    manager.add_loras("style", files.style, include=["unet.mid_block"])
    manager.add_loras("subject", files.subject, include=["unet.mid_block"], scale=0.3)
    for cycle in range(1000):
        if cycle % 2 == 0:
            manager.fuse()
        else:
            manager.fuse("subject")
            manager.fuse("style")
        manager.unfuse("style") if cycle % 3 == 0 else manager.unfuse()
        manager.unfuse()
    assert_same_weights(sd, original)


def load_lora_tensors(files: Files, module: str) -> dict[str, tuple[Tensor, Tensor]]:
    tensors: dict[str, tuple[Tensor, Tensor]] = {}
    for name, path in (("style", files.style), ("subject", files.subject)):
        state_dict = load_from_safetensors(path)
        tensors[name] = (state_dict[f"{module}.lora_A.weight"], state_dict[f"{module}.lora_B.weight"])
    return tensors


def test_unknown_names_are_refused(files: Files, sd: StableDiffusion_1) -> None:
    manager = SDLoraManager(sd)
    manager.add_loras("style", files.style)
    with pytest.raises(LookupError, match=r"no LoRA named 'styel' on the model; its LoRAs are \['style'\]"):
        manager.set_scale("styel", 1.0)
    with pytest.raises(LookupError, match="no LoRA named 'styel'"):
        manager.fuse("styel")
    with pytest.raises(TypeError, match=r"expected a Stable Diffusion model \(StableDiffusion_1, StableDiffusion_XL"):
        SDLoraManager(sd.unet)  # pyright: ignore[reportArgumentType]
