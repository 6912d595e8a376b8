"""`refiners-convert lora` on what users pass it: its destination is handled as the other commands handle theirs,
files it cannot read safely are refused in one line that says why, and the strictness hint names the flag of the
front end in use (`strict=False` in Python, `--lenient` on the command line).

The LoRA files are small kohya files named after SD1.5's layers (the command matches names, not sizes).
"""

import collections
from pathlib import Path

import pytest
import torch
from torch import Tensor

from refiners.adapters.lora import UnmatchedLoraKeysError, UnmatchedLoraKeysWarning, convert_sd1_lora, parse_lora_file
from refiners.converters.cli import main
from refiners.fluxion.utils import save_to_safetensors

MODULE = "lora_unet_mid_block_attentions_0_proj_in"
STRAY = "lora_unet_mid_block_attentions_0_proj_inn"


def kohya_lora() -> dict[str, Tensor]:
    return {
        f"{MODULE}.lora_down.weight": torch.randn(4, 1280, 1, 1),
        f"{MODULE}.lora_up.weight": torch.randn(1280, 4, 1, 1),
        f"{MODULE}.alpha": torch.tensor(4.0),
    }


class TrainingState:
    """Something a training script pickles beside the weights (an optimizer, its arguments)."""


def run(capsys: pytest.CaptureFixture[str], *arguments: str | Path) -> tuple[int, str, str]:
    status = main(["lora", *map(str, arguments)])
    out, err = capsys.readouterr()
    return status, out, err


def test_the_destination_folder_is_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "style.safetensors"
    save_to_safetensors(source, kohya_lora())
    dest = tmp_path / "new" / "folder" / "style.safetensors"
    status, out, err = run(capsys, "--from", source, "--to", dest)
    assert (status, out, err) == (0, f"{dest}\n", "lora: 1 layers, refiners layout\n")
    assert list(parse_lora_file(dest).specs) == ["unet.mid_block.attentions.0.proj_in"]


def test_a_destination_that_is_a_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "style.safetensors"
    save_to_safetensors(source, kohya_lora())
    folder = tmp_path / "loras"
    folder.mkdir()
    status, out, err = run(capsys, "--from", source, "--to", folder)
    assert (status, out) == (1, "")
    assert (
        err
        == f"refiners-convert: error: the destination {folder} is a folder: pass the .safetensors file to write in it\n"
    )
    assert list(folder.iterdir()) == []  # no temporary file left behind either

    status, _, err = run(capsys, "--from", source, "--to", tmp_path / "style.bin")
    assert status == 1
    assert (
        err == f"refiners-convert: error: the destination must be a .safetensors file, got {tmp_path / 'style.bin'}\n"
    )


def test_a_pickle_of_python_objects_is_refused_without_unpickling_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "pokemon_lora.bin"
    torch.save({**kohya_lora(), "state": TrainingState()}, source)
    dest = tmp_path / "new" / "pokemon_lora.safetensors"
    status, out, err = run(capsys, "--from", source, "--to", dest)
    assert (status, out) == (1, "")
    assert err == (
        f"refiners-convert: error: {source} holds a Python object ({__name__}.TrainingState) that is not a tensor: "
        "refusing to unpickle it; re-save it with torch.save of a dict of tensors, or as .safetensors\n"
    )
    assert "\x1b" not in err and "weights_only" not in err
    assert not (tmp_path / "new").exists()  # the folder made for the destination is removed with the failure

    # An OrderedDict of tensors is what torch.save(model.state_dict()) writes: it is read.
    torch.save(collections.OrderedDict(kohya_lora()), source)
    status, _, _ = run(capsys, "--from", source, "--to", dest)
    assert status == 0 and dest.is_file()


def test_a_pickle_that_torch_cannot_read_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    complete = tmp_path / "complete.bin"
    torch.save(kohya_lora(), complete)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(complete.read_bytes()[:1000])
    status, out, err = run(capsys, "--from", truncated, "--to", tmp_path / "out.safetensors")
    assert (status, out) == (1, "")
    assert err == (
        f"refiners-convert: error: {truncated} cannot be read by torch.load (RuntimeError: PytorchStreamReader "
        "failed reading zip archive: failed finding central directory): it is truncated, corrupted or not a "
        "PyTorch file; download or save it again\n"
    )

    values = tmp_path / "values.bin"
    torch.save({f"{MODULE}.alpha": 4.0, "rank": 4}, values)
    status, _, err = run(capsys, "--from", values, "--to", tmp_path / "out.safetensors")
    assert status == 1
    assert err == (
        f"refiners-convert: error: {values} holds a dict with entries that are not tensors ('{MODULE}.alpha': float, "
        "'rank': int), not a LoRA state dict (names to tensors): re-save it with torch.save of a dict of tensors, or "
        "as .safetensors\n"
    )
    assert not (tmp_path / "out.safetensors").exists()


def test_the_strictness_hint_names_the_flag_of_the_front_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "stray.safetensors"
    save_to_safetensors(source, kohya_lora() | {f"{STRAY}.alpha": torch.tensor(1.0)})
    report = f"1 tensor(s) of the LoRA file cannot be used:\n  - {STRAY}.alpha: alpha without the weights of a LoRA"
    dest = tmp_path / "out.safetensors"

    # Python: strict=False.
    with pytest.raises(UnmatchedLoraKeysError) as error:
        convert_sd1_lora(source, dest)
    assert str(error.value) == (
        f"{report}\nCheck that the file is a LoRA for this model; pass strict=False to load the rest and only warn."
    )
    assert error.value.report == report and list(error.value.unmatched) == [f"{STRAY}.alpha"]
    with pytest.warns(UnmatchedLoraKeysWarning) as warned:
        convert_sd1_lora(source, dest, strict=False)
    assert [str(warning.message) for warning in warned] == [f"{report}\nThey are ignored (strict=False)."]
    dest.unlink()

    # The command line: --lenient.
    status, out, err = run(capsys, "--from", source, "--to", dest)
    assert (status, out) == (1, "")
    assert err == (
        f"refiners-convert: error: {report}\n"
        "Check that the file is a LoRA for Stable Diffusion 1.x; pass --lenient to write the rest and only warn.\n"
    )
    assert not dest.exists()
    status, out, err = run(capsys, "--from", source, "--to", dest, "--lenient")
    assert (status, out) == (0, f"{dest}\n")
    assert err == (
        f"refiners-convert: warning: {report}\nThey are not written (--lenient).\nlora: 1 layers, refiners layout\n"
    )
    assert list(parse_lora_file(dest).specs) == ["unet.mid_block.attentions.0.proj_in"]
