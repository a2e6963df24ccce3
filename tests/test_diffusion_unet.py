"""The pieces GLIDE and unCLIP are built from, pinned to diffusers: the UNet's residual block equals
`ResnetBlock2D` with scale-shift norm, its attention equals `Attention` with `AttnAddedKVProcessor` (the extra
context keys/values of GLIDE and of diffusers' unCLIP UNet), its timestep embedding `get_timestep_embedding`; the
training loss and the sampling loop equal the same steps written with diffusers' schedulers; the digit judge
knows real digits."""

from dataclasses import replace

import pytest
import torch

from impl.attention import attention
from impl.common import assert_close_to_reference_error, tolerance
from impl.diffusion.digits import DigitJudge, image_grid
from impl.diffusion.loops import denoise, diffusion_loss, fit, make_scheduler
from impl.diffusion.unet import AttentionBlock, ResBlock, UNet, UNetConfig, timestep_embedding

CONFIG = UNetConfig(channels=16, emb_dim=32, context_dim=24, heads=4, groups=4)
BACKENDS = ["naive", "sdpa", "torch"]  # impl.attention backends that run on CPU (triton: see the GPU tests)


@pytest.fixture
def diffusers():
    """diffusers, imported by the tests that compare with it: without it they skip and the rest still run."""
    return pytest.importorskip("diffusers", reason="the reference blocks and schedulers are diffusers'")


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Our zero-initialized output layers would make any comparison trivial: give every parameter noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("c_in,c_out", [(16, 16), (16, 32)], ids=["same", "wider"])
def test_res_block_equals_diffusers_scale_shift_resnet(diffusers, c_in, c_out):
    from diffusers.models.resnet import ResnetBlock2D

    ours = ResBlock(c_in, c_out, CONFIG)
    _randomize(ours, 0)
    ref = ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=CONFIG.emb_dim, groups=CONFIG.groups,
                        time_embedding_norm="scale_shift", eps=1e-5)  # fmt: skip
    mapping = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2"}
    if c_in != c_out:
        mapping["skip"] = "conv_shortcut"
    for name, ref_name in mapping.items():
        getattr(ref, ref_name).load_state_dict(getattr(ours, name).state_dict())
    x, emb = torch.randn(3, c_in, 8, 8), torch.randn(3, CONFIG.emb_dim)
    torch.testing.assert_close(ours(x, emb), ref(x, emb), **tolerance(torch.float32))
    ours.emb.bias.data[0] += 1.0  # negative control: one shifted scale breaks the match
    assert not torch.allclose(ours(x, emb), ref(x, emb), atol=1e-3)


def _diffusers_attention(ours: AttentionBlock, with_context: bool):
    """diffusers' Attention holding our block's weights: with the added-KV processor for context, else the plain one."""
    from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor, AttnProcessor

    C, heads = ours.qkv.in_features, ours.heads
    kw = (
        dict(added_kv_proj_dim=CONFIG.context_dim, processor=AttnAddedKVProcessor())
        if with_context
        else dict(residual_connection=True, processor=AttnProcessor())
    )
    ref = Attention(C, heads=heads, dim_head=C // heads, norm_num_groups=CONFIG.groups, bias=True, **kw)
    with torch.no_grad():
        ref.group_norm.load_state_dict(ours.norm.state_dict())
        ref.to_out[0].load_state_dict(ours.proj.state_dict())
        weights, biases = ours.qkv.weight.chunk(3), ours.qkv.bias.chunk(3)  # [q; k; v] rows
        for lin, w, b in zip((ref.to_q, ref.to_k, ref.to_v), weights, biases, strict=True):
            lin.weight.copy_(w), lin.bias.copy_(b)
        if with_context:
            weights, biases = ours.context_kv.weight.chunk(2), ours.context_kv.bias.chunk(2)  # [k; v] rows
            for lin, w, b in zip((ref.add_k_proj, ref.add_v_proj), weights, biases, strict=True):
                lin.weight.copy_(w), lin.bias.copy_(b)
    return ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_context", [True, False], ids=["context", "self-only"])
def test_attention_block_equals_diffusers_attention(diffusers, with_context, backend):
    ours = AttentionBlock(32, replace(CONFIG, attention_backend=backend))
    _randomize(ours, 1)
    ref = _diffusers_attention(ours, with_context)
    x, context = torch.randn(2, 32, 4, 4), torch.randn(2, 5, CONFIG.context_dim)
    if with_context:
        torch.testing.assert_close(ours(x, context), ref(x, encoder_hidden_states=context), **tolerance(torch.float32))
        assert not torch.allclose(ours(x, context), ours(x, None), atol=1e-3)  # negative control: context matters
    else:
        torch.testing.assert_close(ours(x, None), ref(x), **tolerance(torch.float32))
        ours.qkv.weight.data[0, 0] += 1.0  # negative control: a perturbed query weight breaks the match
        assert not torch.allclose(ours(x, None), ref(x), atol=1e-3)


def test_timestep_embedding_equals_diffusers(diffusers):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 999])
    ref = get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 32), ref, **tolerance(torch.float32))
    assert not torch.allclose(timestep_embedding(t + 1, 32), ref, atol=1e-3)  # negative control: other timesteps


def test_unet_conditions_on_cond_and_context_and_checks_shapes():
    torch.manual_seed(0)
    unet = UNet(CONFIG)
    _randomize(unet, 2)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 500])
    cond, context = torch.randn(2, CONFIG.emb_dim), torch.randn(2, 3, CONFIG.context_dim)
    out = unet(x, t, cond, context)
    assert out.shape == x.shape
    assert not torch.allclose(out, unet(x, t, None, context), atol=1e-4)
    assert not torch.allclose(out, unet(x, t, cond, context.flip(1) * 2), atol=1e-4)
    torch.testing.assert_close(unet(x, 5, cond, context)[0], out[0])  # scalar t broadcasts
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\) with H, W even, got \(2, 1, 7, 7\)"):
        unet(torch.randn(2, 1, 7, 7), t)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\), got \(3,\)"):
        unet(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"cond must have shape \(2, 32\), got \(2, 31\)"):
        unet(x, t, torch.randn(2, 31))
    with pytest.raises(ValueError, match=r"context must have shape \(2, L, 24\), got \(2, 3, 8\)"):
        unet(x, t, cond, torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="channels must be divisible by groups=8"):
        UNetConfig(channels=20)
    with pytest.raises(ValueError, match=r"UNetConfig\.attention_backend must be one of .* got 'flash'"):
        UNetConfig(attention_backend="flash")


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_unet_backends_equal_sdpa_forward_and_backward(backend, monkeypatch):
    """The whole UNet with its attention on `backend` equals the same weights on sdpa: output and every weight's
    gradient. Negative control: every call reaches the front with the configured backend, and a UNet whose
    attention drops the context keys (a wrong attention) leaves the sdpa output."""
    torch.manual_seed(0)
    reference = UNet(CONFIG)
    _randomize(reference, 3)
    ours = UNet(replace(CONFIG, attention_backend=backend))
    ours.load_state_dict(reference.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 500])
    cond, context = torch.randn(2, CONFIG.emb_dim), torch.randn(2, 3, CONFIG.context_dim)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return attention(*args, **kwargs)

    monkeypatch.setattr("impl.diffusion.unet.attention", spy)
    out, expected = ours(x, t, cond, context), reference(x, t, cond, context)
    assert seen == [backend] * 3 + ["sdpa"] * 3  # three attention blocks each
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tolerance(torch.float32), msg=name)
    monkeypatch.setattr("impl.diffusion.unet.attention", lambda q, k, v, **kw: attention(q, k[:, :, 3:], v[:, :, 3:]))
    assert not torch.allclose(ours(x, t, cond, context), expected, **tolerance(torch.float32))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_diffusion_loss_equals_the_target_built_with_diffusers(diffusers, prediction_type):
    scheduler = make_scheduler("ddpm", beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    seen = {}

    def model_fn(x_t, t):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    loss = diffusion_loss(model_fn, scheduler, x0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, in the same order: t, then the noise
    t, noise = torch.randint(1000, (6,), generator=g), torch.randn(x0.shape, generator=g)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], ref.add_noise(x0, noise, t), **tolerance(torch.float32))
    target = {"epsilon": noise, "sample": x0, "v_prediction": ref.get_velocity(x0, noise, t)}[prediction_type]
    torch.testing.assert_close(loss, target.square().mean(), **tolerance(torch.float32))
    assert not torch.allclose(loss, (target + 0.1).square().mean())  # negative control


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_denoise_equals_a_loop_over_diffusers_schedulers(diffusers, sampler, monkeypatch):
    """Twenty float32 steps compound rounding, so ours is judged against the diffusers loop run in float64 (its
    noise drawn in float32, then widened: the same random path), within 4x the float32 loop's own error (measured
    9.8e-7 for DDIM, 5.5e-7 for DDPM, with 1 or 2 threads), plus the table's fp32 atol as slack."""
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(4)) * 0.05

    def model_fn(x, t):  # any deterministic function of (x, t) will do; it runs in x's dtype
        return (x.flatten(1) @ weight.to(x.dtype)).view_as(x) * (1 + t.to(x.dtype)[:, None, None, None] / 1000)

    settings = dict(beta_schedule="squaredcos_cap_v2", clip_sample=True)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = denoise(model_fn, make_scheduler(sampler, **settings), noise, 20, eta=0.5,
                   generator=torch.Generator().manual_seed(6))  # fmt: skip

    def reference(x: torch.Tensor) -> torch.Tensor:
        ref = (diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DDPMScheduler)(**settings)
        ref.set_timesteps(20)
        g = torch.Generator().manual_seed(6)
        for t in ref.timesteps:
            kw = dict(eta=0.5) if sampler == "ddim" else {}
            x = ref.step(model_fn(x, t.expand(3)), t, x, generator=g, **kw).prev_sample
        return x

    x = reference(noise)
    module = getattr(diffusers.schedulers, f"scheduling_{sampler}")
    draw = module.randn_tensor
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, dtype=None, **kw: draw(shape, dtype=torch.float32, **kw).to(dtype))  # fmt: skip
    truth = reference(noise.double())
    assert truth.dtype == torch.float64
    assert_close_to_reference_error(ours, x, truth, factor=4.0, slack=tolerance(torch.float32)["atol"])
    other = denoise(model_fn, make_scheduler(sampler, **settings), noise, 10, eta=0.5,
                    generator=torch.Generator().manual_seed(6))  # fmt: skip
    assert not torch.allclose(ours, other, atol=1e-3)  # negative control: other step count, other sample
    with pytest.raises(ValueError, match="sampler must be one of .* got 'euler'"):
        make_scheduler("euler")


def test_fit_returns_the_moving_average_not_the_last_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(32, 3), torch.randn(32, 1)

    def loss():
        return torch.nn.functional.mse_loss(model(x), y)

    ema, losses = fit(model, loss, steps=50, lr=0.05, ema_decay=0.9, warmup=1)
    assert losses[-1] < losses[0] and len(losses) == 50
    assert not torch.allclose(ema.weight, model.weight)
    ema0, _ = fit(model, loss, steps=1, lr=0.05, ema_decay=0.0, warmup=1)  # decay 0: the EMA is the model
    torch.testing.assert_close(ema0.weight, model.weight)


@pytest.fixture(scope="module")
def judge():
    return DigitJudge()


def test_judge_recognizes_real_held_out_digits(judge):
    from impl.data import load_digits_split

    _, _, test_x, test_y = load_digits_split()
    assert judge.test_accuracy >= 0.97
    assert judge.accuracy(test_x, test_y) == judge.test_accuracy
    assert judge.accuracy(test_x, (test_y + 1) % 10) < 0.05  # negative control: wrong labels
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 8, 8\), got \(3, 8, 8\)"):
        judge.predict(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), got \(3,\)"):
        judge.accuracy(torch.rand(2, 1, 8, 8), torch.zeros(3, dtype=torch.long))


def test_image_grid_lays_tiles_out_row_major():
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 2, 2) / 5
    grid = image_grid(images, rows=2, scale=2, pad=1)
    assert grid.shape == (1, 2 * 6, 3 * 6)
    assert grid[0, 1, 1] == 0 and grid[0, 1, 7] == images[1, 0, 0, 0] and grid[0, 7, 1] == images[3, 0, 0, 0]
    with pytest.raises(ValueError, match="rows must divide the number of images 6, got 4"):
        image_grid(images, rows=4)
    with pytest.raises(ValueError, match="rows must divide the number of images 6, got 0"):
        image_grid(images, rows=0)
    with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\), got \(6, 2, 2\)"):
        image_grid(images[:, 0], rows=2)
