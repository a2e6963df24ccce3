"""The bytes autograd keeps for backward in the project's two decoders, as a formula: what `saved_tensor_bytes`
measures on `impl.gpt.GPT` and `impl.generation.Llama` (SDPA attention, CPU kernels), per block and for the
model, with the checkpointing policies of `apply_checkpointing`.

The count follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
sec. 4.1, eq. 1: 34 s b h + 5 a s^2 b bytes per layer in 16 bits), redone op by op for these modules: a fused
attention kernel (FlashAttention-2's logsumexp instead of the a s^2 b score matrix), the norms' statistics, and
what a frozen base keeps. With u = B T C elements of one hidden state and s the bytes of the compute dtype:

GPT block (LayerNorm, GELU MLP of width I = 4C):
    ln_1, ln_2     input u s and mean, rstd (B, T) s each
    c_attn, c_fc   the LayerNorm output u s, as the linear's input           (when the linear trains)
    sdpa           q, k, v: one (B, T, 3C) s storage; output u s; logsumexp B H T fp32
    attn.c_proj    its input is the SDPA output: nothing new
    gelu           its input B T I s; mlp.c_proj keeps gelu's output B T I s  (when it trains)
    dropout        a (B, T, C) s mask after each residual branch             (when dropout is on)

Llama block (RMSNorm computed in fp32, GQA with H query and KV key/value heads of width D, SwiGLU of width I):
    norms          fp32 input 4u and rstd 4 B T; the normalized u s          (when the norm's weight trains)
    q/k/v, gate/up the scaled norm output u s, shared by the group's linears  (when they train)
    rope + sdpa    q,k after RoPE B T (H + KV) D s; q,k,v B T (H + 2 KV) D s; output B T H D s; logsumexp
    o_proj         its input is the SDPA output: nothing new
    SwiGLU         gate, up, silu(gate) B T I s each; down_proj keeps their product B T I s (when it trains)

Packed rows (document ids) add the dense (B, T, T) mask SDPA keeps, in the compute dtype, per block. LoRA (Hu et
al. 2021) on a linear keeps its input (an own copy per adapter when the adapters' dtype differs from the compute
dtype, else the shared input) and the B T r output of A. QLoRA's frozen NF4 matmul keeps nothing new. Over a
frozen embedding the first block keeps nothing before its first trainable linear.
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
_READ_SDPA_OUTPUT = ("attn.c_proj", "attn.o_proj")


def _block_ops(family, *, batch, seq, hidden, heads, kv_heads, head_dim, intermediate, s, trainable, packing,
               dropout) -> list[tuple[int, tuple | None]]:  # fmt: skip
    """The block's ops in order: (bytes kept when a gradient flows through the op, None), or for a group of
    linears reading one tensor (0, (their names, elements of that tensor))."""
    tokens = batch * seq
    u, lse, mask = tokens * hidden, 4 * batch * heads * seq, batch * seq * seq * s if packing else 0
    q, kv = heads * head_dim, kv_heads * head_dim  # this rank's heads under tensor parallelism
    if family == "gpt":
        norm, drop = (u * s + 2 * tokens * s, None), (u * s if dropout else 0, None)
        attention = 4 * tokens * q * s + lse + mask
        return [
            norm, (0, (("attn.c_attn",), u)), (attention, None), (0, (("attn.c_proj",), tokens * q)), drop,
            norm, (0, (("mlp.c_fc",), u)), (tokens * intermediate * s, None),
            (0, (("mlp.c_proj",), tokens * intermediate)), drop,
        ]  # fmt: skip
    norm = (4 * u + 4 * tokens + (u * s if trainable else 0), None)
    attention = tokens * (q + kv) * s + tokens * (q + 2 * kv) * s + tokens * q * s + lse + mask
    return [
        norm, (0, (("attn.q_proj", "attn.k_proj", "attn.v_proj"), u)), (attention, None),
        (0, (("attn.o_proj",), tokens * q)), norm, (0, (("mlp.gate_proj", "mlp.up_proj"), u)),
        (3 * tokens * intermediate * s, None), (0, (("mlp.down_proj",), tokens * intermediate)),
    ]  # fmt: skip


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
    lora_itemsize: int = 4,
    dropout: bool = False,
    packing: bool = False,
    input_requires_grad: bool = True,
) -> int:
    """Bytes one block keeps for backward (module docstring). `trainable`: the base weights train (full
    fine-tune); `lora`: {linear name as in `BLOCK_LINEARS`: rank} of the adapted linears, whose weights are
    `lora_itemsize` bytes (impl.finetune makes fp32 adapters; ZeRO's mixed precision runs them in bf16);
    `packing`: document-masked attention; `input_requires_grad=False`: the first block over a frozen embedding.
    Tensor parallelism: pass this rank's `heads`, `kv_heads` and `intermediate`."""
    check_one_of("family", family, FAMILIES)
    for name, value in (("batch", batch), ("seq", seq), ("hidden", hidden), ("heads", heads),
                        ("kv_heads", kv_heads), ("head_dim", head_dim), ("intermediate", intermediate)):  # fmt: skip
        check_int(name, value, low=1)
    check_one_of("itemsize", itemsize, (2, 4))
    check_one_of("lora_itemsize", lora_itemsize, (2, 4))
    for name, value in (("trainable", trainable), ("dropout", dropout), ("packing", packing),
                        ("input_requires_grad", input_requires_grad)):  # fmt: skip
        check_bool(name, value)
    lora = dict(lora or {})
    unknown = sorted(set(lora) - set(BLOCK_LINEARS[family]))
    if unknown:
        raise ValueError(f"lora must name linears of {BLOCK_LINEARS[family]}, got {unknown}")
    s, tokens = itemsize, batch * seq
    ops = _block_ops(family, batch=batch, seq=seq, hidden=hidden, heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, intermediate=intermediate, s=s, trainable=trainable, packing=packing,
                     dropout=dropout)  # fmt: skip
    flowing, total = input_requires_grad, 0
    for nbytes, group in ops:
        if group is None:
            total += nbytes if flowing else 0
            continue
        names, n_in = group
        adapters = [lora[n] for n in names if n in lora]
        free = names[0] in _READ_SDPA_OUTPUT and flowing  # the SDPA output, which attention keeps anyway
        if not free and (trainable or (adapters and lora_itemsize == s)):
            total += n_in * s  # the input itself, in the compute dtype, shared by the group's linears
        if lora_itemsize != s:
            total += lora_itemsize * n_in * len(adapters)  # each adapter's own copy in the adapters' dtype
        total += sum(lora_itemsize * tokens * r for r in adapters)  # x A^T
        flowing |= trainable or bool(adapters)
    return total


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
    lora_itemsize: int = 4,
    dropout: bool = False,
    packing: bool = False,
    policy: str = "none",
    k: int | None = None,
    first: bool = True,
    last: bool = True,
    vocab_parallel: bool = False,
) -> tuple[int, int]:
    """(bytes kept for backward by one forward of the whole model or of a pipeline stage, the peak a checkpoint
    replay adds in backward): `n_layers` blocks under `policy`, plus the embedding's token ids (`first`), and the
    final norm, head input, log-softmax output (GPT: in the compute dtype; Llama: the fp32 loss of the logits)
    and the targets (`last`); with `vocab_parallel` (Megatron-LM's split head, `vocab` this rank's share) the
    loss keeps the fp32 softmax, the local target ids and its token masks instead. Over a frozen embedding
    (LoRA) the first block keeps less (`block_saved_bytes`)."""
    shape = dict(batch=batch, seq=seq, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                 intermediate=intermediate, itemsize=itemsize, trainable=trainable, lora=lora,
                 lora_itemsize=lora_itemsize, dropout=dropout, packing=packing)  # fmt: skip
    per_block = block_saved_bytes(family, **shape)
    s, tokens = itemsize, batch * seq
    u = tokens * hidden
    kept, replay = stack_saved_bytes(n_layers, per_block, u * s, policy, k)
    if first and not trainable and n_layers and policy == "none":
        kept += block_saved_bytes(family, **shape, input_requires_grad=False) - per_block
    if first and trainable:
        kept += 8 * tokens + (8 * seq if family == "gpt" else 0)  # token ids (and GPT's positions)
    if first and dropout and family == "gpt":
        kept += u * s  # the embedding dropout's mask
    if family == "llama" and n_layers:
        kept += 2 * tokens * head_dim * s  # RoPE's cos and sin, shared by every block
    if last:
        if family == "gpt":
            kept += u * s + 2 * tokens * s + (u * s if trainable else 0)  # ln_f, and the head's input
        else:
            kept += 4 * u + 4 * tokens + (2 * u * s if trainable else 0)
        if vocab_parallel:
            kept += tokens * vocab * 4 + 8 * tokens + 3 * tokens + 4
        else:  # log-softmax output (GPT: compute dtype; Llama: the fp32 loss), targets, the nll's weight sum
            loss_size = s if family == "gpt" else 4
            kept += tokens * vocab * loss_size + 8 * tokens + loss_size
    return kept, replay
