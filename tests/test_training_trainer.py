"""The trainer loop against a plain PyTorch loop, determinism, resume-to-a-total, the data order, bad input."""

import copy
import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from impl.common import tolerance
from impl.training import Trainer, set_deterministic
from impl.training.data import ShuffledBatches

X = torch.randn(24, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randn(24, 2, generator=torch.Generator().manual_seed(2))


def _model(seed: int | None = 0, dropout: float = 0.0) -> nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 2))


def _loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _data(batch_size: int = 4) -> ShuffledBatches:
    return ShuffledBatches(24, batch_size, seed=3, make_batch=lambda i: (X[i], Y[i]))


def _trainer(model, grad_accum=2, **kwargs) -> Trainer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    kwargs = {"scheduler": scheduler, "grad_accum_steps": grad_accum, "clip_grad_norm": 0.3, "progress": False} | kwargs
    return Trainer(model, optimizer, _loss, _data(), **kwargs)


def _plain_loop(model: nn.Module, steps: int, grad_accum: int) -> None:
    """The reference: the textbook PyTorch loop (nanoGPT's train.py without the extras)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    data = _data()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(grad_accum):
            x, y = next(data)
            (F.mse_loss(model(x), y) / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        optimizer.step()
        scheduler.step()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_trainer_equals_plain_pytorch_loop():
    ours, reference, perturbed = _model(), _model(), _model()
    with torch.no_grad():
        perturbed[0].weight[0, 0] += 1e-3
    _trainer(ours).fit(5)
    _plain_loop(reference, steps=5, grad_accum=2)
    _plain_loop(perturbed, steps=5, grad_accum=2)
    assert _bitwise_equal(_params(ours), _params(reference))
    assert not _bitwise_equal(_params(perturbed), _params(reference))  # negative control


def test_grad_accumulation_matches_one_large_batch():
    # 4 micro-batches of 2 average to the gradient of the batch of 8 (mean losses, equal sizes).
    micro = [(X[i : i + 2], Y[i : i + 2]) for i in range(0, 8, 2)]
    grads = {}
    for name, accum, batches in [("accum", 4, micro), ("full", 1, [(X[:8], Y[:8])]), ("short", 4, micro[:1] * 4)]:
        model = _model()
        it = iter(batches)
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), _loss, lambda it=it: next(it),
                          grad_accum_steps=accum, progress=False)  # fmt: skip
        trainer.step()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads["accum"], grads["full"], **tolerance(torch.float32))
    assert not torch.allclose(grads["short"], grads["full"])  # negative control: other micro-batches differ


def test_same_seed_is_bitwise_identical_and_another_seed_differs():
    def run(seed):
        with set_deterministic(seed):
            model = _model(seed=None, dropout=0.3)  # initialized from the seed too
            _trainer(model).fit(6)
        return _params(model)

    assert _bitwise_equal(run(7), run(7))
    assert not _bitwise_equal(run(7), run(8))  # negative control


def test_set_deterministic_restores_the_previous_settings():
    before = (torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    with set_deterministic(0) as previous:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", before[1])
        assert previous.deterministic_algorithms == before[0]
    assert (torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before


def test_fit_counts_to_a_total_and_resumes_from_the_newest_checkpoint(tmp_path):
    seen = []
    first = _trainer(_model(), checkpoint_dir=tmp_path, checkpoint_every=2, keep_last=2)
    first.fit(5, callback=lambda step, loss: seen.append(step))
    assert seen == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]  # every 2, and the end

    again = _trainer(_model(seed=1), checkpoint_dir=tmp_path)
    assert again.resume().step == 5 and again.step_count == 5
    assert _bitwise_equal(_params(again.model), _params(first.model))
    assert again.fit(5) == []  # already there
    assert len(again.fit(7)) == 2

    reference = copy.deepcopy(first)  # the run that was never interrupted, continued without checkpoints
    reference.checkpoint_dir, reference.checkpoint_every = None, 0
    reference.fit(7)
    assert _bitwise_equal(_params(again.model), _params(reference.model))


def test_in_process_resume_is_bitwise_on_the_device(tmp_path, device):
    # On CUDA this also covers the CUDA RNG: the batches and the dropout masks are drawn on the device. The
    # callback draws from the RNG too (as an evaluation on random batches does): the checkpoint must follow it.
    def build(seed, name):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Embedding(11, 8), nn.Dropout(0.2), nn.Linear(8, 11)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        data = lambda: torch.randint(0, 11, (4, 6), device=device)
        loss_fn = lambda m, t: F.cross_entropy(m(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())
        return Trainer(model, optimizer, loss_fn, data, grad_accum_steps=2, checkpoint_dir=tmp_path / name,
                       checkpoint_every=2, progress=False)  # fmt: skip

    def state(trainer):
        opt = trainer.optimizer.state_dict()["state"]
        return _params(trainer.model) + [v for s in opt.values() for v in s.values()]

    evaluate = lambda step, loss: torch.rand(3, device=device)
    with set_deterministic(0):
        uninterrupted = build(0, "uninterrupted")
        uninterrupted.fit(6, callback=evaluate)
    with set_deterministic(0):
        build(0, "crashed").fit(3, callback=evaluate)
        shutil.rmtree(tmp_path / "crashed" / "step_00000003")  # the crash: step 3 never reached the disk
    second = build(1, "crashed")
    assert second.resume().step == 2
    second.fit(6, callback=evaluate)
    assert _bitwise_equal(state(second), state(uninterrupted))


def test_resume_refuses_another_config(tmp_path):
    _trainer(_model(), checkpoint_dir=tmp_path, config={"width": 16}).fit(1)
    other = _trainer(_model(), checkpoint_dir=tmp_path, config={"width": 32})
    with pytest.raises(ValueError, match=r"config does not match .*'width': \(16, 32\)"):
        other.resume()


def test_resume_with_no_checkpoint_changes_nothing(tmp_path):
    trainer = _trainer(_model(), checkpoint_dir=tmp_path)
    before = _params(trainer.model)
    assert trainer.resume() is None and trainer.step_count == 0
    assert _bitwise_equal(_params(trainer.model), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"grad_accum_steps": 0}, ValueError, r"grad_accum_steps must be a positive int, got 0"),
        ({"clip_grad_norm": -1.0}, ValueError, r"clip_grad_norm must be None or a number > 0, got -1\.0"),
        ({"checkpoint_every": 5}, ValueError, r"checkpoint_every=5 needs a checkpoint_dir, got None"),
        ({"checkpoint_every": -1}, ValueError, r"checkpoint_every must be an int >= 0 \(0: never\), got -1"),
        ({"keep_last": 0, "checkpoint_dir": "x"}, ValueError, r"keep_last must be an int >= 1, got 0"),
        ({"scheduler": object()}, TypeError, r"scheduler must have step\(\)/state_dict\(\)/load_state_dict\(\), got"),
        ({"data": iter([1, 2])}, TypeError, r"data must be a callable .* or an iterator with state_dict.*got list_it"),
        ({"loss_fn": 3}, TypeError, r"loss_fn must be callable as loss_fn\(model, batch\), got int"),
        ({"optimizer": "adam"}, TypeError, r"optimizer must be a torch\.optim\.Optimizer, got str"),
        ({"model": "gpt"}, TypeError, r"model must be a torch\.nn\.Module, got str"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    model = _model()
    args = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "loss_fn": _loss,
            "data": _data()} | kwargs  # fmt: skip
    with pytest.raises(error, match=match):
        Trainer(args.pop("model"), args.pop("optimizer"), args.pop("loss_fn"), args.pop("data"), **args)


def test_loss_fn_must_return_a_scalar():
    trainer = Trainer(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), lambda m, b: m(b[0]), _data())
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got \(4, 2\)"):
        trainer.step()
    with pytest.raises(ValueError, match=r"num_steps must be an int >= 0, got -2"):
        trainer.fit(-2)


@settings(max_examples=40, deadline=None)
@given(items=st.integers(1, 30), batch=st.integers(1, 30), drawn=st.integers(0, 20), ahead=st.integers(1, 10))
def test_shuffled_batches_resume_and_cover_every_item(items, batch, drawn, ahead):
    # Properties: a restored position replays the same batches; each epoch visits each item at most once.
    batch = min(batch, items)
    data = ShuffledBatches(items, batch, seed=5)
    for _ in range(drawn):
        next(data)
    state = data.state_dict()
    expected = [next(data) for _ in range(ahead)]
    restored = ShuffledBatches(items, batch, seed=5)
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [next(restored) for _ in range(ahead)]))
    fresh = ShuffledBatches(items, batch, seed=5)
    epoch = torch.cat([next(fresh) for _ in range(items // batch)])
    assert len(set(epoch.tolist())) == len(epoch) == (items // batch) * batch


def test_shuffled_batches_bad_input():
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, num_items=4\], got 5"):
        ShuffledBatches(4, 5)
    with pytest.raises(ValueError, match=r"num_items must be an int >= 1, got 0"):
        ShuffledBatches(0, 1)
    with pytest.raises(ValueError, match=r"data state was saved for .*'seed': 1.*this iterator is .*'seed': 2"):
        ShuffledBatches(4, 2, seed=2).load_state_dict(ShuffledBatches(4, 2, seed=1).state_dict())
