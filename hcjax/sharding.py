"""Meshes and parameter placement (DESIGN §4); the axis names and rule sets are :mod:`hcjax.axes`.

Model code only names logical axes; the rule sets of ``hcjax.axes`` map them onto the mesh axes
``(data, fsdp, sequence, tensor)``. This module builds the mesh, resolves the rules of a run, places parameter
trees (boxed ``nn.Partitioned`` trees carry the logical names) and sets the mesh context for tracing.

Typical use::

    mesh = make_mesh(cfg.mesh, cfg.dit)                  # validates degrees against devices and heads
    params = shard_params(host_params, mesh, like=dit.abstract_params(cfg.dit))
    with use_mesh(mesh, cfg.mesh):                       # jax.set_mesh + Flax logical rules
        out = jax.jit(forward)(params, *inputs)

How attention uses the ``sequence`` axis is part of the model config (``dit.sequence_parallel``), so a jitted
function retraces per setting. The Flax logical rules are not part of JAX's jit key: create jitted functions
inside :func:`use_mesh` (the mesh is part of the key), and use a fresh ``jax.jit`` when switching rule sets on
the same mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .axes import AXES, DEFAULT_RULES, RULE_SETS, TEXT_RULES, fit_spec
from .config import ConfigError, DiTConfig, MeshConfig, check_mesh
from .runtime import maybe_initialize_distributed  # noqa: F401  (former home; entry points use hcjax.runtime)

__all__ = [
    "AXES", "DEFAULT_RULES", "RULE_SETS", "TEXT_RULES", "abstract_sharded", "check_mesh", "default_mesh_config",
    "input_sharding", "logical_names", "logical_to_shardings", "make_mesh", "maybe_initialize_distributed",
    "mesh_config", "mesh_spec", "on_device", "param_shardings", "replicate", "resolve_shape", "rules_for",
    "shard_params", "target_platform", "to_host", "to_memory", "trace_for", "use_mesh",
]


# ------------------------------------------------------------------------------------------- mesh


_TRACE_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("hcjax_trace_platform", default=None)


@contextlib.contextmanager
def trace_for(platform: str):
    """Trace (lower) the code inside for ``platform`` (``cpu``, ``gpu``, ``tpu``) whatever the mesh or backend: the
    kernels the model dispatches by platform (attention, VAE convolutions) are chosen for it. For lowering only,
    e.g. XLA's cost analysis of the dense accelerator attention on a CPU host. jax's trace caches do not see this
    setting: lower a function (jit) that has not been traced for another platform already."""
    token = _TRACE_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TRACE_PLATFORM.reset(token)


def target_platform() -> str:
    """The platform the code being traced will run on: the one named by :func:`trace_for`, else that of the
    devices of the mesh set by ``jax.set_mesh`` (``use_mesh``), else the default backend. Differs from
    ``jax.default_backend()`` when compiling ahead of time for devices this process does not drive (a TPU topology
    from ``jax.experimental.topologies`` on a CPU host)."""
    if _TRACE_PLATFORM.get() is not None:
        return _TRACE_PLATFORM.get()
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)   # None: no mesh is set
    platform = getattr(device, "platform", None)
    return platform or jax.default_backend()


def resolve_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """Mesh degrees with the ``-1`` entry filled so that their product is ``n_devices``."""
    mesh_cfg.validate()
    shape = list(mesh_cfg.shape)
    named = dict(zip(AXES, shape))
    fixed = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % fixed:
            raise ConfigError(f"mesh {named}: the fixed degrees multiply to {fixed}, which does not divide the "
                              f"{n_devices} devices")
        shape[shape.index(-1)] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"mesh {named} needs {fixed} devices but {n_devices} are available; make the degrees "
                          f"multiply to {n_devices} or set one of them to -1")
    return tuple(shape)


def make_mesh(mesh_cfg: MeshConfig, dit_cfg: DiTConfig | None = None, devices=None) -> jax.sharding.Mesh:
    """Mesh ``(data, fsdp, sequence, tensor)`` over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(mesh_cfg, len(devices))
    if dit_cfg is not None:
        check_mesh(mesh_cfg, dit_cfg, shape)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def default_mesh_config(dit_cfg: DiTConfig, n_devices: int, rules: str = "default") -> MeshConfig:
    """Sampling's default mesh: every device on ``sequence`` where the DiT's heads allow it (Ulysses, or any degree
    with ``dit.sequence_parallel: ring`` / a ``dit.ulysses_degree``), the rest on ``fsdp``."""
    if dit_cfg.sequence_parallel == "ring" or dit_cfg.ulysses_degree:
        seq = n_devices
    else:
        seq = math.gcd(dit_cfg.num_heads, n_devices)
    return MeshConfig(data=1, fsdp=n_devices // seq, sequence=seq, tensor=1, rules=rules)


def mesh_config(shape, dit_cfg: DiTConfig, n_devices: int, rules: str = "default") -> MeshConfig:
    """``MeshConfig`` from 4 degrees ``(data, fsdp, sequence, tensor)`` (one may be -1; None: the default of
    :func:`default_mesh_config`), resolved and checked against ``n_devices`` and the DiT."""
    if shape is None:
        cfg = default_mesh_config(dit_cfg, n_devices, rules)
    else:
        if len(shape) != len(AXES):
            raise ConfigError(f"--mesh takes {len(AXES)} degrees {' '.join(a.upper() for a in AXES)}; got {list(shape)}")
        cfg = MeshConfig(*shape, rules=rules)
    cfg = MeshConfig(*resolve_shape(cfg, n_devices), rules=rules)
    check_mesh(cfg, dit_cfg)
    return cfg


def to_host(x) -> np.ndarray:
    """A full host copy of ``x`` on every process (arrays spread over other processes' devices are all-gathered:
    a collective, so every process must call it in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def to_memory(tree, kind: str):
    """Every array leaf of ``tree`` in memory kind ``kind`` (``device``, ``pinned_host``, ...) on its own sharding
    (numpy leaves: on the first device). A leaf already there is returned as is (no copy)."""
    def move(a):
        if isinstance(a, jax.Array):
            return a if a.sharding.memory_kind == kind else jax.device_put(a, a.sharding.with_memory_kind(kind))
        return jax.device_put(a, jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=kind))
    return jax.tree.map(move, tree)


@contextlib.contextmanager
def on_device(tree):
    """``tree`` with every leaf in device memory for the ``with`` block; the copies made for it (leaves that lived
    in host memory) are deleted at exit, so host-offloaded weights occupy the device only while they are used."""
    moved = to_memory(tree, "device")
    try:
        yield moved
    finally:
        for new, old in zip(jax.tree.leaves(moved), jax.tree.leaves(tree)):
            if new is not old and isinstance(new, jax.Array) and not new.is_deleted():
                new.delete()


def replicate(tree, mesh):
    """Every array leaf of ``tree`` (host values identical on every process) -> a replicated array on ``mesh``."""
    sh = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(to_host(x), sh), tree)


def rules_for(mesh_cfg: MeshConfig | None = None, name: str | None = None):
    name = name or (mesh_cfg.rules if mesh_cfg is not None else "default")
    if name not in RULE_SETS:
        raise ConfigError(f"unknown rule set {name!r}; expected one of {sorted(RULE_SETS)}")
    return RULE_SETS[name]


@contextlib.contextmanager
def use_mesh(mesh, mesh_cfg: MeshConfig | None = None, *, rules=None):
    """Run (trace) a model under ``mesh``: ``jax.set_mesh`` + the Flax logical ``rules`` (default: the rule set
    named by ``mesh_cfg.rules``, else ``default``)."""
    rules = rules if rules is not None else rules_for(mesh_cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


# ------------------------------------------------------------------------------------------- placement


def mesh_spec(names, shape, mesh, rules=None) -> P:
    """Logical names of one array -> its mesh ``PartitionSpec`` (after dropping non-dividing axes)."""
    rules = rules if rules is not None else DEFAULT_RULES
    spec = nn.logical_to_mesh_axes(tuple(names), rules) if names else P()
    return fit_spec(spec, tuple(shape), mesh)


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def _unbox(tree):
    """Strip the boxes without Flax's implicit sharding constraint (which would ignore the axes dropped by
    ``fit_spec`` and fail under an active mesh)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box)


def logical_to_shardings(boxed, mesh, rules=None):
    """Tree of boxed (``nn.Partitioned``) leaves -> tree of ``NamedSharding`` (unboxed structure); leaves without
    a box are replicated."""
    def one(x):
        names = x.names if _is_box(x) else ()
        value = x.unbox(apply_constraint=False) if _is_box(x) else x
        return NamedSharding(mesh, mesh_spec(names, value.shape, mesh, rules))

    return jax.tree.map(one, boxed, is_leaf=_is_box)


def param_shardings(abstract_boxed, mesh, rules=None):
    """Shardings of a parameter tree from its boxed abstract tree (e.g. ``dit.abstract_params(cfg)``); ``rules``
    default to :data:`~hcjax.axes.DEFAULT_RULES` (the text towers use :data:`~hcjax.axes.TEXT_RULES`)."""
    return logical_to_shardings(abstract_boxed, mesh, rules)


def shard_params(params, mesh, like=None, rules=None):
    """Place ``params`` on ``mesh``. Boxed params carry their own names; plain dicts (converter output) take them
    from ``like``, the model's boxed abstract tree. Returns the unboxed, sharded tree."""
    boxed = params if any(_is_box(x) for x in jax.tree.leaves(params, is_leaf=_is_box)) else like
    if boxed is None:
        raise ValueError("shard_params: params carry no logical axis names; pass like=<the boxed abstract tree, "
                         "e.g. dit.abstract_params(cfg)>")
    shardings = logical_to_shardings(boxed, mesh, rules)
    values = _unbox(params)
    if jax.tree.structure(values) != jax.tree.structure(shardings):
        raise ValueError("shard_params: the parameter tree does not match the tree of logical names")
    return jax.device_put(values, shardings)


def abstract_sharded(abstract_boxed, mesh, rules=None, dtype=None):
    """``ShapeDtypeStruct`` tree of a boxed abstract parameter tree with its shardings (nothing allocated), e.g. a
    checkpoint restore target; ``dtype`` (if given) replaces every leaf's dtype."""
    shardings = logical_to_shardings(abstract_boxed, mesh, rules)
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, jnp.dtype(dtype or v.dtype), sharding=s),
                        _unbox(abstract_boxed), shardings)


def input_sharding(mesh, shape, rules=None) -> NamedSharding:
    """Sharding of a model input with a leading batch axis (``act_batch``); other axes replicated."""
    return NamedSharding(mesh, mesh_spec(("act_batch",) + (None,) * (len(shape) - 1), shape, mesh, rules))


def logical_names(boxed) -> set[str]:
    """Every logical axis name used by a boxed tree."""
    names: set[str] = set()
    for x in jax.tree.leaves(boxed, is_leaf=_is_box):
        if _is_box(x):
            names.update(n for n in x.names if n is not None)
    return names
