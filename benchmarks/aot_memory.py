"""AOT compile time and per-device memory of the full-size 13B DiT on fake CPU meshes (nothing allocated).

    python benchmarks/aot_memory.py                       # both cases, each in its own subprocess
    python benchmarks/aot_memory.py --case infer          # 720x1280x129 forward, 8 devices (sequence=8), bf16
    python benchmarks/aot_memory.py --case train          # 544x960x129 train step, 64 devices (fsdp=8 x sequence=8)
    python benchmarks/aot_memory.py --case infer1         # ONE device: one CFG denoise step, bf16 | fp8 | fp8+offload
    python benchmarks/aot_memory.py --case infer1 --variant fp8 --cfg-batch 1 --height 544 --width 960
    python benchmarks/aot_memory.py --case vae [--vae-untiled]   # VAE decode at 720p: one tile (tiled decode)

* ``infer``: the DiT forward of one denoising step at 720x1280, 129 frames (33 latent frames, 45x80 patches:
  122 400 video+reference tokens) + 831 text tokens, CFG batch 2, bf16 parameters and activations, Ulysses over
  ``sequence=8`` (24 heads / 8), chunked attention; parameters sharded over the sequence devices (default rules).
* ``train``: ``jax.grad`` of a flow-matching MSE through the DiT (fp32 master weights, bf16 compute, ``remat=full``
  per block) + ``optax.adamw`` update, batch 8 at 544x960x129 (67 320 video + 2 040 reference + 831 text tokens),
  ``fsdp=8 x sequence=8`` (Ulysses), params and optimizer state donated.

* ``infer1`` (issue 23): one device, one step of the compiled denoise loop (``pipeline.make_denoise_fn``, CFG 7.5:
  two guidance branches, batched or -- ``--cfg-batch 1`` -- as two sequential passes) at 720x1280x129 (or
  ``--height/--width``) + reference, 831 text tokens, bf16, chunked attention, ``--ffn-chunk`` tokens per chunk.
  Variants: ``bf16`` (block stacks as raw bits, ``hcjax.dit.storage``), ``fp8`` (block Linears fp8 + scale),
  ``fp8+offload`` (block stacks in pinned host memory; the reported bytes are the device-resident ones:
  arguments + outputs + temporaries minus the host-resident parameters). Last line per run:
  ``infer1 <variant>: <bytes> bytes per device``.

* ``vae``: one device, the VAE decode of a ``--frames x --height x --width`` video (default 129x720x1280) as
  ``hcjax.vae.tiled_decode`` runs it: ONE compiled tile function (fixed tile shape: 17 latent frames x 32 x 32
  latents -> 65 x 256 x 256 pixels) called per tile from the host, which blends the tiles in numpy (host memory).
  The device peak is that one tile's (weights + tile + working set), independent of the video size; printed
  next to the untiled decode of the whole latent for comparison (``--vae-untiled``; slow to compile at 720p).
  Last line: ``vae decode tile: <bytes> bytes per device``.

Everything is ``jax.ShapeDtypeStruct`` with shardings; ``jit(...).lower(...).compile()`` then
``compiled.memory_analysis()`` (per device: the partitioned SPMD program). Each case runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``. Goals (issue 5): forward <= 30 GB/device, train step
<= 95 GB/device, compile < 120 s each.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# importing jax does not start a backend: each case's subprocess sets XLA_FLAGS (fake device count) before it does
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from hcjax import dit, pipeline, vae  # noqa: E402
from hcjax import sharding as S  # noqa: E402
from hcjax.config import MeshConfig, preset  # noqa: E402
from hcjax.dit import audio_feature_shape  # noqa: E402
from hcjax.dit.storage import STACKS, abstract_runtime_params, host_resident  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import tpu_target  # noqa: E402

CASES = {"infer": 8, "train": 64, "infer1": 1, "vae": 1}
VARIANTS = ("bf16", "fp8", "fp8+offload")
DEFAULT_MESH = {"infer": (1, 1, 8, 1), "train": (1, 8, 8, 1)}      # (data, fsdp, sequence, tensor)
GB = 1e9


def _child(case: str, attention: str, block: int, remat: str, text_len: int, mesh_shape, sp_mode: str,
           preset_name: str) -> None:


    base = preset(preset_name).dit
    if case == "infer":
        cfg = dataclasses.replace(base, dtype="bfloat16", param_dtype="bfloat16", attention=attention,
                                  attention_block_q=block, attention_block_kv=block)
        batch, frames, height, width = 2, 129, 720, 1280
    else:
        cfg = dataclasses.replace(base, dtype="bfloat16", param_dtype="float32", attention=attention,
                                  attention_block_q=block, attention_block_kv=block, remat=remat)
        batch, frames, height, width = 8, 129, 544, 960
    cfg = dataclasses.replace(cfg, sequence_parallel=sp_mode)
    mesh_cfg = MeshConfig(*(mesh_shape or DEFAULT_MESH[case]))
    mesh = S.make_mesh(mesh_cfg, cfg)
    lt, lh, lw = (frames - 1) // 4 + 1, height // 8, width // 8
    n_tokens = (lt + 1) * (lh // 2) * (lw // 2) + text_len
    print(f"[{case}] {len(jax.devices())} fake CPU devices, mesh {dict(mesh.shape)}; latent {lt}x{lh}x{lw}, "
          f"batch {batch}, tokens {n_tokens} (incl. reference + {text_len} text); attention {cfg.attention} "
          f"(blocks {block}), params {cfg.param_dtype}, compute {cfg.dtype}, remat {cfg.remat}", flush=True)

    def sds(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=S.input_sharding(mesh, shape))

    act = jnp.dtype(cfg.dtype)
    inputs = (sds((batch, lt, lh, lw, cfg.in_channels), act), sds((batch,)),
              sds((batch, text_len, cfg.text_states_dim), act), sds((batch, text_len), jnp.int32),
              sds((batch, cfg.text_states_dim_2), act), sds((batch, 1, lh, lw, cfg.in_channels), act))
    t0 = time.perf_counter()
    params = S.abstract_sharded(dit.abstract_params(cfg), mesh)
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    param_dev = sum(math.prod(p.sharding.shard_shape(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(params))
    print(f"[{case}] abstract params: {n_params / 1e9:.2f} B, {param_dev / GB:.2f} GB per device "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    cond = {}
    if cfg.audio_condition:
        cond["audio_features"] = sds(audio_feature_shape(cfg, batch, lt), act)
    if cfg.video_condition:
        cond["bg_latents"] = sds((batch, lt, lh, lw, cfg.bg_in_channels), act)

    def forward(p, x, t, text, mask, pooled, ref, cond):
        return dit.HunyuanDiT(cfg).apply({"params": p}, x, t, text, mask, pooled, ref_latents=ref, **cond)

    extra = {}
    if case == "infer":
        fn, args = jax.jit(forward), (params, *inputs, cond)
    else:
        tx = optax.adamw(1e-4, b1=0.9, b2=0.999, weight_decay=0.01)
        opt = _sharded_opt_state(jax.eval_shape(tx.init, params), params)
        target = sds((batch, lt, lh, lw, cfg.out_channels))
        opt_dev = sum(math.prod(o.shape) * o.dtype.itemsize // _ways(o) for o in jax.tree.leaves(opt))
        extra["optimizer state per device"] = opt_dev

        def train_step(p, o, x, t, text, mask, pooled, ref, cond, y):
            def loss_fn(p):
                out = forward(p, x, t, text, mask, pooled, ref, cond)
                return jnp.mean(jnp.square(out - y))

            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, o = tx.update(grads, o, p)
            return optax.apply_updates(p, updates), o, loss

        shard = lambda tree: jax.tree.map(lambda a: a.sharding, tree)  # noqa: E731
        fn = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(shard(params), shard(opt), None))
        args = (params, opt, *inputs, cond, target)

    with S.use_mesh(mesh, mesh_cfg):
        t0 = time.perf_counter()
        lowered = fn.lower(*args)
        t_lower = time.perf_counter() - t0
        print(f"[{case}] lowered in {t_lower:.1f} s; compiling ...", flush=True)
        t0 = time.perf_counter()
        compiled = lowered.compile()
        t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "host_temp_size_in_bytes", "peak_memory_in_bytes")
    stats = {f: getattr(mem, f, None) for f in fields}
    total = (stats["argument_size_in_bytes"] + stats["output_size_in_bytes"] - stats["alias_size_in_bytes"]
             + stats["temp_size_in_bytes"])
    print(f"[{case}] lower {t_lower:.1f} s, compile {t_compile:.1f} s")
    print(f"[{case}] per-device memory (compiled.memory_analysis()):")
    for f, v in stats.items():
        if v is not None:
            print(f"    {f:32s} {v / GB:9.3f} GB")
    print(f"    {'args + outputs - aliased + temp':32s} {total / GB:9.3f} GB")
    print(f"    {'(params per device)':32s} {param_dev / GB:9.3f} GB")
    for k, v in extra.items():
        print(f"    ({k}) {v / GB:.3f} GB")
    text = compiled.as_text()
    colls = {c: text.count(f" {c}(") + text.count(f" {c}-start(") for c in
             ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute")}
    print(f"[{case}] collectives in the partitioned HLO (static count): {colls}")
    big = _large_gathers(text, threshold=n_tokens * cfg.hidden_size // 2)
    print(f"[{case}] all-gathers with outputs >= half a full [tokens, hidden] activation: "
          f"{big if big else 'none'}")
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            print(f"[{case}] XLA cost analysis: {cost['flops'] / 1e12:.1f} TFLOP per device (loop bodies counted once)")
    except Exception as e:  # noqa: BLE001 - informational only
        print(f"[{case}] cost analysis unavailable: {e}")


def _child_infer1(variant: str, height: int, width: int, frames: int, text_len: int, block: int, cfg_batch: int,
                  ffn_chunk: int, preset_name: str, topology: str | None = None) -> None:
    device = tpu_target.devices(topology)[0] if topology else jax.devices()[0]
    attention = "splash" if topology else "chunked"
    cfg = dataclasses.replace(preset(preset_name).dit, dtype="bfloat16", param_dtype="bfloat16", attention=attention,
                              attention_block_q=block, attention_block_kv=block, cfg_batch=cfg_batch,
                              ffn_chunk=ffn_chunk, use_fp8=variant.startswith("fp8"),
                              cpu_offload=variant.endswith("offload"))
    dev = jax.sharding.SingleDeviceSharding(device)
    sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=dev)  # noqa: E731
    lt, lh, lw = (frames - 1) // 4 + 1, height // 8, width // 8
    guidance = pipeline.Guidance(cfg_scale=7.5, ip_cfg_scale=0.0, use_deepcache=False)
    b = guidance.branches()
    n_tokens = (lt + 1) * (lh // 2) * (lw // 2) + text_len
    params = abstract_runtime_params(dit.abstract_params(cfg), cfg, dev)
    leaves = jax.tree.leaves(params)
    n_bytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)
    host = sum(math.prod(a.shape) * a.dtype.itemsize for k in STACKS for a in jax.tree.leaves(params[k])
               if cfg.cpu_offload and host_resident(a.shape))
    where = f"1 {device.device_kind} ({topology}, XLA:TPU AOT)" if topology else "1 CPU device"
    print(f"[infer1 {variant}] {where}; {frames}x{height}x{width} -> latent {lt}x{lh}x{lw}, {n_tokens} tokens "
          f"(incl. reference + {text_len} text); CFG branches {b}, cfg_batch {cfg_batch or b}, ffn_chunk {ffn_chunk}, "
          f"attention {attention} ({block}); params {n_bytes / GB:.2f} GB ({host / GB:.2f} GB in host memory)",
          flush=True)
    conds = pipeline.Conditions(text_states=sds((b, text_len, cfg.text_states_dim)),
                                text_mask=sds((b, text_len), jnp.int32), text_states_2=sds((b, cfg.text_states_dim_2)),
                                ref_latents=sds((b, 1, lh, lw, cfg.in_channels)))
    fn = pipeline.make_denoise_fn(cfg, 1, guidance)
    t0 = time.perf_counter()
    one = jax.make_mesh((1, 1, 1, 1), S.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4, devices=[device])
    with jax.set_mesh(one):                       # the traced code sees the target device's platform
        compiled = fn.lower(params, sds((1, lt, lh, lw, cfg.in_channels), jnp.float32), conds,
                            sds((2,), jnp.float32)).compile()
    t_compile = time.perf_counter() - t0
    m = compiled.memory_analysis()
    args, temp = m.argument_size_in_bytes, m.temp_size_in_bytes
    total = args + m.output_size_in_bytes - m.alias_size_in_bytes + temp
    if m.host_argument_size_in_bytes:          # XLA:TPU counts host-memory arguments apart; XLA:CPU among the rest
        total += m.host_argument_size_in_bytes
    print(f"[infer1 {variant}] lower+compile {t_compile:.1f} s")
    print(f"    arguments {args / GB:9.3f} GB   (of which host-resident params {host / GB:.3f} GB)")
    print(f"    temporaries {temp / GB:7.3f} GB")
    print(f"    total {total / GB:13.3f} GB   device-resident {(total - host) / GB:.3f} GB")
    print(f"infer1 {variant}: {total - host} bytes per device", flush=True)


def _child_vae(height: int, width: int, frames: int, preset_name: str, untiled: bool) -> None:
    c = vae.vae_config(preset(preset_name))
    k = vae.tiling_constants(c)
    s, r = c.spatial_compression_ratio, c.time_compression_ratio
    lt, lh, lw = (frames - 1) // r + 1, height // s, width // s
    params = vae.abstract_params(c)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.unbox(params))
    n_bytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(params))
    tile = (1, min(lt, k["tile_lat_t"] + 1), min(lh, k["tile_lat"]), min(lw, k["tile_lat"]), c.latent_channels)
    runs = [("tile", vae.tile_fn(c, "decode"), (params, jax.ShapeDtypeStruct(tile, jnp.float32),
                                              jax.ShapeDtypeStruct((3,), jnp.int32)))]
    if untiled:
        whole = jax.jit(lambda p, z: vae.AutoencoderKLCausal3D(c).apply({"params": p}, z, method="decode"))
        runs.append(("untiled", whole, (params, jax.ShapeDtypeStruct((1, lt, lh, lw, c.latent_channels),
                                                                      jnp.float32))))
    print(f"[vae] 1 CPU device; decode {frames}x{height}x{width} (latent {lt}x{lh}x{lw}); params "
          f"{n_bytes / GB:.2f} GB {c.param_dtype}, compute {c.dtype}; tile latent {tile[1:4]}", flush=True)
    for name, fn, args in runs:
        t0 = time.perf_counter()
        m = fn.lower(*args).compile().memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        print(f"[vae {name}] lower+compile {time.perf_counter() - t0:.1f} s; arguments "
              f"{m.argument_size_in_bytes / GB:.3f} GB, output {m.output_size_in_bytes / GB:.3f} GB, temporaries "
              f"{m.temp_size_in_bytes / GB:.3f} GB, total {total / GB:.3f} GB", flush=True)
        if name == "tile":
            last = f"vae decode tile: {total} bytes per device"
    print(last, flush=True)


def _large_gathers(hlo: str, threshold: int) -> list[str]:

    out = []
    for m in re.finditer(r"= (\w+)\[([0-9,]+)\][^ ]* all-gather(?:-start)?\(", hlo):
        n = math.prod(int(d) for d in m.group(2).split(","))
        if n >= threshold:
            out.append(f"{m.group(1)}[{m.group(2)}]")
    return out


def _ways(a) -> int:
    shard = a.sharding.shard_shape(a.shape)
    return max(1, math.prod(a.shape) // max(1, math.prod(shard)))


def _sharded_opt_state(abstract_opt, params):
    """Give optimizer-state leaves the sharding of the parameter they mirror (matched by path suffix)."""

    by_path = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(params)}
    mesh = jax.tree.leaves(params)[0].sharding.mesh

    def place(path, leaf):
        key = jax.tree_util.keystr(path)
        for k, p in by_path.items():
            if key.endswith(k) and p.shape == leaf.shape:
                return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=p.sharding)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, PartitionSpec()))

    return jax.tree_util.tree_map_with_path(place, abstract_opt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=[*CASES, "all"], default="all")
    ap.add_argument("--attention", default="chunked", choices=["chunked", "xla"])
    ap.add_argument("--block", type=int, default=1024, help="chunked attention block (q and kv)")
    ap.add_argument("--remat", default="full", help="train: remat policy of the scanned blocks")
    ap.add_argument("--text-len", type=int, default=831)
    ap.add_argument("--mesh", type=int, nargs=4, metavar=("DATA", "FSDP", "SEQ", "TENSOR"),
                    help="mesh degrees (product = the case's device count); default infer 1 1 8 1, train 1 8 8 1")
    ap.add_argument("--sequence-parallel", default="ulysses", choices=["ulysses", "ring", "auto"])
    ap.add_argument("--preset", default="hunyuancustom_720p",
                    help="configs/<preset>.yaml (e.g. hunyuancustom_720p_audio: audio features are added)")
    ap.add_argument("--variant", default="all", choices=[*VARIANTS, "all"], help="infer1: weights")
    ap.add_argument("--height", type=int, default=720, help="infer1: video height")
    ap.add_argument("--width", type=int, default=1280, help="infer1: video width")
    ap.add_argument("--frames", type=int, default=129, help="infer1: video frames")
    ap.add_argument("--cfg-batch", type=int, default=0, help="infer1: guidance branches per DiT pass (0 = all)")
    ap.add_argument("--ffn-chunk", type=int, default=8192, help="infer1: dit.ffn_chunk (tokens, 0 = off)")
    ap.add_argument("--vae-untiled", action="store_true", help="vae: also compile the untiled whole decode")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    ap.add_argument("--target", choices=("cpu", "tpu"), default="cpu", help="infer1: cpu (one CPU device) or tpu "
                    "(XLA:TPU ahead of time for the first chip of --topology, splash attention; needs libtpu, see "
                    "benchmarks/tpu_target.py)")
    ap.add_argument("--topology", default="v5p:2x2x1", help="infer1 --target tpu: TPU topology (v5e: v5e:2x2)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child and args.case == "vae":
        _child_vae(args.height, args.width, args.frames, args.preset, args.vae_untiled)
        return 0
    if args.child and args.case == "infer1":
        _child_infer1(args.variant, args.height, args.width, args.frames, args.text_len, args.block, args.cfg_batch,
                      args.ffn_chunk, args.preset, args.topology if args.target == "tpu" else None)
        return 0
    if args.child:
        _child(args.case, args.attention, args.block, args.remat, args.text_len, args.mesh, args.sequence_parallel,
               args.preset)
        return 0
    status = 0
    for case in (CASES if args.case == "all" else [args.case]):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                              f" --xla_force_host_platform_device_count={CASES[case]}").strip())
        cmd = [sys.executable, __file__, "--child", "--case", case, "--attention", args.attention,
               "--block", str(args.block), "--remat", args.remat, "--text-len", str(args.text_len),
               "--sequence-parallel", args.sequence_parallel, "--preset", args.preset]
        cmd += ["--mesh", *map(str, args.mesh)] if args.mesh else []
        runs = [cmd]
        if case == "vae":
            runs = [[*cmd, "--height", str(args.height), "--width", str(args.width), "--frames", str(args.frames),
                     *(["--vae-untiled"] if args.vae_untiled else [])]]
        if case == "infer1" and args.target == "tpu":
            env = tpu_target.child_env(env)
            cmd += ["--target", "tpu", "--topology", args.topology]
        if case == "infer1":
            cmd += ["--height", str(args.height), "--width", str(args.width), "--frames", str(args.frames),
                    "--cfg-batch", str(args.cfg_batch), "--ffn-chunk", str(args.ffn_chunk)]
            runs = [[*cmd, "--variant", v] for v in (VARIANTS if args.variant == "all" else [args.variant])]
        for run in runs:
            t0 = time.perf_counter()
            try:
                rc = subprocess.run(run, env=env, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                print(f"[{case}] did not finish within {args.timeout:.0f} s")
                rc = 124
            print(f"[{case}] subprocess exit {rc} after {time.perf_counter() - t0:.0f} s wall", flush=True)
            status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
