"""Classifier-free guidance: Ho & Salimans, "Classifier-Free Diffusion Guidance" (2021), Eq. 6.

eps~ = eps(x_t, empty) + w (eps(x_t, c) - eps(x_t, empty)); w = 1 is the conditional model, w > 1 pushes the
sample toward the condition. Both predictions come from one model call on a doubled batch.
"""

from collections.abc import Callable

import torch

from impl.common.checks import check_number, check_tensor

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_guidance(
    denoiser: Denoiser,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,  # a scalar, or one per row of sample (then doubled with it)
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """uncond + scale x (cond - uncond), from one `denoiser(x, t, context)` call on [uncond; cond]."""
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
    check_tensor("sample", sample, floating=True, dim=range(1, 9))
    check_tensor("cond", cond)
    check_tensor("uncond", uncond)
    guidance_scale = check_number("guidance_scale", guidance_scale)
    if isinstance(timestep, torch.Tensor) and timestep.dim() > 0 and timestep.numel() not in (1, sample.shape[0]):
        raise ValueError(
            f"timestep must be a scalar or hold 1 or batch={sample.shape[0]} values, got shape {tuple(timestep.shape)}"
        )
    if cond.shape != uncond.shape:
        raise ValueError(f"uncond must have cond's shape {tuple(cond.shape)}, got {tuple(uncond.shape)}")
    if cond.shape[0] != sample.shape[0]:
        raise ValueError(f"cond must have the sample's batch size {sample.shape[0]}, got {cond.shape[0]}")
    if isinstance(timestep, torch.Tensor) and timestep.dim() == 1 and len(timestep) == sample.shape[0]:
        timestep = torch.cat([timestep, timestep])  # one per row of [uncond; cond]
    out = denoiser(torch.cat([sample, sample]), timestep, torch.cat([uncond, cond]))  # (2B, ...)
    eps_uncond, eps_cond = out.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
