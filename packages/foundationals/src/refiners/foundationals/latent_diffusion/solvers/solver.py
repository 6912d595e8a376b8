"""The base of every diffusion solver: the training noise schedule, the inference timesteps, adding and removing noise."""

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import ClassVar, Self

import torch
from torch import Tensor

import refiners.fluxion.layers as fl

__all__ = [
    "TimestepSpacing",
    "NoiseSchedule",
    "ModelPredictionType",
    "FinalSigma",
    "SolverParams",
    "Steps",
    "Solver",
]


class TimestepSpacing(StrEnum):
    """How the inference timesteps are picked among the training ones (Table 2 of arXiv:2305.08891).

    LINSPACE spans [0, T-1] evenly, LEADING steps by T // n from 0 (then adds `timesteps_offset`), TRAILING steps by
    T / n down from T-1. Each solver follows its diffusers scheduler's reading of these words.
    """

    LINSPACE = "linspace"
    LEADING = "leading"
    TRAILING = "trailing"


class NoiseSchedule(StrEnum):
    """How the diffusion rates (betas) grow from `initial_diffusion_rate` to `final_diffusion_rate`.

    UNIFORM is diffusers' "linear", QUADRATIC its "scaled_linear" (linear in sqrt(beta), Stable Diffusion's), KARRAS is
    linear in beta^(1/7). As a `sigma_schedule`, KARRAS spaces the inference noise levels as in arXiv:2206.00364.
    """

    UNIFORM = "uniform"
    QUADRATIC = "quadratic"
    KARRAS = "karras"


class ModelPredictionType(StrEnum):
    """What the denoising model predicts: the noise (diffusers' "epsilon"), the clean sample, or the velocity."""

    NOISE = "noise"
    SAMPLE = "sample"
    V_PREDICTION = "v_prediction"


class FinalSigma(StrEnum):
    """The noise level the last step lands on: none, or that of timestep 0 (diffusers' `final_sigmas_type`;
    for DDIM, `set_alpha_to_one=True` is ZERO and `False`, Stable Diffusion's, is MIN)."""

    ZERO = "zero"
    MIN = "sigma_min"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SolverParams:
    """The configuration of a solver, frozen so that it cannot drift once the solver is built.

    The defaults are Stable Diffusion 1.5's. A field left to None takes the solver's own default.

    Args:
        num_train_timesteps: The number of diffusion steps the model was trained with (T).
        timesteps_spacing: How inference timesteps are spread; None for the solver's default (DDPM: TRAILING, DDIM:
            LEADING, DPMSolver and Euler: LINSPACE, as their diffusers schedulers with SD1.5's config).
        timesteps_offset: Added to LEADING timesteps (diffusers' `steps_offset`; 1 for SD1.5).
        initial_diffusion_rate: The first beta (diffusers' `beta_start`).
        final_diffusion_rate: The last beta (diffusers' `beta_end`).
        noise_schedule: How betas grow between the two rates.
        sigma_schedule: KARRAS to respace the inference noise levels (DPMSolver and Euler), None to keep the
            timesteps' own.
        model_prediction_type: What the model predicts.
        sde_variance: DPMSolver only: 0.0 for the ODE solver (DPM-Solver++), 1.0 for the SDE one (diffusers'
            "sde-dpmsolver++"); values between blend the two (k-diffusion's `eta`).
        final_sigma: The noise level of the last step; None for the solver's default (DDIM: MIN, others: ZERO).
    """

    num_train_timesteps: int = 1000
    timesteps_spacing: TimestepSpacing | None = None
    timesteps_offset: int = 1
    initial_diffusion_rate: float = 8.5e-4
    final_diffusion_rate: float = 1.2e-2
    noise_schedule: NoiseSchedule = NoiseSchedule.QUADRATIC
    sigma_schedule: NoiseSchedule | None = None
    model_prediction_type: ModelPredictionType = ModelPredictionType.NOISE
    sde_variance: float = 0.0
    final_sigma: FinalSigma | None = None


Steps = int | Sequence[int] | Tensor
"""A step index, or one per sample of a batch (training noises each sample to its own level)."""


class Solver(fl.Module, ABC):
    """A diffusion solver: walks a noisy latent from timestep to timestep, one model prediction at a time.

    A solver holds the training noise schedule (per train timestep) and the inference timesteps (per step). Steps are
    indices into `timesteps`; a generation runs `inference_steps`, from `first_inference_step` (later for img2img).

    Args:
        num_inference_steps: The number of steps of the full schedule.
        first_inference_step: The step to start from: 0 for text-to-image, later to denoise a partly noised image.
        params: The schedule configuration (see `SolverParams`).
        device: Where the schedule tensors live.
        dtype: The schedule tensors' dtype.

    Example:
        ```py
        import torch
        from refiners.foundationals.latent_diffusion.solvers import DDIM

        solver = DDIM(num_inference_steps=30)
        x = torch.randn(1, 4, 8, 8)
        for step in solver.inference_steps:
            predicted_noise = 0.1 * x  # the denoising model's output at `solver.timesteps[step]`
            x = solver(x, predicted_noise=predicted_noise, step=step)
        ```
    """

    default_timesteps_spacing: ClassVar[TimestepSpacing] = TimestepSpacing.LINSPACE
    default_final_sigma: ClassVar[FinalSigma] = FinalSigma.ZERO
    # The `SolverParams` fields this solver does not read: setting one away from its default is an error.
    unsupported_params: ClassVar[tuple[str, ...]] = ()

    timesteps: Tensor
    alphas_cumprod: Tensor
    cumulative_scale_factors: Tensor
    noise_std: Tensor
    signal_to_noise_ratios: Tensor

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.params = params if params is not None else SolverParams()
        self._check_params()
        if not 1 <= num_inference_steps <= self.params.num_train_timesteps:
            raise ValueError(
                f"{type(self).__name__}: num_inference_steps={num_inference_steps} must be between 1 and "
                f"num_train_timesteps={self.params.num_train_timesteps}."
            )
        if not 0 <= first_inference_step < num_inference_steps:
            raise ValueError(
                f"{type(self).__name__}: first_inference_step={first_inference_step} must be in "
                f"[0, num_inference_steps={num_inference_steps}): it is the index of the first step to run."
            )
        self.num_inference_steps = num_inference_steps
        self.first_inference_step = first_inference_step
        # In float32, as diffusers: the timesteps and noise levels derived from it then match diffusers' own.
        alphas_cumprod = self._train_alphas_cumprod()
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("cumulative_scale_factors", alphas_cumprod.sqrt(), persistent=False)
        self.register_buffer("noise_std", (1.0 - alphas_cumprod).sqrt(), persistent=False)
        self.register_buffer("signal_to_noise_ratios", alphas_cumprod / (1.0 - alphas_cumprod), persistent=False)
        self.timesteps = self._generate_timesteps()
        if (self.timesteps < 0).any() or (self.timesteps >= self.params.num_train_timesteps).any():
            raise ValueError(
                f"{type(self).__name__}: the timesteps {self.timesteps.tolist()} leave [0, num_train_timesteps="
                f"{self.params.num_train_timesteps}): lower timesteps_offset={self.params.timesteps_offset} or use "
                "another timesteps_spacing."
            )
        self.to(device=device, dtype=dtype)

    @abstractmethod
    def _generate_timesteps(self) -> Tensor:
        """The inference timesteps, in diffusers' `scheduler.timesteps` order and dtype (on CPU)."""

    @abstractmethod
    def __call__(
        self, x: Tensor, predicted_noise: Tensor, step: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """One denoising step: the latent at `timesteps[step]` to the latent at the next timestep.

        Args:
            x: The noisy latent.
            predicted_noise: The model output at `timesteps[step]` (noise, sample or velocity, following
                `params.model_prediction_type`).
            step: The index of the current step in `timesteps`.
            generator: The random generator of stochastic solvers' noise.
        """

    def rebuild(self, num_inference_steps: int | None = None, first_inference_step: int | None = None) -> Self:
        """A new solver with the same params, device and dtype, and another number of steps or first step."""
        return type(self)(
            num_inference_steps=self.num_inference_steps if num_inference_steps is None else num_inference_steps,
            first_inference_step=self.first_inference_step if first_inference_step is None else first_inference_step,
            params=self.params,
            device=self.device,
            dtype=self.dtype,
        )

    @property
    def inference_steps(self) -> range:
        """The steps a generation runs, from `first_inference_step`."""
        return range(self.first_inference_step, self.num_inference_steps)

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def dtype(self) -> torch.dtype:
        return self.alphas_cumprod.dtype

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of the initial noise of a text-to-image generation."""
        return 1.0

    @property
    def timesteps_spacing(self) -> TimestepSpacing:
        return self.params.timesteps_spacing or self.default_timesteps_spacing

    @property
    def final_sigma(self) -> FinalSigma:
        return self.params.final_sigma or self.default_final_sigma

    def scale_model_input(self, x: Tensor, step: int) -> Tensor:
        """The latent as the model expects it at `step`: unchanged, except for Euler-like solvers."""
        return x

    def add_noise(self, x: Tensor, noise: Tensor, step: Steps) -> Tensor:
        """Noise a clean latent to the level of `timesteps[step]`; with one step per sample for a training batch."""
        timestep = self._per_step(self.timesteps, step, x)
        return self.cumulative_scale_factors[timestep] * x + self.noise_std[timestep] * noise

    def remove_noise(self, x: Tensor, noise: Tensor, step: Steps) -> Tensor:
        """The clean latent that `x` at `timesteps[step]` would be, were `noise` its noise (the inverse of `add_noise`)."""
        timestep = self._per_step(self.timesteps, step, x)
        return (x - self.noise_std[timestep] * noise) / self.cumulative_scale_factors[timestep]

    @staticmethod
    def _per_step(values: Tensor, step: Steps, like: Tensor) -> Tensor:
        """`values[step]`, shaped to broadcast over `like`: one value, or one per sample for a list of steps."""
        picked = values[step if isinstance(step, int) else torch.as_tensor(step, device=values.device)]
        return picked if picked.ndim == 0 else picked.reshape(-1, *[1] * (like.ndim - 1))

    def _predicted_sample_and_noise(self, x: Tensor, model_output: Tensor, timestep: int) -> tuple[Tensor, Tensor]:
        """The clean latent and the noise that the model output implies, at a training timestep."""
        scale, std = self.cumulative_scale_factors[timestep], self.noise_std[timestep]
        match self.params.model_prediction_type:
            case ModelPredictionType.NOISE:
                return (x - std * model_output) / scale, model_output
            case ModelPredictionType.SAMPLE:
                return model_output, (x - scale * model_output) / std
            case ModelPredictionType.V_PREDICTION:
                return scale * x - std * model_output, scale * model_output + std * x

    def _train_alphas_cumprod(self) -> Tensor:
        """The fraction of signal variance left at each train timestep, in float32 on CPU."""
        return torch.cumprod(1.0 - self._betas(), dim=0)

    def _train_sigmas(self) -> Tensor:
        """The noise-to-signal ratio sqrt((1 - alphas_cumprod) / alphas_cumprod) of each train timestep."""
        alphas_cumprod = self._train_alphas_cumprod()
        return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5

    def _betas(self) -> Tensor:
        power = {NoiseSchedule.UNIFORM: 1, NoiseSchedule.QUADRATIC: 2, NoiseSchedule.KARRAS: 7}
        exponent = power[self.params.noise_schedule]
        start, end = self.params.initial_diffusion_rate, self.params.final_diffusion_rate
        steps = self.params.num_train_timesteps
        return torch.linspace(start ** (1 / exponent), end ** (1 / exponent), steps, dtype=torch.float32) ** exponent

    def _spaced_timesteps(self, num_timesteps: int) -> Tensor:
        """`num_timesteps` timesteps, descending, in float64 (LINSPACE's are not whole), as diffusers spaces them."""
        train_steps, spacing = self.params.num_train_timesteps, self.timesteps_spacing
        match spacing:
            case TimestepSpacing.LINSPACE:
                return numpy_linspace(0, train_steps - 1, num_timesteps).flip(0)
            case TimestepSpacing.LEADING:
                ratio = train_steps // num_timesteps
                return (torch.arange(num_timesteps, dtype=torch.float64) * ratio).flip(0) + self.params.timesteps_offset
            case TimestepSpacing.TRAILING:
                # diffusers' `np.arange(T, 0, -T / n)` computes `T + i * ((T - T / n) - T)`: same rounding, same ties.
                # For some n (61, 103, ...) its float end lets one more point in, a timestep of -1: we keep n points.
                delta = (train_steps - train_steps / num_timesteps) - train_steps
                return (torch.arange(num_timesteps, dtype=torch.float64) * delta + train_steps).round() - 1

    def _check_params(self) -> None:
        params, defaults, name = self.params, SolverParams(), type(self).__name__
        for field in self.unsupported_params:
            if getattr(params, field) != getattr(defaults, field):
                raise ValueError(
                    f"{name} does not use SolverParams.{field} (got {getattr(params, field)!r}): leave it to its "
                    f"default {getattr(defaults, field)!r}, or pick a solver that supports it."
                )
        if params.sigma_schedule not in (None, NoiseSchedule.KARRAS):
            raise ValueError(
                f"{name}: sigma_schedule must be None or NoiseSchedule.KARRAS, got {params.sigma_schedule}"
            )
        if not 0.0 <= params.sde_variance <= 1.0:
            raise ValueError(f"{name}: sde_variance must be in [0, 1] (0: ODE, 1: SDE), got {params.sde_variance}")
        if not 0.0 < params.initial_diffusion_rate <= params.final_diffusion_rate < 1.0:
            raise ValueError(
                f"{name}: need 0 < initial_diffusion_rate <= final_diffusion_rate < 1, got "
                f"{params.initial_diffusion_rate} and {params.final_diffusion_rate}."
            )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:
        # Timesteps follow the device but keep their dtype: a half-precision solver must not round Euler's 946.47.
        super()._apply(fn, recurse)
        self.timesteps = self.timesteps.to(device=self.device)
        return self


def sample_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gaussian noise shaped as `like`, drawn on the generator's device (as diffusers: a CPU seed reproduces on GPU)."""
    device = like.device if generator is None else generator.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def numpy_linspace(start: float, end: float, num_points: int) -> Tensor:
    """`numpy.linspace` in float64, whose `start + i * step` rounds (and breaks .5 ties) unlike `torch.linspace`."""
    if num_points == 1:
        return torch.tensor([start], dtype=torch.float64)
    points = torch.arange(num_points, dtype=torch.float64) * ((end - start) / (num_points - 1)) + start
    points[-1] = end
    return points


def karras_sigmas(sigma_min: float, sigma_max: float, num_sigmas: int) -> Tensor:
    """Noise levels evenly spaced in sigma^(1/7) (arXiv:2206.00364, eq. 5), descending, in float64."""
    rho = 7.0
    ramp = numpy_linspace(0, 1, num_sigmas)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigmas_to_timesteps(sigmas: Tensor, train_sigmas: Tensor) -> Tensor:
    """The fractional train timesteps of noise levels, interpolating linearly in log-sigma (float64)."""
    log_train_sigmas = train_sigmas.log()  # float32, as diffusers
    log_sigmas = sigmas.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_train_sigmas.double(), log_sigmas, right=True) - 1).clamp(0, len(train_sigmas) - 2)
    low_log, high_log = log_train_sigmas[low], log_train_sigmas[low + 1]
    # The gap is a float32 difference, as in diffusers' numpy code.
    weight = ((low_log.double() - log_sigmas) / (low_log - high_log).double()).clamp(0, 1)
    return (1 - weight) * low + weight * (low + 1)


def interpolate(x: Tensor, values: Tensor) -> Tensor:
    """`numpy.interp(x, arange(len(values)), values)` in float64: `values` read at fractional indices."""
    x = x.double()
    low = x.floor().long().clamp(0, len(values) - 2)
    table = values.double()
    return (table[low + 1] - table[low]) * (x - low) + table[low]
