"""fluxion.utils: safetensors files and loading into models, tensor helpers, PIL conversions."""

import os
import random
import re
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from PIL import Image
from torch import Tensor

import refiners.fluxion.layers as fl
import refiners.fluxion.utils as utils
from refiners.fluxion.utils import (
    LoadReport,
    ShapeMismatch,
    denormalize,
    gaussian_blur,
    image_to_tensor,
    images_to_tensor,
    interpolate,
    load_from_safetensors,
    load_metadata_from_safetensors,
    load_state_dict_from_safetensors,
    manual_seed,
    no_grad,
    normalize,
    pad,
    save_to_safetensors,
    summarize_tensor,
    tensor_to_image,
    tensor_to_images,
)


class Scale(fl.Module):
    """A layer with a buffer, to check buffers load like parameters."""

    def __init__(self, size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(size, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def make_model(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> fl.Chain:
    # Input 1 x 2 x 4 x 4: the Linear layers act on the last (width) dimension.
    return fl.Chain(
        fl.Conv2d(2, 3, kernel_size=3, padding=1, device=device, dtype=dtype),
        fl.Chain(fl.Linear(4, 4, device=device, dtype=dtype), fl.ReLU()),
        fl.Linear(4, 5, device=device, dtype=dtype),
        Scale(5, device=device, dtype=dtype),
    )


MODEL_KEYS = [
    "Conv2d.weight",
    "Conv2d.bias",
    "Chain.Linear.weight",
    "Chain.Linear.bias",
    "Linear.weight",
    "Linear.bias",
    "Scale.scale",
]


@pytest.fixture
def weights(tmp_path: Path) -> tuple[Path, dict[str, Tensor]]:
    """A safetensors file with random weights for `make_model`, and those weights."""
    torch.manual_seed(0)
    tensors = {key: torch.randn_like(value) for key, value in make_model().state_dict().items()}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return path, tensors


def assert_same_values(model: torch.nn.Module, tensors: dict[str, Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(state[key], value.to(state[key].dtype), atol=0, rtol=0, msg=key)


# -- safetensors files -------------------------------------------------------------------------------------------


def test_save_load_round_trip_with_metadata(tmp_path: Path) -> None:
    tensors = {
        "float": torch.randn(3, 4),
        "half": torch.randn(2, dtype=torch.float16),
        "bfloat": torch.randn(5, dtype=torch.bfloat16),
        "int": torch.arange(6).view(2, 3),
        "bool": torch.tensor([True, False]),
    }
    path = tmp_path / "tensors.safetensors"
    save_to_safetensors(path, tensors, metadata={"source": "test", "format": "refiners"})

    loaded = load_from_safetensors(path)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        torch.testing.assert_close(loaded[key], value, atol=0, rtol=0)
    assert load_metadata_from_safetensors(path) == {"source": "test", "format": "refiners"}
    # The file is a plain safetensors file: the reference reader agrees.
    reference = safetensors.torch.load_file(str(path))
    assert all(torch.equal(reference[key], value) for key, value in tensors.items())


def test_metadata_is_empty_when_none_was_saved(tmp_path: Path) -> None:
    path = tmp_path / "tensors.safetensors"
    save_to_safetensors(path, {"a": torch.zeros(1)})
    assert load_metadata_from_safetensors(path) == {}


def test_save_replaces_the_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "tensors.safetensors"
    save_to_safetensors(path, {"a": torch.zeros(2)})
    save_to_safetensors(str(path), {"b": torch.ones(3)})
    assert os.listdir(tmp_path) == ["tensors.safetensors"]
    assert list(load_from_safetensors(path)) == ["b"]


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "tensors.safetensors"
    save_to_safetensors(path, {"a": torch.arange(4.0)})
    before = path.read_bytes()

    with pytest.raises(TypeError, match=r"cannot save 'b' .*: it is a int, not a torch.Tensor"):
        save_to_safetensors(path, {"a": torch.zeros(4), "b": 3})  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="metadata maps strings to strings"):
        save_to_safetensors(path, {"a": torch.zeros(4)}, metadata={"step": 3})  # pyright: ignore[reportArgumentType]

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["tensors.safetensors"]


def test_interrupted_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tensors.safetensors"
    save_to_safetensors(path, {"a": torch.arange(4.0)})
    before = path.read_bytes()

    def write_half_then_fail(tensors: dict[str, Tensor], filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_to_safetensors(path, {"a": torch.zeros(4)})

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["tensors.safetensors"]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_from_safetensors(path)
    with pytest.raises(FileNotFoundError, match=re.escape("nowhere.safetensors")):
        make_model().load_from_safetensors(path)


def test_pickle_checkpoint_is_not_a_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    torch.save(make_model().state_dict(), path)
    message = r"model.ckpt is not a valid or complete safetensors file .*PyTorch checkpoint.*refiners-convert"
    with pytest.raises(ValueError, match=message):
        make_model().load_from_safetensors(path)
    with pytest.raises(ValueError, match=message):
        load_from_safetensors(path)


def test_truncated_file_is_not_a_complete_safetensors_file(weights: tuple[Path, dict[str, Tensor]]) -> None:
    path, _ = weights
    data = path.read_bytes()
    truncated = path.with_name("truncated.safetensors")
    truncated.write_bytes(data[: len(data) - 10])
    message = r"truncated.safetensors is not a valid or complete safetensors file .*truncated"
    with pytest.raises(ValueError, match=message):
        make_model().load_from_safetensors(truncated)
    with pytest.raises(ValueError, match=message):
        load_metadata_from_safetensors(truncated)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_from_safetensors(tmp_path)


# -- loading into a model ----------------------------------------------------------------------------------------


def test_load_into_a_chain_equals_the_saved_tensors(weights: tuple[Path, dict[str, Tensor]]) -> None:
    path, tensors = weights
    model = make_model()
    assert list(model.state_dict()) == MODEL_KEYS
    assert model.load_from_safetensors(path) is model
    assert_same_values(model, tensors)

    # Same computation as torch with the file's tensors.
    x = torch.randn(1, 2, 4, 4)
    expected = torch.nn.functional.conv2d(x, tensors["Conv2d.weight"], tensors["Conv2d.bias"], padding=1)
    expected = torch.relu(expected @ tensors["Chain.Linear.weight"].T + tensors["Chain.Linear.bias"])
    expected = (expected @ tensors["Linear.weight"].T + tensors["Linear.bias"]) * tensors["Scale.scale"]
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


def test_loading_copies_in_place(weights: tuple[Path, dict[str, Tensor]]) -> None:
    path, tensors = weights
    model = make_model()
    before = {key: (tensor, tensor.data_ptr()) for key, tensor in model.state_dict(keep_vars=True).items()}
    report = load_state_dict_from_safetensors(model, path)

    assert report == LoadReport(loaded=MODEL_KEYS)
    after = model.state_dict(keep_vars=True)
    for key, (tensor, pointer) in before.items():
        assert after[key] is tensor, key
        assert after[key].data_ptr() == pointer, key
    assert all(isinstance(parameter, torch.nn.Parameter) for parameter in model.parameters())
    assert_same_values(model, tensors)


def test_loading_reads_one_tensor_at_a_time(
    weights: tuple[Path, dict[str, Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is never in memory next to the model: each tensor read is freed before the next one is read."""
    path, tensors = weights
    alive_at_each_read: list[int] = []
    read: list[weakref.ref[Tensor]] = []
    real_safe_open = utils.safe_open

    class Spy:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.handle = real_safe_open(*args, **kwargs)

        def __enter__(self) -> "Spy":
            self.handle.__enter__()
            return self

        def __exit__(self, *args: Any) -> None:
            self.handle.__exit__(*args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

        def get_tensor(self, key: str) -> Tensor:
            alive_at_each_read.append(sum(ref() is not None for ref in read))
            tensor = self.handle.get_tensor(key)
            read.append(weakref.ref(tensor))
            return tensor

    monkeypatch.setattr(utils, "safe_open", Spy)
    model = make_model()
    load_state_dict_from_safetensors(model, path)

    assert alive_at_each_read == [0] * len(tensors)
    assert all(ref() is None for ref in read)
    assert_same_values(model, tensors)


def test_load_casts_to_the_model_dtype(weights: tuple[Path, dict[str, Tensor]]) -> None:
    path, tensors = weights
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        model = make_model(dtype=dtype).load_from_safetensors(path)
        assert {tensor.dtype for tensor in model.state_dict().values()} == {dtype}
        assert_same_values(model, tensors)


def test_strict_mismatch_lists_missing_unexpected_and_misshaped_keys(
    weights: tuple[Path, dict[str, Tensor]],
) -> None:
    path, tensors = weights
    tensors = dict(tensors)
    del tensors["Chain.Linear.bias"]
    tensors["Linear.weight"] = torch.zeros(4, 5)
    tensors["Extra.weight"] = torch.zeros(2)
    save_to_safetensors(path, tensors)
    model = make_model()
    before = model.state_dict()["Conv2d.weight"].clone()

    with pytest.raises(ValueError, match="do not match") as error:
        model.load_from_safetensors(path)

    message = str(error.value)
    assert "missing from the file (1): Chain.Linear.bias" in message
    assert "unexpected in the file (1): Extra.weight" in message
    assert "Linear.weight: file (4, 5), model (5, 4)" in message
    assert "(7 in the model, 7 in the file, 6 in common)" in message
    assert "hyperparameters" in message
    assert "strict=False" in message
    # Nothing is loaded when the check fails.
    torch.testing.assert_close(model.state_dict()["Conv2d.weight"], before, atol=0, rtol=0)


def test_strict_message_for_another_model_is_truncated_with_counts(tmp_path: Path) -> None:
    model = fl.Chain(fl.Linear(2, 2) for _ in range(15))
    path = tmp_path / "other.safetensors"
    save_to_safetensors(path, {f"encoder.layers.{i}.weight": torch.zeros(1) for i in range(12)})

    with pytest.raises(ValueError, match="another model") as error:
        model.load_from_safetensors(path)

    message = str(error.value)
    assert "missing from the file (30): Linear_1.weight, Linear_1.bias," in message
    assert "Linear_5.bias, ... and 20 more" in message
    assert "Linear_6.weight" not in message
    assert "unexpected in the file (12): encoder.layers.0.weight" in message
    # In the file's order (safetensors sorts keys as strings).
    assert "encoder.layers.10.weight" in message and "encoder.layers.7.weight, ... and 2 more" in message
    assert "refiners-convert" in message


def test_strict_message_spots_a_prefix(weights: tuple[Path, dict[str, Tensor]]) -> None:
    path, tensors = weights
    save_to_safetensors(path, {f"unet.{key}": value for key, value in tensors.items()})
    with pytest.raises(ValueError, match=re.escape("prefixed with 'unet.'")):
        make_model().load_from_safetensors(path)


def test_non_strict_loads_what_fits_and_reports_the_rest(weights: tuple[Path, dict[str, Tensor]]) -> None:
    path, tensors = weights
    partial = dict(tensors)
    del partial["Chain.Linear.bias"]
    partial["Linear.weight"] = torch.zeros(4, 5)
    partial["Extra.weight"] = torch.zeros(2)
    save_to_safetensors(path, partial)
    model = make_model()
    untouched = {key: model.state_dict()[key].clone() for key in ("Chain.Linear.bias", "Linear.weight")}

    with pytest.warns(UserWarning, match=r"(?s)loaded 5 of 7 tensors of Chain from .*missing from the file \(1\)"):
        report = load_state_dict_from_safetensors(model, path, strict=False)

    assert report.loaded == ["Conv2d.weight", "Conv2d.bias", "Chain.Linear.weight", "Linear.bias", "Scale.scale"]
    assert report.missing == ["Chain.Linear.bias"]
    assert report.unexpected == ["Extra.weight"]
    assert report.mismatched == [ShapeMismatch("Linear.weight", (4, 5), (5, 4))]
    assert not report.complete
    state = model.state_dict()
    for key in report.loaded:
        torch.testing.assert_close(state[key], tensors[key], atol=0, rtol=0)
    for key, value in untouched.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)


def test_meta_model_is_materialized_with_the_file_values(weights: tuple[Path, dict[str, Tensor]]) -> None:
    path, tensors = weights
    model = make_model(device="meta")
    model.layer("Linear", fl.Linear).weight.requires_grad_(False)

    model.load_from_safetensors(path)

    assert {tensor.device.type for tensor in model.state_dict().values()} == {"cpu"}
    assert_same_values(model, tensors)
    assert all(isinstance(parameter, torch.nn.Parameter) for parameter in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, False, True]
    reference = make_model().load_from_safetensors(path)
    x = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)


def test_meta_model_keeps_tied_weights_tied(tmp_path: Path) -> None:
    first, second = fl.Linear(3, 3, device="meta"), fl.Linear(3, 3, device="meta")
    second.weight = first.weight
    model = fl.Chain(first, second)
    weight, bias_1, bias_2 = torch.randn(3, 3), torch.randn(3), torch.randn(3)
    path = tmp_path / "tied.safetensors"
    tensors = {"Linear_1.weight": weight, "Linear_1.bias": bias_1, "Linear_2.weight": weight.clone()}
    save_to_safetensors(path, tensors | {"Linear_2.bias": bias_2})

    model.load_from_safetensors(path)

    assert first.weight is second.weight
    torch.testing.assert_close(second.weight, weight, atol=0, rtol=0)
    torch.testing.assert_close(second.bias, bias_2, atol=0, rtol=0)


def test_meta_weights_left_missing_are_reported(weights: tuple[Path, dict[str, Tensor]]) -> None:
    path, tensors = weights
    save_to_safetensors(path, {key: value for key, value in tensors.items() if key != "Scale.scale"})
    model = make_model(device="meta")
    with pytest.warns(UserWarning, match="1 missing weights are still on the meta device"):
        report = load_state_dict_from_safetensors(model, path, strict=False)
    assert report.missing == ["Scale.scale"]
    assert model.layer("Linear", fl.Linear).weight.device.type == "cpu"


# -- tensors -----------------------------------------------------------------------------------------------------


def test_summarize_tensor_docstring_example() -> None:
    assert summarize_tensor.__doc__ is not None
    match = re.search(r"```py\n(.*?)```", summarize_tensor.__doc__, re.DOTALL)
    assert match is not None
    exec(compile(re.sub(r"(?m)^ {8}", "", match.group(1)), "<example>", "exec"), {})


def test_summarize_tensor() -> None:
    text = summarize_tensor(torch.tensor([[1.0, float("inf")], [-2.0, 3.0]], dtype=torch.float16))
    assert text.startswith("Tensor(shape=(2, 2), dtype=float16, device=cpu, min=-2, max=3, ")
    assert "inf=1" in text and "nan" not in text
    assert summarize_tensor(torch.arange(5)) == "Tensor(shape=(5), dtype=int64, device=cpu, min=0, max=4)"
    assert summarize_tensor(torch.zeros(0, 3)) == "Tensor(shape=(0, 3), dtype=float32, device=cpu)"
    assert summarize_tensor(torch.zeros(2, device="meta")) == "Tensor(shape=(2), dtype=float32, device=meta)"
    assert "requires_grad=True" in summarize_tensor(torch.ones(2, requires_grad=True))
    assert summarize_tensor(torch.tensor([True])) == "Tensor(shape=(1), dtype=bool, device=cpu)"


def test_manual_seed_reproduces_torch_and_python_random() -> None:
    manual_seed(7)
    first = (torch.randn(4), random.random())
    manual_seed(7)
    second = (torch.randn(4), random.random())
    manual_seed(8)
    third = (torch.randn(4), random.random())
    torch.testing.assert_close(first[0], second[0], atol=0, rtol=0)
    assert first[1] == second[1]
    assert not torch.equal(first[0], third[0]) and first[1] != third[1]


def test_no_grad_is_torch_no_grad() -> None:
    x = torch.ones(2, requires_grad=True)
    with no_grad():
        assert not (x * 2).requires_grad

    @no_grad()
    def double(value: Tensor) -> Tensor:
        return value * 2

    assert not double(x).requires_grad
    assert no_grad is torch.no_grad


def _reflect(index: int, size: int) -> int:
    return -index if index < 0 else 2 * (size - 1) - index if index >= size else index


def test_gaussian_blur_equals_the_direct_formula() -> None:
    """out[i, j] = sum_uv g_y(v) g_x(u) x[reflect(i + v), reflect(j + u)], g normalized exp(-d^2 / 2 sigma^2)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)

    def reference(kx: int, ky: int, sx: float, sy: float) -> Tensor:
        def g(size: int, sigma: float) -> list[float]:
            weights = [2.718281828459045 ** (-((d - size // 2) ** 2) / (2 * sigma**2)) for d in range(size)]
            return [w / sum(weights) for w in weights]

        gx, gy = g(kx, sx), g(ky, sy)
        out = torch.zeros_like(x)
        for i in range(6):
            for j in range(7):
                for v in range(ky):
                    for u in range(kx):
                        pixel = x[..., _reflect(i + v - ky // 2, 6), _reflect(j + u - kx // 2, 7)]
                        out[..., i, j] += gy[v] * gx[u] * pixel
        return out

    torch.testing.assert_close(gaussian_blur(x, (5, 3), (1.5, 0.7)), reference(5, 3, 1.5, 0.7), atol=1e-12, rtol=0)
    # OpenCV's default sigma for a kernel size: 0.3 * ((k - 1) / 2 - 1) + 0.8.
    torch.testing.assert_close(gaussian_blur(x, 5), reference(5, 5, 1.1, 1.1), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        gaussian_blur(x.float(), 3, 2.0), reference(3, 3, 2.0, 2.0).float(), atol=1e-6, rtol=1e-6
    )


def test_gaussian_blur_errors() -> None:
    with pytest.raises(ValueError, match="odd positive kernel sizes"):
        gaussian_blur(torch.zeros(1, 1, 8, 8), 4)
    with pytest.raises(ValueError, match="too large for a 3x8 input"):
        gaussian_blur(torch.zeros(1, 1, 3, 8), 7)
    with pytest.raises(ValueError, match="positive sigma"):
        gaussian_blur(torch.zeros(1, 1, 8, 8), 3, 0.0)
    with pytest.raises(TypeError, match="needs a floating tensor"):
        gaussian_blur(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 3)


def test_pad() -> None:
    x = torch.arange(12.0).view(1, 3, 4)
    torch.testing.assert_close(pad(x, (2, 1), mode="reflect"), x[..., [2, 1, 0, 1, 2, 3, 2]], atol=0, rtol=0)
    padded = pad(x, (1, 0, 0, 2), value=-1.0)
    assert padded.shape == (1, 5, 5)
    torch.testing.assert_close(padded[:, :3, 1:], x, atol=0, rtol=0)
    assert (padded[:, :, 0] == -1).all() and (padded[:, 3:] == -1).all()
    with pytest.raises(ValueError, match="pairs"):
        pad(x, (1, 2, 3))


def test_interpolate() -> None:
    x = torch.randn(1, 2, 3, 4)
    doubled = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    torch.testing.assert_close(interpolate(x, scale_factor=2.0), doubled, atol=0, rtol=0)
    torch.testing.assert_close(interpolate(x, (6, 8)), doubled, atol=0, rtol=0)
    # Bilinear to the same size is the identity.
    torch.testing.assert_close(interpolate(x, x.shape[2:], mode="bilinear"), x, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        interpolate(x)
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        interpolate(x, 4, scale_factor=2.0)


def test_normalize_and_denormalize() -> None:
    x = torch.rand(2, 3, 4, 5)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normalized = normalize(x, mean, std)
    for channel in range(3):
        expected = (x[:, channel] - mean[channel]) / std[channel]
        torch.testing.assert_close(normalized[:, channel], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(denormalize(normalized, mean, std), x, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="one mean and one std per channel"):
        normalize(x, [0.5], [0.5])


# -- images ------------------------------------------------------------------------------------------------------


def random_image(mode: str, width: int = 5, height: int = 3) -> Image.Image:
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    return Image.frombytes(mode, (width, height), random.Random(mode).randbytes(width * height * channels))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA"])
def test_image_round_trip_is_exact(mode: str) -> None:
    image = random_image(mode)
    tensor = image_to_tensor(image)
    channels = len(image.getbands())
    assert tensor.shape == (1, channels, 3, 5) and tensor.dtype == torch.float32
    # Values are Pillow's pixels over 255.
    for y in range(3):
        for x in range(5):
            pixel = image.getpixel((x, y))
            expected = [pixel] if isinstance(pixel, int) else list(pixel)  # pyright: ignore
            assert [round(value * 255, 4) for value in tensor[0, :, y, x].tolist()] == expected

    for dtype in (torch.float32, torch.float16, torch.float64):
        back = tensor_to_image(image_to_tensor(image, dtype=dtype))
        assert back.mode == mode and back.size == image.size
        assert back.tobytes() == image.tobytes()


def test_batch_round_trip() -> None:
    images = [random_image("RGB"), random_image("RGB").transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    batch = images_to_tensor(images, dtype=torch.float64)
    assert batch.shape == (2, 3, 3, 5) and batch.dtype == torch.float64
    assert [image.tobytes() for image in tensor_to_images(batch)] == [image.tobytes() for image in images]


def test_tensor_to_image_clamps_and_rounds() -> None:
    tensor = torch.tensor([-0.5, 0.0, 0.2, 0.5 / 255, 1.49 / 255, 254.6 / 255, 1.0, 2.0]).view(1, 1, 1, 8)
    assert list(tensor_to_image(tensor).tobytes()) == [0, 0, 51, 0, 1, 255, 255, 255]


def test_image_conversion_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"got a 'CMYK' image: convert it first"):
        image_to_tensor(Image.new("CMYK", (2, 2)))
    with pytest.raises(ValueError, match="needs a floating dtype"):
        image_to_tensor(random_image("RGB"), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"1 x channels x height x width .*shape=\(2, 3, 4, 4\).*tensor_to_images"):
        tensor_to_image(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="1, 2, 3 or 4 channels"):
        tensor_to_image(torch.zeros(1, 5, 4, 4))
    with pytest.raises(ValueError, match="NaN values"):
        tensor_to_image(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="one size and mode, got: RGB 5x3, L 5x3"):
        images_to_tensor([random_image("RGB"), random_image("L")])
    with pytest.raises(ValueError, match="at least one image"):
        images_to_tensor([])

    # A None entry in sys.modules makes the import fail, as when Pillow is not installed.
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match=re.escape('pip install "refiners-fluxion[image]"')):
        tensor_to_image(torch.zeros(1, 3, 2, 2))
