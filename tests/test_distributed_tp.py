"""Megatron tensor parallelism, applied in place to the GPT, against the single-process GPT and against
torch.distributed.tensor.parallel.

One spawned group per world size (2 and 4) runs every check; the tests below read its per-rank results. The
single-process GPT is rebuilt on each rank from the same seed, so its gradients are sliced there the way ours
are (`shard_state_dict`), and compared with ours here.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from impl.common import tolerance
from impl.distributed import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_logits,
    full_state_dict,
    shard_state_dict,
    spawn,
    tensor_parallelize,
    tp_groups,
    unshard,
    vocab_parallel_cross_entropy,
)
from impl.gpt import GPT, Block, GPTConfig

pytestmark = pytest.mark.distributed

WORLD_SIZES = (2, 4)
TIMEOUT_S = 60
VOCAB = 11  # divides by neither 2 nor 4: padded to 12
CONFIG = dict(block_size=8, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=16)
BATCH, SEQ = 2, 8


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CONFIG))


def _tokens(perturb: bool = False, ignore: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch; `ignore` sets some targets to -100 (skipped by the loss), `perturb` changes one input token."""
    g = torch.Generator().manual_seed(1)
    idx, targets = (
        torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
        torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
    )
    if perturb:
        idx[0, 0] = (idx[0, 0] + 1) % VOCAB
    if ignore:
        targets[0, :3] = -100
        targets[1, -2:] = -100
    return idx, targets


def _grads(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


# ---- what the spawned ranks run ----


def _reference_grads(perturb: bool = False, ignore: bool = False) -> dict:
    ref = _gpt()
    _, loss = ref(*_tokens(perturb, ignore))
    loss.backward()
    grads = _grads(ref)
    grads["lm_head.weight"] = grads["transformer.wte.weight"]  # tied: named once by named_parameters
    return grads


def _gpt_run(group) -> dict:
    gpt = _gpt()
    ours = tensor_parallelize(gpt, group)
    block = ours.transformer.h[0]
    out = {
        "in_place": ours is gpt,
        "swapped": [type(m).__name__ for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
        + [type(ours.transformer.wte).__name__, type(ours.lm_head).__name__],
        "n_head": block.attn.n_head,
        "tied": ours.lm_head.weight is ours.transformer.wte.weight,
    }
    logits, loss = ours(*_tokens())
    loss.backward()
    out.update(logits=full_logits(ours, logits).detach(), loss=loss.detach(), grads=_grads(ours))
    rows = ours.transformer.wte.weight.shape[0]
    out["padding_rows"] = rows - min(rows, max(0, VOCAB - ours.transformer.wte.start))
    for perturb in (False, True):
        out["reference" + ("_perturbed" if perturb else "")] = shard_state_dict(ours, _reference_grads(perturb))
    ours.zero_grad()
    _, loss = ours(*_tokens(ignore=True))  # -100 targets are skipped, as F.cross_entropy skips them
    loss.backward()
    out["ignore"] = {"loss": loss.detach(), "grads": _grads(ours)}
    out["ignore"]["reference"] = shard_state_dict(ours, _reference_grads(ignore=True))
    out["state"] = full_state_dict(ours)  # the unsharded GPT's names and values back
    out["unshard_logits"] = unshard(ours)(_tokens()[0])[0].detach()
    return out


def _count_all_reduces(group) -> dict:
    """All-reduces one transformer block issues forward and backward (counted by wrapping dist.all_reduce)."""
    block = tensor_parallelize(_gpt(), group).transformer.h[0]
    x = torch.randn(BATCH, SEQ, CONFIG["n_embd"], requires_grad=True)
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
    theirs = _gpt().transformer.h[0].mlp  # the GPT's own MLP, swapped by hand on our side
    with torch.no_grad():  # weights of order one (GPT-2's init makes the output too small for the control)
        for p in theirs.parameters():
            p.uniform_(-0.5, 0.5)
    ours = copy.deepcopy(theirs)
    ours.c_fc = ColumnParallelLinear(config.n_embd, 4 * config.n_embd, group)
    ours.c_proj = RowParallelLinear(4 * config.n_embd, config.n_embd, group)
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


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _bad_input_run(group) -> dict:
    world_size = dist.get_world_size(group)
    logits = torch.randn(BATCH, 3)
    odd_heads = GPT(GPTConfig(n_layer=1, n_head=world_size - 1, n_embd=12))
    before = {name: t.clone() for name, t in odd_heads.state_dict().items()}
    out = {
        "out_features": _error(lambda: ColumnParallelLinear(4, 4 * world_size + 1, group)),
        "in_features": _error(lambda: RowParallelLinear(4 * world_size + 1, 4, group)),
        "n_head": _error(lambda: tensor_parallelize(odd_heads, group)),
        "n_embd": _error(
            lambda: tensor_parallelize(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=4 * world_size + 1)), group)
        ),
        "vocab_size": _error(lambda: vocab_parallel_cross_entropy(logits, torch.zeros(BATCH).long(), group, 100)),
        "targets": _error(lambda: vocab_parallel_cross_entropy(logits, torch.zeros(BATCH + 1).long(), group)),
        "not_parallel": _error(lambda: full_state_dict(_gpt())),
    }
    twice = tensor_parallelize(_gpt(), group)
    out["twice"] = _error(lambda: tensor_parallelize(twice, group))
    after = odd_heads.state_dict()  # the refused GPT is untouched: same modules, names and values
    out["untouched"] = type(odd_heads.transformer.h[0].attn.c_attn) is torch.nn.Linear and all(
        torch.equal(before[name], after[name]) for name in before
    )
    out["tp_groups"] = _error(lambda: tp_groups(world_size + 1))
    return out


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
    out["ignore"] = _gpt()(*_tokens(ignore=True))[1].detach()  # F.cross_entropy, ignore_index=-100
    out["state"] = _gpt().state_dict()
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
def test_parallelized_in_place(runs, world_size):
    """tensor_parallelize returns the GPT it was given, with the Megatron layers in place of its own, the heads
    split, and the output layer still tied to the (now vocab-parallel) embedding."""
    for result in runs[world_size]:
        gpt = result["gpt"]
        assert gpt["in_place"] and gpt["tied"] and gpt["n_head"] == CONFIG["n_head"] // world_size
        assert gpt["swapped"] == ["ColumnParallelLinear", "RowParallelLinear"] * 2 + [
            "VocabParallelEmbedding",
            "ColumnParallelLinear",
        ]


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"tp{n}")
def test_ignored_targets_match_single_process(runs, single, world_size):
    """Targets of -100 are skipped by the vocab-parallel loss as by F.cross_entropy: same mean loss (over the
    targets that count) and the same gradients; the loss on all targets differs (negative control)."""
    for result in runs[world_size]:
        ignore = result["gpt"]["ignore"]
        _assert_close(ignore["loss"], single["ignore"])
        for name, grad in ignore["grads"].items():
            _assert_close(grad, ignore["reference"][name], name)
    with pytest.raises(AssertionError):
        _assert_close(ignore["loss"], single[False][1])


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"tp{n}")
def test_full_state_dict_and_unshard_give_back_the_gpt(runs, single, world_size):
    """full_state_dict has the unsharded GPT's names, shapes and values (the checkpoint format), and the plain
    GPT that unshard builds from it gives the single-process logits."""
    reference = single["state"]
    for result in runs[world_size]:
        state = result["gpt"]["state"]
        assert list(state) == list(reference)
        for name, t in state.items():
            assert torch.equal(t, reference[name]), name  # slicing and gathering move values, never change them
        _assert_close(result["gpt"]["unshard_logits"], single[False][0])
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"].flip(0)
    assert not torch.equal(state["transformer.h.0.attn.c_attn.weight"], reference["transformer.h.0.attn.c_attn.weight"])


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
    assert errors["untouched"]  # the check comes before any weight is sliced
    assert errors["twice"] == (
        "ValueError: gpt is already tensor-parallel (tensor_parallelize was called on it before)"
    )
    assert errors["not_parallel"] == "ValueError: gpt must be a GPT returned by tensor_parallelize, got GPT"
    assert errors["tp_groups"] == f"ValueError: tp must divide the world size {n}, got {n + 1}"


def test_layers_need_a_process_group():
    with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup, got NoneType"):
        ColumnParallelLinear(4, 4, None)


def test_tensor_parallelize_needs_a_gpt():
    with pytest.raises(TypeError, match=r"gpt must be an impl.gpt.GPT, got Block"):
        tensor_parallelize(Block(GPTConfig(**CONFIG)), None)
