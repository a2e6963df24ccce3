"""Stable Diffusion image-to-image (SDEdit): Meng et al., "SDEdit: Guided Image Synthesis and Editing with
Stochastic Differential Equations" (2022), Algorithm 1, in the latent space of Rombach et al., "High-Resolution
Image Synthesis with Latent Diffusion Models" (2022).

z_0 = scaling_factor * VAE.encode(image); pick the first int(steps x strength) of the sampler's `steps`
timesteps counted from the end, noise z_0 to the first of them with q(z_t | z_0), denoise from there with
classifier-free guidance, decode z / scaling_factor. strength = 1 starts from (almost) pure noise at the top
timestep; a strength that leaves no step (int(steps x strength) = 0) is refused with a ValueError, as
diffusers' StableDiffusionImg2ImgPipeline refuses it (there with an opaque error from an empty timestep list).
The random draws come from `generator` in diffusers' order (VAE posterior sample, the start noise, then each
sampler step's noise), so the same seed gives the pipeline's output.

CLI: python -m impl.diffusion.img2img --image in.png --prompt "..." --out out.png [--model-dir SD_DIR]
"""

import inspect
import json
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from impl.common.checks import check_bool, check_number, check_one_of, check_positive_int, check_probability
from impl.diffusion.guidance import classifier_free_guidance
from impl.diffusion.schedulers import DDIMScheduler, DDPMScheduler, SchedulerConfig

OUTPUT_TYPES = ("pt", "pil")
_SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
STABLE_DIFFUSION_SCHEDULE = {  # the scheduler_config.json of Stable Diffusion 1.x
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def _image_to_tensor(image) -> torch.Tensor:
    """PIL image(s), a numpy array (H, W, 3) / (B, H, W, 3) (uint8 or float in [0, 1]), or a tensor
    (3, H, W) / (B, 3, H, W) in [0, 1] -> float32 (B, 3, H, W) in [0, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, list) and image and all(isinstance(im, Image.Image) for im in image):
        image = np.stack([np.asarray(im.convert("RGB")) for im in image])
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"image as a numpy array must be (H, W, 3) or (B, H, W, 3), got {image.shape}")
        image = torch.from_numpy(array).permute(0, 3, 1, 2)  # (B, 3, H, W)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a PIL image, a list of them, a numpy array or a tensor, got {type(image)}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image as a tensor must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image as a tensor must be floating point in [0, 1], got {image.dtype}")
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"image must hold at least one pixel per image, got shape {tuple(image.shape)}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image values must be finite numbers in [0, 1], got NaN or inf")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"image values must be in [0, 1], got [{lo:.3g}, {hi:.3g}]")
    return image.float()


def _encode_text(text_encoder, tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP last hidden states of the prompts padded to the tokenizer's max length: (B, L, D)."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(device))[0]


def _step_kwargs(scheduler, eta: float, generator: torch.Generator | None) -> dict:
    """Pass eta / generator only to a step that takes them; ask diffusers' schedulers for a tuple."""
    accepted = inspect.signature(scheduler.step).parameters
    candidates = {"eta": eta, "generator": generator, "return_dict": False}
    return {name: value for name, value in candidates.items() if name in accepted}


def _prompts(name: str, prompt, batch: int, default: str | None = None) -> list[str]:
    """One prompt per image from a string or a list of `batch` strings (None -> `default`, when given)."""
    if prompt is None and default is not None:
        prompt = default
    if isinstance(prompt, str):
        return [prompt] * batch
    if not isinstance(prompt, list | tuple) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"{name} must be a string or a list of {batch} strings, got {type(prompt).__name__}")
    if len(prompt) != batch:
        raise ValueError(f"{name} must be a string or a list of {batch} strings (one per image), got {len(prompt)}")
    return list(prompt)


def _check(strength, num_inference_steps, guidance_scale, eta, output_type, progress) -> int:
    strength = check_probability("strength", strength)
    num_inference_steps = check_positive_int("num_inference_steps", num_inference_steps)
    check_number("guidance_scale", guidance_scale)
    check_number("eta", eta, low=0)
    check_one_of("output_type", output_type, OUTPUT_TYPES)
    check_bool("progress", progress)
    denoise_steps = min(int(num_inference_steps * strength), num_inference_steps)
    if denoise_steps == 0:
        raise ValueError(
            f"strength={strength} with num_inference_steps={num_inference_steps} leaves no denoising step "
            f"(int(steps x strength) = 0); use strength >= {1 / num_inference_steps:.3g} or more steps"
        )
    return denoise_steps


@torch.no_grad()
def img2img(
    unet,
    vae,
    text_encoder,
    tokenizer,
    scheduler,
    image,
    prompt: str | list[str],
    *,
    strength: float = 0.8,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | list[str] | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    output_type: str = "pt",
    progress: bool = False,
):
    """Edit `image` toward `prompt` (SDEdit). Returns (B, 3, H, W) in [0, 1], or a list of PIL images."""
    denoise_steps = _check(strength, num_inference_steps, guidance_scale, eta, output_type, progress)
    device = unet.device
    pixels = _image_to_tensor(image)
    batch, _, height, width = pixels.shape
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if height % factor or width % factor:
        raise ValueError(f"image height and width must be multiples of the VAE factor {factor}, got {height}x{width}")
    prompts = _prompts("prompt", prompt, batch)
    negatives = _prompts("negative_prompt", negative_prompt, batch, default="")

    use_guidance = guidance_scale > 1  # w <= 1 needs no unconditional pass (as in diffusers)
    cond = _encode_text(text_encoder, tokenizer, prompts, device)
    uncond = _encode_text(text_encoder, tokenizer, negatives, device) if use_guidance else None

    # Timesteps: the last `denoise_steps` of the sampler's list; the first of them is where the image is noised to.
    scheduler.set_timesteps(num_inference_steps, device=device)
    start = num_inference_steps - denoise_steps
    timesteps = scheduler.timesteps[start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)

    pixels = pixels.to(device, vae.dtype) * 2 - 1  # [0, 1] -> [-1, 1]
    latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor  # (B, 4, H/f, W/f)
    noise_device = generator.device if generator is not None else device
    noise = torch.randn(latents.shape, generator=generator, device=noise_device, dtype=latents.dtype).to(device)
    latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(batch))

    def denoiser(x, t, context):
        return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]

    step_kwargs = _step_kwargs(scheduler, eta, generator)
    for t in tqdm(timesteps, desc="img2img", disable=not progress):
        x = scheduler.scale_model_input(latents, t)
        if use_guidance:
            eps = classifier_free_guidance(denoiser, x, t, cond, uncond, guidance_scale)
        else:
            eps = denoiser(x, t, cond)
        latents = scheduler.step(eps, t, latents, **step_kwargs)[0]

    decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    out = (decoded * 0.5 + 0.5).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
    if output_type == "pt":
        return out
    from PIL import Image

    arrays = (out.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


_MODEL_DIR_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler/scheduler_config.json")


def _load_stable_diffusion(model_dir: Path, sampler: str, device: torch.device) -> dict:
    """unet / vae / text_encoder / tokenizer from a diffusers-format Stable Diffusion directory, our sampler."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    components = {
        "unet": UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(model_dir, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(model_dir / "text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
    }
    for name in ("unet", "vae", "text_encoder"):
        components[name] = components[name].to(device).eval()
    saved = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    known = {f.name for f in fields(SchedulerConfig)}
    components["scheduler"] = _SAMPLERS[sampler](SchedulerConfig(**{k: v for k, v in saved.items() if k in known}))
    return components


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from impl.common import cli, resolve_device
    from impl.diffusion.tiny import tiny_components

    parser = cli.parser("impl.diffusion.img2img", "Stable Diffusion image-to-image with our DDIM / DDPM sampler.")
    parser.add_argument("--image", type=cli.existing_file, required=True,
                        help="input picture; sides multiples of the VAE factor")  # fmt: skip
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", type=cli.writable_file, required=True, help="output PNG")
    parser.add_argument(
        "--model-dir",
        type=cli.existing_dir,
        help="diffusers-format Stable Diffusion directory (unet/, vae/, "
        "text_encoder/, tokenizer/, scheduler/); without it tiny random models give a noise demo",
    )
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--strength", type=cli.probability, default=0.75)
    parser.add_argument("--steps", type=cli.positive_int, default=50)
    parser.add_argument("--guidance-scale", type=cli.finite_float, default=7.5)
    parser.add_argument("--sampler", choices=sorted(_SAMPLERS), default="ddim")
    parser.add_argument("--seed", type=cli.non_negative_int, default=0)
    parser.add_argument("--device", type=cli.device, default="auto")
    args = parser.parse_args(argv)
    if int(args.steps * args.strength) == 0:
        parser.error(f"--strength x --steps must leave a step, got {args.strength} x {args.steps}")
    if args.model_dir is not None:  # a folder without these is not a model, and never a name on a hub
        missing = [p for p in _MODEL_DIR_PARTS if not (args.model_dir / p).exists()]
        if missing:
            parser.error(f"--model-dir must be a diffusers Stable Diffusion folder, {args.model_dir} lacks {missing}")
    image = Image.open(args.image).convert("RGB")  # an unreadable picture fails before any model is built

    device = resolve_device(args.device)
    if args.model_dir is not None:
        components = _load_stable_diffusion(args.model_dir, args.sampler, device)
    else:
        print("no --model-dir: using tiny random components, the output is noise-like (a plumbing demo)")
        with tempfile.TemporaryDirectory(prefix="tiny-clip-") as vocab_dir:  # the tokenizer reads it at once
            components = tiny_components(vocab_dir)
        components = {k: v.to(device) if isinstance(v, torch.nn.Module) else v for k, v in components.items()}
        components["scheduler"] = _SAMPLERS[args.sampler](**STABLE_DIFFUSION_SCHEDULE)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = img2img(
        **components,
        image=image,
        prompt=args.prompt,
        strength=args.strength,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        generator=generator,
        output_type="pil",
        progress=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
