"""Grain input pipeline: a deterministic, step-indexed plan of global batches, sliced per host, read by workers.

* **Plan** (:class:`BatchPlan`): per epoch ``e`` the records of each bucket are permuted with
  ``rng(seed, e)``, cut into global batches of ``train.batch_size`` (remainders dropped, so a batch never mixes
  buckets), and the batches are permuted again. Global batch ``s`` is therefore a pure function of
  ``(seed, s)``: a resumed run continues exactly where it stopped, whatever the worker count.
* **Hosts**: process ``p`` of ``P`` reads the slice ``[p*b, (p+1)*b)`` of each global batch (``b = batch/P``),
  so hosts never overlap and together cover the global batch.
* **Reading**: ``grain.MapDataset.range(start, steps).map(load_batch)`` -> ``to_iter_dataset`` (threads,
  read-ahead) -> optional ``mp_prefetch`` worker processes. Randomness per sample (window start, random
  reference frame) comes from ``rng(seed, step, slot)``.
* **Bad clips at read time** (e.g. a file corrupt past its header) are logged, counted in the batch's
  ``skipped`` field and replaced by the next clip of the same bucket, deterministically.
* **Subjects** (multi-subject clips, issue 24): a global batch whose clips have at most ``K_max`` subjects fills
  ``K_max`` reference slots in every sample (from the index alone, so every host pads alike); padded slots hold
  white images / white-image latents and are 0 in ``ref_mask``. ``K_max = 1`` batches are exactly the
  single-subject batches below (no new keys).

Raw batches (dicts): ``video uint8 [b, F, H, W, 3]``, ``ref_image uint8 [b, H, W, 3]`` (padding-resized, white),
``llava_image uint8 [b, S, S, 3]``, ``frame_index int32 [b, F]``, ``fps [b]``, lists ``caption``, ``item_name``,
``audio`` (+ ``mask_video uint8 [b, F, H, W, 3]`` for clips with a mask, editing; with ``K_max > 1``:
``ref_images uint8 [b, K_max, H, W, 3]``, ``llava_images uint8 [b, K_max, S, S, 3]``, ``ref_mask int32 [b,
K_max]``, ``item_names`` (per sample a tuple of its K names); in a dataset with multi-subject clips also
``text_slots int32 [b]``, the dataset's largest K, to which the text stage pads the text states);
:class:`hcjax.data.encode.Encoders` turns them into a :class:`~hcjax.data.batch.TrainBatch`. Precomputed batches
are :class:`TrainBatch` es directly (``latents [b, t, h, w, C]``, ``ref_latents``/``null_ref_latents [b, K_max, h,
w, C]``, ``text_states [b, S, D]``, ``text_mask [b, S]``, ``text_states_2 [b, D2]``, + ``ref_mask [b, K_max]``
when ``K_max > 1``, + ``audio_features`` / ``bg_latents`` for audio / editing DiTs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from ..config import Config, DataConfig
from ..media import cover_crop, decode_frames, layout_references, pad_resize, read_image
from . import sources
from .batch import TrainBatch
from .npz import load_npz

log = logging.getLogger("hcjax.data")
MAX_TRIES = 8


class BatchPlan:
    """Which records form global batch ``step`` (see the module docstring)."""

    def __init__(self, buckets, global_batch: int, seed: int, shuffle: bool = True):
        self.global_batch = int(global_batch)
        self.seed, self.shuffle = int(seed), shuffle
        self.groups: dict[int, np.ndarray] = {}
        for i, b in enumerate(buckets):
            self.groups.setdefault(int(b), []).append(i)
        self.groups = {b: np.asarray(v, np.int64) for b, v in sorted(self.groups.items())}
        self._pos = {int(r): (b, j) for b, v in self.groups.items() for j, r in enumerate(v)}
        self.per_epoch = sum(len(v) // self.global_batch for v in self.groups.values())
        if self.per_epoch == 0:
            sizes = {b: len(v) for b, v in self.groups.items()}
            raise ValueError(f"dataset too small: no bucket holds a full global batch of {self.global_batch} "
                             f"clips (clips per bucket: {sizes}); lower train.batch_size or add data")
        self._cache: dict[int, list[np.ndarray]] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_cache"] = {}
        return d

    def epoch(self, e: int) -> list[np.ndarray]:
        if e not in self._cache:
            rng = np.random.default_rng([self.seed, e])
            batches = []
            for v in self.groups.values():
                ids = rng.permutation(v) if self.shuffle else v
                batches += [ids[j * self.global_batch:(j + 1) * self.global_batch]
                            for j in range(len(ids) // self.global_batch)]
            order = rng.permutation(len(batches)) if self.shuffle else range(len(batches))
            if len(self._cache) > 2:
                self._cache.clear()
            self._cache[e] = [batches[k] for k in order]
        return self._cache[e]

    def global_batch_ids(self, step: int) -> np.ndarray:
        e, j = divmod(int(step), self.per_epoch)
        return self.epoch(e)[j]

    def host_ids(self, step: int, process_index: int, process_count: int) -> np.ndarray:
        b = self.global_batch // process_count
        return self.global_batch_ids(step)[process_index * b:(process_index + 1) * b]

    def neighbor(self, record: int, k: int) -> int:
        """The ``k``-th next record of the same bucket (replacement for an unreadable clip)."""
        b, j = self._pos[int(record)]
        v = self.groups[b]
        return int(v[(j + k) % len(v)])


def collate(examples: list[dict]) -> dict:
    """Stack arrays; keep strings (and tuples of strings) as lists."""
    out: dict[str, Any] = {}
    for k in examples[0]:
        vals = [e[k] for e in examples]
        out[k] = vals if isinstance(vals[0], (str, tuple)) else np.stack([np.asarray(v) for v in vals])
    return out


def _pad_slots(x: np.ndarray, slots: int, fill) -> np.ndarray:
    """``[K, ...]`` -> ``[slots, ...]``, the extra slots ``fill`` (broadcast to one slot)."""
    extra = slots - x.shape[0]
    if extra < 0:
        raise ValueError(f"{x.shape[0]} subjects do not fit {slots} reference slots")
    return np.concatenate([x, np.broadcast_to(np.asarray(fill, x.dtype), (extra,) + x.shape[1:])]) if extra else x


class RawReader:
    """Decode one raw clip window (picklable; runs in grain workers)."""

    def __init__(self, dc: DataConfig, clips: list[sources.Clip], llava_size: int):
        self.dc, self.clips, self.llava_size = dc, clips, int(llava_size)
        self.text_slots = max((c.subjects for c in clips), default=1)

    def subjects(self, record: int) -> int:
        return self.clips[record].subjects

    def __call__(self, record: int, rng: np.random.Generator, slots: int = 1) -> dict:
        """One example; ``slots > 1``: also the K-subject keys padded to ``slots`` (module docstring)."""
        dc, c = self.dc, self.clips[record]
        height, width = dc.buckets[c.bucket]
        span = sources.window_frames(dc)
        start = int(rng.integers(0, c.frames - span + 1))
        idx = np.arange(start, start + span, dc.frame_stride)
        video = cover_crop(decode_frames(c.video, idx), height, width)
        use_image = c.ref_image is not None and (dc.ref_source != "frame" or bool(c.ref_images))
        if use_image:
            src = read_image(c.ref_image)
        else:
            k = int(rng.integers(0, dc.num_frames)) if dc.ref_frame < 0 else dc.ref_frame
            src = video[k]
        out = {
            "video": video,
            "ref_image": pad_resize(src, height, width),
            "llava_image": pad_resize(src, self.llava_size, self.llava_size),
            "frame_index": idx.astype(np.int32),
            "fps": np.float32(c.fps),
            "caption": c.caption,
            "item_name": c.item_name,
            "audio": c.audio or "",
        }
        if c.mask is not None:      # the same window, resized and cropped as the clip
            out["mask_video"] = cover_crop(decode_frames(c.mask, idx), height, width)
        if self.text_slots > 1:
            out["text_slots"] = np.int32(self.text_slots)
        if slots > 1:
            srcs = layout_references([read_image(p) for p in c.ref_images] if c.ref_images else [src], height, width,
                                     dc.ref_layout)
            white = np.full((), 255, np.uint8)
            out["ref_images"] = _pad_slots(np.stack([pad_resize(im, height, width) for im in srcs]), slots, white)
            out["llava_images"] = _pad_slots(np.stack([pad_resize(im, self.llava_size, self.llava_size)
                                                       for im in srcs]), slots, white)
            out["ref_mask"] = (np.arange(slots) < len(srcs)).astype(np.int32)
            out["item_names"] = tuple(c.item_names) if c.item_names else (c.item_name,)
        return out


class NpzReader:
    """Load one precomputed clip (+ the white-image reference latents of its size); ``audio`` / ``editing`` also
    read ``audio_features`` / ``bg_latents``."""

    KEYS = ("latents", "ref_latents", "text_states", "text_mask", "text_states_2")

    def __init__(self, entries: list[dict], null_path: str, audio: bool, editing: bool = False):
        self.entries, self.null_path, self.audio, self.editing = entries, null_path, audio, editing
        self._null: dict | None = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_null"] = None
        return d

    def null_ref(self, h: int, w: int) -> np.ndarray:
        if self._null is None:
            self._null = load_npz(self.null_path)
        key = f"ref_{h}x{w}"
        if key not in self._null:
            raise ValueError(f"{self.null_path} has no white-image latents {key}; re-run hcjax.precompute")
        return self._null[key]

    def subjects(self, record: int) -> int:
        return int(self.entries[record].get("subjects", 1))

    def __call__(self, record: int, rng: np.random.Generator, slots: int = 1) -> dict:
        """One clip's arrays; ``slots > 1``: references padded to ``slots`` with white-image latents + ``ref_mask``."""
        e = self.entries[record]
        try:
            out = load_npz(e["file"], self.KEYS + (("audio_features",) if self.audio else ()) +
                           (("bg_latents",) if self.editing else ()))
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"{e['file']}: cannot read precomputed clip ({err})") from None
        if tuple(out["latents"].shape) != tuple(e["latent_shape"]):
            raise ValueError(f"{e['file']}: latents {out['latents'].shape} differ from index.json "
                             f"{e['latent_shape']}")
        k = self.subjects(record)
        if out["ref_latents"].shape[0] != k:
            raise ValueError(f"{e['file']}: ref_latents {out['ref_latents'].shape} do not hold the {k} subject(s) of "
                             "index.json")
        _, h, w, _ = out["latents"].shape
        out["null_ref_latents"] = self.null_ref(h, w)
        if slots > 1:
            white = out["null_ref_latents"][0]
            out["ref_latents"] = _pad_slots(out["ref_latents"], slots, white)
            out["null_ref_latents"] = _pad_slots(out["null_ref_latents"], slots, white)
            out["ref_mask"] = (np.arange(slots) < k).astype(np.int32)
        return out


class LoadBatch:
    """grain map: step -> this host's batch (bad clips replaced by bucket neighbours and counted)."""

    def __init__(self, plan: BatchPlan, reader, seed: int, process_index: int, process_count: int, strict: bool):
        self.plan, self.reader, self.seed = plan, reader, seed
        self.process_index, self.process_count, self.strict = process_index, process_count, strict

    def __call__(self, step: int) -> dict:
        ids = self.plan.host_ids(step, self.process_index, self.process_count)
        b = len(ids)
        # reference slots: the most subjects of a clip of the GLOBAL batch (the same on every host)
        slots = max(self.reader.subjects(int(r)) for r in self.plan.global_batch_ids(step))
        examples, skipped = [], 0
        for slot, rec in enumerate(ids):
            rng = np.random.default_rng([self.seed, int(step), self.process_index * b + slot])
            for attempt in range(MAX_TRIES):
                r = int(rec) if attempt == 0 else self.plan.neighbor(int(rec), attempt)
                if self.reader.subjects(r) > slots:      # a replacement with more subjects than the batch's slots
                    continue
                try:
                    examples.append(self.reader(r, rng, slots=slots))
                    break
                except ValueError as e:
                    if self.strict:
                        raise
                    skipped += 1
                    log.warning("step %d: skipping a bad clip: %s", step, e)
            else:
                raise RuntimeError(f"step {step}: {MAX_TRIES} consecutive unreadable clips in one bucket; "
                                   "check the dataset")
        out = collate(examples)
        out["skipped"] = np.int64(skipped)
        out["step"] = np.int64(step)
        return out


class Loader:
    """Iterator over this host's batches for steps ``start_step .. steps-1``; ``state()`` is checkpointable.

    ``kind`` is ``raw`` (yields raw dicts, see the module docstring) or ``precomputed`` (yields
    :class:`TrainBatch`), from ``train.data.mode``. ``skipped`` counts clips skipped at scan time (by reason) and at
    read time (``read_error``).
    """

    def __init__(self, cfg: Config, *, start_step: int = 0, read_skips: int = 0, steps: int | None = None,
                 process_index: int | None = None, process_count: int | None = None, workers: int | None = None,
                 shuffle: bool = True):
        tc, dc = cfg.train, cfg.train.data
        if process_index is None or process_count is None:
            process_index, process_count = jax.process_index(), jax.process_count()
        if tc.batch_size % process_count:
            raise ValueError(f"train.batch_size={tc.batch_size} does not divide over {process_count} hosts")
        self.kind = dc.mode
        if dc.mode == "raw":
            clips, self.report = sources.scan_raw(dc, cfg.llava.item_name, cfg.dit.audio_condition,
                                                  need_mask=cfg.dit.video_condition)
            reader = RawReader(dc, clips, cfg.clip_vision.image_size)
            buckets, self.index = [c.bucket for c in clips], None
        else:
            entries, self.index, self.report = sources.scan_precomputed(dc)
            reader = NpzReader(entries, str(Path(dc.path) / sources.NULL), cfg.dit.audio_condition,
                               cfg.dit.video_condition)
            buckets = [e["bucket"] for e in entries]
        if not buckets:
            raise ValueError(f"no usable clips in {dc.path} ({self.report.summary()})")
        self.plan = BatchPlan(buckets, tc.batch_size, dc.seed, shuffle)
        self.steps = tc.steps if steps is None else steps
        self.next_step = int(start_step)
        self.read_skips = int(read_skips)
        self.local_batch = tc.batch_size // process_count
        ds = grain.MapDataset.range(self.next_step, max(self.steps, self.next_step))
        ds = ds.map(LoadBatch(self.plan, reader, dc.seed, process_index, process_count, dc.strict))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=dc.threads, prefetch_buffer_size=dc.prefetch))
        workers = dc.workers if workers is None else workers
        if workers > 0:
            if not flags.FLAGS.is_parsed():     # grain workers read absl flags; we are not an absl app
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        self._it = iter(it)

    def __iter__(self):
        return self

    def __next__(self) -> dict | TrainBatch:
        batch = next(self._it)
        step = int(batch.pop("step"))
        if step != self.next_step:
            raise RuntimeError(f"data pipeline out of order: got step {step}, expected {self.next_step}")
        self.read_skips += int(batch.pop("skipped"))
        self.next_step += 1
        return batch if self.kind == "raw" else TrainBatch.from_arrays(batch)

    @property
    def skipped(self) -> dict[str, int]:
        out = dict(self.report.skipped)
        if self.read_skips:
            out["read_error"] = self.read_skips
        return out

    def state(self) -> dict:
        """JSON state: the next step (the plan is a pure function of it) and the skip counters."""
        return {"next_step": self.next_step, "read_skips": self.read_skips, "scan": self.report.to_dict()}

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
