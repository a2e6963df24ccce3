"""Training and sampling: overfitting a tiny text, a short real run, checkpoints, reproducible samples."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from impl.gpt import GPT, CharTokenizer, GPTConfig
from impl.gpt.data import get_batch
from impl.gpt.sample import load_model, sample
from impl.gpt.sample import main as sample_main
from impl.gpt.train import TrainConfig, lr_at, train
from impl.gpt.train import main as train_main
from impl.training import Trainer

TINY_TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are all "
    "resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you know Caius Marcius"
)[:200]
# A run small enough for a test: a 2-layer model, a few steps, tiny evaluations.
TINY_RUN = dict(
    n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=4, warmup_iters=2, eval_interval=2,
    eval_iters=2, final_eval_iters=2, checkpoint_every=2, sample_chars=20, device="cpu",
)  # fmt: skip


@pytest.mark.slow
def test_overfits_200_characters():
    """Memorized: given 8 or more characters of context, the likeliest next character is the text's own."""
    assert len(TINY_TEXT) == 200
    tok = CharTokenizer(TINY_TEXT)
    data = torch.tensor(tok.encode(TINY_TEXT))
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    trainer = Trainer(model, optimizer, lambda m, b: m(*b)[1], data=lambda: get_batch(data, 32, 16), progress=False)
    losses = trainer.fit(250)
    assert losses[0] > 3.0  # about ln(vocab): nothing learned yet
    assert losses[-1] < 0.3  # what is left is mostly the first characters of each window, which have no context
    windows = range(len(data) - 32)
    x = torch.stack([data[i : i + 32] for i in windows])  # every window of the text, (168, 32)
    y = torch.stack([data[i + 1 : i + 33] for i in windows])
    with torch.no_grad():
        predicted = model.eval()(x)[0].argmax(-1)
    # 98.8% to 99.7% over six seeds; a model that learned only character frequencies gets under 20%
    assert (predicted == y)[:, 8:].float().mean() > 0.97


@pytest.mark.slow
def test_short_real_run_beats_val_loss_2_5(shakespeare_path, tmp_path):
    """500 steps of a 2-layer model: about 10 s of CPU time; a bigram model sits near 2.5 nats/char."""
    if shakespeare_path is None:
        pytest.skip("no tiny-shakespeare file (set TINYSHAKESPEARE)")
    cfg = TrainConfig.from_name(
        "cpu", n_layer=2, n_head=4, n_embd=64, block_size=32, batch_size=16, max_iters=500, learning_rate=3e-3,
        warmup_iters=30, eval_interval=250, final_eval_iters=50, checkpoint_every=0, sample_chars=50, device="cpu",
    )  # fmt: skip
    summary = train(cfg, tmp_path, shakespeare_path, progress=False)
    assert summary["final_val_loss"] < 2.5
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["evals"][-1]["val"] == summary["final_val_loss"]
    assert log["evals"][0]["step"] == 250
    for name in ("losses.csv", "evals.csv", "loss_curve.png", "sample.txt", "report.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "report.md").read_text()
    assert f"{summary['final_val_loss']:.4f}" in report and "![loss curve](loss_curve.png)" in report


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_TEXT * 5)
    return path


def test_cli_writes_outputs_and_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items()]
    assert train_main(["--out", str(out), "--data", str(corpus), "--no-progress", *flags]) == 0
    first = json.loads((out / "log.json").read_text())
    assert first["steps"] == 4 and first["resumed_from"] is None
    assert [e["step"] for e in first["evals"]] == [2, 4]
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step_00000002", "step_00000004"]
    # a longer run in the same folder continues from step 4 instead of starting over
    assert train_main(["--out", str(out), "--data", str(corpus), "--no-progress", *flags, "--max-iters=6"]) == 0
    second = json.loads((out / "log.json").read_text())
    assert second["resumed_from"] == 4 and second["steps"] == 6 and second["session_steps"] == 2
    assert [int(r.split(",")[0]) for r in (out / "losses.csv").read_text().splitlines()[1:]] == [1, 2, 3, 4, 5, 6]


def _rows(path: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]]


def _kill_when_logged(out: Path, flags: list[str], rows: int) -> None:
    """Start `python -m impl train` for a long run, SIGKILL it once losses.csv holds `rows` steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "impl", "train", "--out", str(out), *flags, "--max-iters=100000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not ((out / "losses.csv").is_file() and len(_rows(out / "losses.csv")) >= rows):
            assert proc.poll() is None, f"the run ended early with code {proc.returncode}"
            assert time.monotonic() < deadline, "the run logged too few steps in 90 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_logs_survive_sigkill_and_resume(corpus, tmp_path):
    """Two SIGKILLs mid-run, then a resume and a rerun: one row per step and per evaluation, a whole-run report."""
    out = tmp_path / "run"
    run = {**TINY_RUN, "checkpoint_every": 5, "eval_interval": 5}
    flags = ["--data", str(corpus), "--no-progress", *[f"--{k.replace('_', '-')}={v}" for k, v in run.items()]]
    _kill_when_logged(out, flags, 13)
    _kill_when_logged(out, flags, 22)
    for _ in range(2):  # finish, then run the finished run again
        assert train_main(["--out", str(out), *flags, "--max-iters=30"]) == 0
        assert _rows(out / "losses.csv") == list(range(1, 31))
        assert _rows(out / "evals.csv") == [5, 10, 15, 20, 25, 30]
        log = json.loads((out / "log.json").read_text())
        assert log["steps"] == 30 and log["tokens_per_s"] > 0
        assert "- steps: 30 (" in (out / "report.md").read_text()


def test_checkpoint_of_another_config_is_refused(corpus, tmp_path):
    train(TrainConfig(**TINY_RUN), tmp_path, corpus, progress=False)
    with pytest.raises(ValueError, match="config does not match checkpoint .*step_00000004"):
        train(TrainConfig(**{**TINY_RUN, "n_embd": 64, "max_iters": 6}), tmp_path, corpus, progress=False)


def test_sampling_from_a_checkpoint_is_reproducible(corpus, tmp_path):
    train(TrainConfig(**TINY_RUN), tmp_path, corpus, progress=False)
    model, tok = load_model(tmp_path / "ckpt")
    texts = [sample(model, tok, "First", 40, seed=seed) for seed in (7, 7, 8)]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert texts[0].startswith("First") and len(texts[0]) == 45
    sample_main(["--checkpoint", str(tmp_path / "ckpt" / "step_00000004"), "--prompt", "First", "--max-new-tokens",
                 "40", "--seed", "7", "--out", str(tmp_path / "s.txt")])  # fmt: skip
    assert (tmp_path / "s.txt").read_text() == texts[0]


@pytest.mark.gpu
def test_trains_and_samples_on_cuda(corpus, tmp_path):
    summary = train(TrainConfig(**{**TINY_RUN, "device": "cuda"}), tmp_path, corpus, progress=False)
    assert summary["device"].startswith("cuda") and summary["final_val_loss"] < 5.0
    model, tok = load_model(tmp_path / "ckpt", "cuda")
    assert sample(model, tok, "First", 10, seed=1) == sample(model, tok, "First", 10, seed=1)


def test_top_k_1_is_greedy():
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16)).eval()
    start = torch.tensor([[3, 1, 4]])
    out = model.generate(start, 12, top_k=1)  # crosses block_size: the context is cropped
    assert out.shape == (1, 15)
    for t in range(3, 15):
        assert out[0, t] == model(out[:, max(0, t - 8) : t])[0][0, -1].argmax()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0, got -1"),
        (dict(temperature=0.0), "temperature must be a positive number, got 0.0"),
        (dict(top_k=0), "top_k must be a positive int, got 0"),
    ],
)
def test_generate_bad_input(kwargs, match):
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[1]]), **{"max_new_tokens": 2, **kwargs})


def test_train_bad_input(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(TINY_TEXT)  # its val split is 20 characters, shorter than a block of 32
    with pytest.raises(ValueError, match="the val split has 20 characters, it must be longer than block_size=32"):
        train(TrainConfig(**{**TINY_RUN, "block_size": 32}), tmp_path / "run", short, progress=False)
    with pytest.raises(ValueError, match="preset must be one of \\['cpu', 'gpu'\\], got 'tpu'"):
        TrainConfig.from_name("tpu")
    with pytest.raises(ValueError, match="TrainConfig.max_iters must be a positive int, got 0"):
        TrainConfig(max_iters=0)
    with pytest.raises(FileNotFoundError, match="holds no step_XXXXXXXX checkpoint"):
        load_model(tmp_path)


def test_learning_rate_schedule():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 101)
    assert lr_at(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(1050, cfg) == pytest.approx(5.5e-4)  # halfway down the cosine
    assert lr_at(2000, cfg) == lr_at(5000, cfg) == pytest.approx(1e-4)
