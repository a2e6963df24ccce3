"""Megatron tensor parallelism against the single-process GPT and against torch.distributed.tensor.parallel.

One spawned group per world size (2 and 4) runs every check; the tests below read its per-rank results. The
single-process GPT is rebuilt on each rank from the same seed, so its gradients are sliced there the way ours
are (`shard_state_dict`), and compared with ours here.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from impl.common import tolerance
from impl.distributed import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    spawn,
    tensor_parallelize,
    vocab_parallel_cross_entropy,
)
from impl.distributed.tensor_parallel import ParallelMLP, TensorParallelGPT
from impl.gpt.model import GPT, MLP, Block, GPTConfig

pytestmark = pytest.mark.distributed

WORLD_SIZES = (2, 4)
TIMEOUT_S = 60
VOCAB = 11  # divides by neither 2 nor 4: padded to 12
CONFIG = dict(block_size=8, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=16)
BATCH, SEQ = 2, 8


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CONFIG))


def _tokens(perturb: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx, targets = (
        torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
        torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
    )
    if perturb:
        idx[0, 0] = (idx[0, 0] + 1) % VOCAB
    return idx, targets


def _grads(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


# ---- what the spawned ranks run ----


def _gpt_run(group) -> dict:
    gpt, idx_targets = _gpt(), _tokens()
    ours = tensor_parallelize(gpt, group)
    logits, loss = ours(*idx_targets)
    loss.backward()
    out = {"logits": ours.full_logits(logits).detach(), "loss": loss.detach(), "grads": _grads(ours)}
    rows = ours.transformer.wte.weight.shape[0]
    out["padding_rows"] = rows - min(rows, max(0, VOCAB - ours.transformer.wte.start))
    for perturb in (False, True):
        ref = _gpt()
        _, ref_loss = ref(*_tokens(perturb))
        ref_loss.backward()
        grads = _grads(ref)
        grads["lm_head.weight"] = grads["transformer.wte.weight"]  # tied: named once by named_parameters
        out["reference" + ("_perturbed" if perturb else "")] = ours.shard_state_dict(grads)
    return out


def _count_all_reduces(group) -> dict:
    """All-reduces one transformer block issues forward and backward (counted by wrapping dist.all_reduce)."""
    config = GPTConfig(**CONFIG)
    block = TensorParallelGPT(config, group).transformer.h[0]
    x = torch.randn(BATCH, SEQ, config.n_embd, requires_grad=True)
    calls, real = [], dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    try:
        y = block(x)
        forward = len(calls)
        y.sum().backward()
    finally:
        dist.all_reduce = real
    return {"forward": forward, "backward": len(calls) - forward}


def _torch_tp_run(group, world_size: int) -> dict:
    """The GPT's MLP, an embedding and the vocab-parallel loss under torch's DTensor tensor parallelism, next to
    ours on the same weights and inputs."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        loss_parallel,
        parallelize_module,
    )

    mesh = DeviceMesh("cpu", list(range(world_size)))
    config = GPTConfig(**CONFIG)
    x = torch.randn(BATCH, SEQ, config.n_embd, generator=torch.Generator().manual_seed(2))
    out = {}

    torch.manual_seed(3)
    theirs = MLP(config)
    ours = ParallelMLP(config, group)
    ours.load_state_dict(_mlp_shards(theirs, group))
    parallelize_module(theirs, mesh, {"c_fc": ColwiseParallel(), "c_proj": RowwiseParallel()})
    y_ours, y_theirs = ours(x), theirs(x)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    out["mlp"] = {
        "ours": (y_ours.detach(), {n: p.grad for n, p in ours.named_parameters()}),
        "theirs": (y_theirs.detach(), {n: p.grad.to_local() for n, p in theirs.named_parameters()}),
    }

    vocab = 4 * world_size  # torch's row-wise embedding wants whole shards
    torch.manual_seed(4)
    embedding = torch.nn.Embedding(vocab, config.n_embd)
    ours_embedding = VocabParallelEmbedding(vocab, config.n_embd, group)
    with torch.no_grad():
        ours_embedding.weight.copy_(embedding.weight.chunk(world_size)[dist.get_rank(group)])
    parallelize_module(embedding, mesh, RowwiseParallel(input_layouts=torch.distributed.tensor.Replicate()))
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    e_ours, e_theirs = ours_embedding(ids), embedding(ids)
    (e_ours * x).sum().backward()
    (e_theirs * x).sum().backward()
    out["embedding"] = {
        "ours": (e_ours.detach(), ours_embedding.weight.grad),
        "theirs": (e_theirs.detach(), _local_rows(embedding.weight.grad, group)),
    }

    torch.manual_seed(6)
    head = torch.nn.Linear(config.n_embd, vocab, bias=False)
    ours_head = ColumnParallelLinear(config.n_embd, vocab, group, bias=False)
    with torch.no_grad():
        ours_head.weight.copy_(head.weight.chunk(world_size)[dist.get_rank(group)])
    parallelize_module(head, mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    targets = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    loss_ours = vocab_parallel_cross_entropy(ours_head(x), targets, group)
    loss_ours.backward()
    with loss_parallel():
        loss_theirs = F.cross_entropy(head(x).flatten(0, 1), targets.flatten())
        loss_theirs.backward()
    out["loss"] = {
        "ours": (loss_ours.detach(), ours_head.weight.grad),
        "theirs": (loss_theirs.detach().full_tensor(), _local_rows(head.weight.grad, group)),
    }
    return out


def _local_rows(grad, group) -> torch.Tensor:
    """This rank's rows of a DTensor gradient, whatever its placement (torch may leave it Partial)."""
    return grad.full_tensor().chunk(dist.get_world_size(group))[dist.get_rank(group)]


def _mlp_shards(mlp, group) -> dict:
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    state = mlp.state_dict()
    return {
        "c_fc.weight": state["c_fc.weight"].chunk(tp)[rank],
        "c_fc.bias": state["c_fc.bias"].chunk(tp)[rank],
        "c_proj.weight": state["c_proj.weight"].chunk(tp, dim=1)[rank],
        "c_proj.bias": state["c_proj.bias"],
    }


def _bad_input_run(group) -> dict:
    def error(fn) -> str:
        try:
            fn()
        except (ValueError, TypeError) as err:
            return f"{type(err).__name__}: {err}"
        return "no error"

    world_size = dist.get_world_size(group)
    logits = torch.randn(BATCH, 3)
    return {
        "out_features": error(lambda: ColumnParallelLinear(4, 4 * world_size + 1, group)),
        "in_features": error(lambda: RowParallelLinear(4 * world_size + 1, 4, group)),
        "n_head": error(lambda: tensor_parallelize(GPT(GPTConfig(n_layer=1, n_head=world_size - 1, n_embd=12)), group)),
        "n_embd": error(lambda: TensorParallelGPT(GPTConfig(n_layer=1, n_head=1, n_embd=4 * world_size + 1), group)),
        "vocab_size": error(lambda: vocab_parallel_cross_entropy(logits, torch.zeros(BATCH).long(), group, 100)),
        "targets": error(lambda: vocab_parallel_cross_entropy(logits, torch.zeros(BATCH + 1).long(), group)),
    }


def _run_all(rank: int, world_size: int) -> dict:
    group = dist.group.WORLD
    return {
        "gpt": _gpt_run(group),
        "all_reduces": _count_all_reduces(group),
        "torch": _torch_tp_run(group, world_size),
        "bad_input": _bad_input_run(group),
    }


@pytest.fixture(scope="module")
def runs() -> dict:
    return {n: spawn(_run_all, n, timeout_s=TIMEOUT_S) for n in WORLD_SIZES}


@pytest.fixture(scope="module")
def single() -> dict:
    """The single-process GPT's logits and loss, on the batch and on a batch with one token changed."""
    out = {}
    for perturb in (False, True):
        logits, loss = _gpt()(*_tokens(perturb))
        out[perturb] = (logits.detach(), loss.detach())
    return out


def _assert_close(ours, reference, name: str = "") -> None:
    torch.testing.assert_close(ours, reference, **tolerance(torch.float32), msg=name or None)


# ---- equivalence with the single process ----


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"tp{n}")
def test_logits_and_loss_match_single_process(runs, single, world_size):
    for result in runs[world_size]:
        _assert_close(result["gpt"]["logits"], single[False][0])
        _assert_close(result["gpt"]["loss"], single[False][1])
    with pytest.raises(AssertionError):  # negative control: one changed token breaks the match
        _assert_close(result["gpt"]["logits"], single[True][0])


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"tp{n}")
def test_every_gradient_matches_single_process(runs, world_size):
    for result in runs[world_size]:
        grads, reference = result["gpt"]["grads"], result["gpt"]["reference"]
        assert grads.keys() <= reference.keys() and len(grads) == len(dict(_gpt().named_parameters()))
        for name, grad in grads.items():
            _assert_close(grad, reference[name], name)
    with pytest.raises(AssertionError):
        for name, grad in grads.items():
            _assert_close(grad, result["gpt"]["reference_perturbed"][name], name)


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"tp{n}")
def test_vocabulary_padding_gets_no_gradient(runs, world_size):
    """11 tokens padded to 12: the padding row (on the last rank) has zero gradient from the embedding and from
    the tied output layer, so it never moves, and the loss already matched without it."""
    padding = [result["gpt"]["padding_rows"] for result in runs[world_size]]
    assert sum(padding) == 12 - VOCAB and padding[-1] == 1
    last = runs[world_size][-1]["gpt"]["grads"]["transformer.wte.weight"]
    assert torch.count_nonzero(last[-1]) == 0
    assert torch.count_nonzero(last[:-1]) > 0


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"tp{n}")
def test_two_all_reduces_per_block_forward_and_backward(runs, world_size):
    for result in runs[world_size]:
        assert result["all_reduces"] == {"forward": 2, "backward": 2}


# ---- against torch.distributed.tensor.parallel ----


@pytest.mark.parametrize("layer", ["mlp", "embedding", "loss"])
@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"tp{n}")
def test_matches_torch_tensor_parallel(runs, world_size, layer):
    """ColwiseParallel + RowwiseParallel on the GPT's MLP, RowwiseParallel on an embedding, ColwiseParallel with
    loss_parallel on an output layer: same outputs and the same local gradient shards as ours."""
    for result in runs[world_size]:
        ours, theirs = result["torch"][layer]["ours"], result["torch"][layer]["theirs"]
        _assert_close(ours[0], theirs[0])
        if isinstance(ours[1], dict):
            for name in ours[1]:
                _assert_close(ours[1][name], theirs[1][name], name)
        else:
            _assert_close(ours[1], theirs[1])
    with pytest.raises(AssertionError):
        _assert_close(ours[0] + 1e-3 * ours[0].abs().mean(), theirs[0])


# ---- bad input ----


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"tp{n}")
def test_indivisible_sizes_are_rejected(runs, world_size):
    errors = runs[world_size][0]["bad_input"]
    n = world_size
    assert errors["out_features"] == (
        f"ValueError: out_features must be divisible by the tensor-parallel size {n}, got {4 * n + 1}"
    )
    assert errors["in_features"] == (
        f"ValueError: in_features must be divisible by the tensor-parallel size {n}, got {4 * n + 1}"
    )
    assert errors["n_head"] == f"ValueError: n_head must be divisible by the tensor-parallel size {n}, got {n - 1}"
    assert errors["n_embd"] == (
        f"ValueError: n_embd (the hidden size) must be divisible by the tensor-parallel size {n}, got {4 * n + 1}"
    )
    assert errors["vocab_size"] == f"ValueError: vocab_size must be in [1, {3 * n}] (logits' last dim x tp), got 100"
    assert errors["targets"] == f"ValueError: targets must have shape ({BATCH},), got ({BATCH + 1},)"


def test_layers_need_a_process_group():
    with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup, got NoneType"):
        ColumnParallelLinear(4, 4, None)


def test_tensor_parallelize_needs_a_gpt():
    with pytest.raises(TypeError, match=r"gpt must be an impl.gpt.GPT, got Block"):
        tensor_parallelize(Block(GPTConfig(**CONFIG)), None)
