"""Fine-tuning memory: full fine-tuning vs LoRA (Hu et al., 2021) vs QLoRA (Dettmers et al., 2023), ours beside
peft (and bitsandbytes for QLoRA), plus NF4 quantize/dequantize throughput against bitsandbytes.

Every training-step row records its memory split the way the papers argue about it: weights (every parameter
and buffer of the model), gradients and AdamW state (measured after a real step with `tensor_bytes`), and
activations (bytes the forward pass leaves alive for the backward, measured with `MemoryMeter`). From those bytes
per parameter (per class: decoder linear layers, everything else, adapters) each row extrapolates the state
(weights + gradients + optimizer) of Llama-2 7B, 13B and 70B shapes with the same recipe: measured, not typed.
"""

import pytest
import torch

from impl.common import MemoryMeter, tensor_bytes
from impl.finetune import apply_lora, apply_qlora, quantize_nf4, trainable_parameters
from impl.finetune.nf4 import expected_bits_per_param

SWEEPS = {
    "numel": {"smoke": [2**12, 2**16], "small": [2**16, 2**18, 2**20, 2**22], "full": [2**20, 2**22, 2**24, 2**26]}
}
MODELS = {  # tiny Llama shapes; linear layers dominate so the weight ratios mean what they do at scale
    "smoke": dict(hidden=64, layers=2, intermediate=172, vocab=128, heads=4, kv_heads=2, batch=2, seq=32),
    "small": dict(hidden=256, layers=4, intermediate=688, vocab=256, heads=4, kv_heads=2, batch=4, seq=128),
    "full": dict(hidden=2048, layers=8, intermediate=5504, vocab=32000, heads=16, kv_heads=16, batch=4, seq=512),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 8, 16
LLAMA2 = {  # (hidden, layers, intermediate, vocab, heads, kv_heads) from the Llama-2 configs
    "7B": (4096, 32, 11008, 32000, 32, 32),
    "13B": (5120, 40, 13824, 32000, 40, 40),
    "70B": (8192, 80, 28672, 32000, 64, 8),
}
VARIANTS = [("full", "torch"), ("lora", "ours"), ("lora", "peft"), ("qlora", "ours"), ("qlora", "peft+bnb")]
GB = 1e9


def _llama(shape: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=shape["seq"],
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype)


def _peft_lora(model):
    peft = pytest.importorskip("peft", reason="peft is the LoRA reference provider; peft is not installed")
    return peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))


def _bnb_quantize(model, compute_dtype, device):
    """Replace the decoder's linear layers with bitsandbytes' Linear4bit (NF4, double quantization)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the NF4 reference; it is not installed")
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.endswith(LINEAR):
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
            q.load_state_dict(module.state_dict())
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, q.to(device))  # moving it quantizes it
    return model


def _model(method: str, provider: str, shape: dict, device, dtype):
    """fp32 (CPU) / bf16 (CUDA) model; QLoRA keeps its frozen unquantized weights in bf16, as the paper does."""
    if method == "full":
        return _llama(shape, device, dtype)
    if method == "lora":
        model = _llama(shape, device, dtype)
        return apply_lora(model, TARGETS, R, ALPHA) if provider == "ours" else _peft_lora(model)
    model = _llama(shape, device, torch.bfloat16)
    if provider == "ours":
        return apply_qlora(model, TARGETS, R, ALPHA, compute_dtype=dtype)
    return _peft_lora(_bnb_quantize(model, dtype, device))


def _class(name: str) -> str:
    """Parameter class for extrapolation: adapter, decoder linear layer, or other (embeddings, norms, head)."""
    if "lora_" in name:
        return "adapter"
    return "linear" if any(f".{layer}." in name for layer in LINEAR) else "other"


def _counts(model) -> dict[str, int]:
    counts = dict.fromkeys(("adapter", "linear", "other"), 0)
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEAR:  # the outermost module of each decoder linear, wrapped or not
            counts["linear"] += m.in_features * m.out_features
    for name, p in model.named_parameters():
        if _class(name) != "linear":
            counts[_class(name)] += p.numel()
    return counts


def _llama2_counts(hidden, layers, intermediate, vocab, heads, kv_heads) -> dict[str, int]:
    kv = hidden // heads * kv_heads
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate)
    adapter = layers * R * ((hidden + hidden) * 2 + (hidden + kv) * 2)  # q, o: h -> h; k, v: h -> kv
    return {"linear": linear, "other": 2 * vocab * hidden + (2 * layers + 1) * hidden, "adapter": adapter}


def _memory_split(model, optimizer, tokens) -> dict[str, dict[str, int]]:
    """One real training step, measured: bytes of weights, grads, optimizer state (per class) and activations."""
    named = dict(model.named_parameters())
    weights = dict.fromkeys(("adapter", "linear", "other"), 0)
    for name, t in [*named.items(), *model.named_buffers()]:
        if t.is_floating_point() or t.dtype == torch.uint8:
            weights[_class(name)] += tensor_bytes(t) if "inv_freq" not in name else 0
    for m in model.modules():  # bitsandbytes keeps the NF4 constants outside parameters and buffers
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            nested = [state.state2.absmax, state.offset] if state.nested else []
            weights["linear"] += tensor_bytes(state.absmax, *nested)
    with MemoryMeter(tokens.device) as mem:
        loss = model(input_ids=tokens, labels=tokens).loss
        activations = mem.live
    loss.backward()
    grads, state = dict.fromkeys(weights, 0), dict.fromkeys(weights, 0)
    for name, p in named.items():
        if p.grad is not None:
            grads[_class(name)] += tensor_bytes(p.grad)
    optimizer.step()
    for name, p in named.items():
        state[_class(name)] += sum(tensor_bytes(v) for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))
    optimizer.zero_grad(set_to_none=True)
    return {"weights": weights, "grads": grads, "optimizer": state, "activations": {"other": activations}}


def _extrapolate(split: dict, counts: dict[str, int]) -> dict[str, float]:
    """Weights + grads + optimizer state of each Llama-2 shape, from the measured bytes per parameter of each class."""
    out = {}
    for size, shape in LLAMA2.items():
        target = _llama2_counts(*shape)
        per_kind = {
            kind: sum(split[kind][c] / counts[c] * target[c] for c in counts if counts[c])
            for kind in ("weights", "grads", "optimizer")
        }
        if size == "7B":  # the familiar "28 GB just for the fp32 weights" figure
            out["7B weights GB"] = per_kind["weights"] / GB
        out[f"{size} state GB"] = sum(per_kind.values()) / GB
    return out


@pytest.mark.benchmark(group="finetune-step")
@pytest.mark.parametrize(("method", "provider"), VARIANTS, ids=[f"{m}-{p}" for m, p in VARIANTS])
def test_training_step(bench, device, size, method, provider):
    shape = MODELS[size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _model(method, provider, shape, device, dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g).to(device)
    split = _memory_split(model, optimizer, tokens)  # also creates the optimizer state: steady-state steps follow
    counts = _counts(model)
    n_params = sum(counts[c] for c in ("linear", "other"))
    trainable, _ = trainable_parameters(model)
    weight_bytes = sum(split["weights"][c] for c in ("linear", "other"))
    metrics = {
        "weights MiB": sum(split["weights"].values()) / 2**20,
        "grads MiB": sum(split["grads"].values()) / 2**20,
        "optimizer MiB": sum(split["optimizer"].values()) / 2**20,
        "activations MiB": split["activations"]["other"] / 2**20,
        "trainable %": 100 * trainable / n_params,
        "base weights vs fp16": weight_bytes / (2 * n_params),
    }
    if method == "qlora":
        metrics["linear bits/param"] = 8 * split["weights"]["linear"] / counts["linear"]
        metrics["vs formula"] = metrics["linear bits/param"] / expected_bits_per_param(64, double_quant=True)
    metrics.update(_extrapolate(split, counts))

    def step():
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    bench(
        step,
        variant=provider,
        params={"method": method, **{k: shape[k] for k in ("hidden", "layers", "batch", "seq")}, "r": R},
        dtype=dtype,
        baseline=False,
        reference=provider in ("peft", "peft+bnb"),
        tokens=shape["batch"] * shape["seq"],
        metrics=metrics,
    )


def _bnb_functional():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the NF4 reference; not installed")


def _weight(numel, device):
    return torch.randn(numel // 1024, 1024, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.benchmark(group="nf4-quantize")
@pytest.mark.parametrize("provider", ["ours", "bitsandbytes"])
def test_nf4_quantize(bench, device, provider, numel):
    w = _weight(numel, device)
    if provider == "ours":
        fn = lambda: quantize_nf4(w, 64, double_quant=True)
    else:
        bnbf = _bnb_functional()
        fn = lambda: bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    bits = quantize_nf4(w, 64, double_quant=True).bits_per_param
    bench(
        fn,
        variant=provider,
        params={"numel": numel},
        sweep="numel",
        dtype=w.dtype,
        reference=provider != "ours",
        items=numel,
        items_unit="params/s",
        metrics={"bits/param": bits},
    )


@pytest.mark.benchmark(group="nf4-dequantize")
@pytest.mark.parametrize("provider", ["ours", "bitsandbytes"])
def test_nf4_dequantize(bench, device, provider, numel):
    w = _weight(numel, device)
    if provider == "ours":
        q = quantize_nf4(w, 64, double_quant=True)
        fn = q.dequantize
    else:
        bnbf = _bnb_functional()
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        fn = lambda: bnbf.dequantize_4bit(packed, state)
    bench(
        fn,
        variant=provider,
        params={"numel": numel},
        sweep="numel",
        dtype=w.dtype,
        reference=provider != "ours",
        items=numel,
        items_unit="params/s",
    )
