"""A preference task that needs no human labels and can be checked: prefer completions rich in a target set of
characters (by default the vowels). The rule scores a completion by the fraction of its characters in the set.

Preference pairs come from the policy's own samples (InstructGPT's comparison data, with the rule standing in
for the labeller): two completions per prompt, the higher-scoring one is chosen, ties are dropped. The rule is
never shown to PPO or DPO: PPO sees only the reward model trained on the pairs, DPO only the pairs.

Also here: the policy itself, a small character GPT briefly pretrained on tiny-shakespeare with the project's
Trainer, and random prompts cut from the held-out part of the text.
"""

from dataclasses import dataclass

import torch

from impl.gpt import GPT, CharTokenizer, GPTConfig, get_batch, train_val_split
from impl.rlhf.models import sample_completions

VOWELS = "aeiou"


@dataclass
class PolicyConfig:
    n_layer: int = 2  # transformer blocks of the policy GPT
    n_head: int = 2  # attention heads
    n_embd: int = 48  # residual width
    block_size: int = 32  # context; prompt plus completion must fit
    steps: int = 300  # pretraining steps on tiny-shakespeare
    batch_size: int = 16  # windows per pretraining step
    lr: float = 3e-3  # AdamW learning rate of the pretraining
    seed: int = 0


def pretrain_policy(
    text: str, config: PolicyConfig | None = None, progress: bool = False
) -> tuple[GPT, CharTokenizer, torch.Tensor]:
    """A small GPT trained `config.steps` steps on the first 90% of `text`; also its tokenizer and the held-out
    10% as a token stream, from which prompts are drawn."""
    from impl.training import Trainer

    config = config or PolicyConfig()
    tokenizer = CharTokenizer(text)
    train, val = train_val_split(torch.tensor(tokenizer.encode(text), dtype=torch.long))
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = GPT(
        GPTConfig(
            block_size=config.block_size,
            vocab_size=tokenizer.vocab_size,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    trainer = Trainer(
        model,
        optimizer,
        lambda m, batch: m(*batch)[1],
        data=lambda: get_batch(train, config.block_size, config.batch_size, generator=gen),
        clip_grad_norm=1.0,
        progress=progress,
    )
    trainer.fit(config.steps)
    return model.eval(), tokenizer, val


def sample_prompts(data: torch.Tensor, n: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`n` windows of `length` tokens cut at random from the token stream `data`: (n, length)."""
    starts = torch.randint(len(data) - length, (n,), generator=generator)
    return torch.stack([data[i : i + length] for i in starts.tolist()])  # (n, length)


def rule_score(texts: list[str], target: str = VOWELS) -> torch.Tensor:
    """Fraction of each text's characters that are in `target`: (len(texts),) in [0, 1]."""
    if not target:
        raise ValueError("target must hold at least one character, got ''")
    if any(not t for t in texts):
        raise ValueError("texts must all be non-empty, got an empty completion")
    chars = set(target)
    return torch.tensor([sum(c in chars for c in t) / len(t) for t in texts])


def score_sequences(
    seqs: torch.Tensor, prompt_len: int, tokenizer: CharTokenizer, target: str = VOWELS
) -> torch.Tensor:
    """The rule score of the completion (positions from `prompt_len` on) of each sequence (B, T): (B,)."""
    return rule_score([tokenizer.decode(s) for s in seqs[:, prompt_len:]], target)


def preference_pairs(
    model: GPT,
    prompts: torch.Tensor,
    length: int,
    tokenizer: CharTokenizer,
    target: str = VOWELS,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two completions of `length` tokens per prompt (B, P) sampled from `model`, ranked by the rule.

    Returns (chosen, rejected), each (N, P + length) with N <= B: prompts whose two completions tie are dropped.
    """
    P = prompts.shape[1]
    a = sample_completions(model, prompts, length, generator)  # (B, P + length)
    b = sample_completions(model, prompts, length, generator)
    score_a, score_b = score_sequences(a, P, tokenizer, target), score_sequences(b, P, tokenizer, target)
    keep = score_a != score_b
    a_wins = (score_a > score_b)[:, None]  # (B, 1)
    chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    return chosen[keep], rejected[keep]


def check_pairs(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Chosen and rejected are token ids of one shape (B, T), and no pair is the same sequence twice."""
    for name, t in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.dim() != 2:
            got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be token ids of shape (batch, time) as torch.long, got {got}")
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"rejected must have the shape of chosen {tuple(chosen.shape)} (same batch and length), "
            f"got {tuple(rejected.shape)}"
        )
    same = (chosen == rejected).all(1).nonzero().flatten().tolist()
    if same:
        raise ValueError(f"chosen and rejected must differ in every pair, got identical pairs at rows {same[:5]}")
