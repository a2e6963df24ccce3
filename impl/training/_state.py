"""Turning nested training state (optimizer, scheduler, RNG, data position) into JSON plus a flat tensor dict.

A `state_dict()` mixes tensors with ints, floats, tuples and int-keyed dicts. JSON keeps the structure and the
scalars (floats round-trip exactly: Python writes the shortest repr that reads back to the same double);
tensors move to a flat `{path: tensor}` dict for safetensors, leaving a `{"__tensor__": path}` marker behind.
Tuples, numpy arrays and dicts whose keys are not all plain strings get a tagged form so they come back as they
went in.
"""

from typing import Any

import numpy as np
import torch

_TAGS = ("__tensor__", "__tuple__", "__ndarray__", "__items__")


def encode(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of `obj`; its tensors are added to `tensors` under keys starting with `prefix`."""
    if isinstance(obj, torch.Tensor):
        key = prefix if prefix not in tensors else f"{prefix}#{len(tensors)}"  # {"a.b": x, "a": {"b": y}}
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: encode(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {
            "__items__": [[encode(k, f"{prefix}.key", {}), encode(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]
        }
    raise TypeError(
        f"cannot checkpoint {prefix!r}: expected tensors, numbers, strings, lists, tuples or dicts, "
        f"got {type(obj).__name__}"
    )


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if "__items__" in obj:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in obj["__items__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
