"""SDXL's text conditioning: OpenAI CLIP ViT-L and OpenCLIP ViT-bigG side by side.

Each encoder's penultimate hidden states (transformers' `hidden_states[-2]`) are concatenated along the features,
`768 + 1280 = 2048`, and the pooled embedding is OpenCLIP-G's final-layer-normed hidden state at the end-of-text
token, through its text projection (`CLIPTextModelWithProjection.text_embeds`), as diffusers'
`StableDiffusionXLPipeline.encode_prompt` computes them. The second tokenizer pads with "!" (SDXL's `tokenizer_2`).
"""

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.foundationals.clip.text_encoder import (
    CLIPTextEncoder,
    CLIPTextEncoderG,
    CLIPTextEncoderL,
    TextEncoderWithPooling,
)
from refiners.foundationals.clip.tokenizer import CLIPTokenizer

__all__ = ["DoubleTextEncoder", "ConcatenateEmbeddings"]

Device = torch.device | str | None


class ConcatenateEmbeddings(fl.Module):
    """`(l_hidden, (g_hidden, pooled))` to `(cat([l_hidden, g_hidden], dim=-1), pooled)`."""

    def forward(self, l_hidden: Tensor, g_outputs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        g_hidden, pooled = g_outputs
        return torch.cat([l_hidden, g_hidden.to(l_hidden.dtype)], dim=-1), pooled


class DoubleTextEncoder(fl.Chain):
    """CLIP ViT-L and OpenCLIP ViT-bigG: text to `(embedding, pooled_embedding)`, `(batch, 77, 2048)` and `(batch, 1280)`.

    CLIP-L runs without its last transformer layer and final LayerNorm (SDXL conditions on the penultimate hidden
    state, so they would compute nothing used); OpenCLIP-G runs whole, with a `TextEncoderWithPooling` injected for
    the pooled embedding (its `projection` is the text projection).

    Args:
        text_encoder_l: The first encoder (default: `CLIPTextEncoderL`).
        text_encoder_g: The second encoder (default: `CLIPTextEncoderG`).
        projection_dim: Size of the pooled embedding (default: the second encoder's width).
        device: Where the weights of the encoders built here live.
        dtype: Their dtype.
    """

    def __init__(
        self,
        text_encoder_l: CLIPTextEncoder | None = None,
        text_encoder_g: CLIPTextEncoder | None = None,
        projection_dim: int | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        encoder_l = text_encoder_l if text_encoder_l is not None else CLIPTextEncoderL(device=device, dtype=dtype)
        encoder_g = text_encoder_g if text_encoder_g is not None else CLIPTextEncoderG(device=device, dtype=dtype)
        TextEncoderWithPooling(encoder_g, projection_dim).inject()
        super().__init__(fl.Parallel(encoder_l.with_penultimate_output(), encoder_g), ConcatenateEmbeddings())

    @property
    def text_encoder_l(self) -> CLIPTextEncoder:
        """The first encoder (without its last layer)."""
        return self.layer(("Parallel", 0), CLIPTextEncoder)

    @property
    def text_encoder_g(self) -> CLIPTextEncoder:
        """The second encoder (with its pooling)."""
        return self.layer(("Parallel", 1), CLIPTextEncoder)

    @property
    def projection(self) -> fl.Linear:
        """The second encoder's text projection."""
        return self.text_encoder_g.ensure_find(TextEncoderWithPooling).projection

    @property
    def embedding_dim(self) -> int:
        """The width of the concatenated embedding."""
        return self.text_encoder_l.embedding_dim + self.text_encoder_g.embedding_dim

    def set_tokenizer(self, tokenizer: CLIPTokenizer) -> None:
        """Give both encoders a tokenizer: this one to CLIP-L, a copy padding with "!" to OpenCLIP-G.

        Args:
            tokenizer: The CLIP tokenizer (both encoders share the vocabulary).
        """
        self.text_encoder_l.set_tokenizer(tokenizer)
        self.text_encoder_g.set_tokenizer(tokenizer.with_pad_token("!"))
