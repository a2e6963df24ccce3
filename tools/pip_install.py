"""pip install for tox: keeps a CPU-only machine on the CPU build of torch.

With no torch constraint, pip resolves `torch>=2.4` to the newest release, which on Linux is a CUDA build of
several GB. When this machine has no NVIDIA driver, we constrain torch to CPU_TORCH, a version whose CPU
wheel the project's machines hold locally (and that PyTorch's CPU index serves elsewhere). Set
IMPL_TORCH=any to let pip choose, or IMPL_TORCH=cpu / IMPL_TORCH=cuda to force the decision.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CPU_TORCH = "torch==2.13.0"


def has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def main(argv: list[str]) -> int:
    choice = os.environ.get("IMPL_TORCH", "auto")
    if choice not in {"auto", "cpu", "cuda", "any"}:
        print(f"IMPL_TORCH must be one of auto, cpu, cuda, any; got {choice!r}", file=sys.stderr)
        return 2
    pin_cpu = choice == "cpu" or (choice == "auto" and not has_nvidia_gpu())
    extra: list[str] = []
    if pin_cpu:
        constraints = Path(tempfile.gettempdir()) / "impl-torch-cpu-constraints.txt"
        constraints.write_text(CPU_TORCH + "\n")
        extra = ["-c", str(constraints)]
    return subprocess.call([sys.executable, "-m", "pip", "install", *extra, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
