"""refiners weights to a diffusers folder: the way back from `refiners-convert sd1`.

    refiners-convert sd1-to-diffusers --from models/digits --to FOLDER [--dtype float32] [--check]

`to_diffusers` writes a Stable Diffusion 1.x model (a folder that `refiners-convert sd1` or `refiners-train` wrote,
or a `StableDiffusion_1` in memory) as the folder `diffusers.StableDiffusionPipeline.from_pretrained` loads:
`unet/`, `vae/`, `text_encoder/` (weights and `config.json`), `tokenizer/` (`vocab.json` and `merges.txt` from the
tokenizer our text encoder carries), `scheduler/` (`DPMSolverMultistepScheduler`, `StableDiffusion_1`'s default
solver, on the model's training schedule) and `model_index.json`, without safety checker.

The configs are derived from our models' sizes (the constructor calls the files record): `block_out_channels`,
`attention_head_dim`, `cross_attention_dim` and `sample_size` for the UNet, `block_out_channels`, `norm_num_groups`
and `scaling_factor` (our `encoder_scale`) for the autoencoder, and the widths, depth, vocabulary and activation of
the text encoder. The weights are renamed by inverting the key maps that `refiners-convert sd1` converts with
(`diffusers_unet_key_map`, `diffusers_autoencoder_key_map`, `transformers_clip_text_key_map`): no second key table,
so `refiners-convert sd1` on the written folder gives back the same tensors. A tensor of ours that no map names (a
LoRA left injected, say) is an error that lists it. Every file is written atomically, `model_index.json` last: a
folder whose export was interrupted has none, and diffusers refuses it.
"""

import argparse
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from refiners.converters.autoencoder import diffusers_autoencoder_key_map
from refiners.converters.clip_text import TRANSFORMERS_CLIP_TEXT_PREFIX, transformers_clip_text_key_map
from refiners.converters.engine import ConversionError, KeyMap, convert_state_dict
from refiners.converters.reference_check import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from refiners.converters.unet import diffusers_unet_key_map
from refiners.fluxion.utils import load_from_safetensors, save_to_safetensors
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder
from refiners.foundationals.clip.tokenizer import METADATA_PREFIX, CLIPTokenizer
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from refiners.foundationals.latent_diffusion.solvers.solver import ModelPredictionType, NoiseSchedule, SolverParams
from refiners.foundationals.latent_diffusion.stable_diffusion_1.model import StableDiffusion_1
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.weights import SD1Weights, WeightsFile

__all__ = [
    "DiffusersComponent",
    "to_diffusers",
    "diffusers_unet_config",
    "diffusers_autoencoder_config",
    "transformers_clip_text_config",
    "diffusers_scheduler_config",
    "inverted",
    "add_to_diffusers_command",
    "run_to_diffusers_command",
]

Progress = Callable[[str], None]

# StableDiffusionPipeline reads a UNet config written before diffusers 0.9 as SD1.4's and resets a `sample_size`
# under 64 to 64: the files say they follow a later layout (the one diffusers still writes).
_DIFFUSERS_VERSION = "0.30.0"
_TRANSFORMERS_VERSION = "4.40.0"
_GELU = {"quick": "quick_gelu", "none": "gelu"}
_BETA_SCHEDULES = {NoiseSchedule.UNIFORM: "linear", NoiseSchedule.QUADRATIC: "scaled_linear"}
_PREDICTION_TYPES = {
    ModelPredictionType.NOISE: "epsilon",
    ModelPredictionType.SAMPLE: "sample",
    ModelPredictionType.V_PREDICTION: "v_prediction",
}


def _quiet(line: str) -> None:
    pass


@dataclass(frozen=True)
class DiffusersComponent:
    """One component of the written folder.

    Attributes:
        folder: Its folder (`unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`).
        files: The files written in it.
    """

    folder: Path
    files: tuple[Path, ...]


def inverted(key_map: KeyMap, tensors: Mapping[str, Tensor]) -> KeyMap:
    """The key map from a refiners state dict back to the source layout that `key_map` converts from.

    A transform of `key_map` must leave the tensors of `tensors` as they are (e.g. the autoencoder's flattening of
    1x1-convolution attention weights, a no-op on diffusers' Linear weights): the inverse of any other is unknown.

    Args:
        key_map: A source -> refiners key map (e.g. `diffusers_unet_key_map(unet)`).
        tensors: The refiners tensors to convert back (only those `key_map` transforms are read).

    Raises:
        ConversionError: A transform changes a tensor; the message names it.
    """
    changed = [
        target
        for target, transform in key_map.transforms.items()
        if target in tensors and not torch.equal(transform(tensors[target]), tensors[target])
    ]
    if changed:
        raise ConversionError(
            f"cannot convert back {', '.join(sorted(changed))}: the conversion reshapes them and its inverse is unknown"
        )
    back = KeyMap()
    for source, target in key_map.mapping.items():
        back.add(target, source)
    return back


def diffusers_unet_config(unet: SD1UNet, sample_size: int) -> dict[str, Any]:
    """diffusers' `UNet2DConditionModel` config of `unet` (`refiners.converters.architecture.unet_config`'s inverse).

    Args:
        unet: The UNet (its weights are not read).
        sample_size: Its native sample size, in latent pixels.
    """
    return (
        {"_class_name": "UNet2DConditionModel", "_diffusers_version": _DIFFUSERS_VERSION}
        | SD15_UNET_CONFIG
        | {
            "in_channels": unet.in_channels,
            "block_out_channels": list(unet.channels),
            "cross_attention_dim": unet.topology.context_embedding_dim,
            "attention_head_dim": unet.num_attention_heads,  # diffusers' name for SD1's number of heads
            "sample_size": sample_size,
        }
    )


def diffusers_autoencoder_config(autoencoder: LatentDiffusionAutoencoder, image_size: int) -> dict[str, Any]:
    """diffusers' `AutoencoderKL` config of `autoencoder`.

    Args:
        autoencoder: The autoencoder (its weights are not read).
        image_size: The side of the images the model draws natively, in pixels.
    """
    blocks = len(autoencoder.block_out_channels)
    return (
        {"_class_name": "AutoencoderKL", "_diffusers_version": _DIFFUSERS_VERSION}
        | SD15_VAE_CONFIG
        | {
            "in_channels": autoencoder.in_channels,
            "out_channels": autoencoder.out_channels,
            "latent_channels": autoencoder.latent_channels,
            "block_out_channels": list(autoencoder.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * blocks,
            "up_block_types": ["UpDecoderBlock2D"] * blocks,
            "layers_per_block": autoencoder.layers_per_block,
            "norm_num_groups": autoencoder.num_groups,
            "scaling_factor": autoencoder.encoder_scale,
            "sample_size": image_size,
        }
    )


def transformers_clip_text_config(encoder: CLIPTextEncoder, tokenizer: CLIPTokenizer) -> dict[str, Any]:
    """transformers' `CLIPTextConfig` of `encoder`, with `tokenizer`'s special token ids.

    Raises:
        ConversionError: The encoder's GELU has no transformers `hidden_act`.
    """
    if (activation := _GELU.get(encoder.gelu_approximation)) is None:
        raise ConversionError(
            f"the text encoder's GELU approximation {encoder.gelu_approximation!r} has no transformers hidden_act "
            f"(it has {', '.join(repr(name) for name in _GELU)})"
        )
    return SD15_TEXT_ENCODER_CONFIG | {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "transformers_version": _TRANSFORMERS_VERSION,
        "hidden_act": activation,
        "hidden_size": encoder.embedding_dim,
        "intermediate_size": encoder.feedforward_dim,
        "num_attention_heads": encoder.num_attention_heads,
        "num_hidden_layers": encoder.num_layers,
        "max_position_embeddings": encoder.max_sequence_length,
        "vocab_size": encoder.vocabulary_size,
        "layer_norm_eps": encoder.layer_norm_eps,
        "projection_dim": encoder.embedding_dim,
        "bos_token_id": tokenizer.start_of_text_token_id,
        "eos_token_id": tokenizer.end_of_text_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float32",
    }


def diffusers_scheduler_config(params: SolverParams) -> dict[str, Any]:
    """diffusers' `DPMSolverMultistepScheduler` config of a training schedule (SD1.5's by default).

    The timestep spacing is left out, so that each diffusers scheduler built from this config
    (`DDIMScheduler.from_config(pipe.scheduler.config)`) spaces its steps as the refiners solver of the same name.

    Raises:
        ConversionError: The schedule has no diffusers equivalent (Karras betas).
    """
    if (beta_schedule := _BETA_SCHEDULES.get(params.noise_schedule)) is None:
        raise ConversionError(f"diffusers' schedulers have no {params.noise_schedule} noise schedule")
    return {
        "_class_name": "DPMSolverMultistepScheduler",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "num_train_timesteps": params.num_train_timesteps,
        "beta_start": params.initial_diffusion_rate,
        "beta_end": params.final_diffusion_rate,
        "beta_schedule": beta_schedule,
        "prediction_type": _PREDICTION_TYPES[params.model_prediction_type],
        "steps_offset": params.timesteps_offset,
        # DDIM's defaults are not Stable Diffusion's: written for `DDIMScheduler.from_config`.
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


def _model_index(in_channels: int) -> dict[str, Any]:
    pipeline = {4: "StableDiffusionPipeline", 9: "StableDiffusionInpaintPipeline"}.get(in_channels)
    if pipeline is None:
        raise ConversionError(f"no diffusers pipeline takes a UNet of {in_channels} input channels (SD1: 4 or 9)")
    return {
        "_class_name": pipeline,
        "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _tokenizer_files(tokenizer: CLIPTokenizer) -> dict[str, str]:
    """`vocab.json`, `merges.txt` and the settings of transformers' `CLIPTokenizer`, from ours."""
    metadata = tokenizer.to_metadata()
    vocabulary: dict[str, int] = json.loads(metadata[f"{METADATA_PREFIX}vocabulary"])
    tokens = {index: token for token, index in vocabulary.items()}
    special = {
        "bos_token": tokens[tokenizer.start_of_text_token_id],
        "eos_token": tokens[tokenizer.end_of_text_token_id],
        "unk_token": tokens[tokenizer.end_of_text_token_id],  # CLIP's: it has no unknown token
        "pad_token": tokens[tokenizer.pad_token_id],
    }
    settings = special | {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": tokenizer.sequence_length,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
    }
    return {
        "vocab.json": json.dumps(vocabulary, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + metadata[f"{METADATA_PREFIX}merges"] + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps(settings, indent=2),
    }


def _write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (a temporary file next to it, then renamed)."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _json(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class _Model:
    """What an export reads: the three models (their structure), their tensors, the tokenizer, the schedule."""

    unet: SD1UNet
    lda: LatentDiffusionAutoencoder
    clip_text_encoder: CLIPTextEncoder
    tensors: Callable[[str], Mapping[str, Tensor]]
    tokenizer: CLIPTokenizer | None
    sample_size: int
    params: SolverParams


def _from_folder(folder: Path) -> _Model:
    weights = SD1Weights.read(folder)
    encoder = weights.build_clip_text_encoder()
    files = {"unet": weights.unet, "lda": weights.lda, "clip_text_encoder": weights.clip_text_encoder}

    def tensors(name: str) -> Mapping[str, Tensor]:
        component = files[name]
        return load_from_safetensors(component.path) if isinstance(component, WeightsFile) else component.tensors

    return _Model(
        unet=weights.build_unet(4),
        lda=weights.build_lda(),
        clip_text_encoder=encoder,
        tensors=tensors,
        tokenizer=encoder.tokenizer,
        sample_size=weights.sample_size,
        params=SolverParams(),
    )


def _from_model(sd: StableDiffusion_1) -> _Model:
    models: dict[str, torch.nn.Module] = {"unet": sd.unet, "lda": sd.lda, "clip_text_encoder": sd.clip_text_encoder}
    return _Model(
        unet=sd.unet,
        lda=sd.lda,
        clip_text_encoder=sd.clip_text_encoder,
        tensors=lambda name: {key: tensor.detach().cpu() for key, tensor in models[name].state_dict().items()},
        tokenizer=sd.clip_text_encoder.tokenizer,
        sample_size=sd.default_size // sd.lda.downscale_factor,
        params=sd.solver.params,
    )


def _convert_back(
    tensors: Mapping[str, Tensor], key_map: KeyMap, what: str, dtype: torch.dtype | None
) -> dict[str, Tensor]:
    back = inverted(key_map, tensors)
    shapes = {back.mapping[key]: tensor.shape for key, tensor in tensors.items() if key in back.mapping}
    converted = convert_state_dict(tensors, back, shapes, what=what, dtype=dtype)
    return {key: tensor.contiguous() for key, tensor in converted.items()}


def to_diffusers(
    source: str | Path | StableDiffusion_1,
    dest: str | Path,
    dtype: torch.dtype | None = None,
    *,
    progress: Progress = _quiet,
) -> dict[str, DiffusersComponent]:
    """Write a Stable Diffusion 1.x model as a diffusers `StableDiffusionPipeline` folder (see the module's
    documentation): `StableDiffusionPipeline.from_pretrained(dest)` loads it.

    From the command line: `refiners-convert sd1-to-diffusers --from models/digits --to digits-diffusers`.

    Args:
        source: A folder that `refiners-convert sd1` (or `refiners-train`) wrote, or a `StableDiffusion_1` (its
            solver's schedule goes into the scheduler's config; a folder gets SD1.5's).
        dest: The folder to write (created if needed; files already there are replaced).
        dtype: Cast the weights to this dtype (default: keep the source's).
        progress: Receives a line per step.

    Returns:
        The written components by folder name: `"unet"`, `"vae"`, `"text_encoder"`, `"tokenizer"`, `"scheduler"`,
        and `"model_index"` (the folder itself, with `model_index.json`).

    Raises:
        FileNotFoundError: The source folder, or one of its files, is missing.
        ConversionError: The text encoder has no tokenizer, a tensor of ours has no diffusers name (listed), or a
            size has no diffusers equivalent.
    """
    model = _from_model(source) if isinstance(source, StableDiffusion_1) else _from_folder(Path(source).expanduser())
    if model.tokenizer is None:
        raise ConversionError(
            "the text encoder has no tokenizer, which a diffusers folder needs: convert the model again with its "
            "tokenizer (`refiners-convert sd1 --tokenizer ...`)"
        )
    folder = Path(dest).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConversionError(f"the destination {folder} is a file: pass a folder (created if needed)")
    image_size = model.sample_size * model.lda.downscale_factor
    components: list[tuple[str, str, Mapping[str, Any], Callable[[], dict[str, Tensor]]]] = [
        (
            "unet",
            "diffusion_pytorch_model.safetensors",
            diffusers_unet_config(model.unet, model.sample_size),
            lambda: _convert_back(model.tensors("unet"), diffusers_unet_key_map(model.unet), "refiners UNet", dtype),
        ),
        (
            "vae",
            "diffusion_pytorch_model.safetensors",
            diffusers_autoencoder_config(model.lda, image_size),
            lambda: _convert_back(
                model.tensors("lda"), diffusers_autoencoder_key_map(model.lda), "refiners autoencoder", dtype
            ),
        ),
        (
            "text_encoder",
            "model.safetensors",
            transformers_clip_text_config(model.clip_text_encoder, model.tokenizer),
            # Prefixed with `text_model.`, as the Hub's SD1.x files are: transformers 4 and 5 both read it.
            lambda: _convert_back(
                model.tensors("clip_text_encoder"),
                transformers_clip_text_key_map(model.clip_text_encoder, TRANSFORMERS_CLIP_TEXT_PREFIX),
                "refiners CLIP text encoder",
                dtype,
            ),
        ),
    ]
    written: dict[str, DiffusersComponent] = {}
    for name, weights_file, config, convert in components:
        start = time.monotonic()
        tensors = convert()  # one component in memory at a time; converted before anything is written
        (folder / name).mkdir(parents=True, exist_ok=True)
        save_to_safetensors(folder / name / weights_file, tensors, {"format": "pt"})
        config_file = _write_text(folder / name / "config.json", _json(config))
        written[name] = DiffusersComponent(folder / name, (folder / name / weights_file, config_file))
        progress(f"{name}: wrote {len(tensors)} tensors to {folder / name} in {time.monotonic() - start:.1f} s")
    (folder / "tokenizer").mkdir(exist_ok=True)
    files = tuple(
        _write_text(folder / "tokenizer" / file, text) for file, text in _tokenizer_files(model.tokenizer).items()
    )
    written["tokenizer"] = DiffusersComponent(folder / "tokenizer", files)
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = _write_text(
        folder / "scheduler" / "scheduler_config.json", _json(diffusers_scheduler_config(model.params))
    )
    written["scheduler"] = DiffusersComponent(folder / "scheduler", (scheduler,))
    index = _write_text(folder / "model_index.json", _json(_model_index(model.unet.in_channels)))
    written["model_index"] = DiffusersComponent(folder, (index,))
    progress(f"diffusers folder written: StableDiffusionPipeline.from_pretrained({str(folder)!r}) loads it")
    return written


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_to_diffusers_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `refiners-convert sd1-to-diffusers --from FOLDER --to FOLDER [--dtype DTYPE]` to `refiners-convert`."""
    help = (
        "a refiners Stable Diffusion 1.x folder (what `sd1` writes) back to a diffusers StableDiffusionPipeline folder"
    )
    command = commands.add_parser("sd1-to-diffusers", help=help, description=help)
    command.add_argument(
        "--from", dest="source", required=True, metavar="FOLDER", help="the folder of the three refiners files"
    )
    command.add_argument("--to", dest="dest", required=True, metavar="FOLDER", help="the diffusers folder to write")
    command.add_argument(
        "--dtype", choices=list(_DTYPES), default=None, help="cast the weights (default: keep the source's)"
    )


def run_to_diffusers_command(args: argparse.Namespace, progress: Progress) -> int:
    """Run `refiners-convert sd1-to-diffusers` (see `add_to_diffusers_command`); returns the exit status.

    Args:
        args: The parsed arguments.
        progress: Receives the progress and error lines.
    """
    try:
        written = to_diffusers(
            args.source, args.dest, _DTYPES[args.dtype] if args.dtype is not None else None, progress=progress
        )
    except (ValueError, OSError) as error:
        progress(f"refiners-convert: error: {error}")
        return 1
    print(written["model_index"].folder)
    return 0
