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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,  # pyright: ignore[reportPrivateUsage]
)
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig  # pyright: ignore[reportMissingTypeStubs]
from peft.utils import get_peft_model_state_dict  # pyright: ignore[reportMissingTypeStubs]
from torch import Tensor, nn
from toy_models import (
    TEXT_WIDTH,
    VOCABULARY_SIZE,
    Reference,
    build_reference,
    convert_reference,
    toy_sd,
)
from transformers import CLIPTextModel

import refiners.adapters.lora.sd as sd_module
from refiners.adapters.lora import (
    SD1LoraAdapter,
    SDLoraManager,
    UnmatchedLoraKeysError,
    UnmatchedLoraKeysWarning,
    parse_lora_file,
)
from refiners.converters.cli import main as refiners_convert
from refiners.fluxion.adapters.lora import LoraAdapter
from refiners.fluxion.utils import load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.latent_diffusion import StableDiffusion_1
from refiners.foundationals.latent_diffusion.unet_names import ldm_unet_renaming

# PEFT warns about the rank and alpha patterns of `train` that a test's targets leave out.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

RELATIVE_ATOL = 1e-4

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


def lora_state_dict(
    source: str | dict[str, Tensor], **kwargs: Any
) -> tuple[dict[str, Tensor], dict[str, float] | None, dict[str, Any] | None]:
    """diffusers' `lora_state_dict`: the state dict in diffusers' layout, the network alphas, the PEFT metadata."""
    loaded: Any = StableDiffusionPipeline.lora_state_dict(source, return_lora_metadata=True, **kwargs)
    return loaded


def diffusers_with(reference: Reference, source: Path | dict[str, Tensor], **kwargs: Any) -> Outputs:
    """Load a LoRA as `StableDiffusionPipeline.load_lora_weights` does, into copies of the reference models."""
    unet, text_encoder = copy.deepcopy(reference.unet), copy.deepcopy(reference.text_encoder)
    state_dict, alphas, metadata = lora_state_dict(str(source) if isinstance(source, Path) else dict(source), **kwargs)
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

    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return get_peft_model_state_dict(self.unet), get_peft_model_state_dict(self.text_encoder)

    def prefixed(self) -> dict[str, Tensor]:
        unet, text_encoder = self.state_dicts()
        return {
            **{f"unet.{k}": v for k, v in unet.items()},
            **{f"text_encoder.{k}": v for k, v in text_encoder.items()},
        }

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
    assert all(re.search(r"\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight$", key) for key in state_dict)
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
    # Both components in that layout (`...self_attn.to_q_lora.down.weight` in the text encoder), with the alphas
    # diffusers gives apart (`network_alphas`).
    with_alphas, network_alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    assert any(".self_attn.to_q_lora.down.weight" in key for key in with_alphas) and network_alphas
    SDLoraManager(sd).add_loras("processors", parse_lora_file(with_alphas, network_alphas=network_alphas))
    assert_same_outputs(our_outputs(sd), diffusers_with(reference, kohya))


# -- kohya -----------------------------------------------------------------------------------------------------


def test_a_kohya_file(tmp_path: Path, reference: Reference, sd: StableDiffusion_1) -> None:
    state_dict = kohya_file(train(reference))
    assert any(
        key.endswith(".lora_down.weight") and value.dim() == 4 and value.shape[-1] == 3
        for key, value in state_dict.items()
    )
    path = tmp_path / "kohya.safetensors"
    save_to_safetensors(path, state_dict)
    SD1LoraAdapter.from_safetensors(target=sd, checkpoint_path=path, scale=0.7).inject()
    # diffusers has no scale at load: it is the adapter weight.
    unet, text_encoder = copy.deepcopy(reference.unet), copy.deepcopy(reference.text_encoder)
    loaded, alphas, _ = lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(loaded, alphas, unet=unet, adapter_name="kohya")
    StableDiffusionPipeline.load_lora_into_text_encoder(loaded, alphas, text_encoder=text_encoder, adapter_name="kohya")
    unet.set_adapters(["kohya"], weights=[0.7])
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


def test_a_kohya_file_with_the_original_unet_names(tmp_path: Path, reference: Reference, sd: StableDiffusion_1) -> None:
    # Some model-site files name the UNet's modules as the original Stable Diffusion code does
    # (`lora_unet_input_blocks_1_1_proj_in`, `lora_unet_output_blocks_3_0_in_layers_2`...).
    renaming = ldm_unet_renaming()
    state_dict: dict[str, Tensor] = {}
    for key, value in kohya_file(train(reference)).items():
        if key.startswith("lora_unet_"):
            module, _, tensor = key.partition(".")
            diffusers_name = next(
                name.removeprefix("unet.") for name in sd_module.sd1_lora_targets(sd.unet) if kohya_name(name) == module
            )
            original = renaming.to_original(diffusers_name)
            assert original is not None
            if re.match(r"(input_blocks\.1[01]|output_blocks\.1)\.", original):
                # diffusers' renaming of original blocks takes `input_blocks_1` for a part of `input_blocks_10`:
                # it fails on files with both. The file leaves those out (our loader reads them all).
                continue
            key = f"lora_unet_{original.replace('.', '_')}.{tensor}"
        state_dict[key] = value
    assert any("_input_blocks_" in key for key in state_dict) and any("_output_blocks_" in key for key in state_dict)
    path = tmp_path / "original-names.safetensors"
    save_to_safetensors(path, state_dict)
    SDLoraManager(sd).add_loras("original", path)
    # diffusers renames the original blocks itself when given the UNet's config.
    assert_same_outputs(our_outputs(sd), diffusers_with(reference, path, unet_config=reference.unet.config))


# -- LyCORIS: LoHa, LoKr, LoCon, DoRA --------------------------------------------------------------------------


def randn(*shape: int, generator: torch.Generator) -> Tensor:
    return 0.3 * torch.randn(*shape, generator=generator)


def loha_delta(t: dict[str, Tensor], alpha: float) -> Tensor:
    """FedPara / LyCORIS: `(w1_a @ w1_b) * (w2_a @ w2_b)`, each product through its Tucker core if any."""
    rank = t["hada_w1_b"].shape[0]
    if "hada_t1" in t:
        first = torch.einsum("ijkl,jr,ip->prkl", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
        second = torch.einsum("ijkl,jr,ip->prkl", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
    else:
        first, second = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
    return alpha / rank * first * second


def lokr_delta(t: dict[str, Tensor], alpha: float) -> Tensor:
    """LyCORIS: `kron(w1, w2)`, each factor full or a low-rank product (`w2` through its Tucker core `t2` for a
    convolution), times alpha / rank where one is a product (the rank of `w2`'s, else of `w1`'s)."""
    rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0]
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_t2" in t:
        w2 = torch.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]).contiguous()
        return alpha / rank * torch.kron(w1[:, :, None, None], w2)
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return alpha / rank * torch.kron(w1, w2)


def locon_delta(t: dict[str, Tensor], alpha: float) -> Tensor:
    """LoCon with a Tucker core: a 1x1 `down`, a k x k `mid` between ranks, a 1x1 `up`."""
    down, mid, up = t["lora_down.weight"], t["lora_mid.weight"], t["lora_up.weight"]
    return alpha / down.shape[0] * torch.einsum("or,rskl,si->oikl", up[:, :, 0, 0], mid, down[:, :, 0, 0])


def dora_delta(weight: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """DoRA (Liu et al., 2024), normalised per output row: `m * (W + dW) / ||W + dW||`, minus `W`."""
    merged = weight + delta.reshape(weight.shape)
    norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    return magnitude.reshape(-1, *[1] * (weight.dim() - 1)) * merged / norm - weight


def test_lycoris_kinds_follow_their_formulas(reference: Reference, sd: StableDiffusion_1) -> None:
    g = torch.Generator().manual_seed(4)
    unet, text_encoder = reference.unet, reference.text_encoder
    # name: (kohya prefix, the module, its tensors, alpha)
    files: dict[str, tuple[str, nn.Module, dict[str, Tensor], float]] = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
            {
                f"hada_{n}": randn(*s, generator=g)
                for n, s in [("w1_a", (32, 4)), ("w1_b", (4, 32)), ("w2_a", (32, 4)), ("w2_b", (4, 32))]
            },
            2.0,
        ),
        "unet.down_blocks.0.resnets.0.conv1": (
            "lora_unet_down_blocks_0_resnets_0_conv1",
            unet.get_submodule("down_blocks.0.resnets.0.conv1"),
            {
                "hada_t1": randn(3, 3, 3, 3, generator=g),
                "hada_w1_a": randn(3, 32, generator=g),
                "hada_w1_b": randn(3, 32, generator=g),
                "hada_t2": randn(3, 3, 3, 3, generator=g),
                "hada_w2_a": randn(3, 32, generator=g),
                "hada_w2_b": randn(3, 32, generator=g),
            },
            1.5,
        ),
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": (
            "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
            unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"),
            {
                "lokr_w1": randn(8, 4, generator=g),
                "lokr_w2_a": randn(64, 2, generator=g),
                "lokr_w2_b": randn(2, 16, generator=g),
            },
            1.0,
        ),
        "unet.mid_block.resnets.0.conv2": (
            "lora_unet_mid_block_resnets_0_conv2",
            unet.get_submodule("mid_block.resnets.0.conv2"),
            {
                "lokr_w1": randn(4, 8, generator=g),
                "lokr_t2": randn(2, 2, 3, 3, generator=g),
                "lokr_w2_a": randn(2, 16, generator=g),
                "lokr_w2_b": randn(2, 8, generator=g),
            },
            3.0,
        ),
        "unet.down_blocks.2.resnets.0.conv1": (
            "lora_unet_down_blocks_2_resnets_0_conv1",
            unet.get_submodule("down_blocks.2.resnets.0.conv1"),
            {
                "lora_down.weight": randn(4, 32, 1, 1, generator=g),
                "lora_mid.weight": randn(4, 4, 3, 3, generator=g),
                "lora_up.weight": randn(64, 4, 1, 1, generator=g),
            },
            2.0,
        ),
        "text_encoder.text_model.encoder.layers.1.mlp.fc1": (
            "lora_te_text_model_encoder_layers_1_mlp_fc1",
            text_encoder.get_submodule("encoder.layers.1.mlp.fc1"),
            {
                "lokr_w1": randn(4, 2, generator=g),
                "lokr_w2_a": randn(16, 3, generator=g),
                "lokr_w2_b": randn(3, 16, generator=g),
            },
            1.0,
        ),
        "text_encoder.text_model.encoder.layers.1.mlp.fc2": (
            "lora_te_text_model_encoder_layers_1_mlp_fc2",
            text_encoder.get_submodule("encoder.layers.1.mlp.fc2"),
            {
                "lokr_w1_a": randn(4, 2, generator=g),
                "lokr_w1_b": randn(2, 8, generator=g),
                "lokr_w2": randn(8, 8, generator=g),
            },
            3.0,
        ),
    }
    dora: dict[str, tuple[str, nn.Module, dict[str, Tensor], float]] = {
        "unet.mid_block.attentions.0.proj_in": (
            "lora_unet_mid_block_attentions_0_proj_in",
            unet.get_submodule("mid_block.attentions.0.proj_in"),
            {"lora_down.weight": randn(4, 64, 1, 1, generator=g), "lora_up.weight": randn(64, 4, 1, 1, generator=g)},
            4.0,
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj"),
            {
                f"hada_{n}": randn(*s, generator=g)
                for n, s in [("w1_a", (32, 2)), ("w1_b", (2, 32)), ("w2_a", (32, 2)), ("w2_b", (2, 32))]
            },
            2.0,
        ),
    }
    state_dict: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}
    for name, (prefix, module, tensors, alpha) in (files | dora).items():
        assert isinstance(module, nn.Linear | nn.Conv2d)
        state_dict |= {f"{prefix}.{role}": tensor for role, tensor in tensors.items()}
        state_dict[f"{prefix}.alpha"] = torch.tensor(alpha)
        if "lora_mid.weight" in tensors:
            delta = locon_delta(tensors, alpha)
        elif "lora_down.weight" in tensors:
            down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
            delta = alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))
        elif "hada_w1_a" in tensors:
            delta = loha_delta(tensors, alpha)
        else:
            delta = lokr_delta(tensors, alpha)
        weight = module.weight.detach()
        if name in dora:
            # LyCORIS's `dora_scale`: the magnitude of each output row, shaped (out, 1, ...).
            magnitude = weight.flatten(1).norm(dim=1) * (1 + 0.2 * torch.rand(weight.shape[0], generator=g))
            state_dict[f"{prefix}.dora_scale"] = magnitude.reshape(-1, *[1] * (weight.dim() - 1))
            delta = dora_delta(weight, delta, magnitude)
        deltas[name] = delta.reshape(weight.shape)
    manager = SDLoraManager(sd)
    manager.add_loras("lycoris", state_dict)
    kinds = {module: type(lora).__name__ for module, lora in manager.get_loras("lycoris").items()}
    assert sorted(kinds.values()) == ["Dora", "Dora", "LoCon", "LoHa", "LoHa", "LoKr", "LoKr", "LoKr", "LoKr"]
    expected = merged_outputs(reference, deltas)
    assert_same_outputs(our_outputs(sd), expected)
    manager.fuse()
    assert_same_outputs(our_outputs(sd), expected)


# -- every tensor used or reported -----------------------------------------------------------------------------


def test_a_stray_key_is_reported_with_what_the_model_has_near_it(
    tmp_path: Path, reference: Reference, sd: StableDiffusion_1
) -> None:
    # (diffusers reads a kohya file's layout from its `to_out` keys: the LoRA has some.)
    clean = kohya_file(train(reference, unet_targets=["to_out.0", "proj_in"], text_targets=["out_proj"]))
    stray = "lora_unet_down_blocks_0_attentions_0_proj_inn"
    state_dict = clean | {
        f"{stray}.lora_down.weight": torch.zeros(4, 32, 1, 1),
        f"{stray}.lora_up.weight": torch.zeros(32, 4, 1, 1),
        f"{stray}.alpha": torch.tensor(4.0),
    }
    path = tmp_path / "stray.safetensors"
    save_to_safetensors(path, state_dict)
    base = our_outputs(sd)
    manager = SDLoraManager(sd)
    with pytest.raises(
        UnmatchedLoraKeysError,
        match=rf"{stray}\.lora_down\.weight.*nearest: unet\.down_blocks\.0\.attentions\.0\.proj_in",
    ) as error:
        manager.add_loras("stray", path)
    assert sorted(error.value.unmatched) == sorted(key for key in state_dict if key.startswith(stray))
    with pytest.raises(UnmatchedLoraKeysError, match=stray):
        SD1LoraAdapter.from_safetensors(target=sd, checkpoint_path=path)
    # Nothing was loaded: the model is untouched.
    assert manager.names == [] and our_outputs(sd).unet.equal(base.unet)
    with pytest.warns(UnmatchedLoraKeysWarning, match=rf"{stray}\.lora_up\.weight"):
        manager.add_loras("lenient", path, strict=False)
    assert_same_outputs(our_outputs(sd), diffusers_with(reference, clean))


# -- export ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_an_export_loads_in_diffusers_as_ours(
    tmp_path: Path, reference: Reference, sd: StableDiffusion_1, layout: str
) -> None:
    source = tmp_path / "kohya.safetensors"
    save_to_safetensors(source, kohya_file(train(reference, seed=5), alpha=2.0))
    manager = SDLoraManager(sd)
    manager.add_loras("style", source)
    exported = tmp_path / f"{layout}.safetensors"
    manager.save_loras("style", exported, layout="peft" if layout == "peft" else "kohya")
    metadata = load_metadata_from_safetensors(exported)
    if layout == "peft":
        assert set(json.loads(metadata["lora_adapter_metadata"])) >= {"unet.r", "unet.lora_alpha", "text_encoder.r"}
    else:
        assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
        assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert_same_outputs(diffusers_with(reference, exported), our_outputs(sd))
    # And back into ours, the same LoRA.
    manager.remove_all()
    manager.add_loras("again", exported)
    assert_same_outputs(our_outputs(sd), diffusers_with(reference, source))


def test_docstring_examples_run() -> None:
    import refiners.foundationals.clip.text_encoder_names as text_encoder_names
    import refiners.foundationals.latent_diffusion.unet_names as unet_names

    for documented in (sd_module, sd_module.SDLoraAdapter, unet_names, text_encoder_names):
        (example,) = re.findall(r"```py\n(.*?)```", documented.__doc__ or "", re.DOTALL)
        exec(textwrap.dedent(example), {})


def test_the_name_maps_name_every_layer_of_the_reference(reference: Reference, sd: StableDiffusion_1) -> None:
    targets = sd_module.sd1_lora_targets(sd.unet, sd.clip_text_encoder)
    theirs = {
        f"{component}.{'text_model.' if component == 'text_encoder' else ''}{name}": module
        for component, model in (("unet", reference.unet), ("text_encoder", reference.text_encoder))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
    }
    assert sorted(targets) == sorted(theirs)
    for name, layer in targets.items():
        assert layer.weight.shape == theirs[name].weight.shape, name


def test_refiners_convert_lora(
    tmp_path: Path, reference: Reference, sd: StableDiffusion_1, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "kohya.safetensors"
    save_to_safetensors(source, kohya_file(train(reference, seed=6)))
    expected = diffusers_with(reference, source)
    normalised = tmp_path / "refiners.safetensors"
    assert refiners_convert(["lora", "--from", str(source), "--to", str(normalised)]) == 0
    assert capsys.readouterr().out.strip() == str(normalised)
    # The refiners layout: dotted module names with the component first, every alpha written.
    keys = list(parse_lora_file(normalised).specs)
    assert all(
        key.startswith(("unet.down_blocks.", "unet.mid_block.", "unet.up_blocks.", "text_encoder.text_model."))
        for key in keys
    )
    SDLoraManager(sd).add_loras("normalised", normalised)
    assert_same_outputs(our_outputs(sd), expected)
    peft = tmp_path / "peft.safetensors"
    assert refiners_convert(["lora", "--from", str(normalised), "--to", str(peft), "--layout", "peft"]) == 0
    assert_same_outputs(diffusers_with(reference, peft), expected)
    # A stray tensor fails the command, naming it; --lenient writes the rest.
    stray = tmp_path / "stray.safetensors"
    save_to_safetensors(stray, {"lora_unet_mid_block_attentions_0_proj_inn.alpha": torch.tensor(1.0)})
    assert refiners_convert(["lora", "--from", str(stray), "--to", str(tmp_path / "out.safetensors")]) == 1
    assert "lora_unet_mid_block_attentions_0_proj_inn.alpha" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
