"""LoRA fine-tuning of Stable Diffusion 1.x and XL as a `LightningModule`: the base frozen, only LoRAs train.

`LoraFineTuning` builds (or loads) the UNet, the autoencoder and the text encoder(s) of a model family (see
`refiners.training.families`: what it needs of SD1 or SDXL, it asks the family), freezes them, and injects LoRAs
into the layers a preset names (`LoraTargets`) with fluxion's LoRA API. The base is deliberately not a registered
submodule: the module's parameters, `state_dict`, checkpoints, DDP's gradient buckets and the averaged copy of
`WeightAveraging` (EMA) hold the LoRAs and nothing else, while the base still follows the module's device and dtype
(see `_apply`). Under FSDP, only the LoRAs (and their optimizer state) are sharded: the frozen base is replicated on
every device, as with DDP.

The loss is diffusers' `train_text_to_image_lora.py`'s (`train_text_to_image_lora_sdxl.py`'s for SDXL, whose UNet
also reads the pooled text embedding and each image's time ids, made from its original size and crop):
noise-prediction MSE against the noise (epsilon) or the velocity (v-prediction) at a timestep drawn per sample,
optionally weighted by min-SNR-gamma (Hang et al., 2023, arXiv:2303.09556) and with offset noise. Caption dropout
(for classifier-free guidance) belongs to the data: see `CaptionedImageDataModule(caption_dropout=...)`.

Every random draw of a step (noise, timesteps) comes from a generator seeded by (`seed`, global step, batch index,
rank), never from torch's global generator: a run resumed from a checkpoint draws what the uninterrupted run drew.
"""

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, cast

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import Lora, LoraAdapter, add_loras_to
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors
from refiners.foundationals.clip.common import TransformerLayer
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder
from refiners.foundationals.clip.tokenizer import CLIPTokenizer
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder, SD1Autoencoder
from refiners.foundationals.latent_diffusion.cross_attention import CrossAttentionBlock2d
from refiners.foundationals.latent_diffusion.model import LatentDiffusionModel
from refiners.foundationals.latent_diffusion.solvers import (
    DDPM,
    DPMSolver,
    ModelPredictionType,
    Solver,
    SolverParams,
)
from refiners.foundationals.latent_diffusion.unet import DownBlocks, MiddleBlock, ResidualBlock, UNet, UpBlocks
from refiners.training.data import TextEncodings, TrainingBatch
from refiners.training.data_transforms import seeded_generator
from refiners.training.errors import Setting, TrainingSetupError
from refiners.training.families import (
    AUTOENCODER_FILE,
    CLIP_TEXT_FILE,
    FAMILIES,
    UNET_FILE,
    StableDiffusion1Training,
    TrainingFamily,
    family_of,
)

__all__ = [
    "CONVERT_COMMAND",
    "UNET_FILE",
    "AUTOENCODER_FILE",
    "CLIP_TEXT_FILE",
    "BaseModel",
    "LoraTargets",
    "PredictionType",
    "LrSchedule",
    "OptimizerFactory",
    "StableDiffusionComponents",
    "build_components",
    "load_autoencoder",
    "lora_target_layers",
    "relative_path",
    "lr_multiplier",
    "GradientCheckpointing",
    "DenoisingTraining",
    "LoraFineTuning",
]

CONVERT_COMMAND = StableDiffusion1Training.convert_command
"""How to make an SD1 weights folder: `<source>` is a diffusers folder, a single checkpoint file or a Hub id (SDXL's:
`refiners.training.families.StableDiffusionXLTraining.convert_command`)."""

BaseModel = Literal["sd15", "tiny", "digits", "sdxl", "tiny-sdxl"]
"""The architecture: Stable Diffusion 1.5's, or the same at toy sizes (`tiny`: for tests and demos, random weights
when no weights are given), or the handwritten digits model's (`digits`, trained from scratch: random weights
without a folder); Stable Diffusion XL base's, or its toy (`tiny-sdxl`). See `families.FAMILIES`."""

LoraTargets = Literal["attention", "transformer", "all"]
"""Which layers get a LoRA (see `lora_target_layers`):

- `attention`: the query, key, value and output projections of every attention (diffusers' LoRA training script);
- `transformer`: every Linear and Conv2d of the UNet's transformers (attention, feed-forward, `proj_in`/`proj_out`)
  and of the text encoder's layers (attention and MLP): kohya's `networks.lora`;
- `all`: `transformer`, plus the convolutions and timestep projections of the UNet's residual blocks and its down-
  and upsamplers (LoCon, kohya's `conv_dim`).
"""

PredictionType = Literal["epsilon", "v_prediction"]
"""What the UNet learns to predict: the noise (SD1.5) or the velocity (SD2-v style), diffusers' names."""

LrSchedule = Literal["constant", "linear", "cosine"]
"""The learning rate after warmup: constant, or decaying to zero at the last step linearly or as a half cosine."""

OptimizerFactory = Callable[[Iterable[Any], float], Optimizer]
"""Builds the optimizer from parameter groups (each with its own `lr`) and a default learning rate (`learning_rate`),
as an optimizer class does: e.g. `torch.optim.AdamW`, or `functools.partial(torch.optim.AdamW, weight_decay=0.01)`.
In a `LightningCLI` config: `optimizer: {class_path: torch.optim.AdamW, init_args: {weight_decay: 0.01}}`, where
`init_args` has no `lr`: the learning rates are the module's (`learning_rate`, `text_encoder_learning_rate`)."""

_LORA_NAME = "default"
# The conditioning each cached text encoding stands for (`TextEncodings` names them as batches do).
_CACHED_TEXT_CONDITIONING = {
    "text_embeddings": "clip_text_embedding",
    "pooled_text_embeddings": "pooled_text_embedding",
}
# The per-sample loss is a mean over (channels, height, width) of the latents.
_SAMPLE_DIMENSIONS = (1, 2, 3)


# -- the base model ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StableDiffusionComponents:
    """The frozen base of a fine-tuning: what the family's pipeline is made of, minus the solver.

    Attributes:
        unet: The denoising UNet (`SD1UNet`, `SDXLUNet`).
        lda: The autoencoder between images and latents.
        clip_text_encoder: The text encoder, with its tokenizer (SDXL: the `DoubleTextEncoder`).
        family: The model family they belong to.
    """

    unet: UNet
    lda: LatentDiffusionAutoencoder
    clip_text_encoder: fl.Chain
    family: TrainingFamily = FAMILIES["sd15"]

    def items(self) -> Iterator[tuple[str, fl.Chain]]:
        """Each model under its diffusers name (`unet`, `vae`, `text_encoder`, and `text_encoder_2` for SDXL)."""
        yield "unet", self.unet
        yield "vae", self.lda
        yield from self.text_encoders().items()

    def text_encoders(self) -> dict[str, CLIPTextEncoder]:
        """The text encoders by their diffusers name (SDXL: CLIP-L `text_encoder`, OpenCLIP-G `text_encoder_2`)."""
        return self.family.text_encoders(self.clip_text_encoder)

    def pipeline(self, solver: Solver) -> LatentDiffusionModel[Any, Any]:
        """The family's pipeline (`StableDiffusion_1`, `StableDiffusion_XL`) over these models and `solver`."""
        return self.family.pipeline(self.unet, self.lda, self.clip_text_encoder, solver)


def build_components(
    base: BaseModel = "sd15",
    weights: str | Path | None = None,
    seed: int = 0,
    tokenizer: str | Path | None = None,
    autoencoder: str | Path | None = None,
) -> StableDiffusionComponents:
    """The UNet, autoencoder and text encoder of `base`, loaded from `weights` (or randomly initialized).

    Args:
        base: The architecture (see `BaseModel`).
        weights: A folder written by `refiners-convert sd1` (`sdxl` for the SDXL bases): `unet.safetensors`,
            `autoencoder.safetensors`, `clip_text.safetensors`, the last one carrying the tokenizer. The models are
            built on the "meta" device at the sizes the files record, and the files' tensors assigned to them:
            nothing is initialized twice. Required for `sd15` and `sdxl`.
        seed: The seed of the random initialization (without `weights`).
        tokenizer: Without `weights`: a folder holding the `vocab.json` and `merges.txt` of the text encoder's
            tokenizer (CLIP's, for `digits`; `tiny` has a byte-level one of its own).
        autoencoder: An autoencoder file (`autoencoder.safetensors`, e.g. trained by `AutoencoderTraining`) that
            replaces the autoencoder of `base` or `weights`.

    Raises:
        TrainingSetupError: An unknown base, a full-size base without weights, a folder that lacks a file, or a text
            encoder without tokenizer.
    """
    family = family_of(base)
    if weights is None:
        if base not in family.random_bases:
            raise TrainingSetupError(
                Setting("base", base),
                " needs weights: pass ",
                Setting("weights", "<folder>"),
                f", a folder written by `{family.convert_command}` (it holds {UNET_FILE}, {AUTOENCODER_FILE} and "
                f"{CLIP_TEXT_FILE}), or ",
                Setting("base", family.tiny_base),
                " for a toy model with random weights",
            )
        if base != family.tiny_base and tokenizer is None:
            raise TrainingSetupError(
                Setting("base", base),
                " builds a text encoder over CLIP's vocabulary: pass ",
                Setting("tokenizer", "<folder>"),
                ", a folder holding its vocab.json and merges.txt (models/clip-tokenizer in the repository)",
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = family.build(base, "cpu", None if tokenizer is None else _read_tokenizer(Path(tokenizer)))
    else:
        folder = Path(weights)
        family.check_components(folder)
        built = family.load(folder, base)
    if autoencoder is not None:
        built["lda"] = load_autoencoder(autoencoder)
    return StableDiffusionComponents(**built, family=family)


def _read_tokenizer(folder: Path) -> CLIPTokenizer:
    files = [folder / "vocab.json", folder / "merges.txt"]
    if missing := [path.name for path in files if not path.is_file()]:
        raise TrainingSetupError(
            f"{folder} lacks {', '.join(missing)}: ",
            Setting("tokenizer", "<folder>"),
            " is a folder holding a CLIP tokenizer's vocab.json and merges.txt (a diffusers model's tokenizer/)",
        )
    return CLIPTokenizer(files[0], files[1])


def load_autoencoder(path: str | Path) -> LatentDiffusionAutoencoder:
    """An autoencoder file (`autoencoder.safetensors`), built at the sizes it records.

    Raises:
        TrainingSetupError: The file does not exist or records no sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingSetupError(
            f"{path} does not exist: ",
            Setting("autoencoder", "<file>"),
            f" is an {AUTOENCODER_FILE} written by `refiners-convert autoencoder` or by an autoencoder training",
        )
    config = ModelConfig.from_metadata(load_metadata_from_safetensors(path))
    if config is None:
        raise TrainingSetupError(
            f"{path} records no model configuration in its metadata: convert it again with `refiners-convert "
            "autoencoder`, which records it"
        )
    lda = config.build((LatentDiffusionAutoencoder, SD1Autoencoder), device="meta")
    return lda.load_from_safetensors(path)


# -- where the LoRAs go ------------------------------------------------------------------------------------------


_UNET_CONTAINERS: dict[LoraTargets, tuple[type[fl.Module], ...]] = {
    "attention": (fl.Attention,),
    "transformer": (CrossAttentionBlock2d,),
    "all": (CrossAttentionBlock2d, ResidualBlock, fl.Downsample, fl.Upsample),
}
_TEXT_ENCODER_CONTAINERS: dict[LoraTargets, tuple[type[fl.Module], ...]] = {
    "attention": (fl.Attention,),
    "transformer": (TransformerLayer,),
    "all": (TransformerLayer,),
}


def _inside(layer: fl.Module, containers: tuple[type[fl.Module], ...]) -> bool:
    parent = layer.parent
    while parent is not None:
        if isinstance(parent, containers):
            return True
        parent = parent.parent
    return False


def relative_path(layer: fl.Module, root: fl.Chain) -> str:
    """The state-dict prefix of `layer` in `root`, e.g. `DownBlocks.Chain_2.CLIPLCrossAttention.Conv2d_1`."""
    parts: list[str] = []
    module: fl.Module = layer
    while module is not root:
        parent = module.parent
        assert parent is not None, f"{type(layer).__name__} is not inside {type(root).__name__}"
        parts.append(parent.key_of(module))
        module = parent
    return ".".join(reversed(parts))


def lora_target_layers(model: fl.Chain, targets: LoraTargets) -> dict[str, fl.WeightedModule]:
    """The layers of a UNet or text encoder that the preset `targets` puts LoRAs on, by their path in `model`.

    The paths are the state-dict prefixes of the layers in the model as built (before any LoRA is injected), i.e.
    the keys of the converted weights files: they name the LoRAs in checkpoints and refiners-layout exports.

    Args:
        model: A UNet of any family (`SD1UNet`, `SDXLUNet`) or a `CLIPTextEncoder` (each of SDXL's two).
        targets: The preset (see `LoraTargets`).
    """
    match model:
        case UNet():
            containers = _UNET_CONTAINERS[targets]
        case CLIPTextEncoder():
            containers = _TEXT_ENCODER_CONTAINERS[targets]
        case _:
            raise TypeError(f"LoRA targets are defined for UNets and CLIPTextEncoders, not {type(model).__name__}")
    return {
        relative_path(layer, model): layer
        for layer, _ in model.walk(
            lambda layer, _: (
                isinstance(layer, fl.Linear | fl.Conv2d)
                and not isinstance(layer.parent, Lora)
                and _inside(layer, containers)
            )
        )
        if isinstance(layer, fl.Linear | fl.Conv2d)
    }


def _diffusers_names(pipeline: LatentDiffusionModel[Any, Any], loras: Mapping[str, Lora[Any]]) -> dict[str, str]:
    """The name of each LoRA's target in diffusers' pipeline (`unet.down_blocks.0...to_q`,
    `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`, `text_encoder_2...` for SDXL), by the LoRA's name:
    what LoRA files use, as the family names them (`diffusers_modules`, which `SDLoraAdapter` reads too)."""
    by_layer = {id(layer): name for name, layer in pipeline.diffusers_modules().items()}
    names: dict[str, str] = {}
    for name, lora in loras.items():
        adapter = lora.parent
        assert isinstance(adapter, LoraAdapter), "an injected LoRA lives in the LoraAdapter of its target"
        names[name] = by_layer[id(adapter.target)]
    return names


def _inject_loras(
    component: str, model: fl.Chain, targets: LoraTargets, rank: int, alpha: float | None
) -> dict[str, Lora[Any]]:
    """Add a fresh LoRA to each target layer of `model`; the LoRAs by `<component>.<path of their target>`."""
    layers = lora_target_layers(model, targets)
    if not layers:
        raise ValueError(f"the preset targets={targets!r} selects no layer of the {component}")
    names = {id(layer): f"{component}.{path}" for path, layer in layers.items()}
    adapters = add_loras_to(model, lambda layer, _: id(layer) in names, rank=rank, alpha=alpha, name=_LORA_NAME)
    return {names[id(adapter.target)]: adapter.loras[_LORA_NAME] for adapter in adapters}


# -- gradient checkpointing --------------------------------------------------------------------------------------


def _context_copy(contexts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: {key: value.copy() if isinstance(value, list | dict | set) else value for key, value in context.items()}
        for name, context in contexts.items()
    }


class GradientCheckpointing(fl.Chain, fl.Adapter[fl.Chain]):
    """Recompute a block's activations during the backward pass instead of keeping them (`torch.utils.checkpoint`).

    Blocks read the contexts of their tree (the timestep embedding, the skip connections of the UNet) that the
    forward fills as it goes: the recomputation, which runs after the forward has returned, sees the contexts as
    they were when the block first ran. Without gradients (e.g. sampling), the block runs as usual.

    Args:
        target: The block to checkpoint.
    """

    def __init__(self, target: fl.Chain) -> None:
        with self.setup_adapter(target):
            super().__init__(target)

    def forward(self, *args: Any) -> Any:
        if not torch.is_grad_enabled():
            return super().forward(*args)
        provider = self.provider
        contexts = _context_copy(provider.contexts)

        def run(*inputs: Any) -> Any:
            if provider.in_forward:  # the first pass, inside the model's forward
                return fl.Chain.forward(self, *inputs)
            snapshot = provider.enter_forward()
            provider.contexts = _context_copy(contexts)
            try:
                return fl.Chain.forward(self, *inputs)
            finally:
                provider.exit_forward(snapshot)

        # Non-reentrant, so that gradients reach the tensors the block reads from the contexts (the skip connections).
        # Early stop ends the recomputation by raising an exception, which Chains wrap into a ChainError: off.
        with set_checkpoint_early_stop(False):
            return checkpoint(run, *args, use_reentrant=False)


def _checkpointed_blocks(unet: UNet) -> list[fl.Chain]:
    down_blocks = unet.layer("DownBlocks", DownBlocks)
    up_blocks = unet.layer("UpBlocks", UpBlocks)
    return [*down_blocks.layers(fl.Chain), unet.layer("MiddleBlock", MiddleBlock), *up_blocks.layers(fl.Chain)]


# -- the module --------------------------------------------------------------------------------------------------


class DenoisingTraining(LightningModule, ABC):
    """The training of a latent diffusion model's denoiser on noise-prediction MSE, whatever trains in it.

    It builds (or loads) the UNet, the autoencoder and the text encoder(s) of a model family, and runs the loss of
    the module's docstring on batches of `CaptionedImageDataModule`; the subclasses decide what trains
    (`parameter_groups`): LoRAs in a frozen base (`LoraFineTuning`), or the UNet and text encoder themselves
    (`refiners.training.FullFineTuning`). The components are a plain attribute, not submodules: a subclass registers
    what it trains, so that checkpoints, DDP and EMA hold that and nothing else.

    Args: those of the subclasses (see `LoraFineTuning`).
    """

    def __init__(
        self,
        base: BaseModel,
        weights: str | None,
        train_text_encoder: bool,
        learning_rate: float,
        text_encoder_learning_rate: float | None,
        optimizer: OptimizerFactory,
        warmup_steps: int,
        lr_schedule: LrSchedule,
        prediction_type: PredictionType,
        min_snr_gamma: float | None,
        offset_noise: float,
        min_timestep: int,
        max_timestep: int,
        seed: int,
        tokenizer: str | None = None,
        autoencoder: str | None = None,
    ) -> None:
        super().__init__()
        _check_objective(
            base, learning_rate, text_encoder_learning_rate, warmup_steps, lr_schedule, prediction_type,
            min_snr_gamma, offset_noise, min_timestep, max_timestep,
        )  # fmt: skip
        self.base = base
        self.weights = weights
        self.train_text_encoder = train_text_encoder
        self.learning_rate = learning_rate
        self.text_encoder_learning_rate = (
            learning_rate if text_encoder_learning_rate is None else text_encoder_learning_rate
        )
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.lr_schedule: LrSchedule = lr_schedule
        self.prediction_type: PredictionType = prediction_type
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.min_timestep = min_timestep
        self.max_timestep = max_timestep
        self.seed = seed
        components = build_components(base, weights, seed, tokenizer, autoencoder)
        # A plain attribute, not a submodule: see the class docstring. `_apply` moves and casts it with the module.
        self._components: StableDiffusionComponents | None = components
        # Not submodules either: the schedule (SD1's and SDXL's: 1000 steps of betas scaled-linear from 0.00085 to
        # 0.012) follows the module's device but stays in float32 (see `solver`); the family's pipeline over the
        # components gives the UNet its side inputs (`set_unet_context`).
        solver = DDPM(params=SolverParams(model_prediction_type=self._model_prediction_type))
        object.__setattr__(self, "_solver", solver)
        object.__setattr__(self, "_pipeline", components.pipeline(solver))

    @abstractmethod
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (each with its `lr` and `name`): what trains."""

    # -- the frozen base -------------------------------------------------------------------------------------------

    @property
    def components(self) -> StableDiffusionComponents:
        """The UNet, autoencoder and text encoder (with the LoRAs injected, for `LoraFineTuning`)."""
        if self._components is None:
            raise RuntimeError(
                f"this {type(self).__name__} is a copy that holds only what trains (e.g. the averaged model of "
                "WeightAveraging): use the module it was copied from to run the models"
            )
        return self._components

    @property
    def family(self) -> TrainingFamily:
        """The model family of `base` (see `refiners.training.families`)."""
        return family_of(self.base)

    @property
    def unet(self) -> UNet:
        return self.components.unet

    @property
    def lda(self) -> LatentDiffusionAutoencoder:
        return self.components.lda

    @property
    def clip_text_encoder(self) -> fl.Chain:
        """The text encoder (SDXL: the `DoubleTextEncoder` of both)."""
        return self.components.clip_text_encoder

    @property
    def pipeline(self) -> LatentDiffusionModel[Any, Any]:
        """The family's pipeline over the models being trained, with the training schedule (`solver`)."""
        _ = self.components  # a copy without the base raises, saying why (see `components`)
        return self.__dict__["_pipeline"]

    @property
    def solver(self) -> Solver:
        """The training noise schedule (DDPM over SD1.5's 1000 timesteps), in float32 on the module's device."""
        solver: Solver = self.__dict__["_solver"]
        device = self._base_device()
        if solver.device != device:
            solver.to(device=device)
        return solver

    def _base_device(self) -> torch.device:
        """Where the frozen models run (the UNet's device; the module's when it is a copy without them)."""
        components: StableDiffusionComponents | None = self.__dict__.get("_components")
        return self.device if components is None else components.unet.device

    @property
    def _model_prediction_type(self) -> ModelPredictionType:
        return ModelPredictionType.NOISE if self.prediction_type == "epsilon" else ModelPredictionType.V_PREDICTION

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:
        # `.to(device)`, `.half()`... (and the precision plugins of Lightning, which use them) reach the frozen base.
        super()._apply(fn, recurse)
        components: StableDiffusionComponents | None = self.__dict__.get("_components")
        if components is not None and recurse:
            for _, model in components.items():
                model._apply(fn, recurse)
        return self

    # -- encoders (the data module's caching hook) -----------------------------------------------------------------

    def encode_images(self, images: Tensor) -> Tensor:
        """The latents of images in [-1, 1]: the mean of the autoencoder's posterior (deterministic, cacheable)."""
        with torch.no_grad():
            return self.lda.encode(images.to(device=self.lda.device, dtype=self.lda.dtype))

    def encode_texts(self, captions: list[str]) -> Tensor | TextEncodings:
        """The text encoder's embeddings of captions (SDXL: `TextEncodings`, the embeddings and the pooled
        embeddings); only cacheable while the text encoder does not train."""
        if self.train_text_encoder:
            raise TrainingSetupError(
                Setting("train_text_encoder", True),
                " trains LoRAs of the text encoder, so its embeddings change at every step and cannot be cached: set ",
                Setting("cache_text_embeddings", False),
                " in the data module, or ",
                Setting("train_text_encoder", False),
            )
        with torch.no_grad():
            conditioning = self.family.encode_texts(self.clip_text_encoder, captions)
        if conditioning.keys() == {"clip_text_embedding"}:
            return conditioning["clip_text_embedding"]
        encodings = TextEncodings(text_embeddings=conditioning["clip_text_embedding"])
        if (pooled := conditioning.get("pooled_text_embedding")) is not None:
            encodings["pooled_text_embeddings"] = pooled
        return encodings

    # -- the loss --------------------------------------------------------------------------------------------------

    def allowed_steps(self) -> Tensor:
        """The indices of the solver's steps whose timestep is in [`min_timestep`, `max_timestep`]."""
        timesteps = self.solver.timesteps
        return ((timesteps >= self.min_timestep) & (timesteps <= self.max_timestep)).nonzero().flatten()

    def draw(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The noise (with offset noise) and the solver steps of a batch, drawn on CPU from `generator`.

        Args:
            latents: The batch's latents (only their shape is read).
            generator: The source of the draws.
        """
        batch, channels = latents.shape[0], latents.shape[1]
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        if self.offset_noise > 0:
            noise = noise + self.offset_noise * torch.randn((batch, channels, 1, 1), generator=generator)
        allowed = self.allowed_steps().cpu()
        steps = allowed[torch.randint(0, len(allowed), (batch,), generator=generator)]
        return noise, steps

    def loss(
        self, latents: Tensor, text_embeddings: Tensor, noise: Tensor, steps: Tensor, **conditioning: Tensor
    ) -> Tensor:
        """The training loss of a batch, for given noise and solver steps (one per sample).

        Args:
            latents: The clean latents, `(batch, 4, h, w)`.
            text_embeddings: The text encoder's output, `(batch, sequence, dim)`.
            noise: The noise, shaped as `latents`.
            steps: Indices into the solver's `timesteps`, `(batch,)`.
            **conditioning: The family's other side inputs, one row per sample, by the names of its pipeline's
                `set_unet_context`: SDXL's `pooled_text_embedding` and `time_ids` (see `conditioning`).
        """
        solver = self.solver
        steps = steps.to(solver.device)
        latents = latents.to(device=solver.device, dtype=torch.float32)
        noise = noise.to(device=solver.device, dtype=torch.float32)
        timesteps = solver.timesteps[steps]
        noisy = solver.add_noise(latents, noise, steps)
        unet = self.unet
        self.pipeline.set_unet_context(
            timestep=timesteps,
            clip_text_embedding=text_embeddings.to(device=unet.device),
            **{name: tensor.to(device=unet.device) for name, tensor in conditioning.items()},
        )
        prediction = unet(noisy.to(unet.dtype)).float()
        if self.prediction_type == "epsilon":
            target = noise
        else:
            # The velocity `sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0` (Salimans & Ho, 2022).
            scale = solver.cumulative_scale_factors[timesteps].reshape(-1, 1, 1, 1)
            std = solver.noise_std[timesteps].reshape(-1, 1, 1, 1)
            target = scale * noise - std * latents
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=_SAMPLE_DIMENSIONS)
        if self.min_snr_gamma is not None:
            snr = solver.signal_to_noise_ratios[timesteps]
            clipped = snr.clamp(max=self.min_snr_gamma)
            # As diffusers: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for the velocity.
            per_sample = per_sample * (clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1))
        return per_sample.mean()

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """The generator of a step's draws: it depends on the seed, the step, the batch and the rank only."""
        return seeded_generator(self.seed, "step", self.global_step, batch_idx, self.global_rank)

    def conditioning(self, batch: TrainingBatch, latents: Tensor) -> dict[str, Tensor]:
        """The UNet's conditioning of a batch, by the names of the family's `set_unet_context`: `clip_text_embedding`
        (cached, or encoded from the captions, with gradients when the text encoder trains), and the family's others
        (SDXL: `pooled_text_embedding`, and `time_ids` made from each image's original size and crop, the target
        size being the latents' in pixels).

        Args:
            batch: The batch.
            latents: Its latents (their size is the training size).
        """
        text_embeddings, captions = batch.get("text_embeddings"), batch.get("captions")
        if text_embeddings is not None:
            if self.train_text_encoder:
                raise TrainingSetupError(
                    "the batch carries cached text embeddings, but ",
                    Setting("train_text_encoder", True),
                    " trains the text encoder: set ",
                    Setting("cache_text_embeddings", False),
                    " in the data module",
                )
            conditioning = {
                name: tensor
                for key, name in _CACHED_TEXT_CONDITIONING.items()
                if (tensor := batch.get(key)) is not None and isinstance(tensor, Tensor)
            }
            if conditioning.keys() != self.family.text_conditioning:
                have = ", ".join(key for key, name in _CACHED_TEXT_CONDITIONING.items() if name in conditioning)
                need = ", ".join(
                    k for k, name in _CACHED_TEXT_CONDITIONING.items() if name in self.family.text_conditioning
                )
                raise TrainingSetupError(
                    f"the batch carries cached {have}, but {self.family.label} is conditioned on {need}: the cache "
                    "was made for another model; pass another ",
                    Setting("cache_dir", "<folder>"),
                    " in the data module (one per model)",
                )
        elif captions is None:
            raise ValueError(f"a batch needs captions or text embeddings, got the keys {sorted(batch)}")
        else:
            with torch.set_grad_enabled(self.train_text_encoder):
                conditioning = self.family.encode_texts(self.clip_text_encoder, captions)
        factor = self.lda.downscale_factor
        size = (latents.shape[2] * factor, latents.shape[3] * factor)
        return conditioning | self.family.image_conditioning(batch, size)

    def training_step(self, batch: TrainingBatch, batch_idx: int) -> Tensor:
        latents, images = batch.get("latents"), batch.get("images")
        if latents is None:
            if images is None:
                raise ValueError(f"a batch needs images or latents, got the keys {sorted(batch)}")
            latents = self.encode_images(images)
        conditioning = self.conditioning(batch, latents)
        noise, steps = self.draw(latents, self.step_generator(batch_idx))
        loss = self.loss(latents, conditioning.pop("clip_text_embedding"), noise, steps, **conditioning)
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        return loss

    # -- optimization ----------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups(), self.learning_rate)
        return scheduled(optimizer, self.trainer, self.lr_schedule, self.warmup_steps)

    # -- sampling --------------------------------------------------------------------------------------------------

    def sampling_pipeline(self, num_inference_steps: int = 30) -> LatentDiffusionModel[Any, Any]:
        """The family's pipeline (`StableDiffusion_1`, `StableDiffusion_XL`) over the models being trained (LoRAs
        included), with a DPM-Solver++ of the same prediction type on the family's schedule.

        Args:
            num_inference_steps: The solver's number of steps.
        """
        params = self.family.solver_params(SolverParams(model_prediction_type=self._model_prediction_type))
        solver = DPMSolver(num_inference_steps=num_inference_steps, params=params, device=self._base_device())
        return self.components.pipeline(solver)


class LoraFineTuning(DenoisingTraining):
    """LoRA fine-tuning of Stable Diffusion 1.x or XL: the base frozen, LoRAs trained on noise-prediction MSE.

    Batches are `TrainingBatch` dicts from `CaptionedImageDataModule`: images (or cached latents) and captions (or
    cached text embeddings), and for SDXL each image's original size and crop, of which its time ids are made as
    diffusers' `train_text_to_image_lora_sdxl.py` makes them (`families.sdxl_time_ids`; the target size is the
    training images'). The module provides `encode_images` and `encode_texts` for the data module's caching (see
    `CachingEncoders`).

    Args:
        base: The architecture: `sd15`, `sdxl`, or their toys `tiny`, `tiny-sdxl` (for tests and demos).
        weights: The folder of converted weights (`refiners-convert sd1`, `refiners-convert sdxl`); required for
            `sd15` and `sdxl`, random weights for the toys without it.
        targets: Which layers get LoRAs (see `LoraTargets`).
        rank: The LoRAs' rank.
        alpha: The LoRAs' alpha (their update is scaled by `alpha / rank`); defaults to the rank.
        train_text_encoder: Also put LoRAs on the text encoder, both of SDXL's (attention, or attention and MLP for
            the `transformer` and `all` presets).
        learning_rate: The UNet LoRAs' learning rate.
        text_encoder_learning_rate: The text encoders' LoRAs' learning rate (default: `learning_rate`).
        optimizer: Builds the optimizer from the parameter groups and `learning_rate` (see `OptimizerFactory`;
            default: AdamW with its defaults).
        warmup_steps: Optimizer steps of linear warmup from 0 to the learning rate.
        lr_schedule: The learning rate after warmup (see `LrSchedule`).
        prediction_type: The UNet's target (see `PredictionType`).
        min_snr_gamma: Weight each sample's loss by min-SNR-gamma (5 in the paper); None for the plain MSE.
        offset_noise: Add `offset_noise * N(0, 1)` per sample and channel to the noise (0.1 is common; 0 disables).
        min_timestep: The lowest timestep drawn (inclusive).
        max_timestep: The highest timestep drawn (inclusive); at most 999 for SD1.5's schedule.
        gradient_checkpointing: Recompute the UNet's blocks' activations in the backward pass (less memory, ~30%
            more compute).
        seed: Seeds the LoRAs' initialization, the tiny model's random weights, and every random draw of a step.

    Example:
        ```py
        import torch
        from refiners.training import LoraFineTuning

        # The toy architecture with random weights; `base="sd15", weights="weights/sd15"` for the real one.
        module = LoraFineTuning(base="tiny", targets="attention", rank=4)
        assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in module.diffusers_loras()
        latents, text_embeddings = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
        noise, steps = module.draw(latents, torch.Generator().manual_seed(0))
        module.loss(latents, text_embeddings, noise, steps).backward()
        assert all(parameter.grad is not None for parameter in module.parameters())  # the LoRAs, and only them
        ```
    """

    def __init__(
        self,
        base: BaseModel = "sd15",
        weights: str | None = None,
        targets: LoraTargets = "attention",
        rank: int = 16,
        alpha: float | None = None,
        train_text_encoder: bool = False,
        learning_rate: float = 1e-4,
        text_encoder_learning_rate: float | None = None,
        optimizer: OptimizerFactory = torch.optim.AdamW,
        warmup_steps: int = 0,
        lr_schedule: LrSchedule = "constant",
        prediction_type: PredictionType = "epsilon",
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        min_timestep: int = 0,
        max_timestep: int = 999,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        _check_lora(targets, rank, alpha)
        super().__init__(
            base, weights, train_text_encoder, learning_rate, text_encoder_learning_rate, optimizer, warmup_steps,
            lr_schedule, prediction_type, min_snr_gamma, offset_noise, min_timestep, max_timestep, seed,
        )  # fmt: skip
        # Checkpoints are read with `torch.load(weights_only=True)`: hyperparameters must be plain values.
        self.save_hyperparameters(ignore=["optimizer"])
        self.targets: LoraTargets = targets
        self.rank = rank
        self.alpha = alpha
        self.gradient_checkpointing = gradient_checkpointing
        components = self.components
        for _, model in components.items():
            model.requires_grad_(False)
            model.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loras = _inject_loras("unet", components.unet, targets, rank, alpha)
            if train_text_encoder:
                for component, encoder in components.text_encoders().items():
                    loras |= _inject_loras(component, encoder, targets, rank, alpha)
        # The trained parameters, registered under the LoRAs' names (`/` for `.`, which module names cannot hold).
        self.loras = torch.nn.ModuleDict({name.replace(".", "/"): lora for name, lora in loras.items()})
        # Read before the UNet's blocks are wrapped for checkpointing, which the naming of diffusers' modules does
        # not expect.
        self.diffusers_names = _diffusers_names(self.__dict__["_pipeline"], loras)
        if gradient_checkpointing:
            for block in _checkpointed_blocks(components.unet):
                GradientCheckpointing(block).inject()

    def on_fit_start(self) -> None:
        sharded = isinstance(self.trainer.strategy, FSDPStrategy)
        if sharded and any(isinstance(callback, WeightAveraging) for callback in self.trainer.callbacks):  # pyright: ignore[reportAttributeAccessIssue]
            raise TrainingSetupError(
                "EMA (Lightning's WeightAveraging callback) does not work under FSDP: it averages an unsharded copy "
                "of the module, which FSDP's flattened shards do not match. Remove the callback from "
                "trainer.callbacks, or train with strategy='ddp' (the LoRAs are small: DDP holds them on every "
                "device at little cost)."
            )
        # Strategies that place the parameters themselves (FSDP) do not call `.to()`: the base joins the LoRAs.
        device = next(iter(self.parameters())).device
        lora_modules = {id(module) for lora in self.loras.values() for module in lora.modules()}
        for _, model in self.components.items():
            for module in model.modules():
                if id(module) not in lora_modules:
                    module._apply(lambda tensor: tensor.to(device), recurse=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        # A copy (`WeightAveraging`'s averaged model) holds its own LoRAs and nothing of the base: copying a
        # billion frozen weights to average them with themselves would cost memory and round them.
        if self._components is not None:
            lora_modules = {id(module) for lora in self.loras.values() for module in lora.modules()}
            for _, model in self._components.items():
                for module in model.modules():
                    if id(module) not in lora_modules:
                        memo[id(module)] = module  # e.g. a LoRA's parent adapter: referenced, not copied
            memo[id(self._components)] = None
            memo[id(self.__dict__["_pipeline"])] = None
        # A factory from a config may hold what cannot be copied (LightningCLI's hold a lock); a copy can share it.
        memo[id(self.optimizer_factory)] = self.optimizer_factory
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone

    # -- LoRAs -----------------------------------------------------------------------------------------------------

    def named_loras(self) -> dict[str, Lora[Any]]:
        """The trained LoRAs by `<component>.<path of their target>` (e.g. `unet.DownBlocks.Chain_2...Linear_1`)."""
        return {key.replace("/", "."): cast(Lora[Any], lora) for key, lora in self.loras.items()}

    def diffusers_loras(self) -> dict[str, Lora[Any]]:
        """The trained LoRAs by the diffusers name of their target (`unet.down_blocks.0.attentions.0...to_q`), as
        LoRA files name them (see `refiners.adapters.lora.export`)."""
        return {self.diffusers_names[name]: lora for name, lora in self.named_loras().items()}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the UNet's LoRAs, and the text encoders' (both of SDXL's) with their own
        learning rate."""
        unet = [p for name, lora in self.named_loras().items() if name.startswith("unet.") for p in lora.parameters()]
        groups: list[dict[str, Any]] = [{"params": unet, "lr": self.learning_rate, "name": "unet"}]
        if self.train_text_encoder:
            text_encoder = [
                p
                for name, lora in self.named_loras().items()
                if not name.startswith("unet.")
                for p in lora.parameters()
            ]
            groups.append({"params": text_encoder, "lr": self.text_encoder_learning_rate, "name": "text_encoder"})
        return groups


def scheduled(optimizer: Optimizer, trainer: Any, schedule: LrSchedule, warmup_steps: int) -> dict[str, Any]:
    """`configure_optimizers`'s answer: `optimizer` with the learning rate of `schedule` after `warmup_steps`,
    stepped at every optimizer step.

    Raises:
        TrainingSetupError: A decaying schedule, but the training (`trainer`'s) has no end.
    """
    total = trainer.estimated_stepping_batches if schedule != "constant" else None
    if total is not None and not math.isfinite(total):
        raise TrainingSetupError(
            Setting("lr_schedule", schedule),
            " decays to zero at the last step, but the training has no end: set trainer.max_steps or "
            "trainer.max_epochs, or use ",
            Setting("lr_schedule", "constant"),
        )
    multiplier = lr_multiplier(schedule, warmup_steps, None if total is None else int(total))
    scheduler = LambdaLR(optimizer, multiplier)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def lr_multiplier(schedule: LrSchedule, warmup_steps: int, total_steps: int | None) -> Callable[[int], float]:
    """The factor of the learning rate at each optimizer step: linear warmup, then `schedule`."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if total_steps is None or schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def _check_lora(targets: str, rank: int, alpha: float | None) -> None:
    """Fail before any model is built, saying what to change."""
    if targets not in _UNET_CONTAINERS:
        raise TrainingSetupError(
            Setting("targets"), f" must be one of {', '.join(map(repr, _UNET_CONTAINERS))}, got {targets!r}"
        )
    if rank < 1:
        raise TrainingSetupError(Setting("rank"), f" must be a positive integer, got {rank}")
    if alpha is not None and alpha <= 0:
        raise TrainingSetupError(
            Setting("alpha"), f" must be positive (the LoRAs are scaled by alpha / rank), got {alpha}"
        )


def _check_objective(
    base: str,
    learning_rate: float,
    text_encoder_learning_rate: float | None,
    warmup_steps: int,
    lr_schedule: str,
    prediction_type: str,
    min_snr_gamma: float | None,
    offset_noise: float,
    min_timestep: int,
    max_timestep: int,
) -> None:
    """Fail before any model is built, saying what to change."""
    choices: Mapping[str, tuple[str, tuple[str, ...]]] = {
        "base": (base, tuple(FAMILIES)),
        "lr_schedule": (lr_schedule, ("constant", "linear", "cosine")),
        "prediction_type": (prediction_type, ("epsilon", "v_prediction")),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise TrainingSetupError(Setting(name), f" must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    for name, rate in (("learning_rate", learning_rate), ("text_encoder_learning_rate", text_encoder_learning_rate)):
        if rate is not None and rate <= 0:
            raise TrainingSetupError(Setting(name), f" must be positive, got {rate}")
    if warmup_steps < 0:
        raise TrainingSetupError(Setting("warmup_steps"), f" must be 0 (no warmup) or more, got {warmup_steps}")
    if min_snr_gamma is not None and min_snr_gamma <= 0:
        raise TrainingSetupError(
            Setting("min_snr_gamma"),
            f" must be positive (5 in the paper), or None for no weighting; got {min_snr_gamma}",
        )
    if offset_noise < 0:
        raise TrainingSetupError(
            Setting("offset_noise"), f" must be 0 (off) or positive (0.1 is common), got {offset_noise}"
        )
    if not 0 <= min_timestep <= max_timestep <= 999:
        raise TrainingSetupError(
            "need 0 <= ",
            Setting("min_timestep"),
            " <= ",
            Setting("max_timestep"),
            f" <= 999 (SD1.5 has 1000 timesteps), got {min_timestep} and {max_timestep}",
        )
