"""Deterministic mode: the same seed gives the same run, bit for bit.

Follows PyTorch's reproducibility notes (https://pytorch.org/docs/stable/notes/randomness.html): seed every
generator, make torch refuse nondeterministic kernels (`torch.use_deterministic_algorithms(True)`), turn off
cuDNN autotuning, and give cuBLAS a fixed workspace (`CUBLAS_WORKSPACE_CONFIG=:4096:8`, which must be set
before the first cuBLAS call). Data order is the other half: `impl.training.data.ShuffledBatches` draws its
permutation from its own seeded generator and saves its position.

The settings are process-wide, so `set_deterministic` returns a handle that puts the previous ones back, either
with `.restore()` or as a context manager:

    with set_deterministic(seed=0):
        trainer.fit(100)
"""

import os
from dataclasses import dataclass

import torch

from impl.common import seed_everything
from impl.common.checks import check_bool, check_int

CUBLAS_WORKSPACE = ":4096:8"


@dataclass
class DeterministicState:
    """The process-wide settings before `set_deterministic` changed them; `.restore()` puts them back."""

    deterministic_algorithms: bool  # torch.are_deterministic_algorithms_enabled()
    warn_only: bool  # torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_deterministic: bool  # torch.backends.cudnn.deterministic
    cudnn_benchmark: bool  # torch.backends.cudnn.benchmark
    cublas_workspace: str | None  # os.environ["CUBLAS_WORKSPACE_CONFIG"], None when unset

    @classmethod
    def capture(cls) -> "DeterministicState":
        return cls(
            deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
            warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            cudnn_deterministic=torch.backends.cudnn.deterministic,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cublas_workspace=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        )

    def restore(self) -> None:
        torch.use_deterministic_algorithms(self.deterministic_algorithms, warn_only=self.warn_only)
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        if self.cublas_workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = self.cublas_workspace

    def __enter__(self) -> "DeterministicState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def set_deterministic(seed: int, *, enabled: bool = True, warn_only: bool = False) -> DeterministicState:
    """Seed python/numpy/torch and (when `enabled`) make torch deterministic; returns the previous settings.

    `warn_only=True` makes an op without a deterministic kernel warn instead of raise.
    """
    check_int("seed", seed)
    check_bool("enabled", enabled)
    previous = DeterministicState.capture()
    seed_everything(seed)
    if enabled:
        # cuBLAS reads this when its handle is created; setting it after the first matmul has no effect.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    return previous
