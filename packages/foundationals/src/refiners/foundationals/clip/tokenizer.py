"""The CLIP tokenizer: prompts to the token ids that CLIP text encoders (SD1.5's CLIP-L, SDXL's OpenCLIP-G) read."""

import json
import re
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch
from torch import Tensor

import refiners.fluxion.layers as fl

if TYPE_CHECKING:
    import regex

__all__ = ["CLIPTokenizer", "bytes_to_unicode", "METADATA_PREFIX"]

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's pre-tokenization (the same in OpenAI's CLIP, OpenCLIP and transformers): the special tokens, English
# contractions, runs of letters, single digits, runs of anything else that is not whitespace.
PRE_TOKENIZATION_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# transformers' byte-level pre-tokenizer then splits each piece with GPT-2's pattern. That only changes a special
# token left in the normalized text (typed in another case: `<|ENDOFTEXT|>`), which becomes `<|`, `endoftext`, `|>`.
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

METADATA_PREFIX = "clip_tokenizer."
_METADATA_KEYS = (
    "vocabulary",
    "merges",
    "sequence_length",
    "start_of_text_token_id",
    "end_of_text_token_id",
    "pad_token_id",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, the alphabet of CLIP's byte-level BPE.

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...) map to characters from U+0100 on,
    so that no BPE symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {byte: chr(byte) for byte in printable} | {byte: chr(256 + n) for n, byte in enumerate(others)}


class CLIPTokenizer(fl.Module):
    """Turns prompts into CLIP token ids: start token, byte-level BPE tokens, end token, padding.

    The ids are those of transformers' `CLIPTokenizer` on the same `vocab.json` and `merges.txt` (the `tokenizer/`
    folder of a Stable Diffusion model): NFC normalization, runs of whitespace collapsed, lowercasing character by
    character, CLIP's pre-tokenization pattern, then BPE with the `</w>` end-of-word marker. `<|startoftext|>` and
    `<|endoftext|>` written verbatim in a prompt are read as those special tokens.

    transformers 5 has only this `tokenizers`-backed CLIP tokenizer, our reference. OpenAI's CLIP also ran `ftfy` and
    `html.unescape`, and transformers 4's Python tokenizer without `ftfy` dropped control characters and split CJK
    characters apart: neither is done here. Two deliberate differences with transformers: the pad token only pads
    (transformers also reads a pad token written in the prompt as that token, so with `pad_token="!"` each `!` of a
    prompt becomes id 0, where OpenCLIP, which SDXL's text encoder was trained with, reads `!</w>`); characters
    more recent than Python's Unicode database (14.0 for Python 3.11) may be classified otherwise than by the Rust
    `tokenizers` library.

    Args:
        vocabulary_path: The `vocab.json` file: a JSON object from token to id.
        merges_path: The `merges.txt` file: one merge (`first second`) per line, highest priority first, after an
            optional `#version` header.
        sequence_length: The number of ids per prompt, start and end tokens included (77 for CLIP).
        start_of_text_token_id: The id of the start token. Defaults to the id of `<|startoftext|>` in the
            vocabulary, else 49406. Giving an id that differs from the vocabulary's is an error.
        end_of_text_token_id: The id of the end token. Defaults to the id of `<|endoftext|>` in the vocabulary,
            else 49407. Giving an id that differs from the vocabulary's is an error.
        pad_token_id: The id that fills the sequence after the end token. Defaults to the end token (SD1.5's
            CLIP-L); OpenCLIP-G (SDXL) pads with 0 (`!`).
        cache_size: How many distinct words keep their BPE ids in an LRU cache.

    Example:
        ```py
        from refiners.foundationals.clip import CLIPTokenizer
        from refiners.foundationals.clip.tokenizer import bytes_to_unicode

        # An SD model's: CLIPTokenizer("tokenizer/vocab.json", "tokenizer/merges.txt"). Here, the byte symbols alone
        # and at the end of a word, and two merges that make "dog" one token.
        symbols = list(bytes_to_unicode().values())
        tokens = [*symbols, *(s + "</w>" for s in symbols), "do", "dog</w>", "<|startoftext|>", "<|endoftext|>"]
        vocabulary = {token: index for index, token in enumerate(tokens)}
        tokenizer = CLIPTokenizer.from_vocabulary(vocabulary, merges=[("d", "o"), ("do", "g</w>")])
        ids = tokenizer(["a photo of a cat", "a dog"])
        assert ids.shape == (2, 77) and ids[1, 0] == tokenizer.start_of_text_token_id
        assert tokenizer.encode("a dog") == ids[1, :4].tolist()  # start, a, dog, end
        ```
    """

    def __init__(
        self,
        vocabulary_path: str | Path,
        merges_path: str | Path,
        sequence_length: int = 77,
        start_of_text_token_id: int | None = None,
        end_of_text_token_id: int | None = None,
        pad_token_id: int | None = None,
        cache_size: int = 10_000,
    ) -> None:
        super().__init__()
        self._setup(
            vocabulary=_read_vocabulary(Path(vocabulary_path)),
            merges=_read_merges(Path(merges_path)),
            sequence_length=sequence_length,
            start_of_text_token_id=start_of_text_token_id,
            end_of_text_token_id=end_of_text_token_id,
            pad_token_id=pad_token_id,
            cache_size=cache_size,
        )

    @classmethod
    def from_vocabulary(
        cls,
        vocabulary: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        sequence_length: int = 77,
        start_of_text_token_id: int | None = None,
        end_of_text_token_id: int | None = None,
        pad_token_id: int | None = None,
        cache_size: int = 10_000,
    ) -> Self:
        """A tokenizer from an in-memory vocabulary and merges (see `__init__` for the other arguments).

        Args:
            vocabulary: Token to id, as in `vocab.json`.
            merges: The merges, highest priority first, as in `merges.txt`.
        """
        tokenizer = cls.__new__(cls)
        fl.Module.__init__(tokenizer)
        tokenizer._setup(
            vocabulary=vocabulary,
            merges=merges,
            sequence_length=sequence_length,
            start_of_text_token_id=start_of_text_token_id,
            end_of_text_token_id=end_of_text_token_id,
            pad_token_id=pad_token_id,
            cache_size=cache_size,
        )
        return tokenizer

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, sequence_length: int = 77) -> Self:
        """A tokenizer from a Hugging Face `tokenizer.json` (what transformers 5's `save_pretrained` writes alone).

        Its BPE model gives the vocabulary and merges; the special tokens are found in the vocabulary, as by
        `__init__`.

        Raises:
            ValueError: The file is not the `tokenizer.json` of a BPE tokenizer.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read {path} as a tokenizer.json: {error}") from error
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise ValueError(f"{path} is not the tokenizer.json of a BPE tokenizer (CLIP's): its model is not BPE")
        # `tokenizers` writes merges as "first second" strings (older files) or [first, second] pairs.
        raw_merges: Any = model.get("merges", [])
        text = "\n".join(merge if isinstance(merge, str) else " ".join(merge) for merge in raw_merges)
        vocabulary = _parse_vocabulary(model.get("vocab"), source=str(path))
        return cls.from_vocabulary(vocabulary, _parse_merges(text, source=str(path)), sequence_length=sequence_length)

    @property
    def vocabulary_size(self) -> int:
        """The number of ids the tokenizer may return (its largest id, plus one)."""
        return max(self._vocabulary.values()) + 1

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> Self:
        """A tokenizer from the metadata of a converted checkpoint (see `to_metadata`).

        Args:
            metadata: A safetensors header's metadata. Keys outside the `clip_tokenizer.` namespace are ignored:
                they describe the rest of the checkpoint.
        """
        fields = {
            key.removeprefix(METADATA_PREFIX): value
            for key, value in metadata.items()
            if key.startswith(METADATA_PREFIX)
        }
        if missing := [f"{METADATA_PREFIX}{key}" for key in _METADATA_KEYS if key not in fields]:
            raise ValueError(
                f"The metadata has no CLIP tokenizer: {', '.join(missing)} missing. Convert the checkpoint again with "
                "its tokenizer, or build the tokenizer from the model's `vocab.json` and `merges.txt`."
            )
        if unknown := sorted(f"{METADATA_PREFIX}{key}" for key in fields if key not in _METADATA_KEYS):
            raise ValueError(
                f"Unknown CLIP tokenizer metadata: {', '.join(unknown)}. It was written by another version of "
                f"refiners; expected only {', '.join(METADATA_PREFIX + key for key in _METADATA_KEYS)}."
            )
        try:
            vocabulary = _parse_vocabulary(json.loads(fields["vocabulary"]), source="the metadata")
            merges = _parse_merges(fields["merges"], source="the metadata")
            integers = {key: int(fields[key]) for key in _METADATA_KEYS[2:]}
        except (json.JSONDecodeError, ValueError) as error:
            raise ValueError(f"Invalid CLIP tokenizer metadata: {error}") from error
        return cls.from_vocabulary(vocabulary, merges, **integers)

    def with_pad_token(self, token: str) -> Self:
        """A copy of this tokenizer that pads with `token` (SDXL's second tokenizer pads with "!").

        Args:
            token: A token of the vocabulary.
        """
        if token not in self._vocabulary:
            raise ValueError(f"cannot pad with {token!r}: it is not in this tokenizer's vocabulary")
        return self.from_vocabulary(
            self._vocabulary,
            self._merges,
            sequence_length=self.sequence_length,
            start_of_text_token_id=self.start_of_text_token_id,
            end_of_text_token_id=self.end_of_text_token_id,
            pad_token_id=self._vocabulary[token],
        )

    def to_metadata(self) -> dict[str, str]:
        """The vocabulary, merges and settings as safetensors metadata, so a checkpoint needs no tokenizer folder."""
        return {
            f"{METADATA_PREFIX}vocabulary": json.dumps(self._vocabulary, ensure_ascii=False),
            f"{METADATA_PREFIX}merges": "\n".join(f"{first} {second}" for first, second in self._merges),
            f"{METADATA_PREFIX}sequence_length": str(self.sequence_length),
            f"{METADATA_PREFIX}start_of_text_token_id": str(self.start_of_text_token_id),
            f"{METADATA_PREFIX}end_of_text_token_id": str(self.end_of_text_token_id),
            f"{METADATA_PREFIX}pad_token_id": str(self.pad_token_id),
        }

    def _setup(
        self,
        vocabulary: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        sequence_length: int,
        start_of_text_token_id: int | None,
        end_of_text_token_id: int | None,
        pad_token_id: int | None,
        cache_size: int,
    ) -> None:
        if sequence_length < 2:
            raise ValueError(f"sequence_length must be at least 2 (start and end tokens), got {sequence_length}.")
        _check_vocabulary(vocabulary, merges)
        self._vocabulary = dict(vocabulary)
        self._merges = [(first, second) for first, second in merges]
        self._merge_ranks = {pair: rank for rank, pair in enumerate(self._merges)}
        self._byte_to_symbol = bytes_to_unicode()
        self._pre_tokenization_pattern = _compile(PRE_TOKENIZATION_PATTERN)
        self._byte_level_pattern = _compile(BYTE_LEVEL_PATTERN)
        self._whitespace = _compile(r"\s+")
        self.sequence_length = sequence_length
        self.start_of_text_token_id = _special_token_id(vocabulary, START_OF_TEXT, start_of_text_token_id, 49406)
        self.end_of_text_token_id = _special_token_id(vocabulary, END_OF_TEXT, end_of_text_token_id, 49407)
        self.pad_token_id = self.end_of_text_token_id if pad_token_id is None else pad_token_id
        self._special_tokens = {
            token: vocabulary[token] for token in (START_OF_TEXT, END_OF_TEXT) if token in vocabulary
        }
        # A capturing group, so that splitting a prompt keeps the special tokens (at odd indices).
        self._special_tokens_pattern = _compile(f"({'|'.join(map(re.escape, self._special_tokens))})")
        self._encode_word = lru_cache(maxsize=cache_size)(self._merge_word)

    def forward(self, text: str | list[str] | Tensor) -> Tensor:
        """The ids of a prompt or a batch of prompts: an int64 tensor of shape (batch, sequence_length).

        A prompt with more tokens than `sequence_length` is truncated (its start and end tokens kept), with a warning.
        Token ids given as an integer tensor pass through unchanged, so an encoder holding a tokenizer also takes ids.
        """
        if isinstance(text, Tensor):
            if text.is_floating_point() or text.dim() != 2:
                raise ValueError(
                    f"CLIPTokenizer takes text, or token ids as a (batch, sequence) integer tensor; got a tensor of "
                    f"shape {tuple(text.shape)} and dtype {text.dtype}"
                )
            return text
        rows: list[list[int]] = []
        for prompt in [text] if isinstance(text, str) else text:
            ids = self.encode(prompt)
            if (excess := len(ids) - self.sequence_length) > 0:
                warnings.warn(
                    f"The prompt has {len(ids)} tokens (start and end included) but the text encoder takes "
                    f"{self.sequence_length}: dropping its last {excess}.",
                    stacklevel=2,
                )
                ids = [*ids[: self.sequence_length - 1], self.end_of_text_token_id]
            rows.append(ids + [self.pad_token_id] * (self.sequence_length - len(ids)))
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), self.sequence_length)

    def encode(self, text: str) -> list[int]:
        """The ids of a prompt, start and end tokens included, neither truncated nor padded.

        Args:
            text: The prompt.
        """
        ids = [self.start_of_text_token_id]
        # Special tokens are found in the raw text, before normalization (transformers' non-normalized added tokens).
        segments = self._special_tokens_pattern.split(text) if self._special_tokens else [text]
        for index, segment in enumerate(segments):
            if index % 2 == 1:
                ids.append(self._special_tokens[segment])
                continue
            for word in self._pre_tokenize(segment):
                ids.extend(self._encode_word("".join(self._byte_to_symbol[byte] for byte in word.encode("utf-8"))))
        ids.append(self.end_of_text_token_id)
        return ids

    def _pre_tokenize(self, text: str) -> list[str]:
        text = self._whitespace.sub(" ", unicodedata.normalize("NFC", text))
        # Per character, as `tokenizers` does: `str.lower` would give a word-final capital sigma its final form.
        text = "".join(char.lower() for char in text)
        pieces = self._pre_tokenization_pattern.findall(text)
        return [word for piece in pieces for word in self._byte_level_pattern.findall(piece)]

    def _merge_word(self, word: str) -> tuple[int, ...]:
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            best = min(pairwise(symbols), key=lambda pair: self._merge_ranks.get(pair, len(self._merge_ranks)))
            if best not in self._merge_ranks:
                break
            merged: list[str] = []
            index = 0
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                    merged.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return tuple(self._vocabulary[symbol] for symbol in symbols)


def _compile(pattern: str) -> "regex.Pattern[str]":
    try:
        import regex
    except ImportError as error:  # pragma: no cover - `regex` comes with the `sd` extra
        raise ImportError(
            "CLIPTokenizer needs the `regex` package (Unicode classes in its pattern): "
            "install `refiners-foundationals[sd]`."
        ) from error
    return regex.compile(pattern)


def _special_token_id(vocabulary: Mapping[str, int], token: str, given: int | None, default: int) -> int:
    if token not in vocabulary:
        return default if given is None else given
    if given is not None and given != vocabulary[token]:
        raise ValueError(
            f"The vocabulary gives {token} the id {vocabulary[token]} but {given} was passed: "
            "leave the argument out to use the vocabulary's id."
        )
    return vocabulary[token]


def _check_vocabulary(vocabulary: Mapping[str, int], merges: Sequence[tuple[str, str]]) -> None:
    symbols = bytes_to_unicode().values()
    if missing := [s for s in [*symbols, *(symbol + END_OF_WORD for symbol in symbols)] if s not in vocabulary]:
        raise ValueError(
            f"The vocabulary lacks {len(missing)} of the 512 byte symbols of CLIP's byte-level BPE (e.g. "
            f"{', '.join(map(repr, missing[:5]))}): it is not a CLIP vocabulary."
        )
    for rank, (first, second) in enumerate(merges):
        if missing := [token for token in (first, second, first + second) if token not in vocabulary]:
            raise ValueError(
                f"Merge {rank + 1} ({first} {second}) uses tokens absent from the vocabulary: "
                f"{', '.join(map(repr, missing))}. Use the merges file that goes with this vocabulary."
            )


def _read_vocabulary(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise FileNotFoundError(
            f"No CLIP vocabulary at {path}: pass the `vocab.json` of the model's `tokenizer/` folder."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a JSON vocabulary ({error}): pass the model's `vocab.json`.") from error
    return _parse_vocabulary(data, source=str(path))


def _parse_vocabulary(data: Any, source: str) -> dict[str, int]:
    if not isinstance(data, dict) or not all(
        isinstance(token, str) and isinstance(token_id, int) and not isinstance(token_id, bool)
        for token, token_id in data.items()
    ):
        raise ValueError(f"The vocabulary in {source} must be a JSON object from token to integer id.")
    return data


def _read_merges(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"No BPE merges at {path}: pass the `merges.txt` of the model's `tokenizer/` folder.")
    return _parse_merges(path.read_text(encoding="utf-8"), source=str(path))


def _parse_merges(text: str, source: str) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    # Split on newlines only: `str.splitlines` also splits on characters such as U+2028.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line or line.startswith("#version"):
            continue
        match line.split(" "):
            case [first, second] if first and second:
                merges.append((first, second))
            case _:
                raise ValueError(f"Line {number} of {source} is not a merge (`first second`): {line!r}.")
    return merges
