"""The SDXL architecture at toy size, on both sides: diffusers' `StableDiffusionXLPipeline` and its refiners twin.

Importable from any test as `toy_sdxl`. Both text encoders have their own width (CLIP-L 32, OpenCLIP-G 48: the
UNet's context is 80 wide), the second tokenizer pads with "!", norms are perturbed so that a swap would show.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from toy_models import perturb_norms
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers import CLIPTokenizer as TransformersCLIPTokenizer

from refiners.converters.autoencoder import convert_diffusers_autoencoder
from refiners.converters.clip_text import convert_transformers_clip_text
from refiners.converters.toy import TOY_TEXT_ENCODER_CONFIG, TOY_VAE_CONFIG, write_byte_level_vocabulary
from refiners.converters.unet import convert_diffusers_unet
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import save_to_safetensors
from refiners.foundationals.clip import CLIPTextEncoder, CLIPTokenizer
from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import (
    DoubleTextEncoder,
    RefinerTextEncoder,
    SDXLUNet,
    StableDiffusion_XL_Refiner,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.presets import TINY, TINY_REFINER

# The family's TINY preset, in diffusers' and transformers' words.
_UNET = TINY.unet.arguments
_L, _G = (TINY.clip_text_encoder.arguments[name] for name in ("text_encoder_l", "text_encoder_g"))
assert isinstance(_L, ModelConfig) and isinstance(_G, ModelConfig)
WIDTH_L, WIDTH_G = _L.arguments["embedding_dim"], _G.arguments["embedding_dim"]
POOLED_DIM = TINY.clip_text_encoder.arguments["projection_dim"]
TIME_EMBEDDING_DIM = _UNET["time_embedding_dim"]
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": list(_UNET["channels"]),
    "attention_head_dim": list(_UNET["num_attention_heads"]),
    "transformer_layers_per_block": list(_UNET["transformer_depths"]),
    "cross_attention_dim": _UNET["context_embedding_dim"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBEDDING_DIM,
    "projection_class_embeddings_input_dim": POOLED_DIM + 6 * TIME_EMBEDDING_DIM,
}
TEXT_ENCODER_L_CONFIG: dict[str, Any] = TOY_TEXT_ENCODER_CONFIG | {
    "hidden_size": WIDTH_L,
    "intermediate_size": _L.arguments["feedforward_dim"],
    "num_hidden_layers": _L.arguments["num_layers"],
}
TEXT_ENCODER_G_CONFIG: dict[str, Any] = TOY_TEXT_ENCODER_CONFIG | {
    "hidden_size": WIDTH_G,
    "intermediate_size": _G.arguments["feedforward_dim"],
    "num_hidden_layers": _G.arguments["num_layers"],
    "hidden_act": "gelu",
    "projection_dim": POOLED_DIM,
}
VAE_CONFIG: dict[str, Any] = TOY_VAE_CONFIG | {
    "scaling_factor": TINY.lda.arguments["encoder_scale"],
    "force_upcast": True,
}
# stabilityai/stable-diffusion-xl-base-1.0's scheduler.
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
}


def build_pipeline(seed: int = 0, in_channels: int = 4) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline at toy size, random weights (seeded), norms perturbed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config: dict[str, Any] = {**UNET_CONFIG, "in_channels": in_channels}
        unet = UNet2DConditionModel(**config).eval()
        vae = AutoencoderKL(**VAE_CONFIG).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_L_CONFIG)).eval()
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_G_CONFIG)).eval()
        for model in (unet, vae, text_encoder, text_encoder_2):
            perturb_norms(model)
    with tempfile.TemporaryDirectory() as vocabulary_folder:
        vocabulary, merges = write_byte_level_vocabulary(Path(vocabulary_folder))
        tokenizer: Any = TransformersCLIPTokenizer(str(vocabulary), str(merges), model_max_length=77)
        tokenizer_2: Any = TransformersCLIPTokenizer(str(vocabulary), str(merges), model_max_length=77, pad_token="!")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),  # pyright: ignore[reportArgumentType]
    )


def our_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as vocabulary_folder:
        vocabulary, merges = write_byte_level_vocabulary(Path(vocabulary_folder))
        return CLIPTokenizer(vocabulary, merges)


def our_text_encoder(pipeline: StableDiffusionXLPipeline) -> DoubleTextEncoder:
    """Our `DoubleTextEncoder` with the pipeline's weights and a tokenizer."""
    encoders: list[CLIPTextEncoder] = []
    for reference, config in [(pipeline.text_encoder, _L), (pipeline.text_encoder_2, _G)]:
        encoder = config.build((CLIPTextEncoder,), device="meta")
        state_dict = {k: v for k, v in reference.state_dict().items() if k != "text_projection.weight"}
        encoder.load_state_dict(convert_transformers_clip_text(state_dict, encoder), strict=True, assign=True)
        encoders.append(encoder)
    double = DoubleTextEncoder(*encoders, projection_dim=POOLED_DIM)
    with torch.no_grad():
        double.projection.weight.copy_(pipeline.text_encoder_2.text_projection.weight)
    double.set_tokenizer(our_tokenizer())
    return double


def our_unet(pipeline: StableDiffusionXLPipeline) -> SDXLUNet:
    config: Any = pipeline.unet.config
    arguments = {**_UNET, "in_channels": config.in_channels, "guidance_embedding_dim": config.time_cond_proj_dim}
    unet = ModelConfig(TINY.unet.class_name, arguments).build((SDXLUNet,), device="meta")
    unet.load_state_dict(convert_diffusers_unet(pipeline.unet.state_dict(), unet), strict=True, assign=True)
    return unet


def our_autoencoder(pipeline: StableDiffusionXLPipeline) -> LatentDiffusionAutoencoder:
    lda = TINY.lda.build((LatentDiffusionAutoencoder,), device="meta")
    lda.load_state_dict(convert_diffusers_autoencoder(pipeline.vae.state_dict(), lda), strict=True, assign=True)
    return lda


@dataclass
class Twins:
    pipeline: StableDiffusionXLPipeline
    text_encoder: DoubleTextEncoder
    unet: SDXLUNet
    lda: LatentDiffusionAutoencoder


def build_twins(seed: int = 0, in_channels: int = 4) -> Twins:
    pipeline = build_pipeline(seed, in_channels)
    return Twins(pipeline, our_text_encoder(pipeline), our_unet(pipeline), our_autoencoder(pipeline))


# -- the refiner ---------------------------------------------------------------------------------------------------

_REFINER_UNET = TINY_REFINER.unet.arguments
REFINER_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": list(_REFINER_UNET["channels"]),
    "attention_head_dim": list(_REFINER_UNET["num_attention_heads"]),
    "transformer_layers_per_block": list(_REFINER_UNET["transformer_depths"]),
    "cross_attention_dim": _REFINER_UNET["context_embedding_dim"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBEDDING_DIM,
    "projection_class_embeddings_input_dim": POOLED_DIM + 5 * TIME_EMBEDDING_DIM,
}


def build_refiner_pipeline(base: StableDiffusionXLPipeline, seed: int = 1) -> StableDiffusionXLImg2ImgPipeline:
    """diffusers' refiner pipeline at toy size: its own UNet (seeded), the base's autoencoder and OpenCLIP-G, as
    diffusers' documentation sets up the ensemble of experts."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**REFINER_UNET_CONFIG).eval()
        perturb_norms(unet)
        with torch.no_grad():  # so that the time ids (the aesthetic scores) move the output well above rounding
            add_embedding: Any = unet.add_embedding
            add_embedding.linear_1.weight.mul_(30.0)
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,  # pyright: ignore[reportArgumentType]
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,  # pyright: ignore[reportArgumentType]
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),  # pyright: ignore[reportArgumentType]
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def our_refiner(
    refiner: StableDiffusionXLImg2ImgPipeline, lda: LatentDiffusionAutoencoder
) -> StableDiffusion_XL_Refiner:
    """The refiners twin of `build_refiner_pipeline`'s pipeline (its autoencoder given: the base's twin's)."""
    encoder_g = _G.build((CLIPTextEncoder,), device="meta")
    state_dict = {k: v for k, v in refiner.text_encoder_2.state_dict().items() if k != "text_projection.weight"}
    encoder_g.load_state_dict(convert_transformers_clip_text(state_dict, encoder_g), strict=True, assign=True)
    text_encoder = RefinerTextEncoder(encoder_g, projection_dim=POOLED_DIM)
    with torch.no_grad():
        text_encoder.projection.weight.copy_(refiner.text_encoder_2.text_projection.weight)
    text_encoder.set_tokenizer(our_tokenizer())
    unet = TINY_REFINER.unet.build((SDXLUNet,), device="meta")
    unet.load_state_dict(convert_diffusers_unet(refiner.unet.state_dict(), unet), strict=True, assign=True)
    return StableDiffusion_XL_Refiner(unet=unet, lda=lda, clip_text_encoder=text_encoder, default_size=64)


def write_sgm_checkpoint(folder: Path, path: Path) -> None:
    """Write a toy diffusers folder's model (`build_pipeline`'s, or `build_refiner_pipeline`'s) as an SGM single file,
    as Stability's checkpoints lay it out: the refiner's has OpenCLIP-G alone, as its first embedder."""
    from refiners.converters.single_file import (
        SGM_PREFIXES,
        SGM_REFINER_TEXT_ENCODER_2_PREFIX,
        ldm_autoencoder_renaming,
    )
    from refiners.fluxion.utils import load_from_safetensors
    from refiners.foundationals.latent_diffusion.unet_names import unet_renaming

    refiner = not (folder / "text_encoder").exists()

    def component(name: str, file: str) -> dict[str, torch.Tensor]:
        return load_from_safetensors(folder / name / file)

    tensors: dict[str, torch.Tensor] = {}
    unet_renaming_ = unet_renaming((TINY_REFINER if refiner else TINY).unet.build((SDXLUNet,), device="meta"))
    for key, tensor in component("unet", "diffusion_pytorch_model.safetensors").items():
        original = unet_renaming_.to_original(key)
        assert original is not None, key
        tensors[SGM_PREFIXES["unet"] + original] = tensor
    vae_renaming = ldm_autoencoder_renaming(4, 1)
    for key, tensor in component("vae", "diffusion_pytorch_model.safetensors").items():
        original = vae_renaming.to_original(key)
        assert original is not None, key
        module = key.rpartition(".")[0]
        as_conv = module in vae_renaming.conv_as_linear and key.endswith(".weight")
        tensors[SGM_PREFIXES["vae"] + original] = tensor[:, :, None, None] if as_conv else tensor
    for key, tensor in {} if refiner else component("text_encoder", "model.safetensors").items():
        # transformers 5 saves a CLIPTextModel without its `text_model.` wrapper; SGM files have it.
        tensors[SGM_PREFIXES["text_encoder"] + "text_model." + key.removeprefix("text_model.")] = tensor
    g = component("text_encoder_2", "model.safetensors")
    prefix = SGM_REFINER_TEXT_ENCODER_2_PREFIX if refiner else SGM_PREFIXES["text_encoder_2"]
    for key, tensor in g.items():
        name = key.removeprefix("text_model.")
        if name.startswith("encoder.layers."):
            index, _, rest = name.removeprefix("encoder.layers.").partition(".")
            block = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rpartition(".")[2]
                parts = [g[f"text_model.encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                tensors[f"{block}attn.in_proj_{kind}"] = torch.cat(parts)
            elif rest.startswith("self_attn.out_proj."):
                tensors[f"{block}attn.out_proj.{rest.rpartition('.')[2]}"] = tensor
            elif not rest.startswith("self_attn."):
                names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
                module, _, parameter = rest.rpartition(".")
                tensors[f"{block}{names[module]}.{parameter}"] = tensor
        elif name == "embeddings.token_embedding.weight":
            tensors[f"{prefix}token_embedding.weight"] = tensor
        elif name == "embeddings.position_embedding.weight":
            tensors[f"{prefix}positional_embedding"] = tensor
        elif name.startswith("final_layer_norm."):
            tensors[f"{prefix}ln_final.{name.rpartition('.')[2]}"] = tensor
        elif name == "text_projection.weight":
            tensors[f"{prefix}text_projection"] = tensor.t().contiguous()
        else:
            assert name == "embeddings.position_ids", name
    tensors[f"{prefix}logit_scale"] = torch.tensor(4.6052)
    save_to_safetensors(path, tensors)
