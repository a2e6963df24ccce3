"""Fine-tuning memory: full fine-tuning vs LoRA (Hu et al., 2021) vs QLoRA (Dettmers et al., 2023), ours beside
peft (and bitsandbytes for QLoRA), plus NF4 quantize/dequantize throughput against bitsandbytes.

Every training-step row records its memory split the way the papers argue about it: weights (every parameter
and buffer of the model), gradients and AdamW state (measured after a real step with `tensor_bytes`), and
activations (bytes the forward pass leaves alive for the backward, measured with `MemoryMeter`). From those bytes
per parameter (per class: decoder linear layers, everything else, adapters) each row extrapolates the state
(weights + gradients + optimizer) of Llama-2 7B, 13B and 70B shapes with the same recipe: measured, not typed.

MFU counts model FLOPs with `train_flops(..., trainable=adapters)`: the frozen base costs 4 per parameter and
token, the adapters 6. Ours is checked against the reference on the benchmark's own batch: LoRA against peft and
QLoRA against peft on bitsandbytes' Linear4bit, with the same non-zero adapters (B = 0 at init would leave A's
gradient zero and the check vacuous): the loss and every adapter gradient of the first step. NF4 rows are checked
against bitsandbytes' dequantized weight, the LoRA linear against peft's layer on the same weights.
"""

import copy
import importlib.util

import pytest
import torch

from impl.common import MemoryMeter, tensor_bytes, tolerance
from impl.common.roofline import gemm_flops, train_flops
from impl.finetune import LoRALinear, apply_lora, apply_qlora, quantize_nf4
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
VARIANTS = [("full", "torch"), ("lora", "ours"), ("lora", "ours (compiled)"), ("lora", "peft"), ("qlora", "ours"),
            ("qlora", "peft+bnb")]
REFERENCE = {"lora": ("peft",), "qlora": ("peft", "bitsandbytes")}  # libraries each method's reference needs
GB = 1e9
_BASE: dict = {}  # (shape, device, dtype) -> the initial Llama, built once per module and copied per row


def _llama(shape: dict, device, dtype):
    key = (tuple(shape.items()), str(device), dtype)
    if key not in _BASE:
        _BASE[key] = _build_llama(shape, device, dtype)
    return copy.deepcopy(_BASE[key])


def _build_llama(shape: dict, device, dtype):
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
    with torch.device(device):  # initialized where it runs: no CPU init of a large model
        return LlamaForCausalLM(config).to(dtype)


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


def _lora_key(name: str) -> str:
    """An adapter's name the same in ours and in peft's wrapper."""
    return name.removeprefix("base_model.model.").replace(".default", "")


def _set_adapters(model, device) -> None:
    """The same non-zero adapters in every provider, drawn in name order from one seed."""
    named = {_lora_key(n): p for n, p in model.named_parameters() if "lora_" in n}
    g = torch.Generator(device=device).manual_seed(2)
    with torch.no_grad():
        for key in sorted(named):
            named[key].copy_(0.02 * torch.randn(named[key].shape, generator=g, device=device))


def _loss_and_grads(model, tokens, forward=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss of one forward+backward and the adapter gradients, in name order."""
    model.zero_grad(set_to_none=True)
    loss = (model if forward is None else forward)(input_ids=tokens, labels=tokens).loss
    loss.backward()
    named = {_lora_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    grads = [named[k].grad.detach().float().clone() for k in sorted(named)]
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


def _reference(method: str, shape: dict, device, dtype, tokens):
    """The reference's loss and adapter gradients, or None where its libraries are missing (ours still runs)."""
    if any(importlib.util.find_spec(lib) is None for lib in REFERENCE[method]):
        return None
    model = _model(method, {"lora": "peft", "qlora": "peft+bnb"}[method], shape, device, dtype).train()
    _set_adapters(model, device)
    return _loss_and_grads(model, tokens)


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
    compiled = provider.endswith("(compiled)")
    row = {"method": method, **{k: shape[k] for k in ("hidden", "layers", "batch", "seq")}, "r": R}
    model = _model(method, provider.split()[0], shape, device, dtype).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g, device=device)
    forward, expected, got = model, None, None
    if compiled:
        forward = torch.compile(model)
        try:  # compile here, outside the timed calls; a failure is a skipped row with the reason
            forward(input_ids=tokens, labels=tokens).loss.backward()
        except Exception as err:
            bench.skip(f"torch.compile failed: {type(err).__name__}: {str(err).strip()[:200]}", variant=provider,
                       params=row, dtype=dtype)
        model.zero_grad(set_to_none=True)
    if method != "full" and provider.startswith("ours"):  # before the first step changes the weights
        _set_adapters(model, device)
        expected = _reference(method, shape, device, dtype, tokens)
        got = _loss_and_grads(model, tokens, forward)
    split = _memory_split(model, optimizer, tokens)  # also creates the optimizer state: steady-state steps follow
    counts = _counts(model)
    n_params = sum(counts[c] for c in ("linear", "other"))
    trainable = n_params if method == "full" else counts["adapter"]
    flops = train_flops(n_params + counts["adapter"], shape["layers"], shape["hidden"], shape["seq"],
                        shape["batch"] * shape["seq"], trainable=trainable)
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
        forward(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    info = bench(
        step,
        variant=provider,
        params=row,
        dtype=dtype,
        baseline=False,
        reference=provider in ("peft", "peft+bnb"),
        tokens=shape["batch"] * shape["seq"],
        flops=flops,
        mfu=True,
        metrics=metrics,
        expected=expected,
        output=lambda: got,  # the first step's loss and adapter gradients, on the initial weights
        # bitsandbytes dequantizes NF4 to the stored weights' dtype (bf16, quant_state.dtype) before its fp32
        # matmul; ours dequantizes straight to the compute dtype. The two differ by bf16 rounding of every
        # weight, so QLoRA is judged by the bf16 row of the table.
        tol=tolerance(torch.bfloat16) if method == "qlora" else None,
    )
    if compiled and device.type == "cpu":  # the CPU meter's dispatch mode ran the compiled model eagerly
        info.update(peak_bytes=None)
        info["metrics"]["peak memory"] = "not measured (compiled code on CPU)"


def _bnb_functional():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the NF4 reference; not installed")


def _weight(numel, device):
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(numel // 1024, 1024, generator=g, device=device)


def _bnb_dequantized(w):
    """bitsandbytes' round trip of `w`, or None where it is not installed (ours still runs)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(*bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))


@pytest.mark.benchmark(group="nf4-quantize")
@pytest.mark.parametrize("provider", ["ours", "bitsandbytes"])
def test_nf4_quantize(bench, device, provider, numel):
    w = _weight(numel, device)
    q = quantize_nf4(w, 64, double_quant=True)
    if provider == "ours":
        fn = lambda: quantize_nf4(w, 64, double_quant=True)
        expected, output = _bnb_dequantized(w), lambda: fn().dequantize()  # the codes, checked by their values
    else:
        bnbf = _bnb_functional()
        fn = lambda: bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        expected, output = None, None
    bench(
        fn,
        variant=provider,
        params={"numel": numel},
        sweep="numel",
        dtype=w.dtype,
        reference=provider != "ours",
        bytes=tensor_bytes(w) + q.nbytes,  # the weight read, the codes and constants written
        items=numel,
        items_unit="params/s",
        metrics={"bits/param": q.bits_per_param},
        expected=expected,
        output=output,
        flush_l2=True,
    )


@pytest.mark.benchmark(group="nf4-dequantize")
@pytest.mark.parametrize("provider", ["ours", "bitsandbytes"])
def test_nf4_dequantize(bench, device, provider, numel):
    w = _weight(numel, device)
    q = quantize_nf4(w, 64, double_quant=True)
    if provider == "ours":
        fn, expected = q.dequantize, _bnb_dequantized(w)  # bit-exact with bitsandbytes (tests/test_finetune_nf4.py)
    else:
        bnbf = _bnb_functional()
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        fn, expected = (lambda: bnbf.dequantize_4bit(packed, state)), None
    bench(
        fn,
        variant=provider,
        params={"numel": numel},
        sweep="numel",
        dtype=w.dtype,
        reference=provider != "ours",
        bytes=q.nbytes + tensor_bytes(w),  # the codes and constants read, the weight written
        items=numel,
        items_unit="params/s",
        expected=expected,
        flush_l2=True,
    )


@pytest.mark.benchmark(group="lora-linear")
@pytest.mark.parametrize("provider", ["ours", "peft"])
def test_lora_linear(bench, device, size, provider):
    """One adapted projection, forward: x W^T + (alpha / r) (x A^T) B^T, at the model's width and batch."""
    shape = MODELS[size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, m = shape["hidden"], shape["batch"] * shape["seq"]
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.nn.Linear(n, n, bias=False, device=device, dtype=dtype)
    x = torch.randn(m, n, generator=g, device=device, dtype=dtype)
    ours = LoRALinear(copy.deepcopy(base), R, ALPHA)
    with torch.no_grad():  # non-zero B: with B = 0 the adapter would add nothing and the check prove nothing
        ours.lora_A.weight.copy_(0.02 * torch.randn(ours.lora_A.weight.shape, generator=g, device=device))
        ours.lora_B.weight.copy_(0.02 * torch.randn(ours.lora_B.weight.shape, generator=g, device=device))
    expected = None
    if importlib.util.find_spec("peft") is not None:
        peft = importlib.import_module("peft")
        wrapper = peft.get_peft_model(torch.nn.Sequential(copy.deepcopy(base)),
                                      peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], lora_dropout=0.0))
        theirs = wrapper.base_model.model[0]
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
            expected = theirs(x)
    elif provider == "peft":
        pytest.importorskip("peft", reason="peft is the LoRA reference provider; peft is not installed")
    layer = ours if provider == "ours" else theirs
    flops = gemm_flops(m, n, n) + gemm_flops(m, R, n) + gemm_flops(m, n, R)
    weights = tensor_bytes(base.weight, ours.lora_A.weight, ours.lora_B.weight)
    with torch.no_grad():
        bench(
            lambda: layer(x),
            variant=provider,
            params={"hidden": n, "tokens": m, "r": R},
            dtype=dtype,
            reference=provider == "peft",
            flops=flops,
            bytes=2 * tensor_bytes(x) + weights,  # x read, the output written (same shape), every weight read
            tokens=m,
            expected=expected,
            flush_l2=True,
        )
