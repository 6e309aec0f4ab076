"""How OPSD computes its divergence: the `algorithm.loss` options."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

_BACKENDS = ("chunked", "full_logits")
# Old names still accepted for one release, with a FutureWarning naming the new one.
_DEPRECATED_BACKENDS = {"naive": "full_logits"}


@dataclass
class LossSettings:
    """How OPSD computes its divergence (`algorithm.loss`).

    `backend`: `chunked` (hidden states, logits `chunk_size` positions at a time: memory O(chunk × V))
    or `full_logits` (full `[tokens, V]` logits from the model for both contexts; the reference, and for
    models whose logits are not `hidden · Wᵀ + b`, e.g. soft-capped ones). `naive` is its deprecated name.
    """

    backend: str = "chunked"
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if self.backend in _DEPRECATED_BACKENDS:
            new_name = _DEPRECATED_BACKENDS[self.backend]
            warnings.warn(
                f"algorithm.loss.backend={self.backend!r} is deprecated and will be removed in the next "
                f"release: use algorithm.loss.backend={new_name!r} (the same loss)",
                FutureWarning,
                stacklevel=3,  # the caller that built the settings, past the dataclass __init__
            )
            self.backend = new_name
        if self.backend not in _BACKENDS:
            accepted = " or ".join(repr(name) for name in _BACKENDS)
            raise ValueError(f"algorithm.loss.backend={self.backend!r}: use {accepted}")
        if self.chunk_size < 1:
            raise ValueError(f"algorithm.loss.chunk_size={self.chunk_size} must be >= 1")
