"""img2img equals diffusers' StableDiffusionImg2ImgPipeline on tiny random components (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, a byte-level CLIP vocabulary written here), same seed and settings, fp32; the UNet
runs int(steps x strength) times; a strength leaving no step is refused; bad input gets a clear error."""

import copy
import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from impl.common import assert_close_to_reference_error, tolerance
from impl.diffusion import DDIMScheduler, DDPMScheduler, img2img
from impl.diffusion.img2img import STABLE_DIFFUSION_SCHEDULE, main
from impl.diffusion.tiny import tiny_components

TOL = tolerance(torch.float32)
PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def diffusers():
    """Every test here needs diffusers: our loop runs on its UNet and VAE, the reference is its pipeline."""
    return pytest.importorskip("diffusers", reason="img2img runs on diffusers' UNet2DConditionModel and AutoencoderKL")


@pytest.fixture(scope="module")
def components(diffusers, tmp_path_factory):
    return tiny_components(tmp_path_factory.mktemp("clip-vocab"))


@pytest.fixture(scope="module")
def image():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _pipeline(components, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline  # the callers' fixtures have checked it is installed

    pipe = StableDiffusionImg2ImgPipeline(
        **components, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(components, scheduler, image, prompt, seed=0, **kwargs):
    pipe = _pipeline(components, scheduler)
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, image=image, generator=generator, output_type="pt", **kwargs).images


def _ours(components, scheduler, image, prompt, seed=0, **kwargs):
    return img2img(**components, scheduler=scheduler, image=image, prompt=prompt,
                   generator=torch.Generator().manual_seed(seed), **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def components64(components):
    """The same components widened to float64: the pipeline on them is the ground truth for the float32 runs."""
    return {k: copy.deepcopy(v).double() if isinstance(v, torch.nn.Module) else v for k, v in components.items()}


@pytest.fixture
def float32_draws(diffusers, monkeypatch):
    """Every Gaussian the pipeline draws (VAE posterior, start noise, DDPM variance) is drawn in float32 and then
    widened, so a float64 pipeline follows the same random path as the float32 ones."""
    from diffusers.utils.torch_utils import randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    modules = ("pipelines.stable_diffusion.pipeline_stable_diffusion_img2img", "models.autoencoders.vae",
               "schedulers.scheduling_ddpm", "schedulers.scheduling_ddim")  # fmt: skip
    for name in modules:
        monkeypatch.setattr(importlib.import_module(f"diffusers.{name}"), "randn_tensor", draw)


def _assert_close_to_the_float64_pipeline(got, want, truth) -> None:
    """A chain of float32 UNet steps amplifies rounding by an amount that depends on the CPU's matmul kernels (the
    GLIDE test saw 1.5e-5 on one x86 CPU against a 1e-5 atol). So ours is judged against the float64 pipeline,
    within 4x the float32 pipeline's own error (measured 4.6e-7 to 1.6e-6 here), plus the fp32 atol as slack."""
    assert truth.dtype == torch.float64
    assert_close_to_reference_error(got, want, truth, factor=4.0, slack=TOL["atol"])


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("strength", [0.3, 0.7, 1.0])
def test_equals_the_diffusers_pipeline(diffusers, components, components64, float32_draws, image, strength,
                                       guidance_scale):  # fmt: skip
    settings = {"strength": strength, "num_inference_steps": 6, "guidance_scale": guidance_scale}
    want = _reference(components, diffusers.DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE), image, PROMPTS, **settings)
    got = _ours(components, DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE), image, PROMPTS, **settings)
    truth = _reference(components64, diffusers.DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE), image.double(), PROMPTS,
                       **settings)  # fmt: skip
    assert got.shape == (2, 3, 32, 32)
    _assert_close_to_the_float64_pipeline(got, want, truth)
    other = _ours(components, DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE), image, PROMPTS, **settings, seed=1)
    assert not torch.allclose(other, want, atol=1e-3)  # negative control: another seed, another output


@pytest.mark.parametrize("ours_scheduler", [False, True], ids=["diffusers-ddpm", "our-ddpm"])
def test_stochastic_sampler_and_negative_prompt_equal_the_pipeline(
    diffusers, components, components64, float32_draws, image, ours_scheduler
):
    """DDPM draws noise at every step from the generator: ours and diffusers' draw in the same order."""
    settings = {"strength": 0.8, "num_inference_steps": 5, "guidance_scale": 4.0, "negative_prompt": ["ugly", "dull"]}
    # steps_offset=1 and clip_sample=False: the pipeline's constructor rewrites any other value to these
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}
    config["steps_offset"] = 1
    want = _reference(components, diffusers.DDPMScheduler(**config), image, PROMPTS, **settings)
    truth = _reference(components64, diffusers.DDPMScheduler(**config), image.double(), PROMPTS, **settings)
    scheduler = DDPMScheduler(**config) if ours_scheduler else diffusers.DDPMScheduler(**config)
    _assert_close_to_the_float64_pipeline(_ours(components, scheduler, image, PROMPTS, **settings), want, truth)
    positive = _ours(components, scheduler, image, PROMPTS, **{**settings, "negative_prompt": None})
    assert not torch.allclose(positive, want, atol=1e-3)  # negative control: the negative prompt is used


@pytest.mark.parametrize(("steps", "strength", "calls"), [(10, 0.35, 3), (7, 0.5, 3), (4, 1.0, 4), (3, 0.34, 1)])
def test_unet_runs_int_steps_times_strength(components, image, steps, strength, calls):
    seen = []
    hook = components["unet"].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        _ours(components, DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE), image, PROMPTS, strength=strength,
              num_inference_steps=steps, guidance_scale=3.0)  # fmt: skip
    finally:
        hook.remove()
    assert seen == [4] * calls  # int(steps x strength) calls, each on the doubled (uncond + cond) batch of 2


def test_a_strength_leaving_no_step_is_refused_like_diffusers(diffusers, components, image):
    with pytest.raises(Exception):  # noqa: B017 - diffusers fails inside, on an empty timestep list
        _reference(components, diffusers.DDIMScheduler(), image, PROMPTS, strength=0.1, num_inference_steps=5)
    with pytest.raises(ValueError, match=r"strength=0.1 with num_inference_steps=5 leaves no denoising step"):
        _ours(components, DDIMScheduler(), image, PROMPTS, strength=0.1, num_inference_steps=5)


def test_negative_controls_another_seed_or_prompt_changes_the_output(components, image):
    settings = {"strength": 0.6, "num_inference_steps": 5, "guidance_scale": 5.0}
    base = _ours(components, DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE), image, PROMPTS, **settings)
    other_seed = _ours(components, DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE), image, PROMPTS, seed=1, **settings)
    other_prompt = _ours(components, DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE), image, ["a cat", "a dog"], **settings)
    assert not torch.allclose(base, other_seed, **TOL)
    assert not torch.allclose(base, other_prompt, **TOL)


def test_pil_numpy_and_tensor_inputs_agree_and_pil_output(components):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    settings = {"strength": 0.5, "num_inference_steps": 4, "guidance_scale": 2.0}
    scheduler = DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE)
    from_tensor = _ours(components, scheduler, torch.from_numpy(pixels).permute(2, 0, 1) / 255.0, "x", **settings)
    from_numpy = _ours(components, scheduler, pixels, "x", **settings)
    from_pil = _ours(components, scheduler, Image.fromarray(pixels), "x", output_type="pil", **settings)
    torch.testing.assert_close(from_numpy, from_tensor, **TOL)
    assert len(from_pil) == 1 and from_pil[0].size == (32, 32)
    expected = (from_tensor[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.abs(np.asarray(from_pil[0]).astype(int) - expected).max() <= 1


def test_bad_input_raises_clear_errors(components, image):
    scheduler = DDIMScheduler()

    def run(image=image, prompt=PROMPTS, **kwargs):
        return _ours(components, scheduler, image, prompt, **{"num_inference_steps": 2, **kwargs})

    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"strength must be a number in \[0, 1\], got {strength}"):
            run(strength=strength)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int, got 0"):
        run(num_inference_steps=0)
    with pytest.raises(ValueError, match="multiples of the VAE factor 2, got 31x32"):
        run(image=image[:, :, :31])
    with pytest.raises(ValueError, match="prompt must be a string or a list of 2 strings .* got 3"):
        run(prompt=[*PROMPTS, "a third"])
    with pytest.raises(ValueError, match="negative_prompt must be a string or a list of 2 strings .* got 1"):
        run(negative_prompt=["one"], guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"image values must be in \[0, 1\], got \[-1"):
        run(image=image * 2 - 1)
    with pytest.raises(
        ValueError, match=r"image as a tensor must be \(3, H, W\) or \(B, 3, H, W\), got \(2, 4, 32, 32\)"
    ):
        run(image=torch.rand(2, 4, 32, 32))
    with pytest.raises(TypeError, match="image must be a PIL image.* got <class 'str'>"):
        run(image="in.png")
    with pytest.raises(ValueError, match="output_type must be one of .* got 'np'"):
        run(output_type="np")


def test_cli_writes_a_png_with_tiny_models(diffusers, tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "out" / "edited.png"
    main(["--image", str(source), "--prompt", "a tree", "--out", str(out), "--steps", "2", "--strength", "0.5"])
    assert Image.open(out).size == (32, 32)
