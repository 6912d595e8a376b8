"""A Stable Diffusion 1.x at toy sizes with random weights, saved as a diffusers folder: try `refiners-convert` and
the trainer without downloading a model.

`save_toy_stable_diffusion_1(folder)` builds diffusers' `StableDiffusionPipeline` from the configs below (SD1's
architecture: the same blocks as Stable Diffusion 1.5, 32 to 64 channels wide, a 2-layer text encoder over a
byte-level vocabulary) and writes it with `save_pretrained`, as a download from the Hub looks: `model_index.json`,
`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`. Its sizes are the family's `TINY` preset (`stable_diffusion_1/presets.py`), `refiners.training`'s `tiny` base,
so `refiners-convert sd1` turns it into weights that `refiners-train` loads with `base: tiny`.

Needs diffusers and transformers: the `reference` extra (`pip install "refiners-converters[reference]"`).
"""

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from refiners.foundationals.latent_diffusion.stable_diffusion_1.presets import TINY, TINY_VOCABULARY_SIZE

__all__ = [
    "TOY_UNET_CONFIG",
    "TOY_VAE_CONFIG",
    "TOY_TEXT_ENCODER_CONFIG",
    "TOY_SCHEDULER_CONFIG",
    "write_byte_level_vocabulary",
    "save_toy_stable_diffusion_1",
]

# The diffusers/transformers configs of the family's `TINY` preset: the same sizes, in the reference's words.
_UNET, _VAE, _TEXT = TINY.unet.arguments, TINY.lda.arguments, TINY.clip_text_encoder.arguments
TOY_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": list(_UNET["channels"]),
    "cross_attention_dim": _UNET["context_embedding_dim"],
    "attention_head_dim": _UNET["num_attention_heads"],  # diffusers' name for the number of heads of SD1's transformers
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
TOY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": list(_VAE["block_out_channels"]),
    "layers_per_block": _VAE["layers_per_block"],
    "norm_num_groups": 32,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
    "sample_size": 64,
    "scaling_factor": _VAE["encoder_scale"],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_BYTES = 256
TOY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": _TEXT["embedding_dim"],
    "intermediate_size": _TEXT["feedforward_dim"],
    "num_hidden_layers": _TEXT["num_layers"],
    "num_attention_heads": _TEXT["num_attention_heads"],
    "hidden_act": "quick_gelu",
    "max_position_embeddings": 77,
    "vocab_size": TINY_VOCABULARY_SIZE,  # each byte alone and at the end of a word, then <|startoftext|>, <|endoftext|>
    "bos_token_id": 2 * _BYTES,
    "eos_token_id": 2 * _BYTES + 1,
    "pad_token_id": 2 * _BYTES + 1,
}
# runwayml/stable-diffusion-v1-5's scheduler.
TOY_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def write_byte_level_vocabulary(folder: Path) -> tuple[Path, Path]:
    """A CLIP `vocab.json` and `merges.txt` without merges: one token per byte (as `bytes_to_unicode` spells them)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), "<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == TOY_TEXT_ENCODER_CONFIG["vocab_size"]
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary, merges = folder / "vocab.json", folder / "merges.txt"
    vocabulary.write_text(json.dumps({token: index for index, token in enumerate(tokens)}), encoding="utf-8")
    merges.write_text("#version: 0.2\n", encoding="utf-8")
    return vocabulary, merges


def save_toy_stable_diffusion_1(folder: str | Path, seed: int = 0) -> Path:
    """Build a toy Stable Diffusion 1.x pipeline with random weights (seeded) and `save_pretrained` it to `folder`.

    Returns:
        The folder, as `StableDiffusionPipeline.from_pretrained` and `refiners-convert sd1` read it.
    """
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_pndm import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder).expanduser()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TOY_UNET_CONFIG)
        vae = AutoencoderKL(**TOY_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TOY_TEXT_ENCODER_CONFIG))
    with tempfile.TemporaryDirectory() as vocabulary_folder:
        vocabulary, merges = write_byte_level_vocabulary(Path(vocabulary_folder))
        tokenizer: Any = CLIPTokenizer(str(vocabulary), str(merges), model_max_length=77)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**TOY_SCHEDULER_CONFIG),  # pyright: ignore[reportArgumentType]
        safety_checker=None,  # pyright: ignore[reportArgumentType]
        feature_extractor=None,  # pyright: ignore[reportArgumentType]
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder
