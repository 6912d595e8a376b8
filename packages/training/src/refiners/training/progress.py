"""`TrainingProgress`: a training's progress as plain lines (step, loss, speed, time left) that read well in a log."""

import time
from datetime import timedelta
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar

from refiners.training.errors import TrainingSetupError

__all__ = ["TrainingProgress", "progress_line"]


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _speed(steps_per_second: float) -> str:
    # Below one step per second, seconds per step read better (SD1.5 on a small GPU, or anything on a CPU).
    if steps_per_second >= 1:
        return f"{steps_per_second:.1f} it/s"
    return f"{1 / steps_per_second:.1f} s/it"


def progress_line(step: int, total: int | None, metrics: dict[str, float], steps_per_second: float | None) -> str:
    """A progress line: `step 6/24  loss 0.123  2.1 it/s  eta 0:00:08`.

    Args:
        step: The optimizer steps done.
        total: The steps of the whole training, if known.
        metrics: The metrics to show, by the last part of their logged name (`train/loss` shows as `loss`).
        steps_per_second: The recent speed, if measured.

    Example:
        ```py
        from refiners.training.progress import progress_line

        line = progress_line(6, 24, {"train/loss": 0.1234}, 2.0)
        assert line == "step 6/24  loss 0.1234  2.0 it/s  eta 0:00:09"
        ```
    """
    parts = [f"step {step}/{total}" if total is not None else f"step {step}"]
    parts += [f"{name.rsplit('/', 1)[-1]} {value:.4g}" for name, value in metrics.items()]
    if steps_per_second:
        parts.append(_speed(steps_per_second))
        if total is not None:
            parts.append(f"eta {_duration((total - step) / steps_per_second)}")
    return "  ".join(parts)


class TrainingProgress(ProgressBar):
    """Print a training's progress as lines on stdout: `step 6/24  loss 0.123  2.1 it/s  eta 0:00:08`.

    A line at the first step, every `every_n_steps` optimizer steps and at the last one, on the global rank zero;
    a first line says what trains, a last one how long it took. The lines read the same in a terminal and in a log
    file, where Lightning's bars (which redraw one line) leave a line per refresh, and they count steps, where
    Lightning's bars count epochs (`Epoch 3/-2` when only `max_steps` bounds the training). Lightning uses it in
    place of its own bar (it is a `ProgressBar`): `enable_progress_bar` must stay true.

    Args:
        every_n_steps: Print a line every this many optimizer steps.

    Example:
        ```yaml
        trainer:
          callbacks:
            - class_path: refiners.training.TrainingProgress
              init_args:
                every_n_steps: 10
        ```
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise TrainingSetupError(f"TrainingProgress: every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.lines: list[str] = []
        self._enabled = True
        self._parameters = 0
        self._total: int | None = None
        self._start = (0, 0.0)  # the step and time the training started at (a resumed one starts at its checkpoint)
        self._last = (0, 0.0)  # those of the last line

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_enabled:
            print(*args, **kwargs, flush=True)

    def _write(self, line: str) -> None:
        if self.is_enabled:
            self.lines.append(line)
            print(line, flush=True)

    def total_steps(self, trainer: Trainer) -> int | None:
        """The optimizer step the training will end at (`max_steps`, or where `max_epochs` ends), if known."""
        estimated = trainer.estimated_stepping_batches
        return int(estimated) if estimated != float("inf") else None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Counted before a strategy shards the parameters (FSDP), which it does after this hook.
        self._parameters = sum(parameter.numel() for parameter in pl_module.parameters() if parameter.requires_grad)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._total = total = self.total_steps(trainer)
        devices = trainer.world_size
        where = (
            f"{devices} {trainer.strategy.root_device.type} devices"
            if devices > 1
            else trainer.strategy.root_device.type
        )
        until = f"to step {total}" if total is not None else "without a step limit"
        start = f" from step {trainer.global_step}" if trainer.global_step > 0 else ""
        self._write(f"training {self._parameters:,} parameters on {where}{start} {until}")
        self._start = self._last = (trainer.global_step, time.monotonic())

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, total = trainer.global_step, self._total
        last_step, last_time = self._last
        # With gradient accumulation, several batches end at one optimizer step: one line.
        due = step == self._start[0] + 1 or step % self.every_n_steps == 0 or step == total
        if step == last_step or not due:
            return
        now = time.monotonic()
        speed = (step - last_step) / (now - last_time) if now > last_time else None
        metrics = {
            name: float(value)
            for name, value in self.get_metrics(trainer, pl_module).items()
            if name != "v_num" and isinstance(value, int | float)
        }
        self._write(progress_line(step, total, metrics, speed))
        self._last = (step, now)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(f"trained to step {trainer.global_step} in {_duration(time.monotonic() - self._start[1])}")
