"""Child of tests/test_tpu_aot.py: compile the tiny DiT for a TPU v5p topology with XLA:TPU (libtpu) on this CPU host.

Prints one JSON line. Run with libtpu importable and JAX_PLATFORMS=cpu (no TPU is driven: the topology only
describes the devices the program is compiled for).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from hcjax import dit  # noqa: E402
from hcjax import sharding as S  # noqa: E402
from hcjax.config import MeshConfig, preset  # noqa: E402
from hcjax.dit.storage import abstract_runtime_params  # noqa: E402


def main() -> None:
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    mesh_shape = (1, 2, 2, 1)                                   # fsdp 2 x sequence 2 (Ulysses) over 4 chips
    mesh = jax.make_mesh(mesh_shape, S.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4, devices=topo.devices)
    # head_dim 128: the lane width the Mosaic splash kernel tiles by
    cfg = dataclasses.replace(preset("tiny").dit, hidden_size=256, num_heads=2, rope_dim_list=(32, 48, 48),
                              attention="splash", attention_block_q=128, attention_block_kv=128,
                              dtype="bfloat16", param_dtype="bfloat16", remat="full")
    mesh_cfg = MeshConfig(*mesh_shape)
    params = S.abstract_sharded(dit.abstract_params(cfg), mesh)
    args, kwargs = dit.example_inputs(cfg, batch=2, latent_thw=(4, 16, 16), text_len=64, abstract=True)
    sh = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=S.input_sharding(mesh, a.shape))  # noqa: E731
    args, kwargs = jax.tree.map(sh, args), jax.tree.map(sh, kwargs)

    def loss(p, *a, **kw):
        return jnp.mean(jnp.square(dit.HunyuanDiT(cfg).apply({"params": p}, *a, **kw).astype(jnp.float32)))

    platforms = []

    def grad_fn(p, *a, **kw):
        platforms.append(S.target_platform())
        return jax.value_and_grad(loss)(p, *a, **kw)

    with S.use_mesh(mesh, mesh_cfg):
        lowered = jax.jit(grad_fn).lower(params, *args, **kwargs)
        compiled = lowered.compile()
    m = compiled.memory_analysis()
    offload = offload_forward(cfg, topo.devices[0])
    shard_bytes = lambda tree: sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize  # noqa
                                   for x in jax.tree.leaves(tree))
    full_bytes = lambda tree: sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    print(json.dumps({
        "device_kind": topo.devices[0].device_kind,
        "platforms": platforms,
        "mosaic_calls": lowered.as_text().count("tpu_custom_call"),
        "argument_bytes": int(m.argument_size_in_bytes),
        "expected_argument_bytes": int(shard_bytes((params, args, kwargs))),
        "unsharded_param_bytes": int(full_bytes(params)),
        "sharded_param_bytes": int(shard_bytes(params)),
        "all_to_all": compiled.as_text().count("all-to-all"),
        **offload,
    }))


def offload_forward(cfg, device) -> dict:
    """One chip, fp8 block kernels held in host memory (``--use-fp8 --cpu-offload``): the forward compiles."""
    cfg = dataclasses.replace(cfg, use_fp8=True, cpu_offload=True, remat="none")
    dev = jax.sharding.SingleDeviceSharding(device)
    params = abstract_runtime_params(dit.abstract_params(cfg), cfg, dev)
    args, kwargs = dit.example_inputs(cfg, batch=1, latent_thw=(4, 16, 16), text_len=64, abstract=True)
    sh = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev)  # noqa: E731
    args, kwargs = jax.tree.map(sh, args), jax.tree.map(sh, kwargs)
    host = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)
               if x.sharding.memory_kind == "pinned_host")
    one = jax.make_mesh((1, 1, 1, 1), S.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4, devices=[device])
    with jax.set_mesh(one):
        compiled = jax.jit(lambda p, *a, **kw: dit.HunyuanDiT(cfg).apply({"params": p}, *a, **kw)).lower(
            params, *args, **kwargs).compile()
    m = compiled.memory_analysis()
    return {"offload_host_param_bytes": int(host), "offload_host_argument_bytes": int(m.host_argument_size_in_bytes)}


if __name__ == "__main__":
    main()
