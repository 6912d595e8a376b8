"""Reading Stable Diffusion 1.x sources: diffusers folders (safetensors, .bin, fp16 variants, shards), original
single-file checkpoints (.safetensors and .ckpt), Hugging Face Hub ids, and the errors on anything else.

The original-layout ("ldm") key rules are checked against diffusers' own `convert_ldm_*_checkpoint`: a checkpoint
written with our rules is read back by diffusers into exactly the diffusers weights. The single-file checkpoint
is made from the SD1.5 diffusers folder of conftest.py in float16 (half the disk and time of float32; the key
mapping is what is tested), so its conversion must equal, tensor for tensor, the folder's converted with
`--dtype float16`. The inpainting UNet (9 input channels) goes through `--check` against diffusers.
"""

import fnmatch
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from safetensors import safe_open
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel

from refiners.converters.cli import main
from refiners.converters.engine import ConversionError
from refiners.converters.reference_check import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from refiners.converters.single_file import (
    LDM_PREFIXES,
    ModuleRenaming,
    ldm_autoencoder_renaming,
    ldm_clip_text_renaming,
    ldm_to_diffusers,
    ldm_unet_renaming,
)
from refiners.converters.sources import DiffusersFolder, SourceError, TensorFile, open_source
from refiners.converters.stable_diffusion import (
    convert_autoencoder,
    convert_clip_text,
    convert_stable_diffusion_1,
    convert_unet,
)
from refiners.fluxion.model_config import ModelConfig
from refiners.fluxion.utils import load_from_safetensors, load_metadata_from_safetensors, save_to_safetensors
from refiners.foundationals.clip import CLIPTextEncoderL, CLIPTokenizer
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet

COMPONENT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
RENAMINGS = {"unet": ldm_unet_renaming(), "vae": ldm_autoencoder_renaming(), "text_encoder": ldm_clip_text_renaming()}
ToOriginal = Callable[[str, Tensor, str], tuple[str, Tensor]]


def assert_same_files(actual: Path, expected: Path) -> None:
    with safe_open(str(actual), framework="pt") as a, safe_open(str(expected), framework="pt") as e:
        keys: list[str] = e.keys()
        assert sorted(a.keys()) == sorted(keys)
        for key in keys:
            assert torch.equal(a.get_tensor(key), e.get_tensor(key)), key


# -- the original layout's rules, against diffusers' conversion -------------------------------------------------


def test_original_layout_rules_invert_diffusers_conversion(original_layout: ToOriginal) -> None:
    # Full-size models on the meta device: every key and shape, nothing allocated. The text encoder's keys as the
    # Hub's files (and original checkpoints) have them, with `text_model.`.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).state_dict()
        vae = AutoencoderKL(**SD15_VAE_CONFIG).state_dict()
        clip = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)).state_dict()
    text_encoder = {f"text_model.{key}": tensor for key, tensor in clip.items()}
    for component, state_dict, convert in [
        ("unet", unet, lambda ckpt: convert_ldm_unet_checkpoint(ckpt, SD15_UNET_CONFIG)),
        ("vae", vae, lambda ckpt: convert_ldm_vae_checkpoint(ckpt, SD15_VAE_CONFIG)),
        ("text_encoder", text_encoder, convert_ldm_clip_checkpoint),
    ]:
        original = dict(original_layout(key, tensor, component) for key, tensor in state_dict.items())
        assert len(original) == len(state_dict)
        for back in (convert(original), ldm_to_diffusers(original, RENAMINGS[component], LDM_PREFIXES[component])):
            assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state_dict.items()}, component


def test_module_renaming_prefers_the_longest_pair() -> None:
    renaming = ModuleRenaming([("input_blocks.1.0", "down.0"), ("input_blocks.1.0.skip_connection", "down.0.short")])
    assert renaming.to_diffusers("input_blocks.1.0.in_layers.0.weight") == "down.0.in_layers.0.weight"
    assert renaming.to_diffusers("input_blocks.1.0.skip_connection.bias") == "down.0.short.bias"
    assert renaming.to_original("down.0.short.weight") == "input_blocks.1.0.skip_connection.weight"
    assert renaming.to_diffusers("input_blocks.10.0.weight") is None
    with pytest.raises(ValueError, match="paired twice"):
        ModuleRenaming([("a", "b"), ("c", "b")])


# -- single-file checkpoints ------------------------------------------------------------------------------------


def test_the_single_file_is_what_diffusers_reads(sd15_folder: Path, sd15_single_files: Path) -> None:
    # The test's checkpoint is a genuine original-layout one: diffusers' own conversion gives back the folder's weights.
    original = load_from_safetensors(sd15_single_files / "sd15.safetensors")
    for component, convert in [
        ("unet", lambda: convert_ldm_unet_checkpoint(original, SD15_UNET_CONFIG)),
        ("vae", lambda: convert_ldm_vae_checkpoint(original, SD15_VAE_CONFIG)),
        ("text_encoder", lambda: convert_ldm_clip_checkpoint(original)),
    ]:
        converted = convert()
        expected = TensorFile([sd15_folder / COMPONENT_FILES[component]])
        assert sorted(converted) == sorted(expected), component
        for key in expected:
            tensor = expected[key]
            assert torch.equal(converted[key], tensor.half() if tensor.is_floating_point() else tensor), key


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_single_file_conversion_equals_the_folder_conversion(
    sd15_folder: Path,
    sd15_single_files: Path,
    kind: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = sd15_single_files / "sd15.safetensors" if kind == "safetensors" else sd15_single_files / "sd15.ckpt"
    tokenizer = ["--tokenizer", str(sd15_folder / "tokenizer")] if kind == "ckpt" else []
    assert main(["sd1", "--from", str(source), "--to", str(tmp_path), *tokenizer]) == 0
    err = capsys.readouterr().err
    for name in ("clip_text", "autoencoder", "unet"):
        assert_same_files(tmp_path / f"{name}.safetensors", sd15_single_files / "from_folder" / f"{name}.safetensors")
    assert ", original layout, for " in err
    assert "the checkpoint also has an EMA copy of the UNet (1 model_ema.* tensors)" in err
    # A single file has no tokenizer: it comes from --tokenizer, or the file has none and the user is told.
    # Without configs, the models are SD1.5's, and the files record them so.
    metadata = load_metadata_from_safetensors(tmp_path / "clip_text.safetensors")
    sd15_text_encoder = ModelConfig.of(CLIPTextEncoderL).to_metadata()
    if tokenizer:
        vocabulary, merges = sd15_folder / "tokenizer" / "vocab.json", sd15_folder / "tokenizer" / "merges.txt"
        assert metadata == CLIPTokenizer(vocabulary, merges).to_metadata() | sd15_text_encoder
    else:
        assert metadata == sd15_text_encoder
        assert "the source has no tokenizer" in err and "Pass --tokenizer" in err


def test_inpainting_unet_from_a_single_file(
    sd15_folder: Path, sd15_single_files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The UNet of the single file with a 9-channel first convolution, alone in its file (as `sd-v1-5-inpainting`).
    prefix = LDM_PREFIXES["unet"]
    unet = {
        key: tensor
        for key, tensor in TensorFile([sd15_single_files / "sd15.safetensors"]).items()
        if key.startswith(prefix)
    }
    conv_in = f"{prefix}input_blocks.0.0.weight"
    unet[conv_in] = torch.randn(320, 9, 3, 3, generator=torch.Generator().manual_seed(0)).half()
    source = tmp_path / "sd-v1-5-inpainting.safetensors"
    save_to_safetensors(source, unet)
    del unet
    dest = tmp_path / "unet.safetensors"
    assert main(["unet", "--from", str(source), "--to", str(dest), "--check"]) == 0
    err = capsys.readouterr().err
    assert "unet: inpainting UNet (9 input channels)" in err
    assert "for SD1UNet(in_channels=9)" in err
    (check,) = [line for line in err.splitlines() if "max abs difference" in line]
    assert check.endswith("ok")
    # The file fits SD1UNet(in_channels=9) exactly; everything but the first convolution is the text-to-image UNet's.
    inpainting = load_from_safetensors(dest)
    shapes = {key: tensor.shape for key, tensor in SD1UNet(in_channels=9, device="meta").state_dict().items()}
    assert {key: tensor.shape for key, tensor in inpainting.items()} == shapes
    text_to_image = TensorFile([sd15_single_files / "from_folder" / "unet.safetensors"])
    differing = [key for key, tensor in text_to_image.items() if not torch.equal(inpainting[key], tensor)]
    assert len(differing) == 1 and inpainting[differing[0]].shape == (320, 9, 3, 3)


# -- the Hugging Face Hub ---------------------------------------------------------------------------------------


@pytest.fixture
def hub(sd15_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """A fake Hub serving `org/sd15`: the text encoder as `model.bin`, the autoencoder only as an fp16 variant.

    `snapshot_download` copies the files that match `allow_patterns` into a cache folder, as the real one does;
    the returned list records each call's patterns.
    """
    repo = tmp_path / "repo"
    shutil.copytree(sd15_folder / "tokenizer", repo / "tokenizer")
    shutil.copy(sd15_folder / "model_index.json", repo)
    for component in ("unet", "vae", "text_encoder"):
        (repo / component).mkdir()
        shutil.copy(sd15_folder / component / "config.json", repo / component)
    text_encoder = load_from_safetensors(sd15_folder / COMPONENT_FILES["text_encoder"])
    torch.save(text_encoder, repo / "text_encoder" / "model.bin")
    vae = {k: v.half() for k, v in load_from_safetensors(sd15_folder / COMPONENT_FILES["vae"]).items()}
    save_to_safetensors(repo / "vae" / "diffusion_pytorch_model.fp16.safetensors", vae)
    calls: list[list[str]] = []

    def snapshot_download(repo_id: str, *, allow_patterns: list[str], **kwargs: Any) -> str:
        if repo_id != "org/sd15":
            raise OSError(
                f"404 Client Error: Repository Not Found for url: https://huggingface.co/api/models/{repo_id}"
            )
        calls.append(allow_patterns)
        cache = tmp_path / "cache"
        for file in repo.rglob("*"):
            name = file.relative_to(repo).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (cache / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, cache / name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_id_downloads_only_what_the_conversion_reads(
    sd15_folder: Path, hub: list[list[str]], tmp_path: Path
) -> None:
    dest = tmp_path / "clip_text.safetensors"
    assert main(["clip-text", "--from", "org/sd15", "--to", str(dest)]) == 0
    # The best layout first (model.safetensors), then the others in turn, down to the one the repo has.
    assert hub[0] == [
        "model_index.json",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer.json",  # transformers 5 saves this one alone
        "text_encoder/model.safetensors",
    ]
    assert [patterns[0] for patterns in hub[1:]] == [
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/model.safetensors.index.fp16.json",
        "text_encoder/model.bin",
    ]
    downloaded = sorted(path.relative_to(tmp_path / "cache").as_posix() for path in (tmp_path / "cache").rglob("*.*"))
    assert downloaded == [
        "model_index.json",
        "text_encoder/config.json",
        "text_encoder/model.bin",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
    ]
    expected = tmp_path / "from_folder.safetensors"
    convert_clip_text(sd15_folder, expected)
    assert_same_files(dest, expected)
    assert load_metadata_from_safetensors(dest) == load_metadata_from_safetensors(expected)


def test_hub_id_with_an_fp16_variant(sd15_folder: Path, hub: list[list[str]], tmp_path: Path) -> None:
    result = convert_autoencoder("org/sd15", tmp_path / "autoencoder.safetensors")
    assert len(hub) == 3 and hub[-1][0] == "vae/diffusion_pytorch_model.fp16.safetensors"
    assert result.source_dtype == result.dtype == torch.float16
    expected = tmp_path / "from_folder.safetensors"
    convert_autoencoder(sd15_folder, expected, dtype=torch.float16)
    assert_same_files(tmp_path / "autoencoder.safetensors", expected)


def test_tokenizer_from_the_hub(sd15_folder: Path, hub: list[list[str]], tmp_path: Path) -> None:
    # A text encoder file has no tokenizer: --tokenizer downloads only the tokenizer's files of a Hub repo.
    dest = tmp_path / "clip_text.safetensors"
    weights = sd15_folder / COMPONENT_FILES["text_encoder"]
    assert main(["clip-text", "--from", str(weights), "--to", str(dest), "--tokenizer", "org/sd15"]) == 0
    names = ["vocab.json", "merges.txt", "tokenizer.json"]
    assert hub == [[*names, *(f"tokenizer/{name}" for name in names)]]
    vocabulary, merges = sd15_folder / "tokenizer" / "vocab.json", sd15_folder / "tokenizer" / "merges.txt"
    expected = CLIPTokenizer(vocabulary, merges).to_metadata() | ModelConfig.of(CLIPTextEncoderL).to_metadata()
    assert load_metadata_from_safetensors(dest) == expected


def test_hub_errors(hub: list[list[str]], tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"org/missing is not a local file or folder, and downloading it .* 404"):
        convert_unet("org/missing", tmp_path / "unet.safetensors")
    with pytest.raises(SourceError, match=r"no such file or folder: \./no/such/folder \(nor is it a Hugging Face"):
        convert_unet("./no/such/folder", tmp_path / "unet.safetensors")


# -- file formats -----------------------------------------------------------------------------------------------


def small_tensors(seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layer.{n}.weight": torch.randn(4, 3, generator=generator) for n in range(4)}


def component_folder(root: Path, class_name: str = "AutoencoderKL") -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"_class_name": class_name}), encoding="utf-8")
    return root


def assert_reads(source: TensorFile, expected: dict[str, Tensor]) -> None:
    assert sorted(source) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(source[key], tensor) and source.shape(key) == tuple(tensor.shape)


def test_weights_files_by_preference(tmp_path: Path) -> None:
    tensors, half = small_tensors(), {k: v.half() for k, v in small_tensors(1).items()}
    folder = component_folder(tmp_path / "vae")
    torch.save(tensors, folder / "diffusion_pytorch_model.bin")
    assert_reads(DiffusersFolder(folder).tensors("vae"), tensors)
    save_to_safetensors(folder / "diffusion_pytorch_model.fp16.safetensors", half)
    assert_reads(DiffusersFolder(folder).tensors("vae"), half)
    save_to_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors)
    assert DiffusersFolder(folder).weight_files("vae") == [folder / "diffusion_pytorch_model.safetensors"]


def test_sharded_weights(tmp_path: Path) -> None:
    tensors = small_tensors()
    folder = component_folder(tmp_path / "vae")
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": ["layer.0.weight", "layer.1.weight"]}
    shards["diffusion_pytorch_model-00002-of-00002.safetensors"] = ["layer.2.weight", "layer.3.weight"]
    for name, keys in shards.items():
        save_to_safetensors(folder / name, {key: tensors[key] for key in keys})
    weight_map = {key: name for name, keys in shards.items() for key in keys}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    assert_reads(DiffusersFolder(folder).tensors("vae"), tensors)
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SourceError, match=r"lists shards that are missing: .*00002-of-00002.safetensors"):
        DiffusersFolder(folder).tensors("vae")


class NotATensor:
    pass


def test_pickled_checkpoints(tmp_path: Path) -> None:
    tensors = small_tensors()
    torch.save({"state_dict": tensors, "global_step": 10}, tmp_path / "nested.ckpt")
    assert_reads(TensorFile([tmp_path / "nested.ckpt"]), tensors)
    # Saved by PyTorch < 1.6 (not a zip archive, which cannot be memory-mapped).
    torch.save({"state_dict": tensors}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    assert_reads(TensorFile([tmp_path / "legacy.ckpt"]), tensors)
    torch.save({"weights": tensors, "optimizer": NotATensor()}, tmp_path / "unsafe.ckpt")
    with pytest.raises(SourceError, match=r"unsafe.ckpt cannot be loaded safely: it pickles Python objects"):
        TensorFile([tmp_path / "unsafe.ckpt"])
    torch.save(list(tensors.values()), tmp_path / "list.pt")
    with pytest.raises(SourceError, match=r"list.pt holds a list, not a state dict"):
        TensorFile([tmp_path / "list.pt"])
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SourceError, match=r"broken.ckpt is not a readable PyTorch checkpoint"):
        TensorFile([tmp_path / "broken.ckpt"])


def test_unsupported_paths(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match=r"notes.txt is not a checkpoint file: expected one of .safetensors"):
        open_source(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty is not a diffusers folder: it has neither model_index.json"):
        convert_unet(tmp_path / "empty", tmp_path / "unet.safetensors")
    vae = component_folder(tmp_path / "vae")
    with pytest.raises(SourceError, match=r"vae is the folder of AutoencoderKL, not of the unet"):
        convert_unet(vae, tmp_path / "unet.safetensors")
    with pytest.raises(SourceError, match=r"vae has no weights: expected diffusion_pytorch_model.safetensors"):
        convert_autoencoder(vae, tmp_path / "vae.safetensors")


# -- not an SD1.5 model -----------------------------------------------------------------------------------------


def diffusers_folder(root: Path, index: dict[str, Any], configs: dict[str, dict[str, Any]]) -> Path:
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    for component, config in configs.items():
        (root / component).mkdir()
        (root / component / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


SD_INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}


def test_missing_component(tmp_path: Path) -> None:
    folder = diffusers_folder(tmp_path / "sd", SD_INDEX | {"vae": []}, {"vae": {"_class_name": "AutoencoderKL"}})
    with pytest.raises(
        SourceError, match=r"sd has no unet/ folder, .* model_index.json lists unet, vae; the folder has vae"
    ):
        convert_unet(folder, tmp_path / "unet.safetensors")
    with pytest.raises(SourceError, match=r"has no unet/ folder"):
        convert_stable_diffusion_1(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_architectures_in_diffusers_folders(tmp_path: Path) -> None:
    unet = {"_class_name": "UNet2DConditionModel"}
    cases = [
        (
            {"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": []},
            {},
            "Stable Diffusion XL: StableDiffusionXLPipeline has a second text encoder",
        ),
        (
            SD_INDEX,
            {"unet": unet | {"cross_attention_dim": 1024}},
            "Stable Diffusion 2.x: its UNet attends to 1024-wide",
        ),
        (SD_INDEX, {"text_encoder": {"architectures": ["CLIPTextModel"], "hidden_size": 1024}}, "Stable Diffusion 2.x"),
        (SD_INDEX, {"unet": unet | {"in_channels": 8, "cross_attention_dim": 768}}, "InstructPix2Pix"),
    ]
    for n, (index, configs, message) in enumerate(cases):
        folder = diffusers_folder(tmp_path / f"model_{n}", index, configs)
        with pytest.raises(
            ConversionError, match=rf"model_{n} is not a Stable Diffusion 1.x model: it looks like {message}"
        ):
            convert_autoencoder(folder, tmp_path / "vae.safetensors")


def test_other_architectures_in_single_files(tmp_path: Path) -> None:
    unet = LDM_PREFIXES["unet"]
    conv_in = {f"{unet}input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}
    attention = f"{unet}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    cases = [
        (conv_in | {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}, "Stable Diffusion XL"),
        (
            conv_in | {"cond_stage_model.model.ln_final.weight": torch.zeros(4)},
            "Stable Diffusion 2.x: its text encoder",
        ),
        (conv_in | {attention: torch.zeros(320, 1024)}, "Stable Diffusion 2.x: its UNet attends to 1024-wide"),
        (
            {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 2048)},
            "Stable Diffusion XL",
        ),
        ({f"{unet}input_blocks.0.0.weight": torch.zeros(320, 8, 3, 3)}, "InstructPix2Pix"),
    ]
    for n, (tensors, message) in enumerate(cases):
        path = tmp_path / f"model_{n}.safetensors"
        save_to_safetensors(path, tensors)
        with pytest.raises(
            ConversionError,
            match=rf"model_{n}.safetensors is not a Stable Diffusion 1.x model: it looks like {message}",
        ):
            convert_unet(path, tmp_path / "unet.safetensors")


def test_single_files_without_the_component(tmp_path: Path) -> None:
    vae_only = tmp_path / "vae_only.safetensors"
    save_to_safetensors(vae_only, {"first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)})
    with pytest.raises(
        SourceError, match=r"has no UNet: no key starts with model.diffusion_model. \(it has first_stage_model.\*\)"
    ):
        convert_unet(vae_only, tmp_path / "unet.safetensors")
    diffusers_vae = tmp_path / "diffusers_vae.safetensors"
    save_to_safetensors(diffusers_vae, {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)})
    with pytest.raises(
        SourceError,
        match=r"is not the UNet of a Stable Diffusion 1.x model: it holds the weights of a diffusers autoencoder",
    ):
        convert_unet(diffusers_vae, tmp_path / "unet.safetensors")
    with pytest.raises(SourceError, match=r"holds one component's weights in diffusers layout, not a whole model"):
        convert_stable_diffusion_1(diffusers_vae, tmp_path / "out")
    # A whole-model conversion checks every component before writing anything.
    unet_only = tmp_path / "unet_only.safetensors"
    save_to_safetensors(unet_only, {f"{LDM_PREFIXES['unet']}input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)})
    with pytest.raises(SourceError, match=r"has no autoencoder: no key starts with first_stage_model\."):
        convert_stable_diffusion_1(unet_only, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stray_keys_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "with_lora.safetensors"
    tensors = {f"{LDM_PREFIXES['unet']}input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}
    tensors |= {"lora_unet_down_blocks_0.alpha": torch.tensor(1.0), "betas": torch.zeros(10)}
    save_to_safetensors(path, tensors)
    with pytest.raises(
        ConversionError,
        match=r"has 1 keys that belong to no Stable Diffusion 1.x component .*: lora_unet_down_blocks_0.alpha\. ",
    ):
        convert_unet(path, tmp_path / "unet.safetensors")


@pytest.fixture(scope="module")
def text_encoder(sd15_folder: Path) -> dict[str, Tensor]:
    return load_from_safetensors(sd15_folder / COMPONENT_FILES["text_encoder"])


def test_keys_and_shapes_that_do_not_fit(text_encoder: dict[str, Tensor], tmp_path: Path) -> None:
    stray = tmp_path / "stray.safetensors"
    save_to_safetensors(stray, text_encoder | {"text_model.encoder.layers.12.mlp.fc1.bias": torch.zeros(3072)})
    with pytest.raises(
        ConversionError,
        match=r"(?s)source keys that nothing in the target uses, 1:\n  text_model.encoder.layers.12.mlp.fc1.bias",
    ):
        convert_clip_text(stray, tmp_path / "clip.safetensors")

    wrong = tmp_path / "wrong.safetensors"
    position = "text_model.embeddings.position_embedding.weight"
    save_to_safetensors(wrong, text_encoder | {position: text_encoder[position][:76].clone()})
    with pytest.raises(
        ConversionError,
        match=rf"(?s)shapes do not fit, 1:\n  {position} \(76, 768\) -> Sum.PositionalEncoder.weight \(77, 768\)",
    ):
        convert_clip_text(wrong, tmp_path / "clip.safetensors")

    # Errors name the keys as the checkpoint has them, in the original layout too.
    original = tmp_path / "original.safetensors"
    tensors = {f"cond_stage_model.transformer.{k}": v for k, v in text_encoder.items() if "layers.3.mlp.fc1" not in k}
    save_to_safetensors(original, tensors)
    with pytest.raises(
        ConversionError, match=r"(?s)lacks, 2:\n  cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.bias"
    ):
        convert_clip_text(original, tmp_path / "clip.safetensors")
    assert not (tmp_path / "clip.safetensors").exists()


def test_text_encoder_keys_without_text_model(text_encoder: dict[str, Tensor], tmp_path: Path) -> None:
    # Checkpoints saved with older transformers name the keys `cond_stage_model.transformer.embeddings...`.
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_to_safetensors(
        old, {f"cond_stage_model.transformer.{k.removeprefix('text_model.')}": v for k, v in text_encoder.items()}
    )
    save_to_safetensors(new, {f"cond_stage_model.transformer.{k}": v for k, v in text_encoder.items()})
    convert_clip_text(old, tmp_path / "old_clip.safetensors")
    convert_clip_text(new, tmp_path / "new_clip.safetensors")
    assert_same_files(tmp_path / "old_clip.safetensors", tmp_path / "new_clip.safetensors")
