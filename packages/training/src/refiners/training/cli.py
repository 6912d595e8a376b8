"""`refiners-train`: LoRA fine-tuning of Stable Diffusion from a config file, on Lightning's command line.

    refiners-train fit --config configs/sd15-lora.yaml
    refiners-train fit --config configs/sd15-lora.yaml --data.data_dir my_images --trainer.max_steps 2000
    refiners-train fit --config configs/sd15-lora.yaml --ckpt_path outputs/.../checkpoints/last.ckpt  # resume
    refiners-train fit --config configs/sam-lora.yaml  # Segment Anything: the config says `task: segment-anything`
    refiners-train fit --config configs/digits-unet.yaml  # full training: `task: full-fine-tuning` (`autoencoder`)

The config's top-level `task` (or `--task`) picks the classes (see `TASKS`): by default `text-to-image`, i.e.
Lightning's `LightningCLI` over `LoraFineTuning` and `CaptionedImageDataModule`: every argument of the module
(`model.*`), the data (`data.*`) and the `Trainer` (`trainer.*`: devices, strategy, precision, callbacks, loggers...)
comes from the config or the command line, and `refiners-train fit --print_config` shows them all. An `ExportLora`
callback is always there (configure it under `export`): the LoRA is written at every checkpoint and at the end. The
loggers write under `trainer.default_root_dir` (their `save_dir` follows it), and so do the checkpoints, samples and
LoRAs, which go into the first logger's run folder.

What goes wrong in the data, the weights or a setting is one line on stderr and exit status 1
(`refiners-train: error: ...`, the settings it names written as options: `--data.skip_unreadable true`); a
misspelled option or config key is one line that names the nearest valid one, and exit status 2. A run that fails
before its first step leaves no empty run folder.
"""

import difflib
import importlib
import inspect
import itertools
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
from jsonargparse import Namespace
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from refiners.training.callbacks import ExportLora
from refiners.training.data import CaptionedImageDataModule
from refiners.training.errors import Setting, TrainingSetupError
from refiners.training.full_training import AutoencoderTraining, ExportModel, FullFineTuning
from refiners.training.module import LoraFineTuning
from refiners.training.segment_anything import ExportSAMAdapter, MaskDataModule, SAMFineTuning

__all__ = [
    "PROG",
    "TASKS",
    "Task",
    "task_of",
    "LoraTrainingCLI",
    "TrainingArgumentParser",
    "main",
    "option_of",
    "usage_error",
    "quiet_lightning",
]

PROG = "refiners-train"


@dataclass(frozen=True)
class Task:
    """What `refiners-train` trains: the classes behind the groups of options `model`, `data` and `export`."""

    model: type[LightningModule]
    data: type[LightningDataModule]
    export: type[Callback]


TASKS: Mapping[str, Task] = {
    "text-to-image": Task(LoraFineTuning, CaptionedImageDataModule, ExportLora),
    "full-fine-tuning": Task(FullFineTuning, CaptionedImageDataModule, ExportModel),
    "autoencoder": Task(AutoencoderTraining, CaptionedImageDataModule, ExportModel),
    "segment-anything": Task(SAMFineTuning, MaskDataModule, ExportSAMAdapter),
}
"""The tasks by the name a config gives as its top-level `task` (default: the first)."""
DEFAULT_TASK = next(iter(TASKS))
# The classes behind the options of each group: `--model.rank` is `LoraFineTuning(rank=...)` (or `SAMFineTuning`'s).
_GROUPS: Mapping[str, tuple[type, ...]] = {
    group: tuple(getattr(task, group) for task in TASKS.values()) for group in ("model", "data", "export")
}
# What a logger writes as it starts, before any step: a failed run's folder holding only these is removed.
_LOGGER_START_FILES = ("hparams.yaml", "config.yaml", "metrics.csv", "events.out.tfevents.*")
# Lightning's info lines that do not concern a refiners-train user (the device lines: the config names the device).
_LIGHTNING_NOTICES = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:")


# -- messages for the command line -------------------------------------------------------------------------------


def option_of(setting: Setting) -> str:
    """A setting as `refiners-train`'s command line writes it (`--data.skip_unreadable true`), or as Python does
    when no single group of options has it.

    Args:
        setting: A setting named by an error.
    """
    groups = [
        group
        for group, classes in _GROUPS.items()
        if any(setting.name in inspect.signature(cls).parameters for cls in classes)
    ]
    return setting.command_line(f"--{groups[0]}.{setting.name}") if len(groups) == 1 else str(setting)


def _nearest(name: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(suggestion: str | None) -> str:
    return f": did you mean {suggestion}?" if suggestion is not None else ""


def _init_parameters(class_path: str) -> list[str]:
    """The keyword arguments of a class named by its import path (none if it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def usage_error(message: str, options: list[str]) -> str:
    """jsonargparse's message for a usage error, as one line that names the nearest valid option or value.

    Args:
        message: jsonargparse's (or argparse's) message.
        options: The valid options of the (sub)command, e.g. `--model.rank`.

    Example:
        ```py
        from refiners.training.cli import usage_error

        options = ["--model.rank", "--model.alpha", "--data.data_dir"]
        assert usage_error("unrecognized arguments: --model.rnak 4", options) == (
            "unknown option --model.rnak: did you mean --model.rank?"
        )
        assert usage_error("Subcommand 'fit' does not accept option 'model.rnak'", options) == (
            "unknown config key model.rnak: did you mean model.rank?"
        )
        ```
    """
    if match := re.fullmatch(r"unrecognized arguments: (.*)", message, re.DOTALL):
        unknown = [token.partition("=")[0] for token in match[1].split() if token.startswith("-")]
        if unknown:
            return "; ".join(f"unknown option {flag}{_did_you_mean(_nearest(flag, options))}" for flag in unknown)
    if match := re.search(r"does not accept (?:option|nested key) '([^']+)'", message):
        keys = [option.removeprefix("--") for option in options]
        return f"unknown config key {match[1]}{_did_you_mean(_nearest(match[1], keys))}"
    if match := re.search(
        r"Problem with given class_path '([^']+)':\s+Option '([^']+)' is not accepted", message, re.DOTALL
    ):
        where = re.match(r'Parser key "([^"]+)"', message)
        class_path, key = match[1], match[2]
        suggestion = _nearest(key, _init_parameters(class_path))
        prefix = f"{where[1]}: " if where else ""
        return f"{prefix}{class_path} has no argument {key}{_did_you_mean(suggestion)}"
    if match := re.search(
        r"Parser key \"([^\"]+)\":.*Option '([^']+)' is not accepted\. Got value: Namespace\(class_path='([^']+)'",
        message,
        re.DOTALL,
    ):
        key, option, class_path = match[1], match[2], match[3]
        if key == "model.optimizer" and option == "lr":
            rates = [o.removeprefix("--") for o in options if o.startswith("--model.") and o.endswith("learning_rate")]
            return f"{key}: {class_path} takes no lr here: the learning rates are {' and '.join(rates)}"
        suggestion = _nearest(option, _init_parameters(class_path))
        return f"{key}: {class_path} has no argument {option}{_did_you_mean(suggestion)}"
    if match := re.search(r'Parser key "([^"]+)":\s+Expected a typing\.Literal\[(.*)\]\. Got value: (.*)', message):
        allowed = re.findall(r"'([^']*)'", match[2])
        value = match[3].strip()
        return f"{match[1]}: {value} is not one of {', '.join(allowed)}{_did_you_mean(_nearest(value, allowed))}"
    if match := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
        allowed = re.findall(r"'([^']*)'", match[2])
        return f"{message}{_did_you_mean(_nearest(match[1], allowed))}"
    if match := re.fullmatch(r"the following arguments are required: (.*)", message):
        keys = [re.sub(r"^(fit|validate|test|predict)\.", "", key) for key in match[1].split(", ")]
        missing = [f"--{key}" for key in keys]
        return f"missing {', '.join(missing)} (on the command line, or in a config file)"
    if match := re.search(r"Call to compute_fn of link .* failed: (.*)", message, re.DOTALL):
        return match[1]
    return message


class TrainingArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose usage errors are one line naming the nearest valid option (see `usage_error`),
    then where to find every option; jsonargparse's own print the command's whole usage first (80 lines)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # raises: jsonargparse is trying alternatives, or debugging
        parser = getattr(ex, "subcommand_parser", None) or self
        assert isinstance(parser, TrainingArgumentParser)
        command = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"{PROG}: error: {usage_error(message, parser.options())}\n"
            f"{PROG}: every option and its default: {command} --help\n"
        )
        self.exit(2)

    def options(self) -> list[str]:
        """The long options of this (sub)command, e.g. `--model.rank`."""
        return [option for action in self._actions for option in action.option_strings if option.startswith("--")]


# -- the command -------------------------------------------------------------------------------------------------


def _logs_folder(default_root_dir: str | None, loggers: Any) -> str:
    """The `save_dir` of the loggers: `trainer.default_root_dir` (Lightning's default: the working directory)."""
    root = os.getcwd() if default_root_dir is None else default_root_dir
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
        pinned = init_args.get("save_dir") if isinstance(init_args, Namespace) else None
        if pinned is not None and Path(pinned) != Path(root):
            raise TrainingSetupError(
                f"trainer.logger: the save_dir of {logger.get('class_path')} is {pinned}, but refiners-train writes "
                f"the logs under trainer.default_root_dir ({root}), with the checkpoints and LoRAs: remove save_dir "
                "and set trainer.default_root_dir"
            )
    return root


def _new_log_folders(trainer: Trainer) -> list[list[Path]]:
    """For each logger, the run folder it will make and the folders above it that do not exist yet, deepest first
    (none if the run folder exists already)."""
    created: list[list[Path]] = []
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        folders = [] if not isinstance(log_dir, str) else [Path(log_dir), *Path(log_dir).absolute().parents]
        created.append(list(itertools.takewhile(lambda folder: not folder.exists(), folders)))
    return created


def _remove_unused(folders: list[Path]) -> None:
    """Remove a run folder made by a run that trained no step if it holds only what its logger wrote as it started,
    and then the folders made above it, if empty."""
    run, *above = folders
    if run.is_dir() and all(
        path.is_dir() or any(fnmatch(path.name, pattern) for pattern in _LOGGER_START_FILES) for path in run.rglob("*")
    ):
        shutil.rmtree(run)
    for folder in above:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def task_of(args: ArgsType) -> str:
    """The task a command line names: its last `--task`, else the top-level `task` of its last config file that
    has one, else `text-to-image`. A name that is not a task is returned as it is (`LoraTrainingCLI` says so).

    Args:
        args: The command line arguments (default: `sys.argv[1:]`), or a dict of the config.
    """
    if isinstance(args, dict | Namespace):
        return str(args.get("task", DEFAULT_TASK))  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
    tokens = [str(token) for token in (sys.argv[1:] if args is None else args)]  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
    task = DEFAULT_TASK
    for index, token in enumerate(tokens):
        flag, equals, value = token.partition("=")
        if flag not in ("--config", "--task") or (not equals and index + 1 == len(tokens)):
            continue
        value = value if equals else tokens[index + 1]
        if flag == "--task":
            task = value
            continue
        try:
            config = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue  # the parser reports it
        if isinstance(config, dict) and "task" in config:
            task = str(config["task"])  # pyright: ignore[reportUnknownArgumentType]
    return task


class LoraTrainingCLI(LightningCLI):
    """`LightningCLI` for `LoraFineTuning` and `CaptionedImageDataModule`, with an `ExportLora` under `export`; for
    `SAMFineTuning`, `MaskDataModule` and an `ExportSAMAdapter` when the config says `task: segment-anything` (see
    `TASKS`, `task_of`).

    The optimizer is the module's `optimizer` argument (its parameter groups carry their own learning rates), not
    LightningCLI's `--optimizer`. The loggers' `save_dir` is `trainer.default_root_dir`. The data folder is read
    before the training starts (and its loggers make their folders); a run that fails before its first step
    removes the run folders it made, when they hold only what the loggers wrote as they started.

    Args:
        args: The command line arguments (default: `sys.argv[1:]`), or a dict of the config.
        run: Run the subcommand (fit...); otherwise only instantiate the classes.
    """

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        self.task = task_of(args)
        if self.task not in TASKS:  # before any parser: the options of which task to check the others against?
            sys.stderr.write(
                f"{PROG}: error: task: {self.task} is not one of {', '.join(TASKS)}"
                f"{_did_you_mean(_nearest(self.task, TASKS))}\n"
            )
            raise SystemExit(2)
        task = TASKS[self.task]
        self.export_class = task.export
        super().__init__(
            task.model,
            task.data,
            seed_everything_default=0,
            parser_kwargs={"prog": PROG},
            parser_class=TrainingArgumentParser,
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--task",
            type=Literal[*TASKS],  # pyright: ignore[reportInvalidTypeForm]
            default=DEFAULT_TASK,
            help="What to train (it picks the classes of model, data and export): " + ", ".join(TASKS),
        )
        parser.add_lightning_class_args(self.export_class, "export")
        parser.link_arguments(
            ("trainer.default_root_dir", "trainer.logger"), "trainer.logger.init_args.save_dir", _logs_folder
        )

    def before_fit(self) -> None:
        # Read the folder before the loggers make their run folders: bad data leaves no empty `version_N` behind.
        datamodule: LightningDataModule = self.datamodule
        datamodule.setup("fit")

    def fit(self, model: LightningModule, **kwargs: Any) -> None:
        """`Trainer.fit`, removing on failure the run folders it made if no step was trained (rank zero only)."""
        created = _new_log_folders(self.trainer) if getattr(rank_zero_only, "rank", 0) == 0 else []
        try:
            self.trainer.fit(model, **kwargs)
        except BaseException:
            if self.trainer.global_step == 0:
                for folders in created:
                    if folders:
                        _remove_unused(folders)
            raise


def _not_a_notice(record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or not record.getMessage().startswith(_LIGHTNING_NOTICES)


def quiet_lightning() -> None:
    """Silence what Lightning and torch print that does not concern a refiners-train user: Lightning's tips
    (`💡 Tip: ...`), its device lines (`GPU available: ...`, `LOCAL_RANK: ...`), `Seed set to 0`, and torch's
    deprecation of the `LeafSpec` that Lightning still uses. Their warnings and errors still show."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        _not_a_notice
    )  # added once, however many calls
    for name in ("lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)  # they log one info line each: the device, the seed
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )


def _message(error: TrainingSetupError) -> str:
    """The error's message, for the command line."""
    # An error in a data loader worker comes back as torch's copy of it, whose message is the worker's traceback: the
    # message is its last line (there, the settings read as Python writes them: the error object stayed in the worker).
    worker = re.fullmatch(
        r"Caught \w+ (in DataLoader worker process \d+)\.\nOriginal Traceback.*\n[\w.]+: (.+?)\n*",
        str(error),
        re.DOTALL,
    )
    return f"{worker[2]} ({worker[1]})" if worker else error.render(option_of)


def main(args: ArgsType = None) -> None:
    """The `refiners-train` command.

    Args:
        args: The command line arguments (default: `sys.argv[1:]`).
    """
    quiet_lightning()
    try:
        LoraTrainingCLI(args=args)
    except TrainingSetupError as error:
        sys.stderr.write(f"{PROG}: error: {_message(error)}\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
