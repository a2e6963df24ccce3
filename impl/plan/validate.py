"""Measuring what the planner predicts: small configurations run for one real step, every term read off the live
tensors, so each formula of `impl.plan.plan` is checked against the project's own techniques.

A training configuration builds the project's GPT (`impl.gpt.GPT`) or Llama (`impl.generation.Llama`, separate
projections) from the tiny shape, applies its techniques (tensor parallelism, pipeline stage, LoRA / QLoRA,
checkpointing), wraps it in `impl.distributed.Zero` (any stage, any optimizer; pure bf16 without master weights
runs torch's optimizer directly, as `Zero` keeps fp32 trainables) and takes one warm-up step, after which the
model states exist as they do in a training loop that keeps its gradients (gradient accumulation). Then:

- model states: `Zero.memory_breakdown()` (parameters, gradients, master, optimizer: padding included), the
  frozen base's and the NF4 buffers' bytes, and the KV cache's tensors: exact bytes;
- activations: the most bytes autograd keeps for backward at once during the step (saved-tensor hooks; storages
  once; parameters and buffers left out), so the pipeline's micro-batches in flight are in it;
- peak: the model states plus `MemoryMeter`'s peak over the measured step (forward, backward, optimizer step;
  exact tensor accounting on CPU, the CUDA allocator's own figure on a GPU).

A decoding configuration prefills a static cache with a (kv_len - 1)-token prompt, then decodes the last slot;
its transient is the larger of the two.
Multi-rank configurations run on gloo: `measure_all` starts one group of 2 ranks for everything of world size 1
and 2 (world-1 configurations spread over the two ranks, each on its own one-rank group) and one of 4.
"""

import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F

from impl.common.memory import MemoryMeter
from impl.plan.configs import BY_NAME, CONFIGS, DIMENSIONS, TINY, all_pairs, supported
from impl.plan.setup import Setup
from impl.plan.shapes import ModelShape
from impl.plan.terms import DEFAULT_TARGETS

__all__ = ["CONFIGS", "DIMENSIONS", "TINY", "all_pairs", "compare", "measure", "measure_all", "relative_error",
           "supported"]  # fmt: skip

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_POLICY = {"every": "every", "every-k": "every_k", "sqrt": "sqrt"}


def build(shape: ModelShape, setup: Setup) -> torch.nn.Module:
    """The project's model of `shape`'s family at that shape, seeded; fp32 when `Zero` makes the bf16 copies."""
    from impl.generation import Llama, LlamaConfig
    from impl.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    if shape.family == "gpt":
        dropout = 0.1 if setup.dropout else 0.0
        model = GPT(GPTConfig(block_size=shape.max_positions, vocab_size=shape.vocab_size, n_layer=shape.num_layers,
                              n_head=shape.num_heads, n_embd=shape.hidden_size, dropout=dropout))  # fmt: skip
    else:
        model = Llama(LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                                  num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                                  num_key_value_heads=shape.num_kv_heads, intermediate_size=shape.intermediate_size,
                                  max_position_embeddings=shape.max_positions, fused_projections=False))  # fmt: skip
    keep_fp32 = setup.mode == "train" and setup.finetune == "full" and (setup.mixed_precision or setup.itemsize == 4)
    return model.train() if keep_fp32 else model.to(_TORCH[setup.dtype]).train()


class _SavedPeak:
    """The most bytes autograd keeps at once: each saved storage counts from its first save until it is freed."""

    def __init__(self, exclude):
        self.skip = {t.untyped_storage()._cdata for t in exclude}
        self.live, self.current, self.peak = {}, 0, 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.device.type == "cpu":
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self.skip and key not in self.live:
                self.live[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
                self.current += storage.nbytes()
                self.live[key] = (self.live[key], storage.nbytes())
                self.peak = max(self.peak, self.current)
        return t

    def _free(self, key) -> None:
        _, nbytes = self.live.pop(key, (None, 0))
        self.current -= nbytes


def _storages_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _data(shape: ModelShape, setup: Setup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    batch = setup.micro_batch * (setup.micro_batches if setup.pp > 1 else 1)
    idx = torch.randint(0, shape.vocab_size, (batch, setup.seq_len), generator=g)
    targets = torch.randint(0, shape.vocab_size, (batch, setup.seq_len), generator=g)
    documents = (torch.arange(setup.seq_len) >= setup.seq_len // 3).long().expand(batch, -1) if setup.packing else None
    return idx, targets, documents


def _prepare(shape: ModelShape, setup: Setup, groups: dict) -> tuple[torch.nn.Module, int]:
    """The model with the setup's techniques applied, and this rank's pipeline stage."""
    from impl.distributed import split_gpt, tensor_parallelize
    from impl.finetune import apply_lora, apply_qlora
    from impl.memory import apply_checkpointing

    model, stage = build(shape, setup), 0
    if setup.tp > 1:
        tensor_parallelize(model, groups["tp"])
    if setup.pp > 1:
        stage = dist.get_rank(groups["pp"])
        model = split_gpt(model, setup.pp)[stage]
    targets, r = list(setup.lora_targets or DEFAULT_TARGETS[shape.family]), setup.lora_rank
    if setup.finetune == "lora":
        apply_lora(model, targets, r=r, alpha=2 * r)
    elif setup.finetune == "qlora":
        apply_qlora(model, targets, r=r, alpha=2 * r, compute_dtype=_TORCH[setup.dtype],
                    blocksize=setup.nf4_block_size, double_quant=setup.double_quant)  # fmt: skip
    if setup.checkpointing != "none":
        k = setup.checkpoint_every if setup.checkpointing == "every-k" else None
        apply_checkpointing(model, _POLICY[setup.checkpointing], k=k)
    return model, stage


def _train(shape: ModelShape, setup: Setup, groups: dict) -> dict[str, int]:
    from impl.distributed import PipelineSchedule, Zero
    from impl.finetune import Linear4bit

    model, stage = _prepare(shape, setup, groups)
    optimizer_cls = torch.optim.AdamW if setup.optimizer == "adamw" else torch.optim.SGD
    if setup.optimizer == "adamw-8bit":
        import bitsandbytes

        optimizer_cls = bitsandbytes.optim.AdamW8bit
    kwargs = {"lr": 1e-3, **({"momentum": 0.9} if setup.optimizer == "sgd-momentum" else {})}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if setup.finetune == "full" and setup.itemsize == 2 and not setup.mixed_precision:
        run = model  # pure 16-bit training: torch's optimizer on the bf16 parameters, no master copy
        optimizer = optimizer_cls(trainable, **kwargs)
    else:
        run = Zero(model, optimizer_cls, stage=setup.zero_stage, process_group=groups["dp"],
                   mixed_precision=setup.mixed_precision, **kwargs)  # fmt: skip
        optimizer = run
    idx, targets, documents = _data(shape, setup)
    schedule = None
    if setup.pp > 1:
        from impl.gpt import cross_entropy

        schedule = PipelineSchedule(model, groups["pp"], setup.schedule, setup.micro_batches, loss_fn=cross_entropy)

    def step() -> None:
        if schedule is not None:
            schedule.step(idx, targets)
        elif shape.family == "gpt":
            run(idx, targets, document_ids=documents)[1].backward()
        else:
            F.cross_entropy(run(idx).flatten(0, 1).float(), targets.flatten()).backward()
        optimizer.step()

    step()  # warm-up: gradients and optimizer state now exist, as in a loop that keeps its gradients
    inner = optimizer if run is model else run.optimizer
    state = _storages_bytes(t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    if run is model:
        held = {"params": _storages_bytes(trainable), "grads": _storages_bytes(p.grad for p in trainable), "master": 0}
    else:
        held = run.memory_breakdown()  # its optimizer figure sums state tensors; 8-bit AdamW shares its code maps
    held["optimizer"] = state
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    out = {
        "weights" if setup.finetune == "full" else "lora_weights": held["params"],
        "gradients": held["grads"],
        "fp32_master": held["master"],
        "optimizer_states": held["optimizer"],
    }
    if setup.finetune != "full":
        out["weights"] = _storages_bytes(p for p in model.parameters() if not p.requires_grad)
        out["nf4_codes_scales"] = _storages_bytes(
            t for m in quantized for t in (m.packed, m.absmax, m.absmax_scale, m.absmax_offset)
        )
    saved = _SavedPeak([*model.parameters(), *model.buffers()])
    with MemoryMeter("cpu") as meter, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        step()
    out["activations_saved"] = saved.peak
    out["dynamic_peak"] = meter.peak
    out["peak"] = sum(v for k, v in out.items() if k not in ("activations_saved", "dynamic_peak")) + meter.peak
    out["stage"] = stage
    return out


def _decode(shape: ModelShape, setup: Setup) -> dict[str, int]:
    from impl.generation import KVCache

    model, dtype = build(shape, setup).eval(), _TORCH[setup.dtype]
    cache = KVCache(layers=shape.num_layers, batch=setup.kv_batch, kv_heads=shape.num_kv_heads,
                    max_tokens=setup.kv_len, head_dim=shape.head_dim, dtype=dtype, quantized=setup.kv_int8)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, shape.vocab_size, (setup.kv_batch, setup.kv_len), generator=g)
    with torch.no_grad():
        with MemoryMeter("cpu") as prefill:  # as generate() prefills: the last position's logits only
            model(prompt[:, :-1], cache=cache, last_only=True)
        with MemoryMeter("cpu") as meter:
            model(prompt[:, -1:], cache=cache, start=setup.kv_len - 1)
    parts = [*cache.keys, *cache.values, *getattr(cache, "key_scales", []), *getattr(cache, "value_scales", [])]
    out = {"weights": _storages_bytes(model.parameters()), "kv_cache": _storages_bytes(parts)}
    out["dynamic_peak"] = max(prefill.peak, meter.peak)
    out["peak"] = out["weights"] + out["kv_cache"] + out["dynamic_peak"]
    out["stage"] = 0
    return out


def _groups(world: int) -> dict:
    """Collective: every group a configuration of this world may need, created once in the same order."""
    from impl.distributed import tp_groups

    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(world)]
    groups = {"single": singles[rank], "world": dist.group.WORLD}
    if world == 4:
        pairs = tp_groups(2)  # consecutive pairs (tensor or pipeline stages) and the data-parallel pairs across
        groups["pair"], groups["across"] = pairs.tp_group, pairs.dp_group
    return groups


def _for(setup: Setup, world: int, groups: dict) -> dict:
    """This rank's data-parallel, tensor and pipeline groups for a configuration of `setup.world_size` ranks."""
    if setup.world_size == 1:
        return {"dp": groups["single"]}
    inner = setup.tp * setup.pp
    if inner == 1:
        return {"dp": groups["world"]}
    if setup.world_size == inner:
        return {"dp": groups["single"], "tp": groups["world"], "pp": groups["world"]}
    return {"dp": groups["across"], "tp": groups["pair"], "pp": groups["pair"]}


def _run_world(rank: int, world: int, names: list[str]) -> dict[str, dict[str, int]]:
    """Body of one rank: the configurations of this world size on all ranks, world-1 ones spread over the ranks."""
    torch.set_num_threads(1)
    groups = _groups(world)
    results = {}
    solo = [n for n in names if BY_NAME[n][1].world_size == 1]
    for name in [n for n in names if BY_NAME[n][1].world_size > 1] + solo[rank::world]:
        shape, setup = BY_NAME[name]
        run = _decode if setup.mode == "inference" else _train
        out = run(shape, setup) if setup.mode == "inference" else run(shape, setup, _for(setup, world, groups))
        dp_rank = rank // (setup.tp * setup.pp) if setup.world_size > 1 else 0
        results[name] = {**out, "dp_rank": dp_rank, "global_rank": rank}
    return results


def _world_of(setup: Setup) -> int:
    return 4 if setup.world_size == 4 else 2


def measure_all(names: list[str] | None = None, timeout_s: float = 120.0) -> dict[str, dict[str, int]]:
    """Measure the named configurations (default: all of CONFIGS): one group of 2 ranks for world sizes 1 and 2,
    one of 4 for world size 4. For each, the measurement of the last data-parallel rank (where ZeRO's padding
    sits) on the pipeline stage the planner reports (its largest), with `dp_rank` and `stage` to plan it."""
    from impl.distributed import spawn
    from impl.plan.terms import plan

    names = list(BY_NAME) if names is None else list(names)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"names must be configurations of CONFIGS, got {unknown}")
    chosen = {}
    for world in (2, 4):
        batch = [n for n in names if _world_of(BY_NAME[n][1]) == world]
        if not batch:
            continue
        per_rank = spawn(_run_world, world, batch, timeout_s=timeout_s, join_timeout_s=10 * timeout_s)
        for name in batch:
            shape, setup = BY_NAME[name]
            stage, dp = plan(shape, setup).stage, setup.dp
            want = (dp - 1) * setup.tp * setup.pp + stage if setup.world_size > 1 else None
            found = [r[name] for r in per_rank if name in r and (want is None or r[name]["global_rank"] == want)]
            chosen[name] = found[0]
    return chosen


def measure(name: str) -> dict[str, int]:
    """Measure one configuration of CONFIGS (see `measure_all`)."""
    return measure_all([name])[name]


_PADDING = {"weights": "padding_params", "lora_weights": "padding_params", "gradients": "padding_grads",
            "fp32_master": "padding_master", "optimizer_states": "padding_optimizer"}  # fmt: skip
STATE_CHECKS = ("weights", "nf4_codes_scales", "lora_weights", "gradients", "fp32_master", "optimizer_states",
                "kv_cache")  # fmt: skip


def compare(name: str, measured: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(predicted, measured) bytes per checked quantity of configuration `name`: each model state as the device
    holds it (ZeRO's padding on this rank included, as `memory_breakdown` counts it), `activations` (kept for
    backward, micro-batches in flight included), `dynamic` (everything above the model states) and `peak`."""
    from impl.plan.terms import MODEL_STATES, plan

    shape, setup = BY_NAME[name]
    p = plan(shape, setup, stage=measured["stage"], rank=measured["dp_rank"])
    out = {}
    for key in STATE_CHECKS:
        if key in measured:
            out[key] = (p.terms[key] + p.details.get(_PADDING.get(key, ""), 0), measured[key])
    states = sum(p.terms[k] for k in MODEL_STATES)
    if setup.mode == "train":
        out["activations"] = (
            p.terms["activations_saved"] + p.terms["pipeline_in_flight"],
            measured["activations_saved"],
        )
    out["dynamic"] = (p.total - states, measured["dynamic_peak"])
    out["peak"] = (p.total, measured["peak"])
    return out


def relative_error(predicted: int, measured: int) -> float:
    """(predicted - measured) / measured; 0 when both are 0."""
    return 0.0 if predicted == measured else (predicted - measured) / measured if measured else float("inf")
