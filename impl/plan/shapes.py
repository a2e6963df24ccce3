"""Model shapes for the planner: the handful of numbers that fix every tensor of a decoder, from a known name,
a transformers `config.json` (or its dict), or the project's own presets.

Two families are modelled, the two decoders this project implements:
- GPT-2 (`impl.gpt.GPT`; Radford et al. 2019): learned positions, pre-LN LayerNorm with biases, GELU MLP of
  width 4C, biased linears, the token embedding tied to the output layer;
- Llama (`impl.generation.Llama`; Touvron et al. 2023): RoPE (no position table), RMSNorm, grouped-query
  attention, SwiGLU MLP, no biases, an untied output layer unless the config ties it.

`tensors(shape)` lists every parameter tensor with the shape the project's modules give it (and the names
Hugging Face gives it), so the ZeRO padding (per tensor), the NF4 blocks (per tensor) and the LoRA targets
(per linear) are computed from the same list the real model has.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from impl.common.checks import check_bool, check_one_of, check_positive_int, show

MLPS = ("swiglu", "gelu")
NORMS = ("rms", "layer")


@dataclass(frozen=True)
class ModelShape:
    name: str  # what the planner prints
    vocab_size: int  # rows of the token embedding
    hidden_size: int  # C, the residual stream width
    num_layers: int  # L, transformer blocks
    num_heads: int  # H, query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than num_heads)
    intermediate_size: int  # MLP width (4C for GPT-2)
    head_dim: int  # per-head width (C / H unless the config says otherwise)
    tie_embeddings: bool  # output layer shares the embedding matrix
    mlp: str  # "swiglu" (Llama) or "gelu" (GPT-2)
    norm: str  # "rms" (Llama) or "layer" (GPT-2)
    bias: bool  # linears and norms carry biases (GPT-2)
    max_positions: int  # longest context; GPT-2's learned position table has this many rows

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                      "head_dim", "max_positions"):  # fmt: skip
            check_positive_int(f"shape.{field}", getattr(self, field))
        check_one_of("shape.mlp", self.mlp, MLPS)
        check_one_of("shape.norm", self.norm, NORMS)
        check_bool("shape.tie_embeddings", self.tie_embeddings)
        check_bool("shape.bias", self.bias)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"shape.num_kv_heads must divide num_heads={self.num_heads}, got {self.num_kv_heads}")

    @property
    def family(self) -> str:
        """The family: gpt (learned positions, GELU, LayerNorm) or llama."""
        return "gpt" if self.mlp == "gelu" else "llama"


@dataclass(frozen=True)
class ParamTensor:
    name: str  # Hugging Face / project parameter name
    shape: tuple[int, ...]  # as this device holds it
    linear: bool  # the weight of an nn.Linear (quantized by QLoRA, a LoRA target by its module name)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def module(self) -> str:
        """The leaf module name (`c_attn`, `q_proj`, ...), which LoRA targets match."""
        return self.name.split(".")[-2]


def _gpt(name, vocab, width, layers, heads, positions) -> ModelShape:
    return ModelShape(name, vocab, width, layers, heads, heads, 4 * width, width // heads, True, "gelu", "layer",
                      True, positions)  # fmt: skip


def _llama(name, vocab, width, layers, heads, kv, inter, positions, tie=False) -> ModelShape:
    return ModelShape(name, vocab, width, layers, heads, kv, inter, width // heads, tie, "swiglu", "rms", False,
                      positions)  # fmt: skip


# Published configs (the config.json of each model on the Hugging Face hub, written out here: no download).
KNOWN_MODELS: dict[str, ModelShape] = {
    "gpt2": _gpt("gpt2", 50257, 768, 12, 12, 1024),
    "gpt2-medium": _gpt("gpt2-medium", 50257, 1024, 24, 16, 1024),
    "gpt2-large": _gpt("gpt2-large", 50257, 1280, 36, 20, 1024),
    "gpt2-xl": _gpt("gpt2-xl", 50257, 1600, 48, 25, 1024),
    "llama-2-7b": _llama("llama-2-7b", 32000, 4096, 32, 32, 32, 11008, 4096),
    "llama-2-13b": _llama("llama-2-13b", 32000, 5120, 40, 40, 40, 13824, 4096),
    "llama-2-70b": _llama("llama-2-70b", 32000, 8192, 80, 64, 8, 28672, 4096),
    "llama-3-8b": _llama("llama-3-8b", 128256, 4096, 32, 32, 8, 14336, 8192),
    "llama-3-70b": _llama("llama-3-70b", 128256, 8192, 80, 64, 8, 28672, 8192),
    "mistral-7b": _llama("mistral-7b", 32000, 4096, 32, 32, 8, 14336, 32768),
}


def _project_presets() -> dict[str, ModelShape]:
    """The GPT of `python -m impl.gpt.train --preset cpu|gpu` on tiny-shakespeare's 65 characters."""
    from impl.gpt import GPTConfig

    presets = {
        "gpt-cpu": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65),
        "gpt-gpu": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65),
        "gpt-tiny": GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65),
    }
    return {n: _gpt(n, c.vocab_size, c.n_embd, c.n_layer, c.n_head, c.block_size) for n, c in presets.items()}


KNOWN_MODELS.update(_project_presets())

_GPT2_KEYS = {"vocab_size": "vocab_size", "n_embd": "hidden_size", "n_layer": "num_layers", "n_head": "num_heads",
              "n_positions": "max_positions"}  # fmt: skip
_LLAMA_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
               "num_attention_heads": "num_heads", "intermediate_size": "intermediate_size",
               "max_position_embeddings": "max_positions"}  # fmt: skip


def _from_config(config: dict, name: str) -> ModelShape:
    kind = config.get("model_type")
    if kind not in ("gpt2", "llama", "mistral"):
        raise ValueError(f"config model_type must be one of ('gpt2', 'llama', 'mistral'), got {show(kind)}")
    keys = _GPT2_KEYS if kind == "gpt2" else _LLAMA_KEYS
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"config ({kind}) is missing the fields {missing}")
    values = {ours: config[theirs] for theirs, ours in keys.items()}
    if kind == "gpt2":
        inner = config.get("n_inner") or 4 * values["hidden_size"]
        if inner != 4 * values["hidden_size"]:
            raise ValueError(f"config n_inner must be 4 * n_embd (the project's GPT), got {inner}")
        return _gpt(name, **{"vocab": values["vocab_size"], "width": values["hidden_size"],
                             "layers": values["num_layers"], "heads": values["num_heads"],
                             "positions": values["max_positions"]})  # fmt: skip
    heads = values["num_heads"]
    return ModelShape(
        name=name,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or values["hidden_size"] // heads,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        mlp="swiglu",
        norm="rms",
        bias=False,
        **values,
    )


def model_shape(spec: "str | os.PathLike | dict") -> ModelShape:
    """A ModelShape from a known name (`KNOWN_MODELS`), a path to a transformers config.json, or its dict."""
    if isinstance(spec, ModelShape):
        return spec
    if isinstance(spec, dict):
        return _from_config(spec, str(spec.get("_name_or_path") or spec.get("model_type")))
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.endswith(".json")):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"model: no config file at {str(path)!r}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"model: {str(path)!r} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"model: {str(path)!r} must hold a JSON object, got {type(config).__name__}")
        return _from_config(config, path.parent.name or path.stem)
    if isinstance(spec, str):
        if spec not in KNOWN_MODELS:
            raise ValueError(f"model must be one of {sorted(KNOWN_MODELS)} or a config.json path, got {spec!r}")
        return KNOWN_MODELS[spec]
    raise TypeError(f"model must be a name, a config.json path or a config dict, got {type(spec).__name__}")


def _split(n: int, tp: int, name: str) -> int:
    if n % tp:
        raise ValueError(f"tp must divide {name}={n}, got {tp}")
    return n // tp


def _block(shape: ModelShape, i: int, tp: int) -> list[ParamTensor]:
    C, D, hidden = shape.hidden_size, shape.head_dim, shape.intermediate_size // tp
    if shape.family == "gpt":  # impl.gpt.Block; tensor-parallel as impl.distributed.tensor_parallelize cuts it
        prefix, vectors = f"transformer.h.{i}.", [("ln_1.weight", C), ("ln_1.bias", C), ("ln_2.weight", C),
                                                  ("ln_2.bias", C), ("attn.c_attn.bias", 3 * C // tp),
                                                  ("attn.c_proj.bias", C), ("mlp.c_fc.bias", hidden),
                                                  ("mlp.c_proj.bias", C)]  # fmt: skip
        matrices = [("attn.c_attn", 3 * C // tp, C), ("attn.c_proj", C, C // tp), ("mlp.c_fc", hidden, C),
                    ("mlp.c_proj", C, hidden)]  # fmt: skip
    else:  # impl.generation.Llama with separate projections (Hugging Face's layout)
        q, kv = shape.num_heads // tp * D, shape.num_kv_heads // tp * D
        prefix, vectors = f"layers.{i}.", [("attn_norm.weight", C), ("mlp_norm.weight", C)]
        matrices = [("attn.q_proj", q, C), ("attn.k_proj", kv, C), ("attn.v_proj", kv, C), ("attn.o_proj", C, q),
                    ("mlp.gate_proj", hidden, C), ("mlp.up_proj", hidden, C), ("mlp.down_proj", C, hidden)]  # fmt: skip
    out = [ParamTensor(f"{prefix}{name}.weight", (rows, cols), True) for name, rows, cols in matrices]
    return out + [ParamTensor(prefix + name, (n,), False) for name, n in vectors]


def check_tp(shape: ModelShape, tp: int) -> None:
    """The sizes tensor parallelism splits must divide by `tp` (Megatron-LM sec. 3: heads, MLP width)."""
    _split(shape.num_heads, tp, "num_heads")
    _split(shape.num_kv_heads, tp, "num_kv_heads")
    _split(shape.intermediate_size, tp, "intermediate_size")
    _split(shape.hidden_size, tp, "hidden_size")


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The blocks pipeline stage `stage` of `pp` holds (impl.distributed.split_gpt: later stages one longer)."""
    return range(stage * num_layers // pp, (stage + 1) * num_layers // pp)


def tensors(shape: ModelShape, *, tp: int = 1, pp: int = 1, stage: int = 0) -> list[ParamTensor]:
    """Every parameter tensor one device holds (tied weights once), in the shapes the project's modules give
    them under tensor parallelism `tp` and on pipeline stage `stage` of `pp`."""
    check_tp(shape, tp)
    C, V = shape.hidden_size, shape.vocab_size
    first, last = stage == 0, stage == pp - 1
    vocab_rows = -(-V // tp) if shape.family == "gpt" else V  # the vocab-parallel embedding pads V to tp
    out = []
    if first:
        out.append(ParamTensor("transformer.wte.weight" if shape.family == "gpt" else "embed_tokens.weight",
                               (vocab_rows, C), False))  # fmt: skip
        if shape.family == "gpt":
            out.append(ParamTensor("transformer.wpe.weight", (shape.max_positions, C), False))
    for i in stage_layers(shape.num_layers, pp, stage):
        out += _block(shape, i, tp)
    if last:
        if shape.family == "gpt":
            out += [ParamTensor(f"transformer.ln_f.{n}", (C,), False) for n in ("weight", "bias")]
        else:
            out.append(ParamTensor("norm.weight", (C,), False))
        if not (shape.tie_embeddings and first):  # a last stage holds its own copy of a tied embedding
            out.append(ParamTensor("lm_head.weight", (vocab_rows, C), False))
    return out
