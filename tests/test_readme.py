"""The README is true: its Python blocks run, print what it shows, and its commands are the ones CI runs."""

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP = "uv sync --locked --all-packages && "


@dataclass
class Block:
    language: str
    code: str
    line: int  # where the code starts in README.md, 1-based


def _blocks() -> list[Block]:
    blocks: list[Block] = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$", README.read_text(), flags=re.MULTILINE | re.DOTALL):
        line = README.read_text()[: match.start()].count("\n") + 2
        blocks.append(Block(language=match.group(1), code=match.group(2), line=line))
    return blocks


def _commands() -> list[str]:
    return [line for block in _blocks() if block.language == "bash" for line in block.code.splitlines()]


def test_python_blocks_run_and_print_what_the_readme_shows() -> None:
    # One namespace for all blocks: the tour builds on what the previous blocks defined, as in a REPL session.
    namespace: dict[str, Any] = {"__name__": "readme"}
    blocks = _blocks()
    ran = 0
    for index, block in enumerate(blocks):
        if block.language != "python":
            continue
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(block.code, f"README.md, block at line {block.line}", "exec"), namespace)
        ran += 1
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        if following is not None and following.language == "text":
            assert stdout.getvalue().rstrip() == following.code.rstrip(), (
                f"the output of the block at line {block.line} differs from the text block at line {following.line}"
            )
    assert ran >= 5, "the tour has Chain, tree editing, Context, Adapter and LoRA blocks"


def test_commands_install_then_run() -> None:
    setups = [command for command in _commands() if command.startswith(SETUP)]
    assert len(setups) == 2, f"the README gives two set-up commands (main job, tests), found {setups}"
    main_job, tests = sorted(setups, key=lambda command: "pytest" in command)
    assert "pytest" in tests
    script = re.fullmatch(re.escape(SETUP) + r"uv run python (\S+)", main_job)
    assert script is not None, main_job
    assert (ROOT / script.group(1)).is_file()


def test_ci_runs_the_readme_test_command() -> None:
    (test_command,) = [command for command in _commands() if command.startswith(SETUP) and "pytest" in command]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines(), f"{test_command!r} must appear as a line of .ci/run"
    for check in ("uv run ruff format --check .", "uv run ruff check .", "uv run pyright"):
        assert check in _commands()
        assert re.search(rf"^check {re.escape(check)}$", ci, flags=re.MULTILINE), f"CI must run {check!r}"


def test_lists_the_five_distributions() -> None:
    text = README.read_text()
    for member in ("fluxion", "foundationals", "adapters", "training", "converters"):
        assert f"`refiners-{member}`" in text
        assert f"`refiners.{member}`" in text
