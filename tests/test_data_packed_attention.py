"""Packed forward: with the document mask and restarting positions, every document's output equals the document
run alone, for the attention front's document mask, our GPT's trunk, transformers' GPT-2 and a tiny
transformers Llama with packed position ids; without the mask (or with running positions) they differ. The
Triton kernel's document masking is tested with the other backends in tests/test_attention_*.py."""

import pytest
import torch
import torch.nn.functional as F

from impl.attention import attention
from impl.common import tolerance
from impl.data import attention_document_ids, pack_documents
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


BACKENDS = ["naive", "sdpa", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_document_masked_attention_equals_each_document_alone(packed, backend):
    _, p = packed
    rows, heads, dim = p.document_ids.shape[0], 3, 8
    q, k, v = (torch.randn(rows, heads, SEQ_LEN, dim) for _ in range(3))
    out = attention(q, k, v, causal=True, document_ids=attention_document_ids(p.document_ids), backend=backend)

    def alone(r, where):  # the reference: SDPA, causal, on the document's slice only
        sl = [t[r][:, where][None] for t in (q, k, v)]
        return F.scaled_dot_product_attention(*sl, is_causal=True)[0]

    for r, _, where in _per_document(p, out):
        torch.testing.assert_close(out[r][:, where], alone(r, where), **ATOL_RTOL)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # negative control: no document mask
    first = p.document_ids[:, :1] != p.document_ids  # tokens that are not in the row's first document
    assert (plain - out).abs()[first[:, None, :, None].expand_as(out)].max() > 1e-3


def test_attention_document_ids_puts_padding_last():
    ids = torch.tensor([[3, 3, 1, -1, -1], [2, 2, 2, 2, 2]])  # FFD: documents out of id order, then padding
    assert attention_document_ids(ids).tolist() == [[0, 0, 1, 2, 2], [0, 0, 0, 0, 0]]


@pytest.fixture
def gpt():
    return GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32)).eval()


def _packed_logits(gpt, p):
    return gpt(p.input_ids, position_ids=p.position_ids, document_ids=attention_document_ids(p.document_ids))[0]


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_gpt_packed_logits_equal_each_document_alone(gpt, packed, backend):
    docs, p = packed
    for block in gpt.transformer.h:
        block.attn.backend = backend
    logits = _packed_logits(gpt, p)
    _assert_each_document_alone(docs, p, logits, lambda d: gpt(torch.tensor([docs[d]]))[0][0])
    plain, _ = gpt(p.input_ids)  # negative control: the packed rows through the plain causal model
    _assert_some_document_differs(docs, p, plain, lambda d: gpt(torch.tensor([docs[d]]))[0][0])


@pytest.mark.slow  # the first transformers model import in a process takes seconds
@torch.no_grad()
def test_gpt_packed_forward_matches_transformers_gpt2_with_packed_positions(gpt, packed):
    """The live reference: transformers builds the same block-diagonal mask from restarting position ids."""
    _, p = packed
    hf = gpt.to_hf().eval()
    ours = _packed_logits(gpt, p)
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


def test_bad_packed_inputs(gpt, packed):
    _, p = packed
    with pytest.raises(ValueError, match=r"document_ids must have shape \(\d+, 16\), got shape \(1, 16\)"):
        gpt(p.input_ids, position_ids=p.position_ids, document_ids=p.document_ids[:1])
    with pytest.raises(ValueError, match=r"position_ids must have shape \(\d+, 16\), got shape \(\d+, 3\)"):
        gpt(p.input_ids, position_ids=p.position_ids[:, :3])
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 32\), got \d+"):
        gpt(p.input_ids, position_ids=p.position_ids + 40)
    with pytest.raises(ValueError, match=r"document_ids must be non-decreasing along each row"):
        gpt(p.input_ids, document_ids=p.document_ids)  # raw packing ids: FFD order, padding (-1) last
    with pytest.raises(TypeError, match=r"document_ids must be an integer tensor, got torch.float32"):
        gpt(p.input_ids, document_ids=p.document_ids.float())
