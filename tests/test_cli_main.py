"""`python -m impl`: every user-caused failure is one `error:` line and exit 2, Ctrl-C is one line and exit 130,
tracebacks only with --debug or IMPL_DEBUG=1 (or for a bug); usage lines name the command typed; no temp folder
is left behind."""

import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
from pathlib import Path

import pytest
import torch

import impl.__main__ as entry
from impl.training import CheckpointError


@pytest.fixture
def fake_entry(monkeypatch):
    """An entry point `fake` whose main raises the exception given to it."""

    def install(exc: BaseException) -> None:
        module = types.ModuleType("fake_entry")

        def main(argv):
            raise exc

        module.main = main
        monkeypatch.setitem(sys.modules, "fake_entry", module)
        monkeypatch.setitem(entry.ENTRY_POINTS, "fake", ("fake_entry", "raises"))

    monkeypatch.delenv("IMPL_DEBUG", raising=False)
    return install


def _user_errors():
    from PIL import UnidentifiedImageError
    from safetensors import SafetensorError

    return [
        ValueError("x must be > 0, got 0"),
        FileNotFoundError("no such file"),
        CheckpointError("checkpoint ckpt/step_00000004: manifest.json is missing"),
        SafetensorError("Error while deserializing header: HeaderTooLarge"),
        UnidentifiedImageError("cannot identify image file 'in.png'"),
        PermissionError(errno.EACCES, "Permission denied", "/ro/out"),
        OSError(errno.ENOSPC, "No space left on device"),
        FileExistsError(errno.EEXIST, "File exists", "out"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ]


@pytest.mark.parametrize("exc", _user_errors(), ids=lambda e: type(e).__name__)
def test_a_user_caused_failure_is_one_line_and_exit_2(exc, fake_entry, capsys):
    fake_entry(exc)
    assert entry.main(["fake"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert " ".join(str(exc).split()) in err


def test_debug_and_impl_debug_show_the_traceback(fake_entry, monkeypatch):
    fake_entry(ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        entry.main(["fake", "--debug"])
    assert entry.main(["fake", "--", "--debug"]) == 2  # after "--", a flag of the tool the entry point runs
    monkeypatch.setenv("IMPL_DEBUG", "1")
    with pytest.raises(ValueError, match="bad"):
        entry.main(["fake"])


def test_a_bug_keeps_its_traceback(fake_entry):
    fake_entry(KeyError("a bug, not the user's"))
    with pytest.raises(KeyError):
        entry.main(["fake"])


def test_keyboard_interrupt_is_one_line_and_exit_130(fake_entry, capsys):
    fake_entry(KeyboardInterrupt())
    assert entry.main(["fake"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted: ")


def test_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "step_00000004").mkdir(parents=True)
    (tmp_path / "step_00000004" / "manifest.json").write_text("{not json")
    assert entry.main(["sample", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CheckpointError: ") and err.count("\n") == 1


def test_no_corpus_and_no_network_is_one_line(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.delenv("TINYSHAKESPEARE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("urllib.request.urlopen", offline)
    assert entry.main(["train", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "TINYSHAKESPEARE" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_usage_names_python_m_impl_name(capsys):
    for name, module in [("train", "impl.gpt.train"), ("train-zero", "impl.distributed.train_zero")]:
        assert entry.main([name, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m impl {name} ")
        __import__(module)
        with pytest.raises(SystemExit):  # run as its own module, it names itself
            sys.modules[module].main(["--help"])
        assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


def test_img2img_leaves_no_temp_folder(tmp_path, capsys):
    pytest.importorskip("diffusers", reason="img2img runs on diffusers' UNet and VAE")
    from PIL import Image

    Image.new("RGB", (16, 16), (120, 30, 200)).save(tmp_path / "in.png")
    before = set(Path(tempfile.gettempdir()).glob("tiny-clip-*"))
    argv = ["img2img", "--image", str(tmp_path / "in.png"), "--prompt", "a digit", "--out", str(tmp_path / "o.png"),
            "--steps", "2", "--strength", "1", "--device", "cpu"]  # fmt: skip
    assert entry.main(argv) == 0
    assert (tmp_path / "o.png").is_file()
    assert set(Path(tempfile.gettempdir()).glob("tiny-clip-*")) == before


def test_sigint_during_training_exits_130_with_one_line(tmp_path):
    """Ctrl-C (SIGINT to the process group) in the middle of `python -m impl train`."""
    (tmp_path / "corpus.txt").write_text("To be, or not to be, that is the question. " * 40)
    out = tmp_path / "run"
    tiny = ["--n-layer=1", "--n-head=2", "--n-embd=16", "--block-size=16", "--batch-size=2", "--max-iters=1000000",
            "--eval-interval=1000000", "--checkpoint-every=0", "--device=cpu", "--no-progress"]  # fmt: skip
    cmd = [sys.executable, "-m", "impl", "train", "--out", str(out), "--data", str(tmp_path / "corpus.txt"), *tiny]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMPL_DEBUG": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not ((out / "losses.csv").is_file() and len((out / "losses.csv").read_text().splitlines()) > 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted: python -m impl train stopped by Ctrl-C"]


def test_sigint_during_distributed_training_exits_130_with_one_line():
    """Ctrl-C in `python -m impl train-zero`: the ranks go too, and no leaked-semaphore warning follows the line
    (tqdm's default lock is a semaphore a stopped rank never unlinks)."""
    cmd = [sys.executable, "-m", "impl", "train-zero", "--steps", "1000000", "--world-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMPL_DEBUG": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        seen, deadline = b"", time.monotonic() + 90
        while b"it/s" not in seen:  # the progress bar: the ranks are training
            assert proc.poll() is None and time.monotonic() < deadline, seen.decode(errors="replace")
            seen += os.read(proc.stderr.fileno(), 4096)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    # The progress bar redraws with \r and may leave no newline before our line: take its segments out.
    text = re.sub(r"ZeRO-\d:[^\]]*\]", "", err.decode(errors="replace"))
    lines = [x.strip() for x in re.split(r"[\r\n]", text) if x.strip()]
    assert proc.returncode == 130, lines
    assert lines == ["interrupted: python -m impl train-zero stopped by Ctrl-C"]


@pytest.mark.parametrize("name", ["clip-train", "glide", "unclip", "train"])
def test_a_read_only_output_folder_fails_before_training(name, tmp_path, monkeypatch, capsys):
    """As root every folder is writable, so the refusal is simulated where the check asks the OS."""
    import impl.common.cli as cli

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: Path(p) != readonly and real_access(p, mode))
    for out in (readonly, readonly / "run"):
        assert entry.main([name, "--out", str(out), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: argument --out: must be a writable") and err.count("\n") == 1
