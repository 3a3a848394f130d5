"""Process-wide JAX setup shared by the entry points: multi-process start-up (``jax.distributed``) and the
persistent compilation cache.

Multi-host runs (every process runs the same program over one mesh of all processes' devices):

* explicit: ``initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=I)`` (the CLIs' ``--coordinator
  --num-processes --process-id``);
* auto-detected: ``initialize_distributed(auto=True)`` (``--distributed auto``) on TPU pods, SLURM and Open MPI,
  where JAX reads the coordinator, process count and id from the cluster; also whenever the environment sets
  ``JAX_COORDINATOR_ADDRESS`` (the one address variable jax 0.10 reads; process count and id then come from the
  cluster or the flags; ``JAX_COORDINATOR_PORT`` overrides the auto-detected port).

On CPU the cross-process collectives use gloo (``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["compilation_cache_dir", "enable_compilation_cache", "initialize_distributed", "is_main_process",
           "maybe_initialize_distributed"]


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> bool:
    """``jax.distributed.initialize`` from explicit arguments, cluster auto-detection (``auto``) or the environment
    (``JAX_COORDINATOR_ADDRESS``); a no-op (False) otherwise. Call before any JAX computation or device query.

    Explicit: ``coordinator`` (``HOST:PORT`` of process 0), ``num_processes`` and ``process_id`` together."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    env_coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not auto and not env_coordinator and all(v is None for v in given.values()):
        return False
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT of process 0 (e.g. 10.0.0.1:1234)")
    if not auto and not env_coordinator:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"multi-process start-up needs --coordinator, --num-processes and --process-id together "
                             f"(missing {', '.join(missing)}); or --distributed auto on TPU pods / SLURM / Open MPI")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes {num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must be in [0, {num_processes}) (--num-processes)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU only; GPU/TPU use their own
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def maybe_initialize_distributed() -> bool:
    """:func:`initialize_distributed` from the environment alone (``JAX_COORDINATOR_ADDRESS``, or
    ``HCJAX_DISTRIBUTED=1`` for cluster auto-detection)."""
    return initialize_distributed(auto=os.environ.get("HCJAX_DISTRIBUTED") == "1")


def is_main_process() -> bool:
    """Process 0 of a multi-process run (the one that writes files); True in a single-process run."""
    return jax.process_index() == 0


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
