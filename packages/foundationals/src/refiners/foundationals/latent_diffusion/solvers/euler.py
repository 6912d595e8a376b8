"""Euler and ancestral Euler: the first-order solvers of k-diffusion, on noise levels rather than timesteps."""

import torch
from torch import Tensor

from refiners.foundationals.latent_diffusion.solvers.solver import (
    FinalSigma,
    ModelPredictionType,
    NoiseSchedule,
    Solver,
    SolverParams,
    Steps,
    TimestepSpacing,
    interpolate,
    karras_sigmas,
    sample_noise,
    sigmas_to_timesteps,
)

__all__ = ["Euler", "EulerAncestral"]


class Euler(Solver):
    """Euler's method on the probability-flow ODE (arXiv:2206.00364, Algorithm 1), as diffusers'
    `EulerDiscreteScheduler` (linear sigma interpolation, no churn).

    Euler works on latents scaled by noise level, x = x_0 + sigma * noise: start from noise times
    `init_noise_sigma` and feed the model `scale_model_input(x, step)`. Its timesteps are fractional with
    LINSPACE spacing (the default) or KARRAS sigmas (`params.sigma_schedule`), as diffusers'.

    Args:
        num_inference_steps: The number of steps.
        first_inference_step: The step to start from.
        params: The schedule configuration.
        device: Where the schedule tensors live.
        dtype: The schedule tensors' dtype.
    """

    default_timesteps_spacing = TimestepSpacing.LINSPACE
    unsupported_params = ("sde_variance",)
    sigmas: Tensor

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(num_inference_steps, first_inference_step, params, device=device, dtype=dtype)
        self.register_buffer("sigmas", self._generate_sigmas().to(self.device, self.dtype), persistent=False)

    def _spaced_sigmas(self) -> tuple[Tensor, Tensor]:
        """The spaced timesteps (float32) and their noise levels (float64), before any karras respacing."""
        timesteps = self._spaced_timesteps(self.num_inference_steps).float()
        return timesteps, interpolate(timesteps, self._train_sigmas())

    def _karras_sigmas(self) -> Tensor:
        _, sigmas = self._spaced_sigmas()
        return karras_sigmas(sigmas[-1].item(), sigmas[0].item(), self.num_inference_steps)

    def _generate_timesteps(self) -> Tensor:
        if self.params.sigma_schedule == NoiseSchedule.KARRAS:
            return sigmas_to_timesteps(self._karras_sigmas(), self._train_sigmas()).float()
        timesteps, _ = self._spaced_sigmas()
        return timesteps

    def _generate_sigmas(self) -> Tensor:
        if self.params.sigma_schedule == NoiseSchedule.KARRAS:
            sigmas = self._karras_sigmas()
        else:
            _, sigmas = self._spaced_sigmas()
        final_sigma = 0.0 if self.final_sigma == FinalSigma.ZERO else self._train_sigmas()[0].item()
        return torch.cat([sigmas, torch.tensor([final_sigma], dtype=torch.float64)]).float()

    @property
    def init_noise_sigma(self) -> float:
        max_sigma = self.sigmas.max()
        # Pure noise at level sigma has std sqrt(sigma^2 + 1) (unit signal plus noise): diffusers uses it for LEADING
        # only, and sigma itself otherwise (nearly the same at Stable Diffusion's sigma_max of 14.6).
        if self.timesteps_spacing == TimestepSpacing.LEADING:
            return float((max_sigma**2 + 1) ** 0.5)
        return float(max_sigma)

    def scale_model_input(self, x: Tensor, step: int) -> Tensor:
        """Back to unit variance, x / sqrt(sigma^2 + 1): the model was trained on x = scale * x_0 + std * noise."""
        return x / (self.sigmas[step] ** 2 + 1) ** 0.5

    def _predicted_sample(self, x: Tensor, model_output: Tensor, sigma: Tensor) -> Tensor:
        match self.params.model_prediction_type:
            case ModelPredictionType.NOISE:
                return x - sigma * model_output
            case ModelPredictionType.SAMPLE:
                return model_output
            case ModelPredictionType.V_PREDICTION:
                return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)

    def __call__(
        self, x: Tensor, predicted_noise: Tensor, step: int, generator: torch.Generator | None = None
    ) -> Tensor:
        sigma, next_sigma = self.sigmas[step], self.sigmas[step + 1]
        derivative = (x - self._predicted_sample(x, predicted_noise, sigma)) / sigma
        return x + derivative * (next_sigma - sigma)

    def add_noise(self, x: Tensor, noise: Tensor, step: Steps) -> Tensor:
        return x + noise * self._per_step(self.sigmas, step, x)

    def remove_noise(self, x: Tensor, noise: Tensor, step: Steps) -> Tensor:
        return x - noise * self._per_step(self.sigmas, step, x)


class EulerAncestral(Euler):
    """Ancestral Euler (k-diffusion's `sample_euler_ancestral`), as diffusers' `EulerAncestralDiscreteScheduler`.

    Each step goes down past the next noise level, to `sigma_down`, then adds fresh noise of std `sigma_up` drawn from
    the `generator`, so that it lands on the next level: a stochastic sampler.

    Args:
        num_inference_steps: The number of steps.
        first_inference_step: The step to start from.
        params: The schedule configuration.
        device: Where the schedule tensors live.
        dtype: The schedule tensors' dtype.
    """

    def __call__(
        self, x: Tensor, predicted_noise: Tensor, step: int, generator: torch.Generator | None = None
    ) -> Tensor:
        sigma, next_sigma = self.sigmas[step], self.sigmas[step + 1]
        sigma_up = (next_sigma**2 * (sigma**2 - next_sigma**2) / sigma**2) ** 0.5
        sigma_down = (next_sigma**2 - sigma_up**2) ** 0.5
        derivative = (x - self._predicted_sample(x, predicted_noise, sigma)) / sigma
        x = x + derivative * (sigma_down - sigma)
        return x + sample_noise(x, generator) * sigma_up
