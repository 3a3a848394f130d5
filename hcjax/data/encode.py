"""Encoding raw clips into the DiT's training inputs, online (raw mode) or once into a precomputed dataset.

Large runs train on cached VAE latents and text embeddings instead of running the VAE and the 8B LLaVA every
step. :func:`precompute` (behind ``python -m hcjax.precompute``) samples one training window per usable clip (see
:mod:`.sources`; skips are logged and counted) with ``rng(seed, clip)``, encodes it and writes
``OUT/clips/NNNNNN.npz`` with (shape letters of :mod:`.batch`, without the batch axis)

    latents [T, H, W, C]        scaled VAE posterior mean of the window
    ref_latents [K, H, W, C]    the K reference images (one; or a frame) padding-resized to the bucket, VAE-encoded
                                one frame each (as sampling encodes ``--ref-image a.png b.png``)
    text_states [S, D], text_mask [S], text_states_2 [D2]     positive-branch conditioning (spec 3.6)
    audio_features [F, 10, 5, 384]                            audio models only
    bg_latents [T, H, W, 2C]    editing models only: [masked background ; mask] latents (spec 2.2)

``OUT/null.npz`` holds the unconditional text conditioning (negative branch: empty prompt, 'person', white image,
spec 3.4) used for text dropout, and ``ref_{h}x{w}``: white-image latents per bucket (image dropout, spec 2.1).

Multi-subject clips (K subjects, :mod:`.sources`): the text is encoded as sampling encodes it, with one
``"The {name_k} looks like<image>"`` per subject and each ``<image>`` replaced by that subject's image features
(:func:`hcjax.conditioning.text.encode_prompts` with K images and K names); a K-image prompt has ``K(n-1)`` more
LLaVA states than a one-image prompt (``n`` image features), so in a dataset whose largest clip has ``K_max``
subjects every clip's text (and the null text) is zero-padded (mask 0) to the ``K_max`` length: precomputed clips
stack. ``index.json`` lists each clip's ``subjects``; the loader pads a batch's references to its largest K
(:mod:`.pipeline`).

Everything is written into a temporary sibling ``.OUT.partial-<pid>`` renamed to ``OUT`` at the end: a run
that fails or is interrupted leaves nothing behind (and blocks no rerun), and ``overwrite`` replaces an old
dataset only once the new one is complete.

Editing (``dit.video_condition``): the clip's own window is the target; its mask video (white = the subject's
region, :mod:`.sources`) goes through the sampling path's mask processing (:func:`hcjax.conditioning.video.
prepare_editing_pixels` with ``sample.expand_scale``: dilate, threshold, black out the region) and the masked
background and the mask are VAE-encoded separately (posterior means) into ``bg_latents``. So the model learns to
regenerate the masked subject from the reference image over the kept background, what ``sample.py --input-video
--mask-video`` asks of it.

Text stages (``train.data.text_encoder``): ``hash`` (:class:`HashText`, a deterministic word-hash embedding
without weights, for tests and demos) or ``llava`` (:class:`PromptText` over already-loaded text encoders: the
library never loads them; the entry points do, see :func:`hcjax.precompute.load_text_encoders_for`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import load_checkpoint_config, load_params, random_params
from ..conditioning.llava import num_image_features
from ..conditioning.text import encode_prompts
from ..conditioning.video import encode_editing_latents, prepare_editing_pixels
from ..conditioning.whisper import audio_prompts_from_file
from ..config import Config, to_dict
from ..vae import abstract_params as vae_abstract_params
from ..vae import encode_video
from . import pipeline, sources
from .batch import TEXT_KEYS, TrainBatch

log = logging.getLogger("hcjax.precompute")


# ------------------------------------------------------------------------------------------- text stages


class HashText:
    """Word-hash stand-in for the text stage: each word maps to a fixed random vector (``[S, D]`` states with a
    BOS token, the item name after the caption, CLIP-like pooled vector). Deterministic, weight-free."""

    def __init__(self, cfg: Config):
        self.length, self.dim, self.dim2 = cfg.llava.text_len, cfg.dit.text_states_dim, cfg.dit.text_states_dim_2
        self.negative_name = cfg.llava.negative_item_name

    @staticmethod
    def _vec(word: str, dim: int, salt: str) -> np.ndarray:
        return np.random.default_rng(zlib.crc32(f"{salt}:{word}".encode())).standard_normal(dim).astype(np.float32)

    def states_length(self, subjects: int = 1) -> int:
        """Text states per clip (``S``), whatever the number of subjects."""
        return self.length

    def _one(self, caption: str, name: str | tuple):
        words = re.findall(r"[a-z0-9]+", caption.lower())
        names = [name] if isinstance(name, str) else list(name)       # K subjects: "<item> name" per subject
        item = [w for nm in names for w in ["<item>"] + re.findall(r"[a-z0-9]+", nm.lower())]
        toks = (["<bos>"] + words + item)[:self.length]
        states = np.zeros((self.length, self.dim), np.float32)
        for i, w in enumerate(toks):
            states[i] = self._vec(w, self.dim, "llava")
        mask = (np.arange(self.length) < len(toks)).astype(np.int32)
        pooled = sum((self._vec(w, self.dim2, "clip") for w in words), np.zeros(self.dim2, np.float32))
        return states, mask, pooled / np.sqrt(max(len(words), 1))

    def encode(self, captions, names, llava_images=None) -> dict:
        out = [self._one(c, n) for c, n in zip(captions, names)]
        return {k: np.stack([o[i] for o in out]) for i, k in enumerate(TEXT_KEYS)}

    def null(self) -> dict:
        return {k: v[0] for k, v in self.encode([""], [self.negative_name]).items()}


class PromptText:
    """The real text stage over loaded text encoders (``encoders``: the object :func:`encode_prompts` takes,
    e.g. from :func:`hcjax.models.text.load_text_encoders`): LLaVA with the reference image and item name, CLIP-L
    pooled; the null conditioning is its negative branch (empty prompt, white image)."""

    def __init__(self, encoders, cfg: Config):
        self.enc = encoders
        self.size = cfg.clip_vision.image_size
        self.text_len, self.n_image = cfg.llava.text_len, num_image_features(cfg.clip_vision)

    def states_length(self, subjects: int = 1) -> int:
        """LLaVA states of a prompt with ``subjects`` images (``text_len + K(n-1)``, spec 3.3)."""
        return self.text_len + subjects * (self.n_image - 1)

    def encode(self, captions, names, llava_images) -> dict:
        """Per sample a name (one image ``[S, S, 3]``) or a tuple of K names (a list of K images); samples with
        the same K are encoded together, shorter texts zero-padded to the batch's longest."""
        groups: dict[int, list[int]] = {}
        for i, nm in enumerate(names):
            groups.setdefault(1 if isinstance(nm, str) else len(nm), []).append(i)
        parts = {}
        for k, idx in sorted(groups.items()):
            imgs = [np.asarray(llava_images[i]) if k == 1 else [np.asarray(im) for im in llava_images[i]]
                    for i in idx]
            nms = [names[i] if k == 1 else list(names[i]) for i in idx]
            pos, _ = encode_prompts(self.enc, [captions[i] for i in idx], imgs, item_names=nms)
            parts[k] = {"text_states": np.asarray(pos.text_states, np.float32),
                        "text_mask": np.asarray(pos.text_mask, np.int32),
                        "text_states_2": np.asarray(pos.text_states_2, np.float32)}
        if len(parts) == 1:
            return next(iter(parts.values()))
        length = max(p["text_states"].shape[1] for p in parts.values())
        out = {key: [None] * len(names) for key in TEXT_KEYS}
        for k, idx in groups.items():
            padded = pad_text(parts[k], length)
            for j, i in enumerate(idx):
                for key in TEXT_KEYS:
                    out[key][i] = padded[key][j]
        return {key: np.stack(v) for key, v in out.items()}

    def null(self) -> dict:
        white = np.full((self.size, self.size, 3), 255, np.uint8)
        _, neg = encode_prompts(self.enc, [""], [white])
        return {"text_states": np.asarray(neg.text_states[0], np.float32),
                "text_mask": np.asarray(neg.text_mask[0], np.int32),
                "text_states_2": np.asarray(neg.text_states_2[0], np.float32)}


def pad_text(text: dict, length: int, batched: bool = True) -> dict:
    """Zero-pad ``text_states`` ``[(B,) S, D]`` and ``text_mask`` ``[(B,) S]`` to ``length`` states (mask 0)."""
    axis = 1 if batched else 0
    extra = length - text["text_states"].shape[axis]
    if extra < 0:
        raise ValueError(f"text states of length {text['text_states'].shape[axis]} do not fit {length}")
    if not extra:
        return text

    def pad(x):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return np.pad(x, widths)
    return dict(text, text_states=pad(text["text_states"]), text_mask=pad(text["text_mask"]))


def text_stage(cfg: Config, text_encoders=None) -> HashText | PromptText:
    """The text stage ``train.data.text_encoder`` names; ``llava`` needs the loaded ``text_encoders``."""
    if cfg.train.data.text_encoder == "hash":
        return HashText(cfg)
    if text_encoders is None:
        raise ValueError("train.data.text_encoder=llava needs the loaded text encoders (train.py and "
                         "`python -m hcjax.precompute` load them from train.data.llava_dir/clip_dir; in code pass "
                         "text_encoders=hcjax.precompute.load_text_encoders_for(cfg))")
    return PromptText(text_encoders, cfg)


# ------------------------------------------------------------------------------------------- encoders


def load_vae_params(cfg: Config):
    path = cfg.train.data.vae_weights
    if not path:
        raise ValueError("train.data.vae_weights is not set: give an hcjax VAE checkpoint dir (python -m "
                         "convert_weights vae ...), or 'random' for random weights (tests/demos only)")
    if path == "random":
        warnings.warn("train.data.vae_weights=random: encoding with a randomly initialised VAE (tests/demos only)",
                      stacklevel=2)
        return random_params(vae_abstract_params(cfg.vae), cfg.train.data.seed, std=None)
    saved = load_checkpoint_config(path).vae
    if saved != cfg.vae:
        diff = {f: (getattr(saved, f), getattr(cfg.vae, f)) for f in saved.__dataclass_fields__
                if getattr(saved, f) != getattr(cfg.vae, f)}
        log.warning("VAE checkpoint %s has a different vae config (checkpoint, current): %s", path, diff)
    return load_params(path)


class Encoders:
    """VAE + text stage (+ Whisper for audio models, + the editing inputs for editing models): raw batches ->
    :class:`TrainBatch` (numpy). ``text_encoders``: see :func:`text_stage`."""

    def __init__(self, cfg: Config, text_encoders=None):
        dc = cfg.train.data
        self.cfg = cfg
        if cfg.dit.video_condition and cfg.dit.bg_in_channels != 2 * cfg.vae.latent_channels:
            raise ValueError(f"dit.bg_in_channels={cfg.dit.bg_in_channels}: the editing DiT takes [background ; mask] "
                             f"latents, 2 x vae.latent_channels = {2 * cfg.vae.latent_channels} channels")
        self.text = text_stage(cfg, text_encoders)
        self.vae_params = load_vae_params(cfg)
        self._null_ref: dict[tuple[int, int], np.ndarray] = {}
        self._null_text: dict | None = None
        self.whisper_params = None
        if cfg.dit.audio_condition:
            if not dc.whisper_weights:
                raise ValueError("the DiT is an audio model: set train.data.whisper_weights (hcjax Whisper checkpoint)")
            self.whisper_params = load_params(dc.whisper_weights)

    def vae_encode(self, pixels_uint8: np.ndarray) -> np.ndarray:
        """``uint8 [B, F, H, W, 3]`` -> scaled latents ``[B, t, h, w, C]`` (posterior mean, tiled as the original)."""
        x = pixels_uint8.astype(np.float32) / 127.5 - 1.0
        return np.asarray(encode_video(self.vae_params, self.cfg.vae, x, key=None, tiled=True), np.float32)

    def null_ref(self, height: int, width: int) -> np.ndarray:
        """White-image reference latents ``[1, h, w, C]`` for a ``height x width`` bucket (spec 2.1)."""
        if (height, width) not in self._null_ref:
            white = np.full((1, 1, height, width, 3), 255, np.uint8)
            self._null_ref[(height, width)] = self.vae_encode(white)[0]
        return self._null_ref[(height, width)]

    def null_text(self) -> dict:
        if self._null_text is None:
            self._null_text = self.text.null()
        return self._null_text

    def audio(self, batch: dict) -> np.ndarray:
        out = []
        for path, idx, fps in zip(batch["audio"], batch["frame_index"], batch["fps"]):
            full = audio_prompts_from_file(path, self.whisper_params, self.cfg.whisper, int(idx.max()) + 1, fps=fps)
            out.append(full[0][idx])
        return np.stack(out)

    def bg_latents(self, video: np.ndarray, mask_video: np.ndarray) -> np.ndarray:
        """``uint8 [B, F, H, W, 3]`` clips and their masks -> ``bg_latents [B, t, h, w, 2C]`` (module docstring)."""
        out = []
        for i, (v, m) in enumerate(zip(video, mask_video)):
            bg, mask = prepare_editing_pixels(v, m, self.cfg.sample.expand_scale, video_name=f"clip {i} of the batch",
                                              mask_name="its mask video")
            out.append(np.asarray(encode_editing_latents(self.vae_params, self.cfg.vae, bg, mask), np.float32)[0])
        return np.stack(out)

    def encode(self, batch: dict) -> TrainBatch:
        """A raw batch (:class:`hcjax.data.Loader`, raw mode) -> the step's inputs."""
        video = np.asarray(batch["video"])
        b, _, height, width, _ = video.shape
        latents = self.vae_encode(video)
        ref_mask = None
        if "ref_images" in batch:       # K reference slots (multi-subject), each its own one-frame video
            refs = np.asarray(batch["ref_images"])
            k = refs.shape[1]
            ref = self.vae_encode(refs.reshape(b * k, 1, *refs.shape[2:]))
            ref = ref.reshape(b, k, *ref.shape[2:])
            ref_mask = np.asarray(batch["ref_mask"], np.int32)
            counts = ref_mask.sum(axis=1)
            llava = [list(np.asarray(batch["llava_images"][i])[:counts[i]]) for i in range(b)]
            llava = [im[0] if len(im) == 1 else im for im in llava]
            names = [nm[0] if len(nm) == 1 else tuple(nm) for nm in batch["item_names"]]
        else:
            ref = self.vae_encode(np.asarray(batch["ref_image"])[:, None])
            llava, names = batch["llava_image"], batch["item_name"]
        null_ref = np.broadcast_to(self.null_ref(height, width)[None], ref.shape).copy()
        text = self.text.encode(batch["caption"], names, llava)
        if "text_slots" in batch:       # a dataset with multi-subject clips: its longest text
            text = pad_text(text, self.text.states_length(int(np.max(batch["text_slots"]))))
        audio = self.audio(batch) if self.cfg.dit.audio_condition else None
        bg = None
        if self.cfg.dit.video_condition:
            if "mask_video" not in batch:
                raise ValueError("the editing DiT (dit.video_condition) trains on clips with a mask video (\"mask\" "
                                 "in the clip's JSON, see hcjax.data.sources)")
            bg = self.bg_latents(video, np.asarray(batch["mask_video"]))
        return TrainBatch(latents=latents, ref_latents=ref, null_ref_latents=null_ref, **text,
                          audio_features=audio, bg_latents=bg, ref_mask=ref_mask)


# ------------------------------------------------------------------------------------------- precompute


def _save_npz(path: Path, arrays: dict) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _clip_arrays(batch: TrainBatch) -> dict[str, Any]:
    """The per-clip arrays of a batch of one (``null_ref_latents`` lives in null.npz; K is ``ref_latents``' length,
    no ``ref_mask``)."""
    fields = {k: getattr(batch, k) for k in TrainBatch.__dataclass_fields__ if k not in ("null_ref_latents",
                                                                                        "ref_mask")}
    return {k: np.asarray(v)[0] for k, v in fields.items() if v is not None}


def precompute(cfg: Config, data_dir: str | Path, out: str | Path, *, text_encoders=None,
               overwrite: bool = False) -> dict:
    """Encode every usable clip of ``data_dir`` into ``out``; returns the index (also written to index.json).
    ``text_encoders``: see :func:`text_stage` (not needed by the ``hash`` stage)."""
    out = Path(out)
    dc = cfg.train.data
    occupied = out.exists() and any(out.iterdir())
    if occupied and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    enc = Encoders(cfg, text_encoders)       # bad settings fail before anything is deleted
    clips, report = sources.scan_raw(dc, cfg.llava.item_name, cfg.dit.audio_condition, root=data_dir,
                                     need_mask=cfg.dit.video_condition)
    if not clips:
        raise ValueError(f"no usable clips in {data_dir} ({report.summary()})")
    tmp = out.absolute().with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        index = _write_dataset(cfg, enc, clips, report, data_dir, tmp)
        if out.exists():
            shutil.rmtree(out)               # --overwrite (or an empty directory): replaced only now, complete
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _write_dataset(cfg: Config, enc: "Encoders", clips, report, data_dir, out: Path) -> dict:
    """Encode ``clips`` into the (temporary) directory ``out``; returns the index."""
    dc = cfg.train.data
    reader = pipeline.RawReader(dc, clips, cfg.clip_vision.image_size)
    (out / "clips").mkdir(parents=True)
    entries, read_errors = [], 0
    for i, clip in enumerate(clips):
        try:
            raw = pipeline.collate([reader(i, np.random.default_rng([dc.seed, i]), slots=clip.subjects)])
        except ValueError as e:
            if dc.strict:
                raise
            read_errors += 1
            log.warning("skipping %s", e)
            continue
        arrays = _clip_arrays(enc.encode(raw))
        name = f"clips/{len(entries):06d}.npz"
        _save_npz(out / name, arrays)
        entries.append({"file": name, "latent_shape": list(arrays["latents"].shape), "bucket": list(
            dc.buckets[clip.bucket]), "source": os.path.relpath(clip.video, data_dir), "caption": clip.caption,
            "subjects": int(arrays["ref_latents"].shape[0])})
        log.info("[%d/%d] %s", i + 1, len(clips), clip.video)
    if not entries:
        raise ValueError(f"no clip of {data_dir} could be read ({report.summary()}, read errors {read_errors})")
    null = dict(enc.null_text())
    if reader.text_slots > 1:           # multi-subject clips: every text padded to the longest (module docstring)
        null = pad_text(null, enc.text.states_length(reader.text_slots), batched=False)
    for h, w in sorted({tuple(e["bucket"]) for e in entries}):
        z = enc.null_ref(h, w)
        null[f"ref_{z.shape[1]}x{z.shape[2]}"] = z
    _save_npz(out / sources.NULL, null)
    skipped = dict(report.skipped)
    if read_errors:
        skipped["read_error"] = read_errors
    first = entries[0]
    index = {
        "format": sources.FORMAT, "version": 1, "clips": entries,
        "text": {"length": int(null["text_states"].shape[0]), "dim": int(null["text_states"].shape[1]),
                 "dim_2": int(null["text_states_2"].shape[0])},
        "latent_channels": int(first["latent_shape"][-1]),
        "bg_channels": 2 * int(first["latent_shape"][-1]) if cfg.dit.video_condition else 0,
        "encoder": {"text_encoder": dc.text_encoder, "vae_weights": dc.vae_weights, "num_frames": dc.num_frames,
                    "frame_stride": dc.frame_stride, "buckets": [list(b) for b in dc.buckets],
                    "ref_source": dc.ref_source, "vae": to_dict(cfg.vae),
                    **({"expand_scale": cfg.sample.expand_scale} if cfg.dit.video_condition else {})},
        "scan": {"total": report.total, "kept": len(entries), "skipped": skipped},
    }
    tmp = out / (sources.INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / sources.INDEX)
    return index


def check_compatible(index: dict, cfg: Config, where: str) -> None:
    """Raise ``ValueError`` when a precomputed dataset does not fit the DiT of ``cfg``."""
    c = cfg.dit
    problems = []
    if index["latent_channels"] != c.in_channels:
        problems.append(f"latent channels {index['latent_channels']} != dit.in_channels {c.in_channels}")
    if index["text"]["dim"] != c.text_states_dim:
        problems.append(f"text states dim {index['text']['dim']} != dit.text_states_dim {c.text_states_dim}")
    if index["text"]["dim_2"] != c.text_states_dim_2:
        problems.append(f"pooled text dim {index['text']['dim_2']} != dit.text_states_dim_2 {c.text_states_dim_2}")
    if c.video_condition:
        bg = index.get("bg_channels", 0)
        if not bg:
            problems.append("the DiT is an editing model (dit.video_condition) but the dataset has no bg_latents "
                            "(precompute it with the editing config from clips with mask videos)")
        elif bg != c.bg_in_channels:
            problems.append(f"bg_latents channels {bg} != dit.bg_in_channels {c.bg_in_channels}")
    for e in index["clips"][:1]:
        t, h, w, _ = e["latent_shape"]
        pt, ph, pw = c.patch_size
        if t % pt or h % ph or w % pw:
            problems.append(f"latent size {t}x{h}x{w} is not divisible by patch_size {c.patch_size}")
    if problems:
        raise ValueError(f"precomputed dataset {where} does not fit this config: " + "; ".join(problems))
