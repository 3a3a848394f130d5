"""Encode a raw dataset once: ``python -m hcjax.precompute --config C --data RAW_DIR --out OUT``.

The entry point of :func:`hcjax.data.encode.precompute` (the dataset layout is described there): it loads what
the library takes already loaded, the text encoders of ``train.data.text_encoder: llava`` (tokenizers from
``train.data.llava_dir`` / ``clip_dir``, weights from ``*_weights`` or the same dirs), with
:func:`load_text_encoders_for`, which ``train.py`` (raw mode) and the demo build use too. Bad input ends with a
one-line message and exit code 2 (``--debug`` shows the traceback), Ctrl-C with 130.
"""

from __future__ import annotations

from .cli import exit_process, guard_imports, run_cli

if __name__ == "__main__":
    guard_imports()                 # an interrupt while the heavy modules import: one line, exit 130/143

import argparse  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

from .models.text import load_text_encoders  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .data import encode  # noqa: E402
from .data.encode import Encoders, check_compatible  # noqa: E402
from .runtime import enable_compilation_cache  # noqa: E402

__all__ = ["Encoders", "check_compatible", "load_text_encoders_for", "main", "precompute"]


def load_text_encoders_for(cfg: Config):
    """The text encoders ``train.data`` names (``None`` for the weight-free ``hash`` stage)."""
    dc = cfg.train.data
    if dc.text_encoder == "hash":
        return None
    if not dc.llava_dir or not dc.clip_dir:
        raise ValueError("train.data.text_encoder=llava needs train.data.llava_dir and train.data.clip_dir "
                         "(local tokenizer dirs; weights from *_weights or the same dirs)")
    return load_text_encoders(dc.llava_dir, dc.clip_dir, cfg, llava_weights=dc.llava_weights or None,
                              clip_weights=dc.clip_weights or None)


def precompute(cfg: Config, data_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """:func:`hcjax.data.encode.precompute` with the text encoders of ``cfg`` loaded here."""
    return encode.precompute(cfg, data_dir, out, text_encoders=load_text_encoders_for(cfg), overwrite=overwrite)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Precompute VAE latents and text embeddings of a raw dataset.")
    p.add_argument("--config", required=True, help="hcjax YAML (train.data.* selects encoders and windows)")
    p.add_argument("--data", default=None, help="raw dataset dir (default: train.data.path)")
    p.add_argument("--out", required=True, help="output dir (train with train.data.path=OUT, mode precomputed)")
    p.add_argument("--set", action="append", default=[], metavar="A.B=V", help="config override")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA compilation cache")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def run():
        cfg = load_config(args.config, args.set)
        enable_compilation_cache(not args.no_compile_cache)
        data = args.data or cfg.train.data.path
        if not data:
            raise ValueError("no raw dataset: pass --data or set train.data.path")
        index = precompute(cfg, data, args.out, overwrite=args.overwrite)
        print(f"wrote {len(index['clips'])} clips to {args.out}; skipped: {index['scan']['skipped'] or 'none'}")

    return run_cli(run, debug=args.debug)


if __name__ == "__main__":
    exit_process(main())
