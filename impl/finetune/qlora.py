"""QLoRA: LoRA adapters on a frozen 4-bit NF4 base model (Dettmers et al., 2023, arXiv:2305.14314).

Eq. 5 of the paper: Y = X doubleDequant(c1, c2, W_NF4) + X L1 L2, computed in a 16-bit (or 32-bit) compute dtype.
The base weights stay packed in 4 bits and are dequantized on the fly, in the forward pass and again in the
backward pass, so no full-precision copy of any weight outlives a single matmul; gradients flow through the frozen
base only to reach the adapters (L1 = A, L2 = B) and earlier layers.

`apply_qlora` quantizes every linear layer except the output head (the paper keeps embeddings and the head in 16
bits) and then adds LoRA on the targets, as peft's `prepare_model_for_kbit_training` + `get_peft_model` do on a
model loaded with bitsandbytes' `Linear4bit`.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from impl.common.checks import check_tensor
from impl.finetune.lora import apply_lora, find_targets
from impl.finetune.nf4 import NF4Tensor, quantize_nf4


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T + b with W kept in NF4; the backward dequantizes W again instead of saving it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # the packed 4-bit weight: already resident, nothing new is kept alive
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_out @ ctx.weight.dequantize(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (optionally double-quantized); the matmul runs in
    `compute_dtype` (default: the original weight's dtype), the output comes back in the input's dtype."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 64,
        double_quant: bool = True,
    ):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, got {got}")
        if compute_dtype is not None and (
            not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point
        ):
            raise TypeError(f"compute_dtype must be a floating torch.dtype or None, got {compute_dtype!r}")
        if bias is not None and check_tensor("bias", bias, floating=True).shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        nf4 = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.weight_dtype = blocksize, weight.dtype
        self.compute_dtype = compute_dtype or weight.dtype
        self.register_buffer("packed", nf4.packed)
        self.register_buffer("absmax", nf4.absmax)
        self.register_buffer("absmax_scale", nf4.absmax_scale)
        self.register_buffer("absmax_offset", nf4.absmax_offset)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None, blocksize: int = 64, double_quant: bool = True
    ) -> "Linear4bit":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight.detach(), linear.bias, compute_dtype, blocksize, double_quant)

    @property
    def weight(self) -> NF4Tensor:
        return NF4Tensor(
            self.packed,
            self.absmax,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
            self.blocksize,
            self.absmax_scale,
            self.absmax_offset,
        )

    @property
    def n_quantized_params(self) -> int:
        return self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension in_features={self.in_features}, got shape {tuple(x.shape)}")
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return _NF4Matmul.apply(x.to(self.compute_dtype), self.weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
            f"double_quant={self.absmax_scale is not None}, compute_dtype={self.compute_dtype}"
        )


def apply_qlora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    skip_modules: Sequence[str] = ("lm_head",),
) -> nn.Module:
    """Quantize every nn.Linear of `model` to NF4 except those named by `skip_modules` (suffixes; the output head
    by default), then freeze everything and add LoRA on `target_modules`. In place; returns `model`."""
    find_targets(model, target_modules, r, alpha, dropout)  # all argument errors surface before any change
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError("model already has 4-bit layers (apply_qlora was applied twice)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        skipped = module is head or any(name == s or name.endswith("." + s) for s in skip_modules)
        if isinstance(module, nn.Linear) and not skipped:
            parent, _, leaf = name.rpartition(".")
            quantized = Linear4bit.from_linear(module, compute_dtype, blocksize, double_quant)
            setattr(model.get_submodule(parent) if parent else model, leaf, quantized)
    return apply_lora(model, target_modules, r, alpha, dropout)
