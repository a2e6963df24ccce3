"""CLIP's contrastive loss against transformers' CLIPModel; SimCLR's NT-Xent against a hand computation; bad input.

transformers' `CLIPModel.forward` normalizes the pooled projections, scales the cosines by `logit_scale.exp()` and
averages the two cross-entropies (`image_text_contrastive_loss`); ours must give the same loss and gradients on the
same embeddings and scale, both from random tensors and from a live tiny CLIPModel's own forward.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.clip import clip_loss, nt_xent_loss, zero_shot_predict
from impl.common import tolerance

TOL = tolerance(torch.float32)


def _hf_loss(image_embeds, text_embeds, logit_scale):
    """The loss exactly as transformers' CLIPModel.forward computes it from its projected features."""
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
    logits_per_text = text_embeds @ image_embeds.t() * logit_scale.exp()
    return image_text_contrastive_loss(logits_per_text)


@pytest.mark.parametrize("batch,dim", [(1, 4), (7, 16), (32, 5)], ids=lambda v: str(v))
def test_clip_loss_equals_transformers_loss_and_gradients(batch, dim):
    g = torch.Generator().manual_seed(batch * 100 + dim)
    image = (torch.randn(batch, dim, generator=g) * 3).requires_grad_()  # not unit-norm: the loss normalizes
    text = (torch.randn(batch, dim, generator=g) * 0.5).requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    ours = clip_loss(image, text, scale)
    grads = torch.autograd.grad(ours, (image, text, scale))
    reference = _hf_loss(image, text, scale)
    ref_grads = torch.autograd.grad(reference, (image, text, scale))
    torch.testing.assert_close(ours, reference, **TOL)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    if batch > 1:  # negative controls: another scale, or a shuffled pairing, changes the loss
        assert not torch.allclose(clip_loss(image, text, scale + 0.5), reference, **TOL)
        assert not torch.allclose(clip_loss(image, text.roll(1, 0), scale), reference, **TOL)


def test_clip_loss_equals_live_clip_model_forward():
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    vision = dict(image_size=8, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=1.7))
    ids = torch.randint(3, 40, (6, 7))
    ids[:, -1] = 2  # <eos> pools the text features
    pixels = torch.randn(6, 3, 8, 8)
    out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
    image_features = model.get_image_features(pixel_values=pixels).pooler_output  # projected, not normalized
    text_features = model.get_text_features(input_ids=ids).pooler_output
    torch.testing.assert_close(clip_loss(image_features, text_features, model.logit_scale), out.loss, **TOL)
    torch.testing.assert_close(clip_loss(out.image_embeds, out.text_embeds, model.logit_scale), out.loss, **TOL)
    assert not torch.allclose(clip_loss(image_features, text_features.flip(0), model.logit_scale), out.loss, **TOL)


def test_clip_loss_accepts_a_float_scale_and_reaches_zero_on_perfect_pairs():
    eye = torch.eye(4)
    assert clip_loss(eye, eye, math.log(100.0)).item() < 1e-10 + 4 * math.exp(-100) * 1.01
    torch.testing.assert_close(clip_loss(eye, eye, 0.0), torch.tensor(math.log(1 + 3 * math.exp(-1))), **TOL)


def _nt_xent_by_hand(z1, z2, tau):
    """SimCLR eq. 1 with its loops: l(i, j) = -log(exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau)), mean over 2N."""
    z = torch.cat([z1, z2]).double()
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sim = [float(z[i] @ z[k] / (z[i].norm() * z[k].norm())) / tau for k in range(2 * n)]
        total -= sim[j] - math.log(sum(math.exp(sim[k]) for k in range(2 * n) if k != i))
    return total / (2 * n)


@pytest.mark.parametrize("n,tau", [(2, 0.5), (3, 0.1), (8, 1.0)])
def test_nt_xent_equals_hand_computation(n, tau):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
    expected = torch.tensor(_nt_xent_by_hand(z1, z2, tau), dtype=torch.float32)
    torch.testing.assert_close(nt_xent_loss(z1, z2, tau), expected, **TOL)
    perturbed = z2.clone()
    perturbed[0] += 1.0
    assert not torch.allclose(nt_xent_loss(z1, perturbed, tau), expected, **TOL)  # negative control


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.floats(0.1, 2.0), st.floats(0.1, 10.0))
def test_losses_are_symmetric_and_scale_invariant(n, tau, factor):
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    torch.testing.assert_close(nt_xent_loss(a, b, tau), nt_xent_loss(b, a, tau), **TOL)
    torch.testing.assert_close(nt_xent_loss(a * factor, b, tau), nt_xent_loss(a, b, tau), **TOL)
    torch.testing.assert_close(clip_loss(a, b, 2.0), clip_loss(b, a, 2.0), **TOL)
    torch.testing.assert_close(clip_loss(a * factor, b, 2.0), clip_loss(a, b, 2.0), **TOL)


@pytest.mark.parametrize("loss", [clip_loss, lambda a, b, s: nt_xent_loss(a, b, 0.5)], ids=["clip", "nt_xent"])
def test_losses_reject_bad_input(loss):
    with pytest.raises(ValueError, match=r"must have the batch size of .* \(4\), got 3"):
        loss(torch.randn(4, 8), torch.randn(3, 8), 1.0)
    with pytest.raises(ValueError, match=r"must have the embedding dim of .* \(8\), got 6"):
        loss(torch.randn(4, 8), torch.randn(4, 6), 1.0)
    with pytest.raises(ValueError, match=r"must have shape \(batch, dim\), got shape \(4,\)"):
        loss(torch.randn(4), torch.randn(4), 1.0)
    with pytest.raises(TypeError, match="must be a floating-point tensor, got torch.int64"):
        loss(torch.ones(4, 8, dtype=torch.long), torch.randn(4, 8), 1.0)
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        loss([[1.0]], torch.randn(1, 1), 1.0)


def test_scale_and_temperature_are_checked():
    with pytest.raises(ValueError, match=r"logit_scale must be a scalar, got shape \(2,\)"):
        clip_loss(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="temperature must be a positive number, got 0"):
        nt_xent_loss(torch.randn(2, 3), torch.randn(2, 3), 0)
    with pytest.raises(ValueError, match="z1 must hold at least 2 pairs .*, got 1"):
        nt_xent_loss(torch.randn(1, 3), torch.randn(1, 3))


def test_zero_shot_requires_normalized_features():
    image = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    classes = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    assert zero_shot_predict(image, classes).shape == (5,)
    with pytest.raises(ValueError, match=r"image_embeds must be L2-normalized .* got a row norm off by"):
        zero_shot_predict(image * 2, classes)
    with pytest.raises(ValueError, match=r"class_embeds must be L2-normalized"):
        zero_shot_predict(image, classes * 0.5)
    with pytest.raises(ValueError, match=r"class_embeds must be \(C, D\) with image_embeds \(N, D\), got \(3, 5\)"):
        zero_shot_predict(image, torch.randn(3, 5))
