"""CLIP's text tower: text (with a tokenizer) or token ids to one embedding per token, as Stable Diffusion uses it.

`CLIPTextEncoderL` is Stable Diffusion 1.x's text encoder (OpenAI CLIP ViT-L/14), `CLIPTextEncoderH` Stable Diffusion
2.x's (OpenCLIP ViT-H/14) and `CLIPTextEncoderG` the second text encoder of SDXL (OpenCLIP ViT-bigG/14). SDXL
conditions on the penultimate hidden states (`CLIPTextEncoder.with_penultimate_output`) and, for G, on a pooled
and projected embedding of the whole prompt (`TextEncoderWithPooling`).
"""

from pathlib import Path
from typing import Self

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.adapter import Adapter
from refiners.fluxion.context import Contexts, lookup_key
from refiners.fluxion.utils import load_metadata_from_safetensors
from refiners.foundationals.clip.common import GeLUApproximation, PositionalEncoder, TransformerLayer
from refiners.foundationals.clip.tokenizer import METADATA_PREFIX, CLIPTokenizer

__all__ = [
    "TokenEncoder",
    "CLIPTextEncoder",
    "CLIPTextEncoderL",
    "CLIPTextEncoderH",
    "CLIPTextEncoderG",
    "TextEncoderWithPooling",
    "RecordInput",
    "EndOfTextPooling",
    "CLIP_TEXT_POOLING_CONTEXT",
]

CLIP_TEXT_POOLING_CONTEXT = "clip_text_pooling"
"""The context where `TextEncoderWithPooling` records, during a forward, the token ids (key `token_ids`) and the
input of the last transformer layer (key `penultimate_hidden_state`)."""


class TokenEncoder(fl.Embedding):
    """The token embedding table: `(batch, sequence)` integer ids to `(batch, sequence, embedding_dim)`.

    Args:
        vocabulary_size: Number of token ids.
        embedding_dim: Size of each token embedding.
        device: Where the table lives.
        dtype: The table's dtype.
    """

    def __init__(
        self,
        vocabulary_size: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_embeddings=vocabulary_size, embedding_dim=embedding_dim, device=device, dtype=dtype)
        self.vocabulary_size = vocabulary_size

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(
                f"got {type(input).__name__} input but this text encoder has no tokenizer: it takes token ids of shape "
                "(batch, sequence_length). Load weights converted with their vocabulary "
                "(`encoder.load_from_safetensors(path)` rebuilds the tokenizer from the file's metadata), or pass "
                "`tokenizer=CLIPTokenizer(vocabulary_path, merges_path)` when building the encoder."
            )
        if input.is_floating_point() or input.is_complex():
            raise TypeError(f"token ids must be an integer tensor, got dtype {input.dtype}")
        return super().forward(input)


class CLIPTextEncoder(fl.Chain):
    """CLIP's text transformer: the last hidden state, after the final LayerNorm, `(batch, sequence, embedding_dim)`.

    It takes token ids `(batch, sequence_length)`, or text (a string or a list of strings) when it has a tokenizer:
    the tokenizer is then its first child. Weights converted with their vocabulary carry the tokenizer in their
    metadata: `load_from_safetensors` rebuilds it. The attention is causal (each token only sees itself and the
    tokens before it), as in CLIP.

    Args:
        embedding_dim: Width of the transformer.
        max_sequence_length: Number of position embeddings (CLIP: 77).
        vocabulary_size: Number of token ids.
        num_layers: Number of transformer layers.
        num_attention_heads: Number of attention heads; it must divide `embedding_dim`.
        feedforward_dim: Hidden size of the feed-forward blocks.
        layer_norm_eps: The LayerNorms' epsilon.
        device: Where the weights live.
        dtype: The weights' dtype.
        gelu_approximation: `"quick"` (`x * sigmoid(1.702 x)`) for OpenAI's CLIP, `"none"` (exact GeLU) for
            OpenCLIP's. Keyword only, as is `tokenizer` (the positional order is the original Refiners').
        tokenizer: Turns text into token ids; without one, the encoder takes token ids.
    """

    gelu_approximation: GeLUApproximation

    def __init__(
        self,
        embedding_dim: int = 768,
        max_sequence_length: int = 77,
        vocabulary_size: int = 49408,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        feedforward_dim: int = 3072,
        layer_norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        gelu_approximation: GeLUApproximation = "none",
        tokenizer: CLIPTokenizer | None = None,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"CLIPTextEncoder needs at least one transformer layer, got num_layers={num_layers}")
        self.embedding_dim = embedding_dim
        self.max_sequence_length = max_sequence_length
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.feedforward_dim = feedforward_dim
        self.layer_norm_eps = layer_norm_eps
        self.gelu_approximation = gelu_approximation
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        super().__init__(
            *([tokenizer] if tokenizer is not None else []),
            # Token ids come from the tokenizer or the caller on CPU: move them to the weights' device.
            fl.Converter(set_dtype=False),
            fl.Sum(
                TokenEncoder(vocabulary_size, embedding_dim, device=device, dtype=dtype),
                PositionalEncoder(max_sequence_length, embedding_dim, device=device, dtype=dtype),
            ),
            *(
                TransformerLayer(
                    embedding_dim,
                    num_attention_heads=num_attention_heads,
                    feedforward_dim=feedforward_dim,
                    layer_norm_eps=layer_norm_eps,
                    gelu_approximation=gelu_approximation,
                    is_causal=True,
                    device=device,
                    dtype=dtype,
                )
                for _ in range(num_layers)
            ),
            fl.LayerNorm(embedding_dim, eps=layer_norm_eps, device=device, dtype=dtype),
        )

    @property
    def tokenizer(self) -> CLIPTokenizer | None:
        """The tokenizer (the first child), or None when the encoder takes token ids."""
        first = next(iter(self), None)
        return first if isinstance(first, CLIPTokenizer) else None

    def set_tokenizer(self, tokenizer: CLIPTokenizer) -> None:
        """Use `tokenizer` to encode text: it replaces the current tokenizer, if any."""
        self._check_tokenizer(tokenizer)
        if (current := self.tokenizer) is not None:
            self.replace(current, tokenizer)
        else:
            self.insert(0, tokenizer)

    def _check_tokenizer(self, tokenizer: CLIPTokenizer) -> None:
        if tokenizer.sequence_length > self.max_sequence_length:
            raise ValueError(
                f"the tokenizer makes sequences of {tokenizer.sequence_length} tokens but {type(self).__name__} has "
                f"position embeddings for {self.max_sequence_length}: build the tokenizer with "
                f"sequence_length={self.max_sequence_length}."
            )

    def load_from_safetensors(self, tensors_path: str | Path, strict: bool = True) -> Self:
        """Load weights, and the tokenizer when the file's metadata carries one (see `CLIPTokenizer.to_metadata`).

        Args:
            tensors_path: The `.safetensors` file.
            strict: Fail, listing them, on missing, unexpected or wrongly shaped tensors.
        """
        metadata = load_metadata_from_safetensors(tensors_path)
        # Read first: a file with broken tokenizer metadata fails before any weight is touched.
        tokenizer = (
            CLIPTokenizer.from_metadata(metadata) if any(k.startswith(METADATA_PREFIX) for k in metadata) else None
        )
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        super().load_from_safetensors(tensors_path, strict=strict)
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        return self

    def with_penultimate_output(self) -> Self:
        """A copy of this encoder, sharing its weights, that outputs the penultimate hidden state.

        That is the input of the last transformer layer, without the final LayerNorm (transformers'
        `hidden_states[-2]`), which SDXL conditions on. Call it after loading the weights: the copy shares the
        tensors the encoder has at that time.
        """
        children = list(self)
        if (
            len(children) < 2
            or not isinstance(children[-1], fl.LayerNorm)
            or not isinstance(children[-2], TransformerLayer)
        ):
            raise ValueError(
                f"{type(self).__name__} must end with its last TransformerLayer and its final LayerNorm to drop them, "
                f"but it ends with {[type(child).__name__ for child in children[-2:]]}: eject the adapters injected "
                "there (e.g. TextEncoderWithPooling) first."
            )
        copy = self[:-2]
        copy.num_layers = self.num_layers - 1
        return copy


class CLIPTextEncoderL(CLIPTextEncoder):
    """The text encoder of Stable Diffusion 1.x: OpenAI CLIP ViT-L/14 (768 wide, 12 layers, quick GeLU).

    Args:
        tokenizer: Turns text into token ids (Stable Diffusion 1.x pads with the end-of-text token).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        tokenizer: CLIPTokenizer | None = None,
    ) -> None:
        super().__init__(
            embedding_dim=768,
            num_layers=12,
            num_attention_heads=12,
            feedforward_dim=3072,
            gelu_approximation="quick",
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
        )


class CLIPTextEncoderH(CLIPTextEncoder):
    """The text encoder of Stable Diffusion 2.x: OpenCLIP ViT-H/14 (1024 wide, exact GeLU).

    The model has 24 layers; Stable Diffusion 2 uses the output of the 23rd, with the final LayerNorm: this encoder
    has those 23 layers, as the diffusers checkpoint does.

    Args:
        tokenizer: Turns text into token ids (Stable Diffusion 2.x pads with `!`).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        tokenizer: CLIPTokenizer | None = None,
    ) -> None:
        super().__init__(
            embedding_dim=1024,
            num_layers=23,
            num_attention_heads=16,
            feedforward_dim=4096,
            gelu_approximation="none",
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
        )


class CLIPTextEncoderG(CLIPTextEncoder):
    """The second text encoder of SDXL: OpenCLIP ViT-bigG/14 (1280 wide, 32 layers, exact GeLU).

    SDXL uses its penultimate hidden state and its pooled, projected output: inject a `TextEncoderWithPooling`.

    Args:
        tokenizer: Turns text into token ids (SDXL's second tokenizer pads with `!`).
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        tokenizer: CLIPTokenizer | None = None,
    ) -> None:
        super().__init__(
            embedding_dim=1280,
            num_layers=32,
            num_attention_heads=20,
            feedforward_dim=5120,
            gelu_approximation="none",
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
        )


class RecordInput(fl.Chain, Adapter[fl.Module]):
    """Store the target's input under `key` in `CLIP_TEXT_POOLING_CONTEXT`, then run the target.

    Args:
        target: The layer whose input is recorded.
        key: The key in the context.
    """

    def __init__(self, target: fl.Module, key: str) -> None:
        with self.setup_adapter(target):
            super().__init__(fl.SetContext(CLIP_TEXT_POOLING_CONTEXT, key), target)


class EndOfTextPooling(fl.ContextModule):
    """`(batch, sequence, dim)` to `(batch, dim)`: each sequence's hidden state at its end-of-text token.

    The token ids are read from `CLIP_TEXT_POOLING_CONTEXT`. The end-of-text token has the highest id of CLIP's
    vocabulary, so it is found as the argmax of the ids, as in OpenAI's CLIP and transformers' (for configs with
    `eos_token_id=2`, which Stable Diffusion's are); `argmax` returns the first of ties, so padding with that same
    token is fine.
    """

    def forward(self, x: Tensor) -> Tensor:
        token_ids = lookup_key(self.use_context(CLIP_TEXT_POOLING_CONTEXT), CLIP_TEXT_POOLING_CONTEXT, "token_ids")
        if token_ids is None:
            raise ValueError(
                "EndOfTextPooling found no token ids in the context: it runs inside a text encoder with a "
                "TextEncoderWithPooling injected (which records them)."
            )
        end_of_text = token_ids.argmax(dim=-1).to(x.device)
        return x[torch.arange(x.shape[0], device=x.device), end_of_text]


class TextEncoderWithPooling(fl.Chain, Adapter[fl.LayerNorm]):
    """Make a CLIP text encoder output `(penultimate_hidden_state, pooled_embedding)`, in one forward (SDXL).

    - `penultimate_hidden_state`, `(batch, sequence, embedding_dim)`: the input of the last transformer layer
      (transformers' `hidden_states[-2]`).
    - `pooled_embedding`, `(batch, projection_dim)`: the final hidden state at the end-of-text token, projected
      (transformers' `CLIPTextModelWithProjection.text_embeds`).

    The adapter wraps the encoder's final LayerNorm and owns the projection (`projection`); injecting it also
    injects two `RecordInput` adapters, on the embeddings (to find the end-of-text token) and on the last transformer
    layer, and ejecting it removes them.

    Args:
        encoder: The text encoder, ending with its final LayerNorm.
        projection_dim: Output size of the projection (default: the encoder's width, as for SDXL).
        device: Where the projection lives (default: the encoder's device).
        dtype: The projection's dtype (default: the encoder's dtype).

    Example:
        ```py
        import torch
        from refiners.foundationals.clip import CLIPTextEncoder, TextEncoderWithPooling

        encoder = CLIPTextEncoder(embedding_dim=64, num_layers=2, num_attention_heads=4, feedforward_dim=128)
        TextEncoderWithPooling(encoder).inject()
        penultimate, pooled = encoder(torch.randint(0, 49408, (2, 77)))
        assert penultimate.shape == (2, 77, 64) and pooled.shape == (2, 64)
        ```
    """

    def __init__(
        self,
        encoder: CLIPTextEncoder,
        projection_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        children = list(encoder)
        if not isinstance(final_norm := children[-1], fl.LayerNorm) or not isinstance(
            last_layer := children[-2], TransformerLayer
        ):
            raise ValueError(
                f"TextEncoderWithPooling wraps the last TransformerLayer and final LayerNorm of the encoder, but "
                f"{type(encoder).__name__} ends with {[type(child).__name__ for child in children[-2:]]} (is pooling "
                "already injected?)."
            )
        embeddings = encoder.layer("Sum", fl.Sum)
        self.projection_dim = projection_dim or encoder.embedding_dim
        with self.setup_adapter(final_norm):
            super().__init__(
                final_norm,
                fl.Parallel(
                    fl.UseContext(CLIP_TEXT_POOLING_CONTEXT, "penultimate_hidden_state"),
                    fl.Chain(
                        EndOfTextPooling(),
                        fl.Linear(
                            encoder.embedding_dim,
                            self.projection_dim,
                            bias=False,
                            device=device if device is not None else encoder.device,
                            dtype=dtype if dtype is not None else encoder.dtype,
                        ),
                    ),
                ),
            )
        self._recorders = [RecordInput(embeddings, "token_ids"), RecordInput(last_layer, "penultimate_hidden_state")]

    def init_context(self) -> Contexts:
        return {CLIP_TEXT_POOLING_CONTEXT: {"token_ids": None, "penultimate_hidden_state": None}}

    @property
    def projection(self) -> fl.Linear:
        """The projection of the pooled embedding (transformers' `text_projection`)."""
        return self.layer("Parallel.Chain.Linear", fl.Linear)

    def inject(self, parent: fl.Chain | None = None) -> Self:
        super().inject(parent)
        for recorder in self._recorders:
            recorder.inject()
        return self

    def eject(self) -> None:
        super().eject()
        for recorder in reversed(self._recorders):
            recorder.eject()
