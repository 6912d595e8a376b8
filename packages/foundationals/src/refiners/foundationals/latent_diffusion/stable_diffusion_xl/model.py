"""Stable Diffusion XL: text-to-image and image-to-image, step by step or in one `generate` call.

The step by step loop, as for SD1, with SDXL's two more side inputs, the pooled text embedding and the time ids:

    embedding, pooled = sdxl.compute_clip_text_embedding("a cute cat")
    time_ids = sdxl.default_time_ids()  # [h, w, top, left, target_h, target_w] for 1024x1024
    sdxl.set_num_inference_steps(30)
    x = sdxl.init_latents((1024, 1024))
    for step in sdxl.steps:
        x = sdxl(x, step=step, clip_text_embedding=embedding, pooled_text_embedding=pooled, time_ids=time_ids)
    image = sdxl.lda.decode_latents(x)
"""

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Self

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.model_config import ModelConfig
from refiners.foundationals.clip.text_encoder import CLIPTextEncoder, CLIPTextEncoderG, CLIPTextEncoderL
from refiners.foundationals.clip.text_encoder_names import transformers_clip_text_modules
from refiners.foundationals.clip.tokenizer import METADATA_PREFIX as TOKENIZER_METADATA_PREFIX
from refiners.foundationals.clip.tokenizer import CLIPTokenizer
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder, SD1Autoencoder
from refiners.foundationals.latent_diffusion.inpainting import Inpainting
from refiners.foundationals.latent_diffusion.model import (
    LatentDiffusionModel,
    _prompt_list,
    moved_component,
    placed_solver,
)
from refiners.foundationals.latent_diffusion.solvers.ddim import DDIM
from refiners.foundationals.latent_diffusion.solvers.solver import Solver, SolverParams, TimestepSpacing
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.text_encoder import (
    DoubleTextEncoder,
    RefinerTextEncoder,
    SDXLTextEncoder,
)
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.unet import SDXLRefinerUNet, SDXLUNet
from refiners.foundationals.latent_diffusion.unet_names import ModuleRenaming, diffusers_unet_modules, unet_renaming
from refiners.foundationals.latent_diffusion.weights import (
    AUTOENCODER_FILE,
    CLIP_TEXT_FILE,
    SAMPLE_SIZE_KEY,
    UNET_FILE,
    WeightsFile,
)

__all__ = [
    "SDXL_UNET_CLASSES",
    "SDXL_AUTOENCODER_CLASSES",
    "SDXL_TEXT_ENCODER_CLASSES",
    "SDXL_SOLVER_PARAMS",
    "SDXL_LIGHTNING_SOLVER_PARAMS",
    "SDXLAutoencoder",
    "StableDiffusion_XL",
    "StableDiffusion_XL_Inpainting",
    "StableDiffusion_XL_Refiner",
]

Device = torch.device | str | None

SDXL_SOLVER_PARAMS = SolverParams(timesteps_spacing=TimestepSpacing.LEADING)
"""SDXL base's scheduler config: SD1.5's betas, timesteps spaced "leading" with an offset of 1, for every solver."""

SDXL_LIGHTNING_SOLVER_PARAMS = SolverParams(timesteps_spacing=TimestepSpacing.TRAILING)
"""SDXL-Lightning's (ByteDance): its distilled UNets (or LoRAs) run `Euler` with "trailing" timesteps, in 1 to 8
steps, without classifier-free guidance (`generate(..., guidance_scale=0)`), as its model card sets diffusers up."""

# diffusers' StableDiffusionXLPipeline draws 1024x1024 images by default (the UNet's sample_size times 8).
DEFAULT_SIZE = 1024


class SDXLAutoencoder(LatentDiffusionAutoencoder):
    """The autoencoder of Stable Diffusion XL: SD1's architecture, latents scaled by 0.13025.

    The fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix) has the same architecture and loads into it.

    Args:
        device: Where the weights live.
        dtype: The weights' dtype.
    """

    def __init__(self, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            encoder_scale=0.13025,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            device=device,
            dtype=dtype,
        )


SDXL_UNET_CLASSES = (SDXLUNet, SDXLRefinerUNet)
SDXL_AUTOENCODER_CLASSES = (LatentDiffusionAutoencoder, SD1Autoencoder, SDXLAutoencoder)
SDXL_TEXT_ENCODER_CLASSES = (DoubleTextEncoder, RefinerTextEncoder, CLIPTextEncoder, CLIPTextEncoderL, CLIPTextEncoderG)
"""The classes a converted SDXL file may record for each component (`ModelConfig.build` builds only these)."""


class StableDiffusion_XL(LatentDiffusionModel[SDXLUNet, SDXLTextEncoder]):  # noqa: N801 (the original's name)
    """Stable Diffusion XL: `SDXLUNet`, `SDXLAutoencoder`, `DoubleTextEncoder` and a solver (DDIM, 30 steps).

    Components that are not given are built with SDXL base's sizes on `device` (`"meta"` to load weights into them
    without a random initialization).

    Args:
        unet: The denoising UNet, 4 input channels (default: `SDXLUNet()`).
        lda: The autoencoder (default: `SDXLAutoencoder()`).
        clip_text_encoder: The two text encoders (default: `DoubleTextEncoder()`; give it a tokenizer, or load
            weights converted with their tokenizer, to encode text).
        solver: The solver (default: `DDIM(num_inference_steps=30, params=SDXL_SOLVER_PARAMS)`).
        device: Where the components built here live; given components are moved there (None: left where they are).
        dtype: The weights' dtype of the components built here; given components are cast to it.
        default_size: The side, in pixels, of the images `generate` draws when given no size (1024 for SDXL).
    """

    default_guidance_scale: ClassVar[float] = 5.0
    latent_conditioning_names: ClassVar[frozenset[str]] = frozenset({"time_ids", "negative_time_ids"})
    force_zeros_for_empty_prompt: ClassVar[bool] = True
    """Whether a missing negative prompt means zero embeddings (diffusers' option of the same name), else ""."""
    text_encoder_class: ClassVar[type[SDXLTextEncoder]] = DoubleTextEncoder
    unet_in_channels: int = 4

    def __init__(
        self,
        unet: SDXLUNet | None = None,
        lda: LatentDiffusionAutoencoder | None = None,
        clip_text_encoder: SDXLTextEncoder | None = None,
        solver: Solver | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
        default_size: int = DEFAULT_SIZE,
    ) -> None:
        unet = self.default_unet(device, dtype) if unet is None else unet
        lda = SDXLAutoencoder(device=device, dtype=dtype) if lda is None else lda
        if clip_text_encoder is None:
            clip_text_encoder = self.default_text_encoder(device, dtype)
        if not isinstance(clip_text_encoder, self.text_encoder_class):
            raise ValueError(
                f"{type(self).__name__} conditions on a {self.text_encoder_class.__name__}, got a "
                f"{type(clip_text_encoder).__name__}"
            )
        solver = placed_solver(solver, device, lambda on: DDIM(30, params=SDXL_SOLVER_PARAMS, device=on))
        if unet.in_channels != self.unet_in_channels:
            raise ValueError(
                f"{type(self).__name__} needs a UNet with {self.unet_in_channels} input channels, got one with "
                f"{unet.in_channels}"
            )
        if unet.context_embedding_dim != clip_text_encoder.embedding_dim:
            raise ValueError(
                f"the UNet attends to text embeddings of size {unet.context_embedding_dim} but the text encoders make "
                f"them of size {clip_text_encoder.embedding_dim}: build them for the same model (2048 for SDXL, 1280 "
                "for its refiner)"
            )
        super().__init__(
            moved_component(unet, device, dtype),
            moved_component(lda, device, dtype),
            moved_component(clip_text_encoder, device, dtype),
            solver,
            default_size,
        )

    def default_unet(self, device: Device, dtype: torch.dtype | None) -> SDXLUNet:
        """The UNet built when none is given: SDXL base's."""
        return SDXLUNet(self.unet_in_channels, device=device, dtype=dtype)

    def default_text_encoder(self, device: Device, dtype: torch.dtype | None) -> SDXLTextEncoder:
        """The text encoder built when none is given: CLIP-L and OpenCLIP-G."""
        return DoubleTextEncoder(device=device, dtype=dtype)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        solver: Solver | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """Load a folder that `refiners-convert sdxl` wrote, at the sizes its files record (SDXL's, or any other).

        The components are built on the "meta" device, then the files fill them: no random initialization is paid.

        Args:
            folder: The folder of `clip_text.safetensors`, `autoencoder.safetensors` and `unet.safetensors`.
            solver: The solver (default: DDIM, 30 steps, SDXL's schedule).
            device: Where the model goes once loaded (default: CPU).
            dtype: The weights' dtype (default: float32), as diffusers' `torch_dtype`.

        Raises:
            FileNotFoundError: A file is missing; the message gives the command that writes it.
            ValueError: A file records no sizes, or sizes of another family's model.
        """
        path = Path(folder).expanduser()
        command = f"refiners-convert sdxl --from SOURCE --to {path}"
        files = {name: WeightsFile.open(path / name, command) for name in (UNET_FILE, AUTOENCODER_FILE, CLIP_TEXT_FILE)}
        built: list[torch.nn.Module] = []
        for name, classes in (
            (UNET_FILE, SDXL_UNET_CLASSES),
            (AUTOENCODER_FILE, SDXL_AUTOENCODER_CLASSES),
            (CLIP_TEXT_FILE, SDXL_TEXT_ENCODER_CLASSES),
        ):
            config = ModelConfig.from_metadata(files[name].metadata)
            if config is None:
                raise ValueError(f"{path / name} records no model sizes: convert it again with `{command}`")
            built.append(config.build(classes, device="meta", dtype=dtype))
        unet, lda, encoder = built
        assert isinstance(unet, SDXLUNet) and isinstance(lda, LatentDiffusionAutoencoder)
        assert isinstance(encoder, SDXLTextEncoder)
        if not isinstance(encoder, cls.text_encoder_class):
            other = StableDiffusion_XL_Refiner if isinstance(encoder, RefinerTextEncoder) else StableDiffusion_XL
            what = "an SDXL refiner (OpenCLIP-G alone)" if other is StableDiffusion_XL_Refiner else "an SDXL base model"
            raise ValueError(f"{path} holds {what}: load it with {other.__name__}.from_folder")
        clip_metadata = files[CLIP_TEXT_FILE].metadata
        if any(key.startswith(TOKENIZER_METADATA_PREFIX) for key in clip_metadata):
            encoder.set_tokenizer(CLIPTokenizer.from_metadata(clip_metadata))
        sample_size = int(files[UNET_FILE].metadata.get(SAMPLE_SIZE_KEY, DEFAULT_SIZE // lda.downscale_factor))
        model = cls(
            unet=unet,
            lda=lda,
            clip_text_encoder=encoder,
            solver=solver,
            default_size=sample_size * lda.downscale_factor,
        )
        for name, module in zip((UNET_FILE, AUTOENCODER_FILE, CLIP_TEXT_FILE), built, strict=True):
            files[name].load_into(module)
        return model if device is None else model.to(device=device)

    def diffusers_modules(self) -> dict[str, fl.WeightedModule]:
        modules = {f"unet.{name}": module for name, module in diffusers_unet_modules(self.unet).items()}
        for component, encoder in self.clip_text_encoder.components().items():
            modules |= {f"{component}.{name}": m for name, m in transformers_clip_text_modules(encoder).items()}
        return modules

    def original_renamings(self) -> dict[str, ModuleRenaming]:
        return {"unet": unet_renaming(self.unet)}

    def compute_clip_text_embedding(
        self, text: str | Sequence[str], negative_text: str | Sequence[str] | None = ""
    ) -> tuple[Tensor, Tensor]:
        """The text and pooled embeddings classifier-free guidance needs: the negative prompts' rows, then the prompts'.

        Args:
            text: A prompt, or a batch of prompts.
            negative_text: What to steer away from: one negative prompt for all prompts, or one per prompt. None:
                zero embeddings, as diffusers' SDXL pipeline does for a missing negative prompt
                (`force_zeros_for_empty_prompt`).

        Returns:
            `(2 * prompts, 77, 2048)` and `(2 * prompts, 1280)`: each `cat([negative, positive])`.
        """
        prompts = _prompt_list(text, "text")
        if negative_text is None:
            embedding, pooled = self.clip_text_encoder(prompts)
            return torch.cat([torch.zeros_like(embedding), embedding]), torch.cat([torch.zeros_like(pooled), pooled])
        return self.clip_text_encoder([*self._negative_prompts(prompts, negative_text), *prompts])

    def default_time_ids(
        self,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """SDXL's micro-conditioning, `(1, 6)`: `[original_h, original_w, crop_top, crop_left, target_h, target_w]`.

        Args:
            original_size: `(height, width)` the image is said to come from (default: `default_size` square).
            crops_coords_top_left: `(top, left)` of the crop it is said to be.
            target_size: `(height, width)` it is said to be made at (default: `default_size` square).
        """
        original = original_size or (self.default_size, self.default_size)
        target = target_size or (self.default_size, self.default_size)
        values = [*original, *crops_coords_top_left, *target]
        return torch.tensor([values], device=self.device, dtype=self.dtype)

    def forward(
        self,
        x: Tensor,
        step: int,
        *,
        clip_text_embedding: Tensor,
        condition_scale: float = 5.0,
        generator: torch.Generator | None = None,
        **conditioning: Tensor,
    ) -> Tensor:
        """One denoising step with classifier-free guidance.

        Args:
            x: The latents, `(batch, 4, height / 8, width / 8)`.
            step: The index of the step in the solver's schedule (one of `steps`).
            clip_text_embedding: `compute_clip_text_embedding`'s first output, negative rows first.
            condition_scale: The guidance scale (diffusers' `guidance_scale`, 5.0 in its SDXL pipeline).
            generator: The random generator of stochastic solvers.
            **conditioning: `pooled_text_embedding` (`compute_clip_text_embedding`'s second output) and `time_ids`
                (`(batch, 6)` or `(1, 6)` for the conditional batch, e.g. `default_time_ids()`; doubled internally).
        """
        missing = {"pooled_text_embedding", "time_ids"} - set(conditioning)
        if missing:
            raise ValueError(
                f"Stable Diffusion XL also needs {sorted(missing)}: pass pooled_text_embedding (the second output of "
                "compute_clip_text_embedding) and time_ids (e.g. default_time_ids())"
            )
        return super().forward(
            x,
            step,
            clip_text_embedding=clip_text_embedding,
            condition_scale=condition_scale,
            generator=generator,
            **conditioning,
        )

    def set_unet_context(self, *, timestep: Tensor, clip_text_embedding: Tensor, **conditioning: Tensor) -> None:
        unknown = set(conditioning) - {"pooled_text_embedding", "time_ids"}
        if unknown:
            raise ValueError(f"Stable Diffusion XL has no conditioning named {sorted(unknown)}")
        self.unet.set_timestep(timestep)
        self.unet.set_clip_text_embedding(clip_text_embedding)
        self.unet.set_pooled_text_embedding(conditioning["pooled_text_embedding"])
        self.unet.set_time_ids(conditioning["time_ids"])

    def _prompt_conditioning(
        self, prompts: list[str], negative_prompts: list[str] | None, guided: bool
    ) -> dict[str, Tensor]:
        if guided:
            negatives = negative_prompts
            if negatives is None and not self.force_zeros_for_empty_prompt:
                negatives = [""] * len(prompts)
            embedding, pooled = self.compute_clip_text_embedding(prompts, negatives)
        else:
            embedding, pooled = self.clip_text_encoder(prompts)
        return {"clip_text_embedding": embedding, "pooled_text_embedding": pooled}

    def micro_conditioning(
        self,
        size: tuple[int, int],
        *,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor]:
        """The time ids `generate` conditions on; its keyword arguments are `generate`'s options of the same names.

        Args:
            size: `(height, width)` of the generated images, in pixels.
            original_size: `(height, width)` the image is said to come from (default: `size`).
            crops_coords_top_left: `(top, left)` of the crop it is said to be.
            target_size: `(height, width)` it is said to be made at (default: `size`).
        """
        return {"time_ids": self.default_time_ids(original_size or size, crops_coords_top_left, target_size or size)}


class StableDiffusion_XL_Inpainting(Inpainting, StableDiffusion_XL):  # noqa: N801
    """Stable Diffusion XL inpainting: a 9-channel `SDXLUNet` that also sees the mask and the masked image's latents,
    as diffusers' `StableDiffusionXLInpaintPipeline` (see `Inpainting`; `set_inpainting_conditions` before stepping,
    or `generate(prompt, init_image=..., mask=...)`).

    Args:
        unet: The inpainting UNet (default: `SDXLUNet(in_channels=9)`).
        lda: The autoencoder (default: `SDXLAutoencoder()`).
        clip_text_encoder: The two text encoders (default: `DoubleTextEncoder()`).
        solver: The solver (default: DDIM, 30 steps, SDXL's schedule).
        device: Where the components built here live; given components are moved there.
        dtype: The weights' dtype of the components built here; given components are cast to it.
        default_size: The side, in pixels, of the images `generate` draws when given no size (1024 for SDXL).
    """

    default_guidance_scale: ClassVar[float] = 7.5  # diffusers' StableDiffusionXLInpaintPipeline's


class StableDiffusion_XL_Refiner(StableDiffusion_XL):  # noqa: N801
    """The SDXL refiner: `SDXLRefinerUNet`, OpenCLIP-G alone (`RefinerTextEncoder`) and aesthetic-score time ids.

    As diffusers' `StableDiffusionXLImg2ImgPipeline` with the refiner (`requires_aesthetics_score`): its time ids are
    `[h, w, top, left, aesthetic_score]`, the negative prompt's with `negative_aesthetic_score` (see
    `default_time_ids`), and a missing negative prompt is the empty prompt. It finishes what the base started, the
    ensemble of experts:

        latents = sdxl.generate_latents(prompt, num_inference_steps=40, denoising_end=0.8, seed=0)
        images = refiner.generate(prompt, num_inference_steps=40, init_latents=latents, denoising_start=0.8)

    or refines an image (`generate(prompt, init_image=image)`, strength 0.3 by default, as diffusers').

    Args:
        unet: The denoising UNet (default: `SDXLRefinerUNet()`).
        lda: The autoencoder (default: `SDXLAutoencoder()`).
        clip_text_encoder: OpenCLIP-G (default: `RefinerTextEncoder()`).
        solver: The solver (default: DDIM, 30 steps, SDXL's schedule).
        device: Where the components built here live; given components are moved there.
        dtype: The weights' dtype of the components built here; given components are cast to it.
        default_size: The side, in pixels, of the images `generate` draws when given no size (1024).
    """

    default_strength: ClassVar[float] = 0.3
    force_zeros_for_empty_prompt: ClassVar[bool] = False
    text_encoder_class: ClassVar[type[SDXLTextEncoder]] = RefinerTextEncoder

    def default_unet(self, device: Device, dtype: torch.dtype | None) -> SDXLUNet:
        """The UNet built when none is given: the refiner's."""
        return SDXLRefinerUNet(self.unet_in_channels, device=device, dtype=dtype)

    def default_text_encoder(self, device: Device, dtype: torch.dtype | None) -> SDXLTextEncoder:
        """The text encoder built when none is given: OpenCLIP-G alone."""
        return RefinerTextEncoder(device=device, dtype=dtype)

    def default_time_ids(
        self,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        *,
        aesthetic_score: float = 6.0,
    ) -> Tensor:
        """The refiner's micro-conditioning, `(1, 5)`: `[original_h, original_w, crop_top, crop_left, aesthetic_score]`.

        Args:
            original_size: `(height, width)` the image is said to come from (default: `default_size` square).
            crops_coords_top_left: `(top, left)` of the crop it is said to be.
            target_size: Not a time id of the refiner: leave it out.
            aesthetic_score: The score the image is said to have (diffusers' `aesthetic_score`, 6.0; its
                `negative_aesthetic_score`, 2.5, goes with the negative prompt).
        """
        if target_size is not None:
            raise ValueError(
                "the refiner's time ids hold an aesthetic score instead of a target size: leave target_size out"
            )
        original = original_size or (self.default_size, self.default_size)
        values = [*original, *crops_coords_top_left, aesthetic_score]
        return torch.tensor([values], device=self.device, dtype=self.dtype)

    def micro_conditioning(
        self,
        size: tuple[int, int],
        *,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
    ) -> dict[str, Tensor]:
        """The time ids of the prompts and of the negative prompts; the keywords are `generate`'s options.

        Args:
            size: `(height, width)` of the generated images, in pixels.
            original_size: `(height, width)` the image is said to come from (default: `size`).
            crops_coords_top_left: `(top, left)` of the crop it is said to be.
            target_size: Not a time id of the refiner: leave it out.
            aesthetic_score: The prompts' aesthetic score (6.0, diffusers' default).
            negative_aesthetic_score: The negative prompts' (2.5).
            negative_original_size: The negative prompts' original size (default: `original_size`).
            negative_crops_coords_top_left: The negative prompts' crop.
        """
        original = original_size or size
        return {
            "time_ids": self.default_time_ids(
                original, crops_coords_top_left, target_size, aesthetic_score=aesthetic_score
            ),
            "negative_time_ids": self.default_time_ids(
                negative_original_size or original,
                negative_crops_coords_top_left,
                aesthetic_score=negative_aesthetic_score,
            ),
        }
