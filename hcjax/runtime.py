"""Process-wide JAX setup shared by the entry points: the persistent compilation cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def compilation_cache_dir() -> Path:
    """Where compiled XLA programs persist between runs: ``$HCJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/hcjax/xla``
    (default ``~/.cache/hcjax/xla``)."""
    if os.environ.get("HCJAX_CACHE_DIR"):
        return Path(os.environ["HCJAX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hcjax" / "xla"


def enable_compilation_cache(enabled: bool = True) -> Path | None:
    """JAX's persistent compilation cache (on by default in every entry point; ``--no-compile-cache`` turns it
    off): a second run of the same shapes loads its programs instead of recompiling them. An unwritable cache
    directory only disables the cache."""
    if not enabled:
        return None
    path = compilation_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
