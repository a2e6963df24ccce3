"""Device and dtype choice, resolved once at the edge and passed down explicitly."""

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
SIZE_CHOICES = ("smoke", "small", "full")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when available, else CPU; asking for CUDA without one is an error, not a fallback."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise TypeError(f"device must be a str or torch.device, got {type(name).__name__}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be one of {DEVICE_CHOICES} (or cuda:N), got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of {DEVICE_CHOICES} (or cuda:N), got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was asked for, but torch sees no CUDA device")
    return device


def resolve_size(size: str | None, device: torch.device) -> str:
    """Benchmark size: `small` on CPU and `full` on CUDA unless given."""
    if size is None:
        return "full" if device.type == "cuda" else "small"
    if size not in SIZE_CHOICES:
        raise ValueError(f"size must be one of {SIZE_CHOICES}, got {size!r}")
    return size


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accepts a torch.dtype or a name such as 'bf16' / 'float32'."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a str or torch.dtype, got {type(dtype).__name__}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on CUDA; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, the CPU's brand string on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name() -> str:
    try:
        import cpuinfo

        return cpuinfo.get_cpu_info().get("brand_raw") or "unknown CPU"
    except Exception:  # py-cpuinfo can fail on unusual kernels; the name is informative only
        import platform

        return platform.processor() or "unknown CPU"
