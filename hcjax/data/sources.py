"""Dataset indexing: scan a raw dataset directory or a precomputed one, validating every clip once.

Raw layout (any depth under the root)::

    <name>.mp4   (or .mov/.mkv/.webm/.avi)
    <name>.json  {"caption": str (required), "item_name": str, "ref_image": path, "audio": path, "mask": path}
                 or, for a clip of K subjects (multi-subject, 1..4): "item_names": [K str], "ref_images": [K paths]

Paths inside the JSON are relative to the JSON's directory. A multi-subject clip names one reference image per
subject (each on white, as sampling's ``--ref-image a.png b.png`` takes them) and one item name per subject
(``"The {name_k} looks like<image>"`` in the LLaVA prompt); it always needs its reference images (a frame of the
clip cannot stand for one subject), whatever ``train.data.ref_source``. ``mask`` (needed to train the editing DiT,
``dit.video_condition``) is a mask video of the clip: white where the subject is (the region the model
regenerates), black on the background it keeps; same frame size as the clip and at least as many frames. Training
masks the clip's own frames with it (the masked background and the mask become ``bg_latents``, see
:class:`hcjax.data.encode.Encoders`), as sampling does with ``--input-video``/``--mask-video``. A video named as
some clip's mask is not itself a clip.

A clip is *skipped and counted* (with a logged warning naming the file; ``strict`` raises instead) when its JSON is
missing or invalid, its caption is missing or empty, its reference image, audio or mask file is missing (or
needed and not named), its video or mask cannot be read or does not fit, or it has fewer frames than one
training window needs. Each kept clip is assigned the bucket ``(height, width)`` whose aspect ratio is closest.

Precomputed layout (written by ``python -m hcjax.precompute``): ``index.json`` listing ``clips/*.npz`` with their
latent shapes, and ``null.npz`` with the unconditional text conditioning and the white-image reference latents.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..media import probe

log = logging.getLogger("hcjax.data")

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
INDEX = "index.json"
NULL = "null.npz"
FORMAT = "hcjax-precomputed"
MAX_LOGGED_SKIPS = 20
MAX_SUBJECTS = 4                # as sample.py --ref-image


@dataclasses.dataclass(frozen=True)
class Clip:
    """One usable raw clip."""

    video: str
    caption: str
    item_name: str
    ref_image: str | None
    audio: str | None
    frames: int
    height: int
    width: int
    fps: float
    bucket: int          # index into DataConfig.buckets
    mask: str | None = None     # mask video (editing)
    ref_images: tuple[str, ...] = ()    # multi-subject: K >= 2 reference images (ref_image is the first)
    item_names: tuple[str, ...] = ()    # multi-subject: K item names (item_name is the first)

    @property
    def subjects(self) -> int:
        """``K``: the number of subjects (reference images) of the clip."""
        return max(len(self.ref_images), 1)


@dataclasses.dataclass
class ScanReport:
    """What a scan kept and skipped (``skipped``: reason -> count; ``examples``: first few ``(path, message)``)."""

    total: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)

    def skip(self, path, reason: str, message: str, strict: bool) -> None:
        if strict:
            raise ValueError(f"bad clip {path}: {message} (train.data.strict is on)")
        self.skipped[reason] += 1
        n = sum(self.skipped.values())
        if n <= MAX_LOGGED_SKIPS:
            log.warning("skipping %s: %s", path, message)
            self.examples.append((str(path), message))
        elif n == MAX_LOGGED_SKIPS + 1:
            log.warning("more clips skipped; further skips are only counted")

    def summary(self) -> str:
        s = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.kept} of {self.total} clips usable; skipped: {s}"

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "skipped": dict(self.skipped)}


def window_frames(dc: DataConfig) -> int:
    """Source frames one training window spans."""
    return (dc.num_frames - 1) * dc.frame_stride + 1


def nearest_bucket(height: int, width: int, buckets) -> int:
    r = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - r), i))


def _rel(base: Path, value) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base / p


def _read_meta(path: Path) -> Any:
    return json.loads(path.read_text())


def mask_videos(root: str | Path) -> set[Path]:
    """The (resolved) videos under ``root`` that a clip's JSON names as its ``mask``: they are not clips."""
    out = set()
    for meta_path in Path(root).rglob("*.json"):
        try:
            meta = _read_meta(meta_path)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("mask"), str):
            out.add(_rel(meta_path.parent, meta["mask"]).resolve())
    return out


def _subjects(meta: dict, base: Path, default_item_name: str):
    """The list form's ``(ref_images, item_names)`` (tuples of K str, paths resolved), ``()`` without it,
    or ``(None, reason, message)`` when ``"ref_images"`` / ``"item_names"`` are malformed or an image is missing."""
    refs, names = meta.get("ref_images"), meta.get("item_names")
    if refs is None and names is None:
        return ()
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        return None, "missing_ref_image", "\"item_names\" needs \"ref_images\": a list of image paths, one per subject"
    if not 1 <= len(refs) <= MAX_SUBJECTS:
        return None, "bad_json", f"\"ref_images\" lists {len(refs)} images; 1 to {MAX_SUBJECTS} subjects are supported"
    if names is None and len(refs) == 1:
        names = [meta.get("item_name") or default_item_name]
    if not isinstance(names, list) or len(names) != len(refs) or not all(isinstance(n, str) and n.strip()
                                                                           for n in names):
        return None, "bad_json", f"\"item_names\" must list one non-empty name per reference image ({len(refs)})"
    paths = tuple(str(_rel(base, r)) for r in refs)
    for r in paths:
        if not Path(r).is_file():
            return None, "missing_ref_image", f"reference image {r} not found"
    return paths, tuple(n.strip() for n in names)


def scan_raw(dc: DataConfig, default_item_name: str = "object", need_audio: bool = False,
             root: str | Path | None = None, *, need_mask: bool = False) -> tuple[list[Clip], ScanReport]:
    """Index the raw dataset at ``root`` (default ``dc.path``); returns the usable clips and the report.
    ``need_audio`` / ``need_mask``: clips without an audio file / a mask video are skipped (audio / editing DiT)."""
    root = Path(root if root is not None else dc.path)
    if not str(root) or not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root!s} (set train.data.path)")
    masks = mask_videos(root)
    videos = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file()
                    and p.resolve() not in masks)
    report = ScanReport(total=len(videos))
    need = window_frames(dc)
    clips: list[Clip] = []
    for v in videos:
        meta_path = v.with_suffix(".json")
        if not meta_path.is_file():
            report.skip(v, "missing_json", f"no caption file {meta_path.name}", dc.strict)
            continue
        try:
            meta = _read_meta(meta_path)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            report.skip(meta_path, "bad_json", f"invalid JSON ({e})", dc.strict)
            continue
        if not isinstance(meta, dict):
            report.skip(meta_path, "bad_json", "expected a JSON object", dc.strict)
            continue
        caption = meta.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            report.skip(meta_path, "missing_caption", "missing or empty \"caption\"", dc.strict)
            continue
        multi = _subjects(meta, meta_path.parent, default_item_name)
        if multi and multi[0] is None:
            report.skip(meta_path, multi[1], multi[2], dc.strict)
            continue
        item = (multi[1][0] if multi else meta.get("item_name")) or default_item_name
        if not isinstance(item, str):
            report.skip(meta_path, "bad_json", "\"item_name\" must be a string", dc.strict)
            continue
        ref = meta["ref_images"][0] if multi else meta.get("ref_image")
        if multi and len(multi[0]) == 1:        # the list form of one subject: a single-subject clip
            multi = ()
        if ref is not None:
            ref = _rel(meta_path.parent, ref)
            if not ref.is_file():
                report.skip(meta_path, "missing_ref_image", f"reference image {ref} not found", dc.strict)
                continue
        elif dc.ref_source == "image":
            report.skip(meta_path, "missing_ref_image", "no \"ref_image\" (train.data.ref_source is image)",
                        dc.strict)
            continue
        audio = meta.get("audio")
        if audio is not None:
            audio = _rel(meta_path.parent, audio)
            if not audio.is_file():
                report.skip(meta_path, "missing_audio", f"audio file {audio} not found", dc.strict)
                continue
        elif need_audio:
            report.skip(meta_path, "missing_audio", "no \"audio\" (the DiT is an audio model)", dc.strict)
            continue
        mask = meta.get("mask")
        if mask is not None:
            if not isinstance(mask, str) or not _rel(meta_path.parent, mask).is_file():
                report.skip(meta_path, "missing_mask", f"mask video {mask} not found", dc.strict)
                continue
            mask = _rel(meta_path.parent, mask)
        elif need_mask:
            report.skip(meta_path, "missing_mask", "no \"mask\" video (the DiT is an editing model, "
                        "dit.video_condition)", dc.strict)
            continue
        try:
            info = probe(v)
        except ValueError as e:
            report.skip(v, "unreadable_video", str(e), dc.strict)
            continue
        if info.frames < need:
            report.skip(v, "too_short", f"{info.frames} frames; a window of {dc.num_frames} frames with stride "
                        f"{dc.frame_stride} needs {need}", dc.strict)
            continue
        if mask is not None:
            try:
                m = probe(mask)
            except ValueError as e:
                report.skip(mask, "bad_mask", str(e), dc.strict)
                continue
            if (m.height, m.width) != (info.height, info.width) or m.frames < info.frames:
                report.skip(mask, "bad_mask", f"mask video of {m.frames} frames {m.width}x{m.height} does not "
                            f"cover the clip {v.name} ({info.frames} frames {info.width}x{info.height})", dc.strict)
                continue
        clips.append(Clip(str(v), caption.strip(), item.strip(), None if ref is None else str(ref),
                          None if audio is None else str(audio), info.frames, info.height, info.width, info.fps,
                          nearest_bucket(info.height, info.width, dc.buckets), None if mask is None else str(mask),
                          *(multi if multi else ())))
    report.kept = len(clips)
    log.info("dataset %s: %s", root, report.summary())
    return clips, report


def read_index(root: str | Path) -> dict[str, Any]:
    """``index.json`` of a precomputed dataset (checked for its format marker)."""
    root = Path(root)
    f = root / INDEX
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root} (set train.data.path)")
    if not f.is_file():
        raise FileNotFoundError(f"{root} is not a precomputed dataset (no {INDEX}); write one with "
                                "`python -m hcjax.precompute`, or set train.data.mode: raw")
    index = json.loads(f.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{f}: not an hcjax precomputed index (format {index.get('format')!r})")
    if not (root / NULL).is_file():
        raise FileNotFoundError(f"{root}: missing {NULL} (unconditional conditioning); re-run hcjax.precompute")
    return index


def scan_precomputed(dc: DataConfig, root: str | Path | None = None) -> tuple[list[dict], dict, ScanReport]:
    """Entries ``{"file", "latent_shape", "bucket"}`` whose files exist, the index, and the report."""
    root = Path(root if root is not None else dc.path)
    index = read_index(root)
    entries = index.get("clips", [])
    report = ScanReport(total=len(entries))
    kept = []
    shapes: dict[tuple, int] = {}
    for e in entries:
        f = root / e["file"]
        if not f.is_file():
            report.skip(f, "missing_file", "listed in index.json but missing", dc.strict)
            continue
        shape = tuple(e["latent_shape"])
        kept.append(dict(e, file=str(f), bucket=shapes.setdefault(shape, len(shapes))))
    report.kept = len(kept)
    log.info("dataset %s: %s", root, report.summary())
    return kept, index, report
