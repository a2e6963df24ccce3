"""nanoGPT: forward+backward and one full training step, ours against transformers' GPT2LMHeadModel.

Both models have the same size and the same weights (`GPT.to_hf`), get the same batch of random characters
and the same loss (cross-entropy of every position). A training step is what `python -m impl.gpt.train` does
per iteration: zero the gradients, forward, backward, clip at 1.0, AdamW. Throughput is training tokens
(batch x block) per second; bf16 autocast on CUDA, fp32 on CPU. The `cpu` preset rows record nanoGPT's own
figure on this 2-core machine kind as the target: 2000 iterations, evaluation included, in about 100 s.
"""

import pytest
import torch
import torch.nn.functional as F

from impl.gpt import GPT, GPTConfig
from impl.gpt.train import PRESETS, TrainConfig

# "tiny" keeps CI in seconds; "cpu" and "gpu" are the training presets.
SWEEPS = {"preset": {"smoke": ["tiny"], "small": ["cpu"], "full": ["cpu", "gpu"]}}
SHAPES = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=4),
    **{
        name: {k: PRESETS[name][k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")}
        for name in PRESETS
    },
}
NANOGPT_MS_PER_ITER = {"cpu": 100_000 / 2000}  # karpathy/nanoGPT train.py, laptop flags, 2 cores, evaluation included
PROVIDERS = ("ours", "transformers")
VOCAB = 65


def _setup(preset: str, provider: str, device: torch.device):
    shape = SHAPES[preset]
    torch.manual_seed(0)
    ours = GPT(
        GPTConfig(
            block_size=shape["block_size"],
            vocab_size=VOCAB,
            n_layer=shape["n_layer"],
            n_head=shape["n_head"],
            n_embd=shape["n_embd"],
        )
    ).to(device)
    model = ours if provider == "ours" else ours.to_hf()
    forward = (lambda x: model(x)[0]) if provider == "ours" else (lambda x: model(input_ids=x).logits)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(VOCAB, (shape["batch_size"], shape["block_size"]), generator=g).to(device) for _ in "xy")

    def loss():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return F.cross_entropy(forward(x).flatten(0, 1), y.flatten())

    params = dict(preset=preset, **shape, params=ours.num_params())
    return model.train(), loss, params, shape["batch_size"] * shape["block_size"]


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@pytest.mark.benchmark(group="gpt-forward-backward")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward_backward(bench, device, provider, preset):
    model, loss, params, tokens = _setup(preset, provider, device)

    def fn():
        model.zero_grad(set_to_none=True)
        loss().backward()

    bench(
        fn,
        variant=provider,
        params=params,
        dtype=_dtype(device),
        reference=provider == "transformers",
        tokens=tokens,
    )


@pytest.mark.benchmark(group="gpt-train-step")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(bench, device, provider, preset):
    model, loss, params, tokens = _setup(preset, provider, device)
    cfg = TrainConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))

    def fn():
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

    info = bench(
        fn,
        variant=provider,
        params=params,
        dtype=_dtype(device),
        reference=provider == "transformers",
        tokens=tokens,
    )
    if not info["oom"]:
        info["metrics"]["ms/iter"] = 1000 * tokens / info["throughput"]
        if provider == "ours" and preset in NANOGPT_MS_PER_ITER:
            info["metrics"]["nanoGPT ms/iter (target)"] = NANOGPT_MS_PER_ITER[preset]
