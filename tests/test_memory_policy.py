"""Checkpointing policies on a pre-LN GPT stack and on transformers' Llama (plus a peft LoRA): gradients bitwise
equal to no checkpointing and to torch / transformers checkpointing, and the saved bytes follow O(L) / O(sqrt L)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_ckpt
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from impl.memory import apply_checkpointing, saved_tensor_bytes
from impl.memory.policy import segment_lengths

WIDTH, HEADS, VOCAB, BATCH, SEQ = 32, 4, 61, 2, 13
POLICIES = [("every", None), ("every_k", 3), ("sqrt", None)]


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2 layout) with attention and residual dropout."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS, dropout: float = 0.1):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.fc_out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        y = (self.drop(att) @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln_2(x)))))


class TinyGPT(nn.Module):
    def __init__(self, n_layer: int, width: int = WIDTH):
        super().__init__()
        self.wte, self.drop = nn.Embedding(VOCAB, width), nn.Dropout(0.1)
        self.blocks = nn.ModuleList(Block(width) for _ in range(n_layer))
        self.ln_f, self.head = nn.LayerNorm(width), nn.Linear(width, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.ln_f(x)).flatten(0, 1), idx.flatten())


def _transformers_checkpointing(model, action: str, *args) -> None:
    """transformers' own checkpointing, `action` "enable" or "disable": activation_checkpointing_* in transformers
    5.24 (which deprecates the old names), only gradient_checkpointing_* in 5.17 (the GPU image)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_{action}")(*args)


def _tiny_llama(n_layer: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=n_layer,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.2,  # dropout active, so the replay must reproduce the masks
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def _gpt_loss(model, idx):
    return model(idx)


def _llama_loss(model, idx):
    return model(input_ids=idx, labels=idx, use_cache=False).loss


def _step(model, idx, loss_fn=_gpt_loss, seed=1):
    """Loss and the gradient of every parameter that requires one (None where it got none)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(model, idx)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


def _assert_bitwise(a, b):
    assert torch.equal(a[0], b[0])
    assert len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


@pytest.fixture
def idx():
    return torch.randint(0, VOCAB, (BATCH, SEQ))


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    return TinyGPT(7).train()


@pytest.mark.parametrize("policy,k", POLICIES, ids=[p for p, _ in POLICIES])
def test_gpt_policies_bitwise_equal_to_plain(gpt, idx, policy, k):
    plain = _step(gpt, idx)
    ours = _step(apply_checkpointing(gpt, policy, k=k), idx)
    _assert_bitwise(ours, plain)
    assert not torch.equal(_step(gpt, idx, seed=2)[1][0], plain[1][0])  # control: other dropout masks differ


def test_gpt_every_equals_torch_checkpoint(gpt, idx):
    plain = _step(gpt, idx)

    def torch_every(model, idx):
        x = model.drop(model.wte(idx))
        for block in model.blocks:
            x = torch_ckpt.checkpoint(block, x, use_reentrant=False)
        return F.cross_entropy(model.head(model.ln_f(x)).flatten(0, 1), idx.flatten())

    theirs = _step(gpt, idx, loss_fn=torch_every)
    _assert_bitwise(theirs, plain)
    _assert_bitwise(_step(apply_checkpointing(gpt, "every"), idx), theirs)


def test_none_removes_the_policy_and_reapplying_replaces_it(gpt, idx):
    apply_checkpointing(gpt, "sqrt")
    apply_checkpointing(gpt, "every")
    with saved_tensor_bytes(exclude=gpt.parameters()) as every:
        gpt(idx)
    apply_checkpointing(gpt, "none")
    assert all("forward" not in vars(block) for block in gpt.blocks)
    with saved_tensor_bytes(exclude=gpt.parameters()) as plain:
        gpt(idx)
    assert plain.bytes > 5 * every.bytes


def test_eval_and_no_grad_are_untouched(gpt, idx):
    gpt.eval()
    with torch.no_grad():
        plain = gpt(idx)
        assert torch.equal(apply_checkpointing(gpt, "sqrt")(idx), plain)


@pytest.mark.parametrize("policy,k", POLICIES, ids=[p for p, _ in POLICIES])
def test_llama_policies_equal_plain_and_transformers_checkpointing(policy, k, idx):
    model = _tiny_llama()
    plain = _step(model, idx, _llama_loss)
    _transformers_checkpointing(model, "enable")  # the reference: transformers' own
    reference = _step(model, idx, _llama_loss)
    _transformers_checkpointing(model, "disable")
    ours = _step(apply_checkpointing(model, policy, k=k), idx, _llama_loss)
    _assert_bitwise(reference, plain)
    _assert_bitwise(ours, plain)
    assert not torch.equal(_step(model, idx, _llama_loss, seed=2)[1][1], plain[1][1])  # control: dropout matters


def test_llama_cache_is_not_written_twice(idx):
    """Left on, use_cache would make the replay append to the KV cache again; the policy turns it off."""
    model = _tiny_llama()
    plain = _step(model, idx, _llama_loss)
    ours = _step(apply_checkpointing(model, "sqrt"), idx, lambda m, i: m(input_ids=i, labels=i).loss)
    _assert_bitwise(ours, plain)


def test_lora_parameters_all_get_gradients(idx):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    model.disable_input_require_grads()  # peft turned it on; the point is to work without it
    assert not model.get_input_embeddings()(idx).requires_grad
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, _ in lora)
    for _, p in lora:  # non-zero B so every LoRA parameter (A included) has a non-zero gradient
        nn.init.normal_(p, std=0.1)
    plain = _step(model, idx, _llama_loss)
    ours = _step(apply_checkpointing(model, "sqrt"), idx, _llama_loss)
    assert all(g is not None and g.abs().sum() > 0 for g in ours[1])
    _assert_bitwise(ours, plain)

    # The pitfall, shown on the reference: reentrant checkpointing with frozen embeddings cuts the graph at each
    # layer input, so no LoRA parameter is reached (here not even the loss needs grad) unless
    # enable_input_require_grads() is on; transformers now turns it on with checkpointing, we turn it off.
    apply_checkpointing(model, "none")
    _transformers_checkpointing(model, "enable", {"use_reentrant": True})
    model.disable_input_require_grads()
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="does not require grad"):
        warnings.simplefilter("ignore")  # torch warns that no input requires grad: that is the pitfall
        _step(model, idx, _llama_loss)
    model.enable_input_require_grads()
    _assert_bitwise(_step(model, idx, _llama_loss), plain)


def _saved(n_layer: int, policy: str) -> int:
    torch.manual_seed(0)
    model = apply_checkpointing(TinyGPT(n_layer).train(), policy) if n_layer else TinyGPT(0).train()
    with saved_tensor_bytes(exclude=model.parameters()) as saved:
        model(torch.randint(0, VOCAB, (BATCH, SEQ)))
    return saved.bytes


def test_saved_bytes_linear_without_checkpointing_and_sqrt_with_it():
    """Above the embedding and head (depth 0), the saved bytes are L blocks' activations with `none`, L block
    inputs with `every`, and round(sqrt L) segment inputs with `sqrt`: checked at depths 4 and 16."""
    hidden = BATCH * SEQ * WIDTH * 4  # one fp32 hidden state
    base = _saved(0, "none")
    per_block = _saved(1, "none") - base
    assert per_block > 10 * hidden
    for n_layer in (4, 16):
        assert _saved(n_layer, "none") - base == n_layer * per_block
        assert _saved(n_layer, "every") - base == n_layer * hidden
        assert _saved(n_layer, "sqrt") - base == round(math.sqrt(n_layer)) * hidden


@given(n_layers=st.integers(1, 200), k=st.integers(1, 200))
def test_segments_cover_the_stack(n_layers, k):
    for policy in ("every", "sqrt"):
        lengths = segment_lengths(n_layers, policy)
        assert sum(lengths) == n_layers and min(lengths) >= 1
    sqrt = segment_lengths(n_layers, "sqrt")
    assert len(sqrt) == max(1, round(math.sqrt(n_layers))) and max(sqrt) - min(sqrt) <= 1
    if k <= n_layers:
        lengths = segment_lengths(n_layers, "every_k", k)
        assert sum(lengths) == n_layers and lengths[:-1] == [k] * (len(lengths) - 1)


def test_finds_blocks_by_path(gpt):
    from impl.memory.policy import find_blocks

    assert find_blocks(gpt) is gpt.blocks
    assert find_blocks(_tiny_llama(2)).__len__() == 2
    assert find_blocks(gpt, "blocks") is gpt.blocks


def test_bad_input(gpt):
    with pytest.raises(ValueError, match=r"policy must be one of \('none', 'every', 'every_k', 'sqrt'\), got 'half'"):
        apply_checkpointing(gpt, "half")
    with pytest.raises(ValueError, match=r"k must be between 1 and the number of layers \(7\), got 8"):
        apply_checkpointing(gpt, "every_k", k=8)
    with pytest.raises(ValueError, match="k must be given with policy='every_k' and only with it, got k=None"):
        apply_checkpointing(gpt, "every_k")
    with pytest.raises(ValueError, match="k must be given .* got k=2 for 'sqrt'"):
        apply_checkpointing(gpt, "sqrt", k=2)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        apply_checkpointing(gpt, "every_k", k=2.0)
    with pytest.raises(ValueError, match="blocks: TinyGPT has no submodule at 'transformer.h'"):
        apply_checkpointing(gpt, "every", blocks="transformer.h")
    with pytest.raises(TypeError, match="blocks: expected an nn.ModuleList at 'ln_f', got LayerNorm"):
        apply_checkpointing(gpt, "every", blocks="ln_f")
    with pytest.raises(ValueError, match=r"blocks: found no nn.ModuleList at any of .* in Linear"):
        apply_checkpointing(nn.Linear(2, 2), "every")
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        apply_checkpointing("gpt", "every")


def test_refuses_to_stack_on_transformers_checkpointing():
    model = _tiny_llama(2)
    _transformers_checkpointing(model, "enable")
    with pytest.raises(ValueError, match="gradient checkpointing is already on"):
        apply_checkpointing(model, "every")


@pytest.mark.parametrize("policy,k", POLICIES, ids=[p for p, _ in POLICIES])
def test_project_gpt_policies_bitwise_equal_to_plain(policy, k, idx):
    from impl.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=5, n_head=HEADS, n_embd=WIDTH, dropout=0.1)
    model = GPT(config).train()

    def loss_fn(m, i):
        return m(i, targets=i)[1]

    with saved_tensor_bytes(exclude=model.parameters()) as plain_saved:
        loss_fn(model, idx)
    plain = _step(model, idx, loss_fn)
    ours = _step(apply_checkpointing(model, policy, k=k), idx, loss_fn)
    _assert_bitwise(ours, plain)
    assert not torch.equal(_step(model, idx, loss_fn, seed=2)[1][0], plain[1][0])  # control: dropout matters
    with saved_tensor_bytes(exclude=model.parameters()) as saved:
        loss_fn(model, idx)
    assert 2 * saved.bytes < plain_saved.bytes
