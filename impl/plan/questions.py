"""The famous "will it fit" questions, answered by the planner and set beside the estimators people use.

Each question is a model, a technique mix and a device count: the planner's per-device total and verdict, the
largest value of one setting that still fits (found by bisection over `plan`), DeepSpeed's ZeRO-2/ZeRO-3
model-states estimate and accelerate's weights-only estimate for the same model (`impl.plan.estimators`).
The question's settings follow the papers that made the question famous: QLoRA's r = 64 adapters on every
linear layer with double quantization and per-layer checkpointing (Dettmers et al. 2023, sec. 4 and appendix B);
mixed-precision Adam under ZeRO-3 (Rajbhandari et al. 2020, sec. 5.3); a bf16 KV cache sharded by Megatron's
tensor parallelism (Pope et al. 2022, sec. 2-3).
"""

from dataclasses import dataclass, replace

from impl.plan.devices import device
from impl.plan.estimators import deepspeed_zero2, deepspeed_zero3, weights_only
from impl.plan.setup import Setup
from impl.plan.shapes import ModelShape, model_shape, tensors
from impl.plan.terms import Plan, plan

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Question:
    name: str  # as the report's table shows it
    model: str  # a KNOWN_MODELS name
    setup: Setup
    device: str  # a name in impl.plan.devices
    devices: int  # how many of them (the world size)
    stretch: str  # the setting whose largest fitting value is reported
    weights_dtype: str  # the dtype accelerate's weights-only estimate is read at


QUESTIONS: tuple[Question, ...] = (
    Question("7B QLoRA on 24 GB", "llama-2-7b",
             Setup(dtype="bfloat16", finetune="qlora", lora_rank=64, lora_targets=ALL_LINEARS, double_quant=True,
                   seq_len=2048, micro_batch=1, checkpointing="every"),
             "RTX-4090-24GB", 1, "seq_len", "int4"),
    Question("13B full fine-tune, ZeRO-3 on 8 x 80 GB", "llama-2-13b",
             Setup(dtype="bfloat16", mixed_precision=True, zero_stage=3, world_size=8, seq_len=4096, micro_batch=1,
                   checkpointing="every"),
             "A100-80GB", 8, "micro_batch", "bfloat16"),
    Question("70B inference, 32k KV cache on 8 x 80 GB", "llama-3-70b",
             Setup(mode="inference", dtype="bfloat16", tp=8, world_size=8, kv_len=32768, kv_batch=1),
             "A100-80GB", 8, "kv_batch", "bfloat16"),
)  # fmt: skip


def param_counts(shape: ModelShape) -> tuple[int, int]:
    """(total parameters, parameters of the largest module), as DeepSpeed counts them for its estimators: shared
    tensors once, and a module's own parameters without its children's (memory.rst, "Discussion")."""
    held = tensors(shape)
    by_module: dict[str, int] = {}
    for t in held:
        module = t.name.rsplit(".", 1)[0]
        by_module[module] = by_module.get(module, 0) + t.numel
    return sum(t.numel for t in held), max(by_module.values())


def largest_fitting(shape: ModelShape, setup: Setup, setting: str, device_bytes: int, limit: int = 2**22) -> int:
    """The largest value of the int `setting` (>= 1) whose plan fits in `device_bytes`, 0 if even 1 does not:
    doubling, then bisection (every term grows with lengths and batches). Capped at `limit`."""

    def fits(value: int) -> bool:
        return plan(shape, replace(setup, **{setting: value})).fits(device_bytes)

    if not fits(1):
        return 0
    low = 1
    while low < limit and fits(min(2 * low, limit)):
        low = min(2 * low, limit)
    high = min(2 * low, limit + 1)  # fits(low) and not fits(high), unless low hit the cap
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def answer(q: Question) -> dict:
    """The planner's answer to one question and the two estimators' figures for the same model and devices."""
    shape, dev = model_shape(q.model), device(q.device)
    p: Plan = plan(shape, q.setup)
    total_params, largest_layer = param_counts(shape)
    weights = weights_only(total_params, q.weights_dtype)
    train = q.setup.mode == "train"
    return {
        "question": q.name,
        "model": shape.name,
        "device": dev.name,
        "device_bytes": dev.bytes,
        "devices": q.devices,
        "params": total_params,
        "largest_layer_params": largest_layer,
        "terms": dict(p.terms),
        "planner_total": p.total,
        "fits": p.fits(dev.bytes),
        "margin": dev.bytes - p.total,
        "stretch": q.stretch,
        "stretch_max": largest_fitting(shape, q.setup, q.stretch, dev.bytes),
        # DeepSpeed's estimators are for Adam training's model states; they say nothing of decoding.
        "deepspeed_zero2": deepspeed_zero2(total_params, q.devices).per_gpu if train else None,
        "deepspeed_zero3": deepspeed_zero3(total_params, largest_layer, q.devices).per_gpu if train else None,
        "weights_only": weights["total"] // q.devices,
        "weights_only_training": weights["training_adam"] // q.devices if train and weights["training_adam"] else None,
    }


def answers() -> list[dict]:
    return [answer(q) for q in QUESTIONS]
