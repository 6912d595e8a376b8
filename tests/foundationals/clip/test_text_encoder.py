"""CLIPTextEncoder L, H and G compute what transformers' CLIP text models compute, on weights converted from them.

Each reference is built from its real config (SD1.5 `text_encoder/`, SD2 `text_encoder/`, SDXL `text_encoder_2/`)
with random weights, saved with `save_pretrained` as a download would look, converted with the transformers key map
and loaded into our encoder. CLIP-L runs at full size; H and G keep their real widths with 2 layers (their full
depth is checked on the "meta" device, where the converter compares every shape without allocating).
"""

import gc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import Tensor
from torch.testing import assert_close
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
)

import refiners.fluxion.layers as fl
from refiners.converters.clip_text import convert_transformers_clip_text
from refiners.converters.engine import ConversionError
from refiners.converters.reference_check import SD15_TEXT_ENCODER_CONFIG
from refiners.fluxion.utils import load_from_safetensors, save_to_safetensors
from refiners.foundationals.clip import (
    CLIPTextEncoder,
    CLIPTextEncoderG,
    CLIPTextEncoderH,
    CLIPTextEncoderL,
    CLIPTokenizer,
    TextEncoderWithPooling,
)

# stabilityai/stable-diffusion-2-1, text_encoder/config.json: OpenCLIP ViT-H, its 24th layer left out.
SD2_TEXT_ENCODER_CONFIG: dict[str, Any] = SD15_TEXT_ENCODER_CONFIG | {
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}
# stabilityai/stable-diffusion-xl-base-1.0, text_encoder_2/config.json (a CLIPTextModelWithProjection).
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = SD15_TEXT_ENCODER_CONFIG | {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

START_OF_TEXT, END_OF_TEXT = 49406, 49407
# Relative to the output's scale: atol = RELATIVE_ATOL * max |reference|.
RELATIVE_ATOL = 1e-4

SHORT_PROMPT = "A photo of an astronaut riding a horse on Mars"
LONG_PROMPT = ", ".join(["a cozy cabin in the snowy mountains at night, warm light glowing through the windows"] * 6)


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    assert_close(actual, expected, atol=RELATIVE_ATOL * expected.abs().max().item(), rtol=0)


def randomize(model: torch.nn.Module) -> None:
    """Perturb every weight: LayerNorms at ones and biases at zeros would hide a swapped or ignored tensor."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)


def token_ids(pad_token_id: int, generator: torch.Generator) -> Tensor:
    """Two sequences as a tokenizer makes them: start, tokens, end, padding; a short one and a long one."""
    ids = torch.full((2, 77), pad_token_id, dtype=torch.int64)
    for row, length in enumerate((8, 60)):
        ids[row, 0] = START_OF_TEXT
        ids[row, 1 : length + 1] = torch.randint(0, START_OF_TEXT, (length,), generator=generator)
        ids[row, length + 1] = END_OF_TEXT
    return ids


def shallow_config(config: dict[str, Any], num_layers: int) -> CLIPTextConfig:
    """A real config with fewer layers: every width stays real."""
    shallow: dict[str, Any] = {**config, "num_hidden_layers": num_layers}
    return CLIPTextConfig(**shallow)


def with_num_layers(preset: CLIPTextEncoder, num_layers: int) -> CLIPTextEncoder:
    """The preset's architecture (real widths, heads, activation) with fewer layers, to run fast."""
    return CLIPTextEncoder(
        embedding_dim=preset.embedding_dim,
        max_sequence_length=preset.max_sequence_length,
        vocabulary_size=preset.vocabulary_size,
        num_layers=num_layers,
        num_attention_heads=preset.num_attention_heads,
        feedforward_dim=preset.feedforward_dim,
        layer_norm_eps=preset.layer_norm_eps,
        gelu_approximation=preset.gelu_approximation,
    )


def tiny_encoder(tokenizer: CLIPTokenizer | None = None) -> CLIPTextEncoder:
    return CLIPTextEncoder(
        embedding_dim=32, num_layers=2, num_attention_heads=2, feedforward_dim=64, tokenizer=tokenizer
    )


# -- CLIP-L (SD1.5), full size ----------------------------------------------------------------------------------


@dataclass
class SD15:
    encoder: CLIPTextEncoderL
    ids: Tensor
    last_hidden_state: Tensor
    penultimate_hidden_state: Tensor
    text_hidden_state: Tensor  # for [SHORT_PROMPT, LONG_PROMPT], tokenized by transformers


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory, clip_tokenizer_folder: Path) -> SD15:
    torch.manual_seed(0)
    reference = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)).eval()
    randomize(reference)
    folder = tmp_path_factory.mktemp("sd15") / "text_encoder"
    reference.save_pretrained(folder)
    weights = folder / "model.safetensors"
    # The file on the Hub has the `text_model.` prefix and the `position_ids` buffer (transformers < 4.31 saved
    # both; transformers 5 saves neither): make the saved file look like that download.
    hub_layout = {f"text_model.{key}": tensor for key, tensor in load_from_safetensors(weights).items()}
    hub_layout["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_to_safetensors(weights, hub_layout)
    del hub_layout

    generator = torch.Generator().manual_seed(0)
    ids = token_ids(pad_token_id=END_OF_TEXT, generator=generator)
    hf_tokenizer: Any = transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_folder)
    text_ids = hf_tokenizer(
        [SHORT_PROMPT, LONG_PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        expected_text = reference(text_ids).last_hidden_state
    del reference
    gc.collect()

    # The converter's output, saved with the vocabulary in the metadata, loaded into a model built on "meta".
    tokenizer = CLIPTokenizer(clip_tokenizer_folder / "vocab.json", clip_tokenizer_folder / "merges.txt")
    converted_path = tmp_path_factory.mktemp("converted") / "CLIPTextEncoderL.safetensors"
    converted = convert_transformers_clip_text(load_from_safetensors(weights), CLIPTextEncoderL(device="meta"))
    save_to_safetensors(converted_path, converted, metadata=tokenizer.to_metadata())
    del converted
    encoder = CLIPTextEncoderL(device="meta").load_from_safetensors(converted_path)
    return SD15(
        encoder=encoder,
        ids=ids,
        last_hidden_state=expected.last_hidden_state,
        penultimate_hidden_state=expected.hidden_states[-2],
        text_hidden_state=expected_text,
    )


@torch.no_grad()
def test_sd15_last_hidden_state(sd15: SD15) -> None:
    assert all(tensor.device.type == "cpu" for tensor in sd15.encoder.state_dict().values())
    # With its tokenizer the encoder takes text: the copy without it (sharing the weights) takes ids.
    assert_matches(sd15.encoder[1:](sd15.ids), sd15.last_hidden_state)


@torch.no_grad()
def test_sd15_penultimate_hidden_state(sd15: SD15) -> None:
    penultimate = sd15.encoder[1:].with_penultimate_output()
    assert len(list(penultimate.layers(fl.LayerNorm))) == 2 * 11
    assert_matches(penultimate(sd15.ids), sd15.penultimate_hidden_state)


@torch.no_grad()
def test_sd15_encodes_text_with_the_tokenizer_from_the_metadata(sd15: SD15) -> None:
    tokenizer = sd15.encoder.tokenizer
    assert tokenizer is not None and sd15.encoder[0] is tokenizer
    assert tokenizer.pad_token_id == tokenizer.end_of_text_token_id  # SD1.5 pads with the end-of-text token
    with pytest.warns(UserWarning, match=r"\d+ tokens.*takes 77"):
        hidden_state = sd15.encoder([SHORT_PROMPT, LONG_PROMPT])
    assert hidden_state.shape == (2, 77, 768)
    assert_matches(hidden_state, sd15.text_hidden_state)


# -- CLIP-H (SD2) and CLIP-G (SDXL): real widths, 2 layers --------------------------------------------------------


@torch.no_grad()
def test_sd2_text_encoder_h(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = CLIPTextModel(shallow_config(SD2_TEXT_ENCODER_CONFIG, num_layers=2)).eval()
    randomize(reference)
    reference.save_pretrained(tmp_path)  # transformers 5 layout: no `text_model.` prefix
    encoder = with_num_layers(CLIPTextEncoderH(device="meta"), num_layers=2)
    encoder.load_state_dict(
        convert_transformers_clip_text(load_from_safetensors(tmp_path / "model.safetensors"), encoder)
    )

    ids = token_ids(pad_token_id=0, generator=torch.Generator().manual_seed(1))  # SD2 pads with "!" (id 0)
    expected = reference(ids, output_hidden_states=True)
    assert_matches(encoder(ids), expected.last_hidden_state)
    assert_matches(encoder.with_penultimate_output()(ids), expected.hidden_states[-2])


@torch.no_grad()
def test_sdxl_text_encoder_g_with_pooling(tmp_path: Path) -> None:
    torch.manual_seed(2)
    config = shallow_config(SDXL_TEXT_ENCODER_2_CONFIG, num_layers=2)
    reference = CLIPTextModelWithProjection(config).eval()
    randomize(reference)
    reference.save_pretrained(tmp_path)
    encoder = with_num_layers(CLIPTextEncoderG(device="meta"), num_layers=2)
    keys_before = list(encoder.state_dict())
    pooling = TextEncoderWithPooling(encoder).inject()
    source = load_from_safetensors(tmp_path / "model.safetensors")
    assert "text_projection.weight" in source
    encoder.load_state_dict(convert_transformers_clip_text(source, encoder))

    ids = token_ids(pad_token_id=0, generator=torch.Generator().manual_seed(2))  # SDXL pads with "!" (id 0)
    # Padded with the end-of-text token, as SD1.5's tokenizer pads: the pooling must pick the first one.
    ids[1, 62:] = END_OF_TEXT
    expected = reference(ids, output_hidden_states=True)
    penultimate, pooled = encoder(ids)
    assert pooled.shape == (2, 1280)
    assert_matches(penultimate, expected.hidden_states[-2])
    assert_matches(pooled, expected.text_embeds)

    pooling.eject()
    assert list(encoder.state_dict()) == keys_before
    assert_matches(encoder(ids), expected.last_hidden_state)


@pytest.mark.parametrize(
    ("preset", "config", "reference_class"),
    [
        (CLIPTextEncoderL, SD15_TEXT_ENCODER_CONFIG, CLIPTextModel),
        (CLIPTextEncoderH, SD2_TEXT_ENCODER_CONFIG, CLIPTextModel),
        (CLIPTextEncoderG, SDXL_TEXT_ENCODER_2_CONFIG, CLIPTextModelWithProjection),
    ],
)
def test_presets_build_on_meta_with_the_shapes_of_the_real_checkpoints(
    preset: type[CLIPTextEncoder],
    config: dict[str, Any],
    reference_class: type[CLIPTextModel | CLIPTextModelWithProjection],
) -> None:
    encoder = preset(device="meta")
    assert all(tensor.device.type == "meta" for tensor in encoder.state_dict().values())
    if reference_class is CLIPTextModelWithProjection:
        TextEncoderWithPooling(encoder).inject()
    with torch.device("meta"):
        reference = reference_class(CLIPTextConfig(**config))
    # Every key and shape of the full-size checkpoint fits, or the converter raises.
    converted = convert_transformers_clip_text(reference.state_dict(), encoder)
    assert len(converted) == len(encoder.state_dict())


# -- errors ------------------------------------------------------------------------------------------------------


def test_a_checkpoint_that_is_not_a_clip_text_model_is_refused_with_its_keys() -> None:
    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    source = CLIPVisionModel(vision_config).state_dict()
    with pytest.raises(ConversionError, match="does not fit the target model") as error:
        convert_transformers_clip_text(source, CLIPTextEncoderL(device="meta"))
    message = str(error.value)
    assert "source keys that nothing in the target uses" in message
    assert "embeddings.patch_embedding.weight" in message and "embeddings.class_embedding" in message
    assert "target weights left unfilled" in message and "Sum.TokenEncoder.weight" in message


def test_the_projection_needs_the_pooling_adapter() -> None:
    with torch.device("meta"):
        source = CLIPTextModelWithProjection(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)).state_dict()
    with pytest.raises(ConversionError, match=re.escape("text_projection.weight")):
        convert_transformers_clip_text(source, CLIPTextEncoderL(device="meta"))


def test_text_without_a_tokenizer_says_how_to_get_one() -> None:
    with pytest.raises(fl.ChainError, match=r"no tokenizer.*load_from_safetensors.*tokenizer=CLIPTokenizer"):
        tiny_encoder()("a photo of a cat")


def test_bad_token_ids_are_refused() -> None:
    encoder = tiny_encoder()
    with pytest.raises(fl.ChainError, match="integer tensor"):
        encoder(torch.zeros(1, 77))
    with pytest.raises(fl.ChainError, match="78 positions but the model has embeddings for 77"):
        encoder(torch.zeros(1, 78, dtype=torch.int64))


def test_a_tokenizer_longer_than_the_position_embeddings_is_refused(clip_tokenizer_folder: Path) -> None:
    tokenizer = CLIPTokenizer(
        clip_tokenizer_folder / "vocab.json", clip_tokenizer_folder / "merges.txt", sequence_length=100
    )
    with pytest.raises(ValueError, match="build the tokenizer with sequence_length=77"):
        tiny_encoder(tokenizer)


def test_structural_edits_refuse_an_encoder_with_pooling() -> None:
    encoder = tiny_encoder()
    TextEncoderWithPooling(encoder).inject()
    with pytest.raises(ValueError, match="eject the adapters"):
        encoder.with_penultimate_output()
    with pytest.raises(ValueError, match="is pooling already injected"):
        TextEncoderWithPooling(encoder)


def test_pooling_docstring_example_runs() -> None:
    docstring = TextEncoderWithPooling.__doc__
    assert docstring is not None
    (example,) = re.findall(r"```py\n(.*?)```", docstring, flags=re.DOTALL)
    lines = example.splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    exec("\n".join(line[indent:] for line in lines), {})
