"""Gradient checkpointing: memory and step time of one training step against depth, per policy.

Two stacks: the project's GPT (impl.gpt: pre-LN, SDPA attention, residual dropout) and transformers' Llama
decoder. Variants: no
checkpointing (the baseline); ours with `every`, `every_k` (k=2) and `sqrt` (round(sqrt L) segments, Chen et al.
2016); `torch.utils.checkpoint` per block and `checkpoint_sequential` with the same segment count (which, unlike
ours, leaves its last segment unchecked); transformers' own checkpointing for Llama.

The measured call is one forward + backward with the gradient buffers already allocated (one step is run first),
so its peak memory is the activations plus backward's transients, the part checkpointing changes. `saved MiB` is
what autograd keeps after the forward (`saved_tensor_bytes`, parameters excluded). On the `sqrt` rows,
`activation cut` (peak without / with checkpointing) and `step time ratio` (interleaved medians) record the issue's
targets: at 32 layers a cut of at least 3x for at most 1.4x the time (one extra forward: 4/3 in theory).

MFU counts model FLOPs (`train_flops`): recomputation is not counted, so MFU drops with checkpointing by what
the extra forward costs, which is the trade the policy makes. Every row's loss and gradients are checked against
the no-checkpointing run of the same model on the same batch and the same dropout masks (the RNG is seeded before
each, and checkpointing replays it): checkpointing must not change the math.
"""

import statistics
import time
import weakref

import pytest
import torch
import torch.utils.checkpoint as torch_ckpt
from torch import nn

from impl.common import MemoryMeter, synchronize
from impl.common.roofline import train_flops
from impl.gpt import GPT, GPTConfig
from impl.memory import apply_checkpointing, checkpoint_sequential, saved_tensor_bytes
from impl.memory.policy import segment_lengths

SWEEPS = {"n_layer": {"smoke": [2, 4], "small": [4, 8, 16, 32], "full": [8, 16, 32, 64]}}
SHAPES = {  # width, heads, batch, seq_len
    "smoke": (32, 4, 2, 32),
    "small": (64, 4, 4, 128),
    "full": (512, 8, 8, 1024),
}
VOCAB = 256
EVERY_K = 2
TIMING_REPEATS = {"smoke": 1, "small": 5, "full": 5}


def _plain(blocks, x):
    for block in blocks:
        x = block(x)
    return x


class _RunBlocks(nn.Module):
    """Stands in for the GPT's block list (`transformer.h`) so that torch's checkpointing, which wants to run the
    blocks itself, runs the GPT's own blocks inside the GPT's own trunk."""

    def __init__(self, blocks: nn.ModuleList, run):
        super().__init__()
        self.blocks, self.run = blocks, run

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(self.blocks, x)


_GPT_BLOCKS: "weakref.WeakKeyDictionary[GPT, nn.ModuleList]" = weakref.WeakKeyDictionary()  # each GPT's own list


def _torch_every(blocks, x):
    for block in blocks:
        x = torch_ckpt.checkpoint(block, x, use_reentrant=False)
    return x


def _torch_sqrt(blocks, x):
    return torch_ckpt.checkpoint_sequential(blocks, len(segment_lengths(len(blocks), "sqrt")), x, use_reentrant=False)


def _ours_sequential_sqrt(blocks, x):
    return checkpoint_sequential(blocks, len(segment_lengths(len(blocks), "sqrt")), x)


def _gpt(n_layer, size, device):
    width, heads, batch, seq = SHAPES[size]
    torch.manual_seed(0)
    config = GPTConfig(block_size=seq, vocab_size=VOCAB, n_layer=n_layer, n_head=heads, n_embd=width, dropout=0.1)
    model = GPT(config).to(device).train()
    _GPT_BLOCKS[model] = model.transformer.h
    idx = torch.randint(0, VOCAB, (batch, seq), device=device)
    return model, lambda: model(idx, targets=idx)[1], batch * seq


def _llama(n_layer, size, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    width, heads, batch, seq = SHAPES[size]
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=n_layer,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=seq,
        attention_dropout=0.1,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).train()
    idx = torch.randint(0, VOCAB, (batch, seq), device=device)
    return model, lambda: model(input_ids=idx, labels=idx, use_cache=False).loss, batch * seq


def _set_variant(model, variant):
    """Put `model` in the checkpointing mode `variant` names."""
    # transformers 5.24 names it activation_checkpointing_*; 5.17 (the GPU image) has only gradient_checkpointing_*.
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        if hasattr(model, name):
            getattr(model, name)()
            break
    if isinstance(model, GPT):
        model.transformer.h = _GPT_BLOCKS[model]  # the GPT's own block list again
    apply_checkpointing(model, "none")
    run = {"torch-every": _torch_every, "torch-sqrt": _torch_sqrt, "ours-sequential-sqrt": _ours_sequential_sqrt}
    if isinstance(model, GPT) and variant in run:
        model.transformer.h = nn.ModuleList([_RunBlocks(model.transformer.h, run[variant])])
    if variant == "transformers-every":
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    elif variant.startswith("ours-") and variant != "ours-sequential-sqrt":
        policy = variant.removeprefix("ours-")
        apply_checkpointing(model, policy, k=EVERY_K if policy == "every_k" else None)


def _step_fn(model, loss_fn, device):
    def step():
        model.zero_grad(set_to_none=False)  # buffers stay allocated: the peak is activations and transients
        loss_fn().backward()
        synchronize(device)

    step()
    return step


def _peak(step, device) -> int:
    with MemoryMeter(device) as mem:
        step()
    return mem.peak


def _targets(model, loss_fn, variant, device, size) -> dict:
    """Peak and time of this variant against no checkpointing, measured here so the row carries the ratio."""
    _set_variant(model, "none")
    plain = _step_fn(model, loss_fn, device)
    plain_peak = _peak(plain, device)
    _set_variant(model, variant)
    ours = _step_fn(model, loss_fn, device)
    ours_peak = _peak(ours, device)
    times = {"none": [], variant: []}
    for _ in range(TIMING_REPEATS[size]):
        for name, step in (("none", plain), (variant, ours)):
            _set_variant(model, name)
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    _set_variant(model, variant)
    return {
        "activation cut": plain_peak / ours_peak,
        "step time ratio": statistics.median(times[variant]) / statistics.median(times["none"]),
    }


def _loss_and_grads(model, loss_fn, variant: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients (parameter order) of one forward+backward in mode `variant`, dropout seeded."""
    _set_variant(model, variant)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss = loss_fn()
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _run(bench, device, size, n_layer, variant, build, stack):
    model, loss_fn, tokens = build(n_layer, size, device)
    expected = _loss_and_grads(model, loss_fn, "none")
    got = _loss_and_grads(model, loss_fn, variant)
    _set_variant(model, variant)
    with saved_tensor_bytes(exclude=model.parameters()) as saved:
        loss_fn()
    metrics = {"saved MiB": saved.bytes / 2**20}
    if variant.endswith("sqrt"):
        metrics.update(_targets(model, loss_fn, variant, device, size))
    step = _step_fn(model, loss_fn, device)
    width, heads, batch, seq = SHAPES[size]
    n_params = sum(p.numel() for p in model.parameters())
    bench(
        step,
        variant=variant,
        params={"stack": stack, "n_layer": n_layer, "width": width, "heads": heads, "batch": batch, "seq_len": seq},
        sweep="n_layer",
        dtype=torch.float32,
        baseline=variant == "none",
        reference=variant in ("torch-sqrt", "transformers-every"),
        tokens=tokens,
        flops=train_flops(n_params, n_layer, width, seq, tokens),  # model FLOPs: the recomputation is not counted
        mfu=True,
        metrics=metrics,
        expected=expected,  # the no-checkpointing run's loss and gradients
        output=lambda: got,
    )


GPT_VARIANTS = ["none", "ours-every", "ours-every_k", "ours-sqrt", "ours-sequential-sqrt", "torch-every", "torch-sqrt"]
LLAMA_VARIANTS = ["none", "ours-every", "ours-sqrt", "transformers-every"]


@pytest.mark.benchmark(group="memory-gpt-train-step")
@pytest.mark.parametrize("variant", GPT_VARIANTS)
def test_gpt_train_step(bench, device, size, n_layer, variant):
    _run(bench, device, size, n_layer, variant, _gpt, "gpt")


@pytest.mark.benchmark(group="memory-llama-train-step")
@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_llama_train_step(bench, device, size, n_layer, variant):
    _run(bench, device, size, n_layer, variant, _llama, "llama")
