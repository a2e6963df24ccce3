"""Classifier-free guidance: one batched call equals the two separate passes combined as in Ho & Salimans Eq. 6,
with w = 0 the unconditional and w = 1 the conditional prediction."""

import pytest
import torch

from impl.common import tolerance
from impl.diffusion import classifier_free_guidance

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
