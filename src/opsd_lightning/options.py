"""Settings objects from config mappings: each range is checked once, by the settings class itself, and
every error names the option by its full path in the config (`algorithm.sampling.top_p=0 ...`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def build_settings(settings_cls: type[T], values: T | Mapping[str, Any] | None, option: str) -> T:
    """`settings_cls(**values)` (a built object or None passes through: None means the defaults).

    A settings class states its errors relative to itself (`top_p=0 must be in (0, 1]`) or by its one
    home in the config (`algorithm.loss.chunk_size=0 ...`); here the former gets the option's path.
    """
    if isinstance(values, settings_cls):
        return values
    try:
        return settings_cls(**dict(values or {}))
    except TypeError as err:  # an unknown key
        raise ValueError(f"{option}: {err}") from err
    except ValueError as err:
        message = str(err)
        raise ValueError(message if message.startswith(option) else f"{option}.{message}") from err


def at_least(name: str, value: object, minimum: int) -> None:
    """An integer option `algorithm.<name>` that must be >= `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"algorithm.{name}={value!r} must be an integer >= {minimum}")
