"""The Latent Consistency Model solver: few-step sampling for LCM-distilled models."""

from typing import ClassVar, Self

import torch
from torch import Tensor

from refiners.foundationals.latent_diffusion.solvers.solver import Solver, SolverParams, sample_noise

__all__ = ["LCMSolver"]


class LCMSolver(Solver):
    """Latent Consistency Models (arXiv:2310.04378) multistep sampling, as diffusers' `LCMScheduler`.

    Each step maps the latent to a clean estimate with the consistency function (skip and output scalings of the
    boundary condition), then re-noises it to the next timestep with fresh noise from the `generator`. Timesteps are
    picked among the `original_inference_steps` ones the model was distilled on, so `params.timesteps_spacing` does
    not apply.

    Args:
        num_inference_steps: The number of steps (typically 2 to 8), at most `original_inference_steps`.
        first_inference_step: The step to start from.
        params: The schedule configuration.
        original_inference_steps: The length of the distillation schedule (diffusers' default: 50).
        device: Where the schedule tensors live.
        dtype: The schedule tensors' dtype.
    """

    unsupported_params = ("timesteps_spacing", "sigma_schedule", "sde_variance", "final_sigma")
    # The consistency function's scalings: sigma_data of the EDM parametrization, and diffusers' timestep scaling.
    sigma_data: ClassVar[float] = 0.5
    timestep_scaling: ClassVar[float] = 10.0

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        original_inference_steps: int = 50,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # Set first: `_generate_timesteps`, run by `Solver.__init__`, reads it.
        self.original_inference_steps = original_inference_steps
        super().__init__(num_inference_steps, first_inference_step, params, device=device, dtype=dtype)

    def rebuild(self, num_inference_steps: int | None = None, first_inference_step: int | None = None) -> Self:
        return type(self)(
            num_inference_steps=self.num_inference_steps if num_inference_steps is None else num_inference_steps,
            first_inference_step=self.first_inference_step if first_inference_step is None else first_inference_step,
            params=self.params,
            original_inference_steps=self.original_inference_steps,
            device=self.device,
            dtype=self.dtype,
        )

    def _generate_timesteps(self) -> Tensor:
        original_steps, train_steps = self.original_inference_steps, self.params.num_train_timesteps
        if not self.num_inference_steps <= original_steps <= train_steps:
            raise ValueError(
                f"LCMSolver: need num_inference_steps={self.num_inference_steps} <= original_inference_steps="
                f"{original_steps} <= num_train_timesteps={train_steps}: the steps are picked among the original ones."
            )
        # The distillation schedule: every (T // original_steps)-th timestep, ending on T // original_steps - 1.
        ratio = train_steps // original_steps
        original_timesteps = (torch.arange(1, original_steps + 1) * ratio - 1).flip(0)
        indices = torch.arange(self.num_inference_steps, dtype=torch.float64) * (
            original_steps / self.num_inference_steps
        )
        return original_timesteps[indices.floor().long()]

    def __call__(
        self, x: Tensor, predicted_noise: Tensor, step: int, generator: torch.Generator | None = None
    ) -> Tensor:
        timestep = int(self.timesteps[step])
        predicted_x, _ = self._predicted_sample_and_noise(x, predicted_noise, timestep)
        scaled_timestep = timestep * self.timestep_scaling
        skip_scale = self.sigma_data**2 / (scaled_timestep**2 + self.sigma_data**2)
        output_scale = scaled_timestep / (scaled_timestep**2 + self.sigma_data**2) ** 0.5
        denoised = output_scale * predicted_x + skip_scale * x
        if step == self.num_inference_steps - 1:
            return denoised
        next_timestep = int(self.timesteps[step + 1])
        noise = sample_noise(denoised, generator)
        return self.cumulative_scale_factors[next_timestep] * denoised + self.noise_std[next_timestep] * noise
