"""Callbacks of a LoRA fine-tuning: sample images as training goes, and export the LoRA as files others can load.

- `SampleImages` generates images for fixed prompts at fixed seeds every N steps, logs them (TensorBoard, W&B) and
  saves them as a grid (one row per prompt, one column per seed), so that runs and steps compare image to image.
- `ExportLora` writes the LoRA at every checkpoint and at the end of training, atomically, in the refiners layout, as
  a PEFT/diffusers file and as a kohya file (see `refiners.adapters.lora.export`), with the training's settings in
  the files' metadata. With `WeightAveraging` (EMA), the averaged LoRA is the one exported.

Lightning calls their hooks on every rank; only the global rank zero generates and writes (the LoRA is the same on
every rank: DDP keeps the replicas in sync).
"""

import json
import uuid
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from refiners.adapters.lora import kohya_state_dict, peft_state_dict, refiners_state_dict, specs_of
from refiners.fluxion.utils import image_to_tensor, save_to_safetensors
from refiners.training.errors import TrainingSetupError
from refiners.training.module import LoraFineTuning

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["LoraFormat", "SampleImages", "ExportLora", "lora_metadata", "image_grid"]

LoraFormat = Literal["refiners", "peft", "kohya"]
"""The layouts `ExportLora` writes (see `refiners.adapters.lora.export`): `refiners` (LyCORIS tensor names after
diffusers' module names, every alpha written), `peft` (what diffusers' `save_lora_weights` writes and
`load_lora_weights` reads), `kohya` (A1111, ComfyUI, kohya's and LyCORIS's tools)."""

M = TypeVar("M", bound=LightningModule)

_SUFFIXES: dict[LoraFormat, str] = {"refiners": "", "peft": "-peft", "kohya": "-kohya"}
_TEXT_MODEL = "text_model."
METADATA_KEY = "refiners_training"
"""The metadata key of an exported LoRA that holds the training's settings, as JSON."""


def output_folder(trainer: Trainer, dirpath: str | None, name: str) -> Path:
    """`dirpath`, or `name` inside the run's log folder (the logger's versioned folder, else the root dir).

    Call it on every rank: `Trainer.log_dir` broadcasts rank zero's folder.
    """
    if dirpath is not None:
        return Path(dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / name


@contextmanager
def _full_loras(trainer: Trainer) -> Generator[None]:
    """Enter on every rank: under FSDP, the LoRAs' full weights are gathered for the duration (they are sharded
    otherwise); under other strategies every rank holds them already."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy) and strategy.model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False):
            yield
    else:
        yield


def _fine_tuning(pl_module: LightningModule, callback: str) -> LoraFineTuning:
    if not isinstance(pl_module, LoraFineTuning):
        raise TypeError(f"{callback} works with a LoraFineTuning module, got {type(pl_module).__name__}")
    return pl_module


def averaged(trainer: Trainer, module: M) -> M:
    """The module whose weights are the ones to keep: `WeightAveraging`'s averaged copy when there is one."""
    for callback in trainer.callbacks:  # pyright: ignore[reportAttributeAccessIssue]
        # WeightAveraging keeps its `AveragedModel` private; its `module` is a copy of ours holding the averaged weights.
        average = getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
        if average is not None and isinstance(average.module, type(module)):
            return average.module
    return module


# -- exporting the LoRA ------------------------------------------------------------------------------------------


def lora_metadata(trainer: Trainer, module: LoraFineTuning, averaged: bool) -> dict[str, str]:
    """The training's settings, for an exported LoRA's header: `refiners_training` (JSON), kohya's `ss_*` keys and
    the training resolution as the SAI model spec's `modelspec.resolution`.

    Args:
        trainer: The trainer (for the step, the epoch and the data).
        module: The fine-tuning.
        averaged: Whether the weights are `WeightAveraging`'s average.
    """
    settings: dict[str, Any] = {
        "base": module.base,
        "weights": module.weights,
        "targets": module.targets,
        "rank": module.rank,
        "alpha": module.rank if module.alpha is None else module.alpha,
        "train_text_encoder": module.train_text_encoder,
        "learning_rate": module.learning_rate,
        "text_encoder_learning_rate": module.text_encoder_learning_rate,
        "prediction_type": module.prediction_type,
        "min_snr_gamma": module.min_snr_gamma,
        "offset_noise": module.offset_noise,
        "timesteps": [module.min_timestep, module.max_timestep],
        "seed": module.seed,
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "weight_averaging": averaged,
    }
    resolution = getattr(getattr(trainer, "datamodule", None), "resolution", None)
    if resolution is not None:
        settings["resolution"] = resolution
    metadata = {
        METADATA_KEY: json.dumps(settings, sort_keys=True),
        "ss_steps": str(trainer.global_step),
        "ss_epoch": str(trainer.current_epoch),
        "ss_unet_lr": str(module.learning_rate),
        "ss_seed": str(module.seed),
    }
    if module.train_text_encoder:
        metadata["ss_text_encoder_lr"] = str(module.text_encoder_learning_rate)
    if resolution is not None:
        # Both say the training resolution (kohya's trainer writes both); `kohya_state_dict`'s `modelspec.resolution`
        # is the base model's native one, which these replace.
        metadata["ss_resolution"] = f"({resolution}, {resolution})"
        metadata["modelspec.resolution"] = f"{resolution}x{resolution}"
    return metadata


def _without_text_model(name: str) -> str:
    """A text encoder module's name as transformers 5 has it, without the `text_model` level (a `CLIPTextModel`'s:
    SDXL's `text_encoder_2`, a `CLIPTextModelWithProjection`, keeps it in transformers 5 too)."""
    component, _, module = name.partition(".")
    return f"{component}.{module.removeprefix(_TEXT_MODEL)}" if component == "text_encoder" else name


class ExportLora(Callback):
    """Write the LoRA as `.safetensors` files at every checkpoint and at the end of training.

    At a checkpoint of step N: `<dirpath>/<filename>-step=N.safetensors` (and `-peft`, `-kohya` variants); at the end:
    `<dirpath>/<filename>.safetensors` (and variants). Each file is written to a temporary name, then renamed: a
    reader never sees a half-written LoRA. The training's settings are in the header (`lora_metadata`).

    Args:
        dirpath: The folder of the files (default: `loras` in the run's log folder).
        filename: The files' stem.
        formats: The layouts to write (see `LoraFormat`).
        at_checkpoints: Also export whenever a checkpoint is saved (otherwise only at the end).
        peft_text_model_prefix: Name the text encoder's modules `text_encoder.text_model.encoder...` in PEFT files,
            for diffusers with transformers < 5, whose `CLIPTextModel` has that `text_model` level; by default they
            are named as diffusers with transformers >= 5 loads and saves them (`text_encoder.encoder...`). The other
            layouts keep `text_model`, as kohya's tools expect (refiners reads both).

    Example:
        ```py
        from refiners.training.callbacks import ExportLora

        export = ExportLora(formats=["refiners", "peft", "kohya"])  # in Trainer(callbacks=[...])
        assert export.paths("/out", step=12)["peft"].name == "lora-step=000012-peft.safetensors"
        ```
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "lora",
        formats: Sequence[LoraFormat] = ("refiners", "peft", "kohya"),
        at_checkpoints: bool = True,
        peft_text_model_prefix: bool = False,
    ) -> None:
        super().__init__()
        if not formats:
            raise TrainingSetupError("formats is empty: give at least one of 'refiners', 'peft', 'kohya'")
        if unknown := [f for f in formats if f not in _SUFFIXES]:
            raise TrainingSetupError(f"unknown LoRA formats {unknown}: use 'refiners', 'peft' or 'kohya'")
        if not filename or "/" in filename:
            raise TrainingSetupError(
                f"filename is the files' stem, without folder: got {filename!r} (use dirpath for the folder)"
            )
        self.dirpath = dirpath
        self.filename = filename
        self.formats: tuple[LoraFormat, ...] = tuple(dict.fromkeys(formats))
        self.at_checkpoints = at_checkpoints
        self.peft_text_model_prefix = peft_text_model_prefix
        self.exported: list[Path] = []
        self._last_checkpoint_step: int | None = None
        self._folder: Path | None = None

    def paths(self, folder: str | Path, step: int | None = None) -> dict[LoraFormat, Path]:
        """The file of each format: of a checkpoint at `step`, or the final one (`step=None`).

        Args:
            folder: The output folder.
            step: The global step of a checkpoint, or None for the end of training.
        """
        stem = self.filename if step is None else f"{self.filename}-step={step:06d}"
        return {format: Path(folder) / f"{stem}{_SUFFIXES[format]}.safetensors" for format in self.formats}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _fine_tuning(pl_module, type(self).__name__)
        # On every rank: the log folder is agreed on by a collective call (only rank zero writes).
        self._folder = output_folder(trainer, self.dirpath, "loras")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Several checkpoints may be saved at one step (`epoch=...ckpt` and `last.ckpt`): export once.
        if self.at_checkpoints and trainer.global_step != self._last_checkpoint_step:
            self._last_checkpoint_step = trainer.global_step
            self.export(trainer, _fine_tuning(pl_module, type(self).__name__), step=trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, _fine_tuning(pl_module, type(self).__name__), step=None)

    def export(self, trainer: Trainer, module: LoraFineTuning, step: int | None) -> dict[LoraFormat, Path]:
        """Write the files of `step` (see `paths`) on the global rank zero; returns them (empty on other ranks).

        Call it on every rank (as Lightning calls the hooks): under FSDP, the LoRAs are gathered first.
        """
        source = averaged(trainer, module)
        with _full_loras(trainer):
            if not trainer.is_global_zero:
                return {}
            specs = specs_of(source.diffusers_loras())
        peft_specs = (
            specs if self.peft_text_model_prefix else {_without_text_model(name): spec for name, spec in specs.items()}
        )
        metadata = lora_metadata(trainer, module, averaged=source is not module)
        folder = self._folder or output_folder(trainer, self.dirpath, "loras")
        folder.mkdir(parents=True, exist_ok=True)
        paths = self.paths(folder, step)
        for format, path in paths.items():
            match format:
                case "refiners":
                    tensors, header = refiners_state_dict(specs)
                case "peft":
                    tensors, header = peft_state_dict(peft_specs)
                case "kohya":
                    tensors, header = kohya_state_dict(specs, module.family.kohya_base_model, title=self.filename)
            # kohya's `ss_*` and `modelspec.*` keys are meaningful to kohya's tools only; the settings go into every
            # file. The training's keys win over the header's defaults.
            extra = metadata if format == "kohya" else {METADATA_KEY: metadata[METADATA_KEY]}
            save_to_safetensors(path, tensors, header | extra)
            self.exported.append(path)
        rank_zero_info(f"LoRA exported to {', '.join(str(path) for path in paths.values())}")
        return paths


# -- sampling ----------------------------------------------------------------------------------------------------


def image_grid(rows: Sequence[Sequence["Image.Image"]]) -> "Image.Image":
    """Images of one size pasted in a grid, row by row.

    Args:
        rows: The rows, all of the same length.
    """
    from PIL import Image

    width, height = rows[0][0].size
    columns = len(rows[0])
    if any(len(row) != columns for row in rows):
        raise ValueError(f"every row of the grid must have {columns} images, got {[len(row) for row in rows]}")
    grid = Image.new("RGB", (columns * width, len(rows) * height))
    for row_index, row in enumerate(rows):
        for column, image in enumerate(row):
            grid.paste(image, (column * width, row_index * height))
    return grid


class SampleImages(Callback):
    """Generate images for fixed prompts at fixed seeds every `every_n_steps` optimizer steps, and at the end.

    The grid of step N (a row per prompt, a column per seed) is saved as `<dirpath>/step=N.png` and logged to the
    trainer's TensorBoard and W&B loggers (under `samples`). Generation uses the models being trained (LoRAs
    included) with DPM-Solver++ and classifier-free guidance, seeded as diffusers' pipelines: the same seed gives the
    same starting noise at every step of the training, so that the images show what the LoRA changed.

    Args:
        prompts: The prompts (one row each).
        seeds: The seeds (one column each).
        every_n_steps: Sample after every this many optimizer steps (0: only at the end).
        at_start: Also sample before the first step (the base model's images).
        num_inference_steps: The solver's steps.
        guidance_scale: The classifier-free guidance scale.
        negative_prompt: The negative prompt (default: the empty prompt).
        size: The images' side in pixels (default: the data module's resolution, else the family's: 512 for SD1,
            1024 for SDXL).
        dirpath: The folder of the grids (default: `samples` in the run's log folder).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] = (0, 1),
        every_n_steps: int = 500,
        at_start: bool = False,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        size: int | None = None,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        if not prompts or not seeds:
            raise TrainingSetupError("SampleImages needs at least one prompt and one seed")
        if every_n_steps < 0:
            raise TrainingSetupError(
                f"SampleImages: every_n_steps must be 0 (only at the end) or more, got {every_n_steps}"
            )
        if size is not None and (size <= 0 or size % 8 != 0):
            raise TrainingSetupError(
                f"SampleImages: size must be a positive multiple of 8 (the autoencoder's downscale factor), got {size}"
            )
        self.prompts = list(prompts)
        self.seeds = list(seeds)
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.size = size
        self.dirpath = dirpath
        self._last_step: int | None = None
        self._folder: Path | None = None
        self.saved: list[Path] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _fine_tuning(pl_module, type(self).__name__)
        # On every rank: the log folder is agreed on by a collective call (only rank zero samples).
        self._folder = output_folder(trainer, self.dirpath, "samples")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_start:
            self.sample(trainer, _fine_tuning(pl_module, type(self).__name__))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation, several batches end at the same optimizer step: sample once.
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.sample(trainer, _fine_tuning(pl_module, type(self).__name__))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.sample(trainer, _fine_tuning(pl_module, type(self).__name__))

    def images(self, module: LoraFineTuning, size: int) -> list[list["Image.Image"]]:
        """The images of every prompt (rows) at every seed (columns), generated with the module's models.

        Args:
            module: The fine-tuning.
            size: The images' side in pixels.
        """
        pipeline = module.sampling_pipeline(self.num_inference_steps)
        return [
            [
                pipeline.generate(
                    prompt,
                    negative_prompt=self.negative_prompt,
                    num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale,
                    height=size,
                    width=size,
                    seed=seed,
                    progress=False,
                )[0]
                for seed in self.seeds
            ]
            for prompt in self.prompts
        ]

    def sample(self, trainer: Trainer, module: LoraFineTuning) -> Path | None:
        """Generate, save and log the grid of the current step (on the global rank zero; None elsewhere).

        Call it on every rank (as Lightning calls the hooks): under FSDP, the LoRAs are gathered first.
        """
        step = trainer.global_step
        self._last_step = step
        with _full_loras(trainer):
            if not trainer.is_global_zero:
                return None
            resolution = getattr(getattr(trainer, "datamodule", None), "resolution", None)
            size = self.size or resolution or module.family.default_size
            grid = image_grid(self.images(module, size))
        folder = self._folder or output_folder(trainer, self.dirpath, "samples")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step={step:06d}.png"
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            grid.save(temporary, format="PNG")
            temporary.replace(path)
        finally:
            temporary.unlink(missing_ok=True)
        self.saved.append(path)
        self._log(trainer, grid, step)
        return path

    def _log(self, trainer: Trainer, grid: "Image.Image", step: int) -> None:
        caption = " | ".join(self.prompts) + f" (seeds {', '.join(map(str, self.seeds))})"
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", image_to_tensor(grid)[0], step, dataformats="CHW")
            elif (log_image := getattr(logger, "log_image", None)) is not None:  # W&B, Neptune, ...
                log_image(key="samples", images=[grid], step=step, caption=[caption])
