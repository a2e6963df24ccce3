"""RLHF with PPO as in InstructGPT (Ouyang et al. 2022, section 3.5; Ziegler et al. 2019, section 2.2).

Four models: the policy being trained, a frozen copy of it as the reference, a reward model trained on the
preference pairs with the Bradley-Terry loss and then frozen, and a value model (initialised from the reward
model, as in InstructGPT). One `PPOTrainer.step` is one round of Algorithm 1 of Schulman et al. 2017:

1. Roll out: sample a completion of `completion_len` tokens for each prompt at temperature 1.
2. Score: the reward of token t is -kl_coef * (log pi - log pi_ref)(token t), plus the reward model's score of
   the whole completion on its last token (InstructGPT eq. 2, spread per token as in Ziegler et al.).
3. Advantages by GAE over the completion's tokens, whitened over the batch.
4. `epochs` passes over the rollout in shuffled minibatches, each an AdamW step on the clipped PPO loss of
   the policy plus the clipped value loss.
"""

import copy
from dataclasses import dataclass

import torch

from impl.common.checks import check_number, check_positive_int, check_positive_number, check_probability
from impl.gpt import GPT
from impl.rlhf.losses import bradley_terry_loss, gae, kl_penalty, ppo_loss
from impl.rlhf.models import RewardModel, completion_logprobs, sample_completions
from impl.rlhf.task import check_pairs


def train_reward_model(
    model: RewardModel,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    prompt_len: int,
    steps: int = 100,
    batch_size: int = 32,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Bradley-Terry training of `model` on the pairs (N, T): `steps` AdamW steps on random minibatches.
    Returns the losses; the model is left in eval mode."""
    check_pairs(chosen, rejected)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        rows = torch.randint(len(chosen), (min(batch_size, len(chosen)),), generator=generator)
        both = model(torch.cat([chosen[rows], rejected[rows]]), prompt_len)  # (2b,)
        loss = bradley_terry_loss(*both.chunk(2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def pair_accuracy(model: RewardModel, chosen: torch.Tensor, rejected: torch.Tensor, prompt_len: int) -> float:
    """Fraction of pairs on which `model` scores the chosen completion above the rejected one."""
    check_pairs(chosen, rejected)
    return (model(chosen, prompt_len) > model(rejected, prompt_len)).float().mean().item()


@dataclass
class PPOConfig:
    completion_len: int = 16  # tokens sampled per prompt
    epochs: int = 4  # PPO passes over each rollout
    minibatch_size: int = 16  # sequences per gradient step
    lr: float = 3e-4  # AdamW learning rate of policy and value model
    kl_coef: float = 0.05  # beta of the per-token KL penalty to the reference
    gamma: float = 1.0  # discount of GAE
    lam: float = 0.95  # lambda of GAE
    clip_range: float = 0.2  # epsilon of the clipped ratio
    clip_range_value: float = 0.2  # how far the value prediction may move from the rollout's
    vf_coef: float = 0.1  # weight of the value loss
    max_grad_norm: float = 1.0  # global gradient-norm clip per step

    def __post_init__(self) -> None:
        for name in ("completion_len", "epochs", "minibatch_size"):
            check_positive_int(f"PPOConfig.{name}", getattr(self, name))
        for name in ("lr", "clip_range", "clip_range_value", "max_grad_norm"):
            check_positive_number(f"PPOConfig.{name}", getattr(self, name))
        for name in ("kl_coef", "vf_coef"):
            check_number(f"PPOConfig.{name}", getattr(self, name), low=0)
        for name in ("gamma", "lam"):
            check_probability(f"PPOConfig.{name}", getattr(self, name))


def _whiten(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / (x.std() + 1e-8)


class PPOTrainer:
    """PPO on `policy` against a frozen `reward_model`; holds the reference and the value model it makes."""

    def __init__(self, policy: GPT, reward_model: RewardModel, config: PPOConfig | None = None):
        if not isinstance(policy, GPT):
            raise TypeError(f"policy must be an impl.gpt.GPT, got {type(policy).__name__}")
        if not isinstance(reward_model, RewardModel):
            raise TypeError(f"reward_model must be a RewardModel, got {type(reward_model).__name__}")
        self.config = config or PPOConfig()
        self.policy = policy
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.reward_model = reward_model.eval().requires_grad_(False)
        self.value_model = copy.deepcopy(reward_model).requires_grad_(True)
        self.value_model.pool = "last"
        params = [*policy.parameters(), *self.value_model.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=0.0)

    @torch.no_grad()
    def rollout(self, prompts: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Completions of `prompts` (B, P) with everything PPO needs of them, each (B, completion_len) or (B,)."""
        cfg, P = self.config, prompts.shape[1]
        seqs = sample_completions(self.policy, prompts, cfg.completion_len, generator)  # (B, P + L)
        logprobs = completion_logprobs(self.policy.eval(), seqs, P)  # (B, L)
        ref_logprobs = completion_logprobs(self.reference, seqs, P)
        values = self.value_model.eval().per_token(seqs)[:, P - 1 : -1]  # value of the state before each token
        score = self.reward_model(seqs, P)  # (B,)
        kl = kl_penalty(logprobs, ref_logprobs)  # (B, L)
        rewards = -cfg.kl_coef * kl
        rewards[:, -1] += score
        advantages, returns = gae(rewards, values, cfg.gamma, cfg.lam)
        return dict(
            sequences=seqs, logprobs=logprobs, values=values, advantages=_whiten(advantages), returns=returns,
            score=score, kl=kl,
        )  # fmt: skip

    def step(self, prompts: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """One rollout and its PPO updates. Returns the mean reward-model score, the mean KL to the reference
        (summed over the completion), the last minibatch's loss statistics, and the sampled sequences."""
        cfg, P = self.config, prompts.shape[1]
        batch = self.rollout(prompts, generator)
        self.policy.train()
        self.value_model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(prompts), generator=generator)
            for rows in order.split(cfg.minibatch_size):
                seqs = batch["sequences"][rows]
                loss, stats = ppo_loss(
                    completion_logprobs(self.policy, seqs, P),
                    batch["logprobs"][rows],
                    batch["advantages"][rows],
                    self.value_model.per_token(seqs)[:, P - 1 : -1],
                    batch["values"][rows],
                    batch["returns"][rows],
                    cfg.clip_range,
                    cfg.clip_range_value,
                    cfg.vf_coef,
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], cfg.max_grad_norm)
                self.optimizer.step()
        self.policy.eval()
        return {
            "reward": batch["score"].mean().item(),
            "kl": batch["kl"].sum(1).mean().item(),
            **{k: v.item() for k, v in stats.items()},
            "sequences": batch["sequences"],
        }
