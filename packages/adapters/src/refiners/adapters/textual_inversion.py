"""Textual inversion: new words for a CLIP text encoder, each a learned embedding (one or several vectors).

A file holds one embedding: A1111's `.pt` (`string_to_param`) or `.safetensors` (`emb_params`), diffusers'
`learned_embeds` (`{token: tensor}`), or SDXL's (`clip_l` and `clip_g`, one per encoder). A multi-vector embedding
of `n` rows is read, as diffusers expands it, as the tokens `tok tok_1 ... tok_{n-1}` wherever `tok` is written.

Several textual inversions share one tokenizer adapter and one token embedding adapter per encoder, which hold every
added word in the order the inversions were injected (their ids follow one another, as diffusers numbers a list of
them); ejecting one, in any order, renumbers the others, and ejecting the last removes the adapters.
"""

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.adapter import Adapter
from refiners.fluxion.utils import load_from_safetensors
from refiners.foundationals.clip import CLIPTextEncoder, CLIPTokenizer
from refiners.foundationals.clip.text_encoder import TokenEncoder
from refiners.foundationals.latent_diffusion.stable_diffusion_xl import SDXLTextEncoder

__all__ = ["TextualInversion", "TokenizerWithAddedTokens", "TokenEncoderWithAddedTokens", "read_embeddings"]

# A1111's `.pt` files carry these beside `string_to_param`: they describe the training, not the embedding.
_A1111_INFORMATION = {"string_to_token", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}


class AddedEmbeddings(fl.WeightedModule):
    """The rows of the added tokens, `(number_of_tokens, embedding_dim)`."""

    def __init__(self, embeddings: Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(embeddings.clone())

    def forward(self, ids: Tensor) -> Tensor:
        return torch.nn.functional.embedding(ids, self.weight)


class TokenEncoderWithAddedTokens(fl.Chain, Adapter[TokenEncoder]):
    """The token embedding with extra rows: ids from the table's size on read the added embeddings.

    Args:
        target: The token embedding to extend.
        embeddings: The added rows, `(number_of_tokens, embedding_dim)`.
    """

    def __init__(self, target: TokenEncoder, embeddings: Tensor) -> None:
        with self.setup_adapter(target):
            super().__init__(
                target, AddedEmbeddings(embeddings.to(device=target.weight.device, dtype=target.weight.dtype))
            )

    @property
    def embeddings(self) -> Tensor:
        """The added rows, `(number_of_tokens, embedding_dim)`."""
        return self.layer(1, AddedEmbeddings).weight

    def set_embeddings(self, embeddings: Tensor) -> None:
        """Replace the added rows (the ids from `first_added_id` on read them)."""
        weight = self.target.weight
        self.layer(1, AddedEmbeddings).weight = torch.nn.Parameter(
            embeddings.to(device=weight.device, dtype=weight.dtype, copy=True)
        )

    @property
    def first_added_id(self) -> int:
        """The id of the first added token: the table's size."""
        return self.target.num_embeddings

    def forward(self, *args: Any) -> Tensor:
        (ids,) = args
        assert isinstance(ids, Tensor)
        added = ids >= self.first_added_id
        base = self.target(ids.clamp(max=self.first_added_id - 1))
        extra = self.layer(1, AddedEmbeddings)((ids - self.first_added_id).clamp(min=0))
        return torch.where(added.unsqueeze(-1), extra, base)


class TokenizerWithAddedTokens(fl.Chain, Adapter[CLIPTokenizer]):
    """The tokenizer, reading each added token verbatim in a prompt (as transformers' added tokens) as its ids.

    Args:
        target: The tokenizer to extend.
        added_tokens: Each token and its ids (several for a multi-vector embedding).
    """

    def __init__(self, target: CLIPTokenizer, added_tokens: Mapping[str, list[int]]) -> None:
        self.set_added_tokens(added_tokens)
        with self.setup_adapter(target):
            super().__init__(target)

    def set_added_tokens(self, added_tokens: Mapping[str, list[int]]) -> None:
        """Replace the added tokens and their ids."""
        self.added_tokens = dict(added_tokens)
        # Longest first: a token that begins another does not cut it.
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._pattern = re.compile(f"({'|'.join(map(re.escape, alternatives))})")

    def encode(self, text: str) -> list[int]:
        """The ids of a prompt, start and end tokens included, neither truncated nor padded."""
        tokenizer = self.target
        ids = [tokenizer.start_of_text_token_id]
        for index, segment in enumerate(self._pattern.split(text)):
            ids.extend(self.added_tokens[segment] if index % 2 == 1 else tokenizer.encode(segment)[1:-1])
        ids.append(tokenizer.end_of_text_token_id)
        return ids

    def forward(self, *args: Any) -> Tensor:
        (text,) = args
        tokenizer = self.target
        if isinstance(text, Tensor):
            return tokenizer(text)
        prompts: list[str] = [text] if isinstance(text, str) else text
        length = tokenizer.sequence_length
        rows: list[list[int]] = []
        for prompt in prompts:
            ids = self.encode(prompt)
            if len(ids) > length:
                ids = [*ids[: length - 1], tokenizer.end_of_text_token_id]
            rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
        return tokenizer(torch.tensor(rows, dtype=torch.int64).reshape(len(rows), length))


def read_embeddings(path: str | Path) -> dict[str, Tensor]:
    """The embeddings of a textual inversion file, by the name they have in it.

    Returns `{"": tensor}` for A1111's files, `{token: tensor}` for diffusers', `{"clip_l": ..., "clip_g": ...}` for
    SDXL's. Each tensor is `(number_of_vectors, embedding_dim)`.

    Args:
        path: A `.pt`, `.bin` or `.safetensors` file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state: dict[str, Any] = dict(load_from_safetensors(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in state:
        if unknown := sorted(set(state) - _A1111_INFORMATION - {"string_to_param"}):
            raise ValueError(f"{path}: unknown keys {unknown} beside A1111's `string_to_param`")
        embeddings: dict[str, Tensor] = {"": state["string_to_param"]["*"]}
    elif set(state) == {"emb_params"}:
        embeddings = {"": state["emb_params"]}
    elif set(state) == {"clip_l", "clip_g"}:
        embeddings = {"clip_l": state["clip_l"], "clip_g": state["clip_g"]}
    elif len(state) == 1 and isinstance(next(iter(state.values())), Tensor):
        embeddings = dict(state)
    else:
        raise ValueError(
            f"{path}: unknown textual inversion keys {sorted(state)}; expected `string_to_param` or `emb_params` "
            "(A1111), one `{token: tensor}` (diffusers) or `clip_l` and `clip_g` (SDXL)"
        )
    return {name: tensor.reshape(-1, tensor.shape[-1]) for name, tensor in embeddings.items()}


def _base_tokenizer(encoder: CLIPTextEncoder) -> CLIPTokenizer | None:
    """The encoder's own tokenizer, inside the added tokens' adapter if there is one."""
    first = next(iter(encoder), None)
    return first.target if isinstance(first, TokenizerWithAddedTokens) else encoder.tokenizer


def _words(encoder: CLIPTextEncoder) -> dict[str, Tensor]:
    """The words the encoder's textual inversions added, in their order, with their embeddings."""
    tokenizer = next(iter(encoder), None)
    if not isinstance(tokenizer, TokenizerWithAddedTokens):
        return {}
    token_encoder = encoder.ensure_find(TokenEncoderWithAddedTokens)
    first = token_encoder.first_added_id
    return {
        token: token_encoder.embeddings[ids[0] - first : ids[-1] + 1 - first].detach()
        for token, ids in tokenizer.added_tokens.items()
    }


def _set_words(encoder: CLIPTextEncoder, words: Mapping[str, Tensor]) -> None:
    """Give the encoder exactly `words` (in their order, ids from the vocabulary's size on), adding the adapters for
    the first and removing them with the last."""
    tokenizer = next(iter(encoder), None)
    if not words:
        if isinstance(tokenizer, TokenizerWithAddedTokens):
            tokenizer.eject()
            encoder.ensure_find(TokenEncoderWithAddedTokens).eject()
        return
    token_encoder = encoder.ensure_find(TokenEncoder)
    first = token_encoder.num_embeddings
    added: dict[str, list[int]] = {}
    for token, embedding in words.items():
        # diffusers adds `tok_1 ... tok_{n-1}` and writes them after `tok` in prompts: the ids follow one another.
        start = first + sum(len(ids) for ids in added.values())
        added[token] = list(range(start, start + embedding.shape[0]))
    embeddings = torch.cat(list(words.values()))
    if isinstance(tokenizer, TokenizerWithAddedTokens):
        tokenizer.set_added_tokens(added)
        encoder.ensure_find(TokenEncoderWithAddedTokens).set_embeddings(embeddings)
        return
    base_tokenizer = encoder.tokenizer
    assert base_tokenizer is not None
    TokenizerWithAddedTokens(base_tokenizer, added).inject()
    TokenEncoderWithAddedTokens(token_encoder, embeddings).inject()


class TextualInversion:
    """A textual inversion on a text encoder: a word, and its embedding in each encoder it extends.

    `TextualInversion.from_file(sd.clip_text_encoder, path, token="<cat-toy>").inject()` adds the word to an SD1
    model; for SDXL give `sdxl.clip_text_encoder`: `clip_l` goes to CLIP-L, `clip_g` to OpenCLIP-G. Several act at
    once (each with its own word), as diffusers' `load_textual_inversion` takes a list; eject them in any order.

    Args:
        target: The text encoder (SD1's `CLIPTextEncoder`, SDXL's `DoubleTextEncoder`), with its tokenizer(s).
        embeddings: The embedding of `token`, each `(number_of_vectors, embedding_dim)`: one tensor, used by the
            encoder of its width, or for SDXL `{"clip_l": ..., "clip_g": ...}`.
        token: The word that stands for the embedding in prompts.
    """

    def __init__(self, target: CLIPTextEncoder | SDXLTextEncoder, embeddings: Mapping[str, Tensor], token: str) -> None:
        encoders = {"clip": target} if isinstance(target, CLIPTextEncoder) else dict(target.components())
        self.token = token
        self._pairs = self._assign(encoders, embeddings)
        self._injected = False
        for encoder, _ in self._pairs:
            tokenizer = _base_tokenizer(encoder)
            if tokenizer is None:
                raise ValueError(f"{encoder.get_path()} has no tokenizer: give it one before adding tokens")
            if len(tokenizer.encode(token)) == 3:
                raise ValueError(f"the token {token!r} is already in the vocabulary: choose another word")
            if encoder.find(TokenEncoder) is None:
                raise ValueError(f"{encoder.get_path()} has no TokenEncoder to extend")
            self._check_new_word(encoder)

    def _check_new_word(self, encoder: CLIPTextEncoder) -> None:
        if self.token in _words(encoder):
            raise ValueError(
                f"{encoder.get_path()} already has a textual inversion for {self.token!r}: eject it first, or give "
                "this one another word"
            )

    @property
    def is_injected(self) -> bool:
        return self._injected

    @staticmethod
    def _assign(
        encoders: Mapping[str, CLIPTextEncoder], embeddings: Mapping[str, Tensor]
    ) -> list[tuple[CLIPTextEncoder, Tensor]]:
        widths = {name: encoder.embedding_dim for name, encoder in encoders.items()}
        if set(embeddings) == {"clip_l", "clip_g"}:
            if set(encoders) != {"text_encoder", "text_encoder_2"}:
                raise ValueError("an SDXL textual inversion (`clip_l` and `clip_g`) needs SDXL's two text encoders")
            pairs = [
                (encoders["text_encoder"], embeddings["clip_l"]),
                (encoders["text_encoder_2"], embeddings["clip_g"]),
            ]
        else:
            (embedding,) = embeddings.values()
            pairs = [
                (encoder, embedding) for encoder in encoders.values() if encoder.embedding_dim == embedding.shape[-1]
            ]
            if not pairs:
                raise ValueError(f"the embedding is {embedding.shape[-1]} wide but the text encoders are {widths}")
        for encoder, embedding in pairs:
            if embedding.shape[-1] != encoder.embedding_dim:
                raise ValueError(
                    f"the embedding is {embedding.shape[-1]} wide but {encoder.get_path()} is {encoder.embedding_dim}"
                )
        return pairs

    @classmethod
    def from_file(
        cls, target: CLIPTextEncoder | SDXLTextEncoder, path: str | Path, token: str | None = None
    ) -> "TextualInversion":
        """A textual inversion read from `path` (see `read_embeddings`).

        Args:
            target: The text encoder.
            path: The file.
            token: The word for it in prompts; by default a diffusers file's own token (A1111 and SDXL files have
                none: give one).
        """
        embeddings = read_embeddings(path)
        if token is None:
            names = [name for name in embeddings if name not in ("", "clip_l", "clip_g")]
            if not names:
                raise ValueError(f"{path} names no token: pass `token=`")
            token = names[0]
        if set(embeddings) != {"clip_l", "clip_g"}:
            embeddings = {token: next(iter(embeddings.values()))}
        return cls(target, embeddings, token)

    def inject(self) -> "TextualInversion":
        """Add the word to the text encoder(s), after the words of the textual inversions already there."""
        if self._injected:
            raise ValueError(f"the textual inversion {self.token!r} is already injected; eject it first")
        for encoder, _ in self._pairs:
            self._check_new_word(encoder)
        for encoder, embedding in self._pairs:
            _set_words(encoder, _words(encoder) | {self.token: embedding})
        self._injected = True
        return self

    def eject(self) -> None:
        """Take the word out: with the other textual inversions' words, the text encoder(s) are as if this one had
        never been injected; without, as before any was."""
        if not self._injected:
            raise ValueError(f"the textual inversion {self.token!r} is not injected: nothing to eject")
        for encoder, _ in self._pairs:
            _set_words(encoder, {token: words for token, words in _words(encoder).items() if token != self.token})
        self._injected = False
