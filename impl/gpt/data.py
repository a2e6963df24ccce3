"""The tiny-shakespeare corpus (Karpathy 2015, "The Unreasonable Effectiveness of Recurrent Neural Networks")
and a character tokenizer over it, with nanoGPT's 90/10 train/val split and random-window batches.

`load_shakespeare` finds the text in this order: an explicit path, the TINYSHAKESPEARE environment variable,
a cached download, a fresh download of the canonical file (checked against its sha256, then cached).
"""

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
ENV_VAR = "TINYSHAKESPEARE"
TRAIN_FRACTION = 0.9  # nanoGPT's data/shakespeare_char/prepare.py


class CharTokenizer:
    """One token per distinct character of `text`, numbered in sorted order (nanoGPT's shakespeare_char)."""

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("text must contain at least one character to build a vocabulary, got ''")
        self.chars = "".join(sorted(set(text)))
        self._stoi = {ch: i for i, ch in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        unknown = sorted(set(text) - self._stoi.keys())
        if unknown:
            raise ValueError(f"text has characters outside the vocabulary {self.chars!r}: got {''.join(unknown)!r}")
        return [self._stoi[ch] for ch in text]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must be ints in [0, {self.vocab_size}), got {bad[:5]!r}")
        return "".join(self.chars[i] for i in ids)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "impl"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_corpus(path: str | os.PathLike) -> str:
    """The UTF-8 text of `path`; an empty or undecodable file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus path must be an existing file, got {str(path)!r}")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"corpus {str(path)!r} must hold text, got an empty file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"corpus {str(path)!r} must be UTF-8 text, got undecodable bytes at offset {err.start}"
        ) from err


def _download(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"could not download tiny-shakespeare from {url} ({err}). Offline? Provide the file yourself: "
            f"pass load_shakespeare(path=...), or set {ENV_VAR}=/path/to/tinyshakespeare.txt, or place it at {dest}"
        ) from err
    digest = _sha256(raw)
    if digest != SHAKESPEARE_SHA256:
        raise RuntimeError(f"downloaded {url} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; not cached")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:  # atomic: no half-written cache
        tmp.write(raw)
    os.replace(tmp.name, dest)


def load_shakespeare(path: str | os.PathLike | None = None, *, url: str = SHAKESPEARE_URL) -> str:
    """The tiny-shakespeare text: from `path`, else $TINYSHAKESPEARE, else the cache, else a checked download."""
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is not None:
        return read_corpus(path)
    cached = _cache_dir() / "tinyshakespeare.txt"
    if not cached.is_file() or _sha256(cached.read_bytes()) != SHAKESPEARE_SHA256:
        _download(url, cached)
    return read_corpus(cached)


def train_val_split(data: torch.Tensor, train_fraction: float = TRAIN_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 90% of the token stream for training, the rest for validation (no shuffling, as nanoGPT)."""
    n = int(train_fraction * len(data))
    return data[:n], data[n:]


def get_batch(
    data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of the 1-D token stream: inputs (B, T) and the next tokens (B, T)."""
    if data.dim() != 1:
        raise ValueError(f"data must be a 1-D token stream, got shape {tuple(data.shape)}")
    if len(data) <= block_size:
        raise ValueError(f"data must be longer than block_size={block_size} tokens, got {len(data)}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i : i + block_size] for i in starts.tolist()])  # (B, T)
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in starts.tolist()])  # (B, T)
    return x, y
