"""Diffusion: DDPM / DDIM samplers, classifier-free guidance, Stable Diffusion image-to-image."""

from impl.diffusion.guidance import classifier_free_guidance
from impl.diffusion.img2img import img2img
from impl.diffusion.schedulers import DDIMScheduler, DDPMScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "classifier_free_guidance", "img2img"]
