"""Speculative decoding: a small draft model proposes k tokens, the target model checks them all in one forward.

Papers: Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding"
(arXiv:2211.17192), Algorithm 1; Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative
Sampling" (arXiv:2302.01318), Algorithm 2. One round, with p the target's and q the draft's next-token
distribution (both after the same temperature, top-k and top-p filters as `sampling.sample_next`):

1. the draft samples x_1..x_k autoregressively, x_i ~ q(. | prefix, x_<i), with its own cache;
2. the target runs once over the k drafts (+ the last accepted token), giving p_1..p_{k+1};
3. x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)) (Leviathan sec. 2.3), in order;
4. at the first rejection, at i, the token is drawn instead from norm(max(0, p_i - q_i)) (Leviathan sec. 2.3,
   eq. for p'; Chen Algorithm 2); if all k are accepted, one bonus token is drawn from p_{k+1}.

Every emitted token is then distributed exactly as the target alone would sample it (Leviathan Appendix A.1;
Chen Theorem 1), and each round costs one target forward for between 1 and k + 1 tokens. At temperature 0
both models are argmax: a draft token is accepted while it equals the target's argmax, and the first mismatch is
replaced by that argmax, so the output is token-identical to greedy decoding of the target alone.

Batches: the rows of a batch share cache slots, so every row advances by the same n + 1 tokens per round, n
being the fewest drafts any unfinished row accepted. A row that accepted more emits its (accepted) draft at
index n. Each emitted token is still a draw from the target's distribution given the row's prefix: stopping a
row after index n depends only on what happened at indices <= n, and a row's next token, given its prefix and
its drafts so far accepted, follows p whatever the other rows do (the argument of Leviathan A.1, per position).

The caches are static (impl.generation.cache), written by slot, so undoing rejected tokens is just writing the
next round from an earlier slot: the stale keys and values beyond it are never attended to and get overwritten.
"""

import torch

from impl.common.checks import (
    check_instance,
    check_positive_int,
)
from impl.generation.decoding import check_inputs
from impl.generation.model import Llama
from impl.generation.sampling import filter_top_k, filter_top_p


def _probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The next-token distribution `sampling.sample_next` draws from (temperature > 0): temperature, top-k, top-p
    in that order, then softmax over the last dimension."""
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    return logits.softmax(dim=-1)


def _accept(p_of_x: torch.Tensor, q_of_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """True where a draft token x is kept: u < p(x) / q(x) with u ~ U[0, 1) (Leviathan Algorithm 1, line 6),
    written u q(x) < p(x) so no division happens; q(x) > 0 since x was drawn from q. Greedy decoding is the case
    of one-hot p and q with u = 0: x is kept exactly when it is the target's argmax."""
    return u * q_of_x < p_of_x


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)), the distribution a rejected position is resampled from (Leviathan sec. 2.3). Where
    p <= q everywhere (p == q: no rejection can happen, but rounding can still flip a coin) it is p itself."""
    r = (p - q).clamp(min=0)
    total = r.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


class _Decoder:
    """One model with its static cache: which slots hold valid keys and values, and a forward over the rest."""

    def __init__(self, model: Llama, batch: int, total: int, use_cache: bool, positions, key_mask):
        self.model, self.positions, self.key_mask = model, positions, key_mask
        self.cache = model.new_cache(batch, total) if use_cache else None
        self.filled = 0  # slots [0, filled) of the cache hold the current sequence's keys and values
        self.forwards = 0

    def logits(self, tokens: torch.Tensor, end: int, last: int) -> torch.Tensor:
        """Logits (B, last, vocab) predicting slots [end - last + 1, end], after feeding tokens[:, :end]: only the
        slots the cache does not hold yet, or the whole prefix without a cache (the baseline); the lm_head runs on
        the last `last` positions only (the prompt's own logits are never read)."""
        begin = self.filled if self.cache is not None else 0
        key_mask = None if self.key_mask is None else self.key_mask[:, :end]
        if self.cache is not None and end - begin == 1:  # one token (every draft step): the unchecked decode step
            out = self.model.decode_step(tokens[:, begin:end], self.positions[:, begin:end], self.cache, begin,
                                         key_mask)[:, None]  # fmt: skip
        else:
            at = None if last == 1 else torch.arange(end - begin - last, end - begin, device=tokens.device)
            out = self.model(tokens[:, begin:end], self.positions[:, begin:end], cache=self.cache, start=begin,
                             key_mask=key_mask, last_only=last == 1, logits_at=at)  # fmt: skip
        self.forwards += 1
        if self.cache is not None:
            self.filled = end
        return out

    def rewind(self, length: int) -> None:
        """Keep the cache's slots for tokens[:, :length - 1]: the newest token is fed in the next round."""
        self.filled = min(self.filled, length - 1)


def _check(model, draft_model, input_ids, max_new_tokens, num_draft_tokens, use_cache, attention_mask,
           temperature, top_k, top_p, eos_token_id, generator) -> None:  # fmt: skip
    """The draft's checks, then generate's own (`decoding.check_inputs`, for direct callers), the draft's length."""
    check_instance("model", model, Llama, "an impl.generation.Llama")
    check_instance("draft_model", draft_model, Llama, "an impl.generation.Llama")
    check_positive_int("num_draft_tokens", num_draft_tokens)
    vocab, draft_vocab = model.config.vocab_size, draft_model.config.vocab_size
    if draft_vocab != vocab:
        raise ValueError(
            f"draft_model must share the target's vocabulary: vocab_size {vocab} expected, got {draft_vocab}"
        )
    target_device, draft_device = model.lm_head.weight.device, draft_model.lm_head.weight.device
    if draft_device != target_device:
        raise ValueError(f"draft_model must be on the target's device {target_device}, got {draft_device}")
    check_inputs(
        model, input_ids, max_new_tokens, use_cache, attention_mask, temperature, top_k, top_p, eos_token_id, generator
    )
    limit = draft_model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} must be at most draft_model's "
            f"max_position_embeddings={limit}"
        )


def _layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, total: int):
    """Rotary positions (B, total) and key mask (B, total) or None for every slot the generation can fill: left
    padding keeps position 0 and is masked out; real tokens count from 0, as in `decoding.generate`."""
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None or bool(attention_mask.bool().all()):
        return torch.arange(total, device=device).expand(B, total), None
    key_mask = torch.cat([attention_mask.to(device=device, dtype=torch.bool),
                          torch.ones(B, total - T, dtype=torch.bool, device=device)], dim=1)  # fmt: skip
    return (key_mask.cumsum(-1) - 1).clamp(min=0), key_mask


@torch.no_grad()
def speculative_generate_with_stats(
    model: Llama,
    draft_model: Llama,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    num_draft_tokens: int = 4,
    use_cache: bool = True,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """`speculative_generate`'s tokens (B, T + n), and the round statistics: rounds (target verifications),
    proposed and accepted draft tokens, acceptance_rate = accepted / proposed (nan if none), forwards of each model, and
    tokens_per_round = new tokens per verification (1 + the accepted drafts, on average)."""
    _check(model, draft_model, input_ids, max_new_tokens, num_draft_tokens, use_cache, attention_mask, temperature,
           top_k, top_p, eos_token_id, generator)  # fmt: skip
    B, T = input_ids.shape
    total = T + max_new_tokens
    positions, key_mask = _layout(input_ids, attention_mask, total)
    target = _Decoder(model, B, total, use_cache, positions, key_mask)
    draft = _Decoder(draft_model, B, total, use_cache, positions, key_mask)
    tokens = input_ids.new_zeros(B, total)  # the prompt, then drafts, overwritten by what each round emits
    tokens[:, :T] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    greedy = temperature == 0
    rounds = proposed = accepted = 0
    length = T
    while length < total:
        k = min(num_draft_tokens, total - length - 1)  # never more than max_new_tokens in all
        # 1. The draft proposes k tokens, one forward each (Leviathan Algorithm 1, lines 2-4).
        q = []
        for i in range(k):
            logits = draft.logits(tokens, length + i, 1)[:, -1]
            if greedy:
                tokens[:, length + i] = logits.argmax(dim=-1)
            else:
                q.append(_probs(logits, temperature, top_k, top_p))
                tokens[:, length + i] = torch.multinomial(q[-1], 1, generator=generator).squeeze(-1)
        drafts = tokens[:, length : length + k].clone()
        # 2. The target scores the prefix's last token and the k drafts in one forward (line 5): k + 1 positions.
        logits = target.logits(tokens, length + k, k + 1)  # (B, k + 1, vocab)
        # 3. Accept in order while the test passes (line 6); n = the shortest accepted run of an unfinished row.
        if greedy:  # p and q one-hot: p(x) is 1 where the draft is the target's argmax, q(x) is 1
            choice = logits.argmax(dim=-1)  # (B, k + 1)
            p_of_x = (drafts == choice[:, :k]).float()
            q_of_x, u = torch.ones_like(p_of_x), torch.zeros_like(p_of_x)
        else:
            p = _probs(logits, temperature, top_k, top_p)  # (B, k + 1, vocab)
            q_all = torch.stack(q, dim=1) if k else p[:, :0]  # (B, k, vocab)
            p_of_x = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
            q_of_x = q_all.gather(-1, drafts[..., None]).squeeze(-1)
            u = torch.rand(p_of_x.shape, generator=generator, device=p_of_x.device)
        ok = _accept(p_of_x, q_of_x, u)  # (B, k)
        run = ok.long().cumprod(dim=-1).sum(dim=-1)  # (B,) leading accepted drafts per row
        n = int(run[~finished].min()) if not bool(finished.all()) else 0
        # 4. Index n: the correction (or the bonus token, n == k), unless the row also accepted its draft there.
        if greedy:
            fix = choice[:, n]
        else:
            dist = p[:, n] if n == k else _residual(p[:, n], q_all[:, n])  # lines 7-10
            fix = torch.multinomial(dist, 1, generator=generator).squeeze(-1)
        block = tokens[:, length : length + n + 1]  # a view: what this round emits
        block[:, n] = torch.where(run > n, drafts[:, n], fix) if n < k else fix
        stop = n + 1
        if eos_token_id is not None:  # a finished row emits eos from then on; stop once every row has
            block.masked_fill_(finished[:, None], eos_token_id)
            seen = (block == eos_token_id).cumsum(dim=-1) > 0
            block.masked_fill_(seen, eos_token_id)
            finished |= seen[:, -1]
            if bool(finished.all()):
                stop = int(seen.long().argmax(dim=-1).max()) + 1  # where the last row emitted its first eos
        rounds, proposed, accepted = rounds + 1, proposed + k, accepted + n
        length += stop
        target.rewind(length)
        draft.rewind(length)
        if eos_token_id is not None and bool(finished.all()):
            break
    new_tokens = length - T
    stats = {
        "rounds": rounds,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else float("nan"),
        "new_tokens": new_tokens,
        "tokens_per_round": new_tokens / rounds,
        "target_forwards": target.forwards,
        "draft_forwards": draft.forwards,
    }
    return tokens[:, :length], stats


def speculative_generate(
    model: Llama,
    draft_model: Llama,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    num_draft_tokens: int = 4,
    use_cache: bool = True,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`generate(model, ...)` sped up by `draft_model` (same vocabulary) proposing `num_draft_tokens` tokens per
    target forward: the prompt (B, T) and up to `max_new_tokens` new tokens, (B, T + n). Greedy output equals
    the target's alone; sampled output follows the target's distribution (Leviathan et al. 2023, Appendix A.1)."""
    tokens, _ = speculative_generate_with_stats(
        model, draft_model, input_ids, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens,
        use_cache=use_cache, attention_mask=attention_mask, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, generator=generator,
    )  # fmt: skip
    return tokens
