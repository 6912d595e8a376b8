"""LoRAs on SDXL: kohya files with SGM or diffusers names and both text encoders, PEFT files, equal to diffusers'
`StableDiffusionXLPipeline.load_lora_weights`; SD1 LoRAs refused with the reason; export read back by diffusers."""

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from torch import Tensor
from toy_sdxl import Twins, build_twins

from refiners.adapters.lora import (
    LoraSpec,
    ParsedLoras,
    SD1LoraAdapter,
    SDLoraManager,
    SDXLLoraAdapter,
    save_kohya_lora,
)
from refiners.fluxion.utils import save_to_safetensors
from refiners.foundationals.latent_diffusion import DDIM
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXL_SOLVER_PARAMS, StableDiffusion_XL
from refiners.foundationals.latent_diffusion.unet_names import unet_renaming

RANK = 4
PROMPT = "a cute cat"


@pytest.fixture(scope="module")
def twins() -> Twins:
    return build_twins()


def sdxl(twins: Twins) -> StableDiffusion_XL:
    return StableDiffusion_XL(
        unet=twins.unet,
        lda=twins.lda,
        clip_text_encoder=twins.text_encoder,
        solver=DDIM(num_inference_steps=4, params=SDXL_SOLVER_PARAMS),
    )


def random_specs(model: StableDiffusion_XL) -> dict[str, LoraSpec]:
    """A LoRA on the attention and feed-forward Linears of the UNet and of both text encoders, random up and down."""
    generator = torch.Generator().manual_seed(5)
    pattern = re.compile(r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
    specs: dict[str, LoraSpec] = {}
    for name, module in model.diffusers_modules().items():
        if not pattern.search(name) or not isinstance(module, torch.nn.Linear):
            continue
        down = torch.randn(RANK, module.in_features, generator=generator) * 0.3
        up = torch.randn(module.out_features, RANK, generator=generator) * 0.3
        specs[name] = LoraSpec(kind="lora", tensors={"lora_down": down, "lora_up": up}, alpha=2.0)
    assert any(n.startswith("text_encoder_2.") for n in specs) and any(n.startswith("text_encoder.") for n in specs)
    return specs


def sgm_named(path: Path, specs: dict[str, LoraSpec], model: StableDiffusion_XL) -> None:
    """A kohya file whose UNet modules have the original (SGM) names: `lora_unet_input_blocks_4_1_...`."""
    renaming = unet_renaming(model.unet)
    renamed: dict[str, LoraSpec] = {}
    for name, spec in specs.items():
        component, _, module = name.partition(".")
        original = renaming.to_original(module) if component == "unet" else None
        renamed[f"unet.{original}" if original is not None else name] = spec
    assert any("input_blocks" in name for name in renamed)
    save_kohya_lora(path, renamed, base_model="sdxl_base_v1-0")


def outputs(pipeline_or_model: Any, twins: Twins) -> tuple[Tensor, Tensor, Tensor]:
    """Text embedding, pooled embedding and UNet prediction on fixed inputs."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 6, generator=generator)
    time_ids = torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]])
    with torch.no_grad():
        if isinstance(pipeline_or_model, StableDiffusionXLPipeline):
            embedding, _, pooled, _ = pipeline_or_model.encode_prompt(
                PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False
            )
            assert pooled is not None
            prediction = pipeline_or_model.unet(
                x, 500, encoder_hidden_states=embedding, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
            ).sample
        else:
            model: StableDiffusion_XL = pipeline_or_model
            embedding, pooled = model.clip_text_encoder(PROMPT)
            model.set_unet_context(
                timestep=torch.tensor([500]),
                clip_text_embedding=embedding,
                pooled_text_embedding=pooled,
                time_ids=time_ids,
            )
            prediction = model.unet(x)
    return embedding, pooled, prediction


def assert_outputs_match(actual: tuple[Tensor, ...], expected: tuple[Tensor, ...]) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-4 * e.abs().max().item(), rtol=0)


@pytest.mark.parametrize("names", ["sgm", "diffusers"])
def test_kohya_sdxl_lora_matches_diffusers(twins: Twins, tmp_path: Path, names: str) -> None:
    model = sdxl(twins)
    before = outputs(model, twins)
    specs = random_specs(model)
    path = tmp_path / "lora.safetensors"
    if names == "sgm":
        sgm_named(path, specs, model)
    else:
        save_kohya_lora(path, specs, base_model="sdxl_base_v1-0")
    reference = copy.deepcopy(twins.pipeline)
    reference.load_lora_weights(str(path))
    expected = outputs(reference, twins)

    adapter = SDXLLoraAdapter.from_safetensors(target=model, checkpoint_path=path, scale=1.0).inject()
    actual = outputs(model, twins)
    assert_outputs_match(actual, expected)
    # The LoRA moves every output, and ejecting it gives the model back exactly.
    for moved, plain in zip(actual, before, strict=True):
        assert (moved - plain).abs().max() > 1e-3 * plain.abs().max()
    adapter.eject()
    for after, plain in zip(outputs(model, twins), before, strict=True):
        torch.testing.assert_close(after, plain, atol=0, rtol=0)


def test_manager_exports_an_sdxl_lora_diffusers_reads(twins: Twins, tmp_path: Path) -> None:
    model = sdxl(twins)
    manager = SDLoraManager(model)
    specs = random_specs(model)
    manager.add_loras("style", ParsedLoras(specs=specs), scale=0.7)
    ours = outputs(model, twins)
    manager.save_loras("style", tmp_path / "peft.safetensors", layout="peft")
    manager.remove_all()
    reference = copy.deepcopy(twins.pipeline)
    reference.load_lora_weights(str(tmp_path / "peft.safetensors"), adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.7])
    assert_outputs_match(ours, outputs(reference, twins))


def test_an_sd1_lora_is_refused_with_the_reason(twins: Twins, tmp_path: Path) -> None:
    to_k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    path = tmp_path / "sd1.safetensors"
    save_to_safetensors(
        path, {f"{to_k}.lora_A.weight": torch.randn(4, 768), f"{to_k}.lora_B.weight": torch.randn(64, 4)}
    )
    message = r"this LoRA is for Stable Diffusion 1.x: its cross-attention reads 768-wide text embeddings, but StableDiffusion_XL's reads 80-wide ones"
    with pytest.raises(ValueError, match=message):
        SDXLLoraAdapter.from_safetensors(target=sdxl(twins), checkpoint_path=path)
    with pytest.raises(TypeError, match="SD1LoraAdapter is for StableDiffusion_1 models, got a StableDiffusion_XL"):
        SD1LoraAdapter.from_safetensors(target=sdxl(twins), checkpoint_path=path)
