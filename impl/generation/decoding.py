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


def check_inputs(
    model, input_ids, max_new_tokens, use_cache, attention_mask, temperature, top_k, top_p, eos_token_id, generator
) -> None:
    """The checks every generation entry point makes once, before any work (`generate`, speculative decoding)."""
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


def _check(
    model, input_ids, max_new_tokens, use_cache, attention_mask, temperature, top_k, top_p, eos_token_id, generator,
    compile, draft_model, cache_quantized,
) -> None:  # fmt: skip
    check_inputs(
        model, input_ids, max_new_tokens, use_cache, attention_mask, temperature, top_k, top_p, eos_token_id, generator
    )
    check_bool("compile", compile)
    if compile and not use_cache:
        raise ValueError("compile=True compiles the cached decode step; it needs use_cache=True, got use_cache=False")
    if compile and draft_model is not None:
        raise ValueError(
            "compile=True compiles the one-token decode step, which speculative decoding does not run; give "
            "compile=True or a draft_model, got both"
        )
    check_bool("cache_quantized", cache_quantized)
    if compile and cache_quantized:
        raise ValueError(
            "compile=True writes each step's keys and values straight into the cache's fp buffers, and "
            "cache_quantized=True holds int8 codes there; give one of them, got both"
        )
    if cache_quantized and draft_model is not None:
        raise ValueError("cache_quantized=True is not supported with a draft_model (speculative decoding), got both")
    if compile and model.config.attention_backend == "triton":
        raise ValueError(
            "compile=True attends over every cache slot under a dense mask, which the Triton kernels do not read; "
            "use attention_backend 'sdpa', 'torch', 'naive' or 'auto', got 'triton'"
        )


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
    compile: bool = False,
    cache_quantized: bool = False,
) -> torch.Tensor:
    """The prompt (B, T) followed by up to `max_new_tokens` new tokens per row, (B, T + n).

    A row that has emitted `eos_token_id` is finished: it gets `eos_token_id` from then on, and generation
    stops once every row is finished. Without the cache every step reruns the whole sequence (the baseline).
    With a `draft_model` (same vocabulary), decoding is speculative (impl.generation.speculative): the draft
    proposes `num_draft_tokens` tokens, `model` verifies them in one forward; greedy output is unchanged and a
    sampled one keeps `model`'s distribution.

    Everything is checked here, once; the loop then runs `Llama.decode_step` on buffers allocated before it (the
    output, the position, the cache, the key mask), so a step costs the model's kernels and little else. With
    `compile=True` the one-token step is torch.compile'd over the whole static cache (gpt-fast's recipe: every
    step has the same shapes, the new slot is a tensor index, a mask hides the empty slots), mode
    "reduce-overhead" (CUDA graphs) on CUDA and the default mode elsewhere; the first call compiles, and a new
    batch size or prompt + max_new_tokens length compiles again. `cache_quantized=True` keeps the cache in int8
    with per-token, per-head scales (about half of a bf16 cache's bytes; impl.generation.cache).
    """
    _check(
        model, input_ids, max_new_tokens, use_cache, attention_mask, temperature, top_k, top_p, eos_token_id, generator,
        compile, draft_model, cache_quantized,
    )  # fmt: skip
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
    sample = lambda logits: sample_next(logits, temperature, top_k, top_p, generator)
    if not use_cache:
        return _generate_without_cache(model, input_ids, positions, key_mask, max_new_tokens, sample, eos_token_id)
    total = T + max_new_tokens
    # Everything the loop writes is allocated here, once: the output, the step's position, the cache, the mask.
    tokens = input_ids.new_empty(B, total)
    tokens[:, :T] = input_ids
    position = positions[:, -1:] + 1  # (B, 1), advanced in place after every step
    cache = model.new_cache(B, total, quantized=cache_quantized)
    logits = model(input_ids, positions, cache=cache, key_mask=key_mask, last_only=True)[:, -1]  # prefill
    if compile:
        step = _StaticStep(model, cache, key_mask, T)
        mask = None
    else:
        step = model.decode_step
        # The key mask of every slot, once; each step reads a view of its first start + 1 columns.
        mask = None if key_mask is None else torch.cat([key_mask, key_mask.new_ones(B, max_new_tokens)], 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device) if eos_token_id is not None else None
    for i in range(max_new_tokens):
        next_token = sample(logits)
        if finished is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        tokens[:, T + i] = next_token
        if i == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
            return tokens[:, : T + i + 1]
        end = T + i + 1
        logits = step(tokens[:, T + i : end], position, cache, T + i, None if mask is None else mask[:, :end])
        position += 1
    return tokens


def _generate_without_cache(model, input_ids, positions, key_mask, max_new_tokens, sample, eos_token_id):
    """The baseline: every step reruns the whole sequence."""
    B = input_ids.shape[0]
    tokens = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        logits = model(tokens, positions, key_mask=key_mask, last_only=True)[:, -1]
        next_token = sample(logits)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            break
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if key_mask is not None:
            key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)
    return tokens


class _SlotWriter:
    """The compiled step's cache: writes the new token's k, v at a tensor slot index and returns every slot, so
    the shapes never change (gpt-fast's KVCache.update); it writes into a KVCache's own `keys` / `values`."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    def update(self, layer: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.keys[layer].index_copy_(2, slot, k)  # k, v: (B, kv_heads, 1, head_dim) into slot `slot`
        self.values[layer].index_copy_(2, slot, v)
        return self.keys[layer], self.values[layer]


def _static_decode(model: Llama, token, position, slot, mask, keys, values) -> torch.Tensor:
    """One decode step over all slots, under the dense slot mask (B, 1, 1, S): what torch.compile traces."""
    return model._run(token, position, {"mask": mask}, _SlotWriter(keys, values), slot, slice(-1, None))[:, -1]


_COMPILED: dict[str, object] = {}  # device type -> the compiled _static_decode, made on first use


class _StaticStep:
    """`decode_step`'s signature over the compiled static step: the token, slot index and slot mask live in
    buffers made once, updated in place each step (fixed addresses, which CUDA graphs need)."""

    def __init__(self, model: Llama, cache, key_mask: torch.Tensor | None, prompt_len: int):
        device = cache.keys[0].device
        B, S = cache.keys[0].shape[0], cache.max_tokens
        self.model, self.keys, self.values = model, cache.keys, cache.values
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.valid = torch.zeros(B, S, dtype=torch.bool, device=device)  # True: the slot holds a token
        self.valid[:, :prompt_len] = True if key_mask is None else key_mask
        self.mask = self.valid[:, None, None]  # (B, 1, 1, S): a view, so it sees each step's new slot
        if device.type == "cuda":  # written in place every step: their addresses must stay in the CUDA graph
            for t in (*self.keys, *self.values):
                torch._dynamo.mark_static_address(t)
        if device.type not in _COMPILED:
            kwargs = {"mode": "reduce-overhead"} if device.type == "cuda" else {}
            # One graph, no breaks (tests/test_generation_compile.py counts them); not fullgraph=True, which
            # would turn a caller's TorchDispatchMode (a memory meter) into an error instead of an eager run.
            _COMPILED[device.type] = torch.compile(_static_decode, **kwargs)
        self.fn = _COMPILED[device.type]

    def __call__(self, token, position, cache, start: int, mask) -> torch.Tensor:
        self.token.copy_(token)
        self.slot.fill_(start)
        self.valid[:, start] = True
        return self.fn(self.model, self.token, position, self.slot, self.mask, self.keys, self.values)
