"""python -m impl.diffusion.unclip: DALL-E 2 (unCLIP) in miniature, on the frozen CLIP of impl.clip, trained on
scikit-learn's digits: a diffusion prior from the caption's CLIP text embedding to a CLIP image embedding, a
diffusion decoder from the image embedding to pixels, and variations of an input image.

Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents":
- Decoder (section 2.1): a diffusion model P(x | z_i). The CLIP image embedding z_i is projected and added to
  the timestep embedding, and projected into four extra context tokens for the attention layers
  (impl/diffusion/unet.py). z_i is zeroed for 10% of training examples, for classifier-free guidance. Their
  decoder also sees the caption; ours sees only z_i, so a variation needs no caption.
- Prior (section 2.2, the diffusion prior): a diffusion model P(z_i | y) on the image embedding. A Transformer
  reads the sequence [text embedding z_t, timestep embedding, noised z_i, query] with a causal mask; its output
  at the query predicts the clean z_i directly (prediction_type "sample"), not the noise. z_t is zeroed for 10%
  of training examples. At sampling, two candidates are drawn per caption and the one with the larger z_i . z_t
  is kept. (Theirs also reads the caption's tokens; ours reads only z_t.)
- Variations (section 3.1): encode an image with CLIP, decode z_i again with other noise.

Embeddings are unit vectors in 64 dimensions; the prior works on sqrt(64) z, whose entries have about unit
variance like the images' pixels, and its samples are renormalized to the unit sphere.

    python -m impl.diffusion.unclip --out runs/unclip   # accuracy, CLIP similarity, samples and variations
"""

import json
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from impl.clip import CLIP, CLIPTrainConfig, WordTokenizer, train_clip
from impl.common import resolve_device, seed_everything
from impl.common.checks import check_positive_int
from impl.data import CLASS_NAMES, EVAL_TEMPLATE, TRAIN_TEMPLATES, captions, digit_prompts, load_digits_split
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
from impl.diffusion.unet import UNet, UNetConfig, timestep_embedding


@dataclass
class PriorConfig:
    embed_dim: int = 64  # CLIP's joint embedding width; train() sets it from the CLIP
    width: int = 128  # transformer width
    layers: int = 4
    heads: int = 4

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width must be divisible by heads={self.heads}, got {self.width}")


@dataclass
class DecoderConfig:
    embed_dim: int = 64  # CLIP's joint embedding width; train() sets it from the CLIP
    context_tokens: int = 4  # extra context tokens projected from z_i (DALL-E 2: four)
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(context_dim=64))


@dataclass
class TrainConfig:
    prior_steps: int = 1500  # optimizer steps of the prior
    decoder_steps: int = 1200  # optimizer steps of the decoder
    batch_size: int = 128
    lr: float = 1e-3  # AdamW for both, linear warm-up over 100 steps then constant
    p_uncond: float = 0.1  # share of conditions zeroed for classifier-free guidance (DALL-E 2: 10%)
    ema_decay: float = 0.999
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # cosine, for both models
    test_fraction: float = 0.2
    seed: int = 0
    device: str = "cpu"
    prior: PriorConfig = field(default_factory=PriorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        positive = ("prior_steps", "decoder_steps", "batch_size", "num_train_timesteps")
        check_train_config(self, positive, ("p_uncond", "ema_decay"))


class Prior(nn.Module):
    """z_i,0 = f(z_i,t, t | z_t): a causal Transformer over [text, time, noised image embedding, query]."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        D, W = config.embed_dim, config.width
        self.config = config
        self.in_text, self.in_image = nn.Linear(D, W), nn.Linear(D, W)
        self.time_mlp = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, W))
        self.query = nn.Parameter(torch.randn(W) * 0.02)
        self.pos_emb = nn.Parameter(torch.randn(4, W) * 0.02)
        layer = nn.TransformerEncoderLayer(
            W, config.heads, 4 * W, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(W)
        self.out = nn.Linear(W, D)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        if z_t.dim() != 2 or z_t.shape[1] != self.config.embed_dim:
            raise ValueError(f"z_t must have shape (B, {self.config.embed_dim}), got {tuple(z_t.shape)}")
        B, D = z_t.shape
        if text_embeds.shape != (B, D):
            raise ValueError(f"text_embeds must have shape ({B}, {D}), got {tuple(text_embeds.shape)}")
        time = self.time_mlp(timestep_embedding(t, self.config.width).to(z_t.dtype))  # (B, W), in the input's dtype
        seq = torch.stack([self.in_text(text_embeds), time, self.in_image(z_t), self.query.expand(B, -1)], dim=1)
        causal = nn.Transformer.generate_square_subsequent_mask(4, device=z_t.device)
        h = self.blocks(seq + self.pos_emb, mask=causal, is_causal=True)  # (B, 4, W)
        return self.out(self.ln_final(h[:, -1]))  # the query's output: (B, D)


class Decoder(nn.Module):
    """eps_theta(x_t, t | z_i): the UNet with z_i added to the timestep embedding and as 4 context tokens."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.to_cond = nn.Linear(config.embed_dim, config.unet.emb_dim)
        self.to_tokens = nn.Linear(config.embed_dim, config.context_tokens * config.unet.context_dim)
        self.unet = UNet(config.unet)

    def forward(self, x: torch.Tensor, t: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        B, D = x.shape[0], self.config.embed_dim
        if image_embeds.shape != (B, D):
            raise ValueError(f"image_embeds must have shape ({B}, {D}), got {tuple(image_embeds.shape)}")
        context = self.to_tokens(image_embeds).view(B, self.config.context_tokens, -1)  # (B, 4, context_dim)
        return self.unet(x, t, self.to_cond(image_embeds), context)


@dataclass
class UnCLIP:
    """The frozen CLIP with its tokenizer, the trained (EMA) prior and decoder, their schedule and loss curves."""

    clip: CLIP
    tokenizer: WordTokenizer
    prior: Prior
    decoder: Decoder
    schedule: dict  # SchedulerConfig fields shared by both models
    prior_losses: list[float]
    decoder_losses: list[float]


def _drop(embeds: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each row with probability p (a unit embedding is never zero, so zero means 'no condition')."""
    keep = torch.rand(len(embeds), generator=generator) >= p
    return embeds * keep.to(embeds.device, embeds.dtype)[:, None]


def train(
    config: TrainConfig | None = None,
    clip: CLIP | None = None,
    clip_tokenizer: WordTokenizer | None = None,
    progress: bool = False,
) -> UnCLIP:
    """Train the prior and the decoder on the frozen CLIP's embeddings of the training digits (seeded). The CLIP
    given is frozen in place (eval mode, requires_grad False); without one, one is trained first with
    impl.clip.train's defaults and the same seed."""
    config = config or TrainConfig()
    if (clip is None) != (clip_tokenizer is None):
        raise ValueError("clip and clip_tokenizer must be given together, got only one of them")
    seed_everything(config.seed)
    device = resolve_device(config.device)
    if clip is None:
        trained = train_clip(CLIPTrainConfig(seed=config.seed, device=config.device), progress=progress)
        clip, clip_tokenizer = trained.model, trained.tokenizer
    clip = clip.to(device).eval().requires_grad_(False)
    config.prior.embed_dim = config.decoder.embed_dim = clip.config.embed_dim
    train_x, train_y, _, _ = load_digits_split(config.test_fraction, config.seed)
    with torch.no_grad():
        image_embeds = clip.encode_image(train_x.to(device))  # (N, D), frozen: computed once
    schedule = dict(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                    clip_sample=False)  # fmt: skip  # no x0 clamping: see impl/diffusion/glide.py
    g = torch.Generator().manual_seed(config.seed)
    scale = clip.config.embed_dim**0.5

    prior = Prior(config.prior).to(device)
    prior_scheduler = make_scheduler("ddpm", **schedule, prediction_type="sample")

    def prior_loss() -> torch.Tensor:
        rows = torch.randint(len(train_y), (config.batch_size,), generator=g)
        tokens = clip_tokenizer.encode(captions(train_y[rows], TRAIN_TEMPLATES, g), clip.config.context_length)
        with torch.no_grad():
            text_embeds = _drop(clip.encode_text(tokens.to(device)), config.p_uncond, g)
        z0 = image_embeds[rows.to(device)] * scale
        return diffusion_loss(lambda z_t, t: prior(z_t, t, text_embeds), prior_scheduler, z0, g)

    prior, prior_losses = fit(prior, prior_loss, config.prior_steps, config.lr, config.ema_decay, desc="prior",
                              progress=progress)  # fmt: skip

    decoder = Decoder(config.decoder).to(device)
    decoder_scheduler = make_scheduler("ddpm", **schedule)

    def decoder_loss() -> torch.Tensor:
        rows = torch.randint(len(train_y), (config.batch_size,), generator=g)
        z = _drop(image_embeds[rows.to(device)], config.p_uncond, g)
        x0 = to_model_space(train_x[rows]).to(device)
        return diffusion_loss(lambda x_t, t: decoder(x_t, t, z), decoder_scheduler, x0, g)

    decoder, decoder_losses = fit(decoder, decoder_loss, config.decoder_steps, config.lr, config.ema_decay,
                                  desc="decoder", progress=progress)  # fmt: skip
    return UnCLIP(clip, clip_tokenizer, prior, decoder, schedule, prior_losses, decoder_losses)


def _guided(model: nn.Module, cond: torch.Tensor, scale: float):
    """Classifier-free guidance with a zero condition as 'unconditional' (scale 1: the conditional model alone)."""
    return guided_denoiser(model, cond, torch.zeros_like(cond), scale)


@torch.no_grad()
def sample_prior(
    unclip: UnCLIP,
    texts: list[str],
    *,
    guidance_scale: float = 2.0,
    candidates: int = 2,
    num_inference_steps: int = 64,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(len(texts), D) unit CLIP image embeddings for the captions; the best of `candidates` by z_i . z_t."""
    check_texts(texts)
    check_scale("guidance_scale", guidance_scale)
    check_positive_int("candidates", candidates)
    clip, device = unclip.clip, next(unclip.prior.parameters()).device
    n, D = len(texts), clip.config.embed_dim
    text_embeds = clip.encode_text(unclip.tokenizer.encode(texts, clip.config.context_length).to(device))
    cond = text_embeds.repeat(candidates, 1)  # (candidates * n, D), candidate-major
    scheduler = make_scheduler(sampler, **unclip.schedule, prediction_type="sample")
    noise = gaussian((candidates * n, D), generator, device)
    z = denoise(_guided(unclip.prior, cond, guidance_scale), scheduler, noise, num_inference_steps, generator=generator)
    z = F.normalize(z, dim=-1).view(candidates, n, D)
    best = (z * text_embeds).sum(-1).argmax(dim=0)  # (n,) the candidate closest to its caption
    return z[best, torch.arange(n, device=device)]


@torch.no_grad()
def decode(
    unclip: UnCLIP,
    image_embeds: torch.Tensor,
    *,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(N, D) unit CLIP image embeddings -> (N, 1, 8, 8) images in [0, 1]."""
    D = unclip.clip.config.embed_dim
    check_scale("guidance_scale", guidance_scale)
    if image_embeds.dim() != 2 or image_embeds.shape[1] != D:
        raise ValueError(f"image_embeds must have shape (N, {D}), got {tuple(image_embeds.shape)}")
    device = next(unclip.decoder.parameters()).device
    scheduler = make_scheduler(sampler, **unclip.schedule)
    noise = gaussian((len(image_embeds), 1, 8, 8), generator, device)
    model_fn = _guided(unclip.decoder, image_embeds.to(device), guidance_scale)
    return from_model_space(denoise(model_fn, scheduler, noise, num_inference_steps, eta=eta, generator=generator))


def sample(
    unclip: UnCLIP,
    texts: list[str],
    *,
    prior_guidance_scale: float = 2.0,
    decoder_guidance_scale: float = 3.0,
    candidates: int = 2,
    num_inference_steps: int = 50,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Text to image: the prior's z_i for each caption, then the decoder: (len(texts), 1, 8, 8) in [0, 1]."""
    z = sample_prior(unclip, texts, guidance_scale=prior_guidance_scale, candidates=candidates,
                     num_inference_steps=num_inference_steps, sampler=sampler, generator=generator)  # fmt: skip
    return decode(unclip, z, guidance_scale=decoder_guidance_scale, num_inference_steps=num_inference_steps,
                  sampler=sampler, generator=generator)  # fmt: skip


@torch.no_grad()
def variations(
    unclip: UnCLIP, images: torch.Tensor, per_image: int = 4, generator: torch.Generator | None = None, **decode_kw
) -> torch.Tensor:
    """(N, 1, 8, 8) images in [0, 1] -> (N * per_image, 1, 8, 8): each image's CLIP embedding decoded anew."""
    check_positive_int("per_image", per_image)
    device = next(unclip.decoder.parameters()).device
    z = unclip.clip.encode_image(images.to(device))  # checks the shape
    return decode(unclip, z.repeat_interleave(per_image, dim=0), generator=generator, **decode_kw)


@torch.no_grad()
def clip_similarity(unclip: UnCLIP, images: torch.Tensor, texts: list[str]) -> float:
    """Mean cosine between CLIP's embedding of each image and of its caption."""
    check_texts(texts)
    if len(texts) != len(images):
        raise ValueError(f"texts must hold one caption per image ({len(images)}), got {len(texts)}")
    clip, device = unclip.clip, next(unclip.clip.parameters()).device
    text_embeds = clip.encode_text(unclip.tokenizer.encode(texts, clip.config.context_length).to(device))
    return (clip.encode_image(images.to(device)) * text_embeds).sum(-1).mean().item()


def main(argv: list[str] | None = None) -> int:
    from impl.common import cli

    parser = cli.parser("impl.diffusion.unclip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior-steps", type=cli.positive_int, default=None, help="optimizer steps of the prior")
    parser.add_argument("--decoder-steps", type=cli.positive_int, default=None, help="optimizer steps of the decoder")
    parser.add_argument("--batch-size", type=cli.positive_int, default=None, help="images per step")
    parser.add_argument("--lr", type=cli.positive_float, default=None, help="AdamW learning rate")
    parser.add_argument("--seed", type=cli.non_negative_int, default=None)
    parser.add_argument("--device", type=cli.device, default=None)
    parser.add_argument(
        "--clip-epochs", type=cli.positive_int, default=CLIPTrainConfig.epochs, help="epochs of the CLIP trained first"
    )
    parser.add_argument("--prior-guidance-scale", type=cli.non_negative_float, default=2.0)
    parser.add_argument("--decoder-guidance-scale", type=cli.non_negative_float, default=3.0)
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--num-inference-steps", type=cli.positive_int, default=50)
    parser.add_argument("--per-digit", type=cli.positive_int, default=20, help="samples per digit to judge")
    parser.add_argument("--out", type=cli.writable_dir, default=None, help="folder for the grids and metrics.json")
    args = parser.parse_args(argv)
    defaults = TrainConfig()
    config = TrainConfig(**{k: v for k, v in vars(args).items() if hasattr(defaults, k) and v is not None})
    clip = train_clip(CLIPTrainConfig(epochs=args.clip_epochs, seed=config.seed, device=config.device), progress=True)
    print(f"CLIP zero-shot accuracy on held-out digits: {clip.accuracy:.3f}")
    unclip = train(config, clip=clip.model, clip_tokenizer=clip.tokenizer, progress=True)
    judge = DigitJudge(config.test_fraction, config.seed)
    texts, labels = digit_prompts(args.per_digit)
    images = sample(unclip, texts, prior_guidance_scale=args.prior_guidance_scale,
                    decoder_guidance_scale=args.decoder_guidance_scale, num_inference_steps=args.num_inference_steps,
                    sampler=args.sampler, generator=torch.Generator().manual_seed(1))  # fmt: skip
    _, _, test_x, test_y = load_digits_split(config.test_fraction, config.seed)
    inputs = torch.stack([test_x[test_y == d][0] for d in range(10)])  # one held-out image per digit
    varied = variations(unclip, inputs, per_image=8, generator=torch.Generator().manual_seed(2), eta=1.0)
    real_texts = [EVAL_TEMPLATE.format(CLASS_NAMES[y]) for y in test_y.tolist()]
    wrong_texts = [EVAL_TEMPLATE.format(CLASS_NAMES[(y + 1) % 10]) for y in test_y.tolist()]
    metrics = {
        "accuracy": judge.accuracy(images, labels),
        "variation_accuracy": judge.accuracy(varied, torch.arange(10).repeat_interleave(8)),
        "clip_similarity": clip_similarity(unclip, images, texts),
        "clip_similarity_real_test_digits": clip_similarity(unclip, test_x, real_texts),
        "clip_similarity_wrong_caption": clip_similarity(unclip, test_x, wrong_texts),
        "judge_test_accuracy": judge.test_accuracy,
    }
    for name, value in metrics.items():
        print(f"{name}: {value:.3f}")
    if args.out is not None:
        from PIL import Image

        args.out.mkdir(parents=True, exist_ok=True)
        rows = torch.cat([inputs[:, None], varied.view(10, 8, 1, 8, 8).cpu()], dim=1)  # input (CPU), its 8 variations
        grids = {"grid_samples": image_grid(images, rows=10), "grid_variations": image_grid(rows.flatten(0, 1), 10)}
        for name, grid in grids.items():
            Image.fromarray((grid[0] * 255).round().byte().numpy()).save(args.out / f"{name}.png")
        metrics["config"] = asdict(config)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"wrote {args.out}/metrics.json and {len(grids)} grids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
