"""The TPU path compiled by XLA:TPU itself: the tiny DiT's forward + backward with the Pallas splash kernel, FSDP x
Ulysses over four v5p chips, and the one-chip ``--use-fp8 --cpu-offload`` forward (block weights in host memory),
compiled ahead of time on this CPU host for a TPU topology (``libtpu``; no TPU).

libtpu lives outside the test environment (it makes every JAX start-up probe for a TPU): ``.ci/run`` installs it
with ``pip install --target .venv/tpu-site "libtpu==0.0.42.*"`` and sets ``HCJAX_LIBTPU_SITE`` and
``HCJAX_REQUIRE_LIBTPU=1`` (then a missing libtpu fails instead of skipping).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _libtpu_site() -> str | None:
    site = os.environ.get("HCJAX_LIBTPU_SITE")
    if site and (Path(site) / "libtpu").is_dir():
        return site
    if os.environ.get("HCJAX_REQUIRE_LIBTPU") == "1":
        pytest.fail(f"HCJAX_REQUIRE_LIBTPU=1 but HCJAX_LIBTPU_SITE={site!r} holds no libtpu package")
    pytest.skip("libtpu not installed: pip install --target .venv/tpu-site 'libtpu==0.0.42.*' and set "
                "HCJAX_LIBTPU_SITE=.venv/tpu-site")


def test_dit_train_step_compiles_for_tpu_with_splash_and_sharding():
    site = _libtpu_site()
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=os.pathsep.join([site, str(ROOT)]))
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "tpu_aot_child.py")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(out)
    assert out["device_kind"].startswith("TPU")
    assert out["platforms"] == ["tpu"]               # attention dispatch saw the mesh's platform, not the host's
    assert out["mosaic_calls"] >= 2                  # splash forward and backward are Mosaic kernels in the program
    assert out["all_to_all"] > 0                     # Ulysses exchanges heads <-> sequence
    # per-chip arguments: the shards, not the whole model (TPU pads small arrays to its tiles: allow 10 %)
    assert out["argument_bytes"] < out["unsharded_param_bytes"] / 2
    assert abs(out["argument_bytes"] - out["expected_argument_bytes"]) <= 0.1 * out["expected_argument_bytes"]
    # offload: XLA:TPU compiled the per-layer host->device copies and counts the block weights as host arguments
    # (before storage.host_resident kept [6, D] biases on the device, this compile failed in layout assignment)
    assert out["offload_host_param_bytes"] > 0
    assert out["offload_host_argument_bytes"] >= out["offload_host_param_bytes"]
