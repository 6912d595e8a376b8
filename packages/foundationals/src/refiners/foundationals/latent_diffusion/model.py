"""The base of latent diffusion pipelines: a denoising UNet, an autoencoder, a text encoder and a solver, together.

`LatentDiffusionModel` runs one denoising step per call, with classifier-free guidance, and prepares what a
generation starts from (`init_latents`: pure noise, or a noised image for image-to-image). The loop itself stays in
the caller's hands, as in the README's Hello World:

    clip_text_embedding = sd.compute_clip_text_embedding("a cute cat")
    sd.set_num_inference_steps(30)
    x = sd.init_latents((512, 512))
    for step in sd.steps:
        x = sd(x, step=step, clip_text_embedding=clip_text_embedding, condition_scale=7.5)
    image = sd.lda.decode_latents(x)

The random draws (posterior sample of an init image, initial noise, stochastic solvers' noise) come from a
`torch.Generator` when one is given, else from torch's global generator (seeded by `manual_seed`); their order is
diffusers' pipelines', so the same seed gives the same draws on both sides.
"""

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import torch
from torch import Tensor

import refiners.fluxion.layers as fl
from refiners.fluxion.utils import image_to_tensor
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from refiners.foundationals.latent_diffusion.solvers.solver import Solver
from refiners.foundationals.latent_diffusion.unet_names import ModuleRenaming

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "LatentDiffusionModel",
    "batch_conditioning",
    "DENOISING_CONTEXT",
    "STEP_INDEX_KEY",
    "NUM_STEPS_KEY",
    "GUIDED_KEY",
    "GuidanceTerm",
    "StepPreparation",
]

UNetT = TypeVar("UNetT", bound=fl.Chain)
TextEncoderT = TypeVar("TextEncoderT", bound=fl.Chain)

DENOISING_CONTEXT = "denoising"
"""The UNet's context where `LatentDiffusionModel` says which step of the run it denoises (for adapters that act on a
part of the run, or on the guided half of the batch)."""
STEP_INDEX_KEY = "step_index"
"""`DENOISING_CONTEXT[STEP_INDEX_KEY]`: the position of the step among the steps the run denoises (0 first), diffusers'
`i` in its pipelines' loops."""
NUM_STEPS_KEY = "num_steps"
"""`DENOISING_CONTEXT[NUM_STEPS_KEY]`: how many steps the run denoises, diffusers' `len(timesteps)`."""
GUIDED_KEY = "guided"
"""`DENOISING_CONTEXT[GUIDED_KEY]`: whether the UNet's batch is classifier-free guidance's negative half, then the
positive half."""


class GuidanceTerm(Protocol):
    """A term added to each step's noise prediction, computed from the UNet's predictions (self-attention guidance).

    `LatentDiffusionModel.guidance_terms` holds them: an adapter appends itself on `inject`, removes itself on
    `eject`.
    """

    def __call__(self, x: Tensor, step: int, predictions: Tensor, conditioning: Mapping[str, Tensor]) -> Tensor:
        """The term to add to the (guided) prediction of `x` at `step`.

        Args:
            x: The latents of the step, `(batch, latent_channels, height, width)`.
            step: The index of the step in the solver's schedule.
            predictions: The UNet's output: the negative half, then the positive half, when guided (`2 * batch`
                rows), else `batch` rows.
            conditioning: The UNet's conditioning, batched the same way (see `batch_conditioning`).
        """
        ...


class StepPreparation(Protocol):
    """Work done before each step's UNet pass, once the UNet's contexts are set (reference-only control runs the UNet
    on the reference there).

    `LatentDiffusionModel.step_preparations` holds them: an adapter appends itself on `inject`, removes itself on
    `eject`.
    """

    def __call__(self, x: Tensor, step: int, generator: torch.Generator | None) -> None:
        """Prepare the UNet's pass on `x` at `step`.

        Args:
            x: The latents of the step, `(batch, latent_channels, height, width)`.
            step: The index of the step in the solver's schedule.
            generator: The step's random generator (drawn from before the solver's own draws, as diffusers'
                reference pipelines do), or None for torch's global one.
        """
        ...


NEGATIVE = "negative_"
"""The prefix of the per-latent conditioning of the negative half only (see `batch_conditioning`)."""


def batch_conditioning(
    prompt_rows: Mapping[str, Tensor], latent_rows: Mapping[str, Tensor], batch: int, guided: bool
) -> dict[str, Tensor]:
    """The UNet's conditioning for a batch of latents, with classifier-free guidance's two halves when `guided`.

    The one place where every family's conditioning is batched: the UNet then runs on `cat([latents, latents])`.

    Args:
        prompt_rows: Conditioning made per prompt (text embeddings, pooled embeddings): `(2 * prompts, ...)`,
            negative rows first, when guided, else `(prompts, ...)`. Each prompt serves `batch / prompts`
            consecutive latents: its rows are repeated, each half on its own, the negative rows staying first.
        latent_rows: Conditioning made per latent (SDXL's time ids): `(batch, ...)` or `(1, ...)` for all; both
            halves get the same rows, but where `negative_<name>` is given too: the negative half gets its rows (the
            SDXL refiner's time ids hold a lower aesthetic score for the negative prompt).
        batch: The number of latents.
        guided: Whether the UNet runs the negative and the positive halves in one batch.
    """
    batched: dict[str, Tensor] = {}
    negatives = {name.removeprefix(NEGATIVE): t for name, t in latent_rows.items() if name.startswith(NEGATIVE)}
    if unpaired := sorted(set(negatives) - set(latent_rows)):
        raise ValueError(f"negative_{unpaired[0]} is given without {unpaired[0]}: give both, or neither")
    for name, tensor in prompt_rows.items():
        prompts = tensor.shape[0] // (2 if guided else 1)
        if tensor.shape[0] % (2 if guided else 1) != 0 or prompts == 0 or batch % prompts != 0:
            raise ValueError(
                f"{name} has {tensor.shape[0]} rows for {batch} latents: it needs "
                + ("2 * prompts rows (negative rows first)" if guided else "one row per prompt")
                + ", and the number of latents must be a multiple of the number of prompts"
            )
        halves = tensor.chunk(2) if guided else (tensor,)
        batched[name] = torch.cat([half.repeat_interleave(batch // prompts, dim=0) for half in halves])

    def rows_of(name: str, tensor: Tensor) -> Tensor:
        if tensor.shape[0] not in (1, batch):
            raise ValueError(f"{name} has {tensor.shape[0]} rows for {batch} latents: give one row per latent, or one")
        return tensor.expand(batch, *tensor.shape[1:])

    for name, tensor in latent_rows.items():
        if name.startswith(NEGATIVE):
            continue
        rows = rows_of(name, tensor)
        negative_rows = rows_of(NEGATIVE + name, negatives[name]) if name in negatives else rows
        batched[name] = torch.cat([negative_rows, rows]) if guided else rows
    return batched


class LatentDiffusionModel(fl.Module, ABC, Generic[UNetT, TextEncoderT]):
    """A latent diffusion pipeline: `unet`, `lda` (the autoencoder), `clip_text_encoder` and `solver`.

    Calling it runs one denoising step: `model(x, step=step, clip_text_embedding=embedding, condition_scale=7.5)`.
    The model's `device` and `dtype` are the UNet's; move all components at once with `.to(...)`. A family
    (`StableDiffusion_1`, `StableDiffusion_XL`) says how it encodes prompts (`_prompt_conditioning`) and gives the
    UNet its side inputs (`set_unet_context`); stepping, guidance, image-to-image and `generate` live here.

    Args:
        unet: The denoising model; `set_unet_context` gives it the timestep and the conditioning.
        lda: The autoencoder between images and latents.
        clip_text_encoder: The text encoder (with its tokenizer, to encode text).
        solver: The diffusion solver (its number of steps can be changed with `set_num_inference_steps`).
        default_size: The side, in pixels, of the images `generate` draws when given no size.
    """

    unet: UNetT
    lda: LatentDiffusionAutoencoder
    clip_text_encoder: TextEncoderT
    solver: Solver
    default_guidance_scale: ClassVar[float] = 7.5
    """`generate`'s default classifier-free guidance scale (diffusers' pipelines': 7.5 for SD1, 5.0 for SDXL)."""
    default_size: int
    """The side, in pixels, of the images `generate` draws when given no size (the UNet's native size)."""
    default_strength: ClassVar[float] = 0.8
    """Image-to-image's default share of the schedule (diffusers' img2img pipelines': 0.8; 0.3 for SDXL's refiner)."""

    def __init__(
        self,
        unet: UNetT,
        lda: LatentDiffusionAutoencoder,
        clip_text_encoder: TextEncoderT,
        solver: Solver,
        default_size: int = 512,
    ) -> None:
        if default_size < 1 or default_size % lda.downscale_factor != 0:
            raise ValueError(
                f"default_size must be a positive multiple of {lda.downscale_factor} (the autoencoder's downscale "
                f"factor), got {default_size}"
            )
        super().__init__()
        self.unet = unet
        self.lda = lda
        self.clip_text_encoder = clip_text_encoder
        self.solver = solver
        self.default_size = default_size
        self.guidance_terms: list[GuidanceTerm] = []
        self.step_preparations: list[StepPreparation] = []

    @property
    def device(self) -> torch.device:
        """Where the UNet's weights live (and where latents are made)."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's weights' dtype (that of the latents)."""
        return self.unet.dtype

    def __str__(self) -> str:
        solver = f"{type(self.solver).__name__}(num_inference_steps={self.solver.num_inference_steps})"
        return (
            f"{type(self).__name__}(unet={type(self.unet).__name__}, lda={type(self.lda).__name__}, "
            f"clip_text_encoder={type(self.clip_text_encoder).__name__}, solver={solver}, device={self.device}, "
            f"dtype={str(self.dtype).removeprefix('torch.')})"
        )

    @abstractmethod
    def set_unet_context(self, *, timestep: Tensor, clip_text_embedding: Tensor, **conditioning: Tensor) -> None:
        """Give the UNet the side inputs of its next forward.

        Args:
            timestep: The diffusion timestep (a scalar tensor).
            clip_text_embedding: The text embedding, one row per row of the UNet's input.
            **conditioning: The family's other side inputs (SDXL: `pooled_text_embedding`, `time_ids`), batched
                the same way.
        """

    @abstractmethod
    def _prompt_conditioning(
        self, prompts: list[str], negative_prompts: list[str] | None, guided: bool
    ) -> dict[str, Tensor]:
        """The conditioning made per prompt, for `batch_conditioning`: `clip_text_embedding` and the family's others.

        Args:
            prompts: The prompts.
            negative_prompts: One per prompt, or None for the family's default (the empty prompt; zeros for SDXL).
            guided: Whether to make the negative rows too (first), for classifier-free guidance.
        """

    @abstractmethod
    def diffusers_modules(self) -> "dict[str, fl.WeightedModule]":
        """Every layer with weights, by the name diffusers' pipeline gives its module, component first.

        `unet.down_blocks.1.attentions.0.proj_in`, `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`, and
        `text_encoder_2.*` for SDXL: the names community files (LoRAs, checkpoints) use. Derived from the live
        model: a layer wrapped in an adapter keeps its name.
        """

    @abstractmethod
    def original_renamings(self) -> "dict[str, ModuleRenaming]":
        """For each component whose original layout names modules otherwise (the UNet's `input_blocks`...), its
        `ModuleRenaming` to and from diffusers' names."""

    # -- schedule ----------------------------------------------------------------------------------------------

    def set_num_inference_steps(self, num_inference_steps: int) -> None:
        """Use a schedule of `num_inference_steps` steps, all of which `steps` then lists.

        `init_latents` with an init image starts the schedule later (see its `strength`).

        Args:
            num_inference_steps: The number of steps of the full schedule.
        """
        self.solver = self.solver.rebuild(num_inference_steps=num_inference_steps, first_inference_step=0)

    @property
    def steps(self) -> list[int]:
        """The step indices a generation runs, in order: from the solver's first inference step to the last."""
        return list(self.solver.inference_steps)

    # -- text --------------------------------------------------------------------------------------------------

    @staticmethod
    def _negative_prompts(prompts: list[str], negative_text: str | Sequence[str]) -> list[str]:
        """One negative prompt per prompt: the given one for all, or the given list (checked to match)."""
        if isinstance(negative_text, str):
            return [negative_text] * len(prompts)
        negatives = list(negative_text)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"got {len(negatives)} negative prompts for {len(prompts)} prompts: give one negative prompt per "
                "prompt, or a single string for all of them"
            )
        return negatives

    # -- latents -----------------------------------------------------------------------------------------------

    def init_latents(
        self,
        size: tuple[int, int],
        init_image: "Image.Image | None" = None,
        noise: Tensor | None = None,
        strength: float | None = None,
        *,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The latents a generation starts from: noise, or (image-to-image) an image's latents, noised.

        Without an init image: the noise, scaled to the solver's initial noise level (1 except for Euler-like
        solvers), and the solver starts at its first step. With one: the image (resized to `size` if needed) is
        encoded, drawing from the autoencoder's posterior as diffusers' pipelines do, then noised to the level of
        the first step that `strength` leaves, where the solver then starts (`steps` lists the remaining ones).
        Set the number of steps first (`set_num_inference_steps`).

        Args:
            size: `(height, width)` of the image to generate, in pixels (multiples of the autoencoder's downscale
                factor, 8 for Stable Diffusion).
            init_image: The image to start from (image-to-image).
            noise: The noise, `(batch, latent_channels, height / 8, width / 8)`; drawn when not given.
            strength: Image-to-image only: the share of the schedule to denoise the image over, in (0, 1], as
                diffusers' `strength`: 1 runs every step from a (nearly) fully noised image, lower values keep more
                of the image. Default: `default_strength`.
            batch_size: How many latents to draw when `noise` is not given (default 1).
            generator: The random generator of the draws (default: torch's global one, see `manual_seed`).

        Returns:
            The initial latents, `(batch, latent_channels, height / 8, width / 8)`.
        """
        height, width = self._check_size(size)
        if init_image is None and strength is not None:
            raise ValueError(
                f"strength={strength} sets how much of an init image to keep, but no init_image was given: pass one "
                "(image-to-image), or leave strength out (text-to-image)"
            )
        first_step = (
            0 if init_image is None else self._first_step(self.default_strength if strength is None else strength)
        )
        factor = self.lda.downscale_factor
        shape = (self.lda.latent_channels, height // factor, width // factor)
        if noise is not None and (tuple(noise.shape[1:]) != shape or (batch_size not in (None, noise.shape[0]))):
            expected = f"({batch_size if batch_size is not None else 'batch'}, {', '.join(map(str, shape))})"
            raise ValueError(
                f"the noise for a {width}x{height} (width x height) image must be {expected}, got "
                f"{tuple(noise.shape)}: latents are {factor} times smaller than the image, with "
                f"{self.lda.latent_channels} channels"
            )
        if first_step != self.solver.first_inference_step:
            self.solver = self.solver.rebuild(first_inference_step=first_step)
        # diffusers' order of draws: the image's posterior, then the noise.
        image_latents = None
        if init_image is not None:
            image_latents = self._encode_image(_resized(init_image.convert("RGB"), (width, height)), generator)
        if noise is None:
            noise = _randn((batch_size or 1, *shape), generator, self.device, self.dtype)
        if image_latents is None:
            return noise * self.solver.init_noise_sigma
        return self.solver.add_noise(image_latents, noise, step=first_step)

    def _encode_image(self, image: "Image.Image", generator: torch.Generator | None) -> Tensor:
        """An RGB image's latents, `(1, latent_channels, h, w)`, drawn from the posterior (diffusers' `retrieve_latents`)."""
        pixels = image_to_tensor(image, device=self.lda.device, dtype=self.lda.dtype) * 2 - 1
        return self.lda.encode(pixels, sample=True, generator=generator).to(device=self.device, dtype=self.dtype)

    def _check_size(self, size: tuple[int, int]) -> tuple[int, int]:
        height, width = size
        factor = self.lda.downscale_factor
        if height <= 0 or width <= 0 or height % factor != 0 or width % factor != 0:
            fixed_height, fixed_width = max(height // factor, 1) * factor, max(width // factor, 1) * factor
            raise ValueError(
                f"the image size must be made of positive multiples of {factor} (one latent covers {factor}x{factor} "
                f"pixels), got height={height}, width={width}: use e.g. height={fixed_height}, width={fixed_width}"
            )
        return height, width

    def _first_step(self, strength: float) -> int:
        """The step an image-to-image generation starts at: diffusers' `get_timesteps`."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(
                f"strength must be in (0, 1], got {strength}: 1 denoises over the whole schedule, lower values keep "
                "more of the init image"
            )
        num_steps = self.solver.num_inference_steps
        # int() truncates as diffusers' `int(num_inference_steps * strength)` does: the same steps on both sides.
        denoised = min(int(num_steps * strength), num_steps)
        if denoised == 0:
            raise ValueError(
                f"strength={strength} of {num_steps} steps leaves no step to run: raise strength to at least "
                f"{1 / num_steps:.3g} or use more steps (set_num_inference_steps)"
            )
        return num_steps - denoised

    # -- denoising ---------------------------------------------------------------------------------------------

    latent_conditioning_names: ClassVar[frozenset[str]] = frozenset()
    """The conditioning made per latent rather than per prompt (SDXL: `time_ids`), see `batch_conditioning`."""

    def forward(
        self,
        x: Tensor,
        step: int,
        *,
        clip_text_embedding: Tensor,
        condition_scale: float = 7.5,
        generator: torch.Generator | None = None,
        **conditioning: Tensor,
    ) -> Tensor:
        """One denoising step with classifier-free guidance: the latents at `solver.timesteps[step]` to the next step's.

        The UNet predicts the noise of the latents under the negative and the positive prompts in one batch, and the
        prediction is `negative + condition_scale * (positive - negative)`.

        Args:
            x: The latents, `(batch, latent_channels, height, width)`.
            step: The index of the step in the solver's schedule (one of `steps`).
            clip_text_embedding: `compute_clip_text_embedding`'s `(2 * prompts, sequence, dim)`, negative rows
                first. `batch` must be a multiple of `prompts`: each prompt serves `batch / prompts` consecutive
                latents.
            condition_scale: The guidance scale (diffusers' `guidance_scale`). A UNet that embeds it (LCM's) is given
                it instead, and the text embedding has the prompts' rows only (`clip_text_encoder(prompts)`).
            generator: The random generator of stochastic solvers (default: torch's global one).
            **conditioning: The family's other conditioning (SDXL: `pooled_text_embedding`, `time_ids`).
        """
        if getattr(self.unet, "guidance_embedding_dim", None) is not None:
            # A guidance-distilled UNet (LCM) is given the scale, and runs the prompts' rows alone.
            self.unet.set_guidance_scale(condition_scale)  # pyright: ignore[reportAttributeAccessIssue]
            conditioning = {"clip_text_embedding": clip_text_embedding, **conditioning}
            return self._denoise(x, step, conditioning, None, generator)
        rows, batch = clip_text_embedding.shape[0], x.shape[0]
        if clip_text_embedding.dim() != 3 or rows % 2 != 0 or batch % (rows // 2) != 0:
            raise ValueError(
                f"the text embedding must be (2 * prompts, sequence, dim), negative rows then positive rows, as "
                f"compute_clip_text_embedding makes it, for a number of latents that is a multiple of the number of "
                f"prompts: got shape {tuple(clip_text_embedding.shape)} for {batch} latents"
            )
        return self._denoise(
            x, step, {"clip_text_embedding": clip_text_embedding, **conditioning}, condition_scale, generator
        )

    def _denoise(
        self,
        x: Tensor,
        step: int,
        conditioning: Mapping[str, Tensor],
        condition_scale: float | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """One step; without guidance when `condition_scale` is None (the conditioning then has no negative rows)."""
        guided = condition_scale is not None
        latent_rows = {k: v for k, v in conditioning.items() if k in self.latent_conditioning_names}
        prompt_rows = {k: v for k, v in conditioning.items() if k not in self.latent_conditioning_names}
        batched = batch_conditioning(prompt_rows, latent_rows, x.shape[0], guided)
        latents = self.solver.scale_model_input(x, step=step)
        if guided:
            latents = torch.cat([latents, latents])
        self.set_unet_context(timestep=self.solver.timesteps[step], **batched)  # pyright: ignore[reportArgumentType]
        first = self.solver.first_inference_step
        self.unet.set_context(
            DENOISING_CONTEXT,
            {STEP_INDEX_KEY: step - first, NUM_STEPS_KEY: self.solver.num_inference_steps - first, GUIDED_KEY: guided},
        )
        for preparation in self.step_preparations:
            preparation(x, step, generator)
        predictions = prediction = self.unet(self._unet_input(latents))
        if condition_scale is not None:
            unconditional, conditional = predictions.chunk(2)
            prediction = unconditional + condition_scale * (conditional - unconditional)
        for term in self.guidance_terms:
            prediction = prediction + term(x, step, predictions, batched)
        return self.solver(x, predicted_noise=prediction, step=step, generator=generator)

    # -- one call ----------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        init_image: "Image.Image | None" = None,
        strength: float | None = None,
        mask: "Image.Image | None" = None,
        num_images_per_prompt: int = 1,
        progress: bool = True,
        latent_conditioning: Mapping[str, Tensor] | None = None,
        *,
        init_latents: Tensor | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        **options: Any,
    ) -> "list[Image.Image]":
        """Generate images in one call, as diffusers' Stable Diffusion pipelines do (with the same seeds).

        `generate_latents`, decoded: see it for the arguments.

        Returns:
            The images, `num_images_per_prompt` per prompt, in the prompts' order.
        """
        latents = self.generate_latents(
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            height,
            width,
            seed,
            init_image,
            strength,
            mask,
            num_images_per_prompt,
            progress,
            latent_conditioning,
            init_latents=init_latents,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
            **options,
        )
        with torch.no_grad():
            return self.lda.latents_to_images(latents.to(device=self.lda.device, dtype=self.lda.dtype))

    def generate_latents(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        init_image: "Image.Image | None" = None,
        strength: float | None = None,
        mask: "Image.Image | None" = None,
        num_images_per_prompt: int = 1,
        progress: bool = True,
        latent_conditioning: Mapping[str, Tensor] | None = None,
        *,
        init_latents: Tensor | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        **options: Any,
    ) -> Tensor:
        """The latents `generate` decodes (diffusers' `output_type="latent"`), e.g. to hand them to a refiner.

        Text-to-image, or image-to-image with `init_image` (and `strength`). With `seed`, the random draws are those
        of diffusers' pipeline called with `generator=torch.Generator("cpu").manual_seed(seed)` (on the same
        solver, the images match); without, they come from torch's global generator (see `manual_seed`). The
        solver's type is kept; its number of steps is set to `num_inference_steps`.

        The ensemble of experts (SDXL's base, then its refiner) splits one schedule between two models, as diffusers'
        `denoising_end` and `denoising_start` do: the base stops at `denoising_end` and returns its latents, the
        refiner starts from them (`init_latents`) at `denoising_start`, the same fraction (see `hand_off_step`).

        Args:
            prompt: A prompt, or a batch of prompts.
            negative_prompt: What to steer away from: one for all prompts, or one per prompt (needs
                `guidance_scale > 1`). Default: the family's (the empty prompt; zero embeddings for SDXL, as
                diffusers' `force_zeros_for_empty_prompt`).
            num_inference_steps: The number of steps of the schedule (image-to-image runs `strength` of them).
            guidance_scale: The classifier-free guidance scale (default: `default_guidance_scale`, diffusers'
                pipeline's); at 1 or below, no guidance (one UNet batch instead of two), as in diffusers. A UNet that
                embeds the guidance scale (LCM's) is given it instead, and runs one batch.
            height: The images' height in pixels, a multiple of 8 (default: the init image's or latents', else
                `default_size`: 512 for SD1.5).
            width: The images' width in pixels, a multiple of 8 (default: likewise).
            seed: Seed of a CPU `torch.Generator` for all the random draws.
            init_image: The image to start from; resized (Lanczos) to `height` x `width` if needed.
            strength: Image-to-image: how much of the schedule the init image goes through, in (0, 1] (default:
                `default_strength`; 1 for inpainting).
            mask: Inpainting only (`StableDiffusion_1_Inpainting`): white where to paint, the size of the init image.
            num_images_per_prompt: How many images to generate per prompt (consecutive in the result).
            progress: Show a progress bar.
            latent_conditioning: The family's per-latent conditioning, instead of what its `options` make (SDXL's
                `time_ids`).
            init_latents: Latents to continue denoising from `denoising_start` (another model's `generate_latents`
                with `denoising_end`), not noised again.
            denoising_start: With `init_latents`: the fraction of the schedule already run, in (0, 1).
            denoising_end: Stop at this fraction of the schedule, in (0, 1) (the latents are then still noisy).
            **options: The family's generation options, those of its `micro_conditioning` (SDXL: `original_size`,
                `crops_coords_top_left`, `target_size`; its refiner: `aesthetic_score`, ...).

        Returns:
            The final latents, `(prompts * num_images_per_prompt, latent_channels, height / 8, width / 8)`.
        """
        from tqdm import tqdm

        prompts = _prompt_list(prompt, "prompt")
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        embeds_guidance = getattr(self.unet, "guidance_embedding_dim", None) is not None
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        if negative_prompt is not None and (guidance_scale <= 1.0 or embeds_guidance):
            raise ValueError(
                "negative_prompt only acts through classifier-free guidance, which "
                + (
                    "this UNet does not run (it embeds the guidance scale: LCM)"
                    if embeds_guidance
                    else f"guidance_scale={guidance_scale} turns off: use a guidance_scale above 1"
                )
                + ": drop the negative prompt"
            )
        if strength is not None and init_image is None:
            raise ValueError(f"strength={strength} needs an init_image: pass the image to start from")
        if strength is not None and not 0.0 < strength <= 1.0:
            raise ValueError(
                f"strength must be in (0, 1], got {strength}: 1 denoises over the whole schedule, lower values keep "
                "more of the init image"
            )
        self._check_hand_off(init_image, init_latents, denoising_start, denoising_end)
        if init_latents is not None and height is None and width is None:
            factor = self.lda.downscale_factor
            height, width = init_latents.shape[-2] * factor, init_latents.shape[-1] * factor
        size = self._generation_size(height, width, init_image)
        self._check_generation_images(init_image, mask)
        # Resized, then converted, as diffusers' image processors do.
        if init_image is not None:
            init_image = _resized(init_image, (size[1], size[0])).convert("RGB")
        if mask is not None:
            mask = _resized(mask, (size[1], size[0])).convert("L")

        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            guided = guidance_scale > 1.0 and not embeds_guidance
            negatives = None if negative_prompt is None else self._negative_prompts(prompts, negative_prompt)
            conditioning = self._prompt_conditioning(prompts, negatives, guided)
            conditioning |= self._generation_latent_conditioning(size, latent_conditioning, options)
            self.set_num_inference_steps(num_inference_steps)
            batch = len(prompts) * num_images_per_prompt
            if init_latents is not None:
                x = self._continued_latents(init_latents, size, batch, self.hand_off_step(denoising_start or 0.0))
            else:
                x = self.init_latents(size, init_image, strength=strength, batch_size=batch, generator=generator)
            self._set_generation_conditions(init_image, mask, generator)
            if embeds_guidance:
                self.unet.set_guidance_scale(guidance_scale)  # pyright: ignore[reportAttributeAccessIssue]
            condition_scale = guidance_scale if guided else None
            last = self.hand_off_step(denoising_end) if denoising_end is not None else self.solver.num_inference_steps
            for step in tqdm([s for s in self.steps if s < last], desc=type(self).__name__, disable=not progress):
                x = self._denoise(x, step, conditioning, condition_scale, generator)
            return x

    def hand_off_step(self, fraction: float) -> int:
        """Where a schedule split at `fraction` changes hands: the first step whose timestep is below the cut.

        The cut is diffusers' `discrete_timestep_cutoff`, `round((1 - fraction) * num_train_timesteps)`: a base
        with `denoising_end=fraction` runs the steps before this one, a refiner with `denoising_start=fraction`
        the steps from it (set the number of steps first).

        Args:
            fraction: The share of the schedule (of the train timesteps, from the noisiest) before the cut, in [0, 1).
        """
        num_train_timesteps = self.solver.params.num_train_timesteps
        cutoff = round(num_train_timesteps - fraction * num_train_timesteps)
        return int((self.solver.timesteps >= cutoff).sum().item())

    def _check_hand_off(
        self,
        init_image: "Image.Image | None",
        init_latents: Tensor | None,
        denoising_start: float | None,
        denoising_end: float | None,
    ) -> None:
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), a fraction of the schedule, got {value}")
        if (init_latents is None) != (denoising_start is None):
            raise ValueError(
                "init_latents and denoising_start go together: pass the latents of a generate_latents(..., "
                "denoising_end=f) call and denoising_start=f"
            )
        if init_latents is not None and init_image is not None:
            raise ValueError("give init_latents or init_image, not both")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(
                f"denoising_start={denoising_start} must be before denoising_end={denoising_end}: the model runs the "
                "part of the schedule between them"
            )

    def _continued_latents(self, latents: Tensor, size: tuple[int, int], batch: int, first_step: int) -> Tensor:
        """Latents handed over from another model, to denoise from `first_step` on (diffusers' `add_noise=False`)."""
        factor = self.lda.downscale_factor
        shape = (self.lda.latent_channels, size[0] // factor, size[1] // factor)
        if latents.dim() != 4 or tuple(latents.shape[1:]) != shape or latents.shape[0] not in (1, batch):
            raise ValueError(
                f"init_latents must be ({batch}, {', '.join(map(str, shape))}) (or one row for all), got "
                f"{tuple(latents.shape)}: pass what generate_latents returned for the same size and prompts"
            )
        if first_step >= self.solver.num_inference_steps:
            raise ValueError(
                f"no step of {self.solver.num_inference_steps} is left after the hand-off: use more steps or an "
                "earlier denoising_start"
            )
        self.solver = self.solver.rebuild(first_inference_step=first_step)
        return latents.to(device=self.device, dtype=self.dtype).expand(batch, *shape)

    def _generation_latent_conditioning(
        self, size: tuple[int, int], given: Mapping[str, Tensor] | None, options: dict[str, Any]
    ) -> dict[str, Tensor]:
        """`generate`'s per-latent conditioning: the given tensors, or the family's `micro_conditioning(**options)`."""
        accepted = [
            name
            for name, parameter in inspect.signature(self.micro_conditioning).parameters.items()
            if parameter.kind == inspect.Parameter.KEYWORD_ONLY
        ]
        if unknown := sorted(set(options) - set(accepted)):
            raise TypeError(
                f"{type(self).__name__}.generate got an unknown option {unknown[0]!r}: "
                + (f"its options are {', '.join(accepted)}" if accepted else "it takes no family option")
            )
        if given is not None:
            if options:
                raise ValueError(f"give latent_conditioning or {', '.join(sorted(options))}, not both")
            return dict(given)
        return self.micro_conditioning(size, **options)

    def micro_conditioning(self, size: tuple[int, int]) -> dict[str, Tensor]:
        """The conditioning made per latent that `generate` gives (SDXL's time ids, from its keyword options); none.

        Args:
            size: `(height, width)` of the images, in pixels.
        """
        return {}

    def _generation_size(
        self, height: int | None, width: int | None, init_image: "Image.Image | None"
    ) -> tuple[int, int]:
        """`generate`'s `(height, width)`: as given, else the init image's, else `default_size`; checked."""
        size = (
            height if height is not None else init_image.height if init_image is not None else self.default_size,
            width if width is not None else init_image.width if init_image is not None else self.default_size,
        )
        return self._check_size(size)

    def _check_generation_images(self, init_image: "Image.Image | None", mask: "Image.Image | None") -> None:
        """Refuse images this pipeline cannot use (a mask, but for inpainting)."""
        if mask is not None:
            raise ValueError(
                f"a mask is for inpainting, which needs an inpainting UNet: use the inpainting pipeline of "
                f"{type(self).__name__} with the inpainting weights"
            )

    def _set_generation_conditions(
        self, init_image: "Image.Image | None", mask: "Image.Image | None", generator: torch.Generator | None
    ) -> None:
        """Set what the UNet needs besides the latents, after they are drawn (diffusers' order of draws)."""

    def _unet_input(self, latents: Tensor) -> Tensor:
        """The UNet's input for the (scaled, batched) latents: themselves; inpainting appends its conditions."""
        return latents


def _prompt_list(text: str | Sequence[str], name: str) -> list[str]:
    prompts = [text] if isinstance(text, str) else list(text)
    if not prompts:
        raise ValueError(f"{name} is an empty list: give at least one prompt")
    return prompts


def _randn(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Gaussian noise drawn on the generator's device, then moved (as diffusers' `randn_tensor`: a CPU seed gives the
    same noise whatever the model's device)."""
    draw_device = device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def _resized(image: "Image.Image", size: tuple[int, int]) -> "Image.Image":
    """`image` at `(width, height)`, resized with Lanczos (diffusers' image processor default) when it differs."""
    if image.size == size:
        return image
    from PIL import Image

    return image.resize(size, resample=Image.Resampling.LANCZOS)


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def moved_component(module: ModuleT, device: torch.device | str | None, dtype: torch.dtype | None) -> ModuleT:
    """A given component on the pipeline's device and dtype (when they are given)."""
    if device is None and dtype is None:
        return module
    return module.to(device=device, dtype=dtype)


def placed_solver(
    solver: Solver | None, device: torch.device | str | None, default: Callable[[torch.device | str | None], Solver]
) -> Solver:
    """A pipeline's solver on `device`: the given one moved there, or `default(device)`.

    On the "meta" device it goes to the CPU instead: its schedule is computed when it is built, and would be lost.
    """
    solver_device = "cpu" if device is not None and torch.device(device).type == "meta" else device
    if solver is None:
        return default(solver_device)
    return solver if solver_device is None else solver.to(device=solver_device)
