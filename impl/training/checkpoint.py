"""Crash-safe checkpoints: atomic write, verified read, fall back to the newest valid one.

The write follows the classic recipe for atomic replacement on POSIX (write a temporary, `fsync` it, `rename`
it into place, `fsync` the directory; see "Files are hard", D. Luu, 2015, and the `rename(2)` man page): a
checkpoint directory `step_00000042/` either exists complete or not at all, whatever moment the process dies.
Inside it:

    model.safetensors      the model's state dict, each storage once (tied weights are stored once)
    optimizer.safetensors  the optimizer's tensors (Adam's exp_avg, exp_avg_sq, step, ...)
    state.json             everything else: param groups, scheduler, every RNG, the data position, the config,
                           the names of tied weights, and where each tensor above belongs
    manifest.json          written last: format, step, and each file's byte count and sha256

Reading checks every byte count and hash before anything is parsed or loaded, so a truncated, flipped or
missing file raises `CheckpointError` naming the file, and leaves the model untouched; `resume` then tries the
next older checkpoint, with a warning. Tensors are written and hashed from the file, so no serialized copy of
the checkpoint is held in memory on either side.
"""

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from impl.training._state import decode, encode

FORMAT = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupted (the message names the file)."""


@dataclass
class Checkpoint:
    """A verified checkpoint: where it is, its step, the config saved with it, and any extra state."""

    path: Path  # the step_XXXXXXXX directory
    step: int  # optimizer steps taken when it was written
    config: dict | None  # the config passed to save_checkpoint
    extra: dict = field(default_factory=dict)  # the `extra` passed to save_checkpoint


# --- RNG -------------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- model state with tied weights ------------------------------------------------------------------------------


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tied tensor stored once, and {alias: stored name} for the others."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tensor.shape,
            tensor.stride(),
            tensor.dtype,
        )
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors, aliases


def _check_types(model: Any, optimizer: Any, scheduler: Any, *, model_required: bool) -> None:
    if not isinstance(model, nn.Module) and (model_required or model is not None):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if scheduler is not None and not all(hasattr(scheduler, a) for a in ("state_dict", "load_state_dict")):
        raise TypeError(
            f"scheduler must have state_dict()/load_state_dict() or be None, got {type(scheduler).__name__}"
        )


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores each storage once: a tensor whose storage is already taken gets its own copy."""
    taken: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in taken else tensor
        taken.add(ptr)
    return out


def _check_model(model: nn.Module, saved: dict[str, torch.Tensor], where: Path) -> None:
    expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    got = {name: (tuple(t.shape), t.dtype) for name, t in saved.items()}
    problems = [f"missing {n}" for n in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected {n}" for n in sorted(got.keys() - expected.keys())]
    problems += [
        f"{n}: model has {expected[n]}, checkpoint has {got[n]}"
        for n in sorted(expected.keys() & got.keys())
        if expected[n] != got[n]
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"checkpoint {where} was written for a model of another config: {shown}")


# --- atomic files -----------------------------------------------------------------------------------------------


def _hash_file(path: Path) -> dict:
    """The manifest entry of one file: its byte count and sha256, read in 4 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _write_file(path: Path, data: bytes) -> dict:
    """Write, flush and fsync one file; returns its manifest entry."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """safetensors file, fsynced; returns its manifest entry (hashed from the file as written)."""
    from safetensors.torch import save_file

    save_file(_unshared(tensors), path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return _hash_file(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    data: Any | None = None,
    config: dict | None = None,
    extra: dict | None = None,
    keep_last: int | None = None,
) -> Path:
    """Atomically write `directory/step_XXXXXXXX/` (model, optimizer, scheduler, RNGs, data position, config);
    then delete all but the newest `keep_last` checkpoints. Returns the new checkpoint's path."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    _check_types(model, optimizer, scheduler, model_required=True)
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict or None, got {type(config).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{_TMP_PREFIX}*"):  # left by a writer that died; one writer per directory
        shutil.rmtree(stale, ignore_errors=True)

    model_tensors, aliases = _model_tensors(model)
    state_tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": FORMAT,
        "step": step,
        "tied": aliases,
        "optimizer": encode(optimizer.state_dict(), "optimizer", state_tensors) if optimizer is not None else None,
        "scheduler": encode(scheduler.state_dict(), "scheduler", state_tensors) if scheduler is not None else None,
        "data": encode(data.state_dict(), "data", state_tensors) if hasattr(data, "state_dict") else None,
        "rng": encode(_rng_state(), "rng", state_tensors),
        "config": encode(config, "config", state_tensors),
        "extra": encode(extra or {}, "extra", state_tensors),
    }

    final = directory / f"step_{step:08d}"
    tmp = directory / f"{_TMP_PREFIX}{step:08d}-{os.getpid()}"
    tmp.mkdir()
    try:
        files = {
            "model.safetensors": _write_tensors(tmp / "model.safetensors", model_tensors),
            "optimizer.safetensors": _write_tensors(tmp / "optimizer.safetensors", state_tensors),
            "state.json": _write_file(tmp / "state.json", json.dumps(state, indent=1).encode()),
        }
        manifest = {"format": FORMAT, "step": step, "files": files}
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside, then swap
            old = directory / f"{_TMP_PREFIX}{step:08d}-{os.getpid()}-old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for _, path in _step_dirs(directory)[keep_last:]:
            shutil.rmtree(path)
    return final


def _verify(path: Path) -> dict:
    """The manifest, after checking every file's byte count and sha256 against it."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is missing") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({err})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT}")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, manifest says {entry['bytes']}")
        if _hash_file(file)["sha256"] != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} fails its sha256 check (corrupted)")
    return manifest


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    data: Any | None = None,
    config: dict | None = None,
    restore_rng: bool = True,
) -> Checkpoint:
    """Verify one checkpoint directory, then load it into whatever is passed (and the RNGs, by default).

    Raises `CheckpointError` for a missing, truncated or corrupted file, before anything is modified; and
    `ValueError` when `model` or `config` does not match the ones the checkpoint was written for.
    """
    from safetensors.torch import load_file

    _check_types(model, optimizer, scheduler, model_required=False)
    path = Path(path)
    manifest = _verify(path)
    try:
        model_tensors = load_file(path / "model.safetensors")
        state_tensors = load_file(path / "optimizer.safetensors")
        state = json.loads((path / "state.json").read_bytes())
        saved_config = decode(state["config"], state_tensors)
    except Exception as err:  # hashes matched, so this is a writer bug or a hand-made manifest
        raise CheckpointError(f"checkpoint {path}: cannot parse its files ({type(err).__name__}: {err})") from err
    if config is not None and config != saved_config:
        saved = saved_config or {}
        diff = {
            k: (saved.get(k), config.get(k))
            for k in sorted(config.keys() | saved.keys())
            if config.get(k) != saved.get(k)
        }
        raise ValueError(f"config does not match checkpoint {path}: (saved, given) differ for {diff}")
    if model is not None:
        full = dict(model_tensors)
        full.update({alias: model_tensors[name] for alias, name in state["tied"].items()})
        _check_model(model, full, path)
        model.load_state_dict(full)
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"optimizer was given, but checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict(decode(state["optimizer"], state_tensors))
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"scheduler was given, but checkpoint {path} holds no scheduler state")
        scheduler.load_state_dict(decode(state["scheduler"], state_tensors))
    if data is not None and state["data"] is not None:
        data.load_state_dict(decode(state["data"], state_tensors))
    if restore_rng:
        _set_rng_state(decode(state["rng"], state_tensors))
    return Checkpoint(
        path=path, step=manifest["step"], config=saved_config, extra=decode(state["extra"], state_tensors)
    )


def resume(
    directory: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    data: Any | None = None,
    config: dict | None = None,
    restore_rng: bool = True,
) -> Checkpoint | None:
    """Load the newest valid checkpoint under `directory` (arguments as `load_checkpoint`).

    An invalid newer checkpoint is skipped with a warning (and kept on disk). Returns None when `directory`
    holds no checkpoint at all; raises `CheckpointError` listing every problem when none of them is valid.
    """
    _check_types(model, optimizer, scheduler, model_required=False)
    load_kwargs = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": data, "config": config}
    directory = Path(directory)
    candidates = _step_dirs(directory)
    if not candidates:
        return None
    problems = []
    for _, path in candidates:
        try:
            checkpoint = load_checkpoint(path, restore_rng=restore_rng, **load_kwargs)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            warnings.warn(
                f"skipped invalid checkpoints, resuming from {path.name}: " + "; ".join(problems),
                RuntimeWarning,
                stacklevel=2,
            )
        return checkpoint
    raise CheckpointError(
        f"no valid checkpoint in {directory} ({len(problems)} found, none deleted): " + "; ".join(problems)
    )
