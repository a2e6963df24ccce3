"""The planner's terms against their references, without running a step (that is test_plan_validation.py):

- ZeRO's model states: the paper's 2 + 2 + 12 bytes per parameter split by stage (Rajbhandari et al. 2020,
  sec. 5, Fig. 1), written here from the paper, and DeepSpeed's published estimators (docs of
  `estimate_zero2_model_states_mem_needs` / `estimate_zero3_...`: 4Ψ + 16Ψ/N and 4 L + 18Ψ/N bytes per GPU
  without offload), which add their own buffers on top: the difference is exactly those buffers;
- NF4 storage: bitsandbytes' `quantize_4bit` (live, CPU) for odd sizes, and the paper's 4.127 bits per parameter;
- KV cache: Pope et al. 2022's 2 L B KV S D bytes per element, and the project's `KVCache` (live);
- model shapes: the parameter count of transformers' own model built from the same config on the meta device
  (live, no download), for every known model and for a config dict;
- saved activations: the GPT block formula of tests/test_memory_policy.py (16 + 2 dropout) B T C s + 4 B T s + 4 B H T;
- bad input: a ValueError naming the field, the expected and the received value.
"""

import dataclasses
import json
import math

import pytest
import torch

from impl.distributed import zero_state_bytes
from impl.finetune import nf4_storage_bytes, quantize_nf4
from impl.generation import KVCache
from impl.memory import block_saved_bytes
from impl.plan import KNOWN_MODELS, TERMS, Setup, levers, model_shape, plan
from impl.plan.shapes import tensors

PSI, N = 1 << 20, 8  # parameters divisible by N: no padding, so the paper's formula holds exactly


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_mixed_precision_adam_is_the_papers_2_2_12(stage):
    got = zero_state_bytes([PSI // 2, PSI // 4, PSI // 4], stage=stage, world_size=N, param_bytes=2, master_bytes=4)
    paper = {  # Fig. 1: parameters 2Ψ, gradients 2Ψ, optimizer states K = 12 (fp32 master 4 + m 4 + v 4)
        0: (2 * PSI, 2 * PSI, 4 * PSI, 8 * PSI),
        1: (2 * PSI, 2 * PSI, 4 * PSI // N, 8 * PSI // N),
        2: (2 * PSI, 2 * PSI // N, 4 * PSI // N, 8 * PSI // N),
        3: (2 * PSI // N, 2 * PSI // N, 4 * PSI // N, 8 * PSI // N),
    }[stage]
    assert (got["params"], got["grads"], got["master"], got["optimizer"]) == paper
    assert sum(v for k, v in got.items() if k.startswith("padding_")) == 0
    # control: the fp32 pattern is 4 + 4 + 8 (parameters are their own master)
    fp32 = zero_state_bytes([PSI], stage=stage, world_size=N)
    assert (
        fp32["params"] + fp32["grads"] + fp32["optimizer"]
        == {0: 16, 1: 8 + 8 / N, 2: 4 + 12 / N, 3: 16 / N}[stage] * PSI
        and fp32["master"] == 0
    )


def test_zero_against_deepspeeds_published_estimators():
    """DeepSpeed (no offload): ZeRO-2 4Ψ + 16Ψ/N, ZeRO-3 4·largest_layer + 18Ψ/N. Ours is the paper's 2Ψ + 14Ψ/N
    and 16Ψ/N: DeepSpeed adds the full-size fp16 gradient buffer and an fp32 gradient partition (2Ψ + 2Ψ/N) at
    stage 2, and the gathered largest layer in fp32 plus that partition (4L + 2Ψ/N) at stage 3."""
    largest = PSI // 2
    ours = {s: sum(zero_state_bytes([largest, PSI // 2], stage=s, world_size=N, param_bytes=2, master_bytes=4)[k]
                   for k in ("params", "grads", "master", "optimizer")) for s in (2, 3)}  # fmt: skip
    deepspeed2 = 4 * PSI + int(16 * PSI / N)
    deepspeed3 = 4 * largest + int(18 * PSI / N)
    assert deepspeed2 - ours[2] == 2 * PSI + 2 * PSI // N
    assert deepspeed3 - ours[3] == 4 * largest + 2 * PSI // N


def test_zero_padding_lands_on_the_last_ranks():
    """A tensor of 10 elements over 4 ranks: shards of 3, the last one holding 1 element and 2 of padding."""
    per_rank = [zero_state_bytes([10], stage=3, world_size=4, rank=r) for r in range(4)]
    assert [r["params"] for r in per_rank] == [12] * 4
    assert [r["padding_params"] for r in per_rank] == [0, 0, 0, 8]
    assert sum(r["params"] - r["padding_params"] for r in per_rank) == 40
    stage1 = zero_state_bytes([10], stage=1, world_size=4, rank=0)  # every rank holds the whole padded tensor
    assert (stage1["params"], stage1["padding_params"], stage1["grads"]) == (48, 8, 40)


@pytest.mark.parametrize("numel", [1, 63, 64, 65, 1000 * 37, 64 * 256 + 3])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_equal_bitsandbytes_storage(numel, double_quant):
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the NF4 reference; not installed")

    w = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    parts = [packed, state.absmax] + ([state.state2.absmax, state.offset] if double_quant else [])
    theirs = sum(t.numel() * t.element_size() for t in parts)
    assert nf4_storage_bytes(numel, 64, double_quant) == theirs == quantize_nf4(w, 64, double_quant).nbytes
    assert nf4_storage_bytes(numel, 64, double_quant) != nf4_storage_bytes(numel, 64, not double_quant)  # control


def test_nf4_bits_per_parameter_approach_the_paper():
    n = 64 * 256 * 1000
    assert 8 * nf4_storage_bytes(n, 64, True) / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=1e-6)
    assert 8 * nf4_storage_bytes(n, 64, False) / n == pytest.approx(4.5, rel=1e-9)


@pytest.mark.parametrize("dtype,int8", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_kv_cache_term_is_popes_formula_and_the_project_cache(dtype, int8):
    shape = KNOWN_MODELS["llama-2-70b"]
    setup = Setup(mode="inference", dtype=dtype, kv_len=32768, kv_batch=2, kv_int8=int8, tp=8, world_size=8)
    s = 4 if dtype == "float32" else 2
    per_vector = shape.head_dim + s if int8 else shape.head_dim * s  # int8 codes + one scale per head vector
    formula = 2 * shape.num_layers * 2 * (shape.num_kv_heads // 8) * 32768 * per_vector
    assert plan(shape, setup).terms["kv_cache"] == formula
    torch_dtype = getattr(torch, dtype)
    live = KVCache(layers=3, batch=2, kv_heads=2, max_tokens=5, head_dim=8, dtype=torch_dtype, quantized=int8)
    parts = live.keys + live.values + getattr(live, "key_scales", []) + getattr(live, "value_scales", [])
    assert sum(t.numel() * t.element_size() for t in parts) == 2 * 3 * 2 * 2 * 5 * (8 + s if int8 else 8 * s)


def _transformers_count(shape) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        if shape.family == "gpt":
            config = GPT2Config(vocab_size=shape.vocab_size, n_embd=shape.hidden_size, n_layer=shape.num_layers,
                                n_head=shape.num_heads, n_positions=shape.max_positions)  # fmt: skip
            return GPT2LMHeadModel(config).num_parameters()
        config = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                             intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                             num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                             tie_word_embeddings=shape.tie_embeddings)  # fmt: skip
        return LlamaForCausalLM(config).num_parameters()


PUBLISHED = {"gpt2": 124_439_808, "llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248,
             "mistral-7b": 7_241_732_096, "llama-2-70b": 68_976_648_192}  # fmt: skip


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_known_shapes_have_transformers_parameter_counts(name):
    shape = model_shape(name)
    ours = sum(t.numel for t in tensors(shape))
    assert ours == _transformers_count(shape)
    if name in PUBLISHED:
        assert ours == PUBLISHED[name]
    assert sum(t.numel for t in tensors(shape, tp=1, pp=2, stage=0)) < ours  # control: a stage holds less


def test_config_dict_and_json_path(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2).to_dict()  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    for spec in (config, path, str(path)):
        shape = model_shape(spec)
        assert (shape.num_kv_heads, shape.head_dim, shape.family) == (2, 8, "llama")
        assert sum(t.numel for t in tensors(shape)) == _transformers_count(shape)


def test_gpt_block_saved_bytes_is_the_memory_policy_formula():
    for s, dropout, heads in ((4, False, 4), (2, True, 8)):
        B, T, C = 3, 17, 64
        got = block_saved_bytes("gpt", batch=B, seq=T, hidden=C, heads=heads, kv_heads=heads, head_dim=C // heads,
                                intermediate=4 * C, itemsize=s, dropout=dropout)  # fmt: skip
        assert got == (16 + 2 * dropout) * B * T * C * s + 4 * B * T * s + 4 * B * heads * T
        frozen = block_saved_bytes("gpt", batch=B, seq=T, hidden=C, heads=heads, kv_heads=heads, head_dim=C // heads,
                                   intermediate=4 * C, itemsize=s, dropout=dropout, trainable=False)  # fmt: skip
        assert frozen == got - 6 * B * T * C * s  # control: frozen linears keep no inputs (c_attn, c_fc, c_proj)


def test_plan_adds_up_and_levers_are_differences():
    shape = model_shape("llama-2-7b")
    setup = Setup(dtype="bfloat16", mixed_precision=True, seq_len=2048, checkpointing="none")
    p = plan(shape, setup)
    assert tuple(p.terms) == TERMS and p.total == sum(p.terms.values())
    assert not p.fits(24 * 2**30) and p.fits(p.total)
    found = levers(shape, setup, 24 * 2**30)
    assert [g for _, g in found] == sorted((g for _, g in found), reverse=True) and found
    qlora = plan(shape, dataclasses.replace(setup, finetune="qlora"))
    assert dict(found)["QLoRA"] == p.total - qlora.total
    # 7B in bf16 mixed precision with Adam: 16 bytes per parameter (ZeRO's 2 + 2 + 12), before activations
    states = sum(p.terms[k] for k in ("weights", "gradients", "fp32_master", "optimizer_states"))
    assert states == 16 * PUBLISHED["llama-2-7b"]
    assert math.isclose(p.terms["nf4_codes_scales"], 0)


def test_inference_levers_and_the_prefill_transient():
    shape = model_shape("llama-2-70b")
    setup = Setup(mode="inference", dtype="bfloat16", tp=8, world_size=8, kv_len=32768, kv_batch=4)
    p = plan(shape, setup)
    int8 = plan(shape, dataclasses.replace(setup, kv_int8=True))
    assert dict(levers(shape, setup, 80 * 2**30))["int8 KV cache"] == p.total - int8.total > 0
    assert p.terms["activations_saved"] == p.terms["gradients"] == 0
    # the prompt's prefill, one layer at a time, outweighs a decode step at 32k tokens
    assert p.terms["temporary_peak"] > 4 * 32767 * (shape.intermediate_size // 8) * 2


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: model_shape("gpt5"), r"model must be one of \[.*'gpt2'.*'llama-2-7b'.*\].*got 'gpt5'"),
        (lambda: model_shape({"model_type": "llama", "vocab_size": 10}), r"missing the fields \['hidden_size'"),
        (lambda: model_shape({"model_type": "bert"}), r"model_type must be one of .* got 'bert'"),
        (lambda: plan(model_shape("gpt2"), Setup(tp=5, world_size=5)), r"tp must divide num_heads=12, got 5"),
        (lambda: Setup(zero_stage=4), r"zero_stage must be one of \(0, 1, 2, 3\), got 4"),
        (lambda: Setup(seq_len=0), r"seq_len must be a positive int, got 0"),
        (lambda: Setup(kv_len=-5), r"kv_len must be a positive int, got -5"),
        (lambda: Setup(micro_batch=0), r"micro_batch must be a positive int, got 0"),
        (lambda: Setup(dtype="float32", mixed_precision=True), r"mixed_precision must be False with dtype"),
        (lambda: Setup(world_size=3, tp=2), r"world_size must be a multiple of tp \* pp = 2, got 3"),
        (lambda: Setup(checkpointing="half"), r"checkpointing must be one of .* got 'half'"),
        (lambda: plan(model_shape("gpt2"), Setup(finetune="lora", lora_targets=("q_proj",))), r"match no linear"),
        (lambda: zero_state_bytes([4], stage=5, world_size=2), r"stage must be one of \(0, 1, 2, 3\), got 5"),
        (lambda: nf4_storage_bytes(0), r"numel must be a positive int, got 0"),
    ],
)
def test_bad_input_names_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()
