"""The models RLHF holds around the policy GPT: a reward model and a value model, both the GPT trunk with a
scalar head (Ouyang et al. 2022, "InstructGPT", section 3.5: "starting from the SFT model with the final
unembedding layer removed, we trained a model to take in a prompt and response, and output a scalar reward").

The reward model reads one scalar per completion: at the last token (InstructGPT), or the mean over the
completion's tokens (`pool="mean"`), a readout that suits rewards which are a sum over the text. The value model
of PPO is the same module read per token (`RewardModel.per_token`). Also here: the log-probabilities of a
completion under a policy, and sampling completions from it.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.common.checks import check_one_of, is_int
from impl.gpt import GPT, GPTConfig

_POOLS = ("last", "mean")


def _check_prompt_len(idx: torch.Tensor, prompt_len: int) -> None:
    if not is_int(prompt_len) or not 1 <= prompt_len < idx.shape[1]:
        raise ValueError(
            f"prompt_len must be an int in [1, {idx.shape[1]}) for sequences of that length, got {prompt_len!r}"
        )


class RewardModel(nn.Module):
    """The GPT's trunk (`GPT.trunk`: embeddings, blocks, final LayerNorm) with a linear head to one scalar per
    position."""

    def __init__(self, config: GPTConfig, pool: str = "last"):
        super().__init__()
        check_one_of("pool", pool, _POOLS)
        self.gpt = GPT(config)  # its lm_head is tied to wte, so it adds no parameters; it is never called
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.pool = pool

    @classmethod
    def from_gpt(cls, gpt: GPT, pool: str = "last") -> "RewardModel":
        """A reward model whose trunk starts as a copy of `gpt` (the pretrained policy) and whose head is zero."""
        if not isinstance(gpt, GPT):
            raise TypeError(f"gpt must be an impl.gpt.GPT, got {type(gpt).__name__}")
        model = cls(gpt.config, pool)
        model.gpt.load_state_dict(copy.deepcopy(gpt.state_dict()))
        weight = gpt.transformer.wte.weight
        return model.to(device=weight.device, dtype=weight.dtype)

    def per_token(self, idx: torch.Tensor) -> torch.Tensor:
        """One scalar per position of the token ids `idx` (B, T): (B, T)."""
        return self.head(self.gpt.trunk(idx)).squeeze(-1)  # (B, T)

    def forward(self, idx: torch.Tensor, prompt_len: int = 1) -> torch.Tensor:
        """The reward of each sequence (B,): prompt in the first `prompt_len` positions, completion after."""
        _check_prompt_len(idx, prompt_len)
        scores = self.per_token(idx)  # (B, T)
        return scores[:, -1] if self.pool == "last" else scores[:, prompt_len:].mean(1)


def completion_logprobs(model: GPT, idx: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """log pi(token) of every completion token of `idx` (B, T) after the first `prompt_len`: (B, T - prompt_len)."""
    _check_prompt_len(idx, prompt_len)
    logits, _ = model(idx[:, :-1])  # position t predicts token t + 1
    logp = F.log_softmax(logits[:, prompt_len - 1 :].float(), dim=-1)  # (B, T - prompt_len, vocab)
    return logp.gather(-1, idx[:, prompt_len:, None]).squeeze(-1)


@torch.no_grad()
def sample_completions(
    model: GPT, prompts: torch.Tensor, length: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Prompts (B, P) followed by `length` tokens sampled at temperature 1 (B, P + length); eval mode inside."""
    was_training = model.training
    out = model.eval().generate(prompts, length, generator=generator)
    model.train(was_training)
    return out
