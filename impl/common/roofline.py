"""How close a measurement is to what the hardware allows: datasheet peaks, roofs measured on the run's own
device, and the FLOP and byte conventions every benchmark row uses.

Conventions (each benchmark passes counts made with the functions below, never its own formula):
- GEMM (M x K) @ (K x N): 2·M·N·K FLOPs.
- Attention forward: 4·B·H·Nq·Nk·D (Q K^T and P V, FlashAttention-2 §4). Causal counts only the live part of
  the Nq x Nk square, bottom-right aligned: half of it when Nq = Nk. Backward is 2.5x the forward (five matmuls
  against two), forward+backward 3.5x.
- Training step of a transformer (model FLOPs, for MFU; nanoGPT's `estimate_mfu`, PaLM appendix B): per token
  2·N forward, 2·N for the gradients of the activations and 2·N_trainable for the gradients of the weights
  (6·N when every weight trains; LoRA's frozen base costs 4 per parameter), plus 12·L·T·d for the attention
  scores (forward 4·L·T·d, not halved for causal). Recomputation (activation checkpointing) is not counted:
  MFU, not hardware FLOPs utilization.
- Bytes: the least traffic to and from memory: every input read once, every output written once. A decode
  step reads the weights and the KV cache once per token.
- A row's attainable throughput is min(P, I·B) with arithmetic intensity I = FLOPs / bytes, peak compute P and
  bandwidth B (the roofline, Williams et al. 2009). The row is compute-bound when I >= P / B (the ridge point),
  memory-bound otherwise; a row with FLOPs but no bytes is judged against P, one with bytes alone against B.
- "% of measured roof" uses P and B measured at the start of the run (a large GEMM per dtype and a large copy),
  "% of datasheet peak" the vendor's dense figures below. fp32 rows on CUDA are compared with the fp32 peak
  (torch leaves TF32 off for matmuls by default).
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from impl.common.timing import time_calls


@dataclass(frozen=True)
class Peak:
    name: str
    pattern: str  # regular expression matched against torch.cuda.get_device_name()
    tflops: dict[str, float]  # dense tensor-core (or plain fp32) TFLOP/s by dtype name
    gbs: float  # memory bandwidth, GB/s (1e9 bytes)
    source: str


# Dense figures: the datasheets print "with sparsity" figures twice as large; those are not used here.
DATASHEET: tuple[Peak, ...] = (
    Peak("NVIDIA H200 SXM", r"H200(?!.*NVL)", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9},
         4800.0, "NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM column"),
    Peak("NVIDIA H100 SXM", r"H100.*(SXM|HBM3)", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7,
         "float32": 66.9}, 3350.0, "NVIDIA H100 Tensor Core GPU datasheet (2023), H100 SXM column"),
    Peak("NVIDIA A100 SXM4 80GB", r"A100.*SXM.*80GB", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0,
         "float32": 19.5}, 2039.0, "NVIDIA A100 Tensor Core GPU datasheet (2021), A100 80GB SXM column"),
    Peak("NVIDIA A100 40GB", r"A100.*40GB", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5},
         1555.0, "NVIDIA A100 Tensor Core GPU datasheet (2021), A100 40GB column"),
    Peak("NVIDIA L4", r"\bL4\b", {"bfloat16": 121.0, "float16": 121.0, "tf32": 60.0, "float32": 30.3}, 300.0,
         "NVIDIA L4 Tensor Core GPU datasheet (2023)"),
    Peak("NVIDIA GeForce RTX 4090", r"RTX 4090", {"bfloat16": 165.2, "float16": 165.2, "tf32": 82.6,
         "float32": 82.6}, 1008.0, "NVIDIA Ada Lovelace GPU architecture whitepaper, appendix A (fp16/bf16 with "
         "fp32 accumulate)"),
)


def datasheet_peak(device_name: str | None) -> Peak | None:
    """The table's entry for a device name as torch reports it, or None (CPUs, GPUs not in the table)."""
    if not device_name:
        return None
    return next((p for p in DATASHEET if re.search(p.pattern, device_name)), None)


def gemm_flops(m: int, n: int, k: int) -> float:
    """FLOPs of (m x k) @ (k x n): one multiply and one add per term."""
    return 2.0 * m * n * k


_PASSES = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, *, causal: bool = False,
                    pass_: str = "forward") -> float:
    """FLOPs of softmax(Q K^T) V over the live part of the score matrix; see the module docstring."""
    if pass_ not in _PASSES:
        raise ValueError(f"pass_ must be one of {list(_PASSES)}, got {pass_!r}")
    if causal and q_len > k_len:
        raise ValueError(f"causal attention needs q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    live = q_len * (k_len - q_len) + q_len * q_len / 2 if causal else q_len * k_len
    return _PASSES[pass_] * 4.0 * batch * heads * live * head_dim


def train_flops(n_params: int, n_layer: int, n_embd: int, seq_len: int, tokens: int, *,
                trainable: int | None = None) -> float:
    """Model FLOPs of one training step over `tokens` tokens of sequences of length `seq_len`: (2·N + 2·N +
    2·N_trainable + 12·L·T·d) per token. `trainable` defaults to all of `n_params`."""
    trainable = n_params if trainable is None else trainable
    if not 0 <= trainable <= n_params:
        raise ValueError(f"trainable must be in [0, n_params={n_params}], got {trainable}")
    return tokens * (4.0 * n_params + 2.0 * trainable + 12.0 * n_layer * seq_len * n_embd)


def roofline(seconds: float, *, flops: float | None, nbytes: float | None, peak_tflops: float | None,
             peak_gbs: float | None) -> dict | None:
    """{"percent", "bound", "intensity"} of one timed call against a roof, or None when the roof the row needs
    is unknown. percent = achieved / min(P, I·B)."""
    if not seconds or seconds <= 0 or not math.isfinite(seconds):
        return None
    peak_flops = peak_tflops * 1e12 if peak_tflops else None
    peak_bw = peak_gbs * 1e9 if peak_gbs else None
    if flops and nbytes:
        if peak_flops is None or peak_bw is None:
            return None
        intensity = flops / nbytes
        attainable = min(peak_flops, intensity * peak_bw)
        bound = "compute" if intensity >= peak_flops / peak_bw else "memory"
        return {"percent": 100 * flops / seconds / attainable, "bound": bound, "intensity": intensity}
    if flops:
        return None if peak_flops is None else {"percent": 100 * flops / seconds / peak_flops, "bound": "compute",
                                                 "intensity": None}
    if nbytes:
        return None if peak_bw is None else {"percent": 100 * nbytes / seconds / peak_bw, "bound": "memory",
                                             "intensity": None}
    return None


# (GEMM size, copy MiB) by device type and benchmark size: large enough to leave the caches, quick to run.
_ROOF_SHAPES = {"cpu": {"smoke": (512, 64), "small": (1024, 256), "full": (2048, 512)},
                "cuda": {"smoke": (4096, 1024), "small": (8192, 2048), "full": (8192, 2048)}}


def measure_roofs(device: torch.device, size: str = "small", dtypes: tuple[torch.dtype, ...] | None = None) -> dict:
    """Measure this device's compute roof (a square GEMM per dtype) and bandwidth roof (a large copy, counted
    as bytes read plus bytes written). Also warms the BLAS library, so its workspace is not charged to the
    first benchmark row."""
    if dtypes is None:
        dtypes = (torch.float32, torch.bfloat16) if device.type == "cpu" else \
            (torch.float32, torch.bfloat16, torch.float16)
    n, mib = _ROOF_SHAPES[device.type][size]
    reps = {"smoke": (0.01, 0.05), "small": (0.05, 0.5), "full": (0.05, 0.5)}[size]
    gemm = {str(dtype).removeprefix("torch."): _gemm_tflops(n, dtype, device, reps) for dtype in dtypes}
    src = torch.empty(mib * 2**20 // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s = _median(lambda: dst.copy_(src), device, reps)
    return {"gemm_tflops": gemm, "copy_gbs": 2 * src.nbytes / copy_s / 1e9, "gemm_n": n, "copy_bytes": src.nbytes}


def _gemm_tflops(n: int, dtype: torch.dtype, device: torch.device, reps: tuple[float, float]) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return gemm_flops(n, n, n) / _median(lambda: a @ b, device, reps) / 1e12


def _median(fn: Callable[[], object], device: torch.device, reps: tuple[float, float]) -> float:
    fn()  # warm-up: library initialisation, allocation
    times = sorted(time_calls(fn, device, warmup_s=reps[0], budget_s=reps[1], min_reps=3, max_reps=100))
    return times[len(times) // 2]
