"""Checkpoints: exact round trip, refusal of corrupted files, fallback to the newest valid one, tied weights."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from impl.training import CheckpointError, load_checkpoint, resume, save_checkpoint
from impl.training import checkpoint as checkpoint_module
from impl.training._state import decode, encode
from impl.training.data import ShuffledBatches


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.9**s)
    data = ShuffledBatches(10, 3, seed=0)  # the order is the run's, not the model's
    return model, optimizer, scheduler, data


def _train(model, optimizer, scheduler, data, steps: int) -> None:
    for _ in range(steps):
        indices = next(data)
        x = torch.randn(len(indices), 5)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        scheduler.step()


def _snapshot(model, optimizer, scheduler, data) -> dict:
    opt = optimizer.state_dict()
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": {(i, k): v.clone() for i, s in opt["state"].items() for k, v in s.items()},
        "groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),
        "data": data.state_dict(),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys() and a["optimizer"].keys() == b["optimizer"].keys()
    for part in ("model", "optimizer"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part} {key} differs"
    assert a["groups"] == b["groups"] and a["scheduler"] == b["scheduler"] and a["data"] == b["data"]


def _save(directory, step, parts, **kwargs):
    model, optimizer, scheduler, data = parts
    return save_checkpoint(directory, step, model=model, optimizer=optimizer, scheduler=scheduler, data=data, **kwargs)


def _load_kwargs(parts) -> dict:
    model, optimizer, scheduler, data = parts
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": data}


def test_round_trip_restores_every_state_exactly(tmp_path):
    parts = _setup()
    _train(*parts, steps=3)
    saved = _snapshot(*parts)
    path = _save(tmp_path, 3, parts, config={"width": 7, "betas": (0.8, 0.95)}, extra={"tokens_seen": 123})
    rng_next = (torch.rand(4), random.random(), np.random.rand())

    fresh = _setup(seed=1)
    _train(*fresh, steps=5)
    with pytest.raises(AssertionError):  # negative control: the fresh run really is somewhere else
        _assert_same(_snapshot(*fresh), saved)
    found = load_checkpoint(path, **_load_kwargs(fresh))

    _assert_same(_snapshot(*fresh), saved)
    assert (found.step, found.config, found.extra) == (3, {"width": 7, "betas": (0.8, 0.95)}, {"tokens_seen": 123})
    t, r, n = rng_next
    assert torch.equal(torch.rand(4), t) and random.random() == r and np.random.rand() == n


def _two_checkpoints(tmp_path):
    parts = _setup()
    _train(*parts, steps=2)
    _save(tmp_path, 2, parts)
    older = _snapshot(*parts)
    _train(*parts, steps=2)
    newest = _save(tmp_path, 4, parts)
    return older, newest


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


CORRUPTIONS = {
    "flipped-model": ("model.safetensors", _flip),
    "truncated-optimizer": ("optimizer.safetensors", _truncate),
    "missing-state": ("state.json", lambda p: p.unlink()),
    "missing-manifest": ("manifest.json", lambda p: p.unlink()),
    "garbled-manifest": ("manifest.json", lambda p: p.write_text("{not json")),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_checkpoint_is_refused_and_resume_falls_back(tmp_path, corruption):
    older, newest = _two_checkpoints(tmp_path)
    name, damage = CORRUPTIONS[corruption]
    damage(newest / name)
    target = _setup(seed=1)
    before = _snapshot(*target)

    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(newest, **_load_kwargs(target))
    _assert_same(_snapshot(*target), before)  # refused before anything was loaded

    with pytest.warns(RuntimeWarning, match=rf"step_00000004.*{name}.*resuming from step_00000002|"
                      rf"resuming from step_00000002.*{name}"):  # fmt: skip
        found = resume(tmp_path, **_load_kwargs(target))
    assert found.step == 2
    _assert_same(_snapshot(*target), older)
    assert newest.exists(), "an invalid checkpoint is kept for inspection, not deleted"


def test_nothing_valid_is_a_clear_error_and_nothing_is_deleted(tmp_path):
    _, newest = _two_checkpoints(tmp_path)
    _flip(newest / "model.safetensors")
    _truncate(tmp_path / "step_00000002" / "state.json")
    with pytest.raises(CheckpointError, match=r"no valid checkpoint .*2 found, none deleted"):
        resume(tmp_path, **_load_kwargs(_setup()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004"]


def test_resume_with_no_checkpoint_returns_none(tmp_path):
    assert resume(tmp_path / "never-written") is None


def test_keep_last_prunes_oldest_and_ignores_unrelated_files(tmp_path):
    parts = _setup()
    (tmp_path / "notes.txt").write_text("mine")
    for step in range(1, 6):
        _save(tmp_path, step, parts, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step_00000004", "step_00000005"]


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    parts = _setup()
    _save(tmp_path, 5, parts)
    _train(*parts, steps=1)
    path = _save(tmp_path, 3, parts, keep_last=1)  # an older step than one on disk (a rewound run)
    assert path.is_dir() and load_checkpoint(path, model=_setup(seed=1)[0]).step == 3
    # the newest (step 5) is kept too: pruning removes only checkpoints older than both
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000005"]
    _save(tmp_path, 4, parts, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]


def test_failed_write_leaves_previous_checkpoints_and_no_partial_one(tmp_path, monkeypatch):
    parts = _setup()
    _save(tmp_path, 1, parts)
    write = checkpoint_module._write_file

    def failing(path, data):
        if path.name == "state.json":
            raise OSError("disk full")
        return write(path, data)

    monkeypatch.setattr(checkpoint_module, "_write_file", failing)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, parts)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
    assert resume(tmp_path, model=parts[0]).step == 1


def test_saving_a_step_again_replaces_it(tmp_path):
    parts = _setup()
    _save(tmp_path, 3, parts)
    _train(*parts, steps=1)
    _save(tmp_path, 3, parts)
    target = _setup(seed=1)
    load_checkpoint(tmp_path / "step_00000003", **_load_kwargs(target))
    _assert_same(_snapshot(*target), _snapshot(*parts))


def _gpt2(n_embd: int = 16, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=50, n_positions=16, n_embd=n_embd, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def test_tied_weights_survive_the_round_trip(tmp_path):
    from safetensors.torch import load_file

    source, target = _gpt2(seed=0), _gpt2(seed=1)
    idx = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        expected = source(idx).logits
        assert not torch.allclose(target(idx).logits, expected)  # negative control
    path = save_checkpoint(tmp_path, 0, model=source)
    stored = load_file(path / "model.safetensors")
    assert ("lm_head.weight" in stored) != ("transformer.wte.weight" in stored), "a tied weight is stored once"

    load_checkpoint(path, model=target)
    assert target.lm_head.weight is target.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(target(idx).logits, expected, rtol=0, atol=0)


def test_loading_into_another_config_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 0, model=_gpt2(n_embd=16), config={"n_embd": 16})
    wider = _gpt2(n_embd=32)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"another config: .*model has \(\(50, 32\), torch\.float32\), checkpoint has \(\(50, 16\)"
    ):
        load_checkpoint(path, model=wider)
    with pytest.raises(ValueError, match=r"config does not match .*'n_embd': \(16, 32\)"):
        load_checkpoint(path, model=wider, config={"n_embd": 32})
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step": -1}, ValueError, r"step must be an int >= 0, got -1"),
        ({"step": 1.5}, ValueError, r"step must be an int >= 0, got 1\.5"),
        ({"model": "weights"}, TypeError, r"model must be a torch\.nn\.Module, got str"),
        ({"optimizer": "adam"}, TypeError, r"optimizer must be a torch\.optim\.Optimizer or None, got str"),
        ({"scheduler": 3}, TypeError, r"scheduler must have state_dict\(\)/load_state_dict\(\) or be None, got int"),
        ({"keep_last": 0}, ValueError, r"keep_last must be a positive int, got 0"),
        ({"config": [1, 2]}, TypeError, r"config must be a dict or None, got list"),
        ({"config": {"fn": print}}, TypeError, r"cannot checkpoint 'config\.fn'.*got builtin_function_or_method"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, error, match):
    args = {"step": 1, "model": nn.Linear(2, 2)} | kwargs
    with pytest.raises(error, match=match):
        save_checkpoint(tmp_path, args.pop("step"), **args)
    assert not list(tmp_path.glob("step_*"))


def test_load_of_a_missing_directory_or_a_wrong_model_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"step_00000009 does not exist"):
        load_checkpoint(tmp_path / "step_00000009")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got dict"):
        resume(tmp_path, model={})


_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.floats(allow_nan=False), st.text(max_size=5)
)
_keys = st.one_of(st.integers(0, 9), st.text(max_size=4), st.sampled_from(["__tensor__", "__tuple__"]))
_nested = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.tuples(inner, inner), st.dictionaries(_keys, inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(value=_nested, with_tensor=st.booleans())
def test_state_encoding_round_trips(value, with_tensor):
    # Property: any nested optimizer/scheduler/data state comes back equal, types (tuple, int keys) included.
    import json

    value = {"v": value, "t": torch.arange(3.0)} if with_tensor else value
    tensors: dict = {}
    back = decode(json.loads(json.dumps(encode(value, "s", tensors))), tensors)
    if with_tensor:
        assert torch.equal(back.pop("t"), value["t"])
        value = {"v": value["v"]}
    assert back == value and type(back) is type(value)


def test_state_encoding_keeps_tensors_whose_paths_collide():
    value = {"a.b": torch.zeros(2), "a": {"b": torch.ones(2)}, 0: torch.full((1,), 2.0), "0": torch.full((1,), 3.0)}
    tensors: dict = {}
    back = decode(encode(value, "s", tensors), tensors)
    assert back.keys() == value.keys() and all(torch.equal(back[k], value[k]) for k in ("a.b", 0, "0"))
    assert torch.equal(back["a"]["b"], value["a"]["b"])
