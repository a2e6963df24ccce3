"""DDPM and DDIM samplers: the forward noising q(x_t | x_0) and one reverse step each.

Ho et al., "Denoising Diffusion Probabilistic Models" (2020): Eq. 4 gives the forward process
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, Eq. 6-7 the posterior q(x_{t-1} | x_t, x_0) whose mean and
variance (beta~_t, "fixed_small") one DDPM step samples from. Song et al., "Denoising Diffusion Implicit Models"
(2021), Eq. 12: x_{t-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat + sigma_t z, with
sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (Eq. 16); eta = 0 is deterministic.
Schedules: linear (Ho), scaled-linear (Stable Diffusion: linear in sqrt(beta)) and cosine (Nichol & Dhariwal,
"Improved DDPM" (2021), Eq. 17, betas capped at 0.999). Predictions: epsilon, x_0 ("sample") and v (Salimans &
Ho, "Progressive Distillation" (2022): v = sqrt(abar) eps - sqrt(1 - abar) x_0).

The configuration names and the inference timestep lists follow diffusers' DDPMScheduler / DDIMScheduler, so
the two are interchangeable; as there, DDIM's previous timestep is t - num_train_timesteps // steps.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from impl.common.checks import (
    check_bool,
    check_generator,
    check_int,
    check_number,
    check_one_of,
    check_positive_int,
    check_tensor,
)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000  # T, the length of the training chain
    beta_start: float = 0.0001  # beta_1 of the linear / scaled-linear schedules
    beta_end: float = 0.02  # beta_T of the linear / scaled-linear schedules
    beta_schedule: str = "linear"  # one of BETA_SCHEDULES ("squaredcos_cap_v2" is the cosine schedule)
    prediction_type: str = "epsilon"  # what the model outputs: one of PREDICTION_TYPES
    timestep_spacing: str = "leading"  # how inference timesteps are picked from [0, T): one of TIMESTEP_SPACINGS
    steps_offset: int = 0  # added to every "leading" timestep (Stable Diffusion uses 1)
    clip_sample: bool = True  # clamp the predicted x_0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # DDIM: abar before step 0 is 1 (else abar_0)

    def __post_init__(self) -> None:
        check_one_of("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_one_of("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_one_of("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        self.num_train_timesteps = check_positive_int("num_train_timesteps", self.num_train_timesteps)
        self.beta_start = check_number("beta_start", self.beta_start, low=0, high=1, low_open=True, high_open=True)
        self.beta_end = check_number("beta_end", self.beta_end, low=0, high=1, low_open=True, high_open=True)
        self.steps_offset = check_int("steps_offset", self.steps_offset, low=0)
        check_bool("clip_sample", self.clip_sample)
        self.clip_sample_range = check_number("clip_sample_range", self.clip_sample_range, low=0, low_open=True)
        check_bool("set_alpha_to_one", self.set_alpha_to_one)


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_{t-1}
    pred_original_sample: torch.Tensor  # x0_hat


def make_betas(config: SchedulerConfig) -> torch.Tensor:
    """beta_1..beta_T (float32) of the configured schedule."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2

    def alpha_bar(t: float) -> float:  # Nichol & Dhariwal Eq. 17, s = 0.008
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise shaped like x, drawn on the generator's device (so a CPU generator reproduces on CUDA)."""
    device = check_generator("generator", generator).device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class _Scheduler:
    """What DDPM and DDIM share: the schedule, the forward process, the inference timestep list."""

    order = 1  # one model call per step (the attribute diffusers' pipelines read)

    def __init__(self, config: SchedulerConfig | None = None, **overrides) -> None:
        self.config = config if config is not None else SchedulerConfig(**overrides)
        self.betas = make_betas(self.config)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # abar_t
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Pick num_inference_steps timesteps (descending) from [0, T) with the configured spacing."""
        T = self.config.num_train_timesteps
        n = check_int("num_inference_steps", num_inference_steps, low=1, high=T)
        if self.config.timestep_spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        elif self.config.timestep_spacing == "leading":
            timesteps = (np.arange(n) * (T // n))[::-1].astype(np.int64) + self.config.steps_offset
        else:  # trailing: end exactly at T - 1
            timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(timesteps.copy()).to(device)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """DDPM and DDIM feed x_t to the model as is (the hook exists for samplers that rescale it)."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Ho et al. Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, one timestep per batch row."""
        check_tensor("original_samples", original_samples, floating=True, dim=range(1, 9))
        check_tensor("noise", noise, floating=True)
        if noise.shape != original_samples.shape:
            raise ValueError(f"noise must have shape {tuple(original_samples.shape)}, got {tuple(noise.shape)}")
        self._check_timesteps(timesteps, original_samples.shape[0])
        abar = self.alphas_cumprod.to(original_samples.device, original_samples.dtype)[timesteps.to(noise.device)]
        abar = abar.flatten().reshape(-1, *([1] * (original_samples.dim() - 1)))  # (B, 1, 1, 1)
        return abar**0.5 * original_samples + (1 - abar) ** 0.5 * noise

    def _predict(self, model_output: torch.Tensor, sample: torch.Tensor, abar_t: torch.Tensor):
        """(x0_hat, eps_hat) from the model output, whatever it predicts."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0, eps = (sample - (1 - abar_t) ** 0.5 * model_output) / abar_t**0.5, model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5
        else:  # v_prediction
            x0 = abar_t**0.5 * sample - (1 - abar_t) ** 0.5 * model_output
            eps = abar_t**0.5 * model_output + (1 - abar_t) ** 0.5 * sample
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, eps

    def _check_timesteps(self, timesteps: torch.Tensor, batch: int) -> None:
        """add_noise's timesteps: integers in [0, T), one in all or one per row of the batch."""
        T = self.config.num_train_timesteps
        check_tensor("timesteps", timesteps, integer=True, dim=(0, 1))
        if timesteps.numel() not in (1, batch):
            raise ValueError(f"timesteps must hold 1 or batch={batch} values, got shape {tuple(timesteps.shape)}")
        low, high = int(timesteps.min()), int(timesteps.max())
        if low < 0 or high >= T:
            raise ValueError(f"timesteps must be in [0, {T}), got {low if low < 0 else high}")

    def _check_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> int:
        check_tensor("model_output", model_output, floating=True)
        check_tensor("sample", sample, floating=True)
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output must have the sample's shape {tuple(sample.shape)}, got {tuple(model_output.shape)}"
            )
        if isinstance(timestep, torch.Tensor):  # one element, integer-valued (a float tensor like 900.0 too)
            if timestep.numel() != 1 or timestep.is_complex() or timestep.dtype == torch.bool:
                raise ValueError(f"timestep must be an int or a one-element tensor, got shape {tuple(timestep.shape)}")
            value = timestep.item()
            timestep = int(value) if float(value).is_integer() else value
        return check_int("timestep", timestep, low=0, high=self.config.num_train_timesteps, high_open=True)


class DDPMScheduler(_Scheduler):
    """Ancestral sampling from the posterior q(x_prev | x_t, x0_hat) with variance beta~ (Ho et al. Eq. 6-7)."""

    def _previous_timestep(self, t: int) -> int:
        if self.num_inference_steps is None:
            return t - 1
        index = (self.timesteps == t).nonzero()
        if len(index) == 0:
            raise ValueError(f"timestep must be one of the set timesteps {self.timesteps.tolist()}, got {t}")
        i = int(index[0, 0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """x_t -> x_prev: posterior mean from x0_hat and x_t, plus sqrt(beta~) z unless this is the last step."""
        t = self._check_step(model_output, timestep, sample)
        prev_t = self._previous_timestep(t)
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        alpha_t = abar_t / abar_prev  # the step's alpha when steps are skipped
        beta_t = 1 - alpha_t
        x0, _ = self._predict(model_output, sample, abar_t)
        mean = (abar_prev**0.5 * beta_t) / (1 - abar_t) * x0 + alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t) * sample
        if t > 0:
            variance = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)  # beta~_t
            mean = mean + variance**0.5 * _randn_like(model_output, generator)
        return StepOutput(mean, x0)


class DDIMScheduler(_Scheduler):
    """The non-Markovian DDIM update (Song et al. Eq. 12); eta = 1 recovers DDPM's variance."""

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """x_t -> x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z."""
        if self.num_inference_steps is None:
            raise ValueError("set_timesteps(num_inference_steps) must be called before step")
        eta = check_number("eta", eta, low=0)
        t = self._check_step(model_output, timestep, sample)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        abar_t = self.alphas_cumprod[t]
        if prev_t >= 0:
            abar_prev = self.alphas_cumprod[prev_t]
        else:
            abar_prev = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        x0, eps = self._predict(model_output, sample, abar_t)
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)  # Eq. 16 without eta
        sigma = eta * variance**0.5
        prev = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if eta > 0:
            prev = prev + sigma * _randn_like(model_output, generator)
        return StepOutput(prev, x0)
