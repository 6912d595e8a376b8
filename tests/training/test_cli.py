"""`refiners-train`: every shipped config parses and instantiates; the command trains, exports and resumes."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint

from refiners.fluxion.utils import load_metadata_from_safetensors
from refiners.training import CaptionedImageDataModule, ExportLora, LoraFineTuning, SampleImages
from refiners.training.callbacks import METADATA_KEY
from refiners.training.cli import LoraTrainingCLI
from refiners.training.sample_data import SampleImageFolder

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# The real SD1.5 weights are not at hand: the sd15 config is instantiated on the tiny architecture, all else as shipped.
TINY_BASE = {"sd15-lora.yaml": ["--model.base", "tiny", "--model.weights", "null"]}


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
    assert {path.name for path in CONFIGS} >= {"sd15-lora.yaml", "tiny-lora.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
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
    if config.name == "sd15-lora.yaml":
        assert shipped["model"]["base"] == "sd15" and shipped["model"]["weights"] == "weights/sd15"
        assert cli.model.rank == 16 and cli.model.min_snr_gamma == 5.0 and cli.model.lr_schedule == "cosine"
        assert cli.trainer.precision == "bf16-mixed" and cli.datamodule.resolution == 512
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
    refiners_train("fit", "--config", config, "--data.data_dir", metadata_folder.path, *EMA, cwd=tmp_path)
    run = tmp_path / "outputs" / "tiny-lora" / "tensorboard" / "version_0"
    names = {path.name for path in (run / "loras").iterdir()}
    for stem in ("lora", "lora-step=000006", "lora-step=000012"):
        assert {f"{stem}.safetensors", f"{stem}-peft.safetensors", f"{stem}-kohya.safetensors"} <= names
    assert {path.name for path in (run / "samples").iterdir()} == {"step=000006.png", "step=000012.png"}
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    with (tmp_path / "outputs" / "tiny-lora" / "csv" / "version_0" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 12 and all(key.startswith("loras.") for key in checkpoint["state_dict"])

    refiners_train(
        "fit", "--config", config, "--data.data_dir", metadata_folder.path, "--trainer.max_steps", "18", *EMA,
        "--ckpt_path", run / "checkpoints" / "last.ckpt", cwd=tmp_path,
    )  # fmt: skip
    resumed = tmp_path / "outputs" / "tiny-lora" / "tensorboard" / "version_1"
    settings = json.loads(load_metadata_from_safetensors(resumed / "loras" / "lora.safetensors")[METADATA_KEY])
    assert settings["global_step"] == 18 and settings["weight_averaging"] is True
    assert (resumed / "loras" / "lora-step=000018-peft.safetensors").is_file()
