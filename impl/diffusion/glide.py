"""python -m impl.diffusion.glide: GLIDE in miniature, a text-conditional diffusion model trained on
scikit-learn's digits, sampled with classifier-free guidance or with CLIP guidance (the CLIP of impl.clip).

Nichol et al. 2022, "GLIDE: Towards Photorealistic Image Generation and Editing with Text-Guided Diffusion Models":
- Section 3.1: a transformer encodes the caption (CLIP's text encoder class, impl.clip.TextEncoder, with its own
  weights). Its final token's embedding is added to the timestep embedding; its whole token sequence is projected
  into every attention layer of the UNet as extra keys and values (impl/diffusion/unet.py). The text encoder
  trains with the diffusion model, from scratch.
- Sections 2.3 and 3.2, classifier-free guidance: the caption is swapped for the empty one in 20% of training
  examples, and sampling uses eps(x_t | "") + s (eps(x_t | c) - eps(x_t | "")) (Ho & Salimans 2021, Eq. 6;
  impl.diffusion.guidance, with both captions encoded once per sampling run).
  s = 1 is the plain conditional model, s = 0 the unconditional one.
- Sections 2.4 and 3.4, CLIP guidance: move the sample along the gradient of the CLIP similarity f(x) . g(c).
  GLIDE uses CLIP models trained on noised images x_t. Ours (impl.clip) saw only clean digits, so it judges the
  model's clean-image estimate x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) instead: x0_hat is nudged
  up the similarity gradient, x0~ = x0_hat + s grad, and eps is re-derived from x0~, which gives
  eps~ = eps - sqrt(abar_t / (1 - abar_t)) s grad. (Applying the same gradient as classifier guidance on x_t,
  eps - sqrt(1 - abar_t) s grad / sqrt(abar_t), blows up at high noise, where abar_t is near 0: every sample
  ends up one blob.)

Sampling does not clamp the predicted x_0 (`clip_sample=False`). diffusers' DDIM clamps x0_hat but keeps the
model's eps, and with the cosine schedule and guidance that mismatch wrecks the samples (the benchmark shows
accuracy falling to chance as the guidance scale grows); OpenAI's guided-diffusion re-derives eps from the clamped
x0_hat instead. DDPM is far less sensitive to it.

    python -m impl.diffusion.glide --steps 1500 --out runs/glide   # accuracy by guidance scale, sample grids
"""

import json
import sys
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from impl.clip import CLIP, CLIPTrainConfig, TextEncoder, WordTokenizer, train_clip
from impl.common import resolve_device, seed_everything
from impl.data import EVAL_TEMPLATE, TRAIN_TEMPLATES, caption_texts, captions, digit_prompts, load_digits_split
from impl.diffusion.digits import DigitJudge, from_model_space, image_grid, to_model_space
from impl.diffusion.guidance import guided_denoiser
from impl.diffusion.loops import (
    SAMPLERS,
    check_scale,
    check_texts,
    check_train_config,
    denoise,
    diffusion_loss,
    fit,
    gaussian,
    make_scheduler,
)
from impl.diffusion.unet import UNet, UNetConfig

__all__ = [  # EVAL_TEMPLATE and digit_prompts are impl.data's, kept here for the callers of glide.*
    "EVAL_TEMPLATE", "Glide", "GlideConfig", "GlideModel", "TrainConfig", "clip_guided", "digit_prompts", "main",
    "make_tokenizer", "sample", "train",
]


@dataclass
class GlideConfig:
    vocab_size: int = 64  # word-level vocabulary; train() sets it from the tokenizer
    context_length: int = 12  # caption tokens, <eot> included
    text_width: int = 64  # caption transformer width = the UNet's context width
    text_layers: int = 2
    text_heads: int = 4
    unet: UNetConfig = field(default_factory=UNetConfig)  # context_dim is set to text_width

    def __post_init__(self) -> None:
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width must be divisible by text_heads={self.text_heads}, got {self.text_width}")
        self.unet.context_dim = self.text_width


@dataclass
class TrainConfig:
    steps: int = 1500  # optimizer steps
    batch_size: int = 128  # images per step, drawn with replacement from the training split
    lr: float = 1e-3  # AdamW, linear warm-up over 100 steps then constant
    p_uncond: float = 0.2  # share of captions replaced by the empty caption (GLIDE: 20%)
    ema_decay: float = 0.999  # the sampled model is the exponential moving average of the weights
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # Nichol & Dhariwal's cosine schedule, as GLIDE
    test_fraction: float = 0.2  # the held-out digits are never trained on (they are CLIP's and the judge's test)
    seed: int = 0
    device: str = "cpu"
    model: GlideConfig = field(default_factory=GlideConfig)

    def __post_init__(self) -> None:
        check_train_config(self, ("steps", "batch_size", "num_train_timesteps"), ("p_uncond", "ema_decay"))


class GlideModel(nn.Module):
    """eps_theta(x_t, t | caption): the caption transformer and the UNet, trained together."""

    def __init__(self, config: GlideConfig):
        super().__init__()
        self.config = config
        self.text = TextEncoder(  # CLIP's text encoder, its own weights, no projection: GLIDE trains it from scratch
            config.vocab_size, config.context_length, config.text_width, config.text_layers, config.text_heads
        )
        self.to_cond = nn.Linear(config.text_width, config.unet.emb_dim)  # final token -> timestep embedding
        self.unet = UNet(config.unet)

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids -> (cond (B, emb_dim), context (B, T, text_width)) for the UNet."""
        final, seq = self.text.encode(self.text.check_tokens(tokens, length=self.config.context_length))
        return self.to_cond(final), seq

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[0] != x.shape[0]:
            raise ValueError(f"tokens must have the batch size of x ({x.shape[0]}), got {tokens.shape[0]}")
        return self.unet(x, t, *self.encode_text(tokens))


@dataclass
class Glide:
    """A trained GLIDE: the EMA model, its tokenizer, the noise schedule it was trained with, and the loss curve."""

    model: GlideModel
    tokenizer: WordTokenizer
    schedule: dict  # SchedulerConfig fields: num_train_timesteps, beta_schedule, clip_sample
    losses: list[float]


def make_tokenizer() -> WordTokenizer:
    return WordTokenizer(caption_texts(TRAIN_TEMPLATES))


def train(config: TrainConfig | None = None, progress: bool = False) -> Glide:
    """Train GLIDE on the digits' training split with caption dropout (seeded, bitwise repeatable on CPU)."""
    config = config or TrainConfig()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    train_x, train_y, _, _ = load_digits_split(config.test_fraction, config.seed)
    tokenizer = make_tokenizer()
    config.model.vocab_size = len(tokenizer)
    model = GlideModel(config.model).to(device)
    schedule = dict(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                    clip_sample=False)  # fmt: skip  # see the module docstring
    scheduler = make_scheduler("ddpm", **schedule)
    g = torch.Generator().manual_seed(config.seed)

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(len(train_y), (config.batch_size,), generator=g)
        texts = captions(train_y[rows], TRAIN_TEMPLATES, g)
        drop = (torch.rand(config.batch_size, generator=g) < config.p_uncond).tolist()
        texts = ["" if d else text for d, text in zip(drop, texts, strict=True)]  # caption dropout
        tokens = tokenizer.encode(texts, config.model.context_length).to(device)
        x0 = to_model_space(train_x[rows]).to(device)
        return diffusion_loss(lambda x_t, t: model(x_t, t, tokens), scheduler, x0, g)

    ema, losses = fit(model, batch_loss, config.steps, config.lr, config.ema_decay, desc="glide", progress=progress)
    return Glide(ema, tokenizer, schedule, losses)


def clip_guided(model_fn, scheduler, clip: CLIP, text_embeds: torch.Tensor, scale: float):
    """Wrap an eps model: x0_hat(x_t) moves up the gradient of cos(CLIP(x0_hat), text) by `scale`, and eps follows."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model_fn(x, t)
        abar = scheduler.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
        with torch.enable_grad():
            x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).detach().requires_grad_()
            similarity = (clip.encode_image((x0 + 1) / 2) * text_embeds).sum()
            grad = torch.autograd.grad(similarity, x0)[0]  # (B, 1, 8, 8), each row its own sample's gradient
        return eps - (abar / (1 - abar)).sqrt() * scale * grad

    return guided


@torch.no_grad()
def sample(
    glide: Glide,
    texts: list[str],
    *,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    clip: CLIP | None = None,
    clip_tokenizer: WordTokenizer | None = None,
    clip_guidance_scale: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """One (1, 8, 8) image in [0, 1] per caption: (len(texts), 1, 8, 8)."""
    check_texts(texts)
    check_scale("guidance_scale", guidance_scale)
    check_scale("clip_guidance_scale", clip_guidance_scale)
    if clip_guidance_scale > 0 and (clip is None or clip_tokenizer is None):
        raise ValueError("clip and clip_tokenizer must be given when clip_guidance_scale > 0, got None")
    model = glide.model
    device = next(model.parameters()).device
    scheduler = make_scheduler(sampler, **glide.schedule)
    n, length = len(texts), model.config.context_length
    tokens = glide.tokenizer.encode([""] * n + texts, length).to(device)  # [uncond; cond]
    cond, context = model.encode_text(tokens)  # once per sampling run, not per step
    eps_fn = guided_denoiser(model.unet, (cond[n:], context[n:]), (cond[:n], context[:n]), guidance_scale)
    del cond, context  # eps_fn holds its own [uncond; cond] pairing; these would be a second copy for the whole run
    if clip_guidance_scale > 0:
        clip_tokens = clip_tokenizer.encode(texts, clip.config.context_length).to(device)
        eps_fn = clip_guided(eps_fn, scheduler, clip.eval(), clip.encode_text(clip_tokens), clip_guidance_scale)
    noise = gaussian((n, 1, 8, 8), generator, device)
    x = denoise(eps_fn, scheduler, noise, num_inference_steps, eta=eta, generator=generator, progress=progress)
    return from_model_space(x)


def main(argv: list[str] | None = None) -> int:
    from impl.common import cli

    parser = cli.parser("impl.diffusion.glide", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=cli.positive_int, default=None, help="optimizer steps")
    parser.add_argument("--batch-size", type=cli.positive_int, default=None, help="images per step")
    parser.add_argument("--lr", type=cli.positive_float, default=None, help="AdamW learning rate")
    parser.add_argument("--p-uncond", type=cli.probability, default=None, help="share of empty captions")
    parser.add_argument("--seed", type=cli.non_negative_int, default=None)
    parser.add_argument("--device", type=cli.device, default=None)
    parser.add_argument("--guidance-scales", type=cli.non_negative_float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--clip-guidance-scale", type=cli.non_negative_float, default=0.0,
                        help="> 0 also trains a CLIP to guide")  # fmt: skip
    parser.add_argument("--clip-epochs", type=cli.positive_int, default=15, help="epochs of the guiding CLIP")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--num-inference-steps", type=cli.positive_int, default=50)
    parser.add_argument("--per-digit", type=cli.positive_int, default=20, help="samples per digit to judge")
    parser.add_argument("--out", type=cli.writable_dir, default=None, help="folder for grid_*.png and metrics.json")
    args = parser.parse_args(argv)
    defaults = TrainConfig()
    config = TrainConfig(**{k: v for k, v in vars(args).items() if hasattr(defaults, k) and v is not None})
    glide = train(config, progress=True)
    judge = DigitJudge(config.test_fraction, config.seed)
    texts, labels = digit_prompts(args.per_digit)
    settings = dict(num_inference_steps=args.num_inference_steps, sampler=args.sampler)
    metrics = {"judge_test_accuracy": judge.test_accuracy, "final_loss": glide.losses[-1], "accuracy": {}}
    grids = {}
    for scale in args.guidance_scales:
        images = sample(glide, texts, guidance_scale=scale, generator=torch.Generator().manual_seed(1), **settings)
        metrics["accuracy"][f"cfg_{scale:g}"] = judge.accuracy(images, labels)
        grids[f"grid_cfg_{scale:g}"] = image_grid(images, rows=10)
        print(f"guidance scale {scale:g}: {metrics['accuracy'][f'cfg_{scale:g}']:.1%} judged the requested digit")
    if args.clip_guidance_scale > 0:
        clip = train_clip(CLIPTrainConfig(epochs=args.clip_epochs, seed=config.seed, device=config.device))
        images = sample(glide, texts, guidance_scale=0.0, clip=clip.model, clip_tokenizer=clip.tokenizer,
                        clip_guidance_scale=args.clip_guidance_scale, generator=torch.Generator().manual_seed(1),
                        **settings)  # fmt: skip
        key = f"clip_{args.clip_guidance_scale:g}"
        metrics["accuracy"][key] = judge.accuracy(images, labels)
        grids[f"grid_{key}"] = image_grid(images, rows=10)
        print(f"CLIP guidance {args.clip_guidance_scale:g} (no caption): {metrics['accuracy'][key]:.1%}")
    print(f"judge's accuracy on real held-out digits: {judge.test_accuracy:.1%}")
    if args.out is not None:
        from PIL import Image

        args.out.mkdir(parents=True, exist_ok=True)
        for name, grid in grids.items():
            Image.fromarray((grid[0] * 255).round().byte().numpy()).save(args.out / f"{name}.png")
        metrics["config"] = asdict(config)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"wrote {args.out}/metrics.json and {len(grids)} grids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
