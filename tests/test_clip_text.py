"""The one caption encoder: CLIP's TextEncoder gives the pooled vector (the final LayerNorm at the first <eot>,
projected for CLIP) and the whole normalized token sequence (what GLIDE's UNet attends to); the <eot> id comes
from the tokenizer; GLIDE builds its caption encoder from the same class, with its own weights."""

import pytest
import torch

from impl.clip import CLIP, CLIPConfig, TextEncoder, WordTokenizer
from impl.common import tolerance
from impl.data import TRAIN_TEMPLATES, caption_texts
from impl.diffusion import glide
from impl.diffusion.unet import UNetConfig

TOL = tolerance(torch.float32)
TEXTS = ["a hand written number three", "the number seven", ""]


def _encoder(embed_dim: int | None = 16, eot_id: int = WordTokenizer.eot_id) -> tuple[TextEncoder, torch.Tensor]:
    tokenizer = WordTokenizer(caption_texts(TRAIN_TEMPLATES))
    torch.manual_seed(0)
    encoder = TextEncoder(len(tokenizer), 12, 32, 2, 4, embed_dim=embed_dim, eot_id=eot_id).eval()
    return encoder, tokenizer.encode(TEXTS, 12)


def test_tokenizer_names_its_special_tokens():
    tokenizer = WordTokenizer(["a digit three"])
    assert [tokenizer.vocab[i] for i in (tokenizer.pad_id, tokenizer.unk_id, tokenizer.eot_id)] == list(
        WordTokenizer.SPECIALS
    )
    assert tokenizer.encode(["three"], 4).tolist() == [[tokenizer.ids["three"], tokenizer.eot_id, 0, 0]]
    assert WordTokenizer(["<eot> a"]).vocab.count("<eot>") == 1  # a special in the text is not a second word


@pytest.mark.parametrize("embed_dim", [16, None], ids=["clip", "glide"])
def test_pooled_vector_is_the_sequence_at_the_first_eot(embed_dim):
    """pooled = proj(seq[first <eot>]) (no projection for GLIDE), against the sequence indexed by hand; the
    forward is the pooled vector. Negative control: the last position (padding) is another vector."""
    encoder, tokens = _encoder(embed_dim)
    with torch.no_grad():
        pooled, seq = encoder.encode(tokens)
        eot = [row.index(WordTokenizer.eot_id) for row in tokens.tolist()]
        by_hand = torch.stack([seq[i, e] for i, e in enumerate(eot)])
        if embed_dim is not None:
            by_hand = by_hand @ encoder.proj.weight.T
        assert seq.shape == (3, 12, 32) and pooled.shape == (3, embed_dim or 32)
        torch.testing.assert_close(pooled, by_hand, **TOL)
        assert torch.equal(encoder(tokens), pooled)
        last = seq[:, -1] if embed_dim is None else seq[:, -1] @ encoder.proj.weight.T
        assert not torch.allclose(pooled, last, **TOL)


def test_causal_pooling_ignores_padding_and_sees_the_caption():
    encoder, tokens = _encoder()
    padded = tokens.clone()
    padded[0, -1] = 5  # a word after the <eot>: causal attention keeps it from the pooled vector
    reworded = tokens.clone()
    reworded[0, 0] = 5  # a word before it: the pooled vector changes
    with torch.no_grad():
        base = encoder(tokens)
        torch.testing.assert_close(encoder(padded), base, **TOL)
        assert not torch.allclose(encoder(reworded)[0], base[0], **TOL)


def test_the_eot_id_is_the_encoders_not_a_constant():
    """An encoder told another <eot> id pools there: the same weights and tokens with the id moved give the
    vector at the new id's position, and differ from the default (negative control)."""
    default, tokens = _encoder()
    moved, _ = _encoder(eot_id=5)
    moved.load_state_dict(default.state_dict())
    swapped = torch.where(tokens == WordTokenizer.eot_id, 5, torch.where(tokens == 5, WordTokenizer.eot_id, tokens))
    with torch.no_grad():
        _, seq = default.encode(swapped)
        at_five = torch.stack([seq[i, row.index(5)] for i, row in enumerate(swapped.tolist())]) @ default.proj.weight.T
        torch.testing.assert_close(moved(swapped), at_five, **TOL)
        assert not torch.allclose(moved(swapped), default(tokens), **TOL)


def test_clip_and_glide_share_the_class_with_their_own_weights():
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(vocab_size=40, width=32, embed_dim=16))
    model = glide.GlideModel(glide.GlideConfig(vocab_size=40, text_width=32, text_layers=1,
                                               unet=UNetConfig(channels=16, emb_dim=32, groups=4)))  # fmt: skip
    assert type(clip.text) is TextEncoder and type(model.text) is TextEncoder
    assert model.text.proj is None and clip.text.proj is not None
    assert not set(map(id, clip.parameters())) & set(map(id, model.parameters()))


def test_bad_input_names_the_argument():
    encoder, tokens = _encoder()
    with pytest.raises(ValueError, match="width must be divisible by heads=3, got 32"):
        TextEncoder(10, 12, 32, 1, 3)
    with pytest.raises(ValueError, match=r"eot_id must be an int in \[0, 9\], got 10"):
        TextEncoder(10, 12, 32, 1, 4, eot_id=10)
    with pytest.raises(TypeError, match="tokens must be an integer tensor, got torch.float32"):
        encoder.check_tokens(tokens.float())
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, 12\), got \(3, 11\)"):
        encoder.check_tokens(tokens[:, :11], length=12)
