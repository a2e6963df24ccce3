"""A Llama-style decoder: RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU MLP.

Papers: LLaMA (Touvron et al. 2023, arXiv:2302.13971) for the block; RMSNorm (Zhang & Sennrich 2019,
eq. 4: x / sqrt(mean(x^2) + eps) * g); RoFormer (Su et al. 2021, eq. 34: each pair of channels rotated by
position * theta^(-2i/d), in the "rotate half" layout Hugging Face uses); GQA (Ainslie et al. 2023: n_kv_heads
key/value heads shared by groups of query heads); GLU variants (Shazeer 2020, eq. 6: SwiGLU(x) =
(silu(x W) * x V) W2).

The forward pass works in cache *slots*: a call with T tokens fills slots [start, start + T) of a `KVCache`
and attends over slots [0, start + T). Rotary positions are passed separately, so left padding (slots holding
no token, masked out by `key_mask`) does not shift the positions of the real tokens. Decoding reads every
weight once per token, so the q/k/v and the gate/up projections are fused into one matmul each (as gpt-fast
does); `from_hf` maps Hugging Face's `LlamaForCausalLM` names onto ours with one explicit key map. With
`fused_projections=False` they stay separate linears named as Hugging Face names them (q_proj, k_proj, v_proj,
gate_proj, up_proj), so LoRA targets them one by one, exactly as peft does on transformers' model.

Attention goes through `impl.attention.attention` with the backend `config.attention_backend` (sdpa by default,
the fastest on every device; naive, torch and triton for study). Each call passes only the filled cache slots
[0, start + T): a prefill is causal (bottom-right aligned, so the T queries are the last T of the keys), a decode
step (T == 1) sees every filled slot and needs no causal mask at all; left padding is a boolean key mask, or
for the Triton kernels, which read no dense mask, two documents per row (padding, then the tokens).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from impl.attention import attention
from impl.common.checks import check_bool, check_one_of, check_positive_int, check_positive_number, check_tensor
from impl.generation.cache import KVCache

ATTENTION_BACKENDS = ("auto", "naive", "sdpa", "torch", "triton")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000  # tokens in the vocabulary
    hidden_size: int = 512  # width of the residual stream
    num_hidden_layers: int = 8  # decoder blocks
    num_attention_heads: int = 8  # query heads
    num_key_value_heads: int = 8  # key/value heads; fewer than query heads is GQA
    intermediate_size: int = 1376  # width of the SwiGLU hidden layer
    max_position_embeddings: int = 2048  # longest sequence (prompt + generated) the model accepts
    rope_theta: float = 10000.0  # RoPE base
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    head_dim: int | None = None  # per-head width; hidden_size // num_attention_heads when None
    attention_backend: str = "sdpa"  # impl.attention backend; sdpa decodes fastest, the others are for study
    fused_projections: bool = True  # q/k/v and gate/up as one matmul each; False: Hugging Face's separate linears

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings"):  # fmt: skip
            check_positive_int(f"config.{name}", getattr(self, name))
        check_positive_number("config.rope_theta", self.rope_theta)
        check_positive_number("config.rms_norm_eps", self.rms_norm_eps)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_positive_int("config.head_dim", self.head_dim)
        check_one_of("config.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        check_bool("config.fused_projections", self.fused_projections)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads must be a multiple of num_key_value_heads, got "
                f"{self.num_attention_heads} and {self.num_key_value_heads}"
            )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalized in fp32, cast back, then scaled: the order Hugging Face uses, so low precision rounds alike.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of position * theta^(-2i/d) for every channel pair (RoFormer eq. 34), both (B, T, 1, head_dim).
    The per-call formula; the model reads the same numbers from `rope_table`, computed once."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # (B, T, 1, head_dim): broadcast over heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_table(length: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_cos_sin` for positions 0 .. length - 1 in fp32, (length, head_dim) each: row p is position p's cos
    (sin). Each entry is one product position * inv_freq and one cos (sin), the per-call formula's own numbers,
    so indexing the table by position equals computing them at every step, bit for bit."""
    cos, sin = rope_cos_sin(torch.arange(length, device=device)[None], head_dim, theta, torch.float32)
    return cos[0, :, 0], sin[0, :, 0]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel i with channel i + d/2 (the "rotate half" pairing); x is (B, T, heads, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal grouped-query attention through `impl.attention`; q, k and v come from one fused projection (one
    matmul per step), or from Hugging Face's three separate ones when `config.fused_projections` is False."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.backend = config.head_dim, config.attention_backend
        self.fused = config.fused_projections
        width, q_out, kv_out = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.fused:
            self.qkv_proj = nn.Linear(width, q_out + 2 * kv_out, bias=False)
        else:
            self.q_proj = nn.Linear(width, q_out, bias=False)
            self.k_proj = nn.Linear(width, kv_out, bias=False)
            self.v_proj = nn.Linear(width, kv_out, bias=False)
        self.o_proj = nn.Linear(q_out, width, bias=False)

    def forward(self, x, cos, sin, masks: dict, cache: KVCache | None, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x) if self.fused else torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
        qkv = qkv.view(B, T, H + 2 * KV, self.head_dim)  # heads: H queries, KV keys, KV values
        qk = apply_rope(qkv[:, :, : H + KV], cos, sin)  # queries and keys rotated together
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, head_dim)
        k = qk[:, :, H:].transpose(1, 2)  # (B, KV, T, head_dim)
        v = qkv[:, :, H + KV :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # the filled slots only: (B, KV, start + T, head_dim)
        if "attention_mask" in masks:  # the caller's whole mask (causality included), e.g. a paged, packed batch
            y = attention(q, k, v, mask=masks["attention_mask"], backend=self.backend)
        elif T == 1 and "document_ids" not in masks:
            # Decode: the one query is the newest slot and sees every filled one, so no causal mask. A group's
            # query heads become that group's queries, so each K/V head is read once instead of being repeated
            # for every query head: q is (B, KV, H // KV, head_dim). (Document ids belong to positions, not heads.)
            y = attention(q.reshape(B, KV, H // KV, self.head_dim), k, v, backend=self.backend, **masks)
        else:  # causal is bottom-right aligned: the T queries are the last T of the start + T keys
            y = attention(q, k, v, causal=T > 1, backend=self.backend, **masks)
        y = y.reshape(B, H, T, self.head_dim).transpose(1, 2).reshape(B, T, H * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU; the gate and up projections are fused into one matmul unless `config.fused_projections` is False."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.fused = config.fused_projections
        width, hidden = config.hidden_size, config.intermediate_size
        if self.fused:
            self.gate_up_proj = nn.Linear(width, 2 * hidden, bias=False)
        else:
            self.gate_proj = nn.Linear(width, hidden, bias=False)
            self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, masks, cache, start):
        x = x + self.attn(self.attn_norm(x), cos, sin, masks, cache, start)
        return x + self.mlp(self.mlp_norm(x))


def _hf_state_dict(sd: dict[str, torch.Tensor], layers: int, fused: bool) -> dict[str, torch.Tensor]:
    """The key map from `LlamaForCausalLM` names to ours; fused, q/k/v and gate/up are concatenated (output rows)."""
    ours = {
        "embed_tokens.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(layers):
        hf = f"model.layers.{i}."
        ours |= {
            f"layers.{i}.attn_norm.weight": sd[hf + "input_layernorm.weight"],
            f"layers.{i}.attn.o_proj.weight": sd[hf + "self_attn.o_proj.weight"],
            f"layers.{i}.mlp_norm.weight": sd[hf + "post_attention_layernorm.weight"],
            f"layers.{i}.mlp.down_proj.weight": sd[hf + "mlp.down_proj.weight"],
        }
        attn = {n: sd[hf + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")}
        mlp = {n: sd[hf + f"mlp.{n}_proj.weight"] for n in ("gate", "up")}
        if fused:
            ours[f"layers.{i}.attn.qkv_proj.weight"] = torch.cat(list(attn.values()))
            ours[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(list(mlp.values()))
        else:
            ours |= {f"layers.{i}.attn.{n}_proj.weight": w for n, w in attn.items()}
            ours |= {f"layers.{i}.mlp.{n}_proj.weight": w for n, w in mlp.items()}
    return ours


class Llama(nn.Module):
    """Decoder-only Llama; `forward` returns logits (B, T, vocab), or (B, 1, vocab) with `last_only`."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._init_rope(None)

    def _init_rope(self, device) -> None:
        """The RoPE cos/sin tables, one row per position up to max_position_embeddings, computed once (not per
        step); non-persistent buffers: not in the state dict, moved and cast with the model."""
        c = self.config
        cos, sin = rope_table(c.max_position_embeddings, c.head_dim, c.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, T, 1, head_dim) for rotary positions (B, T), looked up in the tables."""
        return self.rope_cos[positions][:, :, None].to(dtype), self.rope_sin[positions][:, :, None].to(dtype)

    @classmethod
    def from_hf(cls, model, attention_backend: str = "sdpa", fused_projections: bool = True) -> "Llama":
        """A copy of a `transformers` `LlamaForCausalLM`: its config and weights, same dtype and device; the
        attention backend and the projection layout are ours to choose (see `LlamaConfig`)."""
        hf = model.config
        unsupported = {
            "hidden_act": (hf.hidden_act, "silu"),
            "attention_bias": (hf.attention_bias, False),
            "mlp_bias": (hf.mlp_bias, False),
            "rope_type": ((hf.rope_parameters or {}).get("rope_type", "default"), "default"),
        }
        for name, (got, expected) in unsupported.items():
            if got != expected:
                raise ValueError(f"from_hf: config.{name} must be {expected!r}, got {got!r}")
        config = LlamaConfig(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_key_value_heads,
            intermediate_size=hf.intermediate_size,
            max_position_embeddings=hf.max_position_embeddings,
            rope_theta=hf.rope_parameters["rope_theta"],
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=hf.tie_word_embeddings,
            head_dim=hf.head_dim,
            attention_backend=attention_backend,
            fused_projections=fused_projections,
        )
        weight = model.lm_head.weight
        with torch.device("meta"):
            ours = cls(config)
        mapped = _hf_state_dict(model.state_dict(), config.num_hidden_layers, fused_projections)
        state = {k: v.detach().clone() for k, v in mapped.items()}
        ours.load_state_dict(state, assign=True)
        if config.tie_word_embeddings:  # assign=True replaced the shared Parameter on one side only
            ours.lm_head.weight = ours.embed_tokens.weight
        ours._init_rope(weight.device)  # built on meta above: computed now, where the weights live
        return ours.to(weight.device, weight.dtype).eval()

    def new_cache(self, batch: int, max_tokens: int, quantized: bool = False) -> KVCache:
        """An empty static cache for `batch` sequences of up to `max_tokens` slots, in the weights' dtype;
        `quantized=True`: int8 keys and values with one scale per (sequence, head, token) (impl.generation.cache)."""
        c, weight = self.config, self.lm_head.weight
        return KVCache(
            layers=c.num_hidden_layers,
            batch=batch,
            kv_heads=c.num_key_value_heads,
            max_tokens=max_tokens,
            head_dim=c.head_dim,
            dtype=weight.dtype,
            device=weight.device,
            quantized=quantized,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        start: int = 0,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
        attention_mask: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `input_ids` (B, T) placed in cache slots [start, start + T).

        `positions` (B, T) are the rotary positions (default: the slot indices), each below
        `config.max_position_embeddings` (the RoPE tables' length); `key_mask` (B, start + T) is
        True where a slot holds a real token (default: all do); `cache` holds slots [0, start) from earlier
        calls and receives the new ones; without a cache, `start` must be 0.

        `cache` may be any object with `update(layer, start, k, v) -> (keys, values)` (k, v: (B, kv_heads, T,
        head_dim)), returning the keys and values the T queries attend over, (B, kv_heads, S, head_dim). With
        `attention_mask` (bool (B, 1, T, S), True where query i may attend to key j) that mask is the whole rule,
        causality included, and replaces `key_mask` and the built-in causal mask: a paged cache serving a packed
        batch of sequences, each at its own offset, says which keys belong to which query this way.
        `logits_at` (a 1-D int64 tensor of positions along T) computes the final norm and the lm_head at those
        positions only, (B, len(logits_at), vocab): such a packed batch needs one per sequence, its last.
        """
        # Ids must lie in [0, vocab_size): generate() checks them once; a check here would sync the device on
        # every call, prefill and decode alike.
        check_tensor("input_ids", input_ids, shape=("batch", "seq"), integer=True)
        B, T = input_ids.shape
        if cache is None and start != 0:
            raise ValueError(f"start must be 0 without a cache, got {start}")
        if positions is not None and positions.shape != (B, T):
            raise ValueError(f"positions must have input_ids' shape {(B, T)}, got {tuple(positions.shape)}")
        if key_mask is not None and key_mask.shape != (B, start + T):
            raise ValueError(f"key_mask must be (batch, start + seq) = {(B, start + T)}, got {tuple(key_mask.shape)}")
        if positions is None and start + T > self.config.max_position_embeddings:
            raise ValueError(
                f"slots [{start}, {start + T}) must lie below max_position_embeddings="
                f"{self.config.max_position_embeddings} (the RoPE tables' length)"
            )
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        if attention_mask is not None:
            if key_mask is not None:
                raise ValueError("key_mask must be None when attention_mask is given (the mask is the whole rule)")
            check_tensor("attention_mask", attention_mask, dim=4, dtype=torch.bool, device=input_ids.device)
            if attention_mask.shape[0] != B or attention_mask.shape[2] != T:
                raise ValueError(
                    f"attention_mask must be (batch, 1, seq, keys) with batch={B}, seq={T}, got "
                    f"{tuple(attention_mask.shape)}"
                )
            masks = {"attention_mask": attention_mask}
        else:
            masks = _attention_masks(key_mask, start, T, self.config.attention_backend, input_ids.device)
        keep = slice(-1, None) if last_only else None
        if logits_at is not None:
            if last_only:
                raise ValueError("logits_at must be None when last_only=True (both choose the positions), got both")
            check_tensor("logits_at", logits_at, dim=1, integer=True, device=input_ids.device)
            keep = logits_at
        return self._run(input_ids, positions, masks, cache, start, keep)

    def decode_step(
        self, token: torch.Tensor, position: torch.Tensor, cache, start: int, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One decode step, unchecked: `generate` checks its inputs once, before the loop, and calls this per token.

        token, position: (B, 1); the token goes into cache slot `start` and attends over slots [0, start + 1);
        returns the logits (B, vocab). `key_mask` (B, start + 1), True where a slot holds a token, or None (all
        do): a view of one buffer made before the loop, since the new slot always holds a token.
        """
        masks = {} if key_mask is None else _decode_masks(key_mask, self.config.attention_backend)
        return self._run(token, position, masks, cache, start, slice(-1, None))[:, -1]

    def _run(self, input_ids, positions, masks: dict, cache, start, keep) -> torch.Tensor:
        """embed -> blocks -> norm -> lm_head; the last two at the positions `keep` (a slice or an index) only."""
        x = self.embed_tokens(input_ids)
        cos, sin = self._rope(positions, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, masks, cache, start)
        x = self.norm(x if keep is None else x[:, keep])
        return self.lm_head(x)


def _decode_masks(key_mask: torch.Tensor, backend: str) -> dict:
    """`_attention_masks` for one query at the newest slot, which always holds a token: the key mask as it is,
    (B, 1, 1, S), or for the Triton kernels (checked to be left padding at the prefill) two documents per row."""
    if backend == "triton" or (backend == "auto" and key_mask.is_cuda):
        return {"document_ids": key_mask.long()}
    return {"mask": key_mask[:, None, None]}


def _attention_masks(key_mask: torch.Tensor | None, start: int, T: int, backend: str, device) -> dict:
    """The padding mask as `attention` keywords: {} without padding, else {"mask": (B, 1, T, start + T)}, True
    where key slot j holds a token, the causal part (j <= start + i) being the front's `causal` flag.

    A query slot always sees itself, so a padding slot's row is never empty (its output is unused, but a fully
    masked row would be NaN, and that NaN would reach the real rows through the padding slot's keys and values).
    The Triton kernels read no dense mask (nor does "auto", which is Triton on CUDA): left padding is then two
    documents per row, padding (0) then tokens (1), which says the same, a padding slot seeing padding only.
    """
    if key_mask is None:
        return {}
    key_mask = key_mask.bool()
    if backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda"):
        if not bool((key_mask[:, 1:] >= key_mask[:, :-1]).all()):
            raise ValueError(
                f"key_mask must be left padding (False, then True, along each row) for attention_backend="
                f"{backend!r}, whose Triton kernels read padding as document ids; use 'torch', 'sdpa' or 'naive' "
                "for any other mask"
            )
        return {"document_ids": key_mask.long()}
    keys = torch.arange(start + T, device=device)
    queries = torch.arange(start, start + T, device=device)[:, None]
    return {"mask": (key_mask[:, None, :] | (keys == queries))[:, None]}  # (B, 1, T, start + T)
