"""DDIM: the deterministic sampler of Stable Diffusion's original pipelines."""

import torch
from torch import Tensor

from refiners.foundationals.latent_diffusion.solvers.solver import FinalSigma, Solver, TimestepSpacing

__all__ = ["DDIM"]


class DDIM(Solver):
    """Denoising Diffusion Implicit Models (arXiv:2010.02502) with eta = 0, as diffusers' `DDIMScheduler`.

    Defaults follow Stable Diffusion 1.5: LEADING timesteps offset by 1, and a last step that lands on timestep 0's
    noise level (diffusers' `set_alpha_to_one=False`, here `FinalSigma.MIN`).

    Args:
        num_inference_steps: The number of steps.
        first_inference_step: The step to start from.
        params: The schedule configuration.
        device: Where the schedule tensors live.
        dtype: The schedule tensors' dtype.
    """

    default_timesteps_spacing = TimestepSpacing.LEADING
    default_final_sigma = FinalSigma.MIN
    unsupported_params = ("sigma_schedule", "sde_variance")

    def _generate_timesteps(self) -> Tensor:
        return self._spaced_timesteps(self.num_inference_steps).round().long()

    def __call__(
        self, x: Tensor, predicted_noise: Tensor, step: int, generator: torch.Generator | None = None
    ) -> Tensor:
        timestep = int(self.timesteps[step])
        # As diffusers, step back by T // n whatever the spacing: exact for LEADING, approximate for the others.
        previous_timestep = timestep - self.params.num_train_timesteps // self.num_inference_steps
        predicted_x, noise = self._predicted_sample_and_noise(x, predicted_noise, timestep)
        if previous_timestep < 0:
            if self.final_sigma == FinalSigma.ZERO:
                return predicted_x
            previous_timestep = 0
        return (
            self.cumulative_scale_factors[previous_timestep] * predicted_x + self.noise_std[previous_timestep] * noise
        )
