"""Classifier-free guidance: one batched call equals the two separate passes combined as in Ho & Salimans Eq. 6,
with w = 0 the unconditional and w = 1 the conditional prediction; GLIDE's (pooled, sequence) caption condition,
encoded once per sampling run, gives the same eps as the formula on the live model and as GLIDE's old path."""

import pytest
import torch

from impl.common import tolerance
from impl.diffusion import classifier_free_guidance, glide, guided_denoiser
from impl.diffusion.unet import UNetConfig

TOL = tolerance(torch.float32)


class CountingDenoiser(torch.nn.Module):
    """A small model of (x, t, context): a conv of x plus a projection of the pooled context, scaled by t."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(8, 4)
        self.batches = []

    def forward(self, x, t, context):
        self.batches.append(x.shape[0])
        t = t.view(-1, 1, 1, 1) if t.dim() == 1 else t  # a timestep per row, or one for all
        return self.conv(x) + self.proj(context.mean(1))[:, :, None, None] * (1 + t / 1000)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g)
    cond, uncond = torch.randn(3, 6, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    return x, torch.tensor(500), cond, uncond


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0, 7.5])
def test_one_batched_call_equals_two_passes(scale):
    torch.manual_seed(0)
    model = CountingDenoiser()
    x, t, cond, uncond = _inputs()
    with torch.no_grad():
        got = classifier_free_guidance(model, x, t, cond, uncond, scale)
        eps_c, eps_u = model(x, t, cond), model(x, t, uncond)
    assert model.batches[0] == 2 * x.shape[0]  # the two passes ran as one call on a doubled batch
    torch.testing.assert_close(got, eps_u + scale * (eps_c - eps_u), **TOL)
    if scale in (0.0, 1.0):
        torch.testing.assert_close(got, eps_u if scale == 0 else eps_c, **TOL)
    assert not torch.allclose(got, eps_u + (scale + 0.5) * (eps_c - eps_u), **TOL)  # negative control


def test_a_timestep_per_row_is_doubled_with_the_batch():
    torch.manual_seed(0)
    model = CountingDenoiser()
    x, _, cond, uncond = _inputs()
    t = torch.tensor([10, 500, 990])
    with torch.no_grad():
        got = classifier_free_guidance(model, x, t, cond, uncond, 3.0)
        eps_c, eps_u = model(x, t, cond), model(x, t, uncond)
    torch.testing.assert_close(got, eps_u + 3.0 * (eps_c - eps_u), **TOL)
    with torch.no_grad():  # negative control: the rows' timesteps matter
        assert not torch.allclose(got, classifier_free_guidance(model, x, t.flip(0), cond, uncond, 3.0), **TOL)


def test_bad_shapes_raise_clear_errors():
    model = CountingDenoiser()
    x, t, cond, uncond = _inputs()
    with pytest.raises(ValueError, match=r"uncond must have cond's shape \(3, 6, 8\), got \(3, 5, 8\)"):
        classifier_free_guidance(model, x, t, cond, uncond[:, :5], 2.0)
    with pytest.raises(ValueError, match="cond must have the sample's batch size 3, got 2"):
        classifier_free_guidance(model, x, t, cond[:2], uncond[:2], 2.0)


def _live_glide():
    """An untrained tiny GLIDE (CLIP's text encoder + the UNet) with every weight random, in float64 so that the
    formula's two separate passes and the batched call agree to rounding; zero-initialized output layers would
    make eps identically zero and every comparison vacuous."""
    tokenizer = glide.make_tokenizer()
    torch.manual_seed(0)
    config = glide.GlideConfig(vocab_size=len(tokenizer), text_width=32, text_layers=1,
                               unet=UNetConfig(channels=16, emb_dim=32, groups=4))  # fmt: skip
    model = glide.GlideModel(config).double().eval()
    with torch.no_grad():
        for p in model.unet.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model, tokenizer


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_glide_guidance_with_precomputed_caption_encodings(scale):
    """GLIDE's condition is a pair (pooled caption vector, caption token sequence), encoded once per sampling run.
    Guiding through impl.diffusion on that pair equals (a) Eq. 6 from two full model calls that encode the
    captions themselves, and (b) bitwise, the per-step path GLIDE used before (one UNet call on [uncond; cond]
    with the guidance written inline). Negative controls: s = 0 is the unconditional model and not the
    conditional one; another caption gives another eps (except at s = 0)."""
    model, tokenizer = _live_glide()
    texts = ["the number seven", "a small blurry zero"]
    n = len(texts)
    tokens = tokenizer.encode([""] * n + texts, model.config.context_length)  # [uncond; cond]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([700, 120])
    with torch.no_grad():
        cond, context = model.encode_text(tokens)  # once, before the loop
        got = classifier_free_guidance(model.unet, x, t, (cond[n:], context[n:]), (cond[:n], context[:n]), scale)
        per_run = guided_denoiser(model.unet, (cond[n:], context[n:]), (cond[:n], context[:n]), scale)
        eps_c, eps_u = model(x, t, tokens[n:]), model(x, t, tokens[:n])  # the formula, captions encoded here
        out = model.unet(torch.cat([x, x]), torch.cat([t, t]), cond, context)  # the old per-step path
        old = out.chunk(2)[0] + scale * (out.chunk(2)[1] - out.chunk(2)[0])
        steps = [per_run(x, t), per_run(x, t)]  # the paired condition serves every step
        other = classifier_free_guidance(
            model.unet, x, t, (cond[n:].flip(0), context[n:].flip(0)), (cond[:n], context[:n]), scale
        )
    tol = tolerance(torch.float64)
    torch.testing.assert_close(got, eps_u + scale * (eps_c - eps_u), **tol)
    assert torch.equal(got, old)
    if scale != 1:  # scale 1 runs the conditional model alone, which equals Eq. 6 only to rounding
        assert torch.equal(steps[0], got) and torch.equal(steps[1], got)
    torch.testing.assert_close(steps[0], got, **tol)
    assert eps_c.abs().mean() > 0.01 and not torch.allclose(eps_c, eps_u, **tol)  # the captions matter
    if scale == 0:
        torch.testing.assert_close(got, eps_u, **tol)
    assert not torch.allclose(got, eps_c if scale == 0 else eps_u, **tol)
    if scale != 0:  # at s = 0 the caption is ignored, as it must be
        assert not torch.allclose(got, other, **tol)
    else:
        torch.testing.assert_close(got, other, **tol)


def test_guided_denoiser_pairs_once_and_runs_the_conditional_model_alone_at_scale_one():
    torch.manual_seed(0)
    model = CountingDenoiser()
    x, t, cond, uncond = _inputs()
    with torch.no_grad():
        guided = guided_denoiser(model, cond, uncond, 2.0)
        got = guided(x, t)
        assert model.batches == [2 * x.shape[0]]
        torch.testing.assert_close(got, classifier_free_guidance(model, x, t, cond, uncond, 2.0), **TOL)
        model.batches.clear()
        plain = guided_denoiser(model, cond, uncond, 1.0)(x, t)
        assert model.batches == [x.shape[0]]  # half the work
        torch.testing.assert_close(plain, model(x, t, cond), **TOL)
        assert not torch.allclose(plain, model(x, t, uncond), **TOL)  # negative control


def test_tuple_conditions_are_checked_part_by_part():
    model = CountingDenoiser()
    x, t, cond, uncond = _inputs()
    with pytest.raises(TypeError, match="cond and uncond must both be tensors or tuples of tensors of one length"):
        classifier_free_guidance(model, x, t, (cond, cond), (uncond,), 2.0)
    with pytest.raises(ValueError, match=r"uncond\[1\] must have cond\[1\]'s shape \(3, 6, 8\), got \(3, 5, 8\)"):
        classifier_free_guidance(model, x, t, (cond, cond), (uncond, uncond[:, :5]), 2.0)
    with pytest.raises(ValueError, match=r"cond\[0\] must have the sample's batch size 3, got 2"):
        classifier_free_guidance(model, x, t, (cond[:2],), (uncond[:2],), 2.0)
    with pytest.raises(ValueError, match="sample must have the condition's batch size 3, got shape"):
        guided_denoiser(model, cond, uncond, 2.0)(x[:2], t)
    with pytest.raises(TypeError, match="denoiser must be callable, got int"):
        guided_denoiser(3, cond, uncond, 2.0)
