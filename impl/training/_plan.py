"""The first pass of a load: read a verified checkpoint's files and check them against the objects they will
go into, touching nothing.

`plan` returns everything a load will apply, decoded; it raises `CheckpointError` (one line naming the file)
for content not shaped the way `save_checkpoint` writes it, and `ValueError`/`TypeError` for a model,
optimizer, scheduler, data iterator or config that does not match the checkpoint. What `load_state_dict`
would refuse is refused here, before anything is loaded, so the load that follows is all or nothing.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from impl.training._manifest import MANIFEST, CheckpointError
from impl.training._state import decode

STATE_KEYS = ("optimizer", "scheduler", "data", "rng", "config", "extra")  # decoded parts of state.json


def _check_rng(state: dict) -> None:
    """Set each saved state on a throwaway generator: raises what setting the global ones would raise."""
    random.Random().setstate(state["python"])
    np.random.RandomState().set_state(state["numpy"])
    torch.Generator().set_state(state["torch"])


@dataclass
class Plan:
    """What a load will apply, decoded and checked; None where that part is not loaded."""

    step: int  # from the manifest, equal to state.json's and the directory's
    config: dict | None  # the saved config
    extra: dict  # the saved extra
    model: dict[str, torch.Tensor] | None  # the full state dict, tied aliases included
    optimizer: dict | None
    scheduler: dict | None
    data: dict | None
    rng: dict | None


def _parse(path: Path, name: str, parse) -> Any:
    try:
        return parse(path / name)
    except Exception as err:  # hashes matched, so this is a writer bug or a hand-made manifest
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise CheckpointError(f"checkpoint {path}: {name} cannot be parsed ({reason})") from err


def _read_state(path: Path, step: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """state.json's parts decoded, and the model tensors with their tied aliases; `CheckpointError` for anything
    not shaped the way `save_checkpoint` writes it."""
    from safetensors.torch import load_file

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: state.json {' '.join(problem.split())}")

    model_tensors = _parse(path, "model.safetensors", load_file)
    state_tensors = _parse(path, "optimizer.safetensors", load_file)
    state = _parse(path, "state.json", lambda p: json.loads(p.read_bytes()))
    if not isinstance(state, dict):
        raise bad(f"is a JSON {type(state).__name__}, expected an object")
    if type(state.get("step")) is not int or state["step"] != step:
        raise bad(f"says step {state.get('step')!r:.40}, {MANIFEST} says {step}")
    if missing := [key for key in ("tied", *STATE_KEYS) if key not in state]:
        raise bad(f"lacks {missing}")
    tied = state["tied"]
    if not isinstance(tied, dict) or not all(isinstance(a, str) and t in model_tensors for a, t in tied.items()):
        raise bad(f"tied must map names to stored tensors, got {tied!r:.80}")
    try:
        parts = {key: decode(state[key], state_tensors) for key in STATE_KEYS}
    except Exception as err:
        raise bad(f"cannot be decoded ({type(err).__name__}: {err})") from err
    for key in STATE_KEYS:
        kinds = dict if key in ("rng", "extra") else dict | None
        if not isinstance(parts[key], kinds):
            raise bad(f"{key} is a {type(parts[key]).__name__}, expected {kinds}")
    optimizer = parts["optimizer"] or {"state": {}, "param_groups": []}
    groups = optimizer.get("param_groups")
    well_formed = isinstance(groups, list) and all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    )
    if not (well_formed and isinstance(optimizer.get("state"), dict)):
        raise bad("optimizer is not a state_dict (a state, and param_groups each with its params)")
    try:
        _check_rng(parts["rng"])
    except Exception as err:
        raise bad(f"rng cannot be restored ({type(err).__name__}: {err})") from err
    return parts, model_tensors | {alias: model_tensors[name] for alias, name in tied.items()}


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


def _check_like(name: str, target: Any, saved: dict, where: Path) -> None:
    """A scheduler's or data iterator's saved state must have its public keys and the lengths of its lists."""
    mine = target.state_dict() if hasattr(target, "state_dict") else None
    if not isinstance(mine, dict):
        return  # nothing to compare with; its load_state_dict is the judge
    public = sorted(str(k) for k in mine if not str(k).startswith("_"))
    theirs = sorted(str(k) for k in saved if not str(k).startswith("_"))
    lengths = [
        k
        for k, v in mine.items()
        if isinstance(v, list | tuple)
        and k in saved
        and not (isinstance(saved[k], list | tuple) and len(saved[k]) == len(v))
    ]
    if public != theirs or lengths:
        raise ValueError(
            f"{name} {type(target).__name__} does not match the {name} state in checkpoint {where}: "
            f"keys {public} vs saved {theirs}" + (f", lengths of {lengths} differ" if lengths else "")
        )


def plan(path: Path, step: int, *, model, optimizer, scheduler, data, config, restore_rng: bool) -> Plan:
    """Read everything and check it against the objects it goes into; touches nothing."""
    parts, model_state = _read_state(path, step)
    saved_config = parts["config"]
    if config is not None and config != saved_config:
        saved = saved_config or {}
        keys = sorted(config.keys() | saved.keys())
        diff = {k: (saved.get(k), config.get(k)) for k in keys if config.get(k) != saved.get(k)}
        raise ValueError(f"config does not match checkpoint {path}: (saved, given) differ for {diff}")
    if model is not None:
        _check_model(model, model_state, path)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is not None and parts[name] is None:
            raise ValueError(f"{name} was given, but checkpoint {path} holds no {name} state")
    if optimizer is not None:
        mine = [len(g["params"]) for g in optimizer.param_groups]
        theirs = [len(g["params"]) for g in parts["optimizer"]["param_groups"]]
        if mine != theirs:
            raise ValueError(
                f"optimizer has {len(mine)} parameter groups of sizes {mine}, checkpoint {path} has "
                f"{len(theirs)} of sizes {theirs}"
            )
    if scheduler is not None:
        _check_like("scheduler", scheduler, parts["scheduler"], path)
    load_data = data is not None and parts["data"] is not None
    if load_data and not hasattr(data, "load_state_dict"):
        raise TypeError(f"data has no load_state_dict(), but checkpoint {path} holds a data state")
    if load_data:
        _check_like("data", data, parts["data"], path)
    return Plan(
        step=step,
        config=saved_config,
        extra=parts["extra"],
        model=model_state if model is not None else None,
        optimizer=parts["optimizer"] if optimizer is not None else None,
        scheduler=parts["scheduler"] if scheduler is not None else None,
        data=parts["data"] if load_data else None,
        rng=parts["rng"] if restore_rng else None,
    )
