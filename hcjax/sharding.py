"""Mesh construction, logical-axis rule sets and parameter placement (DESIGN §4).

Model code only names logical axes (weights ``embed, heads, head_dim, mlp, layers, vocab, conv_in, conv_out``;
activations ``act_batch, act_seq, act_embed, act_heads, act_mlp``); this file maps them onto the mesh axes
``(data, fsdp, sequence, tensor)``:

* ``data``      pure replicas (batch only)
* ``fsdp``      batch, and the ``embed`` dimension of every weight (ZeRO-3 style: gathered per layer at use,
                ``hcjax.layers.gathered``, which also sidesteps an XLA partitioner bug, issue 5)
* ``sequence``  the token axis of activations; attention is sequence-parallel (Ulysses or ring, see
                ``hcjax.attention``); under the ``default`` rules the weights are also sharded over it, so a
                sequence-only mesh does not replicate the 13B parameters on every device
* ``tensor``    heads and MLP columns (Megatron style)

Typical use::

    mesh = make_mesh(cfg.mesh, cfg.dit)                  # validates degrees against devices and heads
    params = shard_params(host_params, mesh, like=cfg.dit)
    with use_mesh(mesh, cfg.mesh):                       # jax.set_mesh + Flax rules + attention options
        out = jax.jit(forward)(params, *inputs)
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import attention
from .config import ConfigError, DiTConfig, MeshConfig

AXES = MeshConfig.AXES

_ACTIVATIONS = (
    ("act_batch", ("data", "fsdp")),
    ("act_seq", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)
_WEIGHTS_TAIL = (
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", None),
)

RULE_SETS: dict[str, tuple[tuple[str, Any], ...]] = {
    # weights sharded over fsdp x sequence (x tensor): the memory-minimal choice, fine for any mesh
    "default": _ACTIVATIONS + (("embed", ("fsdp", "sequence")),) + _WEIGHTS_TAIL,
    # weights sharded over fsdp (x tensor) only: no weight gathers across the sequence axis
    "fsdp_only": _ACTIVATIONS + (("embed", "fsdp"),) + _WEIGHTS_TAIL,
    # weights replicated except the tensor-parallel dimensions
    "replicated": _ACTIVATIONS + (("embed", None),) + _WEIGHTS_TAIL,
}
DEFAULT_RULES = RULE_SETS["default"]
assert set(RULE_SETS) == set(MeshConfig.RULE_SETS)


# ------------------------------------------------------------------------------------------- mesh


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


def check_mesh(mesh_cfg: MeshConfig, dit_cfg: DiTConfig, shape: tuple[int, ...] | None = None) -> str | None:
    """Validate mesh degrees against the DiT; return the sequence-parallel mode (None without sequence axis)."""
    shape = shape or tuple(max(s, 1) for s in mesh_cfg.shape)
    named = dict(zip(AXES, shape))
    tp, sp = named["tensor"], named["sequence"]
    heads = dit_cfg.num_heads
    if heads % tp:
        raise ConfigError(f"mesh.tensor={tp} must divide the {heads} attention heads "
                          f"(valid: {[d for d in range(1, heads + 1) if heads % d == 0]})")
    if dit_cfg.mlp_hidden % tp:
        raise ConfigError(f"mesh.tensor={tp} must divide the MLP width {dit_cfg.mlp_hidden}")
    if sp == 1:
        return None
    local = heads // tp
    ulysses_ok = local % sp == 0
    ring_ok = dit_cfg.attention in attention.RING_KERNELS
    mode = mesh_cfg.sequence_parallel
    if mode == "auto":
        mode = "ulysses" if ulysses_ok else "ring"
    ulysses_why = (f"Ulysses needs the {local} heads per tensor shard ({heads} heads / tensor {tp}) to be "
                   f"divisible by {sp}")
    ring_why = f"ring attention needs dit.attention in {attention.RING_KERNELS} (got {dit_cfg.attention!r})"
    if not ulysses_ok and not ring_ok:
        raise ConfigError(f"mesh.sequence={sp} fits neither Ulysses nor ring: {ulysses_why}; {ring_why}")
    if mode == "ulysses" and not ulysses_ok:
        raise ConfigError(f"mesh.sequence={sp} does not fit Ulysses: {ulysses_why}; "
                          "set mesh.sequence_parallel: ring (or auto)")
    if mode == "ring" and not ring_ok:
        raise ConfigError(f"mesh.sequence={sp} with ring: {ring_why}; Ulysses would fit: "
                          "set mesh.sequence_parallel: ulysses (or auto)")
    return mode


def make_mesh(mesh_cfg: MeshConfig, dit_cfg: DiTConfig | None = None, devices=None) -> jax.sharding.Mesh:
    """Mesh ``(data, fsdp, sequence, tensor)`` over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(mesh_cfg, len(devices))
    if dit_cfg is not None:
        check_mesh(mesh_cfg, dit_cfg, shape)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def maybe_initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` for multi-process runs (call first in the entry points).

    Runs when the launcher says so (``JAX_COORDINATOR_ADDRESS`` / ``HCJAX_DISTRIBUTED=1``); JAX then detects the
    cluster (TPU pods, SLURM, ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``). Returns whether it initialised.
    """
    if os.environ.get("HCJAX_DISTRIBUTED") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
        return True
    return False


def rules_for(mesh_cfg: MeshConfig | None = None, name: str | None = None):
    name = name or (mesh_cfg.rules if mesh_cfg is not None else "default")
    if name not in RULE_SETS:
        raise ConfigError(f"unknown rule set {name!r}; expected one of {sorted(RULE_SETS)}")
    return RULE_SETS[name]


@contextlib.contextmanager
def use_mesh(mesh, mesh_cfg: MeshConfig | None = None, *, rules=None, sequence_parallel: str | None = None,
             interpret: bool | None = None):
    """Run (trace) the model under ``mesh``: ``jax.set_mesh`` + Flax logical rules + attention options."""
    rules = rules if rules is not None else rules_for(mesh_cfg)
    opts: dict[str, Any] = {"rules": tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)}
    sp = sequence_parallel or (mesh_cfg.sequence_parallel if mesh_cfg is not None else None)
    if sp is not None:
        opts["sequence_parallel"] = sp
    if interpret is not None:
        opts["interpret"] = interpret
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), attention.options(**opts):
        yield mesh


# ------------------------------------------------------------------------------------------- placement


def _fit(spec: P, shape: tuple[int, ...], mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. the single audio cross-attention head)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        kept: list[str] = []
        for a in names:
            if dim % (math.prod(mesh.shape[x] for x in kept) * mesh.shape[a]) == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def mesh_spec(names, shape, mesh, rules=None) -> P:
    """Logical names of one array -> its mesh ``PartitionSpec`` (after dropping non-dividing axes)."""
    rules = rules if rules is not None else DEFAULT_RULES
    spec = nn.logical_to_mesh_axes(tuple(names), rules) if names else P()
    return _fit(spec, tuple(shape), mesh)


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def _unbox(tree):
    """Strip the boxes without Flax's implicit sharding constraint (which would ignore the dropped axes of
    ``_fit`` and fail under an active mesh)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box)


def _boxed(like):
    if isinstance(like, DiTConfig):
        from .dit import abstract_params

        return abstract_params(like)
    return like


def logical_to_shardings(boxed, mesh, rules=None):
    """Tree of boxed (``nn.Partitioned``) leaves -> tree of ``NamedSharding`` (unboxed structure)."""
    def one(x):
        names = x.names if _is_box(x) else ()
        value = x.unbox(apply_constraint=False) if _is_box(x) else x
        return NamedSharding(mesh, mesh_spec(names, value.shape, mesh, rules))

    return jax.tree.map(one, boxed, is_leaf=_is_box)


def param_shardings(like, mesh, rules=None):
    """Shardings of a parameter tree; ``like`` is a boxed tree or a :class:`DiTConfig`."""
    return logical_to_shardings(_boxed(like), mesh, rules)


def shard_params(params, mesh, like=None, rules=None):
    """Place ``params`` on ``mesh``. Boxed params carry their own names; plain dicts (converter output) take them
    from ``like`` (a boxed abstract tree, or a :class:`DiTConfig`). Returns the unboxed, sharded tree."""
    boxed = params if any(_is_box(x) for x in jax.tree.leaves(params, is_leaf=_is_box)) else _boxed(like)
    if boxed is None:
        raise ValueError("shard_params: params carry no logical axis names; pass like=<DiTConfig or boxed tree>")
    shardings = logical_to_shardings(boxed, mesh, rules)
    values = _unbox(params)
    if jax.tree.structure(values) != jax.tree.structure(shardings):
        raise ValueError("shard_params: the parameter tree does not match the tree of logical names")
    return jax.device_put(values, shardings)


def abstract_sharded_params(cfg: DiTConfig, mesh, rules=None, dtype=None):
    """``ShapeDtypeStruct`` tree of the DiT parameters with their shardings (nothing allocated)."""
    boxed = _boxed(cfg)
    shardings = logical_to_shardings(boxed, mesh, rules)
    values = _unbox(boxed)
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, dtype or v.dtype, sharding=s), values, shardings)


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
