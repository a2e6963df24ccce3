"""The loops that GLIDE, unCLIP's prior and unCLIP's decoder share.

- `diffusion_loss`: Ho et al. 2020, Algorithm 1: draw t uniformly and eps ~ N(0, I), form
  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and regress the model's output on eps (or on x_0, or on
  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, whatever the scheduler's `prediction_type` says; DALL-E 2's prior
  predicts x_0).
- `fit`: AdamW with a short linear warm-up, keeping an exponential moving average of the weights, which is the
  model that gets sampled (as in DDPM, GLIDE and DALL-E 2). The average's decay ramps up as min(decay,
  (1 + n) / (10 + n)) after n updates, so a short run's average does not keep the random initialization in it.
- `denoise`: Algorithm 2 (DDPM) or DDIM's update, from pure noise through the scheduler's inference timesteps.

`model_fn(x_t, t)` is the model with its condition (and any guidance) already bound, so the loops stay generic.
"""

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from impl.common.checks import (
    check_bool,
    check_generator,
    check_number,
    check_one_of,
    check_positive_int,
    is_number,
)
from impl.diffusion.schedulers import DDIMScheduler, DDPMScheduler

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddim", "ddpm")


def check_train_config(config, positive_ints: tuple[str, ...], fractions: tuple[str, ...]) -> None:
    """Raise a ValueError naming the first field that is not a positive int, or not in [0, 1)."""
    name = type(config).__name__
    for field in positive_ints:
        check_positive_int(f"{name}.{field}", getattr(config, field))
    for field in fractions:
        value = getattr(config, field)
        if not is_number(value) or not 0 <= value < 1:
            raise ValueError(f"{name}.{field} must be in [0, 1), got {value!r}")


def check_scale(name: str, value: float) -> None:
    """A guidance scale must be a real number >= 0."""
    check_number(name, value, low=0)


def check_texts(texts: list[str]) -> None:
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a non-empty list of str, got {texts!r:.80}")


def gaussian(shape: tuple, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """N(0, I) noise drawn on the generator's device (a CPU generator reproduces on CUDA), moved to `device`."""
    gen_device = check_generator("generator", generator).device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def make_scheduler(sampler: str, **config) -> DDIMScheduler | DDPMScheduler:
    """A DDIM or DDPM scheduler by name, with the given SchedulerConfig fields."""
    check_one_of("sampler", sampler, SAMPLERS)
    return (DDIMScheduler if sampler == "ddim" else DDPMScheduler)(**config)


def diffusion_loss(
    model_fn: ModelFn,
    scheduler: DDIMScheduler | DDPMScheduler,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared error between the model's output at a random (t, eps) and the scheduler's target."""
    gen_device = generator.device if generator is not None else x0.device
    B, T = x0.shape[0], scheduler.config.num_train_timesteps
    t = torch.randint(T, (B,), generator=generator, device=gen_device).to(x0.device)
    noise = gaussian(x0.shape, generator, x0.device).to(x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "sample":
        target = x0
    else:  # v_prediction (Salimans & Ho 2022)
        abar = scheduler.alphas_cumprod.to(x0.device)[t].reshape(-1, *[1] * (x0.dim() - 1))
        target = abar**0.5 * noise - (1 - abar) ** 0.5 * x0
    return F.mse_loss(model_fn(x_t, t), target)


def fit(
    model: nn.Module,
    batch_loss: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    ema_decay: float,
    *,
    desc: str = "train",
    progress: bool = False,
    warmup: int = 100,
) -> tuple[nn.Module, list[float]]:
    """Minimize `batch_loss()` (a fresh batch each call) for `steps` steps; (EMA copy in eval mode, loss per step)."""

    def ema_update(average: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        decay = min(ema_decay, (1 + num_averaged.item()) / (10 + num_averaged.item()))  # short memory at first
        return torch.lerp(average, current, 1 - decay)

    ema = torch.optim.swa_utils.AveragedModel(model, avg_fn=ema_update)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update_parameters(model)
        losses.append(loss.item())
    return copy.deepcopy(ema.module).eval(), losses


def denoise(
    model_fn: ModelFn,
    scheduler: DDIMScheduler | DDPMScheduler,
    noise: torch.Tensor,
    num_inference_steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """x_T = noise -> x_0 through `num_inference_steps` steps; `eta` is DDIM's (DDPM always adds its noise)."""
    check_number("eta", eta, low=0)
    check_bool("progress", progress)
    check_generator("generator", generator)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    x = noise
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        out = model_fn(x, t.expand(x.shape[0]))
        if isinstance(scheduler, DDIMScheduler):
            x = scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
        else:
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
