"""QLoRA: our Linear4bit against bitsandbytes', training only the adapters, and the bytes of a 4-bit model."""

import pytest
import torch
from torch import nn

from impl.common import MemoryMeter, tensor_bytes, tolerance
from impl.finetune import Linear4bit, LoRALinear, apply_qlora, trainable_parameters
from impl.finetune.nf4 import expected_bits_per_param

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(hidden=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _bnb_linear(linear, compute_dtype, double_quant):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the NF4 reference; it is not installed")
    ref = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    ref.load_state_dict(linear.state_dict())
    ref = ref.to("cpu")  # moving the module is what quantizes its weight
    # train mode: on AVX512-BF16 CPUs bnb's eval path repacks the weight and rounds the constants to bf16
    return ref.train()


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear4bit_matches_bitsandbytes(compute_dtype, double_quant):
    linear = nn.Linear(128, 96)
    x = torch.randn(3, 5, 128)
    ref = _bnb_linear(linear, compute_dtype, double_quant)
    ours = Linear4bit.from_linear(linear, compute_dtype=compute_dtype, double_quant=double_quant)
    assert torch.equal(ours.packed, ref.weight.data.flatten())
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(ours(x), expected, **tolerance(compute_dtype))
        linear.weight[0, 0] += 1.0
        perturbed = Linear4bit.from_linear(linear, compute_dtype=compute_dtype, double_quant=double_quant)
        assert not torch.allclose(perturbed(x), expected, **tolerance(compute_dtype)), "negative control"


def test_linear4bit_input_gradient_matches_dequantized_linear():
    linear = nn.Linear(64, 48)
    ours = Linear4bit.from_linear(linear)
    x = torch.randn(4, 64, requires_grad=True)
    grad_out = torch.randn(4, 48)
    (grad_ours,) = torch.autograd.grad(ours(x), x, grad_out)
    (grad_ref,) = torch.autograd.grad(nn.functional.linear(x, ours.weight.dequantize(), linear.bias), x, grad_out)
    torch.testing.assert_close(grad_ours, grad_ref, **tolerance(torch.float32))


@pytest.mark.slow  # eight training steps of a tiny 4-bit Llama
def test_qlora_finetune_lowers_loss_and_trains_only_adapters():
    model = apply_qlora(_llama(), TARGETS, r=4, alpha=8)
    assert all(isinstance(m.base_layer, Linear4bit) for m in model.modules() if isinstance(m, LoRALinear))
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss.item())
        if len(losses) == 1:
            grads = {n: p.grad for n, p in model.named_parameters()}
        optimizer.step()
    assert losses[-1] < losses[0] - 0.05
    lora = {n for n in grads if "lora_" in n}
    assert lora and all(grads[n] is not None for n in lora), "every adapter receives a gradient"
    assert all(grads[n] is None for n in grads if n not in lora), "nothing else does"
    trainable, total = trainable_parameters(model)
    assert trainable == sum(grads[n].numel() for n in lora) and total > 10 * trainable


def test_measured_bytes_of_nf4_model_match_formula():
    model = _llama(hidden=128)
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    n_quantized = sum(m.weight.numel() for m in linears)
    with MemoryMeter("cpu") as mem:
        apply_qlora(model, ["q_proj"], r=2, alpha=4)
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert sum(m.n_quantized_params for m in quantized) == n_quantized
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    nf4_bytes = sum(tensor_bytes(*m.buffers()) for m in quantized)
    biases = sum(tensor_bytes(m.bias) for m in quantized if m.bias is not None)
    assert mem.current == nf4_bytes + tensor_bytes(*adapters) + biases, "the meter sees exactly these tensors"
    bits = 8 * nf4_bytes / n_quantized
    assert bits == pytest.approx(expected_bits_per_param(64, double_quant=True), rel=0.01)


def test_linear4bit_rejects_bad_input():
    with pytest.raises(TypeError, match=r"w must be a floating-point tensor, got torch.int64"):
        Linear4bit(torch.zeros(4, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weight must be a 2-D \(out_features, in_features\) tensor, got \(64,\)"):
        Linear4bit(torch.randn(64))
    with pytest.raises(ValueError, match=r"x must have last dimension in_features=64, got shape \(2, 32\)"):
        Linear4bit(torch.randn(8, 64))(torch.randn(2, 32))
    with pytest.raises(TypeError, match=r"compute_dtype must be a floating torch.dtype or None, got torch.int8"):
        Linear4bit(torch.randn(8, 64), compute_dtype=torch.int8)


def test_apply_qlora_twice_and_bad_target():
    model = _llama()
    with pytest.raises(ValueError, match="target_modules entry 'qkv' matches no module"):
        apply_qlora(model, ["qkv"], r=2, alpha=4)
    assert not any(isinstance(m, Linear4bit) for m in model.modules()), "a failed call must not quantize anything"
    apply_qlora(model, ["q_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_qlora(model, ["q_proj"], r=2, alpha=4)
    with pytest.raises(TypeError, match="base_layer must hold a floating-point weight, got Linear4bit"):
        model.model.layers[0].self_attn.q_proj.merge()


def test_qlora_model_matches_peft_on_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the NF4 reference; it is not installed")
    peft = pytest.importorskip("peft", reason="peft is the LoRA reference; it is not installed")
    reference = _llama()
    for name, module in list(reference.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
            )
            q.load_state_dict(module.state_dict())
            parent, _, leaf = name.rpartition(".")
            setattr(reference.get_submodule(parent), leaf, q.to("cpu"))
    reference = peft.get_peft_model(reference, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).train()
    ours = apply_qlora(_llama(), TARGETS, r=4, alpha=8, compute_dtype=torch.float32).train()
    g = torch.Generator().manual_seed(2)
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p for n, p in reference.named_parameters()}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                theirs[name].copy_(torch.randn(p.shape, generator=g) * 0.1)
                p.copy_(theirs[name])
    tokens = torch.randint(0, 64, (2, 12), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, reference(tokens).logits, **tolerance(torch.float32))
