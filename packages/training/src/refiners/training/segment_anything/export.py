"""A fine-tuned SAM adapter as one `.safetensors` file: written at every checkpoint and at the end of training
(`ExportSAMAdapter`), loaded onto a fresh `SegmentAnything` with `load_sam_adapter`.

The file holds either LoRAs, `<target path>.down.weight` and `<target path>.up.weight` for each target Linear (its
path in the model as built: the converted weights' keys), with their alpha in the header; or the mask decoder's
weights under their keys in the model (`MaskDecoder.*`), which replace the original ones. The header's
`refiners.sam_adapter` says which (JSON: `kind`, and for LoRAs `alpha`), and `refiners_training` holds the
training's settings.
"""

import json
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.lora import Lora, LoraAdapter
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.segment_anything import SegmentAnything
from refiners.training.errors import TrainingSetupError
from refiners.training.segment_anything.module import SAMFineTuning

__all__ = ["ADAPTER_KEY", "sam_adapter_state_dict", "load_sam_adapter", "ExportSAMAdapter"]

ADAPTER_KEY = "refiners.sam_adapter"
"""The header key of an exported SAM adapter that says what it holds (JSON)."""
_SETTINGS_KEY = "refiners_training"
_DOWN, _UP = ".down.weight", ".up.weight"


def sam_adapter_state_dict(module: SAMFineTuning) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the header of the adapter a fine-tuning trains (see the module's documentation).

    Args:
        module: The fine-tuning.
    """
    if module.decoder_only:
        decoder = module.sam.mask_decoder
        prefix = module.sam.key_of(decoder)
        tensors = {f"{prefix}.{key}": value.detach().clone() for key, value in decoder.state_dict().items()}
        return tensors, {ADAPTER_KEY: json.dumps({"kind": "mask_decoder"})}
    tensors: dict[str, Tensor] = {}
    for path, lora in module.named_loras().items():
        tensors[path + _DOWN] = lora.down.weight.detach().clone()
        tensors[path + _UP] = lora.up.weight.detach().clone()
    alpha = module.rank if module.alpha is None else module.alpha
    return tensors, {ADAPTER_KEY: json.dumps({"kind": "lora", "alpha": alpha})}


def load_sam_adapter(sam: SegmentAnything, path: str | Path) -> list[LoraAdapter]:
    """Put an exported adapter on `sam`: inject its LoRAs (returned, to eject them), or load its mask decoder.

    Args:
        sam: A `SegmentAnything` of the size the adapter was trained on, without LoRAs.
        path: The file `ExportSAMAdapter` wrote.

    Raises:
        ValueError: The file is not a SAM adapter, or names layers (or holds shapes) that `sam` does not have.
    """
    header = json.loads(load_metadata_from_safetensors(path).get(ADAPTER_KEY) or "null")
    if not isinstance(header, dict):
        raise ValueError(
            f"{path} is not a SAM adapter (no {ADAPTER_KEY} in its header): export it with ExportSAMAdapter"
        )
    settings: dict[str, Any] = header  # pyright: ignore[reportUnknownVariableType]
    tensors = load_from_safetensors(path)
    if settings.get("kind") == "mask_decoder":
        decoder = sam.mask_decoder
        prefix = sam.key_of(decoder) + "."
        state = {key.removeprefix(prefix): value for key, value in tensors.items()}
        expected = decoder.state_dict()
        if state.keys() != expected.keys() or any(state[k].shape != expected[k].shape for k in expected):
            differ = sorted(state.keys() ^ expected.keys()) or [
                k for k in expected if state[k].shape != expected[k].shape
            ]
            raise ValueError(f"{path} does not fit this SAM's mask decoder: {', '.join(differ[:5])} differ")
        decoder.load_state_dict(state)
        return []
    paths = sorted({key.removesuffix(_DOWN).removesuffix(_UP) for key in tensors})
    unmatched = [key for key in tensors if not key.endswith((_DOWN, _UP))]
    targets: dict[str, fl.Linear] = {}
    for name in paths:
        try:
            targets[name] = sam.layer(name, fl.Linear)
        except (KeyError, TypeError, IndexError):
            unmatched.append(name)
    if unmatched:
        raise ValueError(f"{path} has LoRAs for layers this SAM does not have: {', '.join(unmatched[:5])}")
    adapters: list[LoraAdapter] = []
    for name, target in targets.items():
        down, up = tensors[name + _DOWN], tensors[name + _UP]
        lora = Lora[Any].from_weights("default", down.to(target.weight), up.to(target.weight), alpha=settings["alpha"])
        parent = target.parent
        assert parent is not None
        adapters.append(LoraAdapter(target, lora).inject(parent))
    return adapters


class ExportSAMAdapter(Callback):
    """Write the trained adapter (`sam_adapter_state_dict`) at every checkpoint and at the end of training.

    At a checkpoint of step N: `<dirpath>/<filename>-step=N.safetensors`; at the end: `<dirpath>/<filename>.safetensors`,
    each written to a temporary name then renamed (a reader never sees a half-written file), on the global rank zero.

    Args:
        dirpath: The folder of the files (default: `adapters` in the run's log folder).
        filename: The files' stem.
        at_checkpoints: Also export whenever a checkpoint is saved (otherwise only at the end).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "sam-adapter", at_checkpoints: bool = True) -> None:
        super().__init__()
        if not filename or "/" in filename:
            raise TrainingSetupError(
                f"filename is the files' stem, without folder: got {filename!r} (use dirpath for the folder)"
            )
        self.dirpath = dirpath
        self.filename = filename
        self.at_checkpoints = at_checkpoints
        self.exported: list[Path] = []
        self._last_checkpoint_step: int | None = None
        self._folder: Path | None = None

    def path(self, folder: str | Path, step: int | None = None) -> Path:
        """The file of a checkpoint at `step`, or the final one (`step=None`)."""
        stem = self.filename if step is None else f"{self.filename}-step={step:06d}"
        return Path(folder) / f"{stem}.safetensors"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _fine_tuning(pl_module)
        self._folder = (
            Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "adapters"
        )

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.at_checkpoints and trainer.global_step != self._last_checkpoint_step:
            self._last_checkpoint_step = trainer.global_step
            self.export(trainer, _fine_tuning(pl_module), step=trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, _fine_tuning(pl_module), step=None)

    def export(self, trainer: Trainer, module: SAMFineTuning, step: int | None) -> Path | None:
        """Write the file of `step` on the global rank zero; returns it (None on other ranks)."""
        if not trainer.is_global_zero:
            return None
        tensors, header = sam_adapter_state_dict(module)
        settings = {key: value for key, value in module.hparams.items() if isinstance(value, str | int | float | bool)}
        settings |= {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
        folder = self._folder or Path(trainer.default_root_dir) / "adapters"
        folder.mkdir(parents=True, exist_ok=True)
        path = self.path(folder, step)
        save_to_safetensors(path, tensors, header | {_SETTINGS_KEY: json.dumps(settings, sort_keys=True)})
        self.exported.append(path)
        rank_zero_info(f"SAM adapter exported to {path}")
        return path


def _fine_tuning(pl_module: LightningModule) -> SAMFineTuning:
    if not isinstance(pl_module, SAMFineTuning):
        raise TypeError(f"ExportSAMAdapter works with a SAMFineTuning module, got {type(pl_module).__name__}")
    return pl_module
