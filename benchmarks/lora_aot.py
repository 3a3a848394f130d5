"""AOT per-device memory of the full 13B DiT's LoRA train step (``train.lora``), for fake CPU devices or TPUs.

    python benchmarks/lora_aot.py                         # both cases, each in its own subprocess
    python benchmarks/lora_aot.py --case fsdp8            # 8 devices, mesh fsdp=8, batch 8, bf16 base
    python benchmarks/lora_aot.py --case one              # 1 device, batch 1, fp8 base (--base bf16 to compare)
    python benchmarks/lora_aot.py --target tpu            # compiled by XLA:TPU for v5p chips (no TPU needed)

``--target tpu`` needs ``libtpu`` (see ``benchmarks/tpu_target.py``: ``pip install --target .venv/tpu-site
"libtpu==0.0.42.*"``, found through ``HCJAX_LIBTPU_SITE``). The step is compiled for a TPU topology
(``jax.experimental.topologies``; default ``v5p:2x2x2`` for 8 chips, ``v5p:2x2x1`` for one) on this CPU host, with
the Pallas splash attention kernel, so the figures are XLA:TPU's own buffer assignment. On fake CPU devices XLA:CPU
keeps fp32 copies of bf16 dot operands (no bf16 GEMM on that backend), which inflates the CPU figures.

The step is the one ``train.py`` runs (:func:`hcjax.training.make_train_step`): flow-matching loss through the DiT
with the adapters unmerged (rank ``--rank``, default targets), ``jax.grad`` w.r.t. the adapters only, clipping +
AdamW on the adapters, the frozen base a separate non-donated input in run-time form (block stacks as raw bits;
fp8 kernels + scale with ``--base fp8``). 544x960, 129 frames (33 x 68 x 120 latents: 67 320 video + 2 040
reference tokens) + ``llava.text_len`` text tokens; bf16 compute, ``remat`` (default ``full``) per block, chunked
attention. Everything is ``jax.ShapeDtypeStruct`` with shardings (nothing allocated); ``compiled.memory_analysis()``
gives per-device bytes of the partitioned program. Goal (issue 25): <= 80 GB on one device with fp8 + remat.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402  (the child sets XLA_FLAGS before jax starts a backend)
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from hcjax import lora, training  # noqa: E402
from hcjax.config import MeshConfig, preset  # noqa: E402
from hcjax.data import TrainBatch  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import tpu_target  # noqa: E402

CASES = {"fsdp8": (8, (1, 8, 1, 1), 8, "bf16"), "one": (1, (1, 1, 1, 1), 1, "fp8")}   # devices, mesh, batch, base
TOPOLOGIES = {"fsdp8": "v5p:2x2x2", "one": "v5p:2x2x1"}   # one: the first chip of a host
GB = 1e9


def target_devices(target: str, topology: str | None, case: str) -> list:
    return jax.devices() if target == "cpu" else tpu_target.devices(topology or TOPOLOGIES[case])


def child(case: str, rank: int, remat: str, base_kind: str, block: int, block_kv: int, frames: int, height: int,
          width: int, target: str = "cpu", topology: str | None = None) -> None:
    _, mesh_shape, batch, default_base = CASES[case]
    base_kind = base_kind or default_base
    devices = target_devices(target, topology, case)
    cfg = preset("hunyuancustom_720p")
    attention = "chunked" if target == "cpu" else "splash"
    block_kv = block_kv or (16384 if target == "cpu" else block)
    dc = dataclasses.replace(cfg.dit, dtype="bfloat16", param_dtype="bfloat16", use_fp8=base_kind == "fp8",
                             remat=remat, attention=attention, attention_block_q=block, attention_block_kv=block_kv)
    tc = dataclasses.replace(cfg.train, batch_size=batch, lora=dataclasses.replace(cfg.train.lora, rank=rank))
    cfg = dataclasses.replace(cfg, dit=dc, train=tc, mesh=MeshConfig(*mesh_shape)).validate()
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "sequence", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4, devices=devices[:math.prod(mesh_shape)])
    rules = training.default_rules(cfg)
    opt, _ = training.make_optimizer(cfg.train)
    t0 = time.perf_counter()
    state = training.abstract_state(cfg, mesh, rules, opt)
    base = training.abstract_base(cfg, mesh, rules)
    step = training.make_train_step(cfg, opt, mesh, rules)
    with training.mesh_context(mesh, rules, cfg):
        lt, lh, lw = (frames - 1) // 4 + 1, height // 8, width // 8
        s, c = cfg.llava.text_len, dc.in_channels
        bs = training.batch_sharding(mesh, rules)
        sds = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=bs)  # noqa: E731
        data = TrainBatch(latents=sds((batch, lt, lh, lw, c), jnp.float32), ref_latents=sds((batch, 1, lh, lw, c)),
                          null_ref_latents=sds((batch, 1, lh, lw, c)), text_states=sds((batch, s, dc.text_states_dim)),
                          text_mask=sds((batch, s), jnp.int32), text_states_2=sds((batch, dc.text_states_dim_2)))
        rep = NamedSharding(mesh, PartitionSpec())
        null = {"text_states": jax.ShapeDtypeStruct((s, dc.text_states_dim), jnp.bfloat16, sharding=rep),
                "text_mask": jax.ShapeDtypeStruct((s,), jnp.int32, sharding=rep),
                "text_states_2": jax.ShapeDtypeStruct((dc.text_states_dim_2,), jnp.bfloat16, sharding=rep)}
        per_dev = lambda tree: sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize  # noqa
                                   for x in jax.tree.leaves(tree))
        n_ad = lora.count(state["adapters"])
        where = (f"{len(jax.devices())} fake CPU devices" if target == "cpu" else
                 f"{math.prod(mesh_shape)} {devices[0].device_kind} ({topology or TOPOLOGIES[case]}, AOT)")
        print(f"[{case}] {where}, {attention} attention, mesh {dict(mesh.shape)}; batch {batch}, latents "
              f"{lt}x{lh}x{lw}, {lt * lh * lw // 4 + lh * lw // 4 + s} tokens incl. reference + {s} text; base "
              f"{base_kind} ({per_dev(base) / GB:.2f} GB/device), LoRA rank {rank}: {n_ad / 1e6:.1f} M params; "
              f"train state {per_dev(state) / GB:.3f} GB/device; remat {remat}", flush=True)
        lowered = step.jitted.lower(state, data, null, base)
        t_lower = time.perf_counter() - t0
        compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    print(f"[{case}] lower {t_lower:.0f} s, compile {t_compile:.0f} s; per device: arguments "
          f"{m.argument_size_in_bytes / GB:.2f} GB, outputs {m.output_size_in_bytes / GB:.3f} GB, aliased "
          f"{m.alias_size_in_bytes / GB:.3f} GB, temporaries {m.temp_size_in_bytes / GB:.2f} GB")
    print(f"[{case}] LoRA train step: {total / GB:.2f} GB per device ({total} bytes)", flush=True)
    if os.environ.get("HCJAX_HLO_DUMP"):
        Path(os.environ["HCJAX_HLO_DUMP"]).write_text(compiled.as_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=[*CASES, "all"], default="all")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--base", choices=("bf16", "fp8"), default=None, help="default: fsdp8 bf16, one fp8")
    ap.add_argument("--block", type=int, default=1024, help="chunked attention query block")
    ap.add_argument("--block-kv", type=int, default=0, help="attention key block (default: 16384 chunked on CPU, "
                    "--block for splash on TPU); chunked: the pure-JAX blockwise "
                    "attention keeps one fp32 [B, N, block, K] carry per (query block, key block) for the backward, "
                    "L^2 K / block_kv in all (58 GB at 1024; 3.7 GB at 16384)")
    ap.add_argument("--frames", type=int, default=129)
    ap.add_argument("--height", type=int, default=544)
    ap.add_argument("--width", type=int, default=960)
    ap.add_argument("--target", choices=("cpu", "tpu"), default="cpu", help="cpu: fake CPU devices; tpu: XLA:TPU AOT "
                    "for a TPU topology (needs libtpu)")
    ap.add_argument("--topology", default=None, help="TPU topology for --target tpu (default: v5p:2x2x2 for fsdp8, "
                    "v5p:2x2x1 for one)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.case, a.rank, a.remat, a.base, a.block, a.block_kv, a.frames, a.height, a.width, a.target, a.topology)
        return 0
    status = 0
    for case in (CASES if a.case == "all" else [a.case]):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                                               f" --xla_force_host_platform_device_count="
                                                               f"{CASES[case][0]}").strip())
        env = tpu_target.child_env(env) if a.target == "tpu" else env
        cmd = [sys.executable, __file__, "--child", "--case", case, "--rank", str(a.rank), "--remat", a.remat,
               "--block", str(a.block), "--block-kv", str(a.block_kv or 0), "--frames", str(a.frames), "--height",
               str(a.height), "--width", str(a.width), "--target", a.target]
        if a.topology:
            cmd += ["--topology", a.topology]
        if a.base:
            cmd += ["--base", a.base]
        status |= subprocess.run(cmd, env=env).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
