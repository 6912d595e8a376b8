"""SDXL's text conditioning: OpenAI CLIP ViT-L and OpenCLIP ViT-bigG side by side.

Each encoder's penultimate hidden states (transformers' `hidden_states[-2]`) are concatenated along the features,
`768 + 1280 = 2048`, and the pooled embedding is OpenCLIP-G's final-layer-normed hidden state at the end-of-text
token, through its text projection (`CLIPTextModelWithProjection.text_embeds`), as diffusers'
`StableDiffusionXLPipeline.encode_prompt` computes them. The second tokenizer pads with "!" (SDXL's `tokenizer_2`).

The refiner conditions on OpenCLIP-G alone (`RefinerTextEncoder`: its penultimate hidden states, 1280 wide, and the
same pooled embedding), as diffusers' `StableDiffusionXLImg2ImgPipeline` does when it has no `text_encoder`.
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

__all__ = ["SDXLTextEncoder", "DoubleTextEncoder", "RefinerTextEncoder", "ConcatenateEmbeddings"]

Device = torch.device | str | None


class ConcatenateEmbeddings(fl.Module):
    """`(l_hidden, (g_hidden, pooled))` to `(cat([l_hidden, g_hidden], dim=-1), pooled)`."""

    def forward(self, l_hidden: Tensor, g_outputs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        g_hidden, pooled = g_outputs
        return torch.cat([l_hidden, g_hidden.to(l_hidden.dtype)], dim=-1), pooled


class SDXLTextEncoder(fl.Chain):
    """The text conditioning of an SDXL pipeline: text to `(embedding, pooled_embedding)`.

    What `StableDiffusion_XL` and its refiner need of it, whichever encoders it holds: its width, its tokenizer, and
    its encoders by the name diffusers gives their component (`text_encoder`, `text_encoder_2`), which community files
    (LoRAs, checkpoints) use.
    """

    @property
    def text_encoder_g(self) -> CLIPTextEncoder:
        """OpenCLIP-G, with its pooling (every SDXL model has it)."""
        raise NotImplementedError

    @property
    def projection(self) -> fl.Linear:
        """OpenCLIP-G's text projection."""
        return self.ensure_find(TextEncoderWithPooling).projection

    @property
    def embedding_dim(self) -> int:
        """The width of the embedding the UNet attends to."""
        return sum(encoder.embedding_dim for encoder in self.components().values())

    def components(self) -> dict[str, CLIPTextEncoder]:
        """The encoders, by diffusers' component name."""
        return {"text_encoder_2": self.text_encoder_g}

    def set_tokenizer(self, tokenizer: CLIPTokenizer) -> None:
        """Give OpenCLIP-G a copy of `tokenizer` that pads with "!", as SDXL's `tokenizer_2` does.

        Args:
            tokenizer: The CLIP tokenizer (SDXL's encoders share the vocabulary).
        """
        self.text_encoder_g.set_tokenizer(tokenizer.with_pad_token("!"))


class DoubleTextEncoder(SDXLTextEncoder):
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

    def components(self) -> dict[str, CLIPTextEncoder]:
        return {"text_encoder": self.text_encoder_l, "text_encoder_2": self.text_encoder_g}

    def set_tokenizer(self, tokenizer: CLIPTokenizer) -> None:
        """Give both encoders a tokenizer: this one to CLIP-L, a copy padding with "!" to OpenCLIP-G.

        Args:
            tokenizer: The CLIP tokenizer (both encoders share the vocabulary).
        """
        self.text_encoder_l.set_tokenizer(tokenizer)
        super().set_tokenizer(tokenizer)


class RefinerTextEncoder(SDXLTextEncoder):
    """OpenCLIP ViT-bigG alone: text to `(embedding, pooled_embedding)`, `(batch, 77, 1280)` and `(batch, 1280)`.

    The SDXL refiner's text conditioning: G's penultimate hidden states and its pooled embedding, as
    `DoubleTextEncoder` computes G's part of them.

    Args:
        text_encoder_g: The encoder (default: `CLIPTextEncoderG`).
        projection_dim: Size of the pooled embedding (default: the encoder's width).
        device: Where the weights of an encoder built here live.
        dtype: Their dtype.

    Example:
        ```py
        import torch
        from refiners.foundationals.clip import CLIPTextEncoder
        from refiners.foundationals.latent_diffusion.stable_diffusion_xl import RefinerTextEncoder

        encoder = RefinerTextEncoder(
            CLIPTextEncoder(embedding_dim=48, num_layers=2, num_attention_heads=4, feedforward_dim=96)
        )
        embedding, pooled = encoder(torch.randint(0, 49408, (1, 77)))
        assert embedding.shape == (1, 77, 48) and pooled.shape == (1, 48)
        ```
    """

    def __init__(
        self,
        text_encoder_g: CLIPTextEncoder | None = None,
        projection_dim: int | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        encoder_g = text_encoder_g if text_encoder_g is not None else CLIPTextEncoderG(device=device, dtype=dtype)
        TextEncoderWithPooling(encoder_g, projection_dim).inject()
        super().__init__(encoder_g)

    @property
    def text_encoder_g(self) -> CLIPTextEncoder:
        """The encoder (with its pooling)."""
        return self.layer(0, CLIPTextEncoder)
