"""Diffusion: Stable Diffusion img2img, ours against diffusers' StableDiffusionImg2ImgPipeline on the same
components and settings (random models: tiny widths on CPU, a wider UNet on CUDA), swept over image side; and
the DDIM / DDPM sampling loop alone (`steps` scheduler steps on a fixed model output), ours against diffusers'.

Meng et al., "SDEdit" (2022); Song et al., "DDIM" (2021); Ho et al., "DDPM" (2020). The img2img picture shows
an input and our outputs at several strengths; the models are random, so the outputs are noise-like by design:
the picture shows the plumbing (more strength, less of the input left), not image quality.

Error columns: each ours row records its error against diffusers' output on the same inputs (the img2img
images from the same components, prompt, settings and seed; the final latents of the same sampling loop), at the
fp32 tolerance; where diffusers is not installed the sampling rows of ours run unchecked.
"""

import functools
import importlib.util
import tempfile

import pytest
import torch

from impl.diffusion import DDIMScheduler, DDPMScheduler, img2img
from impl.diffusion.img2img import STABLE_DIFFUSION_SCHEDULE
from impl.diffusion.tiny import TinyConfig, tiny_components

SWEEPS = {
    "image_side": {"smoke": [32], "small": [64, 128], "full": [256, 512]},
    "latent_side": {"smoke": [16], "small": [32, 64], "full": [64, 128]},
}
STEPS = {"smoke": 4, "small": 10, "full": 25}  # num_inference_steps of the img2img runs
STRENGTH, GUIDANCE, BATCH = 0.75, 7.5, 1
SAMPLER_STEPS, SAMPLER_BATCH = 50, 2
PICTURE_STRENGTHS = (0.25, 0.5, 0.75, 1.0)
PICTURE_SIDE = 64
GPU_CONFIG = TinyConfig(unet_channels=(128, 256, 512), vae_channels=(64, 128, 128), text_hidden=256)


def _diffusers(why: str = "diffusers is the reference provider"):
    """diffusers, imported only by the rows that need it: without it those rows skip and ours still run."""
    return pytest.importorskip("diffusers", reason=f"{why}; diffusers is not installed")


@functools.cache
def _components(device_type: str) -> dict:
    config = GPU_CONFIG if device_type == "cuda" else TinyConfig()
    components = tiny_components(tempfile.mkdtemp(prefix="bench-clip-"), config)
    return {k: v.to(device_type) if isinstance(v, torch.nn.Module) else v for k, v in components.items()}


def _input_image(side: int) -> torch.Tensor:
    """A smooth colour gradient with a bright disc: (3, side, side) in [0, 1]."""
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    disc = (((x - 0.6) ** 2 + (y - 0.4) ** 2) < 0.06).float()
    return torch.stack([x, y, 1 - x]).mul(0.7).add(0.3 * disc).clamp(0, 1)


def _picture(components, image: torch.Tensor) -> torch.Tensor:
    """The input, then our img2img output at each of PICTURE_STRENGTHS, side by side: (3, side, 5 side)."""
    tiles = [image.cpu()]
    for strength in PICTURE_STRENGTHS:
        out = img2img(**components, scheduler=DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE), image=image,
                      prompt="a bright disc", strength=strength, num_inference_steps=8, guidance_scale=GUIDANCE,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
        tiles.append(out[0].cpu())
    return torch.cat(tiles, dim=2)


@pytest.mark.parametrize("provider", ["ours", "diffusers"])
@pytest.mark.benchmark(group="img2img")
def test_img2img(bench, device, size, provider, image_side):
    diffusers = _diffusers("both img2img rows run diffusers' UNet and VAE (ours is the sampling loop around them)")
    components = _components(device.type)
    image = _input_image(image_side)[None].expand(BATCH, -1, -1, -1).to(device)
    settings = {"strength": STRENGTH, "num_inference_steps": STEPS[size], "guidance_scale": GUIDANCE}
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        **components, scheduler=diffusers.DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)

    def reference():
        with torch.no_grad():
            return pipe("a bright disc", image=image, generator=torch.Generator().manual_seed(0),
                        output_type="pt", **settings).images  # fmt: skip

    def ours():
        return img2img(**components, scheduler=DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE), image=image,
                       prompt="a bright disc", generator=torch.Generator().manual_seed(0), **settings)  # fmt: skip

    unet_calls = int(STEPS[size] * STRENGTH)
    bench(
        ours if provider == "ours" else reference,
        variant=provider,
        params={"image_side": image_side, "batch": BATCH, "steps": STEPS[size], "strength": STRENGTH},
        sweep="image_side",
        dtype=torch.float32,
        baseline=provider == "diffusers",
        reference=provider == "diffusers",
        items=BATCH,
        items_unit="images/s",
        metrics={"UNet calls": unet_calls, "UNet width": str(components["unet"].config.block_out_channels)},
        expected=reference() if provider == "ours" else None,  # one more pipeline run: ours rows only
    )
    if provider == "ours" and image_side == SWEEPS["image_side"][size][0]:
        name = "img2img-random-tiny-models-input-then-strength-" + "-".join(f"{s:g}" for s in PICTURE_STRENGTHS)
        bench.save_image(name, _picture(components, _input_image(PICTURE_SIDE).to(device)))


def _sampling_loop(scheduler, steps: int, sample: torch.Tensor, model_output: torch.Tensor):
    scheduler.set_timesteps(steps, device=sample.device)
    generator = torch.Generator(device=sample.device).manual_seed(0)
    is_diffusers = type(scheduler).__module__.startswith("diffusers")
    for t in scheduler.timesteps:
        extra = {"return_dict": False} if is_diffusers else {}
        sample = scheduler.step(model_output, t, sample, generator=generator, **extra)[0]
    return sample


SAMPLERS = {
    "ours-ddim": lambda: DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE),
    "diffusers-ddim": lambda: _diffusers().DDIMScheduler(**STABLE_DIFFUSION_SCHEDULE),
    "ours-ddpm": lambda: DDPMScheduler(**STABLE_DIFFUSION_SCHEDULE),
    "diffusers-ddpm": lambda: _diffusers().DDPMScheduler(
        **{k: v for k, v in STABLE_DIFFUSION_SCHEDULE.items() if k != "set_alpha_to_one"}
    ),
}


def _bench_sampler(bench, device, kind: str, provider: str, latent_side: int) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    shape = (SAMPLER_BATCH, 4, latent_side, latent_side)
    sample, model_output = (torch.randn(shape, generator=g, device=device) for _ in range(2))
    scheduler = SAMPLERS[f"{provider}-{kind}"]()
    expected = None
    if provider == "ours" and importlib.util.find_spec("diffusers") is not None:
        expected = _sampling_loop(SAMPLERS[f"diffusers-{kind}"](), SAMPLER_STEPS, sample, model_output)
    bench(
        lambda: _sampling_loop(scheduler, SAMPLER_STEPS, sample, model_output),
        variant=provider,
        params={"latent_side": latent_side, "batch": SAMPLER_BATCH, "steps": SAMPLER_STEPS},
        sweep="latent_side",
        dtype=torch.float32,
        baseline=provider == "diffusers",
        reference=provider == "diffusers",
        items=SAMPLER_STEPS,
        items_unit="steps/s",
        expected=expected,
    )


@pytest.mark.parametrize("provider", ["ours", "diffusers"])
@pytest.mark.benchmark(group="ddim-sampling-loop")
def test_ddim_steps(bench, device, provider, latent_side):
    _bench_sampler(bench, device, "ddim", provider, latent_side)


@pytest.mark.parametrize("provider", ["ours", "diffusers"])
@pytest.mark.benchmark(group="ddpm-sampling-loop")
def test_ddpm_steps(bench, device, provider, latent_side):
    _bench_sampler(bench, device, "ddpm", provider, latent_side)
