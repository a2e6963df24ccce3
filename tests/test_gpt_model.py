"""impl.gpt.GPT against transformers' GPT2LMHeadModel on the same weights: logits both ways, one AdamW step."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from impl.common import assert_close_to_reference_error, tolerance
from impl.gpt import GPT, GPTConfig
from impl.gpt.model import _TRANSPOSED

VOCAB, BLOCK, EMBD, LAYERS, HEADS = 65, 24, 32, 2, 4


def hf_model(**overrides) -> GPT2LMHeadModel:
    config = dict(
        vocab_size=VOCAB,
        n_positions=BLOCK,
        n_embd=EMBD,
        n_layer=LAYERS,
        n_head=HEADS,
        bos_token_id=None,
        eos_token_id=None,
    )
    config.update(overrides)
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(**config))


def tokens(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def our_model() -> GPT:
    torch.manual_seed(3)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=EMBD))
    with torch.no_grad():  # GPT-2 starts biases and LayerNorm at 0/1; move them so a dropped one would show
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("backend", ["sdpa", "naive", "torch"])
@pytest.mark.parametrize("length", [1, 7, BLOCK])
def test_from_hf_logits_match(device, backend, length):
    hf = hf_model().to(device).eval()
    ours = GPT.from_hf(hf, attention_backend=backend).eval()
    x = tokens(3, length).to(device)
    logits, loss = ours(x)
    assert loss is None
    torch.testing.assert_close(logits, hf(x).logits, **tolerance(torch.float32))


def test_to_hf_logits_match(device, our_model):
    ours = our_model.to(device).eval()
    hf = ours.to_hf().eval()
    x = tokens(3, BLOCK).to(device)
    torch.testing.assert_close(hf(x).logits, ours(x)[0], **tolerance(torch.float32))
    assert hf.lm_head.weight is hf.transformer.wte.weight, "to_hf must keep the head tied"


def test_round_trip_keeps_every_weight(our_model):
    back = GPT.from_hf(our_model.to_hf())
    for (name, ours), theirs in zip(our_model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name


def test_conv1d_weights_are_transposed(our_model):
    hf_state = our_model.to_hf().state_dict()
    ours = our_model.transformer.h[0].attn.c_attn.weight  # nn.Linear: (out, in) = (3C, C)
    theirs = hf_state["transformer.h.0.attn.c_attn.weight"]  # Conv1D: (in, out) = (C, 3C)
    assert ours.shape == (3 * EMBD, EMBD) and theirs.shape == (EMBD, 3 * EMBD)
    assert torch.equal(ours.t(), theirs)


def test_perturbed_weight_breaks_the_match(our_model):
    """Negative control: the comparison above can fail."""
    hf = our_model.to_hf().eval()
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.weight[0, 0] += 0.5
    x = tokens(2, BLOCK)
    assert not torch.allclose(hf(x).logits, our_model.eval()(x)[0], **tolerance(torch.float32))


def test_untransposed_copy_breaks_the_match(our_model):
    """Negative control for the transposition: copying Conv1D weights as stored gives different logits."""
    hf = our_model.to_hf().eval()
    naive = GPT(our_model.config).eval()
    hf_state = hf.state_dict()
    with torch.no_grad():
        for name, p in naive.state_dict().items():
            w = hf_state[name]
            # c_proj of attention is square (C, C): copyable as stored, and wrong
            if name.endswith(_TRANSPOSED) and w.shape == p.shape:
                p.copy_(w)
            else:
                p.copy_(w.t() if name.endswith(_TRANSPOSED) else w)
    x = tokens(2, BLOCK)
    assert not torch.allclose(naive(x)[0], hf(x).logits, **tolerance(torch.float32))


def test_one_adamw_step_matches_transformers(device, our_model):
    ours = our_model.to(device).train()
    hf = ours.to_hf().train()
    initial = {name: w.clone() for name, w in hf.state_dict().items()}
    seq = tokens(4, BLOCK).to(device)  # HF shifts labels inside; ours takes inputs and next tokens
    x, y = seq[:, :-1], seq[:, 1:]
    # nanoGPT's shakespeare settings. Adam's first step is lr * g / (|g| + eps): where |g| is near eps, the 1e-9
    # rounding differences between two fp32 backward passes move it by up to lr * 1e-9 / eps, so a larger lr
    # would need a looser tolerance; the gradients themselves are compared tightly below.
    opt_kwargs = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    our_opt = torch.optim.AdamW(ours.parameters(), **opt_kwargs)
    hf_opt = torch.optim.AdamW(hf.parameters(), **opt_kwargs)

    _, our_loss = ours(x, y)
    hf_loss = hf(input_ids=seq, labels=seq).loss
    torch.testing.assert_close(our_loss, hf_loss, **tolerance(torch.float32))
    our_loss.backward()
    hf_loss.backward()
    our_grads = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        grad = our_grads[name].grad
        torch.testing.assert_close(grad.t() if name.endswith(_TRANSPOSED) else grad, p.grad, **tolerance(torch.float32))
    our_opt.step()
    hf_opt.step()

    after = ours.to_hf().state_dict()
    for name, theirs in hf.state_dict().items():
        torch.testing.assert_close(after[name], theirs, **tolerance(torch.float32), msg=lambda m, n=name: f"{n}: {m}")
    # Negative control: the step moved every matrix, so the match is not just the shared starting point.
    for name, start in initial.items():
        if name.endswith("weight") and start.dim() == 2:
            assert not torch.allclose(after[name], start, **tolerance(torch.float32)), name


@pytest.mark.gpu
def test_bf16_autocast_error_within_transformers_own(device, our_model):
    """Training autocasts to bf16 on CUDA: ours must be as close to the fp32 logits as transformers is."""
    ours = our_model.to(device).eval()
    hf = ours.to_hf().eval()
    x = tokens(3, BLOCK).to(device)
    with torch.no_grad():
        truth = ours(x)[0]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ours_bf16, hf_bf16 = ours(x)[0], hf(x).logits
    assert_close_to_reference_error(ours_bf16, hf_bf16, truth, name="bf16 logits")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("n_embd", 30, "n_embd must be divisible by n_head=4, got 30"),
        ("n_layer", 0, "n_layer must be a positive int, got 0"),
        ("dropout", 1.0, r"dropout must be in \[0, 1\), got 1.0"),
        ("attention_backend", "flash", "attention_backend must be one of .* got 'flash'"),
    ],
)
def test_bad_config(field, value, match):
    kwargs = dict(block_size=BLOCK, vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=EMBD)
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_bad_forward_input(our_model):
    with pytest.raises(ValueError, match=f"idx has {BLOCK + 1} positions, more than the model's block_size={BLOCK}"):
        our_model(tokens(1, BLOCK + 1))
    with pytest.raises(TypeError, match="idx must hold token ids as torch.long, got torch.float32"):
        our_model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"idx must have shape \(batch, time\), got shape \(4,\)"):
        our_model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have the shape of idx \(1, 4\), got \(1, 3\)"):
        our_model(tokens(1, 4), tokens(1, 3))


def test_from_hf_rejects_what_it_cannot_represent():
    with pytest.raises(TypeError, match="model must be a transformers GPT2LMHeadModel, got Linear"):
        GPT.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="activation_function must be one of .* got 'relu'"):
        GPT.from_hf(hf_model(activation_function="relu"))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx must be False, got True"):
        GPT.from_hf(hf_model(scale_attn_by_inverse_layer_idx=True))
