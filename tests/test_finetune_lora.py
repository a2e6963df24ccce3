"""LoRA against peft on a tiny Llama: same init, same forward, same counts, adapters that load both ways."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from impl.common import tolerance
from impl.finetune import (
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
R, ALPHA = 4, 8


@pytest.fixture
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tokens():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _peft(model, targets=TARGETS, r=R, alpha=ALPHA):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)).eval()


def _randomize_b(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _lora_state(model):
    """LoRA tensors keyed by module path, whichever wrapper (ours or peft's) holds them."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            out[key] = p
    return out


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_init_matches_peft(llama):
    torch.manual_seed(3)
    ref = _lora_state(_peft(copy.deepcopy(llama)))
    torch.manual_seed(3)
    ours = _lora_state(apply_lora(copy.deepcopy(llama), TARGETS, R, ALPHA))
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0)
    assert all((p == 0).all() for k, p in ours.items() if "lora_B" in k)


def test_forward_matches_peft(llama, tokens):
    base = _logits(llama, tokens)
    peft_model = _peft(copy.deepcopy(llama))
    _randomize_b(peft_model)
    ours = apply_lora(copy.deepcopy(llama), TARGETS, R, ALPHA).eval()
    with torch.no_grad():
        for key, p in _lora_state(peft_model).items():
            _lora_state(ours)[key].copy_(p)
    expected = _logits(peft_model, tokens)
    torch.testing.assert_close(_logits(ours, tokens), expected, **tolerance(torch.float32))
    assert not torch.allclose(expected, base, atol=1e-3), "negative control: a non-zero B must change the output"


def test_zero_b_is_the_base_model(llama, tokens):
    ours = apply_lora(copy.deepcopy(llama), TARGETS, R, ALPHA)
    torch.testing.assert_close(_logits(ours, tokens), _logits(llama, tokens), rtol=0, atol=0)


def test_trainable_counts_match_peft(llama):
    peft_model = _peft(copy.deepcopy(llama), targets=["q_proj", "v_proj", "gate_proj"], r=3)
    ours = apply_lora(copy.deepcopy(llama), ["q_proj", "v_proj", "gate_proj"], 3, ALPHA)
    assert trainable_parameters(ours) == peft_model.get_nb_trainable_parameters()
    assert all(("lora_" in n) == p.requires_grad for n, p in ours.named_parameters())


def test_merged_forward_equals_unmerged(llama, tokens):
    ours = apply_lora(copy.deepcopy(llama), TARGETS, R, ALPHA).eval()
    _randomize_b(ours)
    before = _logits(ours, tokens)
    merge_lora(ours)
    assert all(m.merged for m in ours.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(_logits(ours, tokens), before, **tolerance(torch.float32))
    unmerge_lora(ours)
    torch.testing.assert_close(_logits(ours, tokens), before, **tolerance(torch.float32))


@settings(max_examples=25, deadline=None)
@given(
    in_features=st.integers(1, 24),
    out_features=st.integers(1, 24),
    r_fraction=st.floats(0.0, 1.0),
    alpha=st.floats(0.5, 64.0),
    seed=st.integers(0, 2**16),
)
def test_merge_unmerge_restores_weights(in_features, out_features, r_fraction, alpha, seed):
    torch.manual_seed(seed)
    r = 1 + int(r_fraction * (min(in_features, out_features) - 1))
    layer = LoRALinear(nn.Linear(in_features, out_features), r, alpha)
    nn.init.normal_(layer.lora_B.weight)
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, original) or layer.delta_weight().abs().max() == 0
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, **tolerance(torch.float32))


def test_adapter_saved_by_us_loads_in_peft(llama, tokens, tmp_path):
    from peft import PeftModel

    ours = apply_lora(copy.deepcopy(llama), TARGETS, R, ALPHA).eval()
    _randomize_b(ours)
    save_adapter(ours, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model, tokens), _logits(ours, tokens), **tolerance(torch.float32))


def test_adapter_saved_by_peft_loads_in_ours(llama, tokens, tmp_path):
    peft_model = _peft(copy.deepcopy(llama))
    _randomize_b(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(llama), tmp_path).eval()
    expected = _logits(peft_model, tokens)
    torch.testing.assert_close(_logits(ours, tokens), expected, **tolerance(torch.float32))
    assert not torch.allclose(expected, _logits(llama, tokens), atol=1e-3), "negative control"


@pytest.mark.parametrize("r", [0, 17, 2.0], ids=["zero", "above-min", "float"])
def test_bad_rank(llama, r):
    with pytest.raises(ValueError, match=r"r must be an int in \[1, min\(in_features, out_features\)\] = \[1, 16\]"):
        apply_lora(llama, ["k_proj"], r, ALPHA)  # k_proj: 32 -> 16 (2 kv heads x 8)


def test_target_matching_nothing(llama):
    with pytest.raises(ValueError, match=r"target_modules entry 'query' matches no module.*q_proj"):
        apply_lora(llama, ["q_proj", "query"], R, ALPHA)
    assert not any(isinstance(m, LoRALinear) for m in llama.modules()), "a failed call must leave the model as it was"


def test_target_that_is_not_linear(llama):
    with pytest.raises(TypeError, match=r"target module 'model.layers.0.self_attn' must be a linear layer"):
        apply_lora(llama, ["self_attn"], R, ALPHA)


def test_applying_twice(llama):
    apply_lora(llama, TARGETS, R, ALPHA)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(llama, ["gate_proj"], R, ALPHA)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"alpha": 0}, "alpha must be a positive"), ({"dropout": 1.0}, "dropout must be")]
)
def test_bad_alpha_and_dropout(llama, kwargs, message):
    args = {"alpha": ALPHA, "dropout": 0.0} | kwargs
    with pytest.raises(ValueError, match=message):
        apply_lora(llama, TARGETS, R, **args)


def test_merge_twice_and_without_lora(llama):
    layer = LoRALinear(nn.Linear(8, 8), 2, 4)
    layer.merge()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    with pytest.raises(ValueError, match="model has no LoRA layers"):
        merge_lora(llama)


def test_load_adapter_rejects_unsupported_config(llama, tmp_path):
    import json

    ours = apply_lora(copy.deepcopy(llama), TARGETS, R, ALPHA)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_rslora": True}))
    with pytest.raises(ValueError, match=r"load_adapter supports plain LoRA only.*'use_rslora': True"):
        load_adapter(llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match=r"adapter weights do not match the model: missing \[\], unexpected"):
        load_adapter(llama, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in llama.modules()), "a failed load must leave the model as it was"
