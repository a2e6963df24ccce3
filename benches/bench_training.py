"""Training: what crash safety and determinism cost.

- checkpoint-save / checkpoint-load: our atomic, verified checkpoint (safetensors + sha256 manifest, fsync,
  rename, keep-last pruning; on load every hash is checked first) against `torch.save`/`torch.load` of the same
  model + AdamW state, and plain `safetensors.save_file` of the weights (no optimizer, no fsync, no hash), swept
  over model size. Metrics: bytes on disk and bytes per parameter (fp32 weights + Adam's two moments is 12).
  Error columns (exact, tolerance 0): a save row reads its file back with the matching loader, a load row loads
  into a model and optimizer that were zeroed after saving; both compare the last layer's weight and its Adam
  first moment (the weights alone for the weights-only file) with the tensors saved. The model is built once per
  width for the module; the largest full width is 2048 (16.8M parameters, 200 MB fsync'd per save).
- deterministic-step: one optimizer step of a small transformer with and without
  `torch.use_deterministic_algorithms(True)` (via `set_deterministic`); MFU from `train_flops`.
"""

import functools
import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from impl.common.roofline import train_flops
from impl.training import Trainer, load_checkpoint, save_checkpoint, set_deterministic

DEPTH = 4
SWEEPS = {
    "width": {"smoke": [64, 128], "small": [256, 512, 1024, 2048], "full": [512, 1024, 2048]},
    "d_model": {"smoke": [32], "small": [64, 256], "full": [256, 1024]},
}
SAVERS = ("ours", "torch.save", "safetensors-weights")
EXACT = {"atol": 0.0, "rtol": 0.0}  # a checkpoint holds the bits it was given


@functools.cache
def _trained_mlp(width: int, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """DEPTH linear layers of width x width after one AdamW step, so the optimizer state exists; built once per
    width and device (cached: the load rows zero it and load it back)."""
    model = _mlp(width, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width, device=device)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def _mlp(width: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs, not on the CPU and copied
        return nn.Sequential(*[nn.Linear(width, width) for _ in range(DEPTH)])


def _probe(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[torch.Tensor, ...]:
    """The tensors a row checks: the last layer's weight and, with an optimizer, its Adam first moment."""
    weight = model[-1].weight
    if optimizer is None:
        return (weight.detach().clone(),)
    return weight.detach().clone(), optimizer.state[weight]["exp_avg"].clone()


def _read_back(provider: str, path, width: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """What a save row's file holds, read with the loader that matches the saver."""
    from safetensors.torch import load_file

    if provider == "safetensors-weights":
        return (load_file(path, device=str(device))[f"{DEPTH - 1}.weight"],)
    model = _mlp(width, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if provider == "ours":
        load_checkpoint(path, model=model, optimizer=optimizer, restore_rng=False)
    else:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    return _probe(model, optimizer)


def _disk_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.benchmark(group="checkpoint-save")
@pytest.mark.parametrize("provider", SAVERS)
def test_checkpoint_save(bench, device, tmp_path, provider, width):
    from safetensors.torch import save_file

    model, optimizer = _trained_mlp(width, device)
    steps, saved = itertools.count(), [None]
    target = {"ours": tmp_path / "ckpt", "torch.save": tmp_path / "ckpt.pt", "safetensors-weights": tmp_path / "w.st"}
    fns = {
        "ours": lambda: saved.append(save_checkpoint(target["ours"], next(steps), model=model, optimizer=optimizer,
                                                     keep_last=1)),
        "torch.save": lambda: torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                                         target["torch.save"]),
        "safetensors-weights": lambda: save_file(model.state_dict(), target["safetensors-weights"]),
    }  # fmt: skip
    fns[provider]()
    nbytes = _disk_bytes(target[provider])
    path = saved[-1] if provider == "ours" else target[provider]  # ours: the newest step's directory
    bench(
        fns[provider],
        variant=provider,
        params={"width": width, "depth": DEPTH},
        sweep="width",
        dtype=torch.float32,
        baseline=provider == "torch.save",
        reference=provider == "torch.save",
        items=nbytes / 1e6,
        items_unit="MB/s",
        metrics={
            "params": _params(model),
            "disk_MB": round(nbytes / 1e6, 3),
            "bytes_per_param": round(nbytes / _params(model), 2),
        },
        expected=_probe(model, None if provider == "safetensors-weights" else optimizer),
        output=lambda: _read_back(provider, saved[-1] if provider == "ours" else path, width, device),
        tol=EXACT,
    )


@pytest.mark.benchmark(group="checkpoint-load")
@pytest.mark.parametrize("provider", ["ours", "torch.load"])
def test_checkpoint_load(bench, device, tmp_path, provider, width):
    model, optimizer = _trained_mlp(width, device)
    if provider == "ours":
        path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
        fn = lambda: load_checkpoint(path, model=model, optimizer=optimizer, restore_rng=False)
    else:
        path = tmp_path / "ckpt.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)

        def fn():
            state = torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])

    nbytes = _disk_bytes(path)
    expected = _probe(model, optimizer)
    with torch.no_grad():  # so the first load has something to restore
        for t in [*model.parameters(), *(v for st in optimizer.state.values() for v in st.values() if v.dim())]:
            t.zero_()
    bench(
        fn,
        variant=provider,
        params={"width": width, "depth": DEPTH},
        sweep="width",
        dtype=torch.float32,
        baseline=provider == "torch.load",
        reference=provider == "torch.load",
        items=nbytes / 1e6,
        items_unit="MB/s",
        metrics={"params": _params(model), "disk_MB": round(nbytes / 1e6, 3), "verified": provider == "ours"},
        expected=expected,
        output=lambda: _probe(model, optimizer),
        tol=EXACT,
    )


@pytest.mark.benchmark(group="deterministic-step")
@pytest.mark.parametrize("mode", ["default", "deterministic"])
def test_deterministic_step(bench, device, mode, d_model):
    batch, seq, vocab = 8, 64, 256
    with set_deterministic(0, enabled=mode == "deterministic"):
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True)
        model = nn.Sequential(nn.Embedding(vocab, d_model), nn.TransformerEncoder(layer, 2), nn.Linear(d_model, vocab))
        model = model.to(device)
        tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)

        def loss_fn(model, batch):
            return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        trainer = Trainer(model, optimizer, loss_fn, lambda: tokens, clip_grad_norm=1.0, progress=False)
        bench(
            trainer.step,
            variant=mode,
            params={"d_model": d_model, "batch": batch, "seq_len": seq, "layers": 2},
            sweep="d_model",
            dtype=torch.float32,
            baseline=mode == "default",
            flops=train_flops(_params(model), 2, d_model, seq, batch * seq),
            mfu=True,
            tokens=batch * seq,
            metrics={"deterministic_algorithms": torch.are_deterministic_algorithms_enabled()},
        )
