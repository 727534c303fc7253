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
from dataclasses import dataclass
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
    dtype = config.get("dtype")
    if isinstance(dtype, dict):  # a policy: tf_keras writes mixed ones as class "Policy"
        return "tf_keras" if dtype.get("class_name") == "Policy" else "keras3"
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


FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
# Keras 3's mixed policies: float32 variables, computations (and outputs) in the low precision
MIXED_POLICIES = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}
POLICY_NAMES = (*FLOAT_DTYPES, *MIXED_POLICIES)
# the class names of a policy's config: Keras 3 ("FloatDTypePolicy" before 3.6) and tf_keras
_POLICY_CLASS_NAMES = ("DTypePolicy", "FloatDTypePolicy", "Policy")


@dataclass(frozen=True)
class DTypePolicy:
    """Keras 3's dtype policy by name: the dtype of a layer's variables and the one it computes
    (and outputs) in. 'float32', 'float64', 'bfloat16', 'float16': both that dtype;
    'mixed_bfloat16', 'mixed_float16': float32 variables, computations in the low precision."""

    name: str

    @property
    def is_mixed(self) -> bool:
        return self.name in MIXED_POLICIES

    @property
    def variable_dtype(self) -> torch.dtype:
        return torch.float32 if self.is_mixed else FLOAT_DTYPES[self.name]

    @property
    def compute_dtype(self) -> torch.dtype:
        return MIXED_POLICIES[self.name] if self.is_mixed else FLOAT_DTYPES[self.name]

    def get_config(self) -> dict:
        return {"name": self.name}

    def to_config(self) -> Any:
        """As a layer config writes it: a plain dtype as its name (the tutorial's format), a mixed
        policy as Keras 3 writes it (a DTypePolicy dict)."""
        if not self.is_mixed:
            return self.name
        return {"module": "keras", "class_name": "DTypePolicy", "config": self.get_config(), "registered_name": None}


def parse_dtype_policy(dtype: Any, argument: str = "dtype") -> DTypePolicy:
    """A DTypePolicy from a name ('float32', 'bfloat16', 'mixed_bfloat16', ...), a torch dtype, a
    DTypePolicy or its config dict (Keras 3's DTypePolicy / FloatDTypePolicy, tf_keras' Policy)."""
    if isinstance(dtype, DTypePolicy):
        return dtype
    name = dtype
    if isinstance(dtype, torch.dtype):
        name = dtype_name(dtype)
    elif isinstance(dtype, dict):
        name = _policy_name_from_config(dtype, argument)
    if isinstance(name, str) and name in POLICY_NAMES:
        return DTypePolicy(name)
    raise ValueError(f"{argument}: expected one of {list(POLICY_NAMES)}, a torch dtype among them or a "
                     f"DTypePolicy config, got {dtype!r}")


def _policy_name_from_config(config: dict, argument: str) -> Any:
    class_name = config.get("class_name")
    if class_name not in _POLICY_CLASS_NAMES:
        raise ValueError(f"{argument}: expected a dtype policy config of class {' or '.join(_POLICY_CLASS_NAMES)}, "
                         f"got class {class_name!r}")
    return (config.get("config") or {}).get("name")


def parse_dtype(dtype: Any, argument: str = "dtype") -> torch.dtype:
    """A plain float dtype ('float32', 'float64', 'bfloat16', 'float16', a torch dtype, or a policy
    config naming one) to a torch dtype."""
    if dtype is None:
        return torch.get_default_dtype()
    policy = parse_dtype_policy(dtype, argument)
    if policy.is_mixed:
        raise ValueError(f"{argument}: expected a plain dtype (one of {list(FLOAT_DTYPES)}), got the mixed "
                         f"policy {policy.name!r}")
    return policy.variable_dtype


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
