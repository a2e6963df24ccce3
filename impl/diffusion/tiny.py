"""Tiny random Stable Diffusion components (UNet, VAE, CLIP text encoder, tokenizer) for tests, benches and the
CLI demo: the real architectures at toy widths, seeded, with a byte-level CLIP vocabulary written to disk.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TinyConfig:
    unet_channels: tuple[int, ...] = (16, 32)  # UNet block widths (the last block is cross-attention)
    vae_channels: tuple[int, ...] = (8, 16)  # VAE block widths; the VAE downsamples by 2 ** (len - 1)
    text_hidden: int = 32  # CLIP text width = the UNet's cross-attention width
    max_length: int = 16  # tokenizer model_max_length = CLIP position embeddings
    seed: int = 0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: each byte maps to a printable unicode character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def write_clip_vocab(directory: str | Path) -> tuple[Path, Path]:
    """Write a merge-free byte-level vocab.json and merges.txt (every byte, with and without '</w>')."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    vocab.write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    merges.write_text("#version: 0.2\n")
    return vocab, merges


def tiny_components(directory: str | Path, config: TinyConfig | None = None) -> dict:
    """unet, vae, text_encoder, tokenizer (eval mode, fp32, CPU), keyed as StableDiffusionImg2ImgPipeline wants."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    config = config or TinyConfig()
    vocab, merges = write_clip_vocab(directory)
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=config.max_length)
    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel(
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        norm_num_groups=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(config.unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(config.unet_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=config.text_hidden,
        attention_head_dim=4,
        sample_size=64,  # nominal (latent side); any multiple of the UNet factor runs
    )
    vae = AutoencoderKL(
        block_out_channels=config.vae_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        latent_channels=4,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden,
            intermediate_size=2 * config.text_hidden,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=config.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    modules = {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval()}
    return {**modules, "tokenizer": tokenizer}
