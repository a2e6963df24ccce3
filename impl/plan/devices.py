"""Device memory for the planner: a table of accelerators by name, and memory strings ("24GiB", "80GB").

Units. KB/MB/GB/TB are powers of 1000 and KiB/MiB/GiB/TiB powers of 1024 (IEC 80000-13). GPU memory is built from
DRAM chips whose sizes are powers of two, and the vendors' "80GB" is 80 GiB: nvidia-smi reports an A100 80GB as
81920 MiB. The table below therefore reads each datasheet figure in GiB. What a process can allocate is a little
less (the CUDA context, the driver's reserve, ECC on some parts), which the planner does not model: leave a margin.
"""

import math
import re
from dataclasses import dataclass

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """Bytes in a memory string: "24GiB", "80GB", "1.5TiB", "81920MiB", "512 MB", "1073741824" (bytes).
    A ValueError naming --device-memory for anything else, and for sizes below one byte."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"--device-memory must be a size such as 24GiB, 80GB, 1.5TiB or 81920MiB (KB/MB/GB/TB count powers of "
            f"1000, KiB/MiB/GiB/TiB powers of 1024; no unit: bytes), got {text!r}"
        )
    number = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(number) or number < 1:
        raise ValueError(f"--device-memory must be at least one byte, got {text!r}")
    return int(number)


@dataclass(frozen=True)
class Device:
    name: str  # what --device takes (case-insensitive)
    gib: float  # memory per device, GiB (the datasheet's "GB", read as binary; see the module docstring)
    source: str  # where the figure comes from

    @property
    def bytes(self) -> int:
        return int(self.gib * 2**30)


DEVICES: tuple[Device, ...] = (
    Device("H200-141GB", 141, "NVIDIA H200 Tensor Core GPU datasheet (2024): 141GB HBM3e (SXM and NVL)"),
    Device("H100-94GB", 94, "NVIDIA H100 Tensor Core GPU datasheet (2023), H100 NVL column: 94GB"),
    Device("H100-80GB", 80, "NVIDIA H100 Tensor Core GPU datasheet (2023), SXM and PCIe columns: 80GB"),
    Device("A100-80GB", 80, "NVIDIA A100 Tensor Core GPU datasheet (2021), A100 80GB columns"),
    Device("A100-40GB", 40, "NVIDIA A100 Tensor Core GPU datasheet (2021), A100 40GB columns"),
    Device("L40S-48GB", 48, "NVIDIA L40S GPU datasheet (2023): 48GB GDDR6 with ECC"),
    Device("A10-24GB", 24, "NVIDIA A10 Tensor Core GPU datasheet (2021): 24GB GDDR6"),
    Device("L4-24GB", 24, "NVIDIA L4 Tensor Core GPU datasheet (2023): 24GB"),
    Device("RTX-4090-24GB", 24, "NVIDIA GeForce RTX 4090 specifications: 24GB GDDR6X"),
    Device("RTX-3090-24GB", 24, "NVIDIA GeForce RTX 3090 specifications: 24GB GDDR6X"),
    Device("RTX-4080-16GB", 16, "NVIDIA GeForce RTX 4080 specifications: 16GB GDDR6X"),
    Device("V100-32GB", 32, "NVIDIA V100 Tensor Core GPU datasheet (2020): 32GB HBM2"),
    Device("V100-16GB", 16, "NVIDIA V100 Tensor Core GPU datasheet (2020): 16GB HBM2"),
    Device("T4-16GB", 16, "NVIDIA T4 Tensor Core GPU datasheet (2019): 16GB GDDR6"),
    Device("MI300X-192GB", 192, "AMD Instinct MI300X accelerator data sheet (2023): 192GB HBM3"),
)
MEMORY: dict[str, int] = {d.name: d.bytes for d in DEVICES}  # name -> bytes per device
# Short names that pick one entry: the larger part where a name is sold in two sizes is NOT guessed.
ALIASES = {"H200": "H200-141GB", "H100": "H100-80GB", "L40S": "L40S-48GB", "A10": "A10-24GB", "L4": "L4-24GB",
           "RTX-4090": "RTX-4090-24GB", "RTX-3090": "RTX-3090-24GB", "RTX-4080": "RTX-4080-16GB", "T4": "T4-16GB",
           "MI300X": "MI300X-192GB", "4090": "RTX-4090-24GB", "3090": "RTX-3090-24GB"}


def device(name: str) -> Device:
    """The table's entry for a device name ("H100-80GB", "h100", "RTX-4090"); a ValueError listing the names."""
    wanted = re.sub(r"[\s_]+", "-", str(name).strip()).upper()
    wanted = ALIASES.get(wanted, ALIASES.get(wanted.replace("RTX", "RTX-").replace("--", "-"), wanted))
    for d in DEVICES:
        if d.name.upper() == wanted:
            return d
    raise ValueError(
        f"--device must be one of {[d.name for d in DEVICES]} (or a short name: {sorted(ALIASES)}); "
        f"for another device give --device-memory, got {name!r}"
    )
