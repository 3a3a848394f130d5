"""Orbax checkpoints of plain params dicts plus the hcjax config as JSON.

Layout of a converted-weights directory::

    <dir>/config.json      the full hcjax Config (dataclasses as JSON)
    <dir>/params/          orbax StandardCheckpointer tree (nested dict of arrays)

Writes go to a temporary sibling directory that is renamed into place at the end, so a failed write never
leaves a partial checkpoint, and an existing directory is never overwritten unless ``overwrite=True``.

:func:`random_params` fills a params tree of given shapes with seeded random values (numpy, no compiled init):
the one source of random weights (the embedded random models, the demo's text towers, VAE training from scratch).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from .cli import hold_interrupts
from .config import Config, ConfigError, config_from_json, to_dict


@contextlib.contextmanager
def atomic_dir(path: str | Path, tag: str = "tmp") -> Iterator[Path]:
    """Write the directory ``path`` all at once: yields a sibling ``.NAME.TAG-PID`` directory to fill; when the block
    ends normally it replaces ``path`` (an existing ``path`` is removed first), on any exception (interrupts
    included) it is removed and ``path`` is left as it was."""
    path = Path(path).absolute()
    tmp = path.with_name(f".{path.name}.{tag}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_params(path: str | Path, params: Any, cfg: Config, *, overwrite: bool = False) -> Path:
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} already exists; choose another path or pass --overwrite")
    with atomic_dir(path) as tmp:
        # a KeyboardInterrupt raised in a Python callback that tensorstore runs from C++ during the save aborts
        # the process (std::terminate, exit -6, the temporary directory left): the interrupt waits for the save
        with hold_interrupts():
            ckptr = ocp.StandardCheckpointer()
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        (tmp / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return path


def load_checkpoint_config(path: str | Path) -> Config:
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not an hcjax checkpoint (missing config.json)")
    return config_from_json(f.read_text())


def load_params(path: str | Path, abstract: Any = None) -> Any:
    """Restore params; ``abstract`` (tree of ``jax.ShapeDtypeStruct`` with shardings) places them directly.
    A checkpoint whose tensor files are truncated or corrupt is a ``ValueError`` naming ``path`` (truncated files
    are found by :func:`check_tensor_files` before orbax starts reading; corrupt contents when a read fails,
    without the reports of orbax's abandoned reads: :func:`_quiet_abandoned_reads`)."""
    path = Path(path).absolute()
    if not (path / "params").is_dir():
        raise FileNotFoundError(f"{path}: not an hcjax checkpoint (missing params/)")
    check_tensor_files(path / "params", name=path)
    ckptr = ocp.StandardCheckpointer()
    with _quiet_abandoned_reads() as failed:
        try:
            if abstract is None:
                return ckptr.restore(path / "params")
            return ckptr.restore(path / "params", jax.tree.map(_as_struct, abstract))
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:           # orbax / tensorstore errors of many types for damaged files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full TensorStore")[0]
            failed.append(f"{path}: cannot restore the hcjax checkpoint (params/ truncated, corrupt or of another "
                          f"model?): {type(e).__name__}: {first[:300]}")
    raise ValueError(failed[0])        # after the abandoned reads are settled (the exception ``e`` held them)


def check_tensor_files(directory: str | Path, name: str | Path | None = None) -> None:
    """Every byte range the OCDBT index of the orbax tree ``directory`` refers to (B+tree nodes, tensor values)
    lies inside its file: a truncated file (an interrupted copy or download) is a ``ValueError`` naming the file,
    raised before any tensor is read. Reads only the index (``manifest.ocdbt`` and the B+tree nodes: kilobytes);
    a tree without ``manifest.ocdbt`` (not OCDBT) is not checked. Synchronous tensorstore reads: a failure here has
    no background reads left to report it again (orbax's concurrent restore does)."""
    directory = Path(directory).absolute()
    name = name or directory
    if not (directory / "manifest.ocdbt").is_file():
        return
    sizes: dict[Path, int] = {}

    def check(ref: str) -> None:                        # "<kind>:<base>:<path>:<offset>:<length>"
        head, offset, length = ref.rsplit(":", 2)
        _, base, rel = head.split(":", 2)
        f = directory / base / rel
        if f not in sizes:
            sizes[f] = f.stat().st_size if f.is_file() else -1
        end = int(offset) + int(length)
        if sizes[f] < 0:
            raise ValueError(f"{name}: cannot restore the hcjax checkpoint: {f.relative_to(directory.parent)} is "
                             f"missing (an incomplete copy?)")
        if sizes[f] < end:
            raise ValueError(f"{name}: cannot restore the hcjax checkpoint: {f.relative_to(directory.parent)} is "
                             f"truncated (holds {sizes[f]} bytes, its index refers to bytes up to {end}; an "
                             f"interrupted copy or download?)")

    try:
        kv = ts.KvStore.open(f"file://{directory}/").result()
        versions = ts.ocdbt.dump(kv).result().get("versions", [])
        stack = [versions[-1]["root"]["location"]] if versions and "location" in versions[-1]["root"] else []
        while stack:
            loc = stack.pop()
            check(loc)
            for entry in ts.ocdbt.dump(kv, loc).result().get("entries", []):
                for v in entry.values():
                    if isinstance(v, str) and v.startswith("btreenode:"):
                        stack.append(v)
                    elif isinstance(v, str) and v.startswith("value:"):
                        check(v)
    except Exception as e:                              # tensorstore: ValueError; a damaged index: also others
        if isinstance(e, ValueError) and str(e).startswith(f"{name}: "):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{name}: cannot restore the hcjax checkpoint: its index ({directory.name}/manifest.ocdbt "
                         f"and B+tree nodes) is unreadable (truncated or corrupt?): {first[:300]}") from None


def _abandoned_read_error(u) -> bool:
    """An error of orbax's abandoned reads after a failed restore: an un-awaited read coroutine, or a tensorstore
    read that completes after orbax closed its event loop (``RuntimeError: Event loop is closed`` raised in the
    callback that would wake it)."""
    if type(u.object).__name__ == "coroutine" and isinstance(u.exc_value, Exception):
        return True
    return isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"


def _abandoned_log_record(record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    return "exception was never retrieved" in msg or "Task was destroyed but it is pending" in msg


@contextlib.contextmanager
def _quiet_abandoned_reads(quiet_for: float = 0.3, at_most: float = 3.0) -> Iterator[list]:
    """Around an orbax restore: when it fails (the body appends its message to the yielded list), orbax's other
    reads are still in flight in tensorstore threads and report the same damage again once they complete, each
    with a traceback (in the unraisable hook, or asyncio's "... exception was never retrieved" log when their
    tasks are collected). Drop those reports, wait for the reads (until none has reported for ``quiet_for``
    seconds, at most ``at_most``) and collect the abandoned coroutines, tasks and futures: the one error line says
    it all. Other errors pass as before."""
    hook, log, failed = sys.unraisablehook, logging.getLogger("asyncio"), []
    last = [time.monotonic()]

    def quiet(u):
        if _abandoned_read_error(u):
            last[0] = time.monotonic()
        else:
            hook(u)

    def keep(record: logging.LogRecord) -> bool:
        if _abandoned_log_record(record):
            last[0] = time.monotonic()
            return False
        return True

    sys.unraisablehook = quiet
    log.addFilter(keep)
    try:
        yield failed
        if failed:                       # here the failed restore's exception (and its frames) is released
            end = time.monotonic() + at_most
            gc.collect()
            while time.monotonic() < end and time.monotonic() - last[0] < quiet_for:
                time.sleep(0.05)
            gc.collect()
    finally:
        sys.unraisablehook = hook
        log.removeFilter(keep)


# Config sections that set each bundle component's parameters, and fields in them that leave those parameters
# alone (execution, and the DiT's ref_tokens).
COMPONENT_SECTIONS = {"dit": ("dit",), "vae": ("vae",), "llava": ("llama", "clip_vision"), "clip": ("clip_text",),
                      "whisper": ("whisper",)}
_EXECUTION_ONLY = {"dtype", "param_dtype", "sample_size", "sample_tsize", "tile_overlap_factor", "attention",
                   "attention_block_q", "attention_block_kv", "sequence_parallel", "attention_interpret", "remat",
                   "unroll_layers", "use_fp8", "cpu_offload", "cfg_batch", "ffn_chunk", "ref_tokens"}


def check_bundle_configs(bundle: str | Path, cfg: Config, components) -> None:
    """Before restoring a bundle: each component's ``config.json`` agrees with ``cfg`` (the DiT's config) in the
    sections that set that component's parameters; else a ``ValueError`` naming the component and the fields
    (a bundle assembled from runs of different configs)."""
    bundle, want = Path(bundle), to_dict(cfg)
    for comp in components:
        f = bundle / comp / "config.json"
        try:
            have = to_dict(config_from_json(f.read_text()))       # older files: missing fields get defaults
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, ConfigError) as e:
            raise ValueError(f"{f}: unreadable component config ({e})") from None
        diff = []
        for sec in COMPONENT_SECTIONS.get(comp, ()):
            a, b = have.get(sec, {}), want.get(sec, {})
            diff += [f"{sec}.{k}: {comp}/ {a.get(k, '<missing>')!r}, dit/ {b.get(k)!r}" for k in sorted(b)
                     if k not in _EXECUTION_ONLY and a.get(k, "<missing>") != b.get(k)]
        if diff:
            raise ValueError(f"{bundle}: the {comp}/ component was made for another config than dit/config.json ("
                             + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
                             + "); rebuild the bundle with python -m hcjax.export")


def random_params(spec: Callable | Any, seed: int, std: float | None = 0.02) -> Any:
    """Seeded random numpy weights with the structure of ``spec`` without compiling any init.

    ``spec``: an ``init_fn(key) -> params`` (traced with ``jax.eval_shape`` only) or an abstract params tree
    (``ShapeDtypeStruct`` leaves, boxed or not). Norm scales (leaves named ``scale``) are 1 and biases 0; every other
    tensor is ``N(0, std)``, or with ``std=None`` ``N(0, 1 / fan_in)`` (``fan_in`` = product of all but the last
    dimension) for tensors of rank >= 2 and 0 for lower ranks. Values are drawn from ``numpy.random.default_rng(seed)``
    in tree order, in each leaf's dtype.
    """
    abstract = jax.eval_shape(spec, jax.random.key(0)) if callable(spec) else spec
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if name == "scale":
            return np.ones(shape, dtype)
        if name == "bias" or (std is None and len(shape) < 2):
            return np.zeros(shape, dtype)
        if std is None:
            return (rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[:-1])))).astype(dtype)
        return (rng.standard_normal(shape) * std).astype(dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


def _as_struct(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


# ----------------------------------------------------------------------------------------------- training


class TrainCheckpoints:
    """Training checkpoints under ``<workdir>/checkpoints`` with an orbax ``CheckpointManager``.

    Each step directory holds three items: ``state`` (the train-state pytree: ``step``, ``params``,
    ``opt_state``, optional ``ema``; restored straight into sharded abstract targets), ``data`` (the data
    iterator state, JSON) and ``config`` (the full hcjax config, JSON). Saves are asynchronous (``wait()`` joins
    them) and atomic: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a save cut off
    by a crash never becomes the latest step; leftover temporary dirs are removed when the manager is opened.
    Only the newest ``keep`` steps are kept. Saving a step that already exists raises instead of overwriting.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.directory}")
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep), enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, cfg: Config) -> None:
        """Start saving ``step`` (returns once the arrays are copied off the devices)."""
        if step in self.manager.all_steps():
            raise FileExistsError(f"checkpoint step {step} already exists in {self.directory}; refusing to overwrite")
        with hold_interrupts():          # save() first waits for the previous save (see wait())
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(to_dict(cfg))), force=True)
        if not saved:
            raise RuntimeError(f"orbax declined to save step {step} in {self.directory}")

    def config_dict(self, step: int) -> dict:
        """The raw config JSON saved with ``step`` (compare it before restoring the state)."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state: Any = None) -> tuple[Any, dict]:
        """``(state, data_state)`` of ``step``; ``abstract_state`` is a tree of ``ShapeDtypeStruct`` with shardings
        (restored straight into them); ``None`` restores the saved structure as saved (inspection, tests)."""
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.steps()})")
        target = None if abstract_state is None else jax.tree.map(_as_struct, abstract_state)
        where = self.directory / str(step)
        check_tensor_files(where / "state", name=where)
        with _quiet_abandoned_reads() as failed:
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
                return out["state"], out["data"]
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:       # damaged tensor files, or a state of another structure
                first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full TensorStore")[0]
                failed.append(f"{where}: cannot restore the training checkpoint (state/ truncated, corrupt or of "
                              f"another config?): {type(e).__name__}: {first[:300]}")
        raise ValueError(failed[0])

    def wait(self) -> None:
        """Join the running save. Orbax's ``wait_until_finished`` catches every exception raised while it joins the
        save thread, an interrupt included (logged and dropped, the step forgotten): Ctrl-C / SIGTERM there would
        be lost and the run would go on. Interrupts are held until the save is complete (``hold_interrupts``)."""
        with hold_interrupts():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with hold_interrupts():
            self.manager.wait_until_finished()
            self.manager.close()


def check_workdir(path: str | Path, flag: str = "--workdir") -> Path:
    """``path`` is a directory or can become one (no file at it or above it); ``ValueError`` naming ``flag``."""
    path = Path(path)
    for p in (path, *path.absolute().parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"is under the file {p}"
                raise ValueError(f"{flag} {path} {where}; give a directory")
            if not os.access(p, os.W_OK | os.X_OK) and p != path:
                raise ValueError(f"{flag} {path}: {p} is not writable")
            break
    return path


RUN_OUTPUTS = ("checkpoints", "config.json", "metrics.jsonl", "tensorboard", "params")


def has_checkpoint(directory: str | Path) -> bool:
    """``directory`` (a run's ``checkpoints/``) holds at least one complete step (orbax renames a finished save to
    its step number)."""
    d = Path(directory)
    return d.is_dir() and any(c.is_dir() and c.name.isdigit() for c in d.iterdir())


@contextlib.contextmanager
def cleanup_on_failure(workdir: str | Path, names: tuple[str, ...] = RUN_OUTPUTS) -> Iterator[Path]:
    """A training run that fails or is interrupted before its first complete checkpoint removes what it created in
    ``workdir`` (the ``names`` that did not exist before, and ``workdir`` itself when it was created and is left
    empty); a run with a checkpoint keeps everything (``--resume`` continues it). Nothing that existed before is
    touched."""
    workdir = Path(workdir).absolute()
    created_dir = not workdir.exists()
    before = {n for n in names if (workdir / n).exists()}
    try:
        yield workdir
    except BaseException:
        if not has_checkpoint(workdir / "checkpoints"):
            for n in names:
                p = workdir / n
                if n in before or not (p.exists() or p.is_symlink()):
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            if created_dir and workdir.is_dir() and not any(workdir.iterdir()):
                workdir.rmdir()
        raise


def export_training_params(checkpoints: str | Path, out: str | Path, *, step: int | None = None, ema: bool = True,
                           overwrite: bool = False) -> Path:
    """Write the DiT params of a training checkpoint (the EMA params when present and ``ema``) as a converted-weights
    directory (:func:`save_params`) that ``sample.py --ckpt-dir`` and ``train.init_from`` read."""
    ck = TrainCheckpoints(checkpoints, read_only=True)
    try:
        step = ck.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no training checkpoint in {checkpoints}")
        state, _ = ck.restore(step)
        cfg = config_from_json(json.dumps(ck.config_dict(step)))
    finally:
        ck.close()
    params = state["ema"] if ema and "ema" in state else state["params"]
    return save_params(out, params, cfg, overwrite=overwrite)


# DiT fields that leave its parameters alone: how the model executes, and which reference tokens it reads
# (ref_tokens: a run may warm-start from a DiT trained with the other setting).
_EXECUTION_FIELDS = {"dtype", "attention", "attention_block_q", "attention_block_kv", "sequence_parallel",
                     "ulysses_degree", "attention_interpret", "remat", "unroll_layers", "ref_tokens"}


def dit_differences(saved_dit: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """``(errors, notes)``: DiT fields that change the parameters vs. fields that only change execution."""
    errors, notes = [], []
    for k, v in to_dict(cfg)["dit"].items():
        old = saved_dit.get(k, "<missing>")
        if old != v:
            (notes if k in _EXECUTION_FIELDS else errors).append(f"dit.{k}: checkpoint {old!r}, config {v!r}")
    return errors, notes


def resume_differences(saved: dict, cfg: Config) -> list[str]:
    """Compare the config saved in a checkpoint with ``cfg`` before resuming.

    Raises :class:`~hcjax.config.ConfigError` naming every field that makes the checkpoint unusable (DiT
    architecture and parameter dtype, EMA on/off: they change the shapes or the structure of the state). Returns
    the other differences (learning rate, data, batch, ...) as messages for the log: resuming with them is allowed
    but the run is then no longer a bitwise continuation.
    """
    current = to_dict(cfg)
    errors, notes = dit_differences(saved.get("dit", {}), cfg)
    old_ema, new_ema = saved.get("train", {}).get("ema_decay", 0.0) > 0, cfg.train.ema_decay > 0
    if old_ema != new_ema:
        errors.append(f"train.ema_decay: the checkpoint {'has' if old_ema else 'has no'} EMA params, the config "
                      f"{'wants' if new_ema else 'does not want'} them")

    def walk(a, b, prefix):
        for k in sorted(set(a) | set(b)):
            x, y = a.get(k, "<missing>"), b.get(k, "<missing>")
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, f"{prefix}{k}.")
            elif x != y and not (prefix == "train." and k == "steps"):
                notes.append(f"{prefix}{k}: checkpoint {x!r}, config {y!r}")

    walk(saved.get("train", {}), current["train"], "train.")
    if errors:
        raise ConfigError("cannot resume: the config is incompatible with the checkpoint: " + "; ".join(errors))
    return notes
