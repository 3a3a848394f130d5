"""Loading the text towers from disk: tokenizers, LLaVA image normalisation, LLaVA and CLIP-L weights.

Reads the user's local model directories only (``local_files_only``, never the network): the LLaVA directory
(``llava-llama-3-8b-v1_1/``: ``tokenizer.json`` + ``tokenizer_config.json``, ``preprocessor_config.json``,
safetensors weights) and the CLIP-L one (``openai_clip-vit-large-patch14/``). Weights come from a converted hcjax
checkpoint (``config.json`` + ``params/``) or a Hugging Face directory with safetensors, converted here through
:mod:`convert_weights` (this "loading" floor is the only one that imports it). The result is a
:class:`hcjax.conditioning.text.TextEncoders` for :func:`hcjax.conditioning.text.encode_prompts`.

Every missing file is a ``FileNotFoundError`` naming the file and the directory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

from convert_weights import clip as convert_clip
from convert_weights import llava as convert_llava
from convert_weights.readers import read_state_dict

from .. import sharding
from ..axes import TEXT_RULES
from ..checkpoint import load_params
from ..conditioning import clip, llava
from ..conditioning.llava import CLIP_MEAN, CLIP_STD
from ..conditioning.text import ImagePreprocessor, TextEncoders
from ..config import Config


def _need(model_dir: Path, files: Sequence[str], what: str) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{what}: model directory not found: {model_dir}")
    for f in files:
        if not (model_dir / f).is_file():
            raise FileNotFoundError(f"{what}: missing file {f} in {model_dir}")


# ------------------------------------------------------------------------------------------- tokenizers


def load_llava_tokenizer(model_dir: str | Path):
    """The Llama-3 fast tokenizer of ``llava-llama-3-8b-v1_1/`` (local files only, right padding)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    _need(model_dir, ("tokenizer_config.json", "tokenizer.json"), "LLaVA tokenizer")
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        raise ValueError(f"LLaVA tokenizer in {model_dir} has no pad token")
    return tok


def load_clip_tokenizer(model_dir: str | Path):
    """The CLIP tokenizer of ``openai_clip-vit-large-patch14/`` (local files only)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    _need(model_dir, ("tokenizer_config.json",), "CLIP tokenizer")
    if not (model_dir / "tokenizer.json").is_file():
        _need(model_dir, ("vocab.json", "merges.txt"), "CLIP tokenizer (no tokenizer.json)")
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tok.padding_side = "right"
    return tok


def load_image_preprocessor(model_dir: str | Path | None, cfg: Config) -> ImagePreprocessor:
    """Mean/std from ``preprocessor_config.json`` of the local LLaVA dir when present (else the CLIP values)."""
    size = cfg.clip_vision.image_size
    meta_file = None if model_dir is None else Path(model_dir) / "preprocessor_config.json"
    if meta_file is not None and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_file}: not valid JSON ({e})") from None
        return ImagePreprocessor(size, tuple(meta.get("image_mean", CLIP_MEAN)), tuple(meta.get("image_std", CLIP_STD)))
    return ImagePreprocessor(size)


# ------------------------------------------------------------------------------------------- weights


def _is_hcjax_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "params").is_dir()


def _weights(path: Path, what: str):
    """Lazy state dict of a HF model dir (``model.safetensors`` or an index + shards), naming missing files."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: model directory not found: {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for s in shards:
            if not (path / s).is_file():
                raise FileNotFoundError(f"{what}: missing weight file {s} in {path} (listed in {index.name})")
    elif not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{what}: missing weight file model.safetensors (or model.safetensors.index.json + shards) in {path}; "
            f"*.bin checkpoints must first be converted with `python -m convert_weights`")
    return read_state_dict(path)


def load_llava_params(path: str | Path, cfg: Config, dtype=None, abstract=None):
    """LLaVA params from a converted hcjax checkpoint dir or a HF model dir with safetensors (converted here).

    ``abstract`` (e.g. :func:`hcjax.sharding.abstract_sharded`) restores a checkpoint straight into that layout.
    """
    path = Path(path)
    if _is_hcjax_checkpoint(path):
        return load_params(path, abstract)
    return convert_llava.from_hf(_weights(path, "LLaVA weights"), cfg, dtype=dtype)


def load_clip_params(path: str | Path, cfg: Config, dtype=None, abstract=None):
    """CLIP-L text params from a converted hcjax checkpoint dir or a HF model dir with safetensors."""
    path = Path(path)
    if _is_hcjax_checkpoint(path):
        return load_params(path, abstract)
    return convert_clip.from_hf(_weights(path, "CLIP text weights"), cfg.clip_text, dtype=dtype)


# ------------------------------------------------------------------------------------------- both towers


def load_text_encoders(llava_dir: str | Path, clip_dir: str | Path, cfg: Config, *, llava_params=None,
                       clip_params=None, llava_weights: str | Path | None = None,
                       clip_weights: str | Path | None = None, mesh=None, rules=TEXT_RULES, dtype=None
                       ) -> TextEncoders:
    """Tokenizers and preprocessing from the local model dirs; params given, or read from ``*_weights`` (hcjax
    checkpoint or HF dir; default: the model dirs themselves), cast to ``dtype`` when given (converted HF weights /
    sharded restores). With ``mesh`` the params are placed on it by the logical-axis ``rules``."""
    dtype = None if dtype is None else jnp.dtype(dtype)
    llava_tok = load_llava_tokenizer(llava_dir)
    clip_tok = load_clip_tokenizer(clip_dir)
    boxed = (llava.abstract_params(cfg), clip.abstract_text_params(cfg.clip_text)) if mesh is not None \
        else (None, None)
    targets = [None if b is None else sharding.abstract_sharded(b, mesh, rules, dtype) for b in boxed]
    if llava_params is None:
        llava_params = load_llava_params(llava_weights or llava_dir, cfg, dtype, targets[0])
    if clip_params is None:
        clip_params = load_clip_params(clip_weights or clip_dir, cfg, dtype, targets[1])
    if mesh is not None:   # no-op for params restored straight into their shardings
        llava_params = sharding.shard_params(llava_params, mesh, like=boxed[0], rules=rules)
        clip_params = sharding.shard_params(clip_params, mesh, like=boxed[1], rules=rules)
    return TextEncoders(cfg, llava_params, clip_params, llava_tok, clip_tok, load_image_preprocessor(llava_dir, cfg))
