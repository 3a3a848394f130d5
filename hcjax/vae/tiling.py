"""Tiled encode/decode of the 3D causal VAE (spec 4.5), run on the host; the decode's tiles optionally spread over
a device mesh.

Tiling runs ONE compiled tile function per direction and batch size: every tile is padded to the same fixed
shape and carries its valid extent ``(t, h, w)``; the masked model (replicate padding that repeats the last valid
element, GroupNorm statistics and attention keys restricted to the valid region) gives the valid region exactly
what the unpadded tile would give. Invalid trailing frames need no mask in the convs and attention because both
are causal in time. The tiles are independent until blended, so the plan (which input chunks, in which order) is
fixed first and the tiles are decoded in that order, one at a time on one device or, with ``mesh``, D at a time:
one tile of one sample per device (``jax.shard_map`` over all the mesh's axes flattened; the last group is filled
with copies of its last tile, whose results are dropped), so each device holds one tile's working set. Blending
(fp32, numpy) follows the original's in-place, row-major order on full (uncropped) neighbour tiles; only the blend
tails of neighbours are kept, so device memory is one tile's working set whatever the video length or resolution.

Layouts as in ``hcjax.vae.model``: video ``[B, T, H, W, 3]``, moments ``[B, t, h, w, 2C]``, latents
``[B, t, h, w, C]`` (unscaled here); stacked tiles ``[D, 1, T, H, W, C]`` (D = mesh devices).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .. import sharding
from ..config import Config, VAEConfig
from .checks import validate_latents, validate_video
from .model import AutoencoderKLCausal3D, unwrap_params, vae_config


@functools.lru_cache(maxsize=None)
def tile_fn(cfg: VAEConfig, method: str) -> Callable:
    """The jitted masked tile function ``(params, tile, valid[3]) -> output`` for ``moments``/``decode``.
    It is compiled once per tile shape; all tiles of one call share that shape."""
    model = AutoencoderKLCausal3D(cfg)

    def run(p, x, valid):
        return model.apply({"params": p}, x, (valid[0], valid[1], valid[2]), method=method)

    return jax.jit(run)


@functools.lru_cache(maxsize=8)
def spread_fn(cfg: VAEConfig, method: str, mesh) -> Callable:
    """The jitted tile function over ``mesh``: ``(params (replicated), tiles [D, 1, T, H, W, C], valid [D, 3]) ->
    [D, 1, ...]``, tile ``d`` on device ``d`` (all mesh axes flattened), no communication."""
    model = AutoencoderKLCausal3D(cfg)
    spec = P(tuple(mesh.axis_names))

    def one(p, x, valid):                                   # x [1, 1, T, H, W, C], valid [1, 3]: this device's tile
        v = valid[0]
        return model.apply({"params": p}, x[0], (v[0], v[1], v[2]), method=method)[None]

    # check_vma off: the body has no collectives, and the model's scans start from constant (unvarying) carries
    return jax.jit(jax.shard_map(one, mesh=mesh, in_specs=(P(), spec, spec), out_specs=spec, check_vma=False))


def on_mesh(params, mesh):
    """VAE params (``{"params": tree}`` or the tree, boxed or not) replicated on ``mesh``; unchanged when they
    already are (e.g. ``hcjax.pipeline.Models.vae_on_mesh``)."""
    params = nn.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    if all(isinstance(a, jax.Array) and isinstance(a.sharding, NamedSharding) and a.sharding.mesh == mesh
           and a.sharding.is_fully_replicated for a in jax.tree.leaves(params)):
        return params
    return sharding.replicate(params, mesh)


def tiling_constants(cfg: VAEConfig) -> dict[str, int]:
    """Tile sizes, strides, blend extents and crop sizes of the original (spec 4.5), in their own units."""
    f = cfg.tile_overlap_factor
    s, r = cfg.spatial_compression_ratio, cfg.time_compression_ratio
    px, fr = cfg.sample_size, cfg.sample_tsize
    lat, lat_t = int(px / s), int(fr / r)
    k = dict(
        tile_px=px, tile_lat=lat, tile_fr=fr, tile_lat_t=lat_t,
        enc_stride_px=int(px * (1 - f)), enc_blend_lat=int(lat * f), enc_limit_lat=lat - int(lat * f),
        enc_stride_fr=int(fr * (1 - f)), enc_blend_lat_t=int(lat_t * f), enc_limit_lat_t=lat_t - int(lat_t * f),
        dec_stride_lat=int(lat * (1 - f)), dec_blend_px=int(px * f), dec_limit_px=px - int(px * f),
        dec_stride_lat_t=int(lat_t * (1 - f)), dec_blend_fr=int(fr * f), dec_limit_fr=fr - int(fr * f),
    )
    ok = (k["enc_stride_px"] % s == 0 and k["enc_limit_lat"] * s == k["enc_stride_px"]
          and k["enc_stride_fr"] % r == 0 and k["enc_limit_lat_t"] * r == k["enc_stride_fr"]
          and k["dec_limit_px"] == k["dec_stride_lat"] * s and k["dec_limit_fr"] == k["dec_stride_lat_t"] * r
          and min(k["enc_stride_px"], k["enc_stride_fr"], k["dec_stride_lat"], k["dec_stride_lat_t"]) > 0)
    if not ok:
        raise ValueError(f"vae tiling: sample_size={px}, sample_tsize={fr}, tile_overlap_factor={f} give tiles whose "
                         f"crops do not tile the output (use e.g. 256/64/0.25 or 32/16/0.25): {k}")
    return k


def _blend(tail, b, extent: int, axis: int) -> None:
    """In place: ``b[y] = a[len_a - e + y] (1 - y/e) + b[y] y/e`` for ``y < e = min(len_a, len_b, extent)``,
    where ``tail`` holds (at least) the last ``e`` entries of ``a`` along ``axis``."""
    e = min(tail.shape[axis], b.shape[axis], extent)
    if e <= 0:
        return
    shape = [1] * b.ndim
    shape[axis] = e
    wgt = (np.arange(e, dtype=np.float32) / np.float32(e)).reshape(shape)
    a_sl = [slice(None)] * b.ndim
    a_sl[axis] = slice(tail.shape[axis] - e, tail.shape[axis])
    b_sl = [slice(None)] * b.ndim
    b_sl[axis] = slice(0, e)
    b[tuple(b_sl)] = tail[tuple(a_sl)] * (1 - wgt) + b[tuple(b_sl)] * wgt


def _tail(x, extent: int, axis: int):
    sl = [slice(None)] * x.ndim
    sl[axis] = slice(max(x.shape[axis] - extent, 0), None)
    return np.array(x[tuple(sl)])


# ------------------------------------------------------------------------------------------- the plan


def _time_chunks(t: int, tile: int, stride: int, active: bool) -> list[tuple[int, int]]:
    """Temporal chunks ``[i, i + tile + 1)`` every ``stride`` as ``(start, stop)``; a trailing one-frame chunk is
    dropped (one frame -> one output frame, which later tiles drop anyway)."""
    if not active:
        return [(0, t)]
    starts = range(0, t, stride)
    return [(i, min(i + tile + 1, t)) for n, i in enumerate(starts) if n == 0 or min(i + tile + 1, t) - i > 1]


def _space_tiles(h: int, w: int, stride: int, active: bool) -> list[tuple[int, int, int, int]]:
    """Spatial tiles ``(row, column, i, j)`` in row-major order (one whole-frame tile when inactive)."""
    if not active:
        return [(0, 0, 0, 0)]
    return [(ri, ci, i, j) for ri, i in enumerate(range(0, h, stride)) for ci, j in enumerate(range(0, w, stride))]


class _TileRunner:
    """Runs the masked tile function on host chunks, padding each to one fixed shape (edge values): one chunk per
    call on the default device, or with ``mesh`` one sample's chunk per device, D at a time."""

    def __init__(self, cfg: VAEConfig, method: str, params, shape_thw,
                 out_size: Callable[[int, int, int], tuple[int, int, int]], mesh=None):
        self.shape, self.out_size, self.mesh = shape_thw, out_size, mesh
        if mesh is None:
            self.fn, self.params = tile_fn(cfg, method), unwrap_params(params)
        else:
            self.fn, self.params = spread_fn(cfg, method, mesh), on_mesh(params, mesh)
        self.calls = 0

    def _pad(self, chunk):
        t, h, w = chunk.shape[1:4]
        tt, th, tw = self.shape
        if (t, h, w) != (tt, th, tw):
            chunk = np.pad(chunk, [(0, 0), (0, tt - t), (0, th - h), (0, tw - w), (0, 0)], mode="edge")
        return chunk, np.array([t, h, w], np.int32)

    def _crop(self, out, chunk):
        ot, oh, ow = self.out_size(*chunk.shape[1:4])
        return np.array(out, dtype=np.float32)[:, :ot, :oh, :ow]

    def map(self, chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The tile outputs ``[B, ...]`` (cropped to the chunks' valid extents), in the order of ``chunks``."""
        if self.mesh is None:
            for chunk in chunks:
                out = self.fn(self.params, *self._pad(chunk))
                self.calls += 1
                yield self._crop(out, chunk)
            return
        d = self.mesh.size
        done: list[np.ndarray] = []
        units = ((chunk, s) for chunk in chunks for s in range(chunk.shape[0]))    # one sample's tile each
        while group := list(itertools.islice(units, d)):
            b = group[0][0].shape[0]
            padded = [self._pad(chunk[s:s + 1]) for chunk, s in group]
            padded += [padded[-1]] * (d - len(group))                             # fill: results dropped
            tiles = np.stack([x for x, _ in padded])                             # [D, 1, T, H, W, C]
            valid = np.stack([v for _, v in padded])                             # [D, 3]
            sh = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
            args = [jax.make_array_from_callback(a.shape, sh, lambda idx, a=a: a[idx]) for a in (tiles, valid)]
            out = sharding.to_host(self.fn(self.params, *args))                  # [D, 1, ...] on every process
            self.calls += 1
            done += [self._crop(out[k], chunk) for k, (chunk, _) in enumerate(group)]
            while len(done) >= b:
                yield np.concatenate(done[:b])
                done = done[b:]


def _spatial_tiled(outs: Iterator, out, n_tiles: list, blend: int, limit: int, active: bool) -> None:
    """Blend the spatial tiles (``next(outs)``, row-major: above then left) and write their crops into ``out``."""
    if not active:
        out[...] = next(outs)
        return
    above: dict[int, np.ndarray] = {}
    left = None
    for ri, ci, _, _ in n_tiles:
        t = next(outs)
        if ci == 0:
            left = None
        if ri > 0:
            _blend(above[ci], t, blend, axis=2)
        if left is not None:
            _blend(left, t, blend, axis=3)
        crop = t[:, :, :limit, :limit]
        out[:, :, ri * limit:ri * limit + crop.shape[2], ci * limit:ci * limit + crop.shape[3]] = crop
        left = _tail(t, blend, axis=3)
        above[ci] = _tail(t, blend, axis=2)


def _tiled(run: _TileRunner, x, out_shape, *, t_tile, t_stride, t_blend, t_limit, t_active,
           s_tile, s_stride, s_blend, s_limit, s_active, out_thw) -> np.ndarray:
    """Temporal tiles ``[i, i + t_tile + 1)`` every ``t_stride`` (drop the first output frame of later tiles,
    blend over ``t_blend``, keep ``t_limit`` (+1 for the first)); each one spatially tiled."""
    out = np.empty(out_shape, np.float32)
    b, ch = out_shape[0], out_shape[-1]
    times = _time_chunks(x.shape[1], t_tile, t_stride, t_active)
    spaces = _space_tiles(x.shape[2], x.shape[3], s_stride, s_active)
    outs = run.map(x[:, a:e, i:i + s_tile, j:j + s_tile] for a, e in times for _, _, i, j in spaces)
    if not t_active:
        _spatial_tiled(outs, out, spaces, s_blend, s_limit, s_active)
        return out
    pos, prev = 0, None
    for n, (a, e) in enumerate(times):
        ot, oh, ow = out_thw(e - a, x.shape[2], x.shape[3])
        tile = np.empty((b, ot, oh, ow, ch), np.float32)
        _spatial_tiled(outs, tile, spaces, s_blend, s_limit, s_active)
        if n > 0:
            tile = tile[:, 1:]
        if prev is not None:
            _blend(prev, tile, t_blend, axis=1)
        keep = tile[:, :t_limit + 1 if n == 0 else t_limit]
        out[:, pos:pos + keep.shape[1]] = keep
        pos += keep.shape[1]
        prev = _tail(tile, t_blend, axis=1)
    if pos != out_shape[1]:
        raise AssertionError(f"temporal tiling produced {pos} frames, expected {out_shape[1]}")
    return out


def tiled_moments(params, cfg: Config | VAEConfig, video) -> np.ndarray:
    """Tiled encoder + quant_conv (spec 4.5, blending on the moments): ``[B,T,H,W,3] -> [B,t,h,w,2C]``."""
    c = vae_config(cfg)
    validate_video(c, video)
    k = tiling_constants(c)
    x = np.asarray(video, np.float32)
    b, t, h, w, _ = x.shape
    s, r = c.spatial_compression_ratio, c.time_compression_ratio

    def out_thw(tt, hh, ww):
        return (tt - 1) // r + 1, hh // s, ww // s

    shape = (min(t, k["tile_fr"] + 1), min(h, k["tile_px"]), min(w, k["tile_px"]))
    run = _TileRunner(c, "moments", params, shape, out_thw)
    return _tiled(run, x, (b, *out_thw(t, h, w), 2 * c.latent_channels),
                  t_tile=k["tile_fr"], t_stride=k["enc_stride_fr"], t_blend=k["enc_blend_lat_t"],
                  t_limit=k["enc_limit_lat_t"], t_active=t > k["tile_fr"],
                  s_tile=k["tile_px"], s_stride=k["enc_stride_px"], s_blend=k["enc_blend_lat"],
                  s_limit=k["enc_limit_lat"], s_active=h > k["tile_px"] or w > k["tile_px"], out_thw=out_thw)


def tiled_decode(params, cfg: Config | VAEConfig, z, mesh=None) -> np.ndarray:
    """Tiled post_quant_conv + decoder (spec 4.5) of unscaled latents: ``[B,t,h,w,C] -> [B,T,H,W,3]``.

    ``mesh``: the tiles (of every sample) spread over all its devices, one per device at a time (``params`` are
    replicated on it unless they already are); the result equals the one-device decode. With several processes
    every process passes the same ``z`` and gets the whole result."""
    c = vae_config(cfg)
    validate_latents(c, z)
    k = tiling_constants(c)
    x = np.asarray(z, np.float32)
    b, t, h, w, _ = x.shape
    s, r = c.spatial_compression_ratio, c.time_compression_ratio

    def out_thw(tt, hh, ww):
        return (tt - 1) * r + 1, hh * s, ww * s

    shape = (min(t, k["tile_lat_t"] + 1), min(h, k["tile_lat"]), min(w, k["tile_lat"]))
    run = _TileRunner(c, "decode", params, shape, out_thw, mesh=mesh)
    return _tiled(run, x, (b, *out_thw(t, h, w), c.out_channels),
                  t_tile=k["tile_lat_t"], t_stride=k["dec_stride_lat_t"], t_blend=k["dec_blend_fr"],
                  t_limit=k["dec_limit_fr"], t_active=t > k["tile_lat_t"],
                  s_tile=k["tile_lat"], s_stride=k["dec_stride_lat"], s_blend=k["dec_blend_px"],
                  s_limit=k["dec_limit_px"], s_active=h > k["tile_lat"] or w > k["tile_lat"], out_thw=out_thw)
