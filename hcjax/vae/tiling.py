"""Tiled encode/decode of the 3D causal VAE (spec 4.5), run on the host.

Tiling runs as a loop over ONE compiled tile function per direction and batch size: every tile is padded to
the same fixed shape and carries its valid extent ``(t, h, w)``; the masked model (replicate padding that
repeats the last valid element, GroupNorm statistics and attention keys restricted to the valid region) gives
the valid region exactly what the unpadded tile would give. Invalid trailing frames need no mask in the convs and
attention because both are causal in time. Blending (fp32, numpy) follows the original's in-place, row-major
order on full (uncropped) neighbour tiles; only the blend tails of neighbours are kept, so device memory is one
tile's working set whatever the video length or resolution.

Layouts as in ``hcjax.vae.model``: video ``[B, T, H, W, 3]``, moments ``[B, t, h, w, 2C]``, latents
``[B, t, h, w, C]`` (unscaled here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np

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


class _TileRunner:
    """Runs the masked tile function on host chunks, padding each to one fixed shape (edge values)."""

    def __init__(self, fn, params, shape_thw, out_size: Callable[[int, int, int], tuple[int, int, int]]):
        self.fn, self.params, self.shape, self.out_size = fn, params, shape_thw, out_size
        self.calls = 0

    def __call__(self, chunk):
        t, h, w = chunk.shape[1:4]
        tt, th, tw = self.shape
        if (t, h, w) != (tt, th, tw):
            chunk = np.pad(chunk, [(0, 0), (0, tt - t), (0, th - h), (0, tw - w), (0, 0)], mode="edge")
        out = self.fn(self.params, chunk, np.array([t, h, w], np.int32))
        self.calls += 1
        ot, oh, ow = self.out_size(t, h, w)
        return np.array(out, dtype=np.float32)[:, :ot, :oh, :ow]


def _spatial_tiled(run, x, out, tile: int, stride: int, blend: int, limit: int, active: bool) -> None:
    """Spatial tiles of ``x`` (row-major, blend above then left, crop); writes the result into ``out``."""
    h, w = x.shape[2], x.shape[3]
    if not active:
        out[...] = run(x)
        return
    above: dict[int, np.ndarray] = {}
    for ri, i in enumerate(range(0, h, stride)):
        left = None
        for ci, j in enumerate(range(0, w, stride)):
            t = run(x[:, :, i:i + tile, j:j + tile])
            if ri > 0:
                _blend(above[ci], t, blend, axis=2)
            if left is not None:
                _blend(left, t, blend, axis=3)
            crop = t[:, :, :limit, :limit]
            out[:, :, ri * limit:ri * limit + crop.shape[2], ci * limit:ci * limit + crop.shape[3]] = crop
            left = _tail(t, blend, axis=3)
            above[ci] = _tail(t, blend, axis=2)


def _tiled(run, x, out_shape, *, t_tile, t_stride, t_blend, t_limit, t_active,
           s_tile, s_stride, s_blend, s_limit, s_active, out_thw) -> np.ndarray:
    """Temporal tiles ``[i, i + t_tile + 1)`` every ``t_stride`` (drop the first output frame of later tiles,
    blend over ``t_blend``, keep ``t_limit`` (+1 for the first)); each one spatially tiled."""
    out = np.empty(out_shape, np.float32)
    b, ch = out_shape[0], out_shape[-1]
    t = x.shape[1]
    if not t_active:
        _spatial_tiled(run, x, out, s_tile, s_stride, s_blend, s_limit, s_active)
        return out
    pos, prev = 0, None
    for n, i in enumerate(range(0, t, t_stride)):
        chunk = x[:, i:i + t_tile + 1]
        if n > 0 and chunk.shape[1] == 1:
            continue                                   # one frame -> one output frame, dropped below
        ot, oh, ow = out_thw(chunk.shape[1], x.shape[2], x.shape[3])
        tile = np.empty((b, ot, oh, ow, ch), np.float32)
        _spatial_tiled(run, chunk, tile, s_tile, s_stride, s_blend, s_limit, s_active)
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
    run = _TileRunner(tile_fn(c, "moments"), unwrap_params(params), shape, out_thw)
    return _tiled(run, x, (b, *out_thw(t, h, w), 2 * c.latent_channels),
                  t_tile=k["tile_fr"], t_stride=k["enc_stride_fr"], t_blend=k["enc_blend_lat_t"],
                  t_limit=k["enc_limit_lat_t"], t_active=t > k["tile_fr"],
                  s_tile=k["tile_px"], s_stride=k["enc_stride_px"], s_blend=k["enc_blend_lat"],
                  s_limit=k["enc_limit_lat"], s_active=h > k["tile_px"] or w > k["tile_px"], out_thw=out_thw)


def tiled_decode(params, cfg: Config | VAEConfig, z) -> np.ndarray:
    """Tiled post_quant_conv + decoder (spec 4.5) of unscaled latents: ``[B,t,h,w,C] -> [B,T,H,W,3]``."""
    c = vae_config(cfg)
    validate_latents(c, z)
    k = tiling_constants(c)
    x = np.asarray(z, np.float32)
    b, t, h, w, _ = x.shape
    s, r = c.spatial_compression_ratio, c.time_compression_ratio

    def out_thw(tt, hh, ww):
        return (tt - 1) * r + 1, hh * s, ww * s

    shape = (min(t, k["tile_lat_t"] + 1), min(h, k["tile_lat"]), min(w, k["tile_lat"]))
    run = _TileRunner(tile_fn(c, "decode"), unwrap_params(params), shape, out_thw)
    return _tiled(run, x, (b, *out_thw(t, h, w), c.out_channels),
                  t_tile=k["tile_lat_t"], t_stride=k["dec_stride_lat_t"], t_blend=k["dec_blend_fr"],
                  t_limit=k["dec_limit_fr"], t_active=t > k["tile_lat_t"],
                  s_tile=k["tile_lat"], s_stride=k["dec_stride_lat"], s_blend=k["dec_blend_px"],
                  s_limit=k["dec_limit_px"], s_active=h > k["tile_lat"] or w > k["tile_lat"], out_thw=out_thw)
