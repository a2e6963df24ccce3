"""DDPM / DDIM: the timestep lists, add_noise and every step equal diffusers' schedulers, for each beta schedule,
prediction type and timestep spacing; DDIM with eta = 0 inverts add_noise exactly (a hypothesis property)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.common import tolerance
from impl.diffusion import DDIMScheduler, DDPMScheduler

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
SPACINGS = ["leading", "trailing", "linspace"]
PAIRS = {"ddpm": (DDPMScheduler, "DDPMScheduler"), "ddim": (DDIMScheduler, "DDIMScheduler")}  # ours, diffusers'
TOL = tolerance(torch.float32)


def _pair(kind: str, **config):
    """(ours, diffusers') scheduler on one config; the test skips where diffusers is not installed."""
    diffusers = pytest.importorskip("diffusers", reason="the reference schedulers are diffusers'")
    ours, reference = PAIRS[kind]
    if kind == "ddpm":
        config.pop("set_alpha_to_one", None)  # a DDIM-only option
    return ours(**config), getattr(diffusers, reference)(**config)


def _step_inputs(i: int, shape=(2, 4, 6, 6)):
    g = torch.Generator().manual_seed(i)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _assert_steps_equal(kind, ours, reference, timesteps, eta=0.0):
    for i, t in enumerate(timesteps):
        model_output, sample = _step_inputs(i)
        extra = {"eta": eta} if kind == "ddim" else {}
        got = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(i), **extra)
        want = reference.step(
            model_output, t, sample, generator=torch.Generator().manual_seed(i), return_dict=False, **extra
        )
        torch.testing.assert_close(got.pred_original_sample, want[1], **TOL, msg=f"x0_hat at t={int(t)}")
        torch.testing.assert_close(got.prev_sample, want[0], **TOL, msg=f"x_prev at t={int(t)}")


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_step_equals_diffusers_at_every_timestep(kind, schedule, prediction):
    ours, reference = _pair(kind, beta_schedule=schedule, prediction_type=prediction, num_train_timesteps=200)
    torch.testing.assert_close(ours.alphas_cumprod, reference.alphas_cumprod, **TOL)
    for scheduler in (ours, reference):
        scheduler.set_timesteps(200)  # one inference step per training step: every timestep is visited
    eta = 0.7 if kind == "ddim" else 0.0  # DDIM's noise term on (eta = 0 is covered by the spacing test)
    _assert_steps_equal(kind, ours, reference, reference.timesteps, eta=eta)


def test_ddpm_without_set_timesteps_steps_to_t_minus_1():
    ours, reference = _pair("ddpm", num_train_timesteps=100, clip_sample=False)
    _assert_steps_equal("ddpm", ours, reference, range(99, -1, -1))


@pytest.mark.parametrize("steps", [1, 7, 50])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_timesteps_and_skipping_steps_equal_diffusers(kind, spacing, steps):
    config = {"timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0}
    config |= {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}
    ours, reference = _pair(kind, set_alpha_to_one=False, **config)
    ours.set_timesteps(steps)
    reference.set_timesteps(steps)
    assert ours.timesteps.tolist() == reference.timesteps.tolist()
    _assert_steps_equal(kind, ours, reference, reference.timesteps)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_add_noise_equals_diffusers_at_every_timestep(kind, schedule):
    ours, reference = _pair(kind, beta_schedule=schedule)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1000, 3, 4, 4, generator=g), torch.randn(1000, 3, 4, 4, generator=g)
    timesteps = torch.arange(1000)  # one row per timestep
    got = ours.add_noise(x0, noise, timesteps)
    torch.testing.assert_close(got, reference.add_noise(x0, noise, timesteps), **TOL)
    shifted = ours.add_noise(x0, noise, timesteps.roll(1))  # negative control: the wrong timesteps differ
    assert not torch.allclose(shifted, got, **TOL)


def test_negative_controls_a_perturbed_output_or_another_schedule_differ():
    ours, reference = _pair("ddim", beta_schedule="linear")
    other = DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    for scheduler in (ours, reference, other):
        scheduler.set_timesteps(10)
    model_output, sample = _step_inputs(0)
    t = reference.timesteps[3]
    want = reference.step(model_output, t, sample, return_dict=False)[0]
    assert not torch.allclose(ours.step(model_output + 1e-2, t, sample).prev_sample, want, **TOL)
    assert not torch.allclose(other.step(model_output, t, sample).prev_sample, want, **TOL)


@settings(max_examples=30, deadline=None)
@given(
    steps=st.integers(1, 100),
    index=st.integers(0, 99),
    prediction=st.sampled_from(PREDICTIONS),
    schedule=st.sampled_from(SCHEDULES),
)
def test_ddim_with_the_true_prediction_lands_on_the_forward_process(steps, index, prediction, schedule):
    """eta = 0, the model predicting exactly (eps, x_0 or v): x0_hat = x_0 and x_prev = add_noise(x_0, eps, prev)."""
    scheduler = DDIMScheduler(beta_schedule=schedule, prediction_type=prediction, clip_sample=False)
    scheduler.set_timesteps(steps)
    t = int(scheduler.timesteps[index % steps])
    prev_t = t - 1000 // steps
    g = torch.Generator().manual_seed(index)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    x_t = scheduler.add_noise(x0, eps, torch.tensor([t]))
    abar = scheduler.alphas_cumprod[t]
    target = {"epsilon": eps, "sample": x0, "v_prediction": abar**0.5 * eps - (1 - abar) ** 0.5 * x0}[prediction]
    out = scheduler.step(target, t, x_t)
    torch.testing.assert_close(out.pred_original_sample, x0, atol=2e-3, rtol=2e-3)  # 1/sqrt(abar) amplifies fp32
    want = scheduler.add_noise(x0, eps, torch.tensor([prev_t])) if prev_t >= 0 else x0
    torch.testing.assert_close(out.prev_sample, want, atol=2e-3, rtol=2e-3)


def test_bad_configuration_and_input_raise_clear_errors():
    with pytest.raises(ValueError, match="beta_schedule must be one of .* got 'cosine'"):
        DDPMScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type must be one of .* got 'x0'"):
        DDIMScheduler(prediction_type="x0")
    with pytest.raises(ValueError, match="timestep_spacing must be one of .* got 'even'"):
        DDIMScheduler(timestep_spacing="even")
    scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 4), 10, torch.zeros(1, 4))
    for steps in (0, 1001):
        with pytest.raises(ValueError, match=rf"num_inference_steps must be an int in \[1, 1000\], got {steps}"):
            scheduler.set_timesteps(steps)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"model_output must have the sample's shape \(1, 4\), got \(1, 3\)"):
        scheduler.step(torch.zeros(1, 3), 901, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"timestep must be an int in \[0, 1000\), got 1000"):
        scheduler.step(torch.zeros(1, 4), 1000, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="eta must be a number >= 0, got -1"):
        scheduler.step(torch.zeros(1, 4), 900, torch.zeros(1, 4), eta=-1)
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep must be one of the set timesteps .* got 5"):
        ddpm.step(torch.zeros(1, 4), 5, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 4\), got \(1, 4\)"):
        ddpm.add_noise(torch.zeros(2, 4), torch.zeros(1, 4), torch.tensor([1, 2]))
