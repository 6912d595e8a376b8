"""A model config round-trips through a safetensors file's metadata, and refuses what it cannot read."""

import inspect
import re
import textwrap
from pathlib import Path

import pytest
import torch

import refiners.fluxion.layers as fl
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_metadata_from_safetensors, save_to_safetensors


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    config = ModelConfig.of(fl.Conv2d, in_channels=3, out_channels=8, kernel_size=(3, 1), padding=1)
    conv = config.build([fl.Conv2d], device="meta", dtype=torch.float16)
    path = tmp_path / "conv.safetensors"
    save_to_safetensors(path, {"weight": torch.zeros(8, 3, 3, 1)}, metadata={"other": "kept"} | config.to_metadata())
    metadata = load_metadata_from_safetensors(path)
    assert metadata["refiners.model.arguments"] == (
        '{"in_channels": 3, "out_channels": 8, "kernel_size": [3, 1], "padding": 1}'
    )
    read = ModelConfig.from_metadata(metadata)
    assert read is not None and read == config and read.arguments["kernel_size"] == (3, 1)
    rebuilt = read.build([fl.Linear, fl.Conv2d], device="meta", dtype=torch.float16)
    assert type(rebuilt) is fl.Conv2d and rebuilt.weight.shape == conv.weight.shape == (8, 3, 3, 1)
    assert rebuilt.weight.dtype == torch.float16


def test_no_record() -> None:
    assert ModelConfig.from_metadata({}) is None
    assert ModelConfig.from_metadata({"clip_tokenizer.vocabulary": "{}"}) is None


def test_errors() -> None:
    metadata = ModelConfig.of(fl.Linear, in_features=2, out_features=3).to_metadata()
    with pytest.raises(ValueError, match=r"version '2' of the metadata scheme .* reads version 1: update refiners"):
        ModelConfig.from_metadata(metadata | {"refiners.model.version": "2"})
    with pytest.raises(ValueError, match=r"unknown model config metadata refiners\.model\.extra"):
        ModelConfig.from_metadata(metadata | {"refiners.model.extra": "1"})
    with pytest.raises(ValueError, match=r"incomplete: it needs refiners\.model\.class"):
        ModelConfig.from_metadata({"refiners.model.version": "1"})
    with pytest.raises(ValueError, match=r"refiners\.model\.arguments is not valid JSON"):
        ModelConfig.from_metadata(metadata | {"refiners.model.arguments": "{"})
    # The class is one the reader accepts, never imported from the file's say-so.
    with pytest.raises(ValueError, match=r"weights are for a Linear, which is not one of the models expected here"):
        ModelConfig("Linear", {"in_features": 2, "out_features": 3}).build([fl.Conv2d])
    stale = ModelConfig("Linear", {"in_features": 2, "out_features": 3, "width": 4})
    with pytest.raises(ValueError, match=r"does not fit Linear's constructor .* convert them again"):
        stale.build([fl.Linear])
    with pytest.raises(TypeError, match=r"Linear cannot be built with \['width'\]"):
        ModelConfig.of(fl.Linear, width=4)
    with pytest.raises(TypeError, match=r"Linear's in_features is a Tensor: a model config holds JSON values only"):
        ModelConfig("Linear", {"in_features": torch.tensor(2)})
    with pytest.raises(ValueError, match=r"does not record device: they are chosen when the model is built"):
        ModelConfig("Linear", {"device": "cpu"})


def test_docstring_example() -> None:
    (code,) = re.findall(r"```py\n(.*?)\s*```", inspect.getdoc(ModelConfig) or "", flags=re.DOTALL)
    exec(compile(textwrap.dedent(code), "<example of ModelConfig>", "exec"), {"__name__": "example"})


class Wrapper(fl.Chain):
    def __init__(
        self,
        inner: fl.Linear,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(inner, fl.Multiply(scale))


def test_nested_configs_build_their_components(tmp_path: Path) -> None:
    # A constructor that takes a component (SDXL's DoubleTextEncoder takes its two encoders) records its config.
    config = ModelConfig.of(Wrapper, inner=ModelConfig.of(fl.Linear, in_features=4, out_features=2), scale=2.0)
    path = tmp_path / "nested.safetensors"
    save_to_safetensors(path, {"x": torch.zeros(1)}, metadata=config.to_metadata())
    metadata = load_metadata_from_safetensors(path)
    assert metadata["refiners.model.arguments"] == (
        '{"inner": {"class": "Linear", "arguments": {"in_features": 4, "out_features": 2}}, "scale": 2.0}'
    )
    read = ModelConfig.from_metadata(metadata)
    assert read is not None and read == config
    assert str(read) == "Wrapper(inner=Linear(in_features=4, out_features=2), scale=2.0)"
    wrapper = read.build([Wrapper, fl.Linear], device="meta", dtype=torch.float16)
    linear = wrapper.layer("Linear", fl.Linear)
    assert linear.weight.shape == (2, 4) and linear.weight.is_meta and linear.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="weights are for a Linear, which is not one of the models expected here"):
        read.build([Wrapper])
