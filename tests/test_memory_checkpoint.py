"""`checkpoint` / `checkpoint_sequential` against plain autograd and `torch.utils.checkpoint`, bitwise on CPU."""

import pytest
import torch
import torch.utils.checkpoint as torch_ckpt
from torch import nn

from impl.memory import checkpoint, checkpoint_sequential, saved_tensor_bytes


def _mlp_layers(n: int, width: int = 16, p: float = 0.2) -> nn.Sequential:
    layers = []
    for _ in range(n):
        layers += [nn.Linear(width, width), nn.GELU(), nn.Dropout(p)]
    return nn.Sequential(*layers).train()


def _grads(fn, params, x, seed=7):
    """Loss and gradients (w.r.t. x and params) of fn(x).sum() from a fixed RNG state."""
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)
    out = fn(x)
    loss = out.pow(2).sum()
    grads = torch.autograd.grad(loss, [x, *params])
    return loss.detach(), grads


def _assert_bitwise(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb)
    assert len(ga) == len(gb) and all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.fixture
def layers():
    return _mlp_layers(4)


@pytest.fixture
def x():
    return torch.randn(3, 5, 16)


def test_checkpoint_matches_plain_and_torch_with_dropout(layers, x):
    params = list(layers.parameters())
    plain = _grads(layers, params, x)
    ours = _grads(lambda t: checkpoint(layers, t), params, x)
    theirs = _grads(lambda t: torch_ckpt.checkpoint(layers, t, use_reentrant=False), params, x)
    _assert_bitwise(ours, plain)
    _assert_bitwise(ours, theirs)


def test_negative_control_other_dropout_masks_or_weights_break_the_match(layers, x):
    params = list(layers.parameters())
    ours = _grads(lambda t: checkpoint(layers, t), params, x)
    other_seed = _grads(lambda t: checkpoint(layers, t), params, x, seed=8)
    assert not torch.equal(ours[1][1], other_seed[1][1])  # dropout is active and its masks matter
    with torch.no_grad():
        layers[0].weight[0, 0] += 1e-3
    perturbed = _grads(layers, params, x)
    assert not torch.equal(ours[1][1], perturbed[1][1])


def test_rng_is_restored_on_replay_and_untouched_after(layers, x):
    """The replay must reuse the forward's dropout masks and leave the global RNG where forward left it."""
    x = x.requires_grad_(True)
    torch.manual_seed(3)
    loss = checkpoint(layers, x).sum()
    after_forward = torch.get_rng_state()
    torch.rand(100)  # consume RNG between forward and backward, as a training loop may
    expected = torch.get_rng_state()
    loss.backward()
    assert torch.equal(torch.get_rng_state(), expected)
    assert not torch.equal(after_forward, expected)


def test_several_outputs_and_non_tensor_arguments():
    w = torch.randn(6, 6, requires_grad=True)

    def fn(a, scale, b, mode="tanh"):
        h = torch.tanh(a @ w) if mode == "tanh" else a @ w
        return {"h": h * scale, "parts": (h.sin(), b.exp())}, "label"

    def loss_of(out):
        return out[0]["h"].sum() + out[0]["parts"][0].pow(2).sum() + out[0]["parts"][1].sum()

    a, b = torch.randn(4, 6, requires_grad=True), torch.randn(3, requires_grad=True)
    ref = torch.autograd.grad(loss_of(fn(a, 0.5, b, mode="tanh")), [a, b, w])
    out = checkpoint(fn, a, 0.5, b, mode="tanh")
    assert out[1] == "label"
    got = torch.autograd.grad(loss_of(out), [a, b, w])
    assert all(torch.equal(g, r) for g, r in zip(got, ref))


def test_parameters_get_gradients_when_no_input_requires_grad(layers, x):
    """The reentrant-checkpoint pitfall: a frozen input (LoRA's frozen embeddings) must not cut the graph."""
    checkpoint(layers, x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers.parameters())


def test_retain_graph_allows_a_second_backward(layers, x):
    x = x.requires_grad_(True)
    loss = checkpoint(layers, x).pow(2).sum()
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert torch.equal(first, second)


def test_no_grad_runs_plainly(layers, x):
    layers.eval()
    with torch.no_grad():
        assert torch.equal(checkpoint(layers, x), layers(x))


def test_checkpoint_drops_internals_and_keeps_only_the_input(layers, x):
    x = x.requires_grad_(True)
    with saved_tensor_bytes() as plain:
        layers(x)
    with saved_tensor_bytes(exclude=layers.parameters()) as ckpt:
        checkpoint(layers, x)
    assert ckpt.bytes == x.untyped_storage().nbytes()
    assert plain.bytes > 4 * ckpt.bytes


def test_replay_that_computes_something_else_is_an_error():
    calls = []
    w = torch.randn(4, 4, requires_grad=True)

    def changes_shape(a):
        calls.append(1)
        return (a[: 5 - len(calls)] @ w).tanh()

    out = checkpoint(changes_shape, torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="replay saved"):
        out.sum().backward()


@pytest.mark.parametrize("segments", [1, 2, 3, 12], ids=lambda s: f"segments={s}")
def test_checkpoint_sequential_matches_plain_and_torch(segments):
    layers = _mlp_layers(4)  # 12 modules
    params = list(layers.parameters())
    x = torch.randn(2, 7, 16)
    plain = _grads(layers, params, x)
    ours = _grads(lambda t: checkpoint_sequential(layers, segments, t), params, x)
    theirs = _grads(lambda t: torch_ckpt.checkpoint_sequential(layers, segments, t, use_reentrant=False), params, x)
    _assert_bitwise(ours, plain)
    _assert_bitwise(ours, theirs)


def test_checkpoint_sequential_keeps_one_input_per_segment():
    layers = _mlp_layers(4)
    x = torch.randn(2, 7, 16, requires_grad=True)
    with saved_tensor_bytes(exclude=layers.parameters()) as saved:
        checkpoint_sequential(layers, 3, x)
    assert len(saved.storages) == 3
    assert saved.bytes == 3 * x.untyped_storage().nbytes()


@pytest.mark.parametrize("segments", [0, -1, 13], ids=lambda s: f"segments={s}")
def test_bad_segments(segments):
    with pytest.raises(
        ValueError, match=rf"segments must be between 1 and the number of layers \(12\), got {segments}"
    ):
        checkpoint_sequential(_mlp_layers(4), segments, torch.randn(2, 16))


def test_bad_types():
    with pytest.raises(TypeError, match="segments must be an int, got float"):
        checkpoint_sequential(_mlp_layers(1), 1.0, torch.randn(2, 16))
    with pytest.raises(TypeError, match="layers must be a sequence of callables .*, got Linear"):
        checkpoint_sequential(nn.Linear(2, 2), 1, torch.randn(2, 2))
    with pytest.raises(TypeError, match="fn must be callable, got Tensor"):
        checkpoint(torch.randn(2), torch.randn(2))
