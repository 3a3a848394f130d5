"""AOT (nothing allocated) cost of 720p sampling on an 8-device mesh (issue 22): compile time, per-device memory and
XLA's FLOP count of each stage, and the time per 50-step video they imply on 8x H100 / TPU v5p-8.

    python benchmarks/aot_mesh.py                     # every stage, each in its own 8-fake-device subprocess
    python benchmarks/aot_mesh.py --stage step        # one whole denoise step (CFG batch 2), mesh 1 1 8 1 (Ulysses)
    python benchmarks/aot_mesh.py --stage step --mesh 1 1 8 1 --ulysses-degree 4
    python benchmarks/aot_mesh.py --stage vae         # one VAE decode tile (each device decodes its own tiles)
    python benchmarks/aot_mesh.py --stage text        # LLaVA-8B + CLIP-L text stage (pos + neg), fsdp 8

* ``step``: ``pipeline.make_denoise_fn`` with one step (CFG 7.5: two guidance branches batched, step cache off) at
  720x1280x129 (33x90x160 latents, 118 800 video + 3 600 reference tokens) + 256 text tokens; bf16 params and
  activations, chunked attention, params sharded by the default rules (embed over fsdp x sequence), tokens over
  ``sequence``. That is the program ``sample.py --mesh`` compiles (its loop runs this body N times).
* ``vae``: the masked decode tile of the tiled VAE (17 latent frames x 32 x 32 -> 65 x 256 x 256 px), fp32 as the
  pipeline runs it, on one device and as the spread decode (one tile per device of ``--mesh``, D at once); a
  720p/129f decode is 84 such tiles.
* ``text``: ``llava_states`` (LLaVA-Llama-3-8B, hidden-state skip 2) on the 351 prompt tokens + 576 image
  features for the positive and negative prompts, and CLIP-L's pooled output; bf16, ``TEXT_RULES`` (embed over
  fsdp), mesh (1, 8, 1, 1).

FLOPs: XLA's cost analysis counts a ``fori_loop``/``scan`` body once, so the per-device figures of the compiled
programs undercount; the step's FLOPs are 20 x one double block + 40 x one single block, each lowered alone with
dense attention (``lowered.cost_analysis()``, global), the text stage's 2 x params x tokens, and the time per video is ``steps x FLOPs per step / (chips x peak x MFU)`` with bf16 dense peaks 989 TFLOP/s (H100
SXM) and 459 TFLOP/s (TPU v5p chip; a v5p-8 slice is 4 chips).
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hcjax import dit, pipeline, vae  # noqa: E402
from hcjax import sharding as S  # noqa: E402
from hcjax.axes import TEXT_RULES  # noqa: E402
from hcjax.conditioning import clip, llava  # noqa: E402
from hcjax.conditioning.llava import num_image_features  # noqa: E402
from hcjax.conditioning.text import clip_pooled  # noqa: E402
from hcjax.config import MeshConfig, preset  # noqa: E402
from hcjax.dit.blocks import DoubleStreamBlock, SingleStreamBlock  # noqa: E402
from hcjax.vae.tiling import spread_fn, tile_fn, tiling_constants  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import tpu_target  # noqa: E402

GB, T = 1e9, 1e12
PEAK = {"8x H100 SXM": (8, 989e12), "TPU v5p-8 (4 chips)": (4, 459e12)}
ANCHORS = "HunyuanVideo 720p/129f/50 steps (CFG-distilled, batch 1): 1,904 s on 1x H100, 337.6 s on 8x H100 (xDiT)"
FRAMES, HEIGHT, WIDTH, TEXT_LEN, STEPS = 129, 720, 1280, 256, 50


def _report(name, compiled, t_compile):
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    print(f"[{name}] compile {t_compile:.1f} s; per device: args {m.argument_size_in_bytes / GB:.2f} GB, temp "
          f"{m.temp_size_in_bytes / GB:.2f} GB, total {total / GB:.2f} GB; XLA flops per device {flops / T:.2f} TFLOP",
          flush=True)
    return flops


def _abstract(mesh, tree, rules=None, dtype=None):
    return S.abstract_sharded(tree, mesh, rules, dtype)


def stage_step(mesh_shape, ulysses: int, depth_scale: bool = True, topology: str | None = None) -> None:
    devices = tpu_target.devices(topology) if topology else None
    base = dataclasses.replace(preset("hunyuancustom_720p").dit, dtype="bfloat16", param_dtype="bfloat16",
                               attention="splash" if topology else "chunked", attention_block_q=1024,
                               attention_block_kv=1024, ulysses_degree=ulysses)
    mesh_cfg = MeshConfig(*mesh_shape)
    lt, lh, lw = (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8
    g = pipeline.Guidance(cfg_scale=7.5, ip_cfg_scale=0.0, use_deepcache=False)
    b = g.branches()

    def compile_for(cfg):
        mesh = S.make_mesh(mesh_cfg, cfg, devices=devices)
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
        conds = pipeline.Conditions(text_states=sds((b, TEXT_LEN, cfg.text_states_dim)),
                                    text_mask=sds((b, TEXT_LEN), jnp.int32),
                                    text_states_2=sds((b, cfg.text_states_dim_2)),
                                    ref_latents=sds((b, 1, lh, lw, cfg.in_channels)))
        fn = pipeline.make_denoise_fn(cfg, 1, g)
        args = (_abstract(mesh, dit.abstract_params(cfg)), sds((1, lt, lh, lw, cfg.in_channels), jnp.float32), conds,
                sds((2,), jnp.float32))
        with S.use_mesh(mesh, mesh_cfg):
            t0 = time.perf_counter()
            compiled = fn.lower(*args).compile()
        return compiled, time.perf_counter() - t0, mesh

    compiled, t_compile, mesh = compile_for(base)
    where = f"{len(devices)} {devices[0].device_kind} ({topology}, XLA:TPU AOT, splash)" if topology else "CPU"
    print(f"[step] {where}, mesh {dict(mesh.shape)}, ulysses_degree {ulysses or 'from mode'}; {lt}x{lh}x{lw} latents, "
          f"{(lt + 1) * (lh // 2) * (lw // 2)} video+ref tokens + {TEXT_LEN} text, CFG batch {b}", flush=True)
    _report("step", compiled, t_compile)
    # cost analysis counts a loop body once (the scanned block stacks, chunked attention's blocks): count one block
    # of each kind instead, lowered alone with dense ``xla`` attention (no loops; nothing compiled or allocated)
    step = sum(n * _block_flops(base, cls, b, (lt + 1) * (lh // 2) * (lw // 2), TEXT_LEN)
               for cls, n in ((DoubleStreamBlock, base.depth_double_blocks),
                              (SingleStreamBlock, base.depth_single_blocks)))
    print(f"[step] FLOPs per denoise step (all devices; the 60 blocks, embedders and final layer ~0.1% more): "
          f"{step / 1e15:.1f} PFLOP")
    for name, (chips, peak) in PEAK.items():
        for mfu in (0.4, 0.6):
            print(f"[step] {name} at {int(mfu * 100)}% MFU: {step / (chips * peak * mfu):.2f} s/step, "
                  f"{STEPS * step / (chips * peak * mfu):.0f} s per {STEPS}-step video")
    print(f"[step] anchors: {ANCHORS}")


def _block_flops(cfg, cls, batch: int, n_img: int, n_txt: int) -> float:
    """XLA's FLOP count of one ``cls`` block on ``batch`` x (``n_img`` + ``n_txt``) tokens (dense attention)."""
    cfg = dataclasses.replace(cfg, attention="xla", ffn_chunk=0)
    block = cls(cfg)
    bf = jnp.bfloat16
    sds = jax.ShapeDtypeStruct
    rope = (sds((n_img, cfg.head_dim), jnp.float32),) * 2
    if cls is DoubleStreamBlock:
        x = (sds((batch, n_img, cfg.hidden_size), bf), sds((batch, n_txt, cfg.hidden_size), bf))
    else:
        x = sds((batch, n_img + n_txt, cfg.hidden_size), bf)
    args = (x, sds((batch, cfg.hidden_size), bf), *rope, sds((batch,), jnp.int32))
    params = jax.eval_shape(lambda k, *a: block.init(k, *a), jax.random.key(0), *args)["params"]
    with S.trace_for("gpu"):            # `xla` = dense jax.nn attention (on CPU it is a blocked loop counted once)
        cost = jax.jit(lambda p, *a: block.apply({"params": p}, *a)).lower(params, *args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print(f"[step] one {cls.__name__}: {cost['flops'] / T:.1f} TFLOP (batch {batch}, {n_img} + {n_txt} tokens)",
          flush=True)
    return float(cost["flops"])


def stage_vae(mesh_shape=(1, 1, 8, 1)) -> None:
    cfg = preset("hunyuancustom_720p").vae
    k = tiling_constants(cfg)
    shape = (1, k["tile_lat_t"] + 1, k["tile_lat"], k["tile_lat"], cfg.latent_channels)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                          jax.eval_shape(lambda: vae.unwrap_params(vae.init_params(cfg, jax.random.key(0)))))
    t0 = time.perf_counter()
    compiled = tile_fn(cfg, "decode").lower(params, jax.ShapeDtypeStruct(shape, jnp.float32, sharding=dev),
                                            jax.ShapeDtypeStruct((3,), jnp.int32, sharding=dev)).compile()
    flops = _report("vae tile", compiled, time.perf_counter() - t0)
    # the spread decode (hcjax.vae.tiling.spread_fn): D tiles stacked, one per device, params replicated
    mesh = S.make_mesh(MeshConfig(*mesh_shape))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    per = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    t0 = time.perf_counter()
    spread = spread_fn(cfg, "decode", mesh).lower(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), params),
        jax.ShapeDtypeStruct((mesh.size, *shape), jnp.float32, sharding=per),
        jax.ShapeDtypeStruct((mesh.size, 3), jnp.int32, sharding=per)).compile()
    _report(f"vae spread, {mesh.size} tiles at once", spread, time.perf_counter() - t0)
    lt, lh, lw = (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8
    tiles = len(range(0, lt, k["dec_stride_lat_t"])) * len(range(0, lh, k["dec_stride_lat"])) * \
        len(range(0, lw, k["dec_stride_lat"]))
    print(f"[vae] {tiles} tiles of {shape[1:4]} latents for {FRAMES}x{HEIGHT}x{WIDTH}: {tiles * flops / 1e15:.2f} PFLOP "
          f"per video; {math.ceil(tiles / 8)} tiles per device on 8 devices")
    for name, (chips, peak) in PEAK.items():
        print(f"[vae] {name} at 40% MFU: {tiles * flops / (chips * peak * 0.4):.1f} s (tiles spread over the chips)")


def stage_text() -> None:
    cfg = preset("hunyuancustom_720p", ["llama.dtype=bfloat16", "llama.param_dtype=bfloat16",
                                        "clip_vision.dtype=bfloat16", "clip_vision.param_dtype=bfloat16"])
    mesh_cfg = MeshConfig(1, 8, 1, 1, rules="fsdp_only")
    mesh = S.make_mesh(mesh_cfg)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    n = cfg.llava.text_len + cfg.llava.crop_start
    size = cfg.clip_vision.image_size
    sds = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
    lp = _abstract(mesh, llava.abstract_params(cfg), TEXT_RULES)
    cp = _abstract(mesh, clip.abstract_text_params(cfg.clip_text), TEXT_RULES)

    def text_stage(lp, cp, ids, mask, pixels, cids, cmask):
        return llava.llava_states(lp, cfg, ids, mask, pixels), clip_pooled(cp, cfg, cids, cmask)

    with S.use_mesh(mesh, rules=TEXT_RULES):
        t0 = time.perf_counter()
        compiled = jax.jit(text_stage).lower(lp, cp, sds((2, n)), sds((2, n)), sds((2, size, size, 3), jnp.float32),
                                             sds((2, cfg.llava.clip_text_len)), sds((2, cfg.llava.clip_text_len))
                                             ).compile()
    print(f"[text] mesh {dict(mesh.shape)}; batch 2 (pos + neg) x {n} tokens + {num_image_features(cfg.clip_vision)} "
          "image features; bf16", flush=True)
    _report("text", compiled, time.perf_counter() - t0)
    # the Llama layers are scanned (cost analysis counts one): 2 FLOPs per parameter per token instead
    n_llama = sum(math.prod(a.shape) for a in jax.tree.leaves(lp["language_model"]))
    tokens = 2 * (n - 1 + num_image_features(cfg.clip_vision))
    flops = 2 * n_llama * tokens
    print(f"[text] ~{flops / T:.0f} TFLOP per prompt pair (2 x {n_llama / 1e9:.1f} B params x {tokens} tokens): "
          f"{flops / (8 * 989e12 * 0.4) * 1e3:.0f} ms on 8x H100 at 40% MFU")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("step", "vae", "text"), default=None, help="default: all, in subprocesses")
    p.add_argument("--mesh", type=int, nargs=4, default=(1, 1, 8, 1), metavar=("DATA", "FSDP", "SEQ", "TENSOR"))
    p.add_argument("--ulysses-degree", type=int, default=0)
    p.add_argument("--target", choices=("cpu", "tpu"), default="cpu", help="step: fake CPU devices, or XLA:TPU ahead "
                   "of time for the chips of --topology with splash attention (needs libtpu: benchmarks/tpu_target.py)")
    p.add_argument("--topology", default="v5p:2x2x2", help="--target tpu: TPU topology (8 chips by default)")
    args = p.parse_args(argv)
    if args.target == "tpu":
        if args.stage not in (None, "step"):
            raise SystemExit("--target tpu: only --stage step")
        if args.stage is None:
            env = tpu_target.child_env(dict(os.environ, JAX_PLATFORMS="cpu"))
            return subprocess.run([sys.executable, __file__, "--stage", "step", "--mesh", *map(str, args.mesh),
                                   "--ulysses-degree", str(args.ulysses_degree), "--target", "tpu", "--topology",
                                   args.topology], env=env).returncode
        stage_step(tuple(args.mesh), args.ulysses_degree, topology=args.topology)
        return 0
    if args.stage is None:
        for stage in ("text", "vae", "step"):
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
            subprocess.run([sys.executable, __file__, "--stage", stage, "--mesh", *map(str, args.mesh),
                            "--ulysses-degree", str(args.ulysses_degree)], env=env, check=True)
        return 0
    if jax.device_count() < 8:
        raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (or without --stage)")
    {"step": lambda: stage_step(tuple(args.mesh), args.ulysses_degree), "vae": lambda: stage_vae(tuple(args.mesh)),
     "text": stage_text}[
        args.stage]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
