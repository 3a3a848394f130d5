"""Compiling for TPU chips on this CPU host: XLA:TPU (libtpu) ahead of time for a topology description.

``jax.experimental.topologies.get_topology_desc`` describes the chips of a slice (``v5p:2x2x2``: 8 v5p chips)
without driving any; a mesh over those devices lowers and compiles with XLA:TPU's own passes, Pallas/Mosaic kernels
(splash attention) included, and ``compiled.memory_analysis()`` is XLA:TPU's buffer assignment. libtpu stays
outside the project's environment (with it importable every JAX start-up probes for a TPU): install it with
``pip install --target .venv/tpu-site "libtpu==0.0.42.*"`` (the version jax 0.10.2 pins) and point
``HCJAX_LIBTPU_SITE`` at it if elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from jax.experimental import topologies

ROOT = Path(__file__).resolve().parent.parent


def child_env(env: dict) -> dict:
    """``env`` for a child process that compiles for TPU: libtpu's site directory on ``PYTHONPATH``; several
    processes may load libtpu at once (nothing here owns a chip)."""
    site = env.get("HCJAX_LIBTPU_SITE", str(ROOT / ".venv" / "tpu-site"))
    return dict(env, PYTHONPATH=os.pathsep.join(p for p in (site, env.get("PYTHONPATH", "")) if p),
                ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def devices(topology: str) -> list:
    """The devices of a TPU ``topology`` (e.g. ``v5p:2x2x1``), or a one-line exit naming what is missing."""
    if importlib.util.find_spec("libtpu") is None:
        raise SystemExit("--target tpu needs libtpu (the XLA:TPU compiler): pip install --target .venv/tpu-site "
                         "'libtpu==0.0.42.*' (or set HCJAX_LIBTPU_SITE to where it is)")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001  (an unknown topology: one line)
        raise SystemExit(f"--topology {topology!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return list(topo.devices)
