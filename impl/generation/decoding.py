"""Autoregressive generation: one prefill pass over the prompt, then one token per decode step.

Each step's token is chosen by `sampling.sample_next` (greedy at temperature 0).

A batch of prompts of different lengths comes left-padded with an attention mask (1: token, 0: padding), as
tokenizers produce it for decoder-only models; rotary positions count only real tokens, so a padded prompt
gets the same positions, hence the same continuation, as it would alone.
"""

import torch

from impl.common.checks import (
    check_bool,
    check_generator,
    check_int,
    check_number,
    check_positive_int,
    check_probability,
    check_token_ids,
    show,
)
from impl.generation.model import Llama
from impl.generation.sampling import sample_next


def _check(
    model, input_ids, max_new_tokens, use_cache, attention_mask, temperature, top_k, top_p, eos_token_id, generator
) -> None:
    if not isinstance(model, Llama):
        raise TypeError(f"model must be an impl.generation.Llama, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else show(input_ids)
        raise ValueError(f"input_ids must be a (batch, seq) int64 tensor, got {got}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per row, got seq length 0")
    vocab = model.config.vocab_size
    check_token_ids("input_ids", input_ids, vocab)
    check_positive_int("max_new_tokens", max_new_tokens)
    check_bool("use_cache", use_cache)
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} must be at most the model's "
            f"max_position_embeddings={limit}"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {got}")
        if not attention_mask.bool().any(dim=-1).all():
            raise ValueError("attention_mask must mark at least one token in every row, got an all-zero row")
    check_number("temperature", temperature, low=0)
    if top_k is not None:
        check_positive_int("top_k", top_k)
    if top_p is not None:
        check_probability("top_p", top_p, low_open=True)
    if eos_token_id is not None:
        check_int("eos_token_id", eos_token_id, low=0, high=vocab, high_open=True)
    check_generator("generator", generator)


@torch.no_grad()
def generate(
    model: Llama,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    use_cache: bool = True,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    draft_model: Llama | None = None,
    num_draft_tokens: int = 4,
) -> torch.Tensor:
    """The prompt (B, T) followed by up to `max_new_tokens` new tokens per row, (B, T + n).

    A row that has emitted `eos_token_id` is finished: it gets `eos_token_id` from then on, and generation
    stops once every row is finished. Without the cache every step reruns the whole sequence (the baseline).
    With a `draft_model` (same vocabulary), decoding is speculative (impl.generation.speculative): the draft
    proposes `num_draft_tokens` tokens, `model` verifies them in one forward; greedy output is unchanged and a
    sampled one keeps `model`'s distribution.
    """
    _check(
        model, input_ids, max_new_tokens, use_cache, attention_mask, temperature, top_k, top_p, eos_token_id, generator
    )
    if draft_model is not None:
        from impl.generation.speculative import speculative_generate

        return speculative_generate(
            model, draft_model, input_ids, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens,
            use_cache=use_cache, attention_mask=attention_mask, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token_id=eos_token_id, generator=generator,
        )  # fmt: skip
    B, T = input_ids.shape
    device = input_ids.device
    key_mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
    if key_mask is not None and key_mask.all():
        key_mask = None  # no padding: the plain causal mask says the same, and is faster
    # Rotary positions count real tokens only; padding slots get position 0 (they are never attended to).
    positions = (
        torch.arange(T, device=device).expand(B, T) if key_mask is None else (key_mask.cumsum(-1) - 1).clamp(min=0)
    )
    cache = model.new_cache(B, T + max_new_tokens) if use_cache else None
    tokens = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(tokens, positions, cache=cache, key_mask=key_mask, last_only=True)[:, -1]  # prefill
    for step in range(max_new_tokens):
        next_token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            break
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if key_mask is not None:
            key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)
        if use_cache:  # decode: one new slot
            logits = model(tokens[:, -1:], positions[:, -1:], cache=cache, start=T + step, key_mask=key_mask)
        else:  # no cache: the whole sequence again
            logits = model(tokens, positions, key_mask=key_mask, last_only=True)
        logits = logits[:, -1]
    return tokens
