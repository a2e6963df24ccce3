"""Malformed checkpoints and mismatched targets: one `CheckpointError` (or a named `ValueError`), raised before
anything is touched, and `resume` falls back past a malformed checkpoint to the previous valid one."""

import hashlib
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from impl.training import CheckpointError, load_checkpoint, resume, save_checkpoint
from impl.training.data import ShuffledBatches


def _setup(seed: int = 0, *, data_seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.9**s)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "data": ShuffledBatches(10, 3, seed=data_seed),
    }


def _train(parts: dict, steps: int) -> None:
    for _ in range(steps):
        next(parts["data"])
        parts["optimizer"].zero_grad()
        parts["model"](torch.randn(3, 5)).square().mean().backward()
        parts["optimizer"].step()
        parts["scheduler"].step()


def _two_checkpoints(tmp_path):
    """step_00000002 and step_00000004 of one run; returns the model weights at step 2 and the newest path."""
    parts = _setup()
    _train(parts, 2)
    save_checkpoint(tmp_path, 2, **parts)
    older = {k: v.clone() for k, v in parts["model"].state_dict().items()}
    _train(parts, 2)
    return older, save_checkpoint(tmp_path, 4, **parts)


def _everything(parts: dict) -> dict:
    """A deep snapshot of every object a load may touch, the global RNGs included."""
    return {
        "model": {k: v.clone() for k, v in parts["model"].state_dict().items()},
        "optimizer": repr(parts["optimizer"].state_dict()),
        "scheduler": repr(parts["scheduler"].state_dict()),
        "data": parts["data"].state_dict(),
        "rng": (torch.get_rng_state(), random.getstate(), repr(np.random.get_state())),
    }


def _assert_untouched(parts: dict, before: dict) -> None:
    after = _everything(parts)
    for name, tensor in before["model"].items():
        assert torch.equal(after["model"][name], tensor), f"model {name} was overwritten"
    assert torch.equal(after["rng"][0], before["rng"][0]) and after["rng"][1:] == before["rng"][1:], "RNG changed"
    for part in ("optimizer", "scheduler", "data"):
        assert after[part] == before[part], f"{part} was changed"


def _edit_json(path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_bytes()))))


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def _rehash(checkpoint, name: str) -> None:
    """Make the manifest agree with a file edited by hand, so only the file's content is wrong."""
    data = (checkpoint / name).read_bytes()
    entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _edit_json(checkpoint / "manifest.json", lambda m: m | {"files": m["files"] | {name: entry}})


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


MALFORMED_MANIFESTS = {  # each edit returns the new manifest
    "entry-is-empty": (lambda m: m | {"files": m["files"] | {"model.safetensors": {}}}, r"model\.safetensors"),
    "entry-bytes-is-text": (
        lambda m: m | {"files": m["files"] | {"state.json": m["files"]["state.json"] | {"bytes": "12"}}},
        r"state\.json",
    ),
    "files-is-a-list": (lambda m: m | {"files": list(m["files"])}, r"files must be"),
    "no-files": (lambda m: _without(m, "files"), r"files must be"),
    "no-step": (lambda m: _without(m, "step"), r"step must be"),
    "step-is-text": (lambda m: m | {"step": "4"}, r"step must be"),
    "step-is-bool": (lambda m: m | {"step": True}, r"step must be"),
    "no-format": (lambda m: _without(m, "format"), r"format"),
    "is-a-list": (lambda m: [m], r"JSON list"),
    # item 7: the manifest must agree with what is on disk
    "step-disagrees-with-directory": (lambda m: m | {"step": 999}, r"step 999.*step_00000004"),
    "files-empty": (lambda m: m | {"files": {}}, r"lists \[\]"),
    "a-file-unlisted": (lambda m: m | {"files": _without(m["files"], "model.safetensors")}, r"model\.safetensors"),
    "an-unknown-file": (lambda m: m | {"files": m["files"] | {"x.bin": m["files"]["state.json"]}}, r"x\.bin"),
}


@pytest.mark.parametrize("case", list(MALFORMED_MANIFESTS))
def test_malformed_manifest_is_a_corrupt_checkpoint_and_resume_falls_back(tmp_path, case):
    older, newest = _two_checkpoints(tmp_path)
    edit, match = MALFORMED_MANIFESTS[case]
    _flip(newest / "model.safetensors")  # the manifest's lie must not let damaged tensors through
    _edit_json(newest / "manifest.json", edit)
    target = _setup(seed=1, data_seed=0)
    before = _everything(target)

    with pytest.raises(CheckpointError, match=rf"step_00000004: manifest\.json .*{match}") as error:
        load_checkpoint(newest, **target)
    assert "\n" not in str(error.value)
    _assert_untouched(target, before)

    with pytest.warns(RuntimeWarning, match=r"resuming from step_00000002"):
        found = resume(tmp_path, **target)
    assert found.step == 2
    assert all(torch.equal(v, older[k]) for k, v in target["model"].state_dict().items())


MALFORMED_STATES = {  # each edit returns the new state.json
    "not-an-object": (lambda s: [s], r"state\.json"),
    "no-step": (lambda s: _without(s, "step"), r"state\.json"),
    "step-disagrees": (lambda s: s | {"step": 3}, r"state\.json .*step 3"),
    "tied-to-nothing": (lambda s: s | {"tied": {"2.weight": "nowhere"}}, r"nowhere"),
    "lost-tensor": (lambda s: s | {"rng": s["rng"] | {"torch": {"__tensor__": "gone"}}}, r"gone"),
    "rng-garbage": (lambda s: s | {"rng": s["rng"] | {"python": [1, 2]}}, r"rng"),
    "optimizer-garbage": (lambda s: s | {"optimizer": {"state": {}, "param_groups": 3}}, r"optimizer"),
}


@pytest.mark.parametrize("case", list(MALFORMED_STATES))
def test_malformed_state_with_matching_hashes_is_refused_before_loading(tmp_path, case):
    _, newest = _two_checkpoints(tmp_path)
    edit, match = MALFORMED_STATES[case]
    _edit_json(newest / "state.json", edit)
    _rehash(newest, "state.json")
    target = _setup(seed=1)
    before = _everything(target)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(newest, **target)
    _assert_untouched(target, before)
    with pytest.warns(RuntimeWarning, match=r"resuming from step_00000002"):
        assert resume(tmp_path, **target).step == 2


def _two_groups(parts: dict) -> None:
    first, last = parts["model"][0], parts["model"][2]
    parts["optimizer"] = torch.optim.AdamW([{"params": first.parameters()}, {"params": last.parameters()}])
    parts["scheduler"] = torch.optim.lr_scheduler.LambdaLR(parts["optimizer"], [lambda s: 1.0, lambda s: 0.5])


def _step_lr(parts: dict) -> None:
    parts["scheduler"] = torch.optim.lr_scheduler.StepLR(parts["optimizer"], step_size=3)


def _no_optimizer_saved(parts: dict, checkpoint) -> None:
    save_checkpoint(checkpoint.parent, 4, model=parts["model"])


MISMATCHES = {
    "optimizer-with-two-groups": (_two_groups, r"optimizer has 2 parameter groups .* checkpoint .* has 1"),
    "scheduler-of-another-kind": (_step_lr, r"scheduler .*StepLR"),
    "data-of-another-seed": (lambda p: p.__setitem__("data", ShuffledBatches(10, 3, seed=7)), r"data state"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_mismatched_target_leaves_every_object_unchanged(tmp_path, case):
    _, newest = _two_checkpoints(tmp_path)
    change, match = MISMATCHES[case]
    target = _setup(seed=1)
    change(target)
    before = _everything(target)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(newest, **target)
    _assert_untouched(target, before)


def test_an_optimizer_without_saved_state_leaves_the_model_unchanged(tmp_path):
    source = _setup()
    path = save_checkpoint(tmp_path, 1, model=source["model"])
    target = _setup(seed=1)
    before = _everything(target)
    with pytest.raises(ValueError, match=r"optimizer was given, but checkpoint .* holds no optimizer state"):
        load_checkpoint(path, **target)
    _assert_untouched(target, before)
    load_checkpoint(path, model=target["model"])  # negative control: the same checkpoint does load the model
    assert all(torch.equal(v, source["model"].state_dict()[k]) for k, v in target["model"].state_dict().items())
