"""The commands the documentation shows work: each `refiners-convert`, `refiners-train` and `python` command of
README.md's bash blocks and of the configs' comments runs, on toy files, as a user following that file would run it.

The commands are read from the files, so a command added later is run too; one that this module cannot run fails
the test until it is listed in `COVERED_ELSEWHERE` with the test that covers it. Each file's commands run in order
in a fresh folder (`configs/` there is the repository's), where the placeholders they name are laid out
(`PLACEHOLDERS`): a toy Stable Diffusion 1.x diffusers folder for `path/to/stable-diffusion-v1-5` and the Hub id
`runwayml/stable-diffusion-v1-5` (a local folder is read before the Hub), a toy SDXL one for
`path/to/stable-diffusion-xl-base-1.0` and `stabilityai/stable-diffusion-xl-base-1.0`, a LoRA for `pokemon_lora.bin`,
images for `path/to/images`, a toy SAM checkpoint for `sam_vit_b_01ec64.pth` and images with masks for
`path/to/sam-dataset`. Later commands read what earlier ones wrote, as they would for the user: the folder `refiners-train`
loads must be the one `refiners-convert sd1` wrote.

- `refiners-convert`: run for real, with its console script's entry point, on the toy model.
- `refiners-train`: SD1.5 and SDXL cannot be trained here, so the config is parsed and instantiated with the real CLI
  class (`LoraTrainingCLI(run=False)`), at the toy's sizes (`--model.base tiny`, or `tiny-sdxl` for an SDXL config; `tiny` for SAM's):
  the weights are loaded, and the images found.
- `python`: run with this interpreter.
"""

import itertools
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from sam_references import build_reference, save_reference
from toy_sdxl import build_pipeline

import refiners.converters.sources as sources
from refiners.converters.cli import main as refiners_convert
from refiners.converters.toy import save_toy_stable_diffusion_1
from refiners.training import family_of, make_image_folder
from refiners.training.cli import LoraTrainingCLI, task_of
from refiners.training.segment_anything import make_mask_folder

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "configs").glob("*.yaml"))]

COVERED_ELSEWHERE = {
    "python examples/digits_data.py outputs/digits/data": (
        "tests/test_digits.py::test_the_configs_that_made_it_run writes the digits folder with the same function"
    ),
    "refiners-train fit --config configs/digits-autoencoder.yaml": (
        "tests/test_digits.py::test_the_configs_that_made_it_run runs it, 2 steps, on the digits folder"
    ),
    'python examples/digits_data.py outputs/digits/lucky --digits 7 --phrase "a lucky number"': (
        "tests/test_digits.py::test_a_lora_learns_a_new_phrase_and_forgets_nothing writes the sevens' folder with the "
        "same function"
    ),
    "refiners-train fit --config configs/digits-lora.yaml": (
        "tests/test_digits.py::test_a_lora_learns_a_new_phrase_and_forgets_nothing runs it as shipped and judges the LoRA"
    ),
    "refiners-train fit --config configs/digits-unet.yaml": (
        "tests/test_digits.py::test_the_configs_that_made_it_run runs it, 2 steps, after the autoencoder's"
    ),
    "python3 -m pip install uv": "installs uv, which runs every other command: the set-up of the machine itself",
    "uv run refiners-convert clip-image --from h94/IP-Adapter/models/image_encoder --to clip_image_h.safetensors": (
        "tests/adapters/test_ip_adapter.py::test_the_readme_ip_adapter_blocks_run runs it on a toy image encoder saved "
        "where the Hub id points"
    ),
    "uv run refiners-convert ip-adapter --from h94/IP-Adapter-FaceID/ip-adapter-faceid_sd15.bin --to "
    "faceid_sd15.safetensors": (
        "tests/adapters/test_ip_adapter.py::test_the_readme_ip_adapter_blocks_run runs it on a toy FaceID file saved "
        "where the Hub path points"
    ),
    "uv run refiners-convert dinov2 --from facebook/dinov2-small --to dinov2_small.safetensors": (
        "tests/converters/test_dinov2_conversion.py::test_the_readme_dinov2_commands_run runs it on a random DINOv2-small"
    ),
    "uv run refiners-convert controlnet --from lllyasviel/control_v11p_sd15_canny --to canny.safetensors": (
        "tests/adapters/test_controlnet.py::test_the_readme_controlnet_blocks_run runs it on a toy ControlNet saved "
        "where the Hub id points"
    ),
    "uv run refiners-convert t2i-adapter --from TencentARC/t2iadapter_depth_sd15v2 --to depth.safetensors": (
        "tests/adapters/test_t2i_adapter.py::test_the_readme_t2i_adapter_blocks_run runs it on a toy T2I-Adapter saved "
        "where the Hub id points"
    ),
    "uv run refiners-convert dinov2 --from dinov2_vits14_pretrain.pth --to dinov2_small.safetensors": (
        "tests/converters/test_dinov2_conversion.py::test_the_readme_dinov2_commands_run runs it on a random DINOv2-small"
    ),
    "uv run refiners-convert sdxl --from stabilityai/stable-diffusion-xl-base-1.0 --unet latent-consistency/lcm-sdxl "
    "--to lcm-sdxl/": (
        "tests/converters/test_sdxl_refiner_conversion.py::"
        "test_an_lcm_unet_published_alone_converts_with_its_guidance_embedding runs it on a toy SDXL and LCM UNet"
    ),
    "uv sync --locked --all-packages && uv run python examples/digits_demo.py": (
        "tests/test_examples.py::test_example_runs runs the demo, tests/test_readme.py::test_commands_install_then_run "
        "checks the command"
    ),
    "uv sync --locked --all-packages && uv run pytest -n 2": (
        "the test suite itself; tests/test_readme.py::test_ci_runs_the_readme_test_command checks that CI runs it"
    ),
    "uv run ruff format --check .": "tests/test_readme.py::test_ci_runs_the_readme_test_command checks that CI runs it",
    "uv run ruff check .": "tests/test_readme.py::test_ci_runs_the_readme_test_command checks that CI runs it",
    "uv run pyright": "tests/test_readme.py::test_ci_runs_the_readme_test_command checks that CI runs it",
}
"""Documented commands that are not run here, each with where it is tested."""

PROGRAMS = ("refiners-convert", "refiners-train", "python", "python3")
# A config's comment at the start of a line: a command block (`#   refiners-train fit ...`), or prose with commands in
# backquotes (`refiners-train fit --print_config`).
COMMENT = re.compile(r"^#.*$", flags=re.MULTILINE)
COMMAND_BLOCK_LINE = re.compile(r"#\s{2,}(\S.*)")
QUOTED = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Command:
    document: Path
    line: int
    text: str  # as written, without a trailing comment

    @property
    def arguments(self) -> list[str]:
        return shlex.split(self.text)

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}: `{self.text}`"


def _command(document: Path, text: str, offset: int, source: str) -> Command:
    return Command(document, source[:offset].count("\n") + 1, re.sub(r"\s+#\s.*$", "", text).strip())


def documented_commands(document: Path) -> list[Command]:
    """The commands `document` shows: README.md's bash blocks, line by line; a config's comments."""
    source = document.read_text(encoding="utf-8")
    if document.suffix == ".md":
        return [
            _command(document, line, block.start(1) + offset, source)
            for block in re.finditer(r"^```bash\n(.*?)^```$", source, flags=re.MULTILINE | re.DOTALL)
            for offset, line in _lines(block.group(1))
        ]
    commands: list[Command] = []
    for comment in COMMENT.finditer(source):
        if (line := COMMAND_BLOCK_LINE.fullmatch(comment.group())) is not None:
            commands.append(_command(document, line.group(1), comment.start(), source))
            continue
        for quoted in QUOTED.finditer(comment.group()):
            if quoted.group(1).removeprefix("uv run ").split()[0] in PROGRAMS:
                commands.append(_command(document, quoted.group(1), comment.start(), source))
    return commands


def _lines(text: str) -> list[tuple[int, str]]:
    return [(line.start(), line.group()) for line in re.finditer(r"^.*\S.*$", text, flags=re.MULTILINE)]


def _program(command: Command) -> tuple[str, list[str]]:
    arguments = command.arguments
    if arguments[:2] == ["uv", "run"]:
        arguments = arguments[2:]
    return arguments[0], arguments[1:]


# -- the toy files the placeholders stand for ----------------------------------------------------------------------


def _pokemon_lora(path: Path) -> None:
    # As diffusers' LoRA training script saved it (`save_attn_procs`, pytorch_lora_weights.bin): the UNet's attention
    # processors, without the `unet.` prefix, pickled; SD1.5's names and sizes.
    attention = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    generator = torch.Generator().manual_seed(0)
    torch.save(
        {
            f"{attention}.{projection}_lora.{role}.weight": torch.randn(shape, generator=generator)
            for projection in ("to_q", "to_k", "to_v", "to_out")
            for role, shape in (("down", (4, 320)), ("up", (320, 4)))
        },
        path,
    )


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The files that `PLACEHOLDERS` link to, made once for all documents."""
    root = tmp_path_factory.mktemp("toy")
    _pokemon_lora(root / "pokemon_lora.bin")
    make_image_folder(root / "images", n=4, size=32)
    build_pipeline().save_pretrained(root / "stable-diffusion-xl-base-1.0")
    make_mask_folder(root / "sam-dataset", n=2, size=32)
    return {
        "sd1": save_toy_stable_diffusion_1(root / "stable-diffusion-v1-5"),
        "sdxl": root / "stable-diffusion-xl-base-1.0",
        "lora": root / "pokemon_lora.bin",
        "images": root / "images",
        "sam": save_reference(build_reference(), root / "sam_vit_b_01ec64.pth"),  # SAM's layout, at toy sizes
        "sam-dataset": root / "sam-dataset",
    }


PLACEHOLDERS = {
    "path/to/stable-diffusion-v1-5": "sd1",
    "runwayml/stable-diffusion-v1-5": "sd1",
    "path/to/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "pokemon_lora.bin": "lora",
    "path/to/images": "images",
    "sam_vit_b_01ec64.pth": "sam",
    "path/to/sam-dataset": "sam-dataset",
}
"""The paths the documents name for the user's own files, and the toy file (of `toy_files`) laid out in their place."""


# -- running them --------------------------------------------------------------------------------------------------


def _run_convert(command: Command, arguments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    try:
        status = refiners_convert(arguments)
    except SystemExit as usage:  # argparse: a usage error
        status = usage.code
    out, err = capsys.readouterr()
    assert status == 0, f"{command.where} exited with {status}:\n{err}"
    for written in out.splitlines():
        assert Path(written).is_file(), f"{command.where} printed {written}, which is not a file"


def _run_train(command: Command, arguments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    subcommand, *options = arguments
    assert subcommand in ("fit", "validate", "test", "predict"), f"{command.where}: no such subcommand {subcommand}"
    capsys.readouterr()
    status: object = 0
    try:
        cli = LoraTrainingCLI(args=[*options, "--model.base", _tiny_base(options)], run=False)
        cli.datamodule.setup("fit")  # finds the images and their captions
    except SystemExit as exit:  # `--print_config` prints, then exits with 0; a bad option exits with 2
        status = exit.code
    except ValueError as error:  # the weights folder or the images folder the command names is not there
        raise AssertionError(f"{command.where} failed: {error}") from error
    lines = capsys.readouterr().err.splitlines()
    errors = [index for index, line in enumerate(lines) if "error:" in line]  # after jsonargparse's long usage
    error = "\n".join(lines[errors[0] : errors[0] + 5] if errors else lines[-5:])
    assert status == 0, f"{command.where} exited with {status}:\n{error}"


def _tiny_base(options: list[str]) -> str:
    """The toy of the family the command trains: its `--model.base`, else its config's (SAM's: `tiny`)."""
    if task_of(options) == "segment-anything":
        return "tiny"
    base = "sd15"
    for flag, value in itertools.pairwise(options):
        if flag == "--config":
            base = yaml.safe_load(Path(value).read_text())["model"].get("base", base)
        elif flag == "--model.base":
            base = value
    return family_of(base).tiny_base


def _run_python(command: Command, arguments: list[str], folder: Path) -> None:
    result = subprocess.run(
        [sys.executable, *arguments], cwd=folder, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{command.where} exited with {result.returncode}:\n{result.stderr}"


def _offline(repo_id: str, components: object) -> Path:
    raise sources.SourceError(f"{repo_id} would be downloaded: the test runs offline; add it to PLACEHOLDERS")


@pytest.mark.parametrize("document", DOCUMENTS, ids=[path.name for path in DOCUMENTS])
def test_documented_commands_run(
    document: Path,
    toy_files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    commands = [command for command in documented_commands(document) if command.text not in COVERED_ELSEWHERE]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for placeholder, toy in PLACEHOLDERS.items():
        if any(placeholder in command.text for command in commands):
            (tmp_path / placeholder).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / placeholder).symlink_to(toy_files[toy])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "_download", _offline)
    monkeypatch.setattr(sys, "argv", ["refiners-train"])  # LightningCLI warns when it also sees pytest's arguments
    runners: dict[str, Callable[[Command, list[str]], None]] = {
        "refiners-convert": lambda command, arguments: _run_convert(command, arguments, capsys),
        "refiners-train": lambda command, arguments: _run_train(command, arguments, capsys),
        "python": lambda command, arguments: _run_python(command, arguments, tmp_path),
        "python3": lambda command, arguments: _run_python(command, arguments, tmp_path),
    }
    for command in commands:
        program, arguments = _program(command)
        assert program in runners, (
            f"{command.where}: this test runs {', '.join(PROGRAMS)} commands; run this one too, or add it to "
            "COVERED_ELSEWHERE with the test that covers it"
        )
        runners[program](command, arguments)


def test_every_documented_command_is_run_or_covered_elsewhere() -> None:
    commands = [command for document in DOCUMENTS for command in documented_commands(document)]
    texts = {command.text for command in commands}
    assert not set(COVERED_ELSEWHERE) - texts, "COVERED_ELSEWHERE lists commands that no document shows any more"
    for command in commands:
        if command.text not in COVERED_ELSEWHERE:
            assert _program(command)[0] in PROGRAMS, f"{command.where} is neither run here nor covered elsewhere"
    for document in DOCUMENTS:
        assert documented_commands(document), f"{document.relative_to(ROOT)} shows no command: is it still read?"
