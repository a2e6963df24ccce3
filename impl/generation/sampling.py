"""Choosing the next token from the logits: greedy, or a draw after temperature, top-k and top-p.

Temperature divides the logits; top-k (Fan et al. 2018, "Hierarchical Neural Story Generation") keeps the k
most likely tokens; nucleus / top-p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration",
sec. 3.1) keeps the smallest set of most likely tokens whose probability reaches p. The filters run in that
order (as in transformers), then one token is drawn from the renormalized distribution.
"""

import torch


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """-inf everywhere but the k largest logits of each row (ties with the k-th are kept)."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """-inf outside the smallest set of most likely tokens whose probabilities sum to at least p: the least likely
    tokens whose total stays within 1 - p go (computed that way round, as transformers' TopPLogitsWarper does, so
    a p within fp32's epsilon of 1 is not rounded to 1 and nothing is cut that it keeps)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token per row of `logits` (B, vocab): argmax at temperature 0, else a draw after the filters."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
