"""Reading layer and cell configs from any dialect into constructor arguments."""

from __future__ import annotations

import inspect

from ..serialization import activation_from_config, detect_dialect

# Keys Keras writes that do not change the maths here.
_IGNORED = {"use_cudnn", "build_config", "enable_caching_device", "module", "registered_name",
            "batch_input_shape", "batch_shape"}


def constructor_kwargs(cls, config: dict, dialect: str | None = None) -> dict:
    """Constructor arguments of `cls` from a config of any dialect; unknown keys are an error."""
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict, got {type(config).__name__}")
    dialect = dialect or detect_dialect(config)
    kwargs = {k: v for k, v in config.items() if k not in _IGNORED}
    if kwargs.pop("time_major", False):
        raise ValueError("config: time_major=True is not supported; inputs are [batch, time, features]")
    for key in ("activation", "recurrent_activation"):
        if key in kwargs:
            kwargs[key] = activation_from_config(kwargs[key], dialect)
    if kwargs.get("implementation") == 0:  # tf_keras maps 0 to 1
        kwargs["implementation"] = 1
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= set(inspect.signature(klass.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = set(kwargs) - accepted
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)} for {cls.__name__}")
    return kwargs


def nested(path: str, build, *args):
    """build(*args) for a config nested at `path` (e.g. "['layer']") inside the one being read: its
    errors name the key path from the outer config, "config['layer']: ..." rather than "config: ..."."""
    try:
        return build(*args)
    except (ValueError, TypeError) as exc:
        if type(exc) not in (ValueError, TypeError):
            raise
        message = str(exc)
        message = message[len("config"):] if message.startswith("config") else ": " + message
        raise type(exc)(f"config{path}{message}") from None
