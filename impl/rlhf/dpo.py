"""Direct preference optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model
is Secretly a Reward Model", eq. 7), or IPO (Azar et al. 2023) with `ipo=True`.

Two models: the policy being trained and a frozen copy of it as the reference. No reward model and no
sampling during training: each step is an AdamW step on `dpo_loss` of the summed completion log-probabilities
of a minibatch of (chosen, rejected) pairs under both models.
"""

import copy
from dataclasses import dataclass

import torch

from impl.common.checks import check_bool, check_positive_number
from impl.gpt import GPT
from impl.rlhf.losses import dpo_loss
from impl.rlhf.models import completion_logprobs
from impl.rlhf.task import check_pairs


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the implicit KL constraint to the reference
    ipo: bool = False  # the IPO squared loss instead of DPO's logistic one
    lr: float = 3e-4  # AdamW learning rate
    max_grad_norm: float = 1.0  # global gradient-norm clip per step

    def __post_init__(self) -> None:
        check_positive_number("DPOConfig.beta", self.beta)
        check_bool("DPOConfig.ipo", self.ipo)
        check_positive_number("DPOConfig.lr", self.lr)
        check_positive_number("DPOConfig.max_grad_norm", self.max_grad_norm)


class DPOTrainer:
    """DPO on `policy`; holds the frozen reference it copies from the policy at construction."""

    def __init__(self, policy: GPT, config: DPOConfig | None = None):
        if not isinstance(policy, GPT):
            raise TypeError(f"policy must be an impl.gpt.GPT, got {type(policy).__name__}")
        self.config = config or DPOConfig()
        self.policy = policy
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=self.config.lr, weight_decay=0.0)

    def _loss(self, chosen: torch.Tensor, rejected: torch.Tensor, prompt_len: int):
        check_pairs(chosen, rejected)
        both = torch.cat([chosen, rejected])  # (2B, T): one forward per model
        logps = completion_logprobs(self.policy, both, prompt_len).sum(1)  # (2B,)
        with torch.no_grad():
            ref_logps = completion_logprobs(self.reference, both, prompt_len).sum(1)
        return dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), beta=self.config.beta, ipo=self.config.ipo)

    def step(self, chosen: torch.Tensor, rejected: torch.Tensor, prompt_len: int) -> dict[str, float]:
        """One AdamW step on the pairs (B, T); returns the loss, the implicit reward margin and accuracy."""
        self.policy.train()
        loss, chosen_rewards, rejected_rewards = self._loss(chosen, rejected, prompt_len)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.policy.eval()
        return _stats(loss, chosen_rewards, rejected_rewards)

    @torch.no_grad()
    def evaluate(self, chosen: torch.Tensor, rejected: torch.Tensor, prompt_len: int) -> dict[str, float]:
        """Loss, implicit reward margin and accuracy on held-out pairs, without training."""
        return _stats(*self._loss(chosen, rejected, prompt_len))


def _stats(loss: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    margin = chosen_rewards - rejected_rewards
    return {"loss": loss.item(), "margin": margin.mean().item(), "accuracy": (margin > 0).float().mean().item()}
