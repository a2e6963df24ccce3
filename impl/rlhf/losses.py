"""The losses of RLHF: Bradley-Terry for the reward model, PPO's clipped objective with GAE, DPO and IPO.

- Bradley-Terry (Bradley & Terry 1952; Ouyang et al. 2022, "InstructGPT", eq. 1): the probability that the
  chosen completion beats the rejected one is sigmoid(r_c - r_r); the loss is -log sigmoid(r_c - r_r).
- Generalized advantage estimation (Schulman et al. 2016, eq. 16): delta_t = r_t + gamma V_{t+1} - V_t and
  A_t = sum_l (gamma lambda)^l delta_{t+l}; the returns that train the value head are A_t + V_t.
- PPO (Schulman et al. 2017, eq. 7 and 9): ratio = pi / pi_old, L = max(-A ratio, -A clip(ratio, 1 - eps,
  1 + eps)), plus a value loss with the value prediction clipped around the old one, as OpenAI's
  lm-human-preferences and trl's PPOTrainer do.
- The per-token KL penalty to the reference (InstructGPT eq. 2): the k1 estimate log pi - log pi_ref of the
  sampled token, or Schulman's k3 estimate (ratio - 1) - log ratio with ratio = pi_ref / pi, unbiased and >= 0.
- DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta [(log pi_c - log ref_c) - (log pi_r - log ref_r)]),
  implicit reward beta (log pi - log ref). IPO (Azar et al. 2023, eq. 17): the squared distance of that
  log-ratio difference from 1 / (2 beta).

All losses are means over the batch (and over tokens for PPO); completions have a fixed length, so no masks.
"""

import torch
import torch.nn.functional as F

from impl.common.checks import (
    check_bool,
    check_number,
    check_one_of,
    check_positive_number,
    check_probability,
    check_tensor,
)

_KL_ESTIMATORS = ("k1", "k3")


def _check_tensors(**tensors: torch.Tensor) -> torch.Size:
    """All arguments are floating tensors of one shape; returns it, or raises naming the odd one."""
    shape = None
    first = None
    for name, t in tensors.items():
        check_tensor(name, t, floating=True)
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(f"{name} must have the shape of {first} {tuple(shape)}, got {tuple(t.shape)}")
    return shape


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean -log sigmoid(r_chosen - r_rejected) over the pairs; both (B,)."""
    shape = _check_tensors(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"chosen_rewards must have shape (batch,) with batch >= 1, got {tuple(shape)}")
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    ipo: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (or IPO) loss from summed completion log-probabilities, each (B,).

    Returns the mean loss and the implicit rewards beta (log pi - log ref) of the chosen and rejected
    completions, (B,) each, detached.
    """
    shape = _check_tensors(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"policy_chosen_logps must have shape (batch,) with batch >= 1, got {tuple(shape)}")
    check_positive_number("beta", beta)
    check_bool("ipo", ipo)
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratio - rejected_logratio  # (B,)
    losses = (logits - 1 / (2 * beta)) ** 2 if ipo else -F.logsigmoid(beta * logits)
    return losses.mean(), beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def gae(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, both (B, T), of per-token `rewards` and `values` (B, T); V after T is 0."""
    _check_tensors(rewards=rewards, values=values)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (batch, time), got {tuple(rewards.shape)}")
    check_probability("gamma", gamma)
    check_probability("lam", lam)
    rewards, values = rewards.detach(), values.detach()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, advantages + values


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_range: float = 0.2,
    clip_range_value: float = 0.2,
    vf_coef: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO objective plus `vf_coef` x the clipped value loss; all inputs (B, T) per token.

    Returns the loss and detached statistics: policy_loss, value_loss, clip_fraction, approx_kl.
    """
    _check_tensors(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        values=values,
        old_values=old_values,
        returns=returns,
    )
    check_positive_number("clip_range", clip_range)
    check_positive_number("clip_range_value", clip_range_value)
    check_number("vf_coef", vf_coef, low=0)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    policy_losses = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    policy_loss = policy_losses.mean()
    values_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    value_loss = 0.5 * torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2).mean()
    stats = {
        "policy_loss": policy_loss.detach(),
        "value_loss": value_loss.detach(),
        "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean().detach(),
        "approx_kl": (0.5 * log_ratio**2).mean().detach(),
    }
    return policy_loss + vf_coef * value_loss, stats


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probabilities of tokens sampled from pi."""
    _check_tensors(logprobs=logprobs, ref_logprobs=ref_logprobs)
    check_one_of("estimator", estimator, _KL_ESTIMATORS)
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio  # (pi_ref / pi - 1) - log(pi_ref / pi)


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || softmax(ref_logits)) over the last (vocabulary) dimension, summed."""
    _check_tensors(logits=logits, ref_logits=ref_logits)
    logp, ref_logp = F.log_softmax(logits, dim=-1), F.log_softmax(ref_logits, dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)
