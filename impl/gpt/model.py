"""A GPT-2 style decoder (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

The Transformer of Vaswani et al. 2017 with GPT-2's changes (section 2.3 of the paper): LayerNorm moved to
the input of each sub-block (pre-LN) and added after the last block, learned positional embeddings, GELU MLP
of width 4 * n_embd, and the token embedding reused as the output projection (weight tying, Press & Wolf 2017):

    h_0 = W_e[x] + W_p[0:T]
    h_l = h_{l-1} + attn(LN_1(h_{l-1})),   h_l = h_l + mlp(LN_2(h_l))
    logits = LN_f(h_L) @ W_e^T

The trunk (embed -> blocks -> final norm, `GPT.trunk`) is the one every technique builds on: it takes
`position_ids` and `document_ids` (packed rows), and skips parts that are absent (set to None), so a pipeline
stage is this module with the other stages' layers removed, and tensor parallelism swaps its linears in place.
The loss is `GPT.loss_fn(logits, targets)`, cross-entropy by default (tensor parallelism puts the vocab-parallel
one there).

Parameter names match Hugging Face's `GPT2LMHeadModel` one for one, so `from_hf` / `to_hf` are a key copy. The
one catch: GPT-2's projections are `Conv1D` modules that store the weight as (in, out), where `nn.Linear`
stores (out, in); the four such weights of each block (`_TRANSPOSED`) are transposed on the way in and out.
Dropout on the attention probabilities is not applied (the project's `attention()` front has none); dropout
on the embeddings and on each residual branch is.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.attention import attention
from impl.common.checks import check_int, check_positive_int, check_tensor

# HF GPT-2 Conv1D weights, stored (in, out); ours are nn.Linear weights, stored (out, in).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LN_EPS = 1e-5  # GPT-2's layer_norm_epsilon
_HF_GELU = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation of GELU, as GPT-2 was trained with
_ATTENTION_BACKENDS = ("auto", "naive", "sdpa", "torch", "triton")


@dataclass
class GPTConfig:
    block_size: int = 256  # longest context the model accepts (rows of the position embedding)
    vocab_size: int = 65  # tokens; 65 characters for tiny-shakespeare
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads per block
    n_embd: int = 384  # residual stream width; must divide by n_head
    dropout: float = 0.0  # on embeddings and residual branches while training
    attention_backend: str = "sdpa"  # impl.attention backend; sdpa trains fastest, the others are for study

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            check_positive_int(f"GPTConfig.{name}", value)
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd must be divisible by n_head={self.n_head}, got {self.n_embd}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise ValueError(
                f"GPTConfig.attention_backend must be one of {_ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.backend = config.attention_backend

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.c_attn(x)  # (B, T, 3 * H * D); H is this module's heads (all, or a tensor-parallel share)
        H = self.n_head
        q, k, v = (t.transpose(1, 2) for t in qkv.view(B, T, 3, H, -1).unbind(2))  # 3 x (B, H, T, D)
        y = attention(q, k, v, causal=True, document_ids=document_ids, backend=self.backend)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=LN_EPS)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=LN_EPS)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), document_ids)
        return x + self.mlp(self.ln_2(x))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, vocab) against targets (B, T); -100 targets are skipped."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=LN_EPS),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.loss_fn = cross_entropy
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embedding (the token one is the tied head)."""
        n = sum(p.numel() for p in self.parameters())
        wpe = self.transformer["wpe"]  # absent on a pipeline stage that is not the first
        return n - wpe.weight.numel() if non_embedding and wpe is not None else n

    def trunk(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, C): embed -> blocks -> final LayerNorm, each part skipped where it is None.

        `idx` is token ids (B, T), or hidden states (B, T, C) when the embeddings are absent (a later pipeline
        stage). `position_ids` (B, T) default to 0..T-1 (packed rows restart them per document); `document_ids`
        (B, T), non-decreasing per row, keep packed documents from attending to each other.
        """
        tr = self.transformer
        embeds = tr["wte"] is not None
        if embeds:
            self.check_tokens(idx, "idx")
        else:
            check_tensor("idx", idx, dim=3, floating=True)  # hidden states from the previous stage
        B, T = idx.shape[:2]
        if self.config.block_size < T:
            raise ValueError(f"idx has {T} positions, more than the model's block_size={self.config.block_size}")
        for name, t in (("position_ids", position_ids), ("document_ids", document_ids)):
            if t is not None:
                check_tensor(name, t, shape=(B, T), integer=True, device=idx.device)
        x = idx
        if embeds:
            pos = torch.arange(T, device=idx.device) if position_ids is None else position_ids
            if position_ids is not None and T:
                low, high = int(pos.min()), int(pos.max())
                if low < 0 or high >= self.config.block_size:
                    bad = low if low < 0 else high
                    raise ValueError(f"position_ids must lie in [0, {self.config.block_size}), got {bad}")
            x = tr.drop(tr.wte(idx) + tr.wpe(pos))  # (B, T, C)
        for block in tr.h.values() if isinstance(tr.h, nn.ModuleDict) else tr.h:  # a stage keys blocks by global index
            x = block(x, document_ids)
        return x if tr["ln_f"] is None else tr.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids `idx` (B, T); with `targets` (B, T) also `loss_fn(logits, targets)`,
        the mean cross-entropy over targets that are not -100. Without a head (a pipeline stage that is not
        the last) the trunk's hidden states come back in place of logits."""
        x = self.trunk(idx, position_ids=position_ids, document_ids=document_ids)
        if self.lm_head is None:
            return x, None
        logits = self.lm_head(x)  # (B, T, vocab), or this rank's vocabulary slice under tensor parallelism
        if targets is None:
            return logits, None
        self.check_tokens(targets, "targets")
        if targets.shape != idx.shape[:2]:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape[:2])}, got {tuple(targets.shape)}")
        return logits, self.loss_fn(logits, targets)

    @staticmethod
    def check_tokens(t: torch.Tensor, name: str) -> None:
        """A (batch, time) torch.long tensor of token ids, or a TypeError/ValueError naming `name`."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, time), got shape {tuple(t.shape)}")
        if t.dtype != torch.long:
            raise TypeError(f"{name} must hold token ids as torch.long, got {t.dtype}")

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `idx` (B, T); the context is cropped to block_size.

        Each step samples from softmax(logits / temperature), restricted to the `top_k` likeliest tokens if
        given; `generator` makes the draw reproducible.
        """
        self.check_tokens(idx, "idx")
        check_int("max_new_tokens", max_new_tokens, low=0)
        if not isinstance(temperature, int | float) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if top_k is not None:
            check_positive_int("top_k", top_k)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            logits = logits[:, -1, :] / temperature  # (B, vocab)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

    @classmethod
    def from_hf(cls, model, attention_backend: str = "sdpa") -> "GPT":
        """A GPT holding the weights of a transformers `GPT2LMHeadModel` (Conv1D weights transposed)."""
        from transformers import GPT2LMHeadModel

        if not isinstance(model, GPT2LMHeadModel):
            raise TypeError(f"model must be a transformers GPT2LMHeadModel, got {type(model).__name__}")
        hf = model.config
        checks = {
            "activation_function": (hf.activation_function in _HF_GELU, f"one of {_HF_GELU}"),
            "layer_norm_epsilon": (hf.layer_norm_epsilon == LN_EPS, LN_EPS),
            "n_inner": (hf.n_inner in (None, 4 * hf.n_embd), f"None or 4 * n_embd = {4 * hf.n_embd}"),
            "scale_attn_weights": (hf.scale_attn_weights, True),
            "scale_attn_by_inverse_layer_idx": (not hf.scale_attn_by_inverse_layer_idx, False),
            "tie_word_embeddings": (model.lm_head.weight is model.transformer.wte.weight, "tied (True)"),
        }
        for field, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"model.config.{field} must be {expected}, got {getattr(hf, field)!r}")
        config = GPTConfig(
            block_size=hf.n_positions,
            vocab_size=hf.vocab_size,
            n_layer=hf.n_layer,
            n_head=hf.n_head,
            n_embd=hf.n_embd,
            dropout=hf.resid_pdrop,
            attention_backend=attention_backend,
        )
        ours = cls(config)
        source = model.state_dict()
        with torch.no_grad():
            for name, p in ours.state_dict().items():
                w = source[name]
                p.copy_(w.t() if name.endswith(_TRANSPOSED) else w)
        return ours.to(device=model.device, dtype=model.dtype)

    def to_hf(self):
        """The same weights in a transformers `GPT2LMHeadModel` (Conv1D weights transposed)."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        hf_config = GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.block_size,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=0.0,  # ours has no dropout on attention probabilities
            activation_function="gelu_new",
            layer_norm_epsilon=LN_EPS,
            bos_token_id=None,
            eos_token_id=None,
        )
        weight = self.transformer.wte.weight
        model = GPT2LMHeadModel(hf_config).to(device=weight.device, dtype=weight.dtype)
        target = model.state_dict()
        with torch.no_grad():
            for name, p in self.state_dict().items():
                target[name].copy_(p.t() if name.endswith(_TRANSPOSED) else p)
        return model.train(self.training)
