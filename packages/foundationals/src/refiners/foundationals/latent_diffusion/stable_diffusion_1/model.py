"""Stable Diffusion 1.x: text-to-image, image-to-image and inpainting, step by step or in one `generate` call.

Loading converted weights (`refiners-convert sd1 --from SOURCE --to sd15/`) at the sizes they record, without paying
for a random initialization (the components are built on the "meta" device, then the files fill them, on CPU):

    sd15 = StableDiffusion_1.from_folder("sd15/", device="cuda", dtype=torch.float16)

Models of other sizes load the same way; by hand, build each component at its sizes on the "meta" device, then load:

    sd = StableDiffusion_1(unet=SD1UNet(channels=(32, 32, 64, 64), context_embedding_dim=32, device="meta"), ...)
    sd.unet.load_from_safetensors("unet.safetensors")

`StableDiffusion_1(device="cuda")` builds SD1.5's sizes with ~1B random weights (4 GB in float32) that loading then
overwrites. The solver never lives on the meta device: its schedule is computed when it is built. Loading a diffusers
folder, a Hub id or an original checkpoint in one call, converting in memory: `refiners.converters.from_pretrained`
and `from_single_file`.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder, CLIPTextEncoderL
from refiners.foundationals.clip.text_encoder_names import transformers_clip_text_modules
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder, SD1Autoencoder
from refiners.foundationals.latent_diffusion.inpainting import Inpainting
from refiners.foundationals.latent_diffusion.model import (
    LatentDiffusionModel,
    _prompt_list,
    moved_component,
    placed_solver,
)
from refiners.foundationals.latent_diffusion.solvers.dpm_solver import DPMSolver
from refiners.foundationals.latent_diffusion.solvers.solver import Solver
from refiners.foundationals.latent_diffusion.stable_diffusion_1.unet import SD1UNet
from refiners.foundationals.latent_diffusion.stable_diffusion_1.weights import ConvertedWeights, SD1Weights
from refiners.foundationals.latent_diffusion.unet_names import ModuleRenaming, diffusers_unet_modules, unet_renaming

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["StableDiffusion_1", "StableDiffusion_1_Inpainting"]

Device = torch.device | str | None

# diffusers' StableDiffusionPipeline draws images of the UNet's sample_size times 8 by default: 512x512 for SD1.5.
DEFAULT_SIZE = 512


class StableDiffusion_1(LatentDiffusionModel[SD1UNet, CLIPTextEncoder]):  # noqa: N801 (the name of the seed README's API)
    """Stable Diffusion 1.x: `SD1UNet`, `SD1Autoencoder`, `CLIPTextEncoderL` and a solver (DPM-Solver++, 30 steps).

    Components that are not given are built with Stable Diffusion 1.5's sizes on `device` (use `"meta"` to load
    weights into them without a random initialization: see the module's documentation).

    Args:
        unet: The denoising UNet, 4 input channels (default: `SD1UNet(in_channels=4)`).
        lda: The autoencoder (default: `SD1Autoencoder()`).
        clip_text_encoder: The text encoder (default: `CLIPTextEncoderL()`; give it a tokenizer, or load weights
            converted with their tokenizer, to encode text).
        solver: The solver (default: `DPMSolver(num_inference_steps=30)`).
        device: Where the components built here live; given components are moved there (None: left where they are).
            The solver goes to CPU when this is "meta".
        dtype: The weights' dtype of the components built here; given components are cast to it (None: left as
            they are). The solver's schedule stays in float32.
        default_size: The side, in pixels, of the images `generate` draws when given no size: the model's native
            resolution (512 for SD1.5; `from_folder` reads it from the weights).

    Example:
        ```py
        import torch
        from refiners.fluxion.utils import manual_seed
        from refiners.foundationals.clip import CLIPTextEncoder
        from refiners.foundationals.latent_diffusion import LatentDiffusionAutoencoder, SD1UNet, StableDiffusion_1

        sd = StableDiffusion_1(  # toy sizes; StableDiffusion_1(device="meta") then load weights for the real ones
            unet=SD1UNet(channels=(32, 32, 64, 64), context_embedding_dim=32),
            lda=LatentDiffusionAutoencoder(0.18215, block_out_channels=(32, 32, 32, 32), layers_per_block=1),
            clip_text_encoder=CLIPTextEncoder(embedding_dim=32, num_layers=1, num_attention_heads=4, feedforward_dim=64),
        )
        sd.set_num_inference_steps(5)
        manual_seed(2)
        x = sd.init_latents((64, 96))
        clip_text_embedding = torch.randn(2, 77, 32)  # the negative, then the positive prompt's embedding
        with torch.no_grad():
            for step in sd.steps:
                x = sd(x, step=step, clip_text_embedding=clip_text_embedding, condition_scale=7.5)
            image = sd.lda.decode_latents(x)
        assert image.size == (96, 64)
        ```
    """

    # The UNet's input channels: the latents' (4); the inpainting variant adds its conditions'.
    unet_in_channels: int = 4

    def __init__(
        self,
        unet: SD1UNet | None = None,
        lda: LatentDiffusionAutoencoder | None = None,
        clip_text_encoder: CLIPTextEncoder | None = None,
        solver: Solver | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
        default_size: int = DEFAULT_SIZE,
    ) -> None:
        unet = (
            SD1UNet(self.unet_in_channels, device=device, dtype=dtype)
            if unet is None
            else moved_component(unet, device, dtype)
        )
        lda = SD1Autoencoder(device=device, dtype=dtype) if lda is None else moved_component(lda, device, dtype)
        if clip_text_encoder is None:
            clip_text_encoder = CLIPTextEncoderL(device=device, dtype=dtype)
        else:
            clip_text_encoder = moved_component(clip_text_encoder, device, dtype)
        solver = placed_solver(solver, device, lambda on: DPMSolver(num_inference_steps=30, device=on))
        self._check_components(unet, lda, clip_text_encoder)
        super().__init__(unet, lda, clip_text_encoder, solver, default_size)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        solver: Solver | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """Load a folder that `refiners-convert sd1` wrote, at the sizes its files record (SD1.5's, or any other).

        The components are built on the "meta" device, then the files fill them: no random initialization is paid.
        The text encoder gets the tokenizer its file carries, and `generate` the UNet's native size. Files converted
        before sizes were recorded load as SD1.5's.

        Args:
            folder: The folder of `clip_text.safetensors`, `autoencoder.safetensors` and `unet.safetensors`.
            solver: The solver (default: `DPMSolver(num_inference_steps=30)`).
            device: Where the model goes once loaded (default: CPU).
            dtype: The weights' dtype (default: float32, whatever the files'), as diffusers' `torch_dtype`.

        Raises:
            FileNotFoundError: A file is missing; the message gives the command that writes it.
            ValueError: The files do not fit this pipeline (e.g. an inpainting UNet for `StableDiffusion_1`: use
                `StableDiffusion_1_Inpainting`), or one without recorded sizes is not SD1.5-sized.
        """
        return cls._from_weights(SD1Weights.read(folder), solver, device, dtype)

    @classmethod
    def from_converted(
        cls,
        unet: ConvertedWeights,
        lda: ConvertedWeights,
        clip_text_encoder: ConvertedWeights,
        *,
        solver: Solver | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """Build the model from weights converted in memory: what `from_folder` reads, without the files.

        `refiners.converters.from_pretrained` and `from_single_file` convert a source and call this.

        Args:
            unet: The UNet's tensors and metadata.
            lda: The autoencoder's tensors and metadata.
            clip_text_encoder: The text encoder's tensors and metadata (with its tokenizer, to encode text).
            solver: The solver (default: `DPMSolver(num_inference_steps=30)`).
            device: Where the model goes once loaded (default: CPU).
            dtype: The weights' dtype (default: float32, whatever the tensors').
        """
        return cls._from_weights(SD1Weights(unet, lda, clip_text_encoder), solver, device, dtype)

    @classmethod
    def _from_weights(
        cls, weights: SD1Weights, solver: Solver | None, device: Device, dtype: torch.dtype | None
    ) -> Self:
        lda = weights.build_lda(dtype)
        # Built and checked together on the meta device first: weights that do not fit fail before any is read.
        model = cls(
            unet=weights.build_unet(cls.unet_in_channels, dtype),
            lda=lda,
            clip_text_encoder=weights.build_clip_text_encoder(dtype),
            solver=solver,
            default_size=weights.sample_size * lda.downscale_factor,
        )
        weights.unet.load_into(model.unet)
        weights.lda.load_into(model.lda)
        weights.clip_text_encoder.load_into(model.clip_text_encoder)
        return model if device is None else model.to(device=device)

    def _check_components(self, unet: SD1UNet, lda: LatentDiffusionAutoencoder, encoder: CLIPTextEncoder) -> None:
        if unet.in_channels != self.unet_in_channels:
            advice = {
                4: "use StableDiffusion_1 for a text-to-image UNet",
                9: "use StableDiffusion_1_Inpainting for an inpainting UNet",
            }.get(unet.in_channels, "build it with the matching in_channels")
            raise ValueError(
                f"{type(self).__name__} needs a UNet with {self.unet_in_channels} input channels, got one with "
                f"{unet.in_channels}: {advice}"
            )
        if unet.context_embedding_dim != encoder.embedding_dim:
            raise ValueError(
                f"the UNet attends to text embeddings of size {unet.context_embedding_dim} but the text encoder makes "
                f"them of size {encoder.embedding_dim}: build them for the same model (768 for SD1's CLIP ViT-L)"
            )
        if lda.latent_channels != 4:
            raise ValueError(
                f"Stable Diffusion 1 works on 4-channel latents, the autoencoder has {lda.latent_channels}"
            )

    def set_unet_context(self, *, timestep: Tensor, clip_text_embedding: Tensor, **conditioning: Tensor) -> None:
        if conditioning:
            raise ValueError(
                f"Stable Diffusion 1 is conditioned by the text embedding alone, got {sorted(conditioning)} too"
            )
        self.unet.set_timestep(timestep)
        self.unet.set_clip_text_embedding(clip_text_embedding)

    def diffusers_modules(self) -> dict[str, fl.WeightedModule]:
        return {f"unet.{name}": module for name, module in diffusers_unet_modules(self.unet).items()} | {
            f"text_encoder.{name}": module
            for name, module in transformers_clip_text_modules(self.clip_text_encoder).items()
        }

    def original_renamings(self) -> dict[str, ModuleRenaming]:
        return {"unet": unet_renaming(self.unet)}

    def compute_clip_text_embedding(self, text: str | Sequence[str], negative_text: str | Sequence[str] = "") -> Tensor:
        """The text embedding classifier-free guidance needs: the negative prompts' rows, then the prompts'.

        Both halves are encoded in one batch. `__call__` repeats each prompt's rows over as many latents as there
        are per prompt.

        Args:
            text: A prompt, or a batch of prompts.
            negative_text: What to steer away from: one negative prompt for all prompts, or one per prompt. The
                empty default is the unconditional embedding of classifier-free guidance.

        Returns:
            `(2 * prompts, sequence_length, embedding_dim)`: `cat([negative, positive])`.
        """
        prompts = _prompt_list(text, "text")
        return self.clip_text_encoder([*self._negative_prompts(prompts, negative_text), *prompts])

    def _prompt_conditioning(
        self, prompts: list[str], negative_prompts: list[str] | None, guided: bool
    ) -> dict[str, Tensor]:
        if not guided:
            return {"clip_text_embedding": self.clip_text_encoder(prompts)}
        return {"clip_text_embedding": self.compute_clip_text_embedding(prompts, negative_prompts or "")}

    def _check_generation_images(self, init_image: "Image.Image | None", mask: "Image.Image | None") -> None:
        if mask is not None:
            raise ValueError(
                "a mask is for inpainting, which needs an inpainting UNet: use StableDiffusion_1_Inpainting with the "
                "inpainting weights"
            )


class StableDiffusion_1_Inpainting(Inpainting, StableDiffusion_1):  # noqa: N801
    """Stable Diffusion 1.x inpainting: the UNet also sees the mask and the latents of the image outside the mask.

    Its UNet has 9 input channels: the latents, the mask at the latents' size, and the masked image's latents,
    concatenated as diffusers' `StableDiffusionInpaintPipeline` does (see `Inpainting`). At full strength (the
    default), a generation starts from pure noise: the image only reaches the UNet through the conditions.

    Args:
        unet: The inpainting UNet (default: `SD1UNet(in_channels=9)`).
        lda: The autoencoder (default: `SD1Autoencoder()`).
        clip_text_encoder: The text encoder (default: `CLIPTextEncoderL()`).
        solver: The solver (default: `DPMSolver(num_inference_steps=30)`).
        device: Where the components built here live; given components are moved there (None: left where they are).
        dtype: The weights' dtype of the components built here; given components are cast to it.
        default_size: The side, in pixels, of the images `generate` draws when given no size (512 for SD1.5).
    """
