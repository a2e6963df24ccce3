"""A small UNet for 8x8 digits, conditioned the GLIDE way: on a vector added to the timestep embedding and on
context tokens that every attention layer attends to beside the image's own positions.

- Ho et al. 2020 ("DDPM", appendix B): a UNet with residual blocks, sinusoidal timestep embedding, self-attention
  at low resolution, skip connections from the down path to the up path.
- Dhariwal & Nichol 2021 ("ADM", section 3): adaptive group normalization, norm(h) * (1 + scale) + shift with
  (scale, shift) from the embedding; the last conv of each block and of the output starts at zero.
- Nichol et al. 2022 ("GLIDE", section 3.1): the text encoder's final token embedding is added to the timestep
  embedding, and its token sequence is projected to every attention layer's keys and values and concatenated
  with the image's. Ramesh et al. 2022 ("DALL-E 2", section 2.1) condition their decoder on a CLIP image
  embedding the same two ways. The caller projects its condition: `cond` is (B, emb_dim), `context` (B, L, C_ctx).

Resolutions: 8x8 (channels), 4x4 (2 x channels, with attention), and back up. Attention goes through
`impl.attention.attention` (not causal, no mask) with the backend `UNetConfig.attention_backend` (sdpa by default).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from impl.attention import attention
from impl.common.checks import check_int, check_one_of, check_positive_int, check_probability

ATTENTION_BACKENDS = ("auto", "naive", "sdpa", "torch", "triton")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sinusoids [cos | sin] at geometric frequencies 1 .. 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@dataclass
class UNetConfig:
    in_channels: int = 1  # image channels (digits are grey)
    channels: int = 32  # width at full resolution; the half resolution has twice as many
    emb_dim: int = 128  # timestep embedding width; `cond` must have this width
    context_dim: int = 0  # width of the context tokens the attention layers see (0: no context)
    heads: int = 4  # attention heads at the half resolution
    groups: int = 8  # GroupNorm groups
    dropout: float = 0.0
    attention_backend: str = "sdpa"  # impl.attention backend; sdpa is the fastest, the others are for study

    def __post_init__(self) -> None:
        for name in ("in_channels", "channels", "emb_dim", "heads", "groups"):
            check_positive_int(f"UNetConfig.{name}", getattr(self, name))
        check_int("UNetConfig.context_dim", self.context_dim, low=0)
        check_probability("UNetConfig.dropout", self.dropout, high_open=True)
        check_one_of("UNetConfig.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.channels % self.groups or (2 * self.channels) % self.heads:
            raise ValueError(
                f"channels must be divisible by groups={self.groups} and 2*channels by heads={self.heads}, "
                f"got {self.channels}"
            )


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, config: UNetConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(config.groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(config.emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(config.groups, c_out)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, c_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift  # ADM's adaptive group norm
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions; with context, the context tokens are extra keys and values."""

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        self.heads, self.backend = config.heads, config.attention_backend
        self.norm = nn.GroupNorm(config.groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(config.context_dim, 2 * channels) if config.context_dim else None
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)  # (B, HW, C) each
        if self.context_kv is not None and context is not None:
            ck, cv = self.context_kv(context).chunk(2, dim=-1)  # (B, L, C) each
            k, v = torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)  # (B, L + HW, C)
        q, k, v = (z.unflatten(-1, (self.heads, C // self.heads)).transpose(1, 2) for z in (q, k, v))  # (B, h, N, d)
        out = attention(q, k, v, backend=self.backend).transpose(1, 2).flatten(2)  # (B, HW, C)
        return x + self.proj(out).transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """eps_theta(x_t, t | cond, context) for images whose side is even; returns the shape of x."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c, e = config.channels, config.emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(c, e), nn.SiLU(), nn.Linear(e, e))
        self.conv_in = nn.Conv2d(config.in_channels, c, 3, padding=1)
        self.down1 = ResBlock(c, c, config)  # full resolution
        self.downsample = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.down2, self.down2_attn = ResBlock(c, 2 * c, config), AttentionBlock(2 * c, config)  # half resolution
        self.mid1, self.mid_attn = ResBlock(2 * c, 2 * c, config), AttentionBlock(2 * c, config)
        self.mid2 = ResBlock(2 * c, 2 * c, config)
        self.up2, self.up2_attn = ResBlock(4 * c, 2 * c, config), AttentionBlock(2 * c, config)  # skip from down2
        self.upsample = nn.Conv2d(2 * c, c, 3, padding=1)
        self.up1 = ResBlock(2 * c, c, config)  # skip from down1
        self.norm_out = nn.GroupNorm(config.groups, c)
        self.conv_out = _zero(nn.Conv2d(c, config.in_channels, 3, padding=1))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int,
        cond: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, cfg = x.shape[0], self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, H, W) with H, W even, got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).expand(B) if torch.as_tensor(t).dim() == 0 else t
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape ({B},), got {tuple(t.shape)}")
        emb = self.time_mlp(timestep_embedding(t, cfg.channels).to(x.dtype))  # (B, emb_dim), in the input's dtype
        if cond is not None:
            if cond.shape != (B, cfg.emb_dim):
                raise ValueError(f"cond must have shape ({B}, {cfg.emb_dim}), got {tuple(cond.shape)}")
            emb = emb + cond
        if context is not None and (context.dim() != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim):
            raise ValueError(f"context must have shape ({B}, L, {cfg.context_dim}), got {tuple(context.shape)}")
        h1 = self.down1(self.conv_in(x), emb)  # (B, c, H, W)
        h2 = self.down2_attn(self.down2(self.downsample(h1), emb), context)  # (B, 2c, H/2, W/2)
        h = self.mid2(self.mid_attn(self.mid1(h2, emb), context), emb)
        h = self.up2_attn(self.up2(torch.cat([h, h2], dim=1), emb), context)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, c, H, W)
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
