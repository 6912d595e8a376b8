"""DPM-Solver++(2M): a second-order multistep solver, good images in 20 steps."""

from typing import Self

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
    karras_sigmas,
    sample_noise,
    sigmas_to_timesteps,
)

__all__ = ["DPMSolver"]


class DPMSolver(Solver):
    """DPM-Solver++(2M) (arXiv:2211.01095), as diffusers' `DPMSolverMultistepScheduler` (order 2, midpoint).

    It works on the data prediction: each step extrapolates from this step's and the previous step's estimates of the
    clean latent, so a solver remembers its last estimate (a call that does not follow the previous step starts afresh
    with a first-order step). `params.sde_variance=1.0` gives the stochastic variant ("sde-dpmsolver++"), which draws
    noise from the `generator` at every step; `params.sigma_schedule=KARRAS` gives `use_karras_sigmas=True`.

    Args:
        num_inference_steps: The number of steps.
        first_inference_step: The step to start from.
        params: The schedule configuration.
        last_step_first_order: Take a first-order (Euler) last step (diffusers' `euler_at_final`). The last step is
            first-order anyway when it lands on zero noise (`FinalSigma.ZERO`, the default) or with fewer than 15 steps
            (diffusers' `lower_order_final`).
        device: Where the schedule tensors live.
        dtype: The schedule tensors' dtype.
    """

    default_timesteps_spacing = TimestepSpacing.LINSPACE
    sigmas: Tensor

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        last_step_first_order: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(num_inference_steps, first_inference_step, params, device=device, dtype=dtype)
        self.last_step_first_order = last_step_first_order
        self.register_buffer("sigmas", self._generate_sigmas().to(self.device, self.dtype), persistent=False)
        self._last_estimate: tuple[int, Tensor] | None = None

    def rebuild(self, num_inference_steps: int | None = None, first_inference_step: int | None = None) -> Self:
        return type(self)(
            num_inference_steps=self.num_inference_steps if num_inference_steps is None else num_inference_steps,
            first_inference_step=self.first_inference_step if first_inference_step is None else first_inference_step,
            params=self.params,
            last_step_first_order=self.last_step_first_order,
            device=self.device,
            dtype=self.dtype,
        )

    def _karras_sigmas(self) -> Tensor:
        train_sigmas = self._train_sigmas()
        return karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), self.num_inference_steps)

    def _generate_timesteps(self) -> Tensor:
        if self.params.sigma_schedule == NoiseSchedule.KARRAS:
            return sigmas_to_timesteps(self._karras_sigmas(), self._train_sigmas()).round().long()
        if self.timesteps_spacing == TimestepSpacing.TRAILING:
            return self._spaced_timesteps(self.num_inference_steps).long()
        # diffusers spaces n + 1 timesteps and drops the last (the final step goes to `final_sigma` instead).
        return self._spaced_timesteps(self.num_inference_steps + 1)[:-1].round().long()

    def _generate_sigmas(self) -> Tensor:
        train_sigmas = self._train_sigmas()
        if self.params.sigma_schedule == NoiseSchedule.KARRAS:
            sigmas = self._karras_sigmas()
        else:
            sigmas = train_sigmas[self.timesteps.cpu()].double()
        final_sigma = 0.0 if self.final_sigma == FinalSigma.ZERO else train_sigmas[0].item()
        return torch.cat([sigmas, torch.tensor([final_sigma], dtype=torch.float64)]).float()

    @staticmethod
    def _scale_and_std(sigma: Tensor) -> tuple[Tensor, Tensor]:
        """A noise level as the scale of the signal and the std of the noise: x = scale * x_0 + std * noise."""
        scale = 1 / (sigma**2 + 1) ** 0.5
        return scale, sigma * scale

    def _log_ratio(self, step: int) -> Tensor:
        """lambda = log(scale / std), the half log-SNR in which DPM-Solver integrates."""
        scale, std = self._scale_and_std(self.sigmas[step])
        return scale.log() - std.log()

    def _predicted_sample(self, x: Tensor, model_output: Tensor, step: int) -> Tensor:
        scale, std = self._scale_and_std(self.sigmas[step])
        match self.params.model_prediction_type:
            case ModelPredictionType.NOISE:
                return (x - std * model_output) / scale
            case ModelPredictionType.SAMPLE:
                return model_output
            case ModelPredictionType.V_PREDICTION:
                return scale * x - std * model_output

    def _first_order_last_step(self, step: int) -> bool:
        if step != self.num_inference_steps - 1:
            return False
        # A second-order step onto zero noise would divide by an infinite log-ratio gap.
        return self.last_step_first_order or self.num_inference_steps < 15 or self.final_sigma == FinalSigma.ZERO

    def __call__(
        self, x: Tensor, predicted_noise: Tensor, step: int, generator: torch.Generator | None = None
    ) -> Tensor:
        estimate = self._predicted_sample(x, predicted_noise, step)
        last_estimate, self._last_estimate = self._last_estimate, (step, estimate)
        _, std = self._scale_and_std(self.sigmas[step])
        next_scale, next_std = self._scale_and_std(self.sigmas[step + 1])
        h = self._log_ratio(step + 1) - self._log_ratio(step)
        data = estimate
        if last_estimate is not None and last_estimate[0] == step - 1 and not self._first_order_last_step(step):
            # Midpoint second-order correction: D0 + D1 / 2, D1 the estimates' slope in lambda (eq. 3.6 of the paper).
            ratio = (self._log_ratio(step) - self._log_ratio(step - 1)) / h
            data = estimate + 0.5 / ratio * (estimate - last_estimate[1])
        # ODE for sde_variance = 0, SDE ("sde-dpmsolver++") for 1: exp(-h)^0 = 1 keeps exp(-h) = 0 (zero noise) exact.
        variance, decay = self.params.sde_variance, torch.exp(-h)
        x = (next_std / std) * decay**variance * x + next_scale * (1 - decay ** (1 + variance)) * data
        if variance > 0:
            x = x + next_std * (1 - decay ** (2 * variance)).sqrt() * sample_noise(x, generator)
        return x

    def add_noise(self, x: Tensor, noise: Tensor, step: Steps) -> Tensor:
        scale, std = self._scale_and_std(self._per_step(self.sigmas, step, x))
        return scale * x + std * noise

    def remove_noise(self, x: Tensor, noise: Tensor, step: Steps) -> Tensor:
        scale, std = self._scale_and_std(self._per_step(self.sigmas, step, x))
        return (x - std * noise) / scale
