"""LoRA files of every layout on Stable Diffusion 1.x: ours computes what diffusers computes with the same file.

The models are the SD1.5 architecture at toy size (UNet widths 32-64, a 2-layer CLIP text model), random weights,
converted with the refiners key maps. Each LoRA file is written by the ecosystem's own code: PEFT's `LoraConfig` on
the diffusers UNet and the transformers text encoder, saved with diffusers' `save_lora_weights`; kohya keys made by
diffusers' `convert_state_dict_to_kohya`; the old attention-processor keys by diffusers' kohya conversion. diffusers
loads the file into copies of the reference models (`lora_state_dict` then `load_lora_into_unet` /
`load_lora_into_text_encoder`, what `load_lora_weights` runs), we load it into ours, and the UNet and text-encoder
outputs agree within 1e-4 of their scale. The LyCORIS kinds diffusers cannot load (LoHa, LoKr, LoCon's `lora_mid`,
DoRA's `dora_scale`) are checked against their published formulas applied to the reference model's weights.
"""

import copy
import json
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,  # pyright: ignore[reportPrivateUsage]
)
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig  # pyright: ignore[reportMissingTypeStubs]
from peft.utils import get_peft_model_state_dict  # pyright: ignore[reportMissingTypeStubs]
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

import refiners.adapters.lora.sd as sd_module
from refiners.adapters.lora import (
    SD1LoraAdapter,
    SDLoraManager,
    UnmatchedLoraKeysError,
    UnmatchedLoraKeysWarning,
    convert_sd1_lora,
    parse_lora_file,
)
from refiners.converters.cli import main as refiners_convert
from refiners.converters.clip_text import convert_transformers_clip_text
from refiners.converters.unet import convert_diffusers_unet
from refiners.fluxion.adapters.lora import LoraAdapter
from refiners.fluxion.utils import load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.clip import CLIPTextEncoder
from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder, SD1UNet, StableDiffusion_1
from refiners.foundationals.latent_diffusion.unet_names import ldm_unet_renaming

# PEFT warns about the rank and alpha patterns of `train` that a test's targets leave out.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

RELATIVE_ATOL = 1e-4

UNET_CHANNELS = (32, 32, 64, 64)
TEXT_WIDTH = 32
VOCABULARY_SIZE = 64
UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": list(UNET_CHANNELS),
    "center_input_sample": False,
    "cross_attention_dim": TEXT_WIDTH,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 64,
    "max_position_embeddings": 77,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": TEXT_WIDTH,
    "layer_norm_eps": 1e-05,
    "vocab_size": VOCABULARY_SIZE,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# Every kind of layer a LoRA updates in the UNet: attention and feed-forward projections, the transformers' 1x1
# convolutions, the resnets' 3x3 convolutions (conv LoRAs: a k x k `down`, a 1x1 `up`), shortcuts, timestep MLPs.
UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# -- models ----------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel


def perturb_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm | nn.LayerNorm):
                assert module.weight is not None and module.bias is not None
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))


@pytest.fixture(scope="module")
def reference() -> Reference:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)).eval()
    perturb_norms(unet)
    perturb_norms(text_encoder)
    return Reference(unet, text_encoder)


@pytest.fixture(scope="module")
def converted(reference: Reference) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    unet = convert_diffusers_unet(reference.unet.state_dict(), toy_unet())
    text_encoder = convert_transformers_clip_text(reference.text_encoder.state_dict(), toy_text_encoder())
    return unet, text_encoder


def toy_unet() -> SD1UNet:
    return SD1UNet(channels=UNET_CHANNELS, context_embedding_dim=TEXT_WIDTH, device="meta")


def toy_text_encoder() -> CLIPTextEncoder:
    return CLIPTextEncoder(
        embedding_dim=TEXT_WIDTH,
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=2,
        num_attention_heads=4,
        feedforward_dim=64,
        gelu_approximation="quick",
        device="meta",
    )


@pytest.fixture
def sd(converted: tuple[dict[str, Tensor], dict[str, Tensor]]) -> StableDiffusion_1:
    """Ours, fresh for each test (fusing writes into the weights)."""
    unet, text_encoder = toy_unet(), toy_text_encoder()
    unet.load_state_dict({k: v.clone() for k, v in converted[0].items()}, assign=True)
    text_encoder.load_state_dict({k: v.clone() for k, v in converted[1].items()}, assign=True)
    lda = LatentDiffusionAutoencoder(0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    return StableDiffusion_1(unet=unet, lda=lda, clip_text_encoder=text_encoder)


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
        sd.unet.set_clip_text_embedding(TEXT_EMBEDDING)
        noise = sd.unet(LATENTS.to(sd.dtype)).float()
        hidden_states = sd.clip_text_encoder(TOKEN_IDS).float()
    return Outputs(noise, hidden_states)


def assert_same_outputs(ours: Outputs, expected: Outputs, relative_atol: float = RELATIVE_ATOL) -> None:
    for name in ("unet", "text_encoder"):
        actual, reference = getattr(ours, name), getattr(expected, name)
        atol = relative_atol * reference.abs().max().item()
        torch.testing.assert_close(actual, reference, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def diffusers_with(reference: Reference, source: str | Path | dict[str, Tensor], **kwargs: Any) -> Outputs:
    """Load a LoRA as `StableDiffusionPipeline.load_lora_weights` does, into copies of the reference models."""
    unet, text_encoder = copy.deepcopy(reference.unet), copy.deepcopy(reference.text_encoder)
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(source) if isinstance(source, Path) else dict(source), return_lora_metadata=True, **kwargs
    )
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=unet, metadata=metadata)
    if any(key.startswith("text_encoder.") for key in state_dict):
        StableDiffusionPipeline.load_lora_into_text_encoder(
            state_dict, alphas, text_encoder=text_encoder, metadata=metadata
        )
    return diffusers_outputs(unet, text_encoder)


def merged_outputs(reference: Reference, deltas: dict[str, Tensor]) -> Outputs:
    """The reference models with `deltas` added to their weights (by module name, with the component first)."""
    components: dict[str, nn.Module] = {
        "unet": copy.deepcopy(reference.unet),
        "text_encoder": copy.deepcopy(reference.text_encoder),
    }
    with torch.no_grad():
        for name, delta in deltas.items():
            component, _, module_name = name.partition(".")
            module = components[component].get_submodule(module_name.removeprefix("text_model."))
            assert isinstance(module, nn.Linear | nn.Conv2d)
            module.weight.add_(delta.reshape(module.weight.shape))
    unet, text_encoder = components["unet"], components["text_encoder"]
    assert isinstance(unet, UNet2DConditionModel) and isinstance(text_encoder, CLIPTextModel)
    return diffusers_outputs(unet, text_encoder)


# -- LoRA files as the ecosystem writes them -------------------------------------------------------------------


@dataclass
class Trained:
    """LoRAs trained with PEFT on copies of the reference models (random weights)."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    unet_config: LoraConfig
    text_config: LoraConfig

    def state_dicts(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return get_peft_model_state_dict(self.unet), get_peft_model_state_dict(self.text_encoder)

    def prefixed(self) -> dict[str, Tensor]:
        unet, text_encoder = self.state_dicts()
        return {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in text_encoder.items()}}

    def save(self, folder: Path) -> Path:
        """As diffusers' training scripts save it, with PEFT's config in `lora_adapter_metadata`."""
        unet, text_encoder = self.state_dicts()
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=unet,
            text_encoder_lora_layers=text_encoder,
            unet_lora_adapter_metadata=config_dict(self.unet_config),
            text_encoder_lora_adapter_metadata=config_dict(self.text_config),
        )
        return folder / "pytorch_lora_weights.safetensors"


def config_dict(config: Any) -> dict[str, Any]:
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}


def train(
    reference: Reference,
    seed: int = 1,
    unet_targets: list[str] = UNET_TARGETS,
    text_targets: list[str] = TEXT_TARGETS,
    use_dora: bool = False,
) -> Trained:
    unet, text_encoder = copy.deepcopy(reference.unet), copy.deepcopy(reference.text_encoder)
    unet_config = LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=unet_targets,
        rank_pattern={"^down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 2, "conv_shortcut": 3},
        alpha_pattern={"proj_in": 1.5},
        init_lora_weights=False,
        use_dora=use_dora,
    )
    text_config = LoraConfig(r=2, lora_alpha=3, target_modules=text_targets, init_lora_weights=False, use_dora=use_dora)
    torch.manual_seed(seed)
    unet.add_adapter(unet_config)
    text_encoder.add_adapter(text_config)
    return Trained(unet, text_encoder, unet_config, text_config)


def kohya_file(trained: Trained, alpha: float = 3.0) -> dict[str, Tensor]:
    """diffusers' PEFT -> kohya conversion, text encoder keys as kohya's SD1 trainer names them (`lora_te_text_model_`),
    and one alpha for all modules apart from their ranks (kohya's `--network_alpha`)."""
    state_dict: dict[str, Tensor] = {}
    for key, value in convert_state_dict_to_kohya(trained.prefixed()).items():
        if key.startswith("lora_te1_"):
            key = "lora_te_text_model_" + key.removeprefix("lora_te1_")
        state_dict[key] = torch.tensor(alpha) if key.endswith(".alpha") else value
    return state_dict


# -- PEFT / diffusers ------------------------------------------------------------------------------------------


def test_a_diffusers_file(tmp_path: Path, reference: Reference, sd: StableDiffusion_1) -> None:
    path = train(reference).save(tmp_path)
    base = our_outputs(sd)
    manager = SDLoraManager(sd)
    manager.add_loras("trained", path)
    assert len(manager.get_loras("trained")) == len(parse_lora_file(path).specs)
    expected = diffusers_with(reference, path)
    assert_same_outputs(our_outputs(sd), expected)
    assert not torch.allclose(expected.unet, base.unet) and not torch.allclose(expected.text_encoder, base.text_encoder)


def test_a_dora_file(tmp_path: Path, reference: Reference, sd: StableDiffusion_1) -> None:
    trained = train(reference, unet_targets=["to_q", "to_out.0", "proj_in", "conv1"], use_dora=True)
    path = trained.save(tmp_path)
    SDLoraManager(sd).add_loras("dora", path)
    expected = diffusers_with(reference, path)
    # diffusers' text-encoder loader loses DoRA magnitudes (transformers reports `lora_magnitude_vector` keys as
    # unexpected): the reference for the text encoder is PEFT's own model, trained.
    expected.text_encoder = diffusers_outputs(reference.unet, trained.text_encoder).text_encoder
    assert_same_outputs(our_outputs(sd), expected)


def test_the_attention_processor_layout_in_a_bin_file(
    tmp_path: Path, reference: Reference, sd: StableDiffusion_1
) -> None:
    # The Hello World's Pokemon LoRA: `save_attn_procs`' `pytorch_lora_weights.bin`, the UNet's attention processors
    # (`...attn1.processor.to_q_lora.down.weight`), no prefix, no alpha.
    kohya = kohya_file(train(reference, unet_targets=["to_q", "to_k", "to_v", "to_out.0"]))
    unet_only = {k: v for k, v in kohya.items() if k.startswith("lora_unet_") and not k.endswith(".alpha")}
    converted, _ = _convert_non_diffusers_lora_to_diffusers(unet_only)
    state_dict = {key.removeprefix("unet."): value for key, value in converted.items()}
    assert all(".processor.to_" in key and "_lora.down.weight" in key or "_lora.up." in key for key in state_dict)
    torch.save(state_dict, tmp_path / "pytorch_lora_weights.bin")
    base = our_outputs(sd)
    lora = SD1LoraAdapter.from_safetensors(target=sd, checkpoint_path=tmp_path / "pytorch_lora_weights.bin", scale=1.0)
    assert our_outputs(sd).unet.equal(base.unet)  # built, not injected yet
    lora.inject()
    assert lora.name == "pytorch_lora_weights"
    assert_same_outputs(our_outputs(sd), diffusers_with(reference, {f"unet.{k}": v for k, v in state_dict.items()}))
    lora.eject()
    after = our_outputs(sd)
    assert after.unet.equal(base.unet) and after.text_encoder.equal(base.text_encoder)
    assert not any(isinstance(module, LoraAdapter) for module in sd.unet.modules())


# -- kohya -----------------------------------------------------------------------------------------------------


def test_a_kohya_file(tmp_path: Path, reference: Reference, sd: StableDiffusion_1) -> None:
    state_dict = kohya_file(train(reference))
    assert any(key.endswith(".lora_down.weight") and value.dim() == 4 and value.shape[-1] == 3 for key, value in state_dict.items())
    path = tmp_path / "kohya.safetensors"
    save_to_safetensors(path, state_dict)
    SD1LoraAdapter.from_safetensors(target=sd, checkpoint_path=path, scale=0.7).inject()
    # diffusers has no scale at load: it is the adapter weight.
    unet, text_encoder = copy.deepcopy(reference.unet), copy.deepcopy(reference.text_encoder)
    loaded, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(loaded, alphas, unet=unet, adapter_name="kohya")
    StableDiffusionPipeline.load_lora_into_text_encoder(loaded, alphas, text_encoder=text_encoder, adapter_name="kohya")
    unet.set_adapters(["kohya"], weights=[0.7])
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    set_adapters_for_text_encoder(["kohya"], text_encoder, [0.7])
    assert_same_outputs(our_outputs(sd), diffusers_outputs(unet, text_encoder))


def kohya_name(module: str) -> str:
    """kohya's name of a PEFT module name (`unet.down_blocks.0...to_q`, `text_encoder.encoder.layers.0...q_proj`)."""
    component, _, name = module.partition(".")
    prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
    return prefix + name.replace(".", "_")


def test_kohya_alphas_per_module_and_missing(reference: Reference, sd: StableDiffusion_1) -> None:
    trained = train(reference, unet_targets=["to_q", "conv1"], text_targets=["q_proj"])
    state_dict = kohya_file(trained)
    modules = sorted(key.removesuffix(".lora_A.weight") for key in trained.prefixed() if key.endswith(".lora_A.weight"))
    alphas: dict[str, float] = {}
    for index, module in enumerate(modules):
        if index == 0:
            del state_dict[f"{kohya_name(module)}.alpha"]
        else:
            alphas[module] = [1.0, 2.0, 8.0][index % 3]
            state_dict[f"{kohya_name(module)}.alpha"] = torch.tensor(alphas[module])
    SDLoraManager(sd).add_loras("kohya", state_dict)
    # kohya's formula: W + alpha / rank * up @ down, with alpha = rank where the file has none.
    deltas: dict[str, Tensor] = {}
    for module in modules:
        down = state_dict[f"{kohya_name(module)}.lora_down.weight"]
        up = state_dict[f"{kohya_name(module)}.lora_up.weight"]
        rank = down.shape[0]
        deltas[module] = alphas.get(module, rank) / rank * (up.flatten(1) @ down.flatten(1))
    assert_same_outputs(our_outputs(sd), merged_outputs(reference, deltas))
