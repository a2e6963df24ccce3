"""A run SIGKILLed at a random moment and restarted ends bitwise equal to one that was never interrupted.

Each run is a separate process (this file, run as a script), so the kill is a real SIGKILL: nothing in memory
survives, only what the checkpoint put on disk. The model has dropout (it reads the torch RNG every step), the
optimizer is AdamW with an LR schedule, gradients are accumulated over 2 micro-batches and clipped, and the
data order comes from a seeded shuffle: every piece of state that the next step reads has to come back.
"""

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS, EVERY = 20, 3
VOCAB, WIDTH, CONTEXT, ITEMS = 23, 16, 8, 40


def _build(seed: int, dropout: float, grad_accum: int, checkpoint_dir: Path):
    """The tiny model, optimizer, scheduler and data of every run, built from `seed`."""
    from torch import nn
    from torch.nn import functional as F

    from impl.training import Trainer
    from impl.training.data import ShuffledBatches

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, WIDTH)
            self.mlp = nn.Sequential(
                nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * WIDTH, WIDTH)
            )
            self.head = nn.Linear(WIDTH, VOCAB, bias=False)
            self.head.weight = self.embed.weight  # tied, as in GPT-2

        def forward(self, idx):
            x = self.embed(idx)  # (B, T, WIDTH)
            return self.head(x + self.mlp(x))  # (B, T, VOCAB)

    torch.manual_seed(seed)
    model = TinyLM()
    tokens = torch.randint(0, VOCAB, (ITEMS, CONTEXT + 1), generator=torch.Generator().manual_seed(seed))
    data = ShuffledBatches(ITEMS, 4, seed=seed, make_batch=lambda i: (tokens[i, :-1], tokens[i, 1:]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5) * 0.97**s)

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    config = {"vocab": VOCAB, "width": WIDTH, "dropout": dropout, "seed": seed}
    return Trainer(
        model, optimizer, loss_fn, data, scheduler=scheduler, grad_accum_steps=grad_accum, clip_grad_norm=0.5,
        checkpoint_dir=checkpoint_dir, checkpoint_every=EVERY, keep_last=2, config=config, progress=False,
    )  # fmt: skip


def _worker(argv: list[str]) -> None:
    """Train to STEPS, resuming from --dir; optionally SIGKILL itself after step --kill-at, or halfway through
    writing the checkpoint of that step (--kill-in write)."""
    from impl.training import checkpoint, set_deterministic

    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--kill-in", choices=["step", "write"], default="step")
    parser.add_argument("--no-rng", action="store_true", help="resume without restoring the RNGs (negative control)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    set_deterministic(0)
    trainer = _build(seed=0, dropout=0.1, grad_accum=2, checkpoint_dir=args.dir)

    if args.no_rng:
        found = checkpoint.resume(args.dir, model=trainer.model, optimizer=trainer.optimizer,
                                  scheduler=trainer.scheduler, data=trainer.data, restore_rng=False)  # fmt: skip
        trainer.step_count = found.step
    else:
        trainer.resume()

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if args.kill_in == "write" and args.kill_at is not None:
        write = checkpoint._write_file

        def torn_write(path, data):  # half the bytes reach the disk, then the process dies
            if f"{args.kill_at:08d}" in path.parent.name and path.name == "state.json":
                write(path, data[: len(data) // 2])
                die()
            return write(path, data)

        checkpoint._write_file = torn_write
    callback = (lambda step, loss: step == args.kill_at and die()) if args.kill_in == "step" else None
    trainer.fit(STEPS, callback=callback)


def _run(directory: Path, *args: str) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parents[1])  # so `impl` imports even when the project is not installed
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, __file__, str(directory), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _final_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    final = directory / f"step_{STEPS:08d}"
    model = {f"model/{k}": v for k, v in load_file(final / "model.safetensors").items()}
    return model | {f"state/{k}": v for k, v in load_file(final / "optimizer.safetensors").items()}


def _differences(ours: dict, reference: dict) -> list[str]:
    assert ours.keys() == reference.keys()
    return [k for k in reference if not torch.equal(ours[k], reference[k])]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    directory = tmp_path_factory.mktemp("uninterrupted")
    done = _run(directory)
    assert done.returncode == 0, done.stderr
    return _final_tensors(directory)


def _kill(directory: Path, kill_at: int, kill_in: str) -> None:
    killed = _run(directory, "--kill-at", str(kill_at), "--kill-in", kill_in)
    assert killed.returncode == -signal.SIGKILL, f"expected a SIGKILL at step {kill_at}: {killed.stderr}"
    assert not (directory / f"step_{STEPS:08d}").exists()


def _resume(directory: Path, *args: str) -> dict[str, torch.Tensor]:
    resumed = _run(directory, *args)
    assert resumed.returncode == 0, resumed.stderr
    return _final_tensors(directory)


@pytest.mark.slow
def test_sigkill_at_random_step_resumes_bitwise(tmp_path, uninterrupted):
    kill_at = random.randint(1, STEPS - 1)  # seeded by the autouse fixture, so a failure reproduces
    _kill(tmp_path / "run", kill_at, "step")
    shutil.copytree(tmp_path / "run", tmp_path / "control")
    differ = _differences(_resume(tmp_path / "run"), uninterrupted)
    assert not differ, f"killed after step {kill_at} and resumed: {differ} are not bitwise equal"
    # Negative control: without the RNG state, the dropout masks after the resume differ, and so does the run.
    assert _differences(_resume(tmp_path / "control", "--no-rng"), uninterrupted), "resuming without RNGs drifts"


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_resumes_bitwise(tmp_path, uninterrupted):
    kill_at = EVERY * random.randint(2, (STEPS - 1) // EVERY)  # a step that writes a checkpoint
    _kill(tmp_path, kill_at, "write")
    assert not (tmp_path / f"step_{kill_at:08d}").exists(), "a half-written checkpoint must not be visible"
    assert list(tmp_path.glob(".tmp-step_*")), "the torn write should have left its temporary directory"
    differ = _differences(_resume(tmp_path), uninterrupted)
    assert not differ, f"killed while writing step {kill_at} and resumed: {differ} are not bitwise equal"
    assert not list(tmp_path.glob(".tmp-step_*")), "the next save removes the dead writer's temporary directory"


if __name__ == "__main__":
    _worker(sys.argv[1:])
