"""Test setup: CPU only, 8 fake host devices (set before jax is imported), fp32 matmuls."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "tests" / "manifests"   # copies of the released checkpoints' key/shape manifests
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def manifests_dir():
    return MANIFESTS
