"""Seeding every generator a run touches."""

import random

import numpy as np
import torch

from impl.common.checks import check_int


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    seed = check_int("seed", seed, low=-(2**63), high=2**64 - 1)  # the range torch.manual_seed takes
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
