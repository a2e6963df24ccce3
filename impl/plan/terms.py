"""The per-device memory of one training step or one decoding step, term by term, composed from the formulas
that live next to each technique:

    weights, lora_weights, gradients,     impl.distributed.zero_state_bytes (Rajbhandari et al. 2020, sec. 5:
    fp32_master, optimizer_states,        2 + 2 + K bytes per parameter split by ZeRO stage, each tensor padded
    padding                               to a multiple of the data-parallel ranks; padding is its own term)
    nf4_codes_scales                      impl.finetune.nf4_storage_bytes (Dettmers et al. 2023, sec. 3)
    activations_saved, recompute_peak     impl.memory.model_saved_bytes (op by op, Korthikanti et al. 2022
                                          sec. 4.1; checkpointing: Chen et al. 2016 sec. 4.1)
    pipeline_in_flight                    micro-batches a stage holds at once (GPipe: m; 1F1B: p - s;
                                          Narayanan et al. 2021 sec. 2.2.1)
    kv_cache                              impl.generation.kv_cache_bytes (Pope et al. 2022 sec. 2)
    temporary_peak                        the largest transient: the loss's logits and their gradient in
                                          training, the logits and one layer's attention inputs in decoding

The model-state terms are what the device holds after a step (the gradients kept, as with gradient
accumulation); the total is their sum with the activations and the transient: the per-device peak.
"""

from dataclasses import dataclass, field, replace

import torch

from impl.common.checks import check_int
from impl.distributed import zero_state_bytes
from impl.finetune import nf4_storage_bytes
from impl.generation import kv_cache_bytes
from impl.memory import BLOCK_LINEARS, model_saved_bytes
from impl.plan.setup import Setup
from impl.plan.shapes import ModelShape, ParamTensor, check_tp, stage_layers, tensors

TERMS = (
    "weights",
    "nf4_codes_scales",
    "lora_weights",
    "gradients",
    "fp32_master",
    "optimizer_states",
    "activations_saved",
    "recompute_peak",
    "pipeline_in_flight",
    "kv_cache",
    "temporary_peak",
    "padding",
)
MODEL_STATES = ("weights", "nf4_codes_scales", "lora_weights", "gradients", "fp32_master", "optimizer_states",
                "kv_cache", "padding")  # fmt: skip
DEFAULT_TARGETS = {"gpt": ("c_attn",), "llama": ("q_proj", "v_proj")}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_POLICY = {"none": "none", "every": "every", "every-k": "every_k", "sqrt": "sqrt"}
_BLOCK_8BIT, _MIN_8BIT = 256, 4096  # bitsandbytes' AdamW8bit: block size, smallest tensor with 8-bit state


@dataclass
class Plan:
    shape: ModelShape
    setup: Setup
    terms: dict[str, int]  # per-device bytes by term; keys from TERMS, zeros kept
    total: int  # sum of terms: the per-device peak estimate
    stage: int = 0  # the pipeline stage these bytes are for (the largest one)
    details: dict[str, int] = field(default_factory=dict)  # ZeRO padding per state, trainable numel...

    def fits(self, device_bytes: int) -> bool:
        return self.total <= check_int("device_bytes", device_bytes, low=1)


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    module = name.rsplit(".", 1)[0]
    return any(module == t or module.endswith("." + t) for t in targets)


def _targets(shape: ModelShape, setup: Setup) -> tuple[str, ...]:
    return setup.lora_targets or DEFAULT_TARGETS[shape.family]


def _lora_tensors(shape: ModelShape, setup: Setup, held: list[ParamTensor]) -> list[int]:
    """Numels of the adapters (A: r x in, B: out x r) on the targeted linears this device holds."""
    targets, r = _targets(shape, setup), setup.lora_rank
    linears = [t for t in held if t.linear and _matches(t.name, targets)]
    if not linears and any(t.linear for t in held):
        names = sorted({t.name.split(".", 3)[-1].rsplit(".", 1)[0] for t in held if t.linear})
        raise ValueError(f"lora_targets {targets} match no linear of {shape.name}; its linears are {names}")
    return [n for t in linears for n in (r * t.shape[1], t.shape[0] * r)]


def _optimizer_bytes(setup: Setup) -> int:
    """Bytes of optimizer state per trainable parameter: Adam's m and v, SGD's momentum, in the master dtype
    (the 8-bit AdamW is counted per tensor by `_adamw_8bit_bytes`)."""
    state = 4 if setup.mixed_precision or setup.trainable_bytes == 4 else setup.itemsize
    return {"adamw": 2 * state, "sgd": 0, "sgd-momentum": state, "adamw-8bit": 0}[setup.optimizer]


def _adamw_8bit_bytes(shards: list[int]) -> int:
    """bitsandbytes' AdamW8bit state for tensors of `shards` elements (Dettmers et al. 2022, "8-bit Optimizers
    via Block-wise Quantization", sec. 2, as bitsandbytes 0.45+ stores it): m and v as uint8 codes with one fp32
    absmax per block of 256, one 256-entry fp32 code map per state shared by all tensors, and tensors under
    4096 elements kept in fp32 (its min_8bit_size)."""
    quantized = [n for n in shards if n >= _MIN_8BIT]
    small = sum(2 * 4 * n for n in shards if n < _MIN_8BIT)
    maps = 2 * 256 * 4 if quantized else 0
    return small + maps + sum(2 * n + 2 * 4 * -(-n // _BLOCK_8BIT) for n in quantized)


def _block_lora(shape: ModelShape, setup: Setup) -> dict[str, int]:
    if setup.finetune == "full":
        return {}
    return {n: setup.lora_rank for n in BLOCK_LINEARS[shape.family] if _matches(n + ".weight", _targets(shape, setup))}


def _activations(shape: ModelShape, setup: Setup, stage: int, trainable: list[int], quantized: list[int]) -> dict:
    layers = stage_layers(shape.num_layers, setup.pp, stage)
    tp, s = setup.tp, setup.itemsize
    vocab = -(-shape.vocab_size // tp) if tp > 1 else shape.vocab_size
    common = dict(
        batch=setup.micro_batch,
        seq=setup.seq_len,
        hidden=shape.hidden_size,
        heads=shape.num_heads // tp,
        kv_heads=shape.num_kv_heads // tp,
        head_dim=shape.head_dim,
        intermediate=shape.intermediate_size // tp,
        itemsize=s,
        trainable=setup.finetune == "full",
        lora=_block_lora(shape, setup),
        lora_itemsize=setup.trainable_bytes,
        dropout=setup.dropout,
        packing=setup.packing,
    )
    kept, replay = model_saved_bytes(
        shape.family,
        n_layers=len(layers),
        vocab=vocab,
        policy=_POLICY[setup.checkpointing],
        k=setup.checkpoint_every if setup.checkpointing == "every-k" else None,
        first=stage == 0,
        last=stage == setup.pp - 1,
        vocab_parallel=tp > 1,
        **common,
    )
    in_flight = 1
    if setup.pp > 1:
        m = setup.micro_batches
        in_flight = m if setup.schedule == "gpipe" else min(setup.pp - stage, m)
    tokens = setup.micro_batch * setup.seq_len
    # The transients on top of what is kept, at the moments the peak can fall on:
    # - the loss: the log-softmax output and its gradient (GPT: compute dtype; Llama: the fp32 loss);
    #   under tensor parallelism the vocab-parallel loss's fp32 logits, exponentials and softmax;
    loss = 2 * tokens * vocab * (s if shape.family == "gpt" else 4) if stage == setup.pp - 1 else 0
    loss = 3 * tokens * vocab * 4 if tp > 1 and stage == setup.pp - 1 else loss
    # - a QLoRA matmul: one weight dequantized (fp32 levels, fp32 product, compute-dtype copy);
    dequant = max(quantized, default=0) * (8 + s)
    # - a checkpointed segment's backward: its replayed activations (less its input, kept already), the gradient
    #   of its widest activation (twice, the gradients of the MLP's output and input at once, when the MLP's
    #   output linear is frozen and so frees no kept input before them), and QLoRA's dequantized weight;
    frees = setup.finetune == "full" or any(n.startswith("mlp.") and n.endswith(("c_proj", "down_proj"))
                                            for n in _block_lora(shape, setup))  # fmt: skip
    widest = (1 if frees else 2) * tokens * (shape.intermediate_size // tp) * s - tokens * shape.hidden_size * s
    segment = replay + widest + dequant if replay else 0
    # - the optimizer step, once the activations are gone: mixed precision's fp32 copy of every gradient shard,
    #   and the per-tensor temporaries of torch's single-tensor AdamW / SGD.
    shards = [n if setup.zero_stage == 0 else -(-n // setup.dp) for n in trainable]
    step = (4 * sum(shards) if setup.mixed_precision else 0) + 2 * 4 * max(shards, default=0)
    # - on a pipeline stage that is not the last, a block's backward while the in-flight micro-batches are kept:
    #   the gradients of its widest activation and of its output, the received gradient and the stashed outputs.
    last = stage == setup.pp - 1
    hidden = tokens * shape.hidden_size * s
    block = 0 if last else 2 * tokens * (shape.intermediate_size // tp) * s + hidden + in_flight * hidden
    # ZeRO-3 holds one module's parameters gathered in full during its forward and backward (the largest one
    # here: the embedding or the head). impl.common.MemoryMeter does not see them on CPU (Zero resizes their
    # storage in place, outside the ops it watches), so the sweep's measured peak leaves them out.
    gathered = setup.trainable_bytes * max(shards, default=0) * setup.dp if setup.zero_stage == 3 else 0
    extra = max(max(loss, dequant, segment, block) + gathered, step - in_flight * kept)
    return {
        "activations_saved": kept,
        "recompute_peak": replay,
        "pipeline_in_flight": (in_flight - 1) * kept,
        "temporary_peak": max(0, extra - replay),
    }


def _train_terms(shape: ModelShape, setup: Setup, stage: int, rank: int) -> tuple[dict[str, int], dict[str, int]]:
    held = tensors(shape, tp=setup.tp, pp=setup.pp, stage=stage)
    terms = dict.fromkeys(TERMS, 0)
    if setup.finetune == "full":
        trainable = [t.numel for t in held]
    else:
        trainable = _lora_tensors(shape, setup, held)
        quantized = [t for t in held if t.linear] if setup.finetune == "qlora" else []
        terms["weights"] = sum(t.numel for t in held if t not in quantized) * setup.itemsize
        terms["nf4_codes_scales"] = sum(
            nf4_storage_bytes(t.numel, setup.nf4_block_size, setup.double_quant) for t in quantized
        )
    zero = zero_state_bytes(
        trainable,
        stage=setup.zero_stage,
        world_size=setup.dp,
        rank=rank,
        param_bytes=setup.trainable_bytes,
        master_bytes=4 if setup.mixed_precision else 0,
        optimizer_bytes_per_param=_optimizer_bytes(setup),
    )
    terms["weights" if setup.finetune == "full" else "lora_weights"] = zero["params"] - zero["padding_params"]
    terms["gradients"] = zero["grads"] - zero["padding_grads"]
    terms["fp32_master"] = zero["master"] - zero["padding_master"]
    terms["optimizer_states"] = zero["optimizer"] - zero["padding_optimizer"]
    if setup.optimizer == "adamw-8bit":  # per tensor (ZeRO's padding inside), so no padding_optimizer share
        shards = trainable if setup.zero_stage == 0 else [-(-n // setup.dp) for n in trainable]
        terms["optimizer_states"] = _adamw_8bit_bytes(shards)
    terms["padding"] = sum(zero[k] for k in zero if k.startswith("padding_"))
    quantized = [t.numel for t in held if t.linear] if setup.finetune == "qlora" else []
    terms.update(_activations(shape, setup, stage, trainable, quantized))
    details = {k: v for k, v in zero.items() if k.startswith("padding_")}
    details["trainable_numel"] = sum(trainable)
    return terms, details


def _inference_terms(shape: ModelShape, setup: Setup) -> dict[str, int]:
    check_tp(shape, setup.tp)
    held = tensors(shape, tp=setup.tp)
    terms = dict.fromkeys(TERMS, 0)
    quantized = [t for t in held if t.linear] if setup.finetune == "qlora" else []
    terms["weights"] = sum(t.numel for t in held if t not in quantized) * setup.itemsize
    terms["nf4_codes_scales"] = sum(nf4_storage_bytes(t.numel, setup.nf4_block_size, setup.double_quant)
                                    for t in quantized)  # fmt: skip
    dtype = _TORCH_DTYPES[setup.dtype]
    kv_heads = shape.num_kv_heads // setup.tp
    terms["kv_cache"] = kv_cache_bytes(layers=shape.num_layers, batch=setup.kv_batch, kv_heads=kv_heads,
                                       max_tokens=setup.kv_len, head_dim=shape.head_dim, dtype=dtype,
                                       quantized=setup.kv_int8)  # fmt: skip
    # The larger of two transients. Prefill of a (kv_len - 1)-token prompt, one layer at a time, without
    # autograd: in attention the hidden state, q/k/v and their concatenation, RoPE's q,k with its two temporaries,
    # and the output; in the SwiGLU MLP gate, up, silu(gate) and their product next to about 3.5 hidden states (the
    # fp32 norm input among them); an int8 cache returns dequantized copies in place of the views, about the same
    # bytes. One decode step: the logits, the scores over the cache, one layer's q/k/v, and with
    # an int8 cache one layer's keys and values dequantized for attention.
    s, heads, D, C = setup.itemsize, shape.num_heads // setup.tp, shape.head_dim, shape.hidden_size
    tokens = setup.kv_batch * max(1, setup.kv_len - 1)
    attention = tokens * s * (C + 2 * (heads + 2 * kv_heads) * D + 3 * (heads + kv_heads) * D + heads * D)
    mlp = 4 * tokens * (shape.intermediate_size // setup.tp) * s + 7 * tokens * C * s // 2
    prefill = max(attention, mlp)
    logits = setup.kv_batch * -(-shape.vocab_size // setup.tp) * s
    scores = setup.kv_batch * heads * setup.kv_len * s
    qkv = setup.kv_batch * (heads + 2 * kv_heads) * D * s
    dequantized = 2 * setup.kv_batch * kv_heads * setup.kv_len * D * s if setup.kv_int8 else 0
    terms["temporary_peak"] = max(prefill, logits + scores + qkv + dequantized)
    return terms


def plan(shape: ModelShape, setup: Setup, *, stage: int | None = None, rank: int = 0) -> Plan:
    """Per-device bytes by term for `shape` under `setup`: for pipeline stage `stage` (default: the stage with
    the largest total) and data-parallel rank `rank` (ZeRO's padding sits on the last ranks' shards)."""
    if not isinstance(shape, ModelShape):
        raise TypeError(f"shape must be a ModelShape (see model_shape()), got {type(shape).__name__}")
    if not isinstance(setup, Setup):
        raise TypeError(f"setup must be a Setup, got {type(setup).__name__}")
    check_tp(shape, setup.tp)
    if setup.pp > shape.num_layers:
        raise ValueError(f"pp must be at most num_layers={shape.num_layers}, got {setup.pp}")
    check_int("rank", rank, low=0, high=setup.dp, high_open=True)
    if setup.mode == "inference":
        terms = _inference_terms(shape, setup)
        return Plan(shape, setup, terms, sum(terms.values()))
    stages = range(setup.pp) if stage is None else [check_int("stage", stage, low=0, high=setup.pp, high_open=True)]
    best = None
    for s in stages:
        terms, details = _train_terms(shape, setup, s, rank)
        candidate = Plan(shape, setup, terms, sum(terms.values()), s, details)
        if best is None or candidate.total > best.total:
            best = candidate
    return best


def levers(shape: ModelShape, setup: Setup, device_bytes: int) -> list[tuple[str, int]]:
    """The single changes that cut the per-device total most, largest saving first: (what, bytes saved)."""
    check_int("device_bytes", device_bytes, low=1)
    now = plan(shape, setup).total
    options = []
    if setup.mode == "train":
        if setup.zero_stage < 3:
            world = setup.world_size if setup.dp > 1 else 8 * setup.tp * setup.pp
            options.append((f"ZeRO-3 (world {world})", replace(setup, zero_stage=3, world_size=world)))
        if setup.checkpointing != "sqrt":
            options.append(("sqrt checkpointing", replace(setup, checkpointing="sqrt")))
        if setup.finetune == "full":
            options.append(("LoRA r=16", replace(setup, finetune="lora", lora_rank=16)))
        if setup.finetune != "qlora":
            options.append(("QLoRA", replace(setup, finetune="qlora", lora_rank=setup.lora_rank)))
        if setup.dtype == "float32":
            options.append(("bf16 mixed precision", replace(setup, dtype="bfloat16", mixed_precision=True)))
        if setup.micro_batch > 1:
            options.append(("micro-batch 1", replace(setup, micro_batch=1)))
    else:
        if not setup.kv_int8:
            options.append(("int8 KV cache", replace(setup, kv_int8=True)))
        if setup.finetune != "qlora":
            options.append(("NF4 weights", replace(setup, finetune="qlora")))
    saved = []
    for name, other in options:
        try:
            gain = now - plan(shape, other).total
        except ValueError:
            continue  # a lever this shape cannot take (heads that do not divide...)
        if gain > 0:
            saved.append((name, gain))
    return sorted(saved, key=lambda item: -item[1])
