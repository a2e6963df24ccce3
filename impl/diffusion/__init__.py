"""Diffusion: DDPM / DDIM samplers, classifier-free guidance, Stable Diffusion image-to-image, and on scikit-learn's
digits GLIDE (`glide.train`, `glide.sample`) and DALL-E 2 / unCLIP (`unclip.train`, `unclip.sample`)."""

from impl.diffusion import glide, unclip
from impl.diffusion.guidance import classifier_free_guidance, guided_denoiser
from impl.diffusion.img2img import img2img
from impl.diffusion.schedulers import DDIMScheduler, DDPMScheduler

__all__ = [
    "DDIMScheduler", "DDPMScheduler", "classifier_free_guidance", "glide", "guided_denoiser", "img2img", "unclip",
]
