"""The configurations `impl.plan.validate` measures: an all-pairs covering of the planner's dimensions (model,
dtype regime, fine-tuning, optimizer, parallelism, checkpointing) over what the project's techniques compose,
plus what pairs leave out (decoding with fp32/bf16/int8 caches, dropout, packing, other LoRA targets, QLoRA
options, both pipeline schedules, 4 ranks). Tiny shapes, so one step of each runs in a fraction of a second."""

import dataclasses
import itertools

from impl.plan.setup import Setup
from impl.plan.shapes import ModelShape

TINY = {
    "gpt": ModelShape("tiny-gpt", 61, 32, 4, 4, 4, 128, 8, True, "gelu", "layer", True, 32),
    "llama": ModelShape("tiny-llama", 61, 32, 4, 4, 2, 48, 8, False, "swiglu", "rms", False, 64),
}
_BASE = dict(seq_len=32, micro_batch=2)


# The dimensions the sweep crosses, each pair of values in at least one configuration (all-pairs covering).
DIMENSIONS = {
    "model": ("gpt", "llama"),
    "dtype": ("float32", "bfloat16", "mixed"),
    "finetune": ("full", "lora", "qlora"),
    "optimizer": ("adamw", "sgd", "sgd-momentum", "adamw-8bit"),
    "parallel": ("single", "zero1", "zero2", "zero3", "tp", "pp"),
    "checkpointing": ("none", "every", "every-k", "sqrt"),
}
# What the sweep leaves out, and why:
# - tensor and pipeline parallelism are built for the GPT only;
# - QLoRA under tensor_parallelize is refused (its 4-bit base is not split), and QLoRA across pipeline stages is
#   untested;
# - LoRA with TP or PP, PP with checkpointing and ZeRO-3 with checkpointing compose (tests/test_compose_guards.py)
#   but hold memory the planner does not model yet: a TP adapter's all-reduce buffers, a ZeRO-3 replay's whole
#   segment of gathered weights kept until their gradients are reduced, a stage's replayed blocks; and validate's
#   TP path applies LoRA after tensor_parallelize, which apply_lora now refuses (LoRA first, then TP);
# - Zero trains fp32 (or mixed-precision) parameters, so pure bf16 full training runs without it, on one rank.
UNSUPPORTED = (
    ("model", "llama", "parallel", "tp"), ("model", "llama", "parallel", "pp"),
    ("finetune", "lora", "parallel", "tp"), ("finetune", "qlora", "parallel", "tp"),
    ("finetune", "lora", "parallel", "pp"), ("finetune", "qlora", "parallel", "pp"),
    ("parallel", "pp", "checkpointing", "every"), ("parallel", "pp", "checkpointing", "every-k"),
    ("parallel", "pp", "checkpointing", "sqrt"),
    ("parallel", "zero3", "checkpointing", "every"), ("parallel", "zero3", "checkpointing", "every-k"),
    ("parallel", "zero3", "checkpointing", "sqrt"),
)  # fmt: skip


def supported(tags: dict[str, str]) -> bool:
    """Whether a combination of dimension values can run (see UNSUPPORTED; pure bf16 full training: no ZeRO)."""
    if (
        tags.get("dtype") == "bfloat16"
        and tags.get("finetune") == "full"
        and tags.get("parallel", "").startswith("zero")
    ):
        return False
    return not any(tags.get(a) == x and tags.get(b) == y for a, x, b, y in UNSUPPORTED)


def _pairs(tags: dict[str, str]) -> set:
    items = sorted(tags.items())
    return {(a, b) for i, a in enumerate(items) for b in items[i + 1 :]}


def all_pairs() -> list[dict[str, str]]:
    """Greedy all-pairs covering of DIMENSIONS under `supported`: few combinations holding every supported pair."""
    combos = [dict(zip(DIMENSIONS, values)) for values in itertools.product(*DIMENSIONS.values())]
    combos = [c for c in combos if supported(c)]
    uncovered = set().union(*(_pairs(c) for c in combos))
    chosen = []
    while uncovered:
        best = max(combos, key=lambda c: len(_pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= _pairs(best)
    return chosen


def _setup(tags: dict[str, str]) -> Setup:
    parallel = tags["parallel"]
    knobs = dict(_BASE, dtype="bfloat16" if tags["dtype"] == "mixed" else tags["dtype"])
    knobs.update(mixed_precision=tags["dtype"] == "mixed", finetune=tags["finetune"], optimizer=tags["optimizer"])
    knobs.update(checkpointing=tags["checkpointing"])
    if parallel.startswith("zero"):
        knobs.update(zero_stage=int(parallel[-1]), world_size=2)
    elif parallel in ("tp", "pp"):
        knobs.update({parallel: 2, "world_size": 2, "micro_batches": 2 if parallel == "pp" else 1})
    return Setup(**knobs)


def _c(model: str, name: str, **knobs) -> tuple[str, ModelShape, Setup]:
    return f"{model}-{name}", TINY[model], Setup(**{**_BASE, **knobs})


BF16, MIXED = dict(dtype="bfloat16"), dict(dtype="bfloat16", mixed_precision=True)
CONFIGS: list[tuple[str, ModelShape, Setup]] = [
    ("-".join(tags.values()), TINY[tags["model"]], _setup(tags)) for tags in all_pairs()
] + [  # what the pairs leave out: decoding, dropout, packing, other targets, QLoRA options, schedules, 4 ranks
    _c("gpt", "dropout", dropout=True), _c("gpt", "packing", packing=True),
    _c("gpt", "lora-mlp", finetune="lora", lora_targets=("c_fc", "mlp.c_proj"), lora_rank=4),
    _c("llama", "lora-all", finetune="lora", lora_rank=4, **BF16,
       lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    _c("gpt", "qlora-nodq-block32", finetune="qlora", double_quant=False, nf4_block_size=32),
    _c("llama", "decode-fp32", mode="inference", kv_len=48, kv_batch=2),
    _c("llama", "decode-bf16", mode="inference", kv_len=48, kv_batch=3, **BF16),
    _c("llama", "decode-int8", mode="inference", kv_len=48, kv_batch=2, kv_int8=True, **BF16),
    _c("llama", "decode-int8-fp32", mode="inference", kv_len=40, kv_batch=1, kv_int8=True),
    ("llama-decode-wide-mlp", dataclasses.replace(TINY["llama"], intermediate_size=200),
     Setup(mode="inference", kv_len=60, kv_batch=2)),  # the prefill's peak in the MLP, not in attention
    _c("llama", "full-every", checkpointing="every"),
    _c("gpt", "lora-every-k3", finetune="lora", checkpointing="every-k", checkpoint_every=3),
    _c("gpt", "zero3-w2-sgd", zero_stage=3, world_size=2, optimizer="sgd"),
    _c("gpt", "pp2-gpipe-m4", pp=2, world_size=2, micro_batches=4, schedule="gpipe"),
    _c("gpt", "pp2-1f1b-m4", pp=2, world_size=2, micro_batches=4, schedule="1f1b"),
    _c("gpt", "zero3-w4-mixed", zero_stage=3, world_size=4, **MIXED),
    _c("gpt", "zero2-w4-every", zero_stage=2, world_size=4, checkpointing="every"),
    _c("llama", "zero1-w4-lora", zero_stage=1, world_size=4, finetune="lora"),
    _c("gpt", "tp2-dp2-zero1", tp=2, world_size=4, zero_stage=1),
    _c("gpt", "pp2-dp2-zero1", pp=2, world_size=4, zero_stage=1, micro_batches=2),
]  # fmt: skip
BY_NAME = {name: (shape, setup) for name, shape, setup in CONFIGS}


def unvalidated(shape: ModelShape, setup: Setup) -> list[str]:
    """Why the validation sweep has measured nothing like this mix (empty: every pair of its settings was measured).
    The planner still computes these from the same formulas; the command prints the reasons under its verdict."""
    lora = setup.finetune in ("lora", "qlora")
    reasons = [
        (shape.family == "llama" and (setup.tp > 1 or setup.pp > 1),
         "TP/PP on a Llama-family model: the project's TP and PP are built for the GPT, so it was never measured"),
        (lora and setup.tp > 1, "LoRA/QLoRA with TP: composes (LoRA first), but the adapters' collectives are not "
                                "modelled"),
        (lora and setup.pp > 1, "LoRA/QLoRA with PP: not in the sweep"),
        (setup.pp > 1 and setup.checkpointing != "none", "PP with checkpointing: not in the sweep"),
        (setup.zero_stage == 3 and setup.checkpointing != "none",
         "ZeRO-3 with checkpointing: a replay keeps a whole segment's gathered weights, not modelled"),
        (setup.pp > 1 and setup.zero_stage >= 2,
         "PP with ZeRO-2/3: a tied stage's full embedding gradient until step() is not modelled"),
        (setup.dtype == "float16", "float16: formula only (the sweep measures float32 and bfloat16)"),
        (setup.mode == "inference" and setup.tp > 1, "tensor-parallel decoding: formula only"),
    ]  # fmt: skip
    return [why for hit, why in reasons if hit]
