"""Contrastive losses: CLIP's symmetric InfoNCE and SimCLR's NT-Xent.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", figure 3):
L2-normalize both embeddings, logits = exp(t) * I @ T^T with t the learnable log-temperature, and average the
cross-entropies over rows (image -> text) and columns (text -> image) with the diagonal as the targets.

NT-Xent (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations", eq. 1):
2N views, cosine similarity over temperature tau, each view's positive is its pair and its negatives are the
other 2N - 2 views; the loss is averaged over all 2N anchors.
"""

import torch
import torch.nn.functional as F

from impl.common.checks import check_positive_number, check_tensor

# How far from 1 a row's norm may be for a tensor to count as L2-normalized.
UNIT_NORM_ATOL = 1e-3


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    for name, x in ((name_a, a), (name_b, b)):
        check_tensor(name, x, shape=("batch", "dim"), floating=True)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_b} must have the batch size of {name_a} ({a.shape[0]}), got {b.shape[0]}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_b} must have the embedding dim of {name_a} ({a.shape[1]}), got {b.shape[1]}")


def check_unit_norm(name: str, x: torch.Tensor) -> None:
    """Raise ValueError unless every row of `x` has L2 norm 1 (within UNIT_NORM_ATOL)."""
    norms = x.detach().float().norm(dim=-1)
    worst = (norms - 1).abs().max().item() if norms.numel() else 0.0
    if worst > UNIT_NORM_ATOL:
        raise ValueError(
            f"{name} must be L2-normalized (row norms 1 +- {UNIT_NORM_ATOL}), got a row norm off by {worst:.3g}"
        )


def clip_logits(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """(B_img, B_txt) logits exp(logit_scale) * cos(image_i, text_j); embeddings are normalized here."""
    scale = torch.as_tensor(logit_scale, dtype=image_embeds.dtype, device=image_embeds.device)
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(scale.shape)}")
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    return scale.exp() * image_embeds @ text_embeds.T


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric contrastive loss of CLIP on (B, D) embeddings of B matching pairs; `logit_scale` is the log of
    the inverse temperature (the learnable parameter of `CLIPModel`)."""
    _check_pair("image_embeds", image_embeds, "text_embeds", text_embeds)
    logits = clip_logits(image_embeds, text_embeds, logit_scale)  # (B, B), row i: image i against every text
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent on two (N, D) batches of views, z1[i] and z2[i] being the positive pair."""
    _check_pair("z1", z1, "z2", z2)
    check_positive_number("temperature", temperature)
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"z1 must hold at least 2 pairs (the negatives are the other pairs), got {n}")
    z = F.normalize(torch.cat([z1, z2]), dim=-1)  # (2N, D)
    sim = z @ z.T / temperature  # (2N, 2N)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # k != i
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # view i pairs with i +- N
    return F.cross_entropy(sim, positives)
