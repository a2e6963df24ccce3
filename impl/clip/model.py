"""A small CLIP for 8x8 digits: CNN image encoder, transformer text encoder, projections, learnable temperature.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", section 2.4 and
figure 3: two encoders, linear projections into a joint space, L2 normalization, and the logit scale
t = log(1/0.07) learned and clipped at log 100. The text encoder is the CLIP text transformer in miniature
(pre-LayerNorm blocks, learned positions) over a word-level tokenizer; its feature is the final LayerNorm at the
end-of-text token, as in the paper. The image encoder is a three-layer CNN in place of the ResNet/ViT.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from impl.clip.losses import clip_logits, clip_loss
from impl.common.checks import check_int, check_number, check_positive_int, check_tensor

PAD, UNK, EOT = "<pad>", "<unk>", "<eot>"


class WordTokenizer:
    """Lower-case whitespace words after the special tokens: `pad_id`, `unk_id`, `eot_id` (end of text)."""

    SPECIALS = (PAD, UNK, EOT)
    pad_id, unk_id, eot_id = SPECIALS.index(PAD), SPECIALS.index(UNK), SPECIALS.index(EOT)  # in every vocabulary

    def __init__(self, texts: list[str]):
        words = sorted({w for t in texts for w in t.lower().split()} - set(self.SPECIALS))
        self.vocab = [*self.SPECIALS, *words]
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, texts: list[str], context_length: int) -> torch.Tensor:
        """(len(texts), context_length) ids, each text followed by <eot> and padded; too long raises."""
        rows = []
        for text in texts:
            ids = [self.ids.get(w, self.unk_id) for w in text.lower().split()] + [self.eot_id]
            if len(ids) > context_length:
                raise ValueError(f"texts must fit context_length={context_length} with <eot>, got {text!r}")
            rows.append(ids + [self.pad_id] * (context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


@dataclass
class CLIPConfig:
    vocab_size: int = 64  # word-level vocabulary, specials included
    context_length: int = 12  # tokens per caption, <eot> included
    width: int = 64  # text transformer width
    layers: int = 2  # text transformer blocks
    heads: int = 4  # text attention heads
    channels: int = 32  # first conv layer's channels (the next two have 2x)
    embed_dim: int = 64  # joint embedding space
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
    logit_scale_max: float = math.log(100.0)  # CLIP clips the scale at 100

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "width", "layers", "heads", "channels", "embed_dim"):
            check_positive_int(f"CLIPConfig.{name}", getattr(self, name))
        check_number("CLIPConfig.logit_scale_init", self.logit_scale_init)
        check_number("CLIPConfig.logit_scale_max", self.logit_scale_max, low=self.logit_scale_init)
        if self.width % self.heads:
            raise ValueError(f"width must be divisible by heads={self.heads}, got {self.width}")


class ImageEncoder(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        c = config.channels
        self.convs = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.GELU(),  # (B, c, 8, 8)
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GELU(),  # (B, 2c, 4, 4)
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.GELU(),  # (B, 2c, 2, 2)
        )  # fmt: skip
        self.proj = nn.Linear(2 * c * 4, config.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(images).flatten(1))  # (B, embed_dim)


class TextEncoder(nn.Module):
    """Caption tokens -> (pooled (B, embed_dim), sequence (B, T, width)): a causal pre-LayerNorm transformer, so the
    final LayerNorm at the first <eot> has seen the whole caption (CLIP's pooled feature, projected to embed_dim
    unless embed_dim is None); the whole normalized sequence is what GLIDE's UNet attends to."""

    def __init__(
        self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
        embed_dim: int | None = None, eot_id: int = WordTokenizer.eot_id,
    ):  # fmt: skip
        super().__init__()
        for name, value in dict(vocab_size=vocab_size, context_length=context_length, width=width, layers=layers,
                                heads=heads).items():  # fmt: skip
            check_positive_int(name, value)
        if width % heads:
            raise ValueError(f"width must be divisible by heads={heads}, got {width}")
        self.context_length = context_length
        self.eot_id = check_int("eot_id", eot_id, low=0, high=vocab_size - 1)
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Parameter(torch.randn(context_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        if embed_dim is not None:
            check_positive_int("embed_dim", embed_dim)
        self.proj = None if embed_dim is None else nn.Linear(width, embed_dim, bias=False)

    def check_tokens(self, tokens: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """(B, T) integer ids, T <= context_length (or T == length), an <eot> in every row."""
        check_tensor("tokens", tokens, integer=True)
        want = f"T<={self.context_length}" if length is None else str(length)
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length or length not in (None, tokens.shape[1]):
            raise ValueError(f"tokens must have shape (B, {want}), got {tuple(tokens.shape)}")
        if not (tokens == self.eot_id).any(dim=1).all():
            raise ValueError("tokens must hold an <eot> token in every row, got a row without one")
        return tokens

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (B, embed_dim or width), sequence (B, T, width)); the caller checks the tokens."""
        T = tokens.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device)
        seq = self.ln_final(self.blocks(self.tok_emb(tokens) + self.pos_emb[:T], mask=causal, is_causal=True))
        eot = (tokens == self.eot_id).int().argmax(dim=1)  # (B,) the first <eot> of each row
        pooled = seq[torch.arange(len(tokens), device=tokens.device), eot]  # (B, width)
        return (pooled if self.proj is None else self.proj(pooled)), seq

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode(tokens)[0]


class CLIP(nn.Module):
    """Image and text towers into one normalized space; `forward` returns the CLIP loss of matching pairs."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = ImageEncoder(config)
        self.text = TextEncoder(
            config.vocab_size, config.context_length, config.width, config.layers, config.heads, config.embed_dim
        )
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) images in [0, 1] -> (B, embed_dim) unit-norm embeddings."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape (B, 1, H, W), got {tuple(images.shape)}")
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, each row holding an <eot> -> (B, embed_dim) unit-norm embeddings."""
        return F.normalize(self.text(self.text.check_tokens(tokens)), dim=-1)

    def clamp_logit_scale(self) -> None:
        """Keep exp(logit_scale) <= 100 (CLIP section 2.5); call after each optimizer step."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, self.config.logit_scale_max)

    def logits(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B_img, B_txt) scaled cosine similarities."""
        return clip_logits(self.encode_image(images), self.encode_text(tokens), self.logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"tokens must have the batch size of images ({images.shape[0]}), got {tokens.shape[0]}")
        return clip_loss(self.encode_image(images), self.encode_text(tokens), self.logit_scale)
