"""nanoGPT: forward+backward and one full training step, ours against transformers' GPT2LMHeadModel.

Both models have the same size and the same weights (`GPT.to_hf`), get the same batch of random characters
and the same loss (cross-entropy of every position). A training step is what `python -m impl.gpt.train` does
per iteration: zero the gradients, forward, backward, clip at 1.0, AdamW. Throughput is training tokens
(batch x block) per second; bf16 autocast on CUDA, fp32 on CPU. The `cpu` preset rows record nanoGPT's own
figure on this 2-core machine kind as the target: 2000 iterations, evaluation included, in about 100 s.

MFU counts model FLOPs (`train_flops`, 6·N per token plus attention); forward+backward counts the same, since
the optimizer's few FLOPs per parameter are not model FLOPs. Every row is checked against transformers on the
same weights: the loss and every gradient, in our parameter order (GPT-2's Conv1D weights transposed), of the
benchmark's batch on the initial weights. "(compiled)" rows run the step with `torch.compile` of the model.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from impl.common.roofline import train_flops
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
STEP_VARIANTS = ("ours", "transformers", "ours (compiled)", "transformers (compiled)")
VOCAB = 65
_BASE: dict = {}  # (preset, device) -> (initial GPT, x, y), built once per module


def _base(preset: str, device: torch.device) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    key = (preset, str(device))
    if key not in _BASE:
        shape = SHAPES[preset]
        torch.manual_seed(0)
        config = GPTConfig(block_size=shape["block_size"], vocab_size=VOCAB, n_layer=shape["n_layer"],
                           n_head=shape["n_head"], n_embd=shape["n_embd"])
        g = torch.Generator(device=device).manual_seed(1)
        x, y = (torch.randint(VOCAB, (shape["batch_size"], shape["block_size"]), generator=g, device=device)
                for _ in "xy")
        _BASE[key] = (GPT(config).to(device).train(), x, y)
    return _BASE[key]


def _hf_param_view(hf) -> dict:
    """transformers' parameters by name, each as a function of its gradient into our layout: Conv1D stores its
    weight (in, out), our nn.Linear (out, in)."""
    from transformers.pytorch_utils import Conv1D

    conv = {f"{name}.weight" for name, m in hf.named_modules() if isinstance(m, Conv1D)}
    return {name: (p, name in conv) for name, p in hf.named_parameters()}


def _setup(preset: str, provider: str, device: torch.device):
    """A fresh model of the provider, its loss on the batch, the row's params, tokens per step and model FLOPs."""
    shape = SHAPES[preset]
    base, x, y = _base(preset, device)
    model = copy.deepcopy(base) if provider == "ours" else base.to_hf()

    def loss(module=model):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = module(x)[0] if provider == "ours" else module(input_ids=x).logits
            return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    tokens = shape["batch_size"] * shape["block_size"]
    n = base.num_params()
    flops = train_flops(n, shape["n_layer"], shape["n_embd"], shape["block_size"], tokens)
    params = dict(preset=preset, **shape, params=n)
    return model.train(), loss, params, tokens, flops


def _loss_and_grads(model, loss, provider: str, names: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of one forward+backward, the gradients in our layout and in the order of `names`."""
    model.zero_grad(set_to_none=True)
    value = loss()
    value.backward()
    if provider == "ours":
        named = dict(model.named_parameters())
        grads = [named[n].grad.detach().clone() for n in names]
    else:
        view = _hf_param_view(model)
        grads = [view[n][0].grad.t().clone() if view[n][1] else view[n][0].grad.clone() for n in names]
    model.zero_grad(set_to_none=True)
    return value.detach().float(), grads


def _expected(preset: str, device: torch.device) -> tuple[tuple, list[str]]:
    """transformers' loss and gradients on the initial weights: the reference every row is compared with."""
    names = [n for n, _ in _base(preset, device)[0].named_parameters()]
    ref, loss, *_ = _setup(preset, "transformers", device)
    return _loss_and_grads(ref, loss, "transformers", names), names


def _restored(model, snapshot: dict, run):
    """`run()` on the initial weights: put them back in place first (the step fn has trained the model)."""
    def output():
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.copy_(snapshot[name])
        return run()

    return output


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@pytest.mark.benchmark(group="gpt-forward-backward")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward_backward(bench, device, provider, preset):
    model, loss, params, tokens, flops = _setup(preset, provider, device)
    expected, names = _expected(preset, device)

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
        flops=flops,  # no optimizer: forward+backward is all of a step's model FLOPs
        mfu=True,
        expected=expected,
        output=lambda: _loss_and_grads(model, loss, provider, names),
    )


@pytest.mark.benchmark(group="gpt-train-step")
@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_train_step(bench, device, variant, preset):
    provider = variant.split()[0]
    compiled = variant.endswith("(compiled)")
    model, loss, params, tokens, flops = _setup(preset, provider, device)
    expected, names = _expected(preset, device)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    forward = model
    if compiled:
        forward = torch.compile(model)
        try:  # compile here, outside the timed calls; a failure is a skipped row with the reason
            loss(forward).backward()
        except Exception as err:
            bench.skip(f"torch.compile failed: {type(err).__name__}: {str(err).strip()[:200]}", variant=variant,
                       params=params, dtype=_dtype(device))
        model.zero_grad(set_to_none=True)
    cfg = TrainConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))

    def fn():
        optimizer.zero_grad(set_to_none=True)
        loss(forward).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

    info = bench(
        fn,
        variant=variant,
        params=params,
        dtype=_dtype(device),
        reference=provider == "transformers" and not compiled,
        tokens=tokens,
        flops=flops,
        mfu=True,
        expected=expected,  # the first step's loss and gradients, before clipping, on the initial weights
        output=_restored(model, snapshot, lambda: _loss_and_grads(model, lambda: loss(forward), provider, names)),
    )
    if compiled and device.type == "cpu":  # the CPU meter's dispatch mode ran the compiled model eagerly
        info.update(peak_bytes=None)
        info["metrics"]["peak memory"] = "not measured (compiled code on CPU)"
    median = info.get("quantiles_s", {}).get("p50")  # absent under --benchmark-disable
    if median:
        info["metrics"]["ms/iter"] = 1000 * median
        if provider == "ours" and not compiled and preset in NANOGPT_MS_PER_ITER:
            info["metrics"]["nanoGPT ms/iter (target)"] = NANOGPT_MS_PER_ITER[preset]

