"""Packed forward: with the document mask and restarting positions, every document's output equals the document
run alone, for the masked attention itself, our GPT, transformers' GPT-2 and a tiny transformers Llama with
packed position ids; without the mask (or with running positions) they differ."""

import pytest
import torch
import torch.nn.functional as F

from impl.common import tolerance
from impl.data import pack_documents
from impl.data.packed_attention import gpt_packed_forward, packed_attention
from impl.gpt import GPT, GPTConfig

LENGTHS = (5, 9, 3, 11, 4, 7, 2)  # not multiples of anything; FFD into 16 leaves padding in some rows
SEQ_LEN = 16
VOCAB = 50
ATOL_RTOL = tolerance(torch.float32)


@pytest.fixture
def packed():
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    return docs, pack_documents(docs, SEQ_LEN, "ffd")


def _per_document(packed, out):
    """(row, document id, positions) for every document placed in the packed rows."""
    for r in range(packed.document_ids.shape[0]):
        for d in sorted(set(packed.document_ids[r].tolist()) - {-1}):
            yield r, d, packed.document_ids[r] == d


def _assert_each_document_alone(docs, packed, packed_out, alone_fn):
    for r, d, where in _per_document(packed, packed_out):
        torch.testing.assert_close(packed_out[r][where], alone_fn(d), **ATOL_RTOL)


def _assert_some_document_differs(docs, packed, packed_out, alone_fn):
    errors = [
        (packed_out[r][where] - alone_fn(d)).abs().max().item() for r, d, where in _per_document(packed, packed_out)
    ]
    assert max(errors) > 1e-3


METHODS = [("naive", "auto"), ("sdpa", "auto"), ("segments", "naive"), ("segments", "torch"), ("segments", "sdpa")]


@pytest.mark.parametrize(("method", "backend"), METHODS, ids=[f"{m}-{b}" for m, b in METHODS])
def test_packed_attention_equals_each_document_alone(packed, method, backend):
    _, p = packed
    rows, heads, dim = p.document_ids.shape[0], 3, 8
    q, k, v = (torch.randn(rows, heads, SEQ_LEN, dim) for _ in range(3))
    out = packed_attention(q, k, v, p.document_ids, method=method, backend=backend)

    def alone(r, where):  # the reference: SDPA, causal, on the document's slice only
        sl = [t[r][:, where][None] for t in (q, k, v)]
        return F.scaled_dot_product_attention(*sl, is_causal=True)[0]

    for r, _, where in _per_document(p, out):
        torch.testing.assert_close(out[r][:, where], alone(r, where), **ATOL_RTOL)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # negative control: no document mask
    first = p.document_ids[:, :1] != p.document_ids  # tokens that are not in the row's first document
    assert (plain - out).abs()[first[:, None, :, None].expand_as(out)].max() > 1e-3


@pytest.fixture
def gpt():
    return GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32)).eval()


@pytest.mark.parametrize(("method", "backend"), METHODS, ids=[f"{m}-{b}" for m, b in METHODS])
@torch.no_grad()
def test_gpt_packed_logits_equal_each_document_alone(gpt, packed, method, backend):
    docs, p = packed
    logits = gpt_packed_forward(gpt, p.input_ids, p.position_ids, p.document_ids, method=method, backend=backend)
    _assert_each_document_alone(docs, p, logits, lambda d: gpt(torch.tensor([docs[d]]))[0][0])
    plain, _ = gpt(p.input_ids)  # negative control: the packed rows through the plain causal model
    _assert_some_document_differs(docs, p, plain, lambda d: gpt(torch.tensor([docs[d]]))[0][0])


@pytest.mark.slow  # the first transformers model import in a process takes seconds
@torch.no_grad()
def test_gpt_packed_forward_matches_transformers_gpt2_with_packed_positions(gpt, packed):
    """The live reference: transformers builds the same block-diagonal mask from restarting position ids."""
    _, p = packed
    hf = gpt.to_hf().eval()
    ours = gpt_packed_forward(gpt, p.input_ids, p.position_ids, p.document_ids)
    theirs = hf(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, **ATOL_RTOL)  # padding segments included: both causal within them
    running = torch.arange(SEQ_LEN).expand_as(p.position_ids)  # negative control: positions that never restart
    assert (hf(input_ids=p.input_ids, position_ids=running, use_cache=False).logits - ours).abs().max() > 1e-3


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_llama_with_packed_position_ids_equals_each_document_alone(packed, attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    docs, p = packed
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(config).eval()

    def alone(d):
        return model(input_ids=torch.tensor([docs[d]]), use_cache=False).logits[0]

    # No attention_mask and no cache: transformers reads the document boundaries off the position ids.
    logits = model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).logits
    _assert_each_document_alone(docs, p, logits, alone)
    running = torch.arange(SEQ_LEN).expand_as(p.position_ids)  # negative control: one sequence per row
    plain = model(input_ids=p.input_ids, position_ids=running, use_cache=False).logits
    _assert_some_document_differs(docs, p, plain, alone)


def test_bad_packed_attention_inputs(packed):
    _, p = packed
    q = torch.randn(p.document_ids.shape[0], 2, SEQ_LEN, 4)
    with pytest.raises(ValueError, match=r"method must be one of \('naive', 'sdpa', 'segments'\), got 'flex'"):
        packed_attention(q, q, q, p.document_ids, method="flex")
    with pytest.raises(
        ValueError, match=r"document_ids must have shape \(rows, seq_len\) = \(\d+, 16\), got \(1, 16\)"
    ):
        packed_attention(q, q, q, p.document_ids[:1])
    with pytest.raises(ValueError, match=r"q, k, v must share one \(rows, heads, seq_len, head_dim\) shape"):
        packed_attention(q, q[:, :1], q, p.document_ids)
    with pytest.raises(TypeError, match=r"document_ids must be a torch.Tensor, got list"):
        packed_attention(q, q, q, p.document_ids.tolist())
    with pytest.raises(TypeError, match=r"model must be an impl.gpt.GPT, got Linear"):
        gpt_packed_forward(torch.nn.Linear(2, 2), p.input_ids, p.position_ids, p.document_ids)
    with pytest.raises(ValueError, match=r"position_ids must be a \(rows, seq_len\) tensor shaped like input_ids"):
        gpt = GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=8))
        gpt_packed_forward(gpt, p.input_ids, p.position_ids[:, :3], p.document_ids)


@pytest.mark.gpu
def test_segments_through_the_triton_kernel_on_cuda(packed):
    """The per-segment path lets the FlashAttention-2 Triton kernel serve packed rows without a mask argument."""
    _, p = packed
    doc_ids = p.document_ids.cuda()
    q, k, v = (torch.randn(doc_ids.shape[0], 2, SEQ_LEN, 16, device="cuda") for _ in range(3))
    out = packed_attention(q, k, v, doc_ids, method="segments", backend="triton")
    torch.testing.assert_close(out, packed_attention(q, k, v, doc_ids, method="sdpa"), **ATOL_RTOL)
