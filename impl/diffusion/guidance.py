"""Classifier-free guidance: Ho & Salimans, "Classifier-Free Diffusion Guidance" (2021), Eq. 6.

eps~ = eps(x_t, empty) + w (eps(x_t, c) - eps(x_t, empty)); w = 1 is the conditional model, w = 0 the
unconditional one, w > 1 pushes the sample toward the condition. Both predictions come from one model call on a
doubled batch [uncond; cond].

The condition is one tensor (Stable Diffusion's text embeddings, unCLIP's CLIP embedding) or a tuple of them
(GLIDE's pooled caption vector and caption token sequence), passed to the model as `denoiser(x, t, *condition)`.
A sampler calls the model at every step with the same condition: `guided_denoiser` checks and concatenates
[uncond; cond] once per sampling run (the caption encodings are computed once, before the loop) and returns the
per-step eps function; `classifier_free_guidance` is the same computation for one call.
"""

from collections.abc import Callable

import torch

from impl.common.checks import check_number, check_tensor

Denoiser = Callable[..., torch.Tensor]  # denoiser(x, t, *condition) -> eps
Condition = torch.Tensor | tuple[torch.Tensor, ...]


def _pair(
    cond: Condition, uncond: Condition, batch: int | None
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(cond parts, [uncond; cond] parts): each part checked against its twin and the sample's batch (None: the
    first part's)."""
    tensors = isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor)
    if not tensors and not (isinstance(cond, tuple) and isinstance(uncond, tuple) and len(cond) == len(uncond) > 0):
        raise TypeError(
            "cond and uncond must both be tensors or tuples of tensors of one length, got "
            f"{type(cond).__name__} and {type(uncond).__name__}"
        )
    conds, unconds = ((cond,), (uncond,)) if tensors else (cond, uncond)
    for i, (c, u) in enumerate(zip(conds, unconds, strict=True)):
        part = "" if tensors else f"[{i}]"
        check_tensor(f"cond{part}", c)
        check_tensor(f"uncond{part}", u)
        if c.shape != u.shape:
            raise ValueError(f"uncond{part} must have cond{part}'s shape {tuple(c.shape)}, got {tuple(u.shape)}")
        if c.dim() == 0:
            raise ValueError(f"cond{part} must have a batch dimension, got shape {tuple(c.shape)}")
        batch = c.shape[0] if batch is None else batch
        if c.shape[0] != batch:
            raise ValueError(f"cond{part} must have the sample's batch size {batch}, got {c.shape[0]}")
    return conds, tuple(torch.cat([u, c]) for c, u in zip(conds, unconds, strict=True))


def _check_call(denoiser: Denoiser, sample: torch.Tensor, timestep: torch.Tensor | int) -> None:
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
    check_tensor("sample", sample, floating=True, dim=range(1, 9))
    if isinstance(timestep, torch.Tensor) and timestep.dim() > 0 and timestep.numel() not in (1, sample.shape[0]):
        raise ValueError(
            f"timestep must be a scalar or hold 1 or batch={sample.shape[0]} values, got shape {tuple(timestep.shape)}"
        )


def _guide(
    denoiser: Denoiser, sample: torch.Tensor, timestep: torch.Tensor | int, paired: tuple[torch.Tensor, ...],
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """Eq. 6 from one denoiser call on [uncond; cond]; `paired` holds each condition part as [uncond; cond]."""
    if isinstance(timestep, torch.Tensor) and timestep.dim() == 1 and len(timestep) == sample.shape[0]:
        timestep = torch.cat([timestep, timestep])  # one per row of [uncond; cond]
    out = denoiser(torch.cat([sample, sample]), timestep, *paired)  # (2B, ...)
    eps_uncond, eps_cond = out.chunk(2)
    return eps_uncond + scale * (eps_cond - eps_uncond)


def classifier_free_guidance(
    denoiser: Denoiser,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,  # a scalar, or one per row of sample (then doubled with it)
    cond: Condition,
    uncond: Condition,
    guidance_scale: float,
) -> torch.Tensor:
    """uncond + scale x (cond - uncond), from one `denoiser(x, t, *condition)` call on [uncond; cond]."""
    _check_call(denoiser, sample, timestep)
    guidance_scale = check_number("guidance_scale", guidance_scale)
    _, paired = _pair(cond, uncond, sample.shape[0])
    return _guide(denoiser, sample, timestep, paired, guidance_scale)


def guided_denoiser(
    denoiser: Denoiser, cond: Condition, uncond: Condition, guidance_scale: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps(x, t) with classifier-free guidance for a whole sampling run: the precomputed condition is checked and
    paired once here. Scale 1 is the conditional model alone (half the work); otherwise each step is one
    `classifier_free_guidance` call."""
    guidance_scale = check_number("guidance_scale", guidance_scale)
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
    conds, paired = _pair(cond, uncond, None)
    batch = conds[0].shape[0]
    if guidance_scale == 1:
        paired = None  # the closure keeps only what its steps read: [uncond; cond] is a copy of both halves
    else:
        conds = None

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_call(denoiser, x, t)
        if x.shape[0] != batch:
            raise ValueError(f"sample must have the condition's batch size {batch}, got shape {tuple(x.shape)}")
        if paired is None:
            return denoiser(x, t, *conds)
        return _guide(denoiser, x, t, paired, guidance_scale)

    return eps
