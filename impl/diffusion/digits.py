"""scikit-learn's 8x8 digits for the diffusion models: the pixel scaling, a judge that says which digit a
generated image shows, and image grids for the report.

The judge is scikit-learn's classic digits classifier (an RBF support-vector machine on the 64 raw pixels,
gamma = 0.001 on the 0..16 scale), trained on the training split only: it shares nothing with the models it
judges, and its own held-out accuracy (about 99%) is the ceiling any generator can reach.
"""

import torch

from impl.common.checks import is_int
from impl.data import load_digits_split

__all__ = ["DigitJudge", "from_model_space", "image_grid", "to_model_space"]


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> [-1, 1], the range the diffusion models work in (DDPM section 3.3)."""
    return images * 2 - 1


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (clamped) -> [0, 1] pixels."""
    return ((x + 1) / 2).clamp(0, 1)


class DigitJudge:
    """Which digit does an (N, 1, 8, 8) image in [0, 1] show? An SVC fitted on the digits' training split."""

    def __init__(self, test_fraction: float = 0.2, seed: int = 0):
        from sklearn.svm import SVC

        train_x, train_y, test_x, test_y = load_digits_split(test_fraction, seed)
        self.svc = SVC(gamma=0.001).fit(self._features(train_x), train_y.numpy())
        self.test_accuracy = self.accuracy(test_x, test_y)  # on real held-out digits: the ceiling

    @staticmethod
    def _features(images: torch.Tensor):
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"images must have shape (N, 1, 8, 8), got {tuple(images.shape)}")
        return (images.detach().float().cpu().clamp(0, 1) * 16).flatten(1).numpy()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) predicted digits."""
        return torch.from_numpy(self.svc.predict(self._features(images))).long()

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of images judged to show their label."""
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        return (self.predict(images) == labels.cpu()).float().mean().item()


def image_grid(images: torch.Tensor, rows: int, scale: int = 4, pad: int = 1) -> torch.Tensor:
    """(N, 1, H, W) images in [0, 1] -> one (1, H', W') picture of `rows` rows, each pixel scale x scale."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    N, C = images.shape[:2]
    if not is_int(rows) or rows < 1 or N % rows:
        raise ValueError(f"rows must divide the number of images {N}, got {rows}")
    cols = N // rows
    big = images.detach().float().cpu().repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    big = torch.nn.functional.pad(big, (pad, pad, pad, pad), value=0.5)  # grey frames between tiles
    h, w = big.shape[2:]
    return big.view(rows, cols, C, h, w).permute(2, 0, 3, 1, 4).reshape(C, rows * h, cols * w)
