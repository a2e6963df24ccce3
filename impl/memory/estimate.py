"""The bytes autograd keeps for backward in the project's two decoders, as a formula: what `saved_tensor_bytes`
measures on `impl.gpt.GPT` and `impl.generation.Llama` (SDPA attention, CPU kernels), per block and for the
model, with the checkpointing policies of `apply_checkpointing`.

The count follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
sec. 4.1, eq. 1: 34 s b h + 5 a s^2 b bytes per layer in 16 bits), redone op by op for these modules: a fused
attention kernel (FlashAttention-2's logsumexp instead of the a s^2 b score matrix), the norms' statistics, and
what a frozen base keeps. With u = B T C elements of one hidden state and s the bytes of the compute dtype:

GPT block (LayerNorm, GELU MLP of width 4C):
    ln_1, ln_2     input u s and mean, rstd (B, T) s each                    (when the input needs a gradient)
    c_attn, c_fc   the LayerNorm output u s, as the linear's input           (when the linear's weight trains)
    sdpa           q, k, v: one (B, T, 3C) s storage; output u s; logsumexp B H T fp32
    attn.c_proj    its input is the SDPA output: nothing new
    gelu           its input 4u s; mlp.c_proj keeps gelu's output 4u s     (when its weight trains)
    dropout        a (B, T, C) s mask after each residual branch             (when dropout is on)

Llama block (RMSNorm computed in fp32, GQA with H query and KV key/value heads of width D, SwiGLU of width I):
    norms          fp32 input 4u and rstd 4 B T; the normalized u s         (when the norm's weight trains)
    q/k/v, gate/up the scaled norm output u s, shared by the group's linears (when their weights train)
    rope + sdpa    q,k after RoPE B T (H + KV) D s; q,k,v B T (H + 2 KV) D s; output B T H D s; logsumexp
    o_proj         its input is the SDPA output: nothing new
    SwiGLU         gate, up, silu(gate) B T I s each; down_proj keeps their product B T I s (when it trains)

LoRA (Hu et al. 2021) on a linear keeps its input (fp32 adapters: an fp32 copy per adapter when s < 4, else
the shared input) and the B T r fp32 output of A. QLoRA's frozen NF4 matmul keeps nothing new.
"""

from collections.abc import Mapping

from impl.common.checks import check_bool, check_int, check_one_of
from impl.memory.policy import POLICIES, segment_lengths

FAMILIES = ("gpt", "llama")
BLOCK_LINEARS = {
    "gpt": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "llama": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
              "mlp.down_proj"),
}  # fmt: skip
# Linears that read one tensor; the tensor is kept once however many of them keep it.
_INPUT_GROUPS = {
    "gpt": (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    "llama": (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
              ("mlp.down_proj",)),
}  # fmt: skip
_ALREADY_KEPT = {"attn.c_proj", "attn.o_proj"}  # read the SDPA output, which attention keeps anyway


def _linear_inputs(family: str, tokens: int, widths: dict, s: int, trainable: bool, lora: Mapping[str, int]) -> int:
    """Bytes kept for the inputs of the block's linears, and LoRA's A outputs."""
    total = 0
    for group in _INPUT_GROUPS[family]:
        n_in = tokens * widths[group[0]]
        adapters = [lora[name] for name in group if name in lora]
        if group[0] not in _ALREADY_KEPT and (trainable or (adapters and s == 4)):
            total += n_in * s  # the input itself, in the compute dtype
        if s != 4:
            total += 4 * n_in * len(adapters)  # each adapter's fp32 copy of it
        total += sum(4 * tokens * r for r in adapters)  # x A^T, fp32
    return total


def block_saved_bytes(
    family: str,
    *,
    batch: int,
    seq: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    itemsize: int,
    trainable: bool = True,
    lora: Mapping[str, int] | None = None,
    dropout: bool = False,
) -> int:
    """Bytes one block keeps for backward (module docstring), its input needing a gradient. `trainable`: the
    base weights train (full fine-tune); `lora`: {linear name as in `BLOCK_LINEARS`: rank} of the adapted linears."""
    check_one_of("family", family, FAMILIES)
    for name, value in (("batch", batch), ("seq", seq), ("hidden", hidden), ("heads", heads),
                        ("kv_heads", kv_heads), ("head_dim", head_dim), ("intermediate", intermediate)):  # fmt: skip
        check_int(name, value, low=1)
    check_one_of("itemsize", itemsize, (2, 4))
    check_bool("trainable", trainable)
    check_bool("dropout", dropout)
    lora = dict(lora or {})
    unknown = sorted(set(lora) - set(BLOCK_LINEARS[family]))
    if unknown:
        raise ValueError(f"lora must name linears of {BLOCK_LINEARS[family]}, got {unknown}")
    s, tokens = itemsize, batch * seq
    u = tokens * hidden
    if family == "gpt":
        widths = {"attn.c_attn": hidden, "attn.c_proj": hidden, "mlp.c_fc": hidden, "mlp.c_proj": intermediate}
        norms = 2 * (u * s + 2 * tokens * s)
        attention = 3 * u * s + u * s + 4 * batch * heads * seq
        mlp = intermediate * tokens * s  # gelu's input
        masks = 2 * u * s if dropout else 0
        return norms + attention + mlp + masks + _linear_inputs(family, tokens, widths, s, trainable, lora)
    q, kv = heads * head_dim, kv_heads * head_dim
    widths = {"attn.q_proj": hidden, "attn.o_proj": q, "mlp.gate_proj": hidden, "mlp.down_proj": intermediate}
    norms = 2 * (4 * u + 4 * tokens + (u * s if trainable else 0))
    attention = tokens * (q + kv) * s + tokens * (q + 2 * kv) * s + tokens * q * s + 4 * batch * heads * seq
    mlp = 3 * tokens * intermediate * s
    return norms + attention + mlp + _linear_inputs(family, tokens, widths, s, trainable, lora)


def first_block_discount(family: str, *, batch: int, seq: int, hidden: int, itemsize: int) -> int:
    """Bytes the first block does not keep when its input needs no gradient (a frozen embedding, LoRA): its
    first norm's input and statistics."""
    tokens = batch * seq
    if family == "gpt":
        return tokens * hidden * itemsize + 2 * tokens * itemsize
    return 4 * tokens * hidden + 4 * tokens


def stack_saved_bytes(
    n_layers: int, per_block: int, hidden_state: int, policy: str = "none", k: int | None = None
) -> tuple[int, int]:
    """(bytes kept through the forward pass, peak bytes a replay adds in backward) for `n_layers` blocks of
    `per_block` bytes each under checkpointing `policy` (Chen et al. 2016, sec. 4.1): all blocks' bytes with
    `none`; else one `hidden_state` per segment (its kept input), and the longest segment's blocks while it is
    recomputed."""
    check_int("n_layers", n_layers, low=0)
    check_one_of("policy", policy, POLICIES)
    lengths = segment_lengths(n_layers, policy, k)
    if policy == "none" or not lengths:
        return n_layers * per_block, 0
    return len(lengths) * hidden_state, max(lengths) * per_block


def model_saved_bytes(
    family: str,
    *,
    n_layers: int,
    vocab: int,
    batch: int,
    seq: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    itemsize: int,
    trainable: bool = True,
    lora: Mapping[str, int] | None = None,
    dropout: bool = False,
    policy: str = "none",
    k: int | None = None,
    first: bool = True,
    last: bool = True,
) -> tuple[int, int]:
    """(bytes kept for backward by one forward of the whole model or of a pipeline stage, the peak a checkpoint
    replay adds in backward): `n_layers` blocks under `policy`, plus the embedding's token ids (`first`), and the
    final norm, head input, log-softmax output (GPT: in the compute dtype; Llama: the fp32 loss of the logits)
    and the targets (`last`). A frozen embedding (LoRA) leaves the first block's first norm nothing to keep."""
    shape = dict(batch=batch, seq=seq, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                 intermediate=intermediate, itemsize=itemsize)  # fmt: skip
    per_block = block_saved_bytes(family, **shape, trainable=trainable, lora=lora, dropout=dropout)
    s, tokens = itemsize, batch * seq
    u = tokens * hidden
    kept, replay = stack_saved_bytes(n_layers, per_block, u * s, policy, k)
    if first and not trainable and n_layers and policy == "none":
        kept -= first_block_discount(family, batch=batch, seq=seq, hidden=hidden, itemsize=itemsize)
    if first and trainable:
        kept += 8 * tokens + (8 * seq if family == "gpt" else 0)  # token ids (and GPT's positions)
    if first and dropout and family == "gpt":
        kept += u * s  # the embedding dropout's mask
    if family == "llama" and n_layers:
        kept += 2 * tokens * head_dim * s  # RoPE's cos and sin, shared by every block
    if last:
        if family == "gpt":
            kept += u * s + 2 * tokens * s + (u * s if trainable else 0) + tokens * vocab * s + s
        else:
            kept += 4 * u + 4 * tokens + (2 * u * s if trainable else 0) + tokens * vocab * 4 + 4
        kept += 8 * tokens  # the targets
    return kept, replay
