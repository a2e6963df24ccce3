"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al., 2021, arXiv:2106.09685).

Eq. 3 of the paper: the adapted layer computes h = W0 x + (alpha / r) * B A x, with W0 (out x in) frozen, A (r x in)
initialized like an nn.Linear weight (Kaiming-uniform, a = sqrt(5)) and B (out x r) zero, so training starts from
exactly the base model. Only A and B are trained; after training B A can be merged into W0 (and subtracted again),
so inference costs nothing extra.

Module and parameter names follow peft (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`), and `save_adapter`
writes peft's on-disk format (adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<module>.lora_A.weight`), so adapters move between this module and `peft.PeftModel` unchanged.

Under tensor parallelism (impl.distributed.tensor_parallelize, applied after LoRA) the base is a column- or
row-parallel linear, and its `lora_update` computes B A x with the collectives its split needs.
"""

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from impl.common.checks import check_instance, check_positive_number, check_probability, is_int

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """The subset of peft's LoraConfig that describes a plain LoRA adapter; serialized as adapter_config.json."""

    r: int  # rank of the update B A
    lora_alpha: float  # the update is scaled by lora_alpha / r
    target_modules: list[str]  # module-name suffixes that receive an adapter
    lora_dropout: float = 0.0  # dropout on the adapter's input (training only)
    peft_type: str = "LORA"
    bias: str = "none"  # biases stay frozen
    fan_in_fan_out: bool = False  # weights are (out, in), as nn.Linear stores them
    use_rslora: bool = False  # scaling alpha / r, not rank-stabilized alpha / sqrt(r)
    init_lora_weights: bool = True
    inference_mode: bool = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update: base(x) + (alpha / r) * B(A(dropout(x)))."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        in_features, out_features = _features(base_layer, "base_layer")
        _check_hyperparameters(r, alpha, dropout, in_features, out_features, where="base_layer")
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.alpha, self.dropout_p = r, float(alpha), float(dropout)
        self.scaling = self.alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base_layer)
        # fp32 adapters whatever the base dtype (peft's autocast_adapter_dtype); created in peft's order, so the
        # same seed gives the same A
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A, shape (out_features, in_features), fp32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        parallel = getattr(self.base_layer, "lora_update", None)  # a tensor-parallel base puts its collectives in
        update = (parallel(h, self.lora_A, self.lora_B) if parallel else self.lora_B(self.lora_A(h))) * self.scaling
        return (out + update).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + (alpha / r) B A; the forward then skips the adapter."""
        weight = self._mergeable_weight("merge")
        if self.merged:
            raise ValueError("merge: this LoRALinear is already merged; call unmerge() first")
        weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - (alpha / r) B A (exact up to floating-point rounding)."""
        weight = self._mergeable_weight("unmerge")
        if not self.merged:
            raise ValueError("unmerge: this LoRALinear is not merged; call merge() first")
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def _mergeable_weight(self, op: str) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"{op}: base_layer must hold a floating-point weight, got {type(self.base_layer).__name__}")
        return weight

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}, merged={self.merged}"


def apply_lora(
    model: nn.Module, target_modules: str | Sequence[str], r: int, alpha: float, dropout: float = 0.0
) -> nn.Module:
    """Freeze every parameter of `model` and wrap each linear layer whose name ends with one of `target_modules`
    (peft's suffix rule) in a `LoRALinear`. Modifies `model` in place and returns it."""
    targets = find_targets(model, target_modules, r, alpha, dropout)
    model.requires_grad_(False)
    for name, module in targets.items():
        _set_submodule(model, name, LoRALinear(module, r, alpha, dropout))
    return model


def find_targets(
    model: nn.Module, target_modules: str | Sequence[str], r: int, alpha: float, dropout: float = 0.0
) -> dict[str, nn.Module]:
    """Check the arguments of `apply_lora` without touching `model`; return the layers it would wrap, by name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"target_modules must be a non-empty list of module-name suffixes, got {target_modules!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers (apply_lora was applied twice); start from a fresh model")
    found = {n: m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in target_modules)}
    for target in target_modules:
        if not any(n == target or n.endswith("." + target) for n in found):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"target_modules entry {target!r} matches no module of the model; linear layer names are {leaves}"
            )
    for name, module in found.items():
        in_features, out_features = _features(module, f"target module {name!r}")
        _check_hyperparameters(r, alpha, dropout, in_features, out_features, where=f"target module {name!r}")
    return found


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA update into its base weight."""
    for layer in _lora_layers(model, "merge_lora").values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged LoRA update from its base weight again."""
    for layer in _lora_layers(model, "unmerge_lora").values():
        layer.unmerge()
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts by its number of values, not its bytes."""
    check_instance("model", model, nn.Module, "an nn.Module")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(getattr(m, "n_quantized_params", 0) for m in model.modules())
    return trainable, total


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the adapter in peft's format: `peft.PeftModel.from_pretrained(base, directory)` loads it."""
    from safetensors.torch import save_file

    layers = _lora_layers(model, "save_adapter")
    first = next(iter(layers.values()))
    if any(
        (layer.r, layer.alpha, layer.dropout_p) != (first.r, first.alpha, first.dropout_p) for layer in layers.values()
    ):
        raise ValueError("save_adapter: all LoRA layers must share r, alpha and dropout to be written as one config")
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    config = LoRAConfig(r=first.r, lora_alpha=first.alpha, target_modules=targets, lora_dropout=first.dropout_p)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(asdict(config), f, indent=2)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the LoRA adapter saved in `directory` (by `save_adapter` or by peft) to a model that has none yet."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter peft_type must be 'LORA', got {config.get('peft_type')!r}")
    unsupported = {k: config.get(k) for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern")}
    if any(unsupported.values()) or config.get("bias", "none") != "none" or config.get("fan_in_fan_out"):
        raise ValueError(f"load_adapter supports plain LoRA only; the adapter config sets {unsupported}")
    targets = config["target_modules"]
    args = ([targets] if isinstance(targets, str) else targets, config["r"], config["lora_alpha"])
    names = find_targets(model, *args, config.get("lora_dropout", 0.0))  # checks everything before any change
    expected = {f"{_PEFT_PREFIX}{name}.lora_{ab}.weight" for name in names for ab in "AB"}
    tensors = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"adapter weights do not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, module in names.items():
        for key, shape in (("A", (args[1], module.in_features)), ("B", (module.out_features, args[1]))):
            got = tuple(tensors[f"{_PEFT_PREFIX}{name}.lora_{key}.weight"].shape)
            if got != shape:
                raise ValueError(f"adapter tensor {name}.lora_{key}.weight must have shape {shape}, got {got}")
    apply_lora(model, *args, config.get("lora_dropout", 0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"{_PEFT_PREFIX}{n}" in expected:
                p.copy_(tensors[f"{_PEFT_PREFIX}{n}"])
    return model


def _lora_layers(model: nn.Module, op: str) -> dict[str, LoRALinear]:
    check_instance("model", model, nn.Module, "an nn.Module")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError(f"{op}: model has no LoRA layers; call apply_lora first")
    return layers


def _features(module: nn.Module, where: str) -> tuple[int, int]:
    if hasattr(module, "lora_update"):  # impl.distributed's column- and row-parallel linears
        raise ValueError(
            f"{where} is a tensor-parallel {type(module).__name__}: apply LoRA before tensor_parallelize, which then "
            "shards each adapter with its layer and routes it through Megatron's f/g collectives"
        )
    if not (
        isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
    ):
        raise TypeError(f"{where} must be a linear layer (nn.Linear or Linear4bit), got {type(module).__name__}")
    return module.in_features, module.out_features


def _check_hyperparameters(r, alpha, dropout, in_features: int, out_features: int, where: str) -> None:
    if not is_int(r) or not 1 <= r <= min(in_features, out_features):
        raise ValueError(
            f"r must be an int in [1, min(in_features, out_features)] = [1, {min(in_features, out_features)}] "
            f"for {where}, got {r!r}"
        )
    check_positive_number("alpha", alpha)
    check_probability("dropout", dropout, high_open=True)


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
