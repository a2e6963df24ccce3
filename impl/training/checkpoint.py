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

Loading is all-or-nothing, in two passes. The first only reads: the manifest must be well formed and agree
with the disk (its step with the directory's name, its file list with the files above, every byte count and
sha256 with the bytes; `_manifest.read_manifest`), then the files are parsed and everything is checked against
the objects it will go into (`_plan.plan`). Only then is anything loaded (`_apply`). A missing, truncated, flipped
or malformed file raises `CheckpointError` naming it, and `resume` tries the next older checkpoint, with a
warning; a model, optimizer, scheduler or data iterator that does not match raises `ValueError`. Either way no
model, optimizer, scheduler, data position or RNG has changed.
"""

import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from impl.common.checks import check_int
from impl.training._manifest import FORMAT, MANIFEST, CheckpointError, fsync_dir, hash_file, read_manifest, step_dirs
from impl.training._manifest import write_file as _write_file
from impl.training._plan import Plan, plan
from impl.training._state import encode

__all__ = ["FORMAT", "MANIFEST", "Checkpoint", "CheckpointError", "load_checkpoint", "resume", "save_checkpoint"]
_TMP_PREFIX = ".tmp-step_"


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


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """safetensors file, fsynced; returns its manifest entry (hashed from the file as written)."""
    from safetensors.torch import save_file

    save_file(_unshared(tensors), path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return hash_file(path)


# --- save -------------------------------------------------------------------------------------------------------


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
    """Atomically write `directory/step_XXXXXXXX/` (model, optimizer, scheduler, RNGs, data position, config)
    and return its path.

    `keep_last=k` then deletes every checkpoint older than the `k` newest steps, except the one just written:
    that one is never deleted, even when newer steps exist (a rewound run), and no checkpoint newer than it is.
    """
    check_int("step", step, low=0)
    _check_types(model, optimizer, scheduler, model_required=True)
    if keep_last is not None:
        check_int("keep_last", keep_last, low=1)
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
        fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside, then swap
            old = directory / f"{_TMP_PREFIX}{step:08d}-{os.getpid()}-old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for _, path in step_dirs(directory)[keep_last:]:
            if path != final:
                shutil.rmtree(path)
    return final


# --- load: check everything (`_plan.plan`), then apply it ---------------------------------------------------


def _apply(checked: Plan, *, model, optimizer, scheduler, data) -> None:
    """Load a checked plan. The data iterator goes first: its own load_state_dict may still refuse (a
    ShuffledBatches of another seed), and then nothing else has been touched either."""
    if checked.data is not None:
        data.load_state_dict(checked.data)
    if checked.model is not None:
        model.load_state_dict(checked.model)
    if checked.optimizer is not None:
        optimizer.load_state_dict(checked.optimizer)
    if checked.scheduler is not None:
        scheduler.load_state_dict(checked.scheduler)
    if checked.rng is not None:
        _set_rng_state(checked.rng)


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

    All or nothing: raises `CheckpointError` for a missing, truncated, corrupted or malformed file, and
    `ValueError` when `model`, `optimizer`, `scheduler`, `data` or `config` does not match what the checkpoint
    was written for, in both cases before any of them (or any RNG) is modified.
    """
    _check_types(model, optimizer, scheduler, model_required=False)
    path = Path(path)
    manifest = read_manifest(path)
    targets = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": data}
    checked = plan(path, manifest["step"], config=config, restore_rng=restore_rng, **targets)
    _apply(checked, **targets)
    return Checkpoint(path=path, step=checked.step, config=checked.config, extra=checked.extra)


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

    An invalid newer checkpoint (`CheckpointError`) is skipped with a warning and kept on disk. Returns None
    when `directory` holds no checkpoint at all; raises `CheckpointError` listing every problem when none of
    them is valid.
    """
    _check_types(model, optimizer, scheduler, model_required=False)
    load_kwargs = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": data, "config": config}
    directory = Path(directory)
    candidates = step_dirs(directory)
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
