"""LoRA adapters for the DiT: a params-like tree, applied merged (``merge``) or unmerged (``apply`` / ``lora_scope``).

Adapter tree layout: it mirrors the DiT params tree down to a ``Dense`` module, which holds two leaves instead of
``kernel``/``bias``::

    adapters["double_blocks"]["img_attn_qkv"] = {"lora_a": [L, D, r], "lora_b": [L, r, 3, N, K]}
    adapters["final_layer"]["linear"]         = {"lora_a": [D, r],    "lora_b": [r, P]}

For a kernel of shape ``[*lead, *in, *out]`` (``lead`` = the stacked ``layers`` axis of a block stack, or
nothing) the adapter holds ``lora_a [*lead, *in, r]`` and ``lora_b [*lead, r, *out]``, and its delta is
``delta[l] = lora_a[l] @ lora_b[l]`` contracted over ``r`` (letters: ``L`` layers, ``D`` width, ``N`` heads,
``K`` head dim, ``F`` MLP width, ``r`` rank). Any trainer's ``alpha / r`` scaling is folded into ``lora_b`` by the
importer (``convert_weights.lora``); the ``scale`` arguments here are the user's strength (``--lora-scale``).
Several adapters combine by concatenation along ``r`` with ``lora_b`` multiplied by each one's scale
(``combine``), which is exactly the sum of their scaled deltas.

Application (both give the same function; the tests check it against peft to 1e-5):

* ``merge(params, adapters, scale)`` -> new params with ``W' = cast_{W.dtype}(f32(W) + sum_i s_i * f32(a_i @ b_i))``:
  the delta and the sum are computed in fp32 (``Precision.HIGHEST``) and rounded once to the params' dtype, one
  kernel at a time on the kernel's device(s). The input tree is never modified (leaves without an adapter are
  shared, adapted ones are new arrays).
* unmerged: ``apply(model, params, adapters, scale, *args)`` runs ``model.apply`` on ``inject(params, adapters)``
  (the adapter leaves placed beside their kernels, so block stacks are sliced per layer together with their
  kernels) inside ``lora_scope()``, a Flax method interceptor that adds ``(x @ a) @ b`` (in the Dense's compute
  dtype) to every ``Dense`` whose scope holds ``lora_a``/``lora_b``. The base params stay untouched and no merged
  kernel is ever formed, so the base can be frozen, fp8 or shared between adapters. Needs no change in the DiT.

Training (``hcjax.training`` with ``train.lora``): ``init_adapters`` (``lora_b = 0``) on the ``target_modules``,
sharded like their kernels (``boxed``), applied unmerged with LoRA dropout: ``inject(..., dropout_key=)`` places a
``lora_key`` (int32 key data, one per stacked layer) beside each adapter and ``lora_scope(dropout)`` drops the LoRA
branch's input with it. ``save_trained`` / ``export_checkpoint`` write a train state's adapters (``alpha / rank``
folded into ``lora_b``); ``for_sampling`` applies adapter files for ``sample.py --lora``. Guide: docs/lora.md.

Files (``save_adapter``/``load_adapter``): safetensors of the flat tree (``"double_blocks/img_attn_qkv/lora_a"``)
with JSON metadata under the header key ``hcjax_lora`` (source format, ranks, per-module scales, ...).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from .checkpoint import TrainCheckpoints
from .config import DEFAULT_LORA_TARGETS, Config, config_from_json
from .dit.storage import FP8
from .layers import Dense

LORA_A, LORA_B = "lora_a", "lora_b"
LORA_KEY = "lora_key"           # per-layer dropout key (int32 key data) placed beside an adapter by ``inject``
METADATA_KEY = "hcjax_lora"
ADAPTER_FILE = "adapter.safetensors"


# ------------------------------------------------------------------------------------------- tree helpers


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, path))
        else:
            out[path] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def modules(adapters: Mapping) -> dict[str, tuple[Any, Any]]:
    """Module path (``"double_blocks/img_attn_qkv"``) -> ``(lora_a, lora_b)``; a half adapter is an error."""
    flat = _flatten(adapters)
    out: dict[str, tuple[Any, Any]] = {}
    problems = []
    for path in flat:
        module, _, leaf = path.rpartition("/")
        if leaf not in (LORA_A, LORA_B):
            problems.append(f"{path}: adapter leaves must be named {LORA_A!r} or {LORA_B!r}")
            continue
        other = f"{module}/{LORA_B if leaf == LORA_A else LORA_A}"
        if other not in flat:
            problems.append(f"{path} has no matching {other}")
            continue
        out[module] = (flat[f"{module}/{LORA_A}"], flat[f"{module}/{LORA_B}"])
    if problems:
        raise ValueError("malformed adapter tree: " + "; ".join(sorted(set(problems))))
    return out


def lead_ndim(kernel_shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """Number of leading (stacked-layer) axes; ``ValueError`` if ``a``/``b`` do not factor the kernel."""
    lead = len(a_shape) + len(b_shape) - 2 - len(kernel_shape)
    ok = lead >= 0 and len(a_shape) > lead + 1 and len(b_shape) > lead + 1
    if ok:
        ok = (tuple(a_shape[:lead]) == tuple(b_shape[:lead]) and a_shape[-1] == b_shape[lead]
              and tuple(kernel_shape) == tuple(a_shape[:-1]) + tuple(b_shape[lead + 1:]))
    if not ok:
        raise ValueError(f"lora_a {tuple(a_shape)} and lora_b {tuple(b_shape)} do not factor a kernel of shape "
                         f"{tuple(kernel_shape)} (expected lora_a [*lead, *in, r], lora_b [*lead, r, *out])")
    return lead


def _shape(kernel) -> tuple[int, ...]:
    """Shape of a kernel leaf: an array, or the run-time fp8 node ``{"fp8": bits, "fp8_scale"}`` (``hcjax.dit``)."""
    return tuple((kernel[FP8] if isinstance(kernel, Mapping) else kernel).shape)


def validate(params: Mapping, adapters: Mapping, what: str = "adapter") -> dict[str, tuple[Any, Any]]:
    """Check every adapted module exists in ``params`` with a kernel the adapter factors; returns ``modules``."""
    mods = modules(adapters)
    problems = []
    for path, (a, b) in mods.items():
        node: Any = params
        for part in path.split("/"):
            node = node.get(part) if isinstance(node, Mapping) else None
        if not isinstance(node, Mapping) or "kernel" not in node:
            problems.append(f"{path}: no such Dense (no {path}/kernel in the params)")
            continue
        try:
            lead_ndim(_shape(node["kernel"]), a.shape, b.shape)
        except ValueError as e:
            problems.append(f"{path}: {e}")
    if problems:
        raise ValueError(f"{what} does not fit the params: " + "; ".join(problems))
    return mods


def _as_list(adapters, scale) -> tuple[list[Mapping], list[float]]:
    if isinstance(adapters, Mapping):
        adapters = [adapters]
    adapters = list(adapters)
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(adapters)
    if len(scales) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(scales)} scales; give one scale per adapter")
    return adapters, scales


def _kernel_shape(params: Mapping, path: str) -> tuple[int, ...]:
    node: Any = params
    for part in path.split("/"):
        node = node[part]
    return _shape(node["kernel"])


def combine(params: Mapping, adapters: Mapping | Sequence[Mapping], scale: float | Sequence[float] = 1.0) -> dict:
    """One adapter tree equal to ``sum_i scale_i * adapters_i`` for ``params``: ranks concatenated, each ``lora_b``
    multiplied by its scale (in fp32, or the adapter's dtype if wider). Works on numpy and traced arrays."""
    adapters, scales = _as_list(adapters, scale)
    parts: dict[str, list] = {}
    for i, tree in enumerate(adapters):
        for path, (a, b) in validate(params, tree, what=f"adapter {i}").items():
            parts.setdefault(path, []).append((a, b, scales[i]))
    out = {}
    for path, items in parts.items():
        a0, b0, _ = items[0]
        lead = lead_ndim(_kernel_shape(params, path), a0.shape, b0.shape)
        dt = jnp.promote_types(b0.dtype, jnp.float32)
        a = jnp.concatenate([jnp.asarray(a) for a, _, _ in items], axis=-1) if len(items) > 1 else jnp.asarray(a0)
        bs = [jnp.asarray(b).astype(dt) * jnp.asarray(s, dt) for _, b, s in items]
        out[f"{path}/{LORA_A}"] = a
        out[f"{path}/{LORA_B}"] = jnp.concatenate(bs, axis=lead) if len(bs) > 1 else bs[0]
    return _unflatten(out)


# ------------------------------------------------------------------------------------------- merged


def delta(kernel_shape: Sequence[int], a, b):
    """``a @ b`` over the rank axis, reshaped to ``kernel_shape`` (fp32, ``Precision.HIGHEST``)."""
    lead = lead_ndim(kernel_shape, a.shape, b.shape)
    ls = tuple(a.shape[:lead])
    r = a.shape[-1]
    a2 = jnp.asarray(a, jnp.float32).reshape(*ls, -1, r)
    b2 = jnp.asarray(b, jnp.float32).reshape(*ls, r, -1)
    d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    return d.reshape(tuple(kernel_shape))


@jax.jit
def _merge_kernel(w, ab_pairs, scales):
    acc = w.astype(jnp.float32)
    for (a, b), s in zip(ab_pairs, scales):
        acc = acc + s * delta(w.shape, a, b)
    return acc.astype(w.dtype)


def merge(params: Mapping, adapters: Mapping | Sequence[Mapping], scale: float | Sequence[float] = 1.0) -> dict:
    """New params with every adapted kernel ``W + sum_i scale_i * a_i @ b_i`` (numerics: module docstring).

    ``adapters``: one tree or a list; ``scale``: one number or one per adapter. ``params`` is not modified.
    """
    adapters, scales = _as_list(adapters, scale)
    per_kernel: dict[str, list] = {}
    for i, tree in enumerate(adapters):
        for path, ab in validate(params, tree, what=f"adapter {i}").items():
            per_kernel.setdefault(f"{path}/kernel", []).append((ab, scales[i]))
    flat = _flatten(params)
    for kpath, items in per_kernel.items():
        w = flat.get(kpath)
        if w is None or not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"merge: {kpath} is held in run-time form (fp8 or raw bits: dit.use_fp8 / "
                             "dit.cpu_offload); merge into the ordinary params first, or apply the adapters "
                             "unmerged (sample.py --lora-mode unmerged)")
        pairs = tuple(ab for ab, _ in items)
        ss = tuple(jnp.float32(s) for _, s in items)
        flat[kpath] = _merge_kernel(flat[kpath], pairs, ss)
    return _unflatten(flat)


# ------------------------------------------------------------------------------------------- unmerged


def inject(params: Mapping, adapters: Mapping | Sequence[Mapping], scale: float | Sequence[float] = 1.0, *,
           dropout_key=None) -> dict:
    """``params`` (shared, not copied) with the combined adapter leaves beside each adapted kernel.

    ``dropout_key``: also a ``lora_key`` leaf per adapted module, ``[*lead, 2]`` int32 key data (one key per stacked
    layer, ``fold_in(dropout_key, module index)`` split over the layers), which the block scan slices per layer
    together with the kernel: the dropout masks of :func:`lora_scope` differ per module, layer and key."""
    combined = combine(params, adapters, scale)
    flat = _flatten(params)
    for i, (path, (a, b)) in enumerate(sorted(modules(combined).items())):
        flat[f"{path}/{LORA_A}"], flat[f"{path}/{LORA_B}"] = a, b
        if dropout_key is not None:
            lead = tuple(a.shape[: lead_ndim(_kernel_shape(params, path), a.shape, b.shape)])
            k = jax.random.fold_in(dropout_key, i)
            keys = jax.random.split(k, int(np.prod(lead))).reshape(lead) if lead else k
            flat[f"{path}/{LORA_KEY}"] = jax.lax.bitcast_convert_type(jax.random.key_data(keys), jnp.int32)
    return _unflatten(flat)


def strip(params: Mapping) -> tuple[dict, dict]:
    """Split an injected tree back into ``(base params, adapters)``."""
    base, ad = {}, {}
    for path, v in _flatten(params).items():
        leaf = path.rpartition("/")[2]
        if leaf != LORA_KEY:
            (ad if leaf in (LORA_A, LORA_B) else base)[path] = v
    return _unflatten(base), _unflatten(ad)


def _dropped(module: nn.Module, x, rate: float):
    """``x`` with inverted dropout at ``rate``, the mask drawn from the module's ``lora_key`` (see ``inject``)."""
    data = module.get_variable("params", LORA_KEY)
    if data is None:
        raise ValueError(f"Dense {module.name}: LoRA dropout {rate} needs per-layer keys; build the params with "
                         "inject(..., dropout_key=key) (or lora.apply(..., dropout_key=key))")
    key = jax.random.wrap_key_data(jax.lax.bitcast_convert_type(data, jnp.uint32))
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _interceptor(next_fun, args, kwargs, context, dropout: float = 0.0):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, Dense) or not module.has_variable(
            "params", LORA_A):
        return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0]
    a, b = module.get_variable("params", LORA_A), module.get_variable("params", LORA_B)
    if b is None:
        raise ValueError(f"Dense {module.name}: {LORA_A} without {LORA_B}")
    dt = y.dtype
    if dropout > 0:
        x = _dropped(module, x.astype(dt), dropout)
    n_in = module.in_ndim
    xa = jax.lax.dot_general(x.astype(dt), a.astype(dt), ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                                                          ((), ())))
    return y + jax.lax.dot_general(xa, b.astype(dt), (((xa.ndim - 1,), (0,)), ((), ())))


@contextlib.contextmanager
def lora_scope(dropout: float = 0.0):
    """Inside, every ``Dense`` whose params hold ``lora_a``/``lora_b`` adds ``(x @ lora_a) @ lora_b``.

    Must be active while the model is *traced* (wrap the ``model.apply`` call inside the jitted function).
    ``dropout > 0`` (training): the LoRA branch sees ``dropout(x)`` (inverted dropout, the base matmul sees ``x``),
    masks from the ``lora_key`` leaves ``inject(..., dropout_key=)`` placed beside the adapters -- one key per module
    and stacked layer, sliced by the block scan like the kernels, so no change to the DiT. A Dense called several
    times per layer (``dit.ffn_chunk`` token chunks) reuses its mask pattern per chunk.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout {dropout} must be in [0, 1)")
    with nn.intercept_methods(lambda *a: _interceptor(*a, dropout=dropout)):
        yield


def apply(model: nn.Module, params: Mapping, adapters: Mapping | Sequence[Mapping],
          scale: float | Sequence[float] = 1.0, *args, dropout: float = 0.0, dropout_key=None, **kwargs):
    """``model.apply`` with the adapters unmerged (see module docstring); jit-traceable. ``dropout`` (with a
    ``dropout_key``): LoRA dropout as in :func:`lora_scope`."""
    if dropout > 0 and dropout_key is None:
        raise ValueError("lora.apply: dropout > 0 needs a dropout_key")
    injected = inject(params, adapters, scale, dropout_key=dropout_key if dropout > 0 else None)
    with lora_scope(dropout):
        return model.apply({"params": injected}, *args, **kwargs)


def for_sampling(params: Mapping, files: Sequence[str | Path], scales: Sequence[float] | None = None,
                 mode: str = "merged") -> dict:
    """DiT ``params`` with the adapter ``files`` (``--lora``) at ``scales`` (``--lora-scale``: one per file, one
    for all, or none = 1): ``merged`` (:func:`merge`, in the params' dtype) or ``unmerged`` (:func:`inject`; the
    model must then be traced inside :func:`lora_scope`)."""
    if mode not in ("merged", "unmerged"):
        raise ValueError(f"--lora-mode {mode!r}; expected 'merged' or 'unmerged'")
    scales = [1.0] if not scales else list(scales)
    if len(scales) == 1:
        scales = scales * len(files)
    if len(scales) != len(files):
        raise ValueError(f"--lora-scale: {len(scales)} scales for {len(files)} --lora files; give one per file "
                         "(or one for all)")
    adapters = [load_adapter(f)[0] for f in files]
    if mode == "merged":
        return merge(params, adapters, scales)
    out = inject(params, adapters, scales)
    flat = _flatten(out)
    for path in modules(strip(out)[1]):                 # adapters replicated on their kernel's mesh, if any
        sh = getattr(flat.get(f"{path}/kernel", flat.get(f"{path}/kernel/{FP8}")), "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            for leaf in (LORA_A, LORA_B):
                flat[f"{path}/{leaf}"] = jax.device_put(flat[f"{path}/{leaf}"],
                                                        jax.sharding.NamedSharding(sh.mesh, P()))
    return _unflatten(flat)


# ------------------------------------------------------------------------------------------- new adapters

# Adapted kernels whose input spans two dims ([N, K] heads x head_dim); every other kernel has one input dim.
TWO_DIM_INPUT = ("attn_proj", "linear2_attn", "self_attn_proj", "to_out")

DEFAULT_TARGETS = DEFAULT_LORA_TARGETS      # hcjax.config (train.lora.targets' default)


def in_ndim(module_path: str) -> int:
    return 2 if module_path.rpartition("/")[2].endswith(TWO_DIM_INPUT) else 1


def target_modules(params: Mapping, pattern: str = DEFAULT_TARGETS) -> list[str]:
    """Module paths whose ``kernel`` path matches ``pattern`` (``re.fullmatch`` on the module path)."""
    mods = [p[: -len("/kernel")] for p in _flatten(params) if p.endswith("/kernel")]
    out = [m for m in mods if re.fullmatch(pattern, m)]
    if not out:
        raise ValueError(f"LoRA target pattern {pattern!r} matches no DiT kernel (e.g. {mods[:4]})")
    return out


def _lead(path: str) -> int:
    return 1 if path.split("/")[0] in ("double_blocks", "single_blocks") or "individual_token_refiner" in path else 0


def init_adapters(params: Mapping, rank: int, pattern: str = DEFAULT_TARGETS, *, key, init: str = "gaussian",
                  dtype=jnp.float32) -> dict:
    """New adapters for the matching kernels of ``params`` (arrays or ``ShapeDtypeStruct``s, boxed or not):
    ``lora_b = 0`` (the model starts unchanged) and ``lora_a ~ N(0, 1/rank)`` (``gaussian``, peft's
    ``init_lora_weights="gaussian"``) or ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``kaiming``, peft's default)."""
    if init not in ("gaussian", "kaiming"):
        raise ValueError(f"LoRA init {init!r}; expected 'gaussian' or 'kaiming'")
    flat = _flatten(nn.unbox(params))
    out = {}
    for i, m in enumerate(target_modules(params, pattern)):
        kshape = tuple(flat[f"{m}/kernel"].shape)
        lead, n_in = _lead(m), in_ndim(m)
        a_shape = (*kshape[: lead + n_in], rank)
        k = jax.random.fold_in(key, i)
        if init == "gaussian":
            a = jax.random.normal(k, a_shape, dtype) / rank
        else:
            bound = 1.0 / np.sqrt(int(np.prod(kshape[lead: lead + n_in])))
            a = jax.random.uniform(k, a_shape, dtype, -bound, bound)
        out[f"{m}/{LORA_A}"] = a
        out[f"{m}/{LORA_B}"] = jnp.zeros((*kshape[:lead], rank, *kshape[lead + n_in:]), dtype)
    return _unflatten(out)


def count_formula(params: Mapping, rank: int, pattern: str = DEFAULT_TARGETS) -> int:
    """Trainable parameters of :func:`init_adapters`: ``sum L * r * (prod(in) + prod(out))`` over the targets."""
    flat = _flatten(nn.unbox(params))
    total = 0
    for m in target_modules(params, pattern):
        kshape = tuple(flat[f"{m}/kernel"].shape)
        lead, n_in = _lead(m), in_ndim(m)
        layers = int(np.prod(kshape[:lead]))
        total += layers * rank * (int(np.prod(kshape[lead: lead + n_in])) + int(np.prod(kshape[lead + n_in:])))
    return total


def boxed(abstract_boxed: Mapping, adapters: Mapping) -> dict:
    """``adapters`` boxed with the logical axes of their kernels (``nn.Partitioned``; rank axis unsharded), for
    ``hcjax.sharding.shard_params(adapters, mesh, like=boxed(...))``: the adapters follow their Dense's sharding."""
    flat = _flatten(abstract_boxed)
    out = {}
    for path, (a, b) in modules(adapters).items():
        kernel = flat.get(f"{path}/kernel")
        if kernel is None:
            raise ValueError(f"adapter {path}: no such Dense (no {path}/kernel in the params)")
        names = tuple(kernel.names) if isinstance(kernel, nn.Partitioned) else (None,) * (a.ndim + b.ndim - 2)
        lead = lead_ndim(nn.unbox(kernel).shape, a.shape, b.shape)
        n_in = a.ndim - 1 - lead
        out[f"{path}/{LORA_A}"] = nn.Partitioned(a, names[: lead + n_in] + (None,))
        out[f"{path}/{LORA_B}"] = nn.Partitioned(b, names[:lead] + (None,) + names[lead + n_in:])
    return _unflatten(out)


# ------------------------------------------------------------------------------------------- files


def count(adapters: Mapping) -> int:
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters)))


def save_adapter(path: str | Path, adapters: Mapping, metadata: Mapping | None = None) -> Path:
    """Write ``adapters`` (numpy-convertible leaves) as safetensors with JSON ``metadata``; returns the file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / ADAPTER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    modules(adapters)
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in _flatten(adapters).items()}
    meta = dict(metadata or {})
    meta["modules"] = sorted(modules(adapters))
    save_file(flat, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def load_adapter(path: str | Path) -> tuple[dict, dict]:
    """Read an hcjax adapter file (or a directory holding ``adapter.safetensors``) -> ``(adapters, metadata)``."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter file not found: {path}")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if METADATA_KEY not in meta:
            raise ValueError(f"{path}: not an hcjax adapter file (no {METADATA_KEY!r} metadata); convert a PyTorch "
                             f"LoRA first: python -m convert_weights lora --src {path} --out DIR")
        flat = {k: f.get_tensor(k) for k in f.keys()}
    tree = _unflatten(flat)
    modules(tree)
    return tree, json.loads(meta[METADATA_KEY])


def save_trained(path: str | Path, state: Mapping, cfg: Config, *, ema: bool = True) -> Path:
    """The adapters of a LoRA train state (``hcjax.training``; its EMA when present and ``ema``) as an adapter file:
    fp32, ``train.lora``'s ``alpha / rank`` folded into ``lora_b`` (as the importer does), so ``--lora-scale 1``
    gives the trained model. Needs the arrays addressable from this process (single host)."""
    lc = cfg.train.lora
    tree = jax.device_get(state["ema"] if ema and "ema" in state else state["adapters"])
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: np.asarray(x, np.float32) * np.float32(lc.scale if p[-1].key == LORA_B else 1.0), tree)
    meta = {"format": "hcjax-train", "scaled": True, "rank": lc.rank, "alpha": lc.alpha or lc.rank,
            "targets": lc.targets, "step": int(jax.device_get(state["step"])), "params": count(tree),
            "ema": bool(ema and "ema" in state)}
    return save_adapter(path, tree, meta)


def export_checkpoint(checkpoints: str | Path, out: str | Path, *, step: int | None = None, ema: bool = True) -> Path:
    """:func:`save_trained` of a LoRA training checkpoint (``<workdir>/checkpoints``; default: the latest step)."""
    ck = TrainCheckpoints(checkpoints, read_only=True)
    try:
        step = ck.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no training checkpoint in {checkpoints}")
        state, _ = ck.restore(step)
        cfg = config_from_json(json.dumps(ck.config_dict(step)))
    finally:
        ck.close()
    if "adapters" not in state:
        raise ValueError(f"{checkpoints} step {step} is a full fine-tuning checkpoint (no adapters); export it with "
                         "hcjax.checkpoint.export_training_params")
    return save_trained(out, state, cfg, ema=ema)
