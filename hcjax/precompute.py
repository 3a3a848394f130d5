"""Encode a raw dataset once: ``python -m hcjax.precompute --config C --data RAW_DIR --out OUT``.

Large runs train on cached VAE latents and text embeddings instead of running the VAE and the 8B LLaVA every
step. For each usable clip (see :mod:`hcjax.data.sources`; skips are logged and counted) one training window is
sampled (``rng(seed, clip)``), encoded and written as ``OUT/clips/NNNNNN.npz`` with

    latents [t, h, w, C]        scaled VAE posterior mean of the window
    ref_latents [1, h, w, C]    the reference image (or frame) padding-resized to the bucket, VAE-encoded
    text_states [S, D], text_mask [S], text_states_2 [D2]     positive-branch conditioning (spec 3.6)
    audio_features [F, 10, 5, 384]                            audio models only

``OUT/null.npz`` holds the unconditional text conditioning (negative branch: empty prompt, 'person', white image,
spec 3.4) used for text dropout, and ``ref_{h}x{w}``: white-image latents per bucket (image dropout, spec 2.1).
``OUT/index.json`` is written last, so an interrupted run leaves no usable (half) dataset.

:class:`Encoders` is also what ``train.py`` uses in raw mode (encoding each batch online).
Text encoders: ``train.data.text_encoder: llava`` (the real LLaVA + CLIP-L, from ``llava_dir``/``clip_dir``) or
``hash`` (a deterministic word-hash embedding without weights, for tests and demos).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np

from .config import Config, load_config, to_dict

log = logging.getLogger("hcjax.precompute")


# ------------------------------------------------------------------------------------------- text encoders


class HashText:
    """Word-hash stand-in for the text stage: each word maps to a fixed random vector (``[S, D]`` states with a
    BOS token, the item name after the caption, CLIP-like pooled vector). Deterministic, weight-free."""

    def __init__(self, cfg: Config):
        self.length, self.dim, self.dim2 = cfg.llava.text_len, cfg.dit.text_states_dim, cfg.dit.text_states_dim_2
        self.negative_name = cfg.llava.negative_item_name

    @staticmethod
    def _vec(word: str, dim: int, salt: str) -> np.ndarray:
        return np.random.default_rng(zlib.crc32(f"{salt}:{word}".encode())).standard_normal(dim).astype(np.float32)

    def _one(self, caption: str, name: str):
        words = re.findall(r"[a-z0-9]+", caption.lower())
        toks = (["<bos>"] + words + ["<item>"] + re.findall(r"[a-z0-9]+", name.lower()))[:self.length]
        states = np.zeros((self.length, self.dim), np.float32)
        for i, w in enumerate(toks):
            states[i] = self._vec(w, self.dim, "llava")
        mask = (np.arange(self.length) < len(toks)).astype(np.int32)
        pooled = sum((self._vec(w, self.dim2, "clip") for w in words), np.zeros(self.dim2, np.float32))
        return states, mask, pooled / np.sqrt(max(len(words), 1))

    def encode(self, captions, names, llava_images=None) -> dict:
        out = [self._one(c, n) for c, n in zip(captions, names)]
        return {k: np.stack([o[i] for o in out]) for i, k in enumerate(("text_states", "text_mask", "text_states_2"))}

    def null(self) -> dict:
        return {k: v[0] for k, v in self.encode([""], [self.negative_name]).items()}


class LlavaText:
    """The real text stage (:func:`hcjax.conditioning.llava.encode_prompts`): LLaVA with the reference image and
    item name, CLIP-L pooled; the null conditioning is its negative branch."""

    def __init__(self, cfg: Config):
        from .conditioning.llava import load_text_encoders

        dc = cfg.train.data
        if not dc.llava_dir or not dc.clip_dir:
            raise ValueError("train.data.text_encoder=llava needs train.data.llava_dir and train.data.clip_dir "
                             "(local tokenizer dirs; weights from *_weights or the same dirs)")
        self.enc = load_text_encoders(dc.llava_dir, dc.clip_dir, cfg, llava_weights=dc.llava_weights or None,
                                      clip_weights=dc.clip_weights or None)
        self.size = cfg.clip_vision.image_size

    def encode(self, captions, names, llava_images) -> dict:
        from .conditioning.llava import encode_prompts

        pos, _ = encode_prompts(self.enc, list(captions), [np.asarray(im) for im in llava_images],
                                item_names=list(names))
        return {"text_states": np.asarray(pos.text_states, np.float32),
                "text_mask": np.asarray(pos.text_mask, np.int32),
                "text_states_2": np.asarray(pos.text_states_2, np.float32)}

    def null(self) -> dict:
        from .conditioning.llava import encode_prompts

        white = np.full((self.size, self.size, 3), 255, np.uint8)
        _, neg = encode_prompts(self.enc, [""], [white])
        return {"text_states": np.asarray(neg.text_states[0], np.float32),
                "text_mask": np.asarray(neg.text_mask[0], np.int32),
                "text_states_2": np.asarray(neg.text_states_2[0], np.float32)}


# ------------------------------------------------------------------------------------------- encoders


def random_params(abstract_boxed, seed: int) -> dict:
    """Random weights of the given shapes without compiling the model's init (which is slow for the 3D VAE on
    CPU): kernels ``N(0, 1/fan_in)``, biases zero, norm scales one."""
    import flax.linen as nn
    import jax

    rng = np.random.default_rng(seed)

    def one(path, s):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return np.ones(s.shape, np.float32)
        if name == "bias" or len(s.shape) < 2:
            return np.zeros(s.shape, np.float32)
        fan_in = int(np.prod(s.shape[:-1]))
        return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, nn.unbox(abstract_boxed))


def load_vae_params(cfg: Config):
    from . import vae

    path = cfg.train.data.vae_weights
    if not path:
        raise ValueError("train.data.vae_weights is not set: give an hcjax VAE checkpoint dir (python -m "
                         "convert_weights vae ...), or 'random' for random weights (tests/demos only)")
    if path == "random":
        warnings.warn("train.data.vae_weights=random: encoding with a randomly initialised VAE (tests/demos only)",
                      stacklevel=2)
        return random_params(vae.abstract_params(cfg.vae), cfg.train.data.seed)
    from .checkpoint import load_checkpoint_config, load_params

    saved = load_checkpoint_config(path).vae
    if saved != cfg.vae:
        diff = {f: (getattr(saved, f), getattr(cfg.vae, f)) for f in saved.__dataclass_fields__
                if getattr(saved, f) != getattr(cfg.vae, f)}
        log.warning("VAE checkpoint %s has a different vae config (checkpoint, current): %s", path, diff)
    return load_params(path)


class Encoders:
    """VAE + text stage (+ Whisper for audio models): raw batches -> the DiT's training inputs (numpy)."""

    def __init__(self, cfg: Config):
        dc = cfg.train.data
        self.cfg = cfg
        self.vae_params = load_vae_params(cfg)
        self.text = HashText(cfg) if dc.text_encoder == "hash" else LlavaText(cfg)
        self._null_ref: dict[tuple[int, int], np.ndarray] = {}
        self._null_text: dict | None = None
        self.whisper_params = None
        if cfg.dit.audio_condition:
            from .checkpoint import load_params

            if not dc.whisper_weights:
                raise ValueError("the DiT is an audio model: set train.data.whisper_weights (hcjax Whisper checkpoint)")
            self.whisper_params = load_params(dc.whisper_weights)

    def vae_encode(self, pixels_uint8: np.ndarray) -> np.ndarray:
        """``uint8 [B, F, H, W, 3]`` -> scaled latents ``[B, t, h, w, C]`` (posterior mean, tiled as the original)."""
        from .vae import encode_video

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
        from .conditioning.whisper import audio_prompts_from_file

        out = []
        for path, idx, fps in zip(batch["audio"], batch["frame_index"], batch["fps"]):
            full = audio_prompts_from_file(path, self.whisper_params, self.cfg.whisper, int(idx.max()) + 1, fps=fps)
            out.append(full[0][idx])
        return np.stack(out)

    def encode(self, batch: dict) -> dict:
        """A raw batch (:class:`hcjax.data.Loader`, raw mode) -> a precomputed-style batch."""
        video = np.asarray(batch["video"])
        _, _, height, width, _ = video.shape
        out = {"latents": self.vae_encode(video),
               "ref_latents": self.vae_encode(np.asarray(batch["ref_image"])[:, None])}
        out["null_ref_latents"] = np.broadcast_to(self.null_ref(height, width)[None], out["ref_latents"].shape).copy()
        out.update(self.text.encode(batch["caption"], batch["item_name"], batch["llava_image"]))
        if self.cfg.dit.audio_condition:
            out["audio_features"] = self.audio(batch)
        return out


# ------------------------------------------------------------------------------------------- precompute


def _save_npz(path: Path, arrays: dict) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def precompute(cfg: Config, data_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Encode every usable clip of ``data_dir`` into ``out``; returns the index (also written to index.json)."""
    from .data import pipeline, sources

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    dc = cfg.train.data
    clips, report = sources.scan_raw(dc, cfg.llava.item_name, cfg.dit.audio_condition, root=data_dir)
    if not clips:
        raise ValueError(f"no usable clips in {data_dir} ({report.summary()})")
    reader = pipeline.RawReader(dc, clips, cfg.clip_vision.image_size)
    enc = Encoders(cfg)
    (out / "clips").mkdir(parents=True)
    entries, read_errors = [], 0
    for i, clip in enumerate(clips):
        try:
            raw = pipeline.collate([reader(i, np.random.default_rng([dc.seed, i]))])
        except ValueError as e:
            if dc.strict:
                raise
            read_errors += 1
            log.warning("skipping %s", e)
            continue
        arrays = {k: v[0] for k, v in enc.encode(raw).items() if k != "null_ref_latents"}   # null.npz has it
        name = f"clips/{len(entries):06d}.npz"
        _save_npz(out / name, arrays)
        entries.append({"file": name, "latent_shape": list(arrays["latents"].shape), "bucket": list(
            dc.buckets[clip.bucket]), "source": os.path.relpath(clip.video, data_dir), "caption": clip.caption})
        log.info("[%d/%d] %s", i + 1, len(clips), clip.video)
    if not entries:
        raise ValueError(f"no clip of {data_dir} could be read ({report.summary()}, read errors {read_errors})")
    null = dict(enc.null_text())
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
        "encoder": {"text_encoder": dc.text_encoder, "vae_weights": dc.vae_weights, "num_frames": dc.num_frames,
                    "frame_stride": dc.frame_stride, "buckets": [list(b) for b in dc.buckets],
                    "ref_source": dc.ref_source, "vae": to_dict(cfg.vae)},
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
    for e in index["clips"][:1]:
        t, h, w, _ = e["latent_shape"]
        pt, ph, pw = c.patch_size
        if t % pt or h % ph or w % pw:
            problems.append(f"latent size {t}x{h}x{w} is not divisible by patch_size {c.patch_size}")
    if problems:
        raise ValueError(f"precomputed dataset {where} does not fit this config: " + "; ".join(problems))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Precompute VAE latents and text embeddings of a raw dataset.")
    p.add_argument("--config", required=True, help="hcjax YAML (train.data.* selects encoders and windows)")
    p.add_argument("--data", default=None, help="raw dataset dir (default: train.data.path)")
    p.add_argument("--out", required=True, help="output dir (train with train.data.path=OUT, mode precomputed)")
    p.add_argument("--set", action="append", default=[], metavar="A.B=V", help="config override")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.set)
        data = args.data or cfg.train.data.path
        if not data:
            raise ValueError("no raw dataset: pass --data or set train.data.path")
        index = precompute(cfg, data, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(index['clips'])} clips to {args.out}; skipped: {index['scan']['skipped'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
