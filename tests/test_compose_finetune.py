"""Fine-tuning composed with the Llama decoder (impl.generation) and with checkpointing (impl.memory).

(a) The project's LoRA (impl.finetune.apply_lora) on our Llama, then cached generation: greedy tokens equal peft's
    LoRA on transformers' LlamaForCausalLM holding the same weights and adapters (left-padded batch, q/v or every
    linear), and equal our model with the LoRA merged into its weights, run without a cache. Negative control:
    with one adapter's B zeroed, or perturbed, the tokens are no longer peft's.
(b) QLoRA (impl.finetune.apply_qlora) on our Llama with activation checkpointing on its blocks
    (impl.memory.apply_checkpointing): the loss and every LoRA gradient are bitwise those of the same QLoRA model
    without checkpointing (fp32, CPU: the replay recomputes the same ops on the same inputs), and the bytes kept
    for backward drop, measured both by impl.common's MemoryMeter (what is still allocated after the forward) and
    by impl.memory's saved_tensor_bytes. Negative controls: a perturbed adapter changes loss and gradients; the
    policy `none` keeps every byte.
"""

import copy

import pytest
import torch
import transformers

from impl.common import MemoryMeter
from impl.finetune import LoRALinear, apply_lora, apply_qlora, merge_lora
from impl.generation import Llama, generate
from impl.memory import apply_checkpointing, saved_tensor_bytes

peft = pytest.importorskip("peft", reason="peft's LoRA on transformers' Llama is the reference")
# peft's get_peft_model asks transformers a deprecated question; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VOCAB, NEW_TOKENS, R, ALPHA = 97, 16, 4, 8
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_llama(seed: int = 0, layers: int = 2) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of lengths 10, 4 and 7, left-padded with token 0 to width 10: (input_ids, attention_mask)."""
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(ids)
    for row, n in enumerate([10, 4, 7]):
        mask[row, 10 - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def hf_name(ours: str) -> str:
    """Our module path -> transformers' (`layers.0.attn.q_proj` -> `model.layers.0.self_attn.q_proj`)."""
    return "model." + ours.replace(".attn.", ".self_attn.")


def lora_pair(targets: list[str], seed: int = 2):
    """(peft model, our Llama) with the same base weights and the same adapters, B random (zero would be a no-op)."""
    hf = hf_llama()
    ours = apply_lora(Llama.from_hf(hf, fused_projections=False), targets, R, ALPHA)
    reference = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets)).eval()
    theirs = dict(reference.base_model.model.named_modules())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
                ref = theirs[hf_name(name)]
                ref.lora_A["default"].weight.copy_(layer.lora_A.weight)
                ref.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return reference, ours


def peft_greedy(model, ids, mask) -> torch.Tensor:
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL_LINEARS], ids=["q-v", "all-linears"])
def test_lora_llama_cached_generation_equals_peft_and_merged(targets):
    reference, ours = lora_pair(targets)
    ids, mask = left_padded()
    expected = peft_greedy(reference, ids, mask)
    got = generate(ours, ids, max_new_tokens=NEW_TOKENS, attention_mask=mask)
    assert torch.equal(got, expected)
    base = generate(Llama.from_hf(hf_llama()), ids, max_new_tokens=NEW_TOKENS, attention_mask=mask)
    assert not torch.equal(base, expected), "the adapters change nothing; the test would prove little"
    merged = merge_lora(copy.deepcopy(ours))
    assert torch.equal(generate(merged, ids, max_new_tokens=NEW_TOKENS, attention_mask=mask, use_cache=False), got)


@pytest.mark.parametrize("change", ["zeroed", "perturbed"])
def test_lora_llama_with_a_changed_adapter_leaves_peft(change):
    """Negative control: one layer's B zeroed (that adapter off) or nudged, the tokens are no longer peft's."""
    reference, ours = lora_pair(["q_proj", "v_proj"])
    ids, mask = left_padded()
    expected = peft_greedy(reference, ids, mask)
    with torch.no_grad():
        b = ours.layers[0].attn.q_proj.lora_B.weight
        b.zero_() if change == "zeroed" else b.add_(0.5)
    assert not torch.equal(generate(ours, ids, max_new_tokens=NEW_TOKENS, attention_mask=mask), expected)


def qlora_llama(seed: int = 3) -> Llama:
    """Our Llama (4 blocks) with every linear but the head in NF4 and LoRA on q/v, B random; training mode."""
    model = apply_qlora(Llama.from_hf(hf_llama(layers=4), fused_projections=False), ["q_proj", "v_proj"], R, ALPHA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
    return model.train()


def loss_grads_and_bytes(model: Llama, tokens: torch.Tensor):
    """Next-token loss, the LoRA gradients by name, and the bytes kept for backward: the meter's allocation
    still alive after the forward (the loss graph's saved tensors), and saved_tensor_bytes' count."""
    params = [p for p in model.parameters() if p.requires_grad]
    with MemoryMeter("cpu") as mem, saved_tensor_bytes(exclude=model.parameters()) as saved:
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    grads = torch.autograd.grad(loss, params)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return loss.detach(), dict(zip(names, grads, strict=True)), mem.current, saved.bytes


@pytest.mark.parametrize("policy", ["every", "sqrt"])
def test_qlora_with_checkpointing_equals_without_and_keeps_fewer_bytes(policy):
    plain = qlora_llama()
    checkpointed = apply_checkpointing(copy.deepcopy(plain), policy)
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(4))
    loss, grads, meter_bytes, saved_bytes = loss_grads_and_bytes(plain, tokens)
    c_loss, c_grads, c_meter_bytes, c_saved_bytes = loss_grads_and_bytes(checkpointed, tokens)
    assert len(grads) == 4 * 2 * 2  # 4 blocks x (q, v) x (A, B): only the adapters train
    assert all(name.split(".")[-2] in ("lora_A", "lora_B") for name in grads)
    assert torch.equal(c_loss, loss)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"{name}: zero gradient, the comparison would prove little"
        assert torch.equal(c_grads[name], grad), name
    assert c_meter_bytes < meter_bytes / 2, (c_meter_bytes, meter_bytes)
    assert c_saved_bytes < saved_bytes / 2, (c_saved_bytes, saved_bytes)


def test_qlora_checkpointing_negative_controls():
    """A nudged adapter changes loss and gradients (the bitwise comparison can fail), and the policy `none`
    keeps every byte (the drop is checkpointing's doing, not the meter's)."""
    plain = qlora_llama()
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(4))
    loss, grads, meter_bytes, saved_bytes = loss_grads_and_bytes(plain, tokens)
    nudged = apply_checkpointing(copy.deepcopy(plain), "every")
    with torch.no_grad():
        nudged.layers[2].attn.v_proj.lora_B.weight[0, 0] += 1e-3
    n_loss, n_grads, _, _ = loss_grads_and_bytes(nudged, tokens)
    assert not torch.equal(n_loss, loss)
    assert not torch.equal(n_grads["layers.0.attn.q_proj.lora_A.weight"], grads["layers.0.attn.q_proj.lora_A.weight"])
    _, _, none_meter, none_saved = loss_grads_and_bytes(apply_checkpointing(copy.deepcopy(plain), "none"), tokens)
    assert (none_meter, none_saved) == (meter_bytes, saved_bytes)
