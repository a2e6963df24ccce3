"""nanoGPT: a GPT-2 style character model on tiny-shakespeare, interchangeable with transformers' GPT-2."""

from impl.gpt.data import CharTokenizer, get_batch, load_shakespeare, train_val_split
from impl.gpt.model import GPT, Block, GPTConfig, cross_entropy

__all__ = [
    "GPT",
    "Block",
    "CharTokenizer",
    "GPTConfig",
    "cross_entropy",
    "get_batch",
    "load_shakespeare",
    "train_val_split",
]
