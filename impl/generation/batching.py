"""Continuous batching over a paged KV cache: requests join and leave the running batch at every step.

Papers: Yu et al. 2022, "Orca: A Distributed Serving System for Transformer-Based Generative Models" (OSDI),
sec. 3.1-3.2: iteration-level scheduling (the batch is re-formed at every step, a finished request leaves at once
and a waiting one takes its place) and selective batching (the tokens of all scheduled requests, prefills and
one-token decodes alike, go through the model as one packed row; only attention needs to know which token
belongs to which request). Kwon et al. 2023 (vLLM), sec. 4.2-4.5: the paged cache (impl.generation.paged), a
request admitted only when the blocks for its prompt are free, and preemption when a running request needs a
block that is not there.

One `step()`:
1. every running request, oldest first, gets one more slot for its next token; when no block is free the
   youngest running request is preempted (possibly the one asking);
2. if nothing was preempted, waiting requests are admitted first-come first-served while their prompts' blocks
   are free, the token budget `max_batch_tokens` and `max_running` allow;
3. all scheduled tokens form one row (1, T) with per-token rotary positions; the mask is block-diagonal causal
   (a query of request r at position p sees the keys of request r at positions <= p, nothing of any other
   request); one forward writes the new keys/values into their blocks and reads each request's own;
4. each scheduled request takes the argmax of its last token's logits (greedy); a request that emitted
   `eos_token_id` or reached `max_new_tokens` is retired and its blocks go back to the free list.

Preemption is by *recompute* (vLLM sec. 4.5): the victim's blocks are freed and it goes back to the front of
the queue with its prompt plus the tokens it has generated as its new prompt, so its next admission is one
prefill of all of them and no token is lost. (Swapping blocks to host memory is the alternative vLLM offers.)
"""

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from impl.common.checks import check_instance, check_int, check_positive_int, check_token_list
from impl.generation.model import Llama
from impl.generation.paged import PagedKVCache


@dataclass
class Completion:
    """A finished request: its prompt, the tokens it generated and when."""

    request_id: int
    prompt: list[int]
    tokens: list[int]  # the generated tokens (EOS included when it ended the request)
    finish_reason: str  # "eos" or "length"
    submitted_at: float  # time.perf_counter() at submit
    token_times: list[float]  # time.perf_counter() when each generated token was chosen
    preemptions: int  # times the request was preempted and recomputed

    @property
    def time_to_first_token(self) -> float:
        return self.token_times[0] - self.submitted_at

    @property
    def time_per_output_token(self) -> float:
        """Mean seconds between generated tokens after the first (0 for a one-token output)."""
        n = len(self.token_times) - 1
        return 0.0 if n == 0 else (self.token_times[-1] - self.token_times[0]) / n


@dataclass
class _Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated


def packed_causal_mask(segments: list[tuple[int, int]], device=None) -> torch.Tensor:
    """The block-diagonal causal mask of a packed row, (1, 1, T, S), True where a query may attend.

    `segments` lists per request (cached, new): its `new` queries sit at positions [cached, cached + new) and its
    keys are its positions [0, cached + new); a query at position p sees its own request's keys at <= p."""
    T = sum(new for _, new in segments)
    S = sum(cached + new for cached, new in segments)
    mask = torch.zeros(T, S, dtype=torch.bool)
    q0 = k0 = 0
    for cached, new in segments:
        length = cached + new
        queries = torch.arange(cached, length)[:, None]
        mask[q0 : q0 + new, k0 : k0 + length] = torch.arange(length) <= queries
        q0, k0 = q0 + new, k0 + length
    return mask.to(device)[None, None]


class ContinuousBatcher:
    """Serve greedy generation requests with continuous batching over a `PagedKVCache` of `num_blocks` blocks
    of `block_size` slots: `submit` requests, `step` (or `run`) the scheduler, `collect` finished outputs."""

    def __init__(
        self,
        model: Llama,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_batch_tokens: int | None = None,
        max_running: int | None = None,
        eos_token_id: int | None = None,
    ):
        check_instance("model", model, Llama, "an impl.generation.Llama")
        check_positive_int("num_blocks", num_blocks)
        check_positive_int("block_size", block_size)
        if max_batch_tokens is not None:
            check_positive_int("max_batch_tokens", max_batch_tokens)
        if max_running is not None:
            check_positive_int("max_running", max_running)
        if eos_token_id is not None:
            check_int("eos_token_id", eos_token_id, low=0, high=model.config.vocab_size, high_open=True)
        c, weight = model.config, model.lm_head.weight
        self.model, self.eos_token_id = model, eos_token_id
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.cache = PagedKVCache(
            layers=c.num_hidden_layers, kv_heads=c.num_key_value_heads, head_dim=c.head_dim, num_blocks=num_blocks,
            block_size=block_size, dtype=weight.dtype, device=weight.device,
        )  # fmt: skip
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []  # in admission order: the last one is the youngest
        self.finished: dict[int, Completion] = {}
        self.steps = self.preemptions = self.peak_used_blocks = 0
        self.peak_fragmentation = 0.0  # the cache's fragmentation at the step that held the most blocks
        self.last_batch: list[tuple[int, int, int]] = []  # the last step's (request id, cached tokens, new tokens)
        self._next_id = 0

    def submit(self, prompt, max_new_tokens: int) -> int:
        """Queue a request (a non-empty sequence of token ids) for up to `max_new_tokens` greedy tokens; return its
        id. ValueError, before any work, when it could never fit the model or the whole cache."""
        config = self.model.config
        prompt = check_token_list("prompt", prompt, config.vocab_size)
        if not prompt:
            raise ValueError("prompt must hold at least one token, got an empty prompt")
        check_positive_int("max_new_tokens", max_new_tokens)
        total = len(prompt) + max_new_tokens
        if total > config.max_position_embeddings:
            raise ValueError(
                f"len(prompt) + max_new_tokens must be at most the model's max_position_embeddings="
                f"{config.max_position_embeddings}, got {len(prompt)} + {max_new_tokens}"
            )
        cached = total - 1  # the last generated token is never fed back, so it needs no slot
        capacity = self.cache.num_blocks * self.cache.block_size
        if cached > capacity:
            raise ValueError(
                f"len(prompt) + max_new_tokens - 1 = {cached} slots must fit the whole cache, num_blocks x block_size"
                f" = {self.cache.num_blocks} x {self.cache.block_size} = {capacity}"
            )
        request = _Request(self._next_id, prompt, max_new_tokens, time.perf_counter())
        self._next_id += 1
        self.waiting.append(request)
        return request.id

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, request: _Request) -> None:
        """Recompute preemption: free its blocks, queue it first, its generated tokens to be prefilled again."""
        self.cache.free(request.id)
        self.running.remove(request)
        self.waiting.appendleft(request)
        request.preemptions += 1
        self.preemptions += 1

    def _schedule(self) -> list[tuple[_Request, list[int]]]:
        """The (request, tokens to feed) of this step: decodes of running requests, then admissions."""
        cache, scheduled, preempted = self.cache, [], False
        for request in list(self.running):
            if request not in self.running:  # preempted by an older request of this loop
                continue
            need = len(request.tokens)  # its cached tokens plus the one generated last step
            while not cache.can_reserve(request.id, need):
                self._preempt(self.running[-1])
                preempted = True
                if request not in self.running:
                    break
            if request in self.running:
                cache.reserve(request.id, need)
                scheduled.append((request, request.tokens[cache.lengths[request.id] :]))
        budget = None if self.max_batch_tokens is None else self.max_batch_tokens - len(scheduled)
        while self.waiting and not preempted:
            request = self.waiting[0]
            feed = len(request.tokens)
            if self.max_running is not None and len(self.running) >= self.max_running:
                break
            if scheduled and budget is not None and feed > budget:  # an empty step takes any prompt
                break
            if not cache.can_reserve(request.id, feed):
                break
            cache.reserve(request.id, feed)
            self.running.append(self.waiting.popleft())
            scheduled.append((request, request.tokens))
            if budget is not None:
                budget -= feed
        return scheduled

    @torch.no_grad()
    def step(self) -> list[Completion]:
        """Schedule, run one packed forward, append one token per scheduled request; return those finished."""
        scheduled = self._schedule()
        if not scheduled:
            return []
        device = self.model.lm_head.weight.device
        segments = [(self.cache.lengths[r.id], len(feed)) for r, feed in scheduled]
        self.last_batch = [(r.id, cached, new) for (r, _), (cached, new) in zip(scheduled, segments, strict=True)]
        ids = torch.tensor([t for _, feed in scheduled for t in feed], device=device)[None]  # (1, T)
        positions = torch.cat([torch.arange(cached, cached + new) for cached, new in segments]).to(device)[None]
        self.cache.prepare([(r.id, len(feed)) for r, feed in scheduled])
        if self.cache.used_blocks > self.peak_used_blocks:
            self.peak_used_blocks, self.peak_fragmentation = self.cache.used_blocks, self.cache.fragmentation
        last = (torch.tensor([len(feed) for _, feed in scheduled]).cumsum(0) - 1).to(device)  # each one's last token
        mask = packed_causal_mask(segments, device)
        logits = self.model(ids, positions, cache=self.cache, attention_mask=mask, logits_at=last)
        next_tokens = logits[0].argmax(dim=-1).tolist()  # greedy
        now = time.perf_counter()
        done = []
        for (request, _), token in zip(scheduled, next_tokens, strict=True):
            request.generated.append(token)
            request.token_times.append(now)
            if token == self.eos_token_id or len(request.generated) >= request.max_new_tokens:
                reason = "eos" if token == self.eos_token_id else "length"
                self.cache.free(request.id)
                self.running.remove(request)
                completion = Completion(request.id, request.prompt, request.generated, reason, request.submitted_at,
                                        request.token_times, request.preemptions)  # fmt: skip
                self.finished[request.id] = completion
                done.append(completion)
        self.steps += 1
        return done

    def collect(self) -> dict[int, Completion]:
        """The requests finished since the last collect, by id."""
        out, self.finished = self.finished, {}
        return out

    def run(self) -> dict[int, Completion]:
        """Step until every submitted request has finished; return them all (see `collect`)."""
        while self.has_unfinished:
            self.step()
        return self.collect()
