"""`refiners-train`: every shipped config parses and instantiates; the command trains, exports and resumes, shows
its progress, and says what is wrong with the data, the weights or an option in one line."""

import csv
import io
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from PIL import Image

import refiners.converters.cli
from refiners.converters.toy import save_toy_stable_diffusion_1
from refiners.fluxion.utils import load_metadata_from_safetensors
from refiners.training import (
    CaptionedImageDataModule,
    ExportLora,
    LoraFineTuning,
    SampleImages,
    Setting,
    TrainingProgress,
    TrainingSetupError,
    build_components,
    family_of,
)
from refiners.training.callbacks import METADATA_KEY
from refiners.training.cli import LoraTrainingCLI, main, option_of, quiet_lightning
from refiners.training.module import CONVERT_COMMAND
from refiners.training.sample_data import SampleImageFolder

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# The text-to-image LoRA configs; Segment Anything's (`task: segment-anything`) is tested in test_sam_training.py, the
# digits model's (`digits-*.yaml`: they train, as shipped, in tests/test_digits.py) there.
TEXT_TO_IMAGE_CONFIGS = [
    path for path in CONFIGS if "task" not in yaml.safe_load(path.read_text()) and not path.name.startswith("digits-")
]
# The real SD1.5 and SDXL weights are not at hand: their configs are instantiated on their family's tiny architecture,
# all else as shipped.
TINY_BASE = {
    "sd15-lora.yaml": ["--model.base", "tiny", "--model.weights", "null"],
    "sdxl-lora.yaml": ["--model.base", "tiny-sdxl", "--model.weights", "null"],
}


def _environment() -> dict[str, str]:
    # One torch thread per process: the test suite shares 2 cores between workers.
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# Lightning's EMA callback, added on the command line (the tiny config leaves it out: it must also run under FSDP).
EMA = ["--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay", "0.9"]


def refiners_train(*arguments: str | Path, cwd: Path) -> str:
    """Run the `refiners-train` console script, as a user would."""
    command = [str(Path(sys.executable).parent / "refiners-train"), *map(str, arguments)]
    process = subprocess.Popen(
        command, cwd=cwd, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the whole group: Lightning may have started other processes
        output, _ = process.communicate()
        raise AssertionError(f"{' '.join(command)} did not finish in 300 s:\n{output}") from None
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{output}"
    return output


def test_configs_are_shipped() -> None:
    assert {path.name for path in CONFIGS} >= {"sd15-lora.yaml", "sdxl-lora.yaml", "tiny-lora.yaml"}


@pytest.mark.parametrize("config", TEXT_TO_IMAGE_CONFIGS, ids=[path.name for path in TEXT_TO_IMAGE_CONFIGS])
def test_shipped_config_parses_and_instantiates(
    config: Path,
    metadata_folder: SampleImageFolder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # the configs' outputs are relative paths
    # As shipped: every key and value is checked against the classes' signatures.
    with pytest.raises(SystemExit) as printed:
        LoraTrainingCLI(args=["--config", str(config), "--print_config"], run=False)
    assert printed.value.code == 0
    shipped = yaml.safe_load(capsys.readouterr().out)
    arguments = ["--config", str(config), "--data.data_dir", str(metadata_folder.path)]
    cli = LoraTrainingCLI(args=[*arguments, *TINY_BASE.get(config.name, [])], run=False)
    assert isinstance(cli.model, LoraFineTuning) and isinstance(cli.datamodule, CaptionedImageDataModule)
    callbacks = {type(callback) for callback in cli.trainer.callbacks}  # pyright: ignore[reportAttributeAccessIssue]
    assert {ExportLora, SampleImages, ModelCheckpoint, LearningRateMonitor} <= callbacks
    assert {type(logger).__name__ for logger in cli.trainer.loggers} == {"TensorBoardLogger", "CSVLogger"}
    assert TrainingProgress in callbacks and cli.trainer.progress_bar_callback.__class__ is TrainingProgress
    if config.name == "sd15-lora.yaml":
        assert shipped["model"]["base"] == "sd15" and shipped["model"]["weights"] == "weights/sd15"
        # The parameter groups carry the learning rates: the optimizer's arguments show none that they override.
        assert shipped["model"]["optimizer"]["init_args"]["weight_decay"] == 0.01
        assert "lr" not in shipped["model"]["optimizer"]["init_args"]
        assert cli.model.rank == 16 and cli.model.min_snr_gamma == 5.0 and cli.model.lr_schedule == "cosine"
        assert cli.trainer.precision == "bf16-mixed" and cli.datamodule.resolution == 512
    elif config.name == "sdxl-lora.yaml":
        assert shipped["model"]["base"] == "sdxl" and shipped["model"]["weights"] == "weights/sdxl"
        assert "lr" not in shipped["model"]["optimizer"]["init_args"]
        assert cli.model.family.label == "Stable Diffusion XL" and cli.model.gradient_checkpointing
        assert cli.trainer.precision == "bf16-mixed" and cli.datamodule.resolution == 1024
        assert not cli.datamodule.center_crop and cli.datamodule.random_flip  # random crops, in the time ids
    else:
        assert EMAWeightAveraging not in callbacks and cli.model.gradient_checkpointing  # EMA: added below


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model.rnak", "4"], "rnak"),
        (["--model.targets", "attn"], "targets"),
        (["--export.formats", "[onnx]"], "formats"),
    ],
)
def test_bad_config_values_are_errors(
    arguments: list[str], message: str, metadata_folder: SampleImageFolder, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ROOT / "configs" / "tiny-lora.yaml"
    with pytest.raises(SystemExit):
        LoraTrainingCLI(
            args=["--config", str(config), "--data.data_dir", str(metadata_folder.path), *arguments], run=False
        )
    assert message in capsys.readouterr().err


def test_refiners_train_fits_exports_and_resumes(metadata_folder: SampleImageFolder, tmp_path: Path) -> None:
    config = ROOT / "configs" / "tiny-lora.yaml"
    # The logs, checkpoints, samples and LoRAs all follow the root dir (the config does not pin the loggers').
    root = ["--trainer.default_root_dir", "run"]
    output = refiners_train(
        "fit", "--config", config, "--data.data_dir", metadata_folder.path, *root, *EMA, cwd=tmp_path
    )
    assert not (tmp_path / "outputs").exists()
    run = tmp_path / "run" / "tensorboard" / "version_0"
    names = {path.name for path in (run / "loras").iterdir()}
    for stem in ("lora", "lora-step=000006", "lora-step=000012"):
        assert {f"{stem}.safetensors", f"{stem}-peft.safetensors", f"{stem}-kohya.safetensors"} <= names
    assert {path.name for path in (run / "samples").iterdir()} == {"step=000006.png", "step=000012.png"}
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    with (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 12 and all(key.startswith("loras.") for key in checkpoint["state_dict"])
    # kohya's header says the training resolution, in its two keys.
    kohya = load_metadata_from_safetensors(run / "loras" / "lora-kohya.safetensors")
    assert kohya["ss_resolution"] == "(32, 32)" and kohya["modelspec.resolution"] == "32x32"

    # Progress: a line at the first step, every 4 steps (the config's TrainingProgress) and at the last.
    lines = output.splitlines()
    assert lines[0] == "training 97,792 parameters on cpu to step 12"
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/12", "4/12", "8/12", "12/12"]
    pattern = r"step \d+/12  loss \d\.\d+  \d+\.\d (it/s|s/it)  eta \d:\d\d:\d\d"
    assert all(re.fullmatch(pattern, line) for line in steps), steps
    assert re.fullmatch(
        r"trained to step 12 in \d:\d\d:\d\d", next(line for line in lines if line.startswith("trained"))
    )
    # Lightning's notices, its model summary and torch's deprecation are not shown; Lightning's epoch count neither.
    for noise in (
        "💡",
        "Tip:",
        "GPU available",
        "TPU available",
        "LOCAL_RANK",
        "Seed set to",
        "LeafSpec",
        "┃",
        "Epoch",
    ):
        assert noise not in output, noise

    output = refiners_train(
        "fit", "--config", config, "--data.data_dir", metadata_folder.path, "--trainer.max_steps", "18", *root, *EMA,
        "--ckpt_path", run / "checkpoints" / "last.ckpt", cwd=tmp_path,
    )  # fmt: skip
    resumed = tmp_path / "run" / "tensorboard" / "version_1"
    settings = json.loads(load_metadata_from_safetensors(resumed / "loras" / "lora.safetensors")[METADATA_KEY])
    assert settings["global_step"] == 18 and settings["weight_averaging"] is True
    assert (resumed / "loras" / "lora-step=000018-peft.safetensors").is_file()
    assert "training 97,792 parameters on cpu from step 12 to step 18" in output.splitlines()
    assert [line.split()[1] for line in output.splitlines() if line.startswith("step ")] == ["13/18", "16/18", "18/18"]


# -- errors: one line, for the command line ----------------------------------------------------------------------

HELP = "refiners-train: every option and its default: refiners-train fit --help\n"


def _main(
    arguments: list[str | Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[object, str, str]:
    """Run `refiners-train` in this process, as its console script does: its exit status, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["refiners-train"])
    with pytest.raises(SystemExit) as exited:
        main([str(argument) for argument in arguments])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


@pytest.mark.parametrize(
    ("edit", "arguments", "message"),
    [
        (None, ["--model.rnak", "4"], "unknown option --model.rnak: did you mean --model.rank?"),
        (None, ["--trainer.max_stesp", "3"], "unknown option --trainer.max_stesp: did you mean --trainer.max_steps?"),
        (("  rank: 4", "  rnak: 4"), [], "unknown config key model.rnak: did you mean model.rank?"),
        (
            ("every_n_train_steps: 6", "every_n_train_stesp: 6"),
            [],
            "trainer.callbacks: lightning.pytorch.callbacks.ModelCheckpoint has no argument every_n_train_stesp: did "
            "you mean every_n_train_steps?",
        ),
        (
            None,
            ["--model.targets", "attn"],
            "model.targets: attn is not one of attention, transformer, all: did you mean attention?",
        ),
        (
            None,
            ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.1"],
            "model.optimizer: torch.optim.SGD takes no lr here: the learning rates are model.learning_rate and "
            "model.text_encoder_learning_rate",
        ),
        (
            ("      init_args:\n        name: csv", "      init_args:\n        save_dir: elsewhere\n        name: csv"),
            [],
            "trainer.logger: the save_dir of lightning.pytorch.loggers.CSVLogger is elsewhere, but refiners-train "
            "writes the logs under trainer.default_root_dir (outputs/tiny-lora), with the checkpoints and LoRAs: "
            "remove save_dir and set trainer.default_root_dir",
        ),
    ],
    ids=["option", "trainer-option", "config-key", "callback-argument", "choice", "optimizer-lr", "pinned-save-dir"],
)
def test_usage_errors_are_one_line_naming_the_nearest_option(
    edit: tuple[str, str] | None,
    arguments: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = ROOT / "configs" / "tiny-lora.yaml"
    if edit is not None:
        text = config.read_text()
        assert text.count(edit[0]) == 1, edit
        config = tmp_path / "edited.yaml"
        config.write_text(text.replace(*edit))
    code, out, err = _main(["fit", "--config", config, "--data.data_dir", tmp_path, *arguments], monkeypatch, capsys)
    assert (code, out, err) == (2, "", f"refiners-train: error: {message}\n{HELP}")


def test_a_misspelled_subcommand_names_the_nearest(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _main(["fti"], monkeypatch, capsys)
    assert (code, out) == (2, "")
    assert err == (
        "refiners-train: error: argument subcommand: invalid choice: 'fti' (choose from 'fit', 'validate', 'test', "
        "'predict'): did you mean fit?\nrefiners-train: every option and its default: refiners-train --help\n"
    )


def test_a_missing_option_is_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["fit"], monkeypatch, capsys) == (
        2,
        "",
        "refiners-train: error: missing --data.data_dir (on the command line, or in a config file)\n"
        "refiners-train: every option and its default: refiners-train --help\n",
    )


def _image(path: Path, caption: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_the_optimizer_gets_the_learning_rates_of_the_module(tmp_path: Path) -> None:
    config = ROOT / "configs" / "sd15-lora.yaml"
    arguments = ["--config", str(config), *TINY_BASE["sd15-lora.yaml"], "--data.data_dir", str(tmp_path)]
    cli = LoraTrainingCLI(args=[*arguments, "--model.train_text_encoder", "true"], run=False)
    model = cli.model
    assert isinstance(model, LoraFineTuning)
    optimizer = model.optimizer_factory(model.parameter_groups(), model.learning_rate)
    assert [(group["name"], group["lr"], group["weight_decay"]) for group in optimizer.param_groups] == [
        ("unet", 1e-4, 0.01),
        ("text_encoder", 5e-5, 0.01),
    ]


def _setup_error_cases(tmp: Path) -> list[tuple[list[str], str]]:
    """Each case's arguments and the line refiners-train prints (a regex: Pillow's own message is not ours)."""
    _image(tmp / "uncaptioned" / "a.png", "a red square")
    _image(tmp / "uncaptioned" / "b.png", None)
    _image(tmp / "unreadable" / "a.png", "a red square")
    (tmp / "unreadable" / "b.png").write_bytes(b"not an image")
    (tmp / "unreadable" / "b.txt").write_text("garbage")
    (tmp / "empty").mkdir()
    (tmp / "partial").mkdir()
    (tmp / "partial" / "unet.safetensors").write_bytes(b"")
    convert = re.escape(f"convert the model with `{CONVERT_COMMAND}` and pass that folder as --model.weights <folder>")
    return [
        (
            ["--data.data_dir", "missing"],
            re.escape("the image folder missing does not exist: pass the folder that holds the training images"),
        ),
        (
            ["--data.data_dir", "empty"],
            re.escape(
                "no images found in empty (searched recursively for .bmp, .jpeg, .jpg, .png, .webp, in any case, "
                "skipping hidden folders): check the path, or add images"
            ),
        ),
        (
            ["--data.data_dir", "uncaptioned"],
            re.escape(
                "1 image(s) in uncaptioned have no caption: b.png. Give each one a caption: a sidecar file b.txt next "
                'to b.png, or a line {"file_name": "b.png", "text": "..."} in uncaptioned/metadata.jsonl'
            ),
        ),
        (
            ["--data.data_dir", "unreadable"],
            re.escape("1 image(s) in unreadable cannot be read: b.png (")
            + ".*"
            + re.escape(
                "). Replace or remove them, or pass --data.skip_unreadable true to leave them out (with a warning)"
            ),
        ),
        (
            ["--data.data_dir", "uncaptioned", "--model.weights", "nowhere"],
            re.escape(
                "the weights folder lacks unet.safetensors, autoencoder.safetensors, clip_text.safetensors (nowhere is "
                "not a folder): "
            )
            + convert,
        ),
        (
            ["--data.data_dir", "uncaptioned", "--model.weights", "partial"],
            re.escape(
                "the weights folder lacks autoencoder.safetensors, clip_text.safetensors (partial holds "
                "['unet.safetensors']): "
            )
            + convert,
        ),
    ]


def test_data_and_weights_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "tiny-lora.yaml"
    for arguments, line in _setup_error_cases(tmp_path):
        code, out, err = _main(["fit", "--config", config, *arguments], monkeypatch, capsys)
        assert (code, out) == (1, ""), arguments
        assert re.fullmatch(f"refiners-train: error: {line}\n", err), (arguments, err)
        assert not (tmp_path / "outputs").exists(), arguments  # no empty run folder


def _command(*arguments: str | Path, cwd: Path) -> tuple[int, str, str]:
    """Run the `refiners-train` console script: its exit status, stdout and stderr."""
    command = [str(Path(sys.executable).parent / "refiners-train"), *map(str, arguments)]
    result = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def test_a_data_error_is_all_the_command_prints(tmp_path: Path) -> None:
    # As a user sees it: nothing of Lightning's (no tip, no device lines, no traceback), one line, status 1.
    config = ROOT / "configs" / "tiny-lora.yaml"
    assert _command("fit", "--config", config, "--data.data_dir", "missing", cwd=tmp_path) == (
        1,
        "",
        "refiners-train: error: the image folder missing does not exist: pass the folder that holds the training "
        "images\n",
    )
    assert list(tmp_path.iterdir()) == []


def _truncated_png() -> bytes:
    stream = io.BytesIO()
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.numpy()).save(stream, format="PNG")
    return stream.getvalue()[:200]  # the header is intact (the folder is read), the pixels cut short


@pytest.mark.parametrize(
    ("arguments", "hint", "out"),
    [
        # Encoding b.png for the latents cache fails (the loggers have started: version_1).
        ([], "pass --data.skip_unreadable true to leave unreadable images out (with a warning)", ""),
        # Loading b.png for the first batch fails in a data loader worker, which torch re-raises in the training
        # process with the worker's traceback as the message: its last line is shown. The worker wrote the setting.
        (
            ["--data.num_workers", "1", "--data.cache_latents", "false"],
            "pass skip_unreadable=True to leave unreadable images out (with a warning) (in DataLoader worker process 0)",
            "training 97,792 parameters on cpu to step 12\n",
        ),
    ],
    ids=["caching", "worker"],
)
def test_a_run_that_fails_before_its_first_step_leaves_no_run_folder(
    arguments: list[str],
    hint: str,
    out: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    _image(tmp_path / "images" / "a.png", "a red square")
    (tmp_path / "images" / "b.png").write_bytes(_truncated_png())  # the folder reads: the header is whole
    (tmp_path / "images" / "b.txt").write_text("noise")
    earlier = tmp_path / "outputs" / "tiny-lora" / "tensorboard" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "hparams.yaml").write_text("{}")
    config = ROOT / "configs" / "tiny-lora.yaml"
    code, printed, err = _main(
        ["fit", "--config", config, "--data.data_dir", "images", *arguments], monkeypatch, capsys
    )
    line = re.escape("refiners-train: error: cannot read the image images/b.png (OSError: ") + ".*"
    line += re.escape(f"): replace or remove the file, or {hint}\n")
    assert (code, printed) == (1, out) and re.fullmatch(line, err), err
    # This run's folders are gone (tensorboard/version_1, csv/version_0 and csv/); the earlier run's is untouched.
    assert [path.name for path in (tmp_path / "outputs" / "tiny-lora").iterdir()] == ["tensorboard"]
    assert [path.name for path in (tmp_path / "outputs" / "tiny-lora" / "tensorboard").iterdir()] == ["version_0"]
    assert (earlier / "hparams.yaml").read_text() == "{}"


def test_default_root_dir_moves_the_logs(metadata_folder: SampleImageFolder, tmp_path: Path) -> None:
    config = ROOT / "configs" / "tiny-lora.yaml"
    arguments = ["--config", str(config), "--data.data_dir", str(metadata_folder.path)]
    moved = LoraTrainingCLI(args=[*arguments, "--trainer.default_root_dir", str(tmp_path / "elsewhere")], run=False)
    assert [logger.save_dir for logger in moved.trainer.loggers] == [str(tmp_path / "elsewhere")] * 2
    assert moved.trainer.log_dir == str(tmp_path / "elsewhere" / "tensorboard" / "version_0")  # checkpoints, LoRAs
    shipped = LoraTrainingCLI(args=arguments, run=False)
    assert [logger.save_dir for logger in shipped.trainer.loggers] == ["outputs/tiny-lora"] * 2


def test_settings_are_written_for_their_audience() -> None:
    error = TrainingSetupError("pass ", Setting("skip_unreadable", True), " or ", Setting("weights", "<folder>"))
    assert str(error) == "pass skip_unreadable=True or weights=<folder>"
    assert error.render(option_of) == "pass --data.skip_unreadable true or --model.weights <folder>"
    assert option_of(Setting("base", "tiny")) == "--model.base tiny"
    assert option_of(Setting("formats")) == "--export.formats"
    # `seed` is an argument of the module and of the data: no one option to name, so Python's form.
    assert option_of(Setting("seed", 1)) == "seed=1"


# -- the conversion command that errors and configs suggest --------------------------------------------------------

_CONVERT_MENTION = re.compile(r"refiners-convert ([^`\"'\n#)]*)")


def _convert_commands() -> list[tuple[str, str]]:
    """Every `refiners-convert` command with arguments written in the configs, the examples and the training
    package (a bare `refiners-convert sd1` names the command; it is no command line to run)."""
    files = [*CONFIGS, *sorted((ROOT / "examples").glob("*.py"))]
    files += sorted((ROOT / "packages" / "training" / "src").rglob("*.py"))
    return [
        (f"{path.relative_to(ROOT)}", match[1].strip())
        for path in files
        for match in _CONVERT_MENTION.finditer(path.read_text())
        if len(match[1].split()) > 1
    ]


def test_conversion_commands_written_anywhere_parse() -> None:
    commands = _convert_commands()
    assert {where for where, _ in commands} >= {
        "configs/sd15-lora.yaml",
        "configs/sdxl-lora.yaml",
        "examples/stable_diffusion_demo.py",
        "packages/training/src/refiners/training/families.py",
    }
    for where, command in commands:
        arguments = refiners.converters.cli.build_parser().parse_args(shlex.split(command))
        assert arguments.command in ("sd1", "sdxl", "sam"), (where, command)
    # Each config's comment converts, with its family's command, into the folder the config loads.
    for config, family in [("sd15-lora.yaml", "sd1"), ("sdxl-lora.yaml", "sdxl")]:
        (comment,) = [command for where, command in commands if where == f"configs/{config}"]
        arguments = refiners.converters.cli.build_parser().parse_args(shlex.split(comment))
        shipped = yaml.safe_load((ROOT / "configs" / config).read_text())
        assert arguments.command == family and arguments.dest == shipped["model"]["weights"]
        assert family_of(shipped["model"]["base"]).convert_command.split()[1] == family


def test_the_suggested_conversion_command_makes_the_weights_folder(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    with pytest.raises(TrainingSetupError) as missing:
        build_components("tiny", weights=weights)
    match = re.search(r"`(refiners-convert [^`]*)`", str(missing.value))
    assert match is not None and match[1] == CONVERT_COMMAND
    source = save_toy_stable_diffusion_1(tmp_path / "diffusers")
    command = match[1].replace("<source>", shlex.quote(str(source))).replace("<folder>", shlex.quote(str(weights)))
    assert refiners.converters.cli.main(shlex.split(command)[1:]) == 0
    components = build_components("tiny", weights=weights)
    assert components.clip_text_encoder(["a red circle"]).shape == (1, 77, 32)


# -- what refiners-train does not print ---------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_lightning_notices_are_silenced_but_not_its_other_lines() -> None:
    quiet_lightning()
    records = _Records()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(records)
    try:
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero_info("GPU available: True (cuda), used: True")
        rank_zero_info("TPU available: False, using: 0 TPU cores")
        rank_zero_info("LoRA exported to lora/lora.safetensors")
        rank_zero_info("`Trainer.fit` stopped: `max_steps=24` reached.")
        rank_zero.warning("GPU available: but a warning is shown")
    finally:
        rank_zero.removeHandler(records)
    assert records.messages == [
        "LoRA exported to lora/lora.safetensors",
        "`Trainer.fit` stopped: `max_steps=24` reached.",
        "GPU available: but a warning is shown",
    ]
    # `LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]` (on GPUs) and `Seed set to 0` are those loggers' only info lines.
    for name in ("lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)
