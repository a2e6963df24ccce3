"""RLHF on the project's GPT: a Bradley-Terry reward model, PPO with a per-token KL penalty, and DPO/IPO."""

from impl.rlhf.losses import bradley_terry_loss, dpo_loss, gae, ppo_loss
from impl.rlhf.models import RewardModel

__all__ = ["RewardModel", "bradley_terry_loss", "dpo_loss", "gae", "ppo_loss"]
