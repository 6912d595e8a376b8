"""Every solver walks the same path as its diffusers scheduler, step for step, under Stable Diffusion 1.5's config."""

import re
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.training_utils import compute_snr
from torch import Tensor

from refiners.foundationals.latent_diffusion.solvers import (
    DDIM,
    DDPM,
    DPMSolver,
    Euler,
    EulerAncestral,
    FinalSigma,
    LCMSolver,
    ModelPredictionType,
    NoiseSchedule,
    Solver,
    SolverParams,
    TimestepSpacing,
)

# diffusers' own numpy calls warn under numpy 2 (`__array__` without `copy`): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ATOL, RTOL = 1e-5, 1e-5

# Stable Diffusion 1.5's `scheduler_config.json`, less the PNDM-only fields.
SD15_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
PREDICTION_TYPES = {
    ModelPredictionType.NOISE: "epsilon",
    ModelPredictionType.SAMPLE: "sample",
    ModelPredictionType.V_PREDICTION: "v_prediction",
}
SPACINGS = list(TimestepSpacing)

Scheduler = Any  # diffusers schedulers share no typed base with `step`


def sd15_scheduler(scheduler_class: Callable[..., Scheduler], steps: int | None, **config: Any) -> Scheduler:
    """A diffusers scheduler with SD1.5's config (or `config` where given), its timesteps set for `steps` steps."""
    scheduler = scheduler_class(**(SD15_CONFIG | config))
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


def fake_model(x: Tensor, timestep: Tensor) -> Tensor:
    """A stand-in denoiser: a fixed deterministic function of the latent and the timestep."""
    phase = torch.linspace(0, 3, x.numel()).reshape(x.shape)
    return 0.1 * x + torch.sin(0.01 * timestep.float() + phase)


def initial_latent() -> Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(42))


def assert_same_path(
    solver: Solver,
    scheduler: Scheduler,
    first_step: int = 0,
    start: Tensor | None = None,
    timesteps_atol: float = 0.0,
) -> None:
    """Same timesteps, then the same state after every step, with the same model and the same random seeds."""
    if timesteps_atol == 0.0:
        assert solver.timesteps.dtype == scheduler.timesteps.dtype
        assert torch.equal(solver.timesteps, scheduler.timesteps), (solver.timesteps, scheduler.timesteps)
    else:  # fractional karras timesteps: diffusers takes numpy's float32 log, which differs from torch's by an ulp
        torch.testing.assert_close(solver.timesteps, scheduler.timesteps, atol=timesteps_atol, rtol=0)
    ours = theirs = initial_latent() * solver.init_noise_sigma if start is None else start
    our_generator, their_generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert list(solver.inference_steps) == list(range(first_step, len(scheduler.timesteps)))
    for step in solver.inference_steps:
        timestep = scheduler.timesteps[step]
        their_output = fake_model(scheduler.scale_model_input(theirs, timestep), timestep)
        theirs = scheduler.step(their_output, timestep, theirs, generator=their_generator).prev_sample
        our_output = fake_model(solver.scale_model_input(ours, step), solver.timesteps[step])
        ours = solver(ours, predicted_noise=our_output, step=step, generator=our_generator)
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL, msg=lambda m, s=step: f"step {s}: {m}")


def ddim_pair(
    spacing: TimestepSpacing, prediction: ModelPredictionType, final_sigma: FinalSigma, steps: int = 30
) -> tuple[Solver, Scheduler]:
    scheduler = sd15_scheduler(
        DDIMScheduler,
        steps,
        clip_sample=False,
        set_alpha_to_one=final_sigma == FinalSigma.ZERO,
        timestep_spacing=spacing.value,
        prediction_type=PREDICTION_TYPES[prediction],
    )
    params = SolverParams(timesteps_spacing=spacing, model_prediction_type=prediction, final_sigma=final_sigma)
    return DDIM(steps, params=params), scheduler


@pytest.mark.parametrize("final_sigma", list(FinalSigma))
@pytest.mark.parametrize("prediction", list(ModelPredictionType))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim(spacing: TimestepSpacing, prediction: ModelPredictionType, final_sigma: FinalSigma) -> None:
    assert_same_path(*ddim_pair(spacing, prediction, final_sigma))


def test_ddim_defaults_are_stable_diffusion_15() -> None:
    scheduler = sd15_scheduler(DDIMScheduler, 30, clip_sample=False, set_alpha_to_one=False)
    assert_same_path(DDIM(30), scheduler)


@pytest.mark.parametrize("prediction", list(ModelPredictionType))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddpm(spacing: TimestepSpacing, prediction: ModelPredictionType) -> None:
    scheduler = sd15_scheduler(
        DDPMScheduler,
        25,
        clip_sample=False,
        timestep_spacing=spacing.value,
        prediction_type=PREDICTION_TYPES[prediction],
    )
    solver = DDPM(25, params=SolverParams(timesteps_spacing=spacing, model_prediction_type=prediction))
    assert_same_path(solver, scheduler)


def test_ddpm_default_walks_every_training_timestep() -> None:
    scheduler = sd15_scheduler(DDPMScheduler, None, clip_sample=False)  # no `set_timesteps`: the training schedule
    solver = DDPM()
    assert torch.equal(solver.timesteps, scheduler.timesteps)
    # The last 30 steps, down to timestep 0 (the noise-free step), on a partly denoised latent.
    scheduler.num_inference_steps = None
    x = ours = initial_latent()
    generator, our_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for step in range(970, 1000):
        timestep = scheduler.timesteps[step]
        x = scheduler.step(fake_model(x, timestep), timestep, x, generator=generator).prev_sample
        ours = solver(ours, fake_model(ours, solver.timesteps[step]), step, generator=our_generator)
        torch.testing.assert_close(ours, x, atol=ATOL, rtol=RTOL)


def dpm_pair(
    steps: int,
    spacing: TimestepSpacing = TimestepSpacing.LINSPACE,
    prediction: ModelPredictionType = ModelPredictionType.NOISE,
    sde: bool = False,
    karras: bool = False,
    final_sigma: FinalSigma = FinalSigma.ZERO,
    last_step_first_order: bool = False,
) -> tuple[Solver, Scheduler]:
    scheduler = sd15_scheduler(
        DPMSolverMultistepScheduler,
        steps,
        timestep_spacing=spacing.value,
        prediction_type=PREDICTION_TYPES[prediction],
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
        use_karras_sigmas=karras,
        final_sigmas_type=final_sigma.value,
        euler_at_final=last_step_first_order,
    )
    params = SolverParams(
        timesteps_spacing=spacing,
        model_prediction_type=prediction,
        sde_variance=1.0 if sde else 0.0,
        sigma_schedule=NoiseSchedule.KARRAS if karras else None,
        final_sigma=final_sigma,
    )
    return DPMSolver(steps, params=params, last_step_first_order=last_step_first_order), scheduler


@pytest.mark.parametrize("sde", [False, True], ids=["ode", "sde"])
@pytest.mark.parametrize("prediction", list(ModelPredictionType))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpm_solver(spacing: TimestepSpacing, prediction: ModelPredictionType, sde: bool) -> None:
    assert_same_path(*dpm_pair(20, spacing, prediction, sde=sde))


@pytest.mark.parametrize("sde", [False, True], ids=["ode", "sde"])
@pytest.mark.parametrize("prediction", list(ModelPredictionType))
def test_dpm_solver_karras(prediction: ModelPredictionType, sde: bool) -> None:
    assert_same_path(*dpm_pair(25, prediction=prediction, sde=sde, karras=True))


@pytest.mark.parametrize("last_step_first_order", [False, True])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_last_step(steps: int, last_step_first_order: bool) -> None:
    # Onto a nonzero final noise level, the last step is second order for 15 steps or more, unless asked otherwise.
    pair = dpm_pair(steps, final_sigma=FinalSigma.MIN, last_step_first_order=last_step_first_order)
    assert_same_path(*pair)


def euler_pair(
    spacing: TimestepSpacing,
    prediction: ModelPredictionType,
    karras: bool = False,
    final_sigma: FinalSigma = FinalSigma.ZERO,
) -> tuple[Solver, Scheduler]:
    scheduler = sd15_scheduler(
        EulerDiscreteScheduler,
        30,
        timestep_spacing=spacing.value,
        prediction_type=PREDICTION_TYPES[prediction],
        use_karras_sigmas=karras,
        final_sigmas_type=final_sigma.value,
    )
    params = SolverParams(
        timesteps_spacing=spacing,
        model_prediction_type=prediction,
        sigma_schedule=NoiseSchedule.KARRAS if karras else None,
        final_sigma=final_sigma,
    )
    return Euler(30, params=params), scheduler


@pytest.mark.parametrize("prediction", list(ModelPredictionType))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler(spacing: TimestepSpacing, prediction: ModelPredictionType) -> None:
    solver, scheduler = euler_pair(spacing, prediction)
    assert solver.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-7)
    assert_same_path(solver, scheduler)


@pytest.mark.parametrize("prediction", list(ModelPredictionType))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_karras(spacing: TimestepSpacing, prediction: ModelPredictionType) -> None:
    assert_same_path(*euler_pair(spacing, prediction, karras=True), timesteps_atol=1e-4)


def test_euler_final_sigma_min() -> None:
    assert_same_path(*euler_pair(TimestepSpacing.LINSPACE, ModelPredictionType.NOISE, final_sigma=FinalSigma.MIN))


# diffusers' ancestral Euler has no "sample" prediction.
@pytest.mark.parametrize("prediction", [ModelPredictionType.NOISE, ModelPredictionType.V_PREDICTION])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_ancestral(spacing: TimestepSpacing, prediction: ModelPredictionType) -> None:
    scheduler = sd15_scheduler(
        EulerAncestralDiscreteScheduler,
        30,
        timestep_spacing=spacing.value,
        prediction_type=PREDICTION_TYPES[prediction],
    )
    solver = EulerAncestral(30, params=SolverParams(timesteps_spacing=spacing, model_prediction_type=prediction))
    assert solver.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-7)
    assert_same_path(solver, scheduler)


@pytest.mark.parametrize("original_steps", [50, 30])
@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("prediction", list(ModelPredictionType))
def test_lcm(prediction: ModelPredictionType, steps: int, original_steps: int) -> None:
    scheduler = sd15_scheduler(
        LCMScheduler,
        steps,
        original_inference_steps=original_steps,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=PREDICTION_TYPES[prediction],
    )
    solver = LCMSolver(
        steps, params=SolverParams(model_prediction_type=prediction), original_inference_steps=original_steps
    )
    assert_same_path(solver, scheduler)


def test_uniform_noise_schedule() -> None:
    scheduler = sd15_scheduler(DDIMScheduler, 30, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False)
    assert_same_path(DDIM(30, params=SolverParams(noise_schedule=NoiseSchedule.UNIFORM)), scheduler)


def test_karras_noise_schedule() -> None:
    # Betas linear in beta^(1/7): diffusers has no such `beta_schedule`, so give it the betas.
    betas = torch.linspace(0.00085 ** (1 / 7), 0.012 ** (1 / 7), 1000, dtype=torch.float32) ** 7
    scheduler = sd15_scheduler(
        DDIMScheduler, 30, trained_betas=betas.tolist(), clip_sample=False, set_alpha_to_one=False
    )
    assert_same_path(DDIM(30, params=SolverParams(noise_schedule=NoiseSchedule.KARRAS)), scheduler)


IMG2IMG_CASES: dict[str, Callable[[], tuple[Solver, Scheduler]]] = {
    "ddim": lambda: ddim_pair(TimestepSpacing.LEADING, ModelPredictionType.NOISE, FinalSigma.MIN),
    "ddpm": lambda: (
        DDPM(30, params=SolverParams(timesteps_spacing=TimestepSpacing.LEADING)),
        sd15_scheduler(DDPMScheduler, 30, clip_sample=False),
    ),
    "dpm_solver": lambda: dpm_pair(30),
    "dpm_solver_sde_karras": lambda: dpm_pair(30, sde=True, karras=True),
    "euler": lambda: euler_pair(TimestepSpacing.LINSPACE, ModelPredictionType.NOISE),
    "euler_karras": lambda: euler_pair(TimestepSpacing.LEADING, ModelPredictionType.NOISE, karras=True),
}


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("case", list(IMG2IMG_CASES))
def test_img2img(case: str, strength: float) -> None:
    full_solver, scheduler = IMG2IMG_CASES[case]()
    steps = full_solver.num_inference_steps
    # StableDiffusionImg2ImgPipeline.get_timesteps and prepare_latents:
    init_timestep = min(int(steps * strength), steps)
    first_step = max(steps - init_timestep, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first_step)
    image_latent, noise = initial_latent(), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    their_start = scheduler.add_noise(image_latent, noise, scheduler.timesteps[first_step : first_step + 1])

    solver = full_solver.rebuild(first_inference_step=first_step)
    our_start = solver.add_noise(image_latent, noise, step=first_step)
    torch.testing.assert_close(our_start, their_start, atol=ATOL, rtol=RTOL)
    assert_same_path(
        solver, scheduler, first_step=first_step, start=their_start, timesteps_atol=1e-4 * ("karras" in case)
    )


@pytest.mark.parametrize("case", list(IMG2IMG_CASES))
def test_add_noise(case: str) -> None:
    solver, scheduler = IMG2IMG_CASES[case]()
    x, noise = initial_latent(), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for step in (0, 11, solver.num_inference_steps - 1):
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(step)
        expected = scheduler.add_noise(x, noise, scheduler.timesteps[step : step + 1])
        torch.testing.assert_close(solver.add_noise(x, noise, step), expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(solver.remove_noise(expected, noise, step), x, atol=1e-4, rtol=1e-4)


def test_training_batch_add_noise_and_snr() -> None:
    scheduler = sd15_scheduler(DDPMScheduler, None, clip_sample=False)
    solver = DDPM()
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    steps = [0, 1, 250, 500, 998, 999]
    timesteps = scheduler.timesteps[steps]
    expected = scheduler.add_noise(x, noise, timesteps)
    for batch_steps in (steps, torch.tensor(steps)):
        torch.testing.assert_close(solver.add_noise(x, noise, batch_steps), expected, atol=ATOL, rtol=RTOL)
    # One sample, one level: sample 2 alone matches its row of the batch.
    torch.testing.assert_close(solver.add_noise(x[2:3], noise[2:3], 250), expected[2:3], atol=ATOL, rtol=RTOL)
    # The min-SNR weighting's signal-to-noise ratios (diffusers.training_utils.compute_snr).
    snr = solver.signal_to_noise_ratios[timesteps]
    torch.testing.assert_close(snr, compute_snr(scheduler, timesteps), atol=0, rtol=1e-5)


def test_remove_noise_is_the_predicted_sample() -> None:
    solver, scheduler = ddim_pair(TimestepSpacing.LEADING, ModelPredictionType.NOISE, FinalSigma.MIN)
    x = initial_latent()
    for step in (0, 15, 29):
        output = fake_model(x, scheduler.timesteps[step])
        expected = scheduler.step(output, scheduler.timesteps[step], x).pred_original_sample
        torch.testing.assert_close(solver.remove_noise(x, output, step), expected, atol=ATOL, rtol=RTOL)
    euler, euler_scheduler = euler_pair(TimestepSpacing.LINSPACE, ModelPredictionType.NOISE)
    output = fake_model(x, euler_scheduler.timesteps[5])
    euler_scheduler.set_begin_index(5)
    expected = euler_scheduler.step(output, euler_scheduler.timesteps[5], x).pred_original_sample
    torch.testing.assert_close(euler.remove_noise(x, output, 5), expected, atol=ATOL, rtol=RTOL)


def test_rebuild() -> None:
    solver = DPMSolver(
        30, params=SolverParams(sigma_schedule=NoiseSchedule.KARRAS, sde_variance=1.0), last_step_first_order=True
    )
    rebuilt = solver.rebuild(num_inference_steps=12, first_inference_step=3)
    assert (rebuilt.num_inference_steps, rebuilt.first_inference_step) == (12, 3)
    assert rebuilt.params == solver.params and rebuilt.last_step_first_order
    assert list(rebuilt.inference_steps) == list(range(3, 12))
    _, scheduler = dpm_pair(12, sde=True, karras=True, last_step_first_order=True)
    assert torch.equal(rebuilt.timesteps, scheduler.timesteps)
    assert torch.equal(solver.rebuild().timesteps, solver.timesteps)

    lcm = LCMSolver(4, original_inference_steps=30).rebuild(num_inference_steps=6)
    lcm_scheduler = sd15_scheduler(LCMScheduler, 6, original_inference_steps=30)
    assert isinstance(lcm, LCMSolver) and torch.equal(lcm.timesteps, lcm_scheduler.timesteps)


def test_params_are_frozen() -> None:
    params = SolverParams()
    with pytest.raises(AttributeError, match="cannot assign"):
        params.num_train_timesteps = 10  # pyright: ignore[reportAttributeAccessIssue]


def test_device_and_dtype() -> None:
    solver = Euler(30).to(dtype=torch.float64)
    assert solver.dtype == torch.float64 and solver.sigmas.dtype == torch.float64
    assert solver.noise_std.dtype == torch.float64 and solver.device == torch.device("cpu")
    # Fractional timesteps keep float32, so they do not move with the schedule's precision.
    assert torch.equal(solver.timesteps, Euler(30).timesteps)
    half = DDIM(30, dtype=torch.float16)
    assert half.cumulative_scale_factors.dtype == torch.float16 and half.timesteps.dtype == torch.int64


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: DDIM(1001), r"num_inference_steps=1001 must be between 1 and num_train_timesteps=1000"),
        (lambda: DDIM(0), r"num_inference_steps=0 must be between 1"),
        (lambda: DPMSolver(20, first_inference_step=20), r"first_inference_step=20 must be in \[0, num_inference_"),
        (lambda: Euler(20, first_inference_step=-1), r"first_inference_step=-1 must be in"),
        (lambda: DDIM(30).rebuild(first_inference_step=30), r"first_inference_step=30"),
        (lambda: DDIM(30, params=SolverParams(sde_variance=1.0)), r"DDIM does not use SolverParams.sde_variance"),
        (
            lambda: DDPM(params=SolverParams(sigma_schedule=NoiseSchedule.KARRAS)),
            r"DDPM does not use SolverParams.sigma_schedule",
        ),
        (
            lambda: LCMSolver(4, params=SolverParams(timesteps_spacing=TimestepSpacing.TRAILING)),
            r"LCMSolver does not use SolverParams.timesteps_spacing",
        ),
        (lambda: Euler(30, params=SolverParams(sde_variance=0.5)), r"Euler does not use SolverParams.sde_variance"),
        (
            lambda: DPMSolver(20, params=SolverParams(sigma_schedule=NoiseSchedule.QUADRATIC)),
            r"sigma_schedule must be None or NoiseSchedule.KARRAS",
        ),
        (lambda: DPMSolver(20, params=SolverParams(sde_variance=2.0)), r"sde_variance must be in \[0, 1\]"),
        (
            lambda: DDIM(20, params=SolverParams(initial_diffusion_rate=0.1, final_diffusion_rate=0.01)),
            r"need 0 < initial_diffusion_rate <= final_diffusion_rate < 1",
        ),
        (
            lambda: DDPM(1000, params=SolverParams(timesteps_spacing=TimestepSpacing.LEADING)),
            r"leave \[0, num_train_timesteps=1000\): lower timesteps_offset=1",
        ),
        (lambda: LCMSolver(60), r"need num_inference_steps=60 <= original_inference_steps=50"),
        (lambda: LCMSolver(4, original_inference_steps=2000), r"original_inference_steps=2000 <= num_train_timesteps"),
    ],
)
def test_bad_params(build: Callable[[], Solver], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_docstring_example_runs() -> None:
    assert Solver.__doc__ is not None
    (example,) = re.findall(r"```py\n(.*?)```", Solver.__doc__, flags=re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(example), namespace)
    assert namespace["x"].shape == (1, 4, 8, 8)
