"""Several samples in one compiled denoise loop: the mesh's ``data`` axis runs different requests / seeds at once.

On a mesh with ``data`` degree D > 1, prepared samples (:func:`hcjax.pipeline.prepare`) that compile to the same
program (same guidance, schedule and input shapes) are grouped D at a time and stacked sample-major: noise
``[D, T', H', W', C]``, conditions ``[D x Bc, ...]`` (each sample's Bc guidance branches in a row). The DiT's batch
constraint (``act_batch`` over data x fsdp) then puts different samples on different data replicas; every sample
gets the numbers it gets alone (rows never mix: per-row DiT, per-sample guidance combination and Euler step). A
group that ends short is filled with copies of its last sample (results dropped), so the loop compiles once per
shape, never per group size. Samples whose step schedule depends on the latents (teacache, magcache) or that run
their guidance branches in passes (``dit.cfg_batch``) run alone.

Shape letters: N samples of a group, Bc guidance branches per sample, D the group size (the data degree).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import sharding
from .pipeline import Models, Prepared, _signature


def group_size(models: Models) -> int:
    """Samples per compiled loop: the mesh's ``data`` degree (1 without a mesh)."""
    return 1 if models.mesh is None else int(dict(models.mesh.shape).get("data", 1))


def batchable(models: Models, prep: Prepared) -> bool:
    """Whether ``prep`` may share its loop with others (fixed step schedule, guidance in one pass)."""
    cfg_batch = models.cfg.dit.cfg_batch
    return prep.guidance.cache_mode() in ("deepcache", "none") and not 0 < cfg_batch < prep.conds.batch


def batch_key(prep: Prepared) -> tuple:
    """Samples with equal keys compile to the same loop (guidance, schedule, input shapes and shardings)."""
    return prep.guidance, tuple(np.asarray(prep.sigmas).tolist()), _signature((prep.noise, prep.conds))


def groups(models: Models, items: Iterable[tuple[Prepared, Any]]) -> Iterator[list[tuple[Prepared, Any]]]:
    """``(prepared, payload)`` items -> lists that run as one loop: up to :func:`group_size` items of one
    :func:`batch_key`, in arrival order within a group; a group is yielded as soon as it is full, the rest at
    the end (short). Unbatchable items come alone."""
    size = group_size(models)
    pending: dict[tuple, list] = {}
    for prep, payload in items:
        if size == 1 or not batchable(models, prep):
            yield [(prep, payload)]
            continue
        group = pending.setdefault(batch_key(prep), [])
        group.append((prep, payload))
        if len(group) == size:
            yield pending.pop(batch_key(prep))
    yield from pending.values()


def stack(models: Models, preps: list[Prepared], size: int | None = None) -> Prepared:
    """One :class:`Prepared` of the samples ``preps`` (same :func:`batch_key`), filled to ``size`` (default
    :func:`group_size`) with copies of the last; on a mesh the stacked inputs are replicated on it."""
    size = max(size or group_size(models), len(preps))
    if len(preps) == 1 and size == 1:
        return preps[0]
    keys = {batch_key(p) for p in preps}
    if len(keys) != 1:
        raise ValueError(f"stack: the {len(preps)} samples differ in guidance, schedule or input shapes; group them "
                         "with hcjax.batching.groups")
    rows = list(preps) + [preps[-1]] * (size - len(preps))
    host = lambda a: np.asarray(sharding.to_host(a))  # noqa: E731
    noise = np.concatenate([host(p.noise) for p in rows])
    conds = jax.tree.map(lambda *xs: np.concatenate([host(x) for x in xs]), *[p.conds for p in rows])
    if models.mesh is not None:
        conds, noise = sharding.replicate((conds, noise), models.mesh)
    else:
        conds, noise = jax.tree.map(jnp.asarray, (conds, noise))
    timings = dict(preps[0].timings, batch=len(preps), batch_slots=size)
    return dataclasses.replace(preps[0], conds=conds, noise=noise, timings=timings)
