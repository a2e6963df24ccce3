"""Techniques composed on one model: what each combination costs next to the same computation without it.

Every row runs the project's own model (`impl.gpt.GPT`, or the Llama decoder of `impl.generation`) with two
techniques at once, and its error column compares the result with the same computation done without the
composition:

- `compose-packing-flash`: one training step of the GPT over packed rows (first-fit-decreasing, restarting
  positions, document mask) with each attention backend: SDPA with the dense boolean (rows, T, T) mask (the
  reference), the naive backend (mask and scores materialized), the tiled FlashAttention in PyTorch (O(T)
  memory, skips the key tiles the document mask empties) and the Triton kernel (CUDA only: on CPU it runs
  through Triton's interpreter, which is no timing). Loss and gradients equal SDPA's.
- `compose-lora-generate`: greedy cached generation with LoRA on every linear of the Llama: adapters unmerged
  (two extra skinny matmuls per linear per token), merged into the weights (`merge_lora`, no extra cost), and
  the plain model; tokens equal the merged model's.
- `compose-qlora-checkpointing`: one QLoRA training step of the GPT (NF4 frozen weights, LoRA on the
  attention and MLP linears) under each activation-checkpointing policy; loss and LoRA gradients equal the
  policy `none`. The memory column shows what checkpointing saves on top of the 4-bit weights.

The parallel combinations (tensor parallel + checkpointing, ZeRO-3 on the GPT, the GPT under torchrun) need
several processes; they are measured in bench_parallel.py, bench_zero.py and bench_train_parallel.py.
"""

import copy
import random

import pytest
import torch

from impl.data import attention_document_ids, pack_documents
from impl.data.packing import IGNORE_INDEX, next_token_labels
from impl.finetune import apply_lora, apply_qlora, merge_lora
from impl.generation import Llama, LlamaConfig, generate
from impl.gpt import GPT, GPTConfig
from impl.memory import apply_checkpointing

ESTIMATED_S = {"smoke": 15, "small": 90, "full": 60}
SWEEPS = {"seq_len": {"smoke": [128], "small": [256, 512, 1024], "full": [1024, 4096]}}
GPT_SHAPE = {"smoke": (2, 2, 64), "small": (4, 4, 128), "full": (12, 12, 768)}  # (layers, heads, width)
ROWS = {"smoke": 2, "small": 4, "full": 8}


def _documents(n_tokens: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """Log-normal document lengths (a long tail, as web text) capped at seq_len, about n_tokens in all."""
    rng = random.Random(seed)
    docs, total = [], 0
    while total < n_tokens:
        n = max(2, min(seq_len, int(rng.lognormvariate(4.0, 1.0))))
        docs.append([rng.randrange(65) for _ in range(n)])
        total += n
    return docs


def _gpt(size: str, seq_len: int, device, backend: str = "sdpa") -> GPT:
    layers, heads, width = GPT_SHAPE[size]
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=seq_len, vocab_size=65, n_layer=layers, n_head=heads, n_embd=width, attention_backend=backend
    )
    return GPT(config).to(device)


def _step_outputs(model, loss_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss of one forward+backward and the gradients of the trainable parameters, in name order."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = [p.grad.detach().clone() for _, p in sorted(model.named_parameters()) if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


BACKENDS = ("sdpa", "naive", "torch", "triton")


@pytest.mark.benchmark(group="compose-packing-flash")
@pytest.mark.parametrize("backend", BACKENDS)
def test_packing_with_flash_attention(bench, device, size, seq_len, backend):
    params = {"seq_len": seq_len}
    if backend == "triton" and device.type != "cuda":
        bench.skip("the Triton kernel runs on CUDA (on CPU only through the interpreter, no timing)",
                   variant=backend, params=params, sweep="seq_len", dtype=torch.float32)  # fmt: skip
    packed = pack_documents(_documents(ROWS[size] * seq_len, seq_len), seq_len, "ffd")
    labels = next_token_labels(packed).to(device)
    ids, pos = packed.input_ids.to(device), packed.position_ids.to(device)
    doc = attention_document_ids(packed.document_ids).to(device)
    # Share of the T x T score square inside the documents' diagonal blocks (half of it is causal-masked too).
    live = sum(int((d == i).sum()) ** 2 for d in doc for i in d.unique()) / (doc.shape[0] * seq_len**2)
    reference = _gpt(size, seq_len, device)
    model = _gpt(size, seq_len, device, backend)

    def loss_fn(m=model):
        return m(ids, labels, position_ids=pos, document_ids=doc)[1]

    def step():
        loss_fn().backward()
        model.zero_grad(set_to_none=True)

    assert int((labels != IGNORE_INDEX).sum()) > 0
    bench(
        step,
        variant=backend,
        params=params,
        sweep="seq_len",
        dtype=torch.float32,
        baseline=backend == "naive",
        reference=backend == "sdpa",
        tokens=int((packed.document_ids >= 0).sum()),
        metrics={"rows": ids.shape[0], "document blocks / T^2": live},
        expected=_step_outputs(reference, lambda: loss_fn(reference)),
        output=lambda: _step_outputs(model, loss_fn),
    )


LLAMA = {  # (layers, hidden, heads, kv heads, prompt, new tokens)
    "smoke": (2, 64, 4, 2, 16, 8),
    "small": (4, 256, 8, 4, 32, 32),
    "full": (16, 2048, 32, 8, 128, 128),
}


def _llama(size: str, device, dtype) -> Llama:
    layers, hidden, heads, kv, prompt, new = LLAMA[size]
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=prompt + new,
    )
    torch.manual_seed(0)
    return Llama(config).to(device=device, dtype=dtype).eval()


@pytest.mark.benchmark(group="compose-lora-generate")
@pytest.mark.parametrize("variant", ["base model", "LoRA unmerged", "LoRA merged"])
def test_lora_then_cached_generation(bench, device, size, variant):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    *_, prompt_len, new = LLAMA[size]
    model = _llama(size, device, dtype)
    if variant != "base model":
        linears = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        apply_lora(model, sorted(linears - {"lm_head"}), r=8, alpha=16)  # every linear of the blocks
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-zero adapters (B starts at zero), so the adapters change the tokens
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g).to(p))
    merged = merge_lora(copy.deepcopy(model)) if variant != "base model" else model
    if variant == "LoRA merged":
        model = merged
    prompt = torch.randint(0, 512, (1, prompt_len), generator=torch.Generator().manual_seed(2)).to(device)

    def run():
        return generate(model, prompt, max_new_tokens=new)

    expected = generate(merged, prompt, max_new_tokens=new) if variant != "base model" else None
    bench(
        run,
        variant=variant,
        params={"prompt": prompt_len, "new tokens": new},
        dtype=dtype,
        baseline=variant == "base model",
        reference=variant == "LoRA merged",
        tokens=new,
        expected=expected,
        tol={"atol": 0, "rtol": 0},  # token ids: equal or not
    )


@pytest.mark.benchmark(group="compose-qlora-checkpointing")
@pytest.mark.parametrize("policy", ["none", "every", "sqrt"])
def test_qlora_with_checkpointing(bench, device, size, policy):
    seq_len = SWEEPS["seq_len"][size][0]
    tokens = torch.randint(0, 65, (ROWS[size], seq_len + 1), generator=torch.Generator().manual_seed(3)).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def qlora_gpt():
        model = _gpt(size, seq_len, device)
        return apply_qlora(model, ("c_attn", "c_proj", "c_fc"), r=8, alpha=16, compute_dtype=torch.float32)

    reference = qlora_gpt()
    model = apply_checkpointing(qlora_gpt(), policy)

    def loss_fn(m=model):
        return m(x, y)[1]

    def step():
        loss_fn().backward()
        model.zero_grad(set_to_none=True)

    bench(
        step,
        variant=policy,
        params={"seq_len": seq_len, "rows": ROWS[size]},
        dtype=torch.float32,
        baseline=policy == "none",
        reference=policy == "none",
        tokens=x.numel(),
        expected=_step_outputs(reference, lambda: loss_fn(reference)),
        output=lambda: _step_outputs(model, loss_fn),
    )
