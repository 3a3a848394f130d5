"""Mesh axis names, logical-axis rule sets and the spec-fitting helper (DESIGN §4). Pure: no hcjax imports.

Model code names logical axes only; a rule set maps each onto mesh axes ``(data, fsdp, sequence, tensor)``:

* weights      ``embed, heads, head_dim, mlp, layers, vocab, conv_in, conv_out``
* activations  ``act_batch, act_seq, act_embed, act_heads, act_mlp``

Mesh axes: ``data`` pure replicas (batch only); ``fsdp`` batch and the ``embed`` dimension of every weight
(ZeRO-3, gathered per layer at use: ``hcjax.layers.gathered``); ``sequence`` the token axis of activations
(sequence-parallel attention, ``hcjax.attention``) and, under ``default``, a second weight-sharding axis;
``tensor`` heads and MLP columns (Megatron style).

A rule is ``(logical_name, mesh_axis | (mesh_axes, ...) | None)`` as ``flax.linen.logical_axis_rules`` takes it.
:func:`fit_spec` drops mesh axes from dimensions they do not divide (e.g. the single audio cross-attention head),
so a spec derived from the rules is always valid for the array it is applied to.
"""

from __future__ import annotations

import math
from typing import Any

from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "sequence", "tensor")
SEQUENCE_PARALLEL = ("ulysses", "ring", "auto")   # auto: ulysses when the heads allow it, else ring
RING_KERNELS = ("xla", "chunked")                  # kernels exposing the running softmax statistics ring needs

Rules = tuple[tuple[str, Any], ...]

ACTIVATION_RULES: Rules = (
    ("act_batch", ("data", "fsdp")),
    ("act_seq", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)
WEIGHT_RULES_TAIL: Rules = (      # every weight name except ``embed`` (which is what the rule sets differ in)
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", None),
)

RULE_SETS: dict[str, Rules] = {
    # weights sharded over fsdp x sequence (x tensor): the memory-minimal choice, fine for any mesh
    "default": ACTIVATION_RULES + (("embed", ("fsdp", "sequence")),) + WEIGHT_RULES_TAIL,
    # weights sharded over fsdp (x tensor) only: no weight gathers across the sequence axis
    "fsdp_only": ACTIVATION_RULES + (("embed", "fsdp"),) + WEIGHT_RULES_TAIL,
    # weights replicated except the tensor-parallel dimensions
    "replicated": ACTIVATION_RULES + (("embed", None),) + WEIGHT_RULES_TAIL,
}
DEFAULT_RULES = RULE_SETS["default"]
# The text towers (LLaVA, CLIP-L): ``embed`` over fsdp only (they run once per prompt; no sequence sharding).
TEXT_RULES: Rules = RULE_SETS["fsdp_only"]


def fit_spec(spec: P, shape: tuple[int, ...], mesh) -> P:
    """``spec`` with every mesh axis dropped from the dimensions it does not divide (or that ``mesh`` lacks).

    Entries are kept left to right while their running product divides the dimension; a dimension left without
    axes is replicated. ``mesh`` is anything with a ``shape`` mapping (``Mesh``, ``AbstractMesh``)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        kept: list[str] = []
        for a in names:
            if a in mesh.shape and dim % (math.prod(mesh.shape[x] for x in kept) * mesh.shape[a]) == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)
