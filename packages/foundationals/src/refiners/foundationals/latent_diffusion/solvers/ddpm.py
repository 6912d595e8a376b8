"""DDPM: the noise schedule models are trained on, and its ancestral sampler."""

import torch
from torch import Tensor

from refiners.foundationals.latent_diffusion.solvers.solver import (
    Solver,
    SolverParams,
    TimestepSpacing,
    sample_noise,
)

__all__ = ["DDPM"]


class DDPM(Solver):
    """Denoising Diffusion Probabilistic Models (arXiv:2006.11239), as diffusers' `DDPMScheduler` ("fixed_small").

    By default it walks every training timestep: it is the schedule a trainer draws noise levels from
    (`add_noise` with one step per sample, `signal_to_noise_ratios` for min-SNR weighting). Its last step always
    lands on zero noise, so `params.final_sigma` does not apply.

    Args:
        num_inference_steps: The number of steps; None for every training timestep.
        first_inference_step: The step to start from.
        params: The schedule configuration; `timesteps_spacing` defaults to TRAILING (all timesteps for n = T).
        device: Where the schedule tensors live.
        dtype: The schedule tensors' dtype.
    """

    default_timesteps_spacing = TimestepSpacing.TRAILING
    unsupported_params = ("sigma_schedule", "sde_variance", "final_sigma")

    def __init__(
        self,
        num_inference_steps: int | None = None,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_inference_steps is None:
            num_inference_steps = (params or SolverParams()).num_train_timesteps
        super().__init__(num_inference_steps, first_inference_step, params, device=device, dtype=dtype)

    def _generate_timesteps(self) -> Tensor:
        return self._spaced_timesteps(self.num_inference_steps).round().long()

    def __call__(
        self, x: Tensor, predicted_noise: Tensor, step: int, generator: torch.Generator | None = None
    ) -> Tensor:
        timestep = int(self.timesteps[step])
        alpha_prod = self.alphas_cumprod[timestep]
        if step + 1 < self.num_inference_steps:
            previous_alpha_prod = self.alphas_cumprod[int(self.timesteps[step + 1])]
        else:
            previous_alpha_prod = torch.ones_like(alpha_prod)
        current_alpha = alpha_prod / previous_alpha_prod
        predicted_x, _ = self._predicted_sample_and_noise(x, predicted_noise, timestep)
        # The mean of q(x_{t-1} | x_t, x_0): eq. 7 of the paper, with the step's own beta.
        mean = (previous_alpha_prod.sqrt() * (1 - current_alpha) / (1 - alpha_prod)) * predicted_x + (
            current_alpha.sqrt() * (1 - previous_alpha_prod) / (1 - alpha_prod)
        ) * x
        if timestep == 0:
            return mean
        variance = ((1 - previous_alpha_prod) / (1 - alpha_prod) * (1 - current_alpha)).clamp(min=1e-20)
        return mean + variance.sqrt() * sample_noise(x, generator)
