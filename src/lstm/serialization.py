"""Configs in three dialects, and Keras-style object names.

- "lstm": this library's own `get_config()` format, which is the tutorial's (tf.keras style:
  `dtype` a string, initializers as `{'class_name', 'config'}`, `implementation` kept).
- "keras3": Keras 3 (`dtype` a DTypePolicy dict, `module`/`registered_name` keys, `seed`).
- "tf_keras": Keras 2 (`dtype` a string, `time_major`, `module` keys); here `hard_sigmoid` means
  `clip(0.2x + 0.5, 0, 1)`, read as `hard_sigmoid_tf_keras`.
A config in the tutorial's exact format written by an old tf.keras is indistinguishable from
this library's; pass `dialect="tf_keras"` to `from_config` for those.
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections import defaultdict
from typing import Any, Iterable, Optional

import torch

DIALECTS = ("lstm", "keras3", "tf_keras")

# Keys Keras writes that carry nothing this library needs.
_IGNORED_OBJECT_KEYS = {"input_axes", "output_axes", "dtype"}


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class ConfigurableRegistry:
    """Name / class-name / config-dict lookup for initializers, regularizers and constraints."""

    def __init__(self, kind: str, base: type, classes: Iterable[type], aliases: Optional[dict] = None):
        self.kind, self.base = kind, base
        self.by_name: dict[str, type] = {}
        for cls in classes:
            self.by_name[cls.__name__] = cls
            self.by_name[snake_case(cls.__name__)] = cls
        self.by_name.update(aliases or {})

    def _class(self, name: str, argument: str) -> type:
        if name not in self.by_name:
            known = sorted(n for n in self.by_name if n == n.lower())
            raise ValueError(f"{argument}: unknown {self.kind} {name!r}; expected one of {known}")
        return self.by_name[name]

    def get(self, identifier: Any, argument: str):
        if isinstance(identifier, self.base):
            return identifier
        if isinstance(identifier, str):
            return self._class(identifier, argument)()
        if isinstance(identifier, dict):
            if "class_name" not in identifier:
                raise ValueError(f"{argument}: a {self.kind} config needs a 'class_name' key, got {identifier}")
            cls = self._class(identifier["class_name"], argument)
            config = dict(identifier.get("config") or {})
            accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
            unknown = set(config) - accepted - _IGNORED_OBJECT_KEYS
            if unknown:
                raise ValueError(
                    f"{argument}: unknown keys {sorted(unknown)} in the {cls.__name__} config; "
                    f"expected some of {sorted(accepted)}"
                )
            try:
                return cls(**{k: v for k, v in config.items() if k in accepted})
            except (TypeError, ValueError) as error:  # name the layer's argument, not only the field
                raise type(error)(f"{argument}: {error}") from error
        raise TypeError(
            f"{argument}: expected a {self.kind} name, config dict or {self.base.__name__}, "
            f"got {type(identifier).__name__}"
        )

    def serialize(self, obj) -> dict:
        return {"class_name": type(obj).__name__, "config": obj.get_config()}


def detect_dialect(config: dict) -> str:
    """Which Keras wrote this layer/cell config (see the module docstring)."""
    if isinstance(config.get("dtype"), dict):
        return "keras3"
    if "time_major" in config:
        return "tf_keras"
    if any(isinstance(v, dict) and "module" in v for v in config.values()):
        return "keras3" if "seed" in config and "implementation" not in config else "tf_keras"
    if "seed" in config and "implementation" not in config:
        return "keras3"
    return "lstm"


def activation_from_config(name: Any, dialect: str) -> Any:
    if isinstance(name, dict):  # Keras 3 may serialize activations as objects
        name = name.get("config", name.get("class_name"))
    if dialect == "tf_keras" and name == "hard_sigmoid":
        return "hard_sigmoid_tf_keras"
    return name


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_dtype(dtype: Any, argument: str = "dtype") -> torch.dtype:
    """'float32' / 'float64' / torch dtypes / Keras 3 DTypePolicy dicts to a torch dtype."""
    if dtype is None:
        return torch.get_default_dtype()
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ValueError(f"{argument}: expected float32 or float64, got {dtype}")
    if isinstance(dtype, dict):
        dtype = (dtype.get("config") or {}).get("name")
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"{argument}: expected 'float32' or 'float64', got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_name_counters: dict[str, itertools.count] = defaultdict(itertools.count)


def unique_name(base: str) -> str:
    """Keras naming: the first object is `base`, then `base_1`, `base_2`, ..."""
    n = next(_name_counters[base])
    return base if n == 0 else f"{base}_{n}"


def clear_session() -> None:
    """Reset the automatic names, like `keras.backend.clear_session()`."""
    _name_counters.clear()
