"""CLIP: a small image-text model on scikit-learn's digits, CLIP's contrastive loss and SimCLR's NT-Xent; its text
encoder (pooled vector and token sequence) is also GLIDE's caption encoder."""

from impl.clip.losses import clip_loss, nt_xent_loss
from impl.clip.model import CLIP, CLIPConfig, TextEncoder, WordTokenizer
from impl.clip.train import TrainConfig as CLIPTrainConfig
from impl.clip.train import train as train_clip
from impl.clip.train import zero_shot_accuracy, zero_shot_predict

__all__ = [
    "CLIP", "CLIPConfig", "CLIPTrainConfig", "TextEncoder", "WordTokenizer", "clip_loss", "nt_xent_loss", "train_clip",
    "zero_shot_accuracy", "zero_shot_predict",
]
