"""CLIP: a small image-text model on scikit-learn's digits, CLIP's contrastive loss and SimCLR's NT-Xent."""

from impl.clip.losses import clip_loss, nt_xent_loss
from impl.clip.model import CLIP

__all__ = ["CLIP", "clip_loss", "nt_xent_loss"]
