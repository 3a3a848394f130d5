"""Memory estimates checked before anything large is allocated (sampling and training entry points).

An estimate is a sum of named parts in bytes:

* ``params/<component>``: the parameter bytes of every component the run holds (DiT, VAE, LLaVA, CLIP text,
  Whisper), from ``jax.eval_shape`` of each component's init (nothing is allocated), in the dtypes the config
  gives them. Random weights (``sample.py --config``) add the largest tensor once more at float64 (numpy draws it
  before the cast). Training holds the DiT in fp32 four to five times (params, two AdamW moments, gradients,
  optional EMA).
* ``activations/<what>``: a formula per component. DiT, per pass of ``B`` guidance branches (or a training batch)
  over ``L`` tokens (video + reference patches + text) of width ``D``: hidden states, qkv, attention output and the
  MLP (``B L D (6 + 2 r)``, the MLP part bounded by ``dit.ffn_chunk``); attention scores in fp32 ``B N L L`` twice
  for ``attention: xla`` / ``cudnn`` (dense), ``B N bq bkv`` three times for ``chunked`` (one block pair at a
  time). Training keeps every block's activations (``remat: none``) or only the block inputs plus one block's.
  VAE decode: one tile (``vae.sample_size`` x ``sample_tsize``, or the video when smaller) at full resolution with
  ``block_out_channels[0]`` channels, fp32, four live tensors; plus the decoded video in fp32.
* ``runtime``: the XLA runtime, Python and libraries (1.1 GB: the measured peak RSS of the demo default,
  whose parameters are 7.5 MB).

On a mesh (``mesh=``: a ``MeshConfig``, a ``jax.sharding.Mesh`` or ``{axis: degree}``) the parts are **per
device**: each parameter tensor divided by the mesh degrees its sharding splits it over (the logical names of the
boxed abstract params through the run's rule set: the DiT by ``mesh.rules``, LLaVA/CLIP by the text rules; the VAE
and Whisper stay whole, as :func:`hcjax.pipeline.place` leaves them), the DiT activations divided by the
``sequence`` degree (its tokens, or with Ulysses its heads, are split over that axis). Such a part is listed in
``Estimate.per_device``; against host memory the ``local_devices`` of this process each hold their share.

:func:`check` compares the total with the memory available (the default device's ``memory_stats()`` when the
backend reports a limit, else the host's ``MemAvailable`` from ``/proc/meminfo``) and raises :class:`MemoryError`
(a ``ValueError``: one line, exit 2 in every entry point) naming the config and the estimate. The environment
variable ``HCJAX_MEMORY_LIMIT`` (bytes, or with a ``K/M/G/T`` suffix) replaces the measured available memory;
``HCJAX_MEMORY_LIMIT=off`` disables the check.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from . import dit, vae
from .axes import AXES, RULE_SETS, TEXT_RULES, fit_spec
from .conditioning import clip, llava, whisper
from .config import Config, MeshConfig
from .media import probe

GB = 1e9
RUNTIME_BYTES = int(1.1 * GB)
LIMIT_ENV = "HCJAX_MEMORY_LIMIT"
_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class MemoryEstimateError(ValueError):
    """The estimated memory of a run exceeds what the machine has."""


@dataclasses.dataclass
class Estimate:
    """Named parts in bytes (see the module docstring)."""

    parts: dict[str, int] = dataclasses.field(default_factory=dict)
    per_device: set[str] = dataclasses.field(default_factory=set)     # parts each device of a mesh holds
    devices: int = 1                    # mesh size (1: no mesh)
    local_devices: int = 1              # mesh devices of this process (they share its host memory)

    @property
    def total(self) -> int:
        """Bytes of one device (the whole run without a mesh)."""
        return int(sum(self.parts.values()))

    @property
    def host_total(self) -> int:
        """Bytes of this process's host memory when its devices live there (CPU): every local device's share."""
        return int(sum(v * (self.local_devices if k in self.per_device else 1) for k, v in self.parts.items()))

    def group(self, prefix: str) -> int:
        return int(sum(v for k, v in self.parts.items() if k.split("/")[0] == prefix))

    def summary(self) -> str:
        groups = dict.fromkeys(k.split("/")[0] for k in self.parts)
        text = []
        for g in groups:
            detail = [f"{k.split('/', 1)[1]} {_gb(v)}" for k, v in self.parts.items()
                      if k.startswith(g + "/") and v >= 0.05 * GB]
            text.append(f"{g} {_gb(self.group(g))}" + (f" ({', '.join(detail)})" if detail else ""))
        return " + ".join(text)


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------------- parameters


def _leaves(abstract) -> list:
    return jax.tree.leaves(nn.unbox(abstract))


def _bytes(abstract) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in _leaves(abstract)))


def _largest(abstract) -> int:
    return max((math.prod(x.shape) for x in _leaves(abstract)), default=0)


def mesh_degrees(mesh) -> dict[str, int] | None:
    """``{axis: degree}`` of a ``MeshConfig`` (resolved: no -1), a ``jax.sharding.Mesh`` or a mapping; ``None``
    for no mesh."""
    if mesh is None:
        return None
    if isinstance(mesh, MeshConfig):
        if -1 in mesh.shape:
            raise ValueError(f"memory estimate: resolve the mesh degrees first (got {dict(zip(AXES, mesh.shape))})")
        return dict(zip(AXES, mesh.shape))
    return {a: int(dict(mesh.shape if hasattr(mesh, "shape") else mesh).get(a, 1)) for a in AXES}


def sharded_bytes(abstract, degrees: dict[str, int] | None, rules) -> int:
    """Bytes one device holds of the boxed abstract params ``abstract`` sharded over a mesh of ``degrees`` by the
    logical-axis ``rules`` (each tensor divided by the degrees of the mesh axes its fitted spec names; unboxed
    leaves are replicated). ``degrees=None``: the whole tree."""
    if degrees is None:
        return _bytes(abstract)
    mesh = _Degrees(degrees)
    total = 0
    for leaf in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        names = leaf.names if isinstance(leaf, nn.Partitioned) else None
        x = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        n = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        split = 1
        if names:
            spec = fit_spec(nn.logical_to_mesh_axes(tuple(names), rules), tuple(x.shape), mesh)
            for entry in spec:
                for a in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
                    split *= degrees[a]
        total += -(-n // split)
    return int(total)


@dataclasses.dataclass(frozen=True)
class _Degrees:
    """What :func:`hcjax.axes.fit_spec` needs of a mesh: ``shape`` (axis -> degree)."""

    shape: dict


def abstract_components(cfg: Config, text: bool = True) -> dict:
    """Abstract params (``jax.eval_shape``) of every component a sampling run holds."""
    out = {"dit": dit.abstract_params(cfg.dit), "vae": vae.abstract_params(cfg.vae)}
    if text:
        out["llava"] = llava.abstract_params(cfg)
        out["clip"] = clip.abstract_text_params(cfg.clip_text)
    if cfg.dit.audio_condition:
        out["whisper"] = whisper.abstract_params(cfg.whisper)
    return out


def param_bytes(cfg: Config, text: bool = True) -> dict[str, int]:
    """``{component: bytes}`` of the parameters in their config dtypes."""
    return {k: _bytes(v) for k, v in abstract_components(cfg, text).items()}


# ------------------------------------------------------------------------------------------- activations


def _itemsize(dtype: str) -> int:
    return np.dtype(jax.numpy.dtype(dtype)).itemsize


def dit_tokens(cfg: Config, frames: int, height: int, width: int, reference: bool = True) -> int:
    """Video (+ reference) patches + text tokens of one DiT pass."""
    v, d = cfg.vae, cfg.dit
    pt, ph, pw = d.patch_size
    t = (frames - 1) // v.time_compression_ratio + 1
    h, w = height // v.spatial_compression_ratio, width // v.spatial_compression_ratio
    n = (t // pt) * (h // ph) * (w // pw)
    if reference:
        n += (h // ph) * (w // pw)
    return n + cfg.llava.text_len


def dit_block_bytes(cfg: Config, batch: int, tokens: int) -> int:
    """Live activations of one DiT block over ``batch x tokens`` (module docstring)."""
    d = cfg.dit
    dim, heads, act = d.hidden_size, d.num_heads, _itemsize(d.dtype)
    mlp_tokens = min(tokens, d.ffn_chunk) if d.ffn_chunk else tokens
    dense = batch * dim * act * (6 * tokens + 2 * d.mlp_width_ratio * mlp_tokens)
    if d.attention in ("xla", "cudnn"):
        scores = 2 * batch * heads * tokens * tokens * 4
    else:
        scores = 3 * batch * heads * min(tokens, d.attention_block_q) * min(tokens, d.attention_block_kv) * 4
    return int(dense + scores)


def vae_decode_bytes(cfg: Config, frames: int, height: int, width: int) -> int:
    """One decode tile at full resolution (four live fp32 tensors of ``block_out_channels[0]``) + the video."""
    v = cfg.vae
    tf, th, tw = min(frames, v.sample_tsize + 1), min(height, v.sample_size), min(width, v.sample_size)
    tile = 4 * tf * th * tw * v.block_out_channels[0] * 4
    return int(tile + frames * height * width * 3 * 4)


# ------------------------------------------------------------------------------------------- estimates


def sampling_estimate(cfg: Config, frames: int, height: int, width: int, branches: int = 2,
                      random_weights: bool = False, mesh=None) -> Estimate:
    """Peak bytes of one ``sample.py`` run: parameters + the largest activations + the runtime; with ``mesh``
    per device (module docstring)."""
    degrees = mesh_degrees(mesh)
    devices = math.prod(degrees.values()) if degrees else 1
    est = Estimate(devices=devices)
    if devices > 1:
        est.local_devices = max(1, min(devices, jax.local_device_count()))
        rules = {"dit": RULE_SETS[getattr(mesh, "rules", "default")], "llava": TEXT_RULES, "clip": TEXT_RULES}
    comps = abstract_components(cfg)
    for k, a in comps.items():
        if devices > 1 and k in rules:
            est.parts[f"params/{k}"] = sharded_bytes(a, degrees, rules[k])
            est.per_device.add(f"params/{k}")
        else:
            est.parts[f"params/{k}"] = _bytes(a)
    if random_weights:
        est.parts["params/random-init"] = 8 * max(_largest(a) for a in comps.values())
    per_pass = min(branches, cfg.dit.cfg_batch) if cfg.dit.cfg_batch else branches
    tokens = dit_tokens(cfg, frames, height, width, reference=not cfg.dit.video_condition)
    seq = degrees.get("sequence", 1) if degrees else 1
    est.parts["activations/dit"] = -(-dit_block_bytes(cfg, per_pass, tokens) // seq)
    if devices > 1:
        est.per_device.add("activations/dit")
    est.parts["activations/vae-decode"] = vae_decode_bytes(cfg, frames, height, width)
    est.parts["runtime/xla"] = RUNTIME_BYTES
    return est


def request_estimate(cfg: Config, req, random_weights: bool = False, mesh=None) -> Estimate:
    """:func:`sampling_estimate` of a :class:`hcjax.pipeline.Request` (editing: the input video's frame count and
    size, read from its header)."""
    frames, (height, width) = req.frames, req.video_size
    if req.input_video is not None:
        info = probe(req.input_video)
        frames, height, width = (info.frames - 1) // 4 * 4 + 1, info.height, info.width
    return sampling_estimate(cfg, frames, height, width, req.guidance().branches(), random_weights, mesh)


def training_estimate(cfg: Config) -> Estimate:
    """Peak bytes of one ``train.py`` DiT step (fp32 master weights, AdamW, gradients, optional EMA) on the
    largest bucket (with ``train.microbatch`` the activations of one slice and a gradient accumulator); raw mode
    adds the VAE and the text towers it encodes with."""
    tc, d = cfg.train, cfg.dit
    est = Estimate()
    p = _bytes(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32),
                            nn.unbox(dit.abstract_params(d))))
    copies = 4 + (tc.ema_decay > 0)
    est.parts["params/dit-train-state"] = copies * p
    sliced = 0 < tc.microbatch < tc.batch_size        # train.microbatch: one slice's activations + the accumulator
    if sliced:
        est.parts["params/dit-grad-accumulator"] = p
    if tc.data.mode == "raw":
        extra = param_bytes(cfg, text=tc.data.text_encoder != "hash")
        for k in ("vae", "llava", "clip", "whisper"):
            if k in extra:
                est.parts[f"params/{k}"] = extra[k]
    h, w = max(tc.data.buckets, key=lambda b: b[0] * b[1])
    tokens = dit_tokens(cfg, tc.data.num_frames, h, w, reference=not d.video_condition)
    per_host = max(1, (tc.microbatch if sliced else tc.batch_size) // max(jax.process_count(), 1))
    block = dit_block_bytes(cfg, per_host, tokens)
    depth = d.depth_double_blocks + d.depth_single_blocks
    saved = depth * block if d.remat == "none" else depth * per_host * tokens * d.hidden_size * 4 + block
    est.parts["activations/dit-train"] = int(2 * saved)          # forward activations + their gradients
    est.parts["runtime/xla"] = RUNTIME_BYTES
    return est


# ------------------------------------------------------------------------------------------- available


def _parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    scale = _SUFFIX.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if t[-1:] in _SUFFIX else t) * scale)
    except ValueError:
        raise ValueError(f"{LIMIT_ENV}={text!r}: expected a byte count like 24G or 'off'") from None


def host_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (``None`` where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_memory() -> tuple[int | None, str]:
    """``(bytes, where)``: ``$HCJAX_MEMORY_LIMIT``, else the default device's free memory when the backend reports
    it (``memory_stats()``; ``where`` starts with ``free on device``), else the host's available memory; ``None``
    when nothing is known or the check is off."""
    env = os.environ.get(LIMIT_ENV, "").strip()
    if env.lower() == "off":
        return None, f"{LIMIT_ENV}=off"
    if env:
        return _parse_bytes(env), f"{LIMIT_ENV}={env}"
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"free on device {dev.device_kind} {dev.id}"
    host = host_available()
    return host, "host MemAvailable"


def check(estimate: Estimate, what: str, hint: str = "") -> Estimate:
    """Raise :class:`MemoryEstimateError` (one line naming ``what`` and the estimate) when the estimate exceeds the
    available memory; return the estimate otherwise. On a mesh, a device's memory is compared with one device's
    share (:attr:`Estimate.total`), the host's (and ``HCJAX_MEMORY_LIMIT``, a per-process limit) with all the
    shares of this process's devices (:attr:`Estimate.host_total`)."""
    avail, where = available_memory()
    on_device = where.startswith("free on device")
    need = estimate.total if on_device else estimate.host_total
    if avail is not None and need > avail:
        mesh = ""
        if estimate.devices > 1:
            mesh = (f" per device of {estimate.devices}" if on_device else
                    f" for its {estimate.local_devices} local devices of a {estimate.devices}-device mesh")
        raise MemoryEstimateError(
            f"{what} needs about {_gb(need)}{mesh} ({estimate.summary()}) but only {_gb(avail)} is available ({where})"
            + (f"; {hint}" if hint else "") + f" ({LIMIT_ENV}=off skips this check)")
    return estimate
