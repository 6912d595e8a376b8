"""Parity of `CLIPTokenizer` with transformers' `CLIPTokenizer` on the same `vocab.json` and `merges.txt`.

Ids are integers: every comparison is exact (`assert_close` with `rtol=0, atol=0`, or list equality).
"""

import json
import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from refiners.foundationals.clip import CLIPTokenizer

LONG_PROMPT = (
    "A photo of an astronaut riding a horse on Mars, highly detailed, digital art, trending on artstation. "
    "A cozy cabin in the snowy mountains at night, warm light glowing through the windows, cinematic lighting. "
    "Portrait of an old fisherman with a gray beard, wrinkled skin, dramatic shadows, oil painting by a master. "
    "An unseen quixotic zephyr whirls over the xylophonist's kaleidoscopic bazaar, 1987-2024."
)

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT Riding A HoRsE",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand  repeated     spaces\u00a0nbsp\u3000ideographic\u2028line\x85next",
    "file\x1cseparator\x1funit \x00 null and \x7f delete",
    "café crème brûlée, naïve façade, déjà vu",
    "cafe\u0301 (decomposed accent) vs café",
    "Ein schöner Garten, STRASSE ß ẞ, ¿Dónde está la biblioteca? ¡Qué bonito!",
    "ΟΔΟΣ ΣΊΣΥΦΟΣ İstanbul ﬁne ligature",
    "東京の夜景 ラーメン屋 北京烤鸭 서울의 밤 未知の文字列",
    "emoji 🚀🔥 launch, 👩‍👩‍👧 family, ❤️ love, 🦄 unseen",
    "it's they're we've I'm you'll he'd don't IT'S THEY'RE",
    "'s 'tis rock'n'roll o'clock ''quoted'' 'rex",
    "numbers 1234 and 3.14159, 1e-5, 50%, $20, #1, Ⅻ ½ ٣",
    "punctuation!!! ??? ... --- (brackets) [x] {y} <z> @#$%^&* a+b=c",
    "a (masterpiece:1.2) [[best quality]], (((ultra detailed)))",
    "zxqv blorptastic unseenwordery flibbertigibbet",
    "<|startoftext|>special tokens<|endoftext|> in the <|endoftext|>middle",
    "abc<|endoftext|>def <|ENDOFTEXT|> <|startoftext",
    "",
    " \t\n ",
    LONG_PROMPT,
    LONG_PROMPT.upper() + " 東京の夜景 🚀",
]


@pytest.fixture(scope="module")
def reference(clip_tokenizer_folder: Path) -> transformers.CLIPTokenizer:
    return transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_folder)


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer(clip_tokenizer_folder / "vocab.json", clip_tokenizer_folder / "merges.txt")


def reference_ids(reference: transformers.CLIPTokenizer, prompts: list[str], sequence_length: int = 77) -> torch.Tensor:
    encoding = reference(
        prompts, padding="max_length", max_length=sequence_length, truncation=True, return_tensors="pt"
    )
    return encoding.input_ids


def forward_quietly(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The prompt has")
        return tokenizer(prompts)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_matches_transformers(
    tokenizer: CLIPTokenizer, reference: transformers.CLIPTokenizer, prompt: str
) -> None:
    assert tokenizer.encode(prompt) == reference(prompt).input_ids


def test_vocabulary_is_realistic(tokenizer: CLIPTokenizer, reference: transformers.CLIPTokenizer) -> None:
    # Guards the fixture: prompts must exercise merges, unseen words and multi-byte characters, not just bytes.
    assert len(reference) == 512 + 2000 + 2
    assert reference.convert_ids_to_tokens(reference("astronaut").input_ids) == [
        "<|startoftext|>",
        "astronaut</w>",
        "<|endoftext|>",
    ]
    assert len(reference("flibbertigibbet").input_ids) > 4
    assert tokenizer.encode("astronaut flibbertigibbet") == reference("astronaut flibbertigibbet").input_ids


def test_forward_matches_transformers_padded_and_truncated(
    tokenizer: CLIPTokenizer, reference: transformers.CLIPTokenizer
) -> None:
    assert len(reference(LONG_PROMPT).input_ids) > 77
    with pytest.warns(UserWarning, match=r"The prompt has \d+ tokens .* the text encoder takes 77: dropping its last"):
        ids = tokenizer(PROMPTS)
    assert ids.dtype == torch.int64
    torch.testing.assert_close(ids, reference_ids(reference, PROMPTS), rtol=0, atol=0)


def test_forward_single_prompt(tokenizer: CLIPTokenizer, reference: transformers.CLIPTokenizer) -> None:
    prompt = "a cozy cabin in the snowy mountains"
    torch.testing.assert_close(tokenizer(prompt), reference_ids(reference, [prompt]), rtol=0, atol=0)
    assert tokenizer([]).shape == (0, 77)


def test_truncation_boundary(tokenizer: CLIPTokenizer, reference: transformers.CLIPTokenizer) -> None:
    fits, overflows = "horse " * 75, "horse " * 76
    assert len(reference(fits).input_ids) == 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(tokenizer(fits), reference_ids(reference, [fits]), rtol=0, atol=0)
    with pytest.warns(
        UserWarning, match=r"The prompt has 78 tokens \(start and end included\) .* takes 77: .* last 1\."
    ):
        ids = tokenizer(overflows)
    torch.testing.assert_close(ids, reference_ids(reference, [overflows]), rtol=0, atol=0)


def test_sequence_length(clip_tokenizer_folder: Path, reference: transformers.CLIPTokenizer) -> None:
    tokenizer = CLIPTokenizer(
        clip_tokenizer_folder / "vocab.json", clip_tokenizer_folder / "merges.txt", sequence_length=8
    )
    ids = forward_quietly(tokenizer, PROMPTS)
    torch.testing.assert_close(ids, reference_ids(reference, PROMPTS, sequence_length=8), rtol=0, atol=0)


def test_pad_token_id(clip_tokenizer_folder: Path, reference: transformers.CLIPTokenizer) -> None:
    # OpenCLIP-G (SDXL) pads with `!`, id 0.
    pad_reference = transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_folder, pad_token="!")
    tokenizer = CLIPTokenizer(
        clip_tokenizer_folder / "vocab.json", clip_tokenizer_folder / "merges.txt", pad_token_id=0
    )
    assert pad_reference.pad_token_id == 0

    plain = [prompt for prompt in PROMPTS if "!" not in prompt]
    torch.testing.assert_close(forward_quietly(tokenizer, plain), reference_ids(pad_reference, plain), rtol=0, atol=0)

    # transformers also reads each `!` of a prompt as its pad token; we keep OpenCLIP's reading, that of the
    # tokenizer whose pad is `<|endoftext|>`, and only pad with 0.
    exclaiming = [prompt for prompt in PROMPTS if "!" in prompt]
    encoding = reference(exclaiming, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    expected = encoding.input_ids.masked_fill(encoding.attention_mask == 0, 0)
    torch.testing.assert_close(forward_quietly(tokenizer, exclaiming), expected, rtol=0, atol=0)


def read_tokenizer_folder(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocabulary = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    return vocabulary, [(first, second) for first, second in (line.split(" ") for line in lines)]


def test_from_vocabulary(clip_tokenizer_folder: Path, reference: transformers.CLIPTokenizer) -> None:
    vocabulary, merges = read_tokenizer_folder(clip_tokenizer_folder)
    tokenizer = CLIPTokenizer.from_vocabulary(vocabulary, merges)
    torch.testing.assert_close(forward_quietly(tokenizer, PROMPTS), reference_ids(reference, PROMPTS), rtol=0, atol=0)


def test_special_token_ids_without_special_tokens_in_vocabulary(
    clip_tokenizer_folder: Path, reference: transformers.CLIPTokenizer
) -> None:
    vocabulary, merges = read_tokenizer_folder(clip_tokenizer_folder)
    start, end = vocabulary.pop("<|startoftext|>"), vocabulary.pop("<|endoftext|>")
    default = CLIPTokenizer.from_vocabulary(vocabulary, merges)
    assert (default.start_of_text_token_id, default.end_of_text_token_id, default.pad_token_id) == (49406, 49407, 49407)

    tokenizer = CLIPTokenizer.from_vocabulary(
        vocabulary, merges, start_of_text_token_id=5000, end_of_text_token_id=5001
    )
    prompts = [prompt for prompt in PROMPTS if "<|" not in prompt]
    expected = reference_ids(reference, prompts)
    expected = expected.masked_fill(expected == start, 5000)
    expected = expected.masked_fill(expected == end, 5001)
    torch.testing.assert_close(forward_quietly(tokenizer, prompts), expected, rtol=0, atol=0)


def test_metadata_round_trip_through_safetensors(
    clip_tokenizer_folder: Path, tmp_path: Path, reference: transformers.CLIPTokenizer
) -> None:
    pad_reference = transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_folder, pad_token="!")
    source = CLIPTokenizer(
        clip_tokenizer_folder / "vocab.json", clip_tokenizer_folder / "merges.txt", sequence_length=8, pad_token_id=0
    )
    checkpoint = tmp_path / "text_encoder.safetensors"
    save_file({"weight": torch.zeros(1)}, checkpoint, metadata={"format": "refiners"} | source.to_metadata())
    with safe_open(checkpoint, framework="pt") as file:  # pyright: ignore[reportUnknownVariableType]
        metadata: dict[str, str] = file.metadata()  # pyright: ignore[reportUnknownMemberType]

    tokenizer = CLIPTokenizer.from_metadata(metadata)
    assert (tokenizer.sequence_length, tokenizer.pad_token_id) == (8, 0)
    plain = [prompt for prompt in PROMPTS if "!" not in prompt]
    expected = reference_ids(pad_reference, plain, sequence_length=8)
    torch.testing.assert_close(forward_quietly(tokenizer, plain), expected, rtol=0, atol=0)


def test_repr(tokenizer: CLIPTokenizer) -> None:
    assert str(tokenizer) == "CLIPTokenizer(start_of_text_token_id=2512, end_of_text_token_id=2513, pad_token_id=2513)"


def test_docstring_example_runs(clip_tokenizer_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docstring = CLIPTokenizer.__doc__
    assert docstring is not None
    (example,) = re.findall(r"```py\n(.*?)```", docstring, flags=re.DOTALL)
    monkeypatch.chdir(clip_tokenizer_folder.parent)
    exec(textwrap.dedent(example), {})


# -- errors ---------------------------------------------------------------------------------------------------------


def test_missing_files(clip_tokenizer_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"No CLIP vocabulary at .*missing\.json: pass the `vocab\.json`"):
        CLIPTokenizer(tmp_path / "missing.json", clip_tokenizer_folder / "merges.txt")
    with pytest.raises(FileNotFoundError, match=r"No BPE merges at .*missing\.txt: pass the `merges\.txt`"):
        CLIPTokenizer(clip_tokenizer_folder / "vocab.json", tmp_path / "missing.txt")


def test_invalid_vocabulary_file(clip_tokenizer_folder: Path, tmp_path: Path) -> None:
    merges = clip_tokenizer_folder / "merges.txt"
    (path := tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json is not a JSON vocabulary .* pass the model's `vocab\.json`"):
        CLIPTokenizer(path, merges)
    path.write_text('["a", "b"]', encoding="utf-8")
    with pytest.raises(ValueError, match="must be a JSON object from token to integer id"):
        CLIPTokenizer(path, merges)
    path.write_text('{"a": "1"}', encoding="utf-8")
    with pytest.raises(ValueError, match="must be a JSON object from token to integer id"):
        CLIPTokenizer(path, merges)


def test_invalid_merges_file(clip_tokenizer_folder: Path, tmp_path: Path) -> None:
    vocabulary = clip_tokenizer_folder / "vocab.json"
    (path := tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nthree parts here\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"Line 3 of .*merges\.txt is not a merge \(`first second`\): 'three parts here'"
    ):
        CLIPTokenizer(vocabulary, path)
    path.write_text("#version: 0.2\ni n\nq jx\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"Merge 2 \(q jx\) uses tokens absent from the vocabulary: 'jx', 'qjx'"):
        CLIPTokenizer(vocabulary, path)


def test_vocabulary_without_byte_symbols(clip_tokenizer_folder: Path) -> None:
    vocabulary, merges = read_tokenizer_folder(clip_tokenizer_folder)
    del vocabulary["a"], vocabulary["Ġ</w>"]
    with pytest.raises(ValueError, match=r"lacks 2 of the 512 byte symbols .* \(e\.g\. 'a', 'Ġ</w>'\)"):
        CLIPTokenizer.from_vocabulary(vocabulary, merges)


def test_invalid_settings(clip_tokenizer_folder: Path) -> None:
    vocabulary, merges = read_tokenizer_folder(clip_tokenizer_folder)
    with pytest.raises(ValueError, match=r"The vocabulary gives <\|startoftext\|> the id 2512 but 49406 was passed"):
        CLIPTokenizer.from_vocabulary(vocabulary, merges, start_of_text_token_id=49406)
    with pytest.raises(ValueError, match="sequence_length must be at least 2"):
        CLIPTokenizer.from_vocabulary(vocabulary, merges, sequence_length=1)


def test_invalid_metadata(tokenizer: CLIPTokenizer) -> None:
    metadata = tokenizer.to_metadata()
    with pytest.raises(ValueError, match=r"The metadata has no CLIP tokenizer: clip_tokenizer\.vocabulary, .* missing"):
        CLIPTokenizer.from_metadata({"format": "pt"})
    with pytest.raises(ValueError, match=r"Unknown CLIP tokenizer metadata: clip_tokenizer\.lowercase"):
        CLIPTokenizer.from_metadata(metadata | {"clip_tokenizer.lowercase": "false"})
    with pytest.raises(ValueError, match=r"Invalid CLIP tokenizer metadata: invalid literal for int"):
        CLIPTokenizer.from_metadata(metadata | {"clip_tokenizer.pad_token_id": "!"})
    with pytest.raises(ValueError, match=r"Invalid CLIP tokenizer metadata: The vocabulary in the metadata must be"):
        CLIPTokenizer.from_metadata(metadata | {"clip_tokenizer.vocabulary": "[1, 2]"})


def test_token_ids_pass_through(tokenizer: CLIPTokenizer, reference: transformers.CLIPTokenizer) -> None:
    ids = reference_ids(reference, ["a photo of a cat"])
    assert tokenizer(ids) is ids
    with pytest.raises(ValueError, match="token ids as a \\(batch, sequence\\) integer tensor"):
        tokenizer(ids.float())
