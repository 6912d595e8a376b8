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
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from toy_models import perturb_norms
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers import CLIPTokenizer as TransformersCLIPTokenizer

from refiners.converters.autoencoder import convert_diffusers_autoencoder
from refiners.converters.clip_text import convert_transformers_clip_text
from refiners.converters.toy import TOY_TEXT_ENCODER_CONFIG, TOY_VAE_CONFIG, write_byte_level_vocabulary
from refiners.converters.unet import convert_diffusers_unet
from refiners.foundationals.clip import CLIPTextEncoder, CLIPTokenizer
from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import DoubleTextEncoder, SDXLUNet

WIDTH_L, WIDTH_G = 32, 48
POOLED_DIM = WIDTH_G
TIME_EMBEDDING_DIM = 8
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [1, 2, 4],
    "transformer_layers_per_block": [1, 2, 3],
    "cross_attention_dim": WIDTH_L + WIDTH_G,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBEDDING_DIM,
    "projection_class_embeddings_input_dim": POOLED_DIM + 6 * TIME_EMBEDDING_DIM,
}
TEXT_ENCODER_L_CONFIG: dict[str, Any] = TOY_TEXT_ENCODER_CONFIG | {"hidden_size": WIDTH_L}
TEXT_ENCODER_G_CONFIG: dict[str, Any] = TOY_TEXT_ENCODER_CONFIG | {
    "hidden_size": WIDTH_G,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "hidden_act": "gelu",
    "projection_dim": POOLED_DIM,
}
VAE_CONFIG: dict[str, Any] = TOY_VAE_CONFIG | {"scaling_factor": 0.13025, "force_upcast": True}
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


def build_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline at toy size, random weights (seeded), norms perturbed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG).eval()
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
    for reference, config, approximation in [
        (pipeline.text_encoder, TEXT_ENCODER_L_CONFIG, "quick"),
        (pipeline.text_encoder_2, TEXT_ENCODER_G_CONFIG, "none"),
    ]:
        encoder = CLIPTextEncoder(
            embedding_dim=config["hidden_size"],
            vocabulary_size=config["vocab_size"],
            num_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            feedforward_dim=config["intermediate_size"],
            gelu_approximation=approximation,  # pyright: ignore[reportArgumentType]
            device="meta",
        )
        state_dict = {k: v for k, v in reference.state_dict().items() if k != "text_projection.weight"}
        encoder.load_state_dict(convert_transformers_clip_text(state_dict, encoder), strict=True, assign=True)
        encoders.append(encoder)
    double = DoubleTextEncoder(*encoders, projection_dim=POOLED_DIM)
    with torch.no_grad():
        double.projection.weight.copy_(pipeline.text_encoder_2.text_projection.weight)
    double.set_tokenizer(our_tokenizer())
    return double


def our_unet(pipeline: StableDiffusionXLPipeline) -> SDXLUNet:
    unet = SDXLUNet(
        pipeline.unet.config.in_channels,  # pyright: ignore[reportAttributeAccessIssue]
        channels=tuple(UNET_CONFIG["block_out_channels"]),
        num_attention_heads=tuple(UNET_CONFIG["attention_head_dim"]),
        transformer_depths=tuple(UNET_CONFIG["transformer_layers_per_block"]),
        context_embedding_dim=WIDTH_L + WIDTH_G,
        pooled_embedding_dim=POOLED_DIM,
        time_embedding_dim=TIME_EMBEDDING_DIM,
        device="meta",
    )
    unet.load_state_dict(convert_diffusers_unet(pipeline.unet.state_dict(), unet), strict=True, assign=True)
    return unet


def our_autoencoder(pipeline: StableDiffusionXLPipeline) -> LatentDiffusionAutoencoder:
    lda = LatentDiffusionAutoencoder(
        0.13025,
        block_out_channels=tuple(VAE_CONFIG["block_out_channels"]),
        layers_per_block=VAE_CONFIG["layers_per_block"],
        device="meta",
    )
    lda.load_state_dict(convert_diffusers_autoencoder(pipeline.vae.state_dict(), lda), strict=True, assign=True)
    return lda


@dataclass
class Twins:
    pipeline: StableDiffusionXLPipeline
    text_encoder: DoubleTextEncoder
    unet: SDXLUNet
    lda: LatentDiffusionAutoencoder


def build_twins(seed: int = 0) -> Twins:
    pipeline = build_pipeline(seed)
    return Twins(pipeline, our_text_encoder(pipeline), our_unet(pipeline), our_autoencoder(pipeline))
