"""CLIP conversion: the CLIP-L text tower (text_encoder_2) and the CLIP vision tower table used by LLaVA.

Text formats (auto-detected from the key names):

* ``hub``            ``text_model.X`` as in the openai/clip-vit-large-patch14 file (a full ``CLIPModel``
                     checkpoint) and transformers 4.41.2. The other tower and heads of a full ``CLIPModel``
                     (``vision_model.*``, ``visual_projection.weight``, ``text_projection.weight``,
                     ``logit_scale``) and the non-learned ``*.embeddings.position_ids`` buffers of older saves are
                     recognised and deliberately dropped; any other extra key is an error.
* ``transformers5``  ``X``: ``CLIPTextModel.state_dict()`` of transformers 5.x (the manifest's names).

``from_hf(state_dict, cfg)`` -> nested numpy params of :class:`hcjax.conditioning.clip.ClipTextModel`;
``check(shapes, cfg)`` validates names and shapes only. ``vision_rules(cfg, prefix, flax_prefix)`` is the table
of ``CLIPVisionModel`` (reused by ``convert_weights/llava.py``); ``from_hf_vision`` converts a standalone one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from hcjax.checkpoint import save_params
from hcjax.conditioning.clip import abstract_text_params, abstract_vision_params
from hcjax.config import ClipTextConfig, ClipVisionConfig, Config, load_config

from .readers import read_state_dict
from .rules import ConversionError, Rule, apply_rules, check_rules, conv2d, expected_shapes, linear, linear_from, \
    linear_to, reshape_to

FORMATS = ("hub", "transformers5")
TEXT_PREFIX = {"hub": "text_model.", "transformers5": ""}
# Keys a full CLIPModel checkpoint carries besides the text tower (dropped on purpose, never silently others).
_HUB_EXTRA = re.compile(r"^(vision_model\..*|visual_projection\.weight|text_projection\.weight|logit_scale)$")
_BUFFERS = re.compile(r"^(.*\.)?embeddings\.position_ids$")


def _text_cfg(cfg: Config | ClipTextConfig) -> ClipTextConfig:
    return cfg.clip_text if isinstance(cfg, Config) else cfg


# ------------------------------------------------------------------------------------------- tables


def _lin(flax: str, key: str, layers: int, out_shape=None, in_shape=None, bias=True) -> list[Rule]:
    kt = linear_from(*in_shape) if in_shape else linear_to(*out_shape) if out_shape else linear
    rows = [Rule(f"{flax}/kernel", f"{key}.weight", kt, layers)]
    if bias:
        rows.append(Rule(f"{flax}/bias", f"{key}.bias", reshape_to(*out_shape) if out_shape else (lambda b: b),
                         layers))
    return rows


def _ln(flax: str, key: str, layers: int = 0) -> list[Rule]:
    return [Rule(f"{flax}/scale", f"{key}.weight", layers=layers), Rule(f"{flax}/bias", f"{key}.bias", layers=layers)]


def encoder_rules(c: ClipVisionConfig | ClipTextConfig, prefix: str, flax_prefix: str) -> list[Rule]:
    """``{prefix}encoder.layers.{i}.*`` -> ``{flax_prefix}encoder/layers/*`` (stacked)."""
    n = c.num_attention_heads
    k = c.hidden_size // n
    L, f, t = c.num_hidden_layers, f"{flax_prefix}encoder/layers", f"{prefix}encoder.layers.{{i}}"
    rows: list[Rule] = []
    for p in ("q", "k", "v"):
        rows += _lin(f"{f}/self_attn/{p}_proj", f"{t}.self_attn.{p}_proj", L, out_shape=(n, k))
    rows += _lin(f"{f}/self_attn/out_proj", f"{t}.self_attn.out_proj", L, in_shape=(n, k))
    rows += _lin(f"{f}/mlp/fc1", f"{t}.mlp.fc1", L) + _lin(f"{f}/mlp/fc2", f"{t}.mlp.fc2", L)
    rows += _ln(f"{f}/layer_norm1", f"{t}.layer_norm1", L) + _ln(f"{f}/layer_norm2", f"{t}.layer_norm2", L)
    return rows


def vision_rules(c: ClipVisionConfig, prefix: str = "", flax_prefix: str = "") -> list[Rule]:
    """Table of transformers' ``CLIPVisionModel`` (keys under ``prefix``, e.g. ``vision_model.``)."""
    e, fe = f"{prefix}embeddings", f"{flax_prefix}embeddings"
    rows = [
        Rule(f"{fe}/class_embedding", f"{e}.class_embedding"),
        Rule(f"{fe}/patch_embedding/kernel", f"{e}.patch_embedding.weight", conv2d),
        Rule(f"{fe}/position_embedding/embedding", f"{e}.position_embedding.weight"),
    ]
    rows += _ln(f"{flax_prefix}pre_layrnorm", f"{prefix}pre_layrnorm")
    rows += encoder_rules(c, prefix, flax_prefix)
    rows += _ln(f"{flax_prefix}post_layernorm", f"{prefix}post_layernorm")
    return rows


def text_rules(cfg: Config | ClipTextConfig, fmt: str) -> list[Rule]:
    """Table of transformers' ``CLIPTextModel`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown CLIP text checkpoint format {fmt!r}; expected one of {FORMATS}")
    c, p = _text_cfg(cfg), TEXT_PREFIX[fmt]
    rows = [
        Rule("embeddings/token_embedding/embedding", f"{p}embeddings.token_embedding.weight"),
        Rule("embeddings/position_embedding/embedding", f"{p}embeddings.position_embedding.weight"),
    ]
    rows += encoder_rules(c, p, "")
    rows += _ln("final_layer_norm", f"{p}final_layer_norm")
    return rows


# ------------------------------------------------------------------------------------------- formats


def detect_format(keys) -> str:
    keys = set(keys)
    if "text_model.embeddings.token_embedding.weight" in keys:
        return "hub"
    if "embeddings.token_embedding.weight" in keys:
        return "transformers5"
    raise ConversionError("not a CLIP text state dict: neither text_model.embeddings.token_embedding.weight "
                          "(hub / transformers 4.x) nor embeddings.token_embedding.weight (transformers 5.x CLIPTextModel)"
                          " is present")


def dropped_keys(keys, fmt: str) -> list[str]:
    """Keys recognised as not belonging to the text tower (full-CLIPModel extras, position-id buffers)."""
    out = []
    for k in keys:
        if _BUFFERS.match(k) or (fmt == "hub" and _HUB_EXTRA.match(k)):
            out.append(k)
    return out


class _Without(Mapping):
    """A view of a state dict without some keys (lazy; values are read only on access)."""

    def __init__(self, base: Mapping, drop):
        self.base, self.drop = base, set(drop)

    def __getitem__(self, k):
        if k in self.drop:
            raise KeyError(k)
        return self.base[k]

    def __iter__(self):
        return (k for k in self.base if k not in self.drop)

    def __len__(self):
        return len(self.base) - len(self.drop)


def check_layer_shapes(rules, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Every per-layer key of a stacked rule must have the shape of layer 0 (``check_rules`` only sees layer 0)."""
    bad = []
    for r in rules:
        for key in r.keys if r.layers else ():
            first = shapes.get(key.format(i=0))
            for i in range(1, r.layers):
                k = key.format(i=i)
                if first is not None and k in shapes and tuple(shapes[k]) != tuple(first):
                    bad.append(f"{k}: {tuple(shapes[k])}, but layer 0 has {tuple(first)}")
    if bad:
        raise ConversionError(f"{what}: mis-shaped tensors ({len(bad)}): " + "; ".join(bad[:10]))


def _expected_text(c: ClipTextConfig):
    return expected_shapes(abstract_text_params(c))


def _expected_vision(c: ClipVisionConfig):
    return expected_shapes(abstract_vision_params(c))


# ------------------------------------------------------------------------------------------- API


def from_hf(state_dict: Mapping[str, np.ndarray], cfg: Config | ClipTextConfig, fmt: str | None = None,
            dtype=None) -> dict:
    """CLIP text state dict (hub ``text_model.*`` or transformers 5.x names; numpy values) -> hcjax params."""
    c = _text_cfg(cfg)
    fmt = fmt or detect_format(state_dict.keys())
    sd = _Without(state_dict, dropped_keys(state_dict.keys(), fmt))
    return apply_rules(text_rules(c, fmt), sd, _expected_text(c), what=f"CLIP text ({fmt} names)", dtype=dtype)


def check(shapes: Mapping[str, tuple[int, ...]], cfg: Config | ClipTextConfig, fmt: str | None = None
          ) -> dict[str, tuple[int, ...]]:
    """Validate names and shapes only (no tensor data). Returns hcjax path -> shape."""
    c = _text_cfg(cfg)
    fmt = fmt or detect_format(shapes.keys())
    drop = set(dropped_keys(shapes.keys(), fmt))
    shapes = {k: v for k, v in shapes.items() if k not in drop}
    rules, what = text_rules(c, fmt), f"CLIP text ({fmt} names)"
    check_layer_shapes(rules, shapes, what)
    return check_rules(rules, shapes, _expected_text(c), what=what)


def from_hf_vision(state_dict: Mapping[str, np.ndarray], cfg: Config | ClipVisionConfig, prefix: str | None = None,
                   dtype=None) -> dict:
    """A standalone ``CLIPVisionModel`` state dict (``vision_model.X`` or 5.x ``X``) -> hcjax params."""
    c = cfg.clip_vision if isinstance(cfg, Config) else cfg
    if prefix is None:
        prefix = "vision_model." if "vision_model.embeddings.class_embedding" in state_dict else ""
    sd = _Without(state_dict, [k for k in state_dict if _BUFFERS.match(k)])
    return apply_rules(vision_rules(c, prefix), sd, _expected_vision(c), what="CLIP vision", dtype=dtype)


def np_dtype(name: str | None):
    """``--dtype`` name -> numpy dtype (None keeps the checkpoint's dtype)."""
    if name is None:
        return None
    return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name]


def convert_file(args) -> Path:
    """CLI: ``python -m convert_weights clip --src <file|dir> --out <dir>`` (text tower only)."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    sd = read_state_dict(Path(args.src), args.key)
    fmt = args.format or detect_format(sd.keys())
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; expected one of {FORMATS}")
    cfg = load_config(args.config, args.set)
    if args.dtype:
        cfg = dataclasses.replace(cfg, clip_text=dataclasses.replace(cfg.clip_text, param_dtype=args.dtype))
    params = from_hf(sd, cfg.clip_text, fmt, dtype=np_dtype(args.dtype))
    return save_params(out, params, cfg, overwrite=args.overwrite)
