"""Checkpointing policies on the project's GPT (impl.gpt) and on transformers' Llama (plus a peft LoRA): gradients
bitwise equal to no checkpointing and to torch / transformers checkpointing, and the saved bytes equal the
formula derived in `gpt_saved_bytes`: O(L) without checkpointing, O(sqrt L) with `sqrt`."""

import functools
import math
import warnings

import pytest
import torch
import torch.utils.checkpoint as torch_ckpt
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from impl.gpt import GPT, GPTConfig
from impl.memory import apply_checkpointing, saved_tensor_bytes
from impl.memory.policy import segment_lengths

WIDTH, HEADS, VOCAB, BATCH, SEQ = 32, 4, 61, 2, 13
POLICIES = [("every", None), ("every_k", 3), ("sqrt", None)]


def _gpt_model(n_layer: int, dropout: float = 0.1, heads: int = HEADS, dtype=torch.float32) -> GPT:
    """The project's GPT (impl.gpt) at toy size, in training mode; n_layer=0 is the same model with no blocks."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=max(n_layer, 1), n_head=heads, n_embd=WIDTH,
                       dropout=dropout)  # fmt: skip
    model = GPT(config).to(dtype).train()
    if n_layer == 0:
        model.transformer.h = nn.ModuleList()  # the trunk skips absent parts: embed -> final norm -> head
    return model


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
    return model(idx, targets=idx)[1]


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
    return _gpt_model(7)


@pytest.mark.parametrize("policy,k", POLICIES, ids=[p for p, _ in POLICIES])
def test_gpt_policies_bitwise_equal_to_plain(gpt, idx, policy, k):
    plain = _step(gpt, idx)
    ours = _step(apply_checkpointing(gpt, policy, k=k), idx)
    _assert_bitwise(ours, plain)
    assert not torch.equal(_step(gpt, idx, seed=2)[1][0], plain[1][0])  # control: other dropout masks differ


def test_gpt_every_equals_torch_checkpoint(gpt, idx):
    plain = _step(gpt, idx)

    def torch_every(model, idx):
        """The GPT's own forward, each block's call run through torch.utils.checkpoint."""
        for block in model.transformer.h:
            block.forward = functools.partial(torch_ckpt.checkpoint, type(block).forward.__get__(block),
                                              use_reentrant=False)  # fmt: skip
        try:
            return _gpt_loss(model, idx)
        finally:
            for block in model.transformer.h:
                del block.forward

    theirs = _step(gpt, idx, loss_fn=torch_every)
    _assert_bitwise(theirs, plain)
    _assert_bitwise(_step(apply_checkpointing(gpt, "every"), idx), theirs)


def test_none_removes_the_policy_and_reapplying_replaces_it(gpt, idx):
    apply_checkpointing(gpt, "sqrt")
    apply_checkpointing(gpt, "every")
    with saved_tensor_bytes(exclude=gpt.parameters()) as every:
        _gpt_loss(gpt, idx)
    apply_checkpointing(gpt, "none")
    assert all("forward" not in vars(block) for block in gpt.transformer.h)
    with saved_tensor_bytes(exclude=gpt.parameters()) as plain:
        _gpt_loss(gpt, idx)
    assert plain.bytes > 5 * every.bytes


def test_eval_and_no_grad_are_untouched(gpt, idx):
    gpt.eval()
    with torch.no_grad():
        plain = gpt(idx, targets=idx)
        ours = apply_checkpointing(gpt, "sqrt")(idx, targets=idx)
        assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])


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


def gpt_saved_bytes(n_layer: int, policy: str, B: int, T: int, C: int, H: int, itemsize: int, dropout: bool,
                    k: int | None = None) -> int:  # fmt: skip
    """Bytes autograd saves for the blocks of impl.gpt.GPT (attention through SDPA, CPU kernels), parameters
    excluded; storages count once (saved_tensor_bytes). With s = itemsize (4 fp32, 2 bf16) one GPT block keeps:

        ln_1     its input x (B, T, C) s, and mean, rstd (B, T) s each (CPU LayerNorm keeps them in x's dtype)
        c_attn   its input ln_1(x): (B, T, C) s
        sdpa     q, k, v, three views of the one c_attn output (B, T, 3C): 3 (B, T, C) s; the output
                 (B, H, T, D) s = (B, T, C) s; the logsumexp (B, H, T) in float32: 4 B H T
        c_proj   its input: the SDPA output seen as (B, T, C), a view of the same storage: nothing new
        dropout  (p > 0) the scaled mask, (B, T, C) s, after c_proj
        ln_2     its input x + attn (B, T, C) s, and mean, rstd (B, T) s each
        c_fc     its input ln_2(x): (B, T, C) s
        gelu     its input, c_fc's output: 4 (B, T, C) s
        c_proj   its input, gelu's output: 4 (B, T, C) s
        dropout  (p > 0) the scaled mask, (B, T, C) s, after the MLP's c_proj

    so per block (16 + 2 [p > 0]) B T C s + 4 B T s + 4 B H T. The residual adds keep nothing. The block's
    output is the next block's ln_1 input (or ln_f's, which the GPT without blocks keeps too), so a stack of L
    blocks keeps L times that above the model without blocks. A checkpointed segment keeps only its input, one
    (B, T, C) s hidden state: L of them with `every`, ceil(L / k) with `every_k`, round(sqrt L) with `sqrt`.
    """
    hidden = B * T * C * itemsize
    if policy == "none":
        return n_layer * ((16 + 2 * dropout) * hidden + 4 * B * T * itemsize + 4 * B * H * T)
    return len(segment_lengths(n_layer, policy, k)) * hidden


def _saved(model: GPT) -> int:
    idx = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with saved_tensor_bytes(exclude=model.parameters()) as saved:
        _gpt_loss(model, idx)
    return saved.bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.1, 0.0], ids=["dropout", "no-dropout"])
def test_saved_bytes_equal_the_formula_per_policy(dtype, dropout):
    """Measured bytes above the blockless GPT equal `gpt_saved_bytes` exactly: O(L) without checkpointing, L
    hidden states with `every`, ceil(L / k) with `every_k`, round(sqrt L) with `sqrt`, at depths 4 and 16 and
    two head counts (the logsumexp term). Negative controls: the formula without the dropout masks, or with
    another head count, misses the measurement."""
    itemsize = torch.finfo(dtype).bits // 8
    for heads in (HEADS, 2 * HEADS):
        base = _saved(_gpt_model(0, dropout, heads, dtype))
        shape = dict(B=BATCH, T=SEQ, C=WIDTH, H=heads, itemsize=itemsize, dropout=dropout > 0)
        for n_layer in (4, 16):
            model = _gpt_model(n_layer, dropout, heads, dtype)
            for policy, k in [("none", None), *POLICIES]:
                measured = _saved(apply_checkpointing(model, policy, k=k)) - base
                assert measured == gpt_saved_bytes(n_layer, policy, k=k, **shape), (heads, n_layer, policy)
            apply_checkpointing(model, "none")
            plain = _saved(model) - base
            assert plain != gpt_saved_bytes(n_layer, "none", **{**shape, "H": 3 * heads})
            if dropout:
                assert plain != gpt_saved_bytes(n_layer, "none", **{**shape, "dropout": False})


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

    assert find_blocks(gpt) is gpt.transformer.h
    assert find_blocks(_tiny_llama(2)).__len__() == 2
    assert find_blocks(gpt, "transformer.h") is gpt.transformer.h


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
    with pytest.raises(ValueError, match="blocks: GPT has no submodule at 'model.layers'"):
        apply_checkpointing(gpt, "every", blocks="model.layers")
    with pytest.raises(TypeError, match="blocks: expected an nn.ModuleList at 'transformer.ln_f', got LayerNorm"):
        apply_checkpointing(gpt, "every", blocks="transformer.ln_f")
    with pytest.raises(ValueError, match=r"blocks: found no nn.ModuleList at any of .* in Linear"):
        apply_checkpointing(nn.Linear(2, 2), "every")
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        apply_checkpointing("gpt", "every")


def test_refuses_to_stack_on_transformers_checkpointing():
    model = _tiny_llama(2)
    _transformers_checkpointing(model, "enable")
    with pytest.raises(ValueError, match="gradient checkpointing is already on"):
        apply_checkpointing(model, "every")
