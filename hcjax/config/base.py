"""What every config dataclass shares: the error type and the dtype names."""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config file, key or value is invalid."""


def check_dtypes(cfg, where: str) -> None:
    """``cfg.dtype`` and ``cfg.param_dtype`` must name one of :data:`DTYPES`."""
    for f in ("dtype", "param_dtype"):
        if getattr(cfg, f) not in DTYPES:
            raise ConfigError(f"{where}.{f}={getattr(cfg, f)!r}; expected one of {DTYPES}")
