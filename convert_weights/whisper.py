"""Whisper-tiny encoder conversion: transformers names -> hcjax ``WhisperEncoder`` params.

Accepted sources: a ``WhisperModel`` state dict (``encoder.*``, the names of the manifest
``whisper-tiny_encoder.json``), the hub's ``WhisperForConditionalGeneration`` file (``model.encoder.*``; the
decoder, ``model.decoder.*`` and ``proj_out.*``, is not used by HunyuanCustom and is skipped), or a bare
``WhisperEncoder`` state dict (``conv1.weight`` ...). Encoder tensors are matched strictly: a missing,
unexpected or mis-shaped one is an error naming it.

CLI: ``python -m convert_weights whisper --src whisper-tiny/ --out ckpt/whisper`` (``--src`` is the folder with
``model.safetensors`` or ``pytorch_model.bin``, or the file itself).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from hcjax.checkpoint import save_params
from hcjax.conditioning.whisper import abstract_params
from hcjax.config import PRESET_DIR, Config, WhisperConfig, load_config

from .readers import read_state_dict
from .rules import ConversionError, Rule, apply_rules, check_rules, conv1d, expected_shapes, linear, linear_from, \
    linear_to, reshape_to

PREFIXES = ("model.encoder.", "encoder.", "")
DECODER_PREFIXES = ("model.decoder.", "decoder.", "proj_out.")


def _wcfg(cfg: Config | WhisperConfig) -> WhisperConfig:
    return cfg.whisper if isinstance(cfg, Config) else cfg


def rules(cfg: Config | WhisperConfig) -> list[Rule]:
    """Rows keyed by the manifest names (``encoder.*``)."""
    c = _wcfg(cfg)
    n, k = c.encoder_attention_heads, c.d_model // c.encoder_attention_heads
    e = "encoder"
    rows = [
        Rule("conv1/kernel", f"{e}.conv1.weight", conv1d), Rule("conv1/bias", f"{e}.conv1.bias"),
        Rule("conv2/kernel", f"{e}.conv2.weight", conv1d), Rule("conv2/bias", f"{e}.conv2.bias"),
        Rule("embed_positions/embedding", f"{e}.embed_positions.weight"),
        Rule("layer_norm/scale", f"{e}.layer_norm.weight"), Rule("layer_norm/bias", f"{e}.layer_norm.bias"),
    ]
    for i in range(c.encoder_layers):
        f, t = f"layers_{i}", f"{e}.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj"):
            rows.append(Rule(f"{f}/self_attn/{name}/kernel", f"{t}.self_attn.{name}.weight", linear_to(n, k)))
            if name != "k_proj":
                rows.append(Rule(f"{f}/self_attn/{name}/bias", f"{t}.self_attn.{name}.bias", reshape_to(n, k)))
        rows += [
            Rule(f"{f}/self_attn/out_proj/kernel", f"{t}.self_attn.out_proj.weight", linear_from(n, k)),
            Rule(f"{f}/self_attn/out_proj/bias", f"{t}.self_attn.out_proj.bias"),
        ]
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            rows += [Rule(f"{f}/{ln}/scale", f"{t}.{ln}.weight"), Rule(f"{f}/{ln}/bias", f"{t}.{ln}.bias")]
        for fc in ("fc1", "fc2"):
            rows += [Rule(f"{f}/{fc}/kernel", f"{t}.{fc}.weight", linear), Rule(f"{f}/{fc}/bias", f"{t}.{fc}.bias")]
    return rows


def _normalise(keys) -> dict[str, str]:
    """Map manifest-style names (``encoder.*``) to the source's keys; skip decoder tensors; strict otherwise."""
    keys = list(keys)
    prefix = next((p for p in PREFIXES if f"{p}conv1.weight" in keys), None)
    if prefix is None:
        raise ConversionError("not a Whisper state dict: none of model.encoder.conv1.weight, encoder.conv1.weight, "
                              "conv1.weight is present")
    out: dict[str, str] = {}
    for key in keys:
        if key.startswith(DECODER_PREFIXES) and not key.startswith(prefix or "\0"):
            continue                                    # the decoder is not used by HunyuanCustom
        name = f"encoder.{key[len(prefix):]}" if key.startswith(prefix) else key
        out[name] = key
    return out


class _Renamed(Mapping):
    def __init__(self, sd: Mapping, names: dict[str, str]):
        self.sd, self.names = sd, names

    def __getitem__(self, k):
        return self.sd[self.names[k]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def _expected(c: WhisperConfig) -> dict[str, tuple[int, ...]]:
    return expected_shapes(abstract_params(c))


def convert(state_dict: Mapping[str, np.ndarray], cfg: Config | WhisperConfig, dtype=None) -> dict:
    """transformers Whisper state dict (name -> numpy) -> nested hcjax params for ``WhisperEncoder``."""
    c = _wcfg(cfg)
    sd = _Renamed(state_dict, _normalise(state_dict.keys()))
    return apply_rules(rules(c), sd, _expected(c), what="Whisper encoder", dtype=dtype)


def check(shapes: Mapping[str, tuple[int, ...]], cfg: Config | WhisperConfig) -> dict[str, tuple[int, ...]]:
    """Names/shapes only (e.g. the manifest): returns hcjax path -> shape."""
    c = _wcfg(cfg)
    names = _normalise(shapes.keys())
    return check_rules(rules(c), {k: shapes[v] for k, v in names.items()}, _expected(c), what="Whisper encoder")


def _source_file(src: Path) -> Path:
    if src.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (src / name).is_file():
                return src / name
        raise FileNotFoundError(f"{src}: no model.safetensors or pytorch_model.bin in this Whisper directory")
    if not src.exists():
        raise FileNotFoundError(f"Whisper checkpoint not found: {src}")
    return src


def convert_file(args) -> Path:
    """CLI entry: read ``--src``, convert with the ``whisper`` section of ``--config`` (default: the audio preset)."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    src = _source_file(Path(args.src))
    if args.format not in (None, "hf"):
        raise ValueError(f"--format {args.format!r}: the Whisper converter reads transformers ('hf') names only")
    cfg = load_config(args.config or PRESET_DIR / "hunyuancustom_720p_audio.yaml", args.set)
    if args.dtype:
        cfg = dataclasses.replace(cfg, whisper=dataclasses.replace(cfg.whisper, param_dtype=args.dtype))
    sd = read_state_dict(src, args.key) if args.key else read_state_dict(src)
    dtype = None
    if args.dtype:
        dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[args.dtype]
    try:
        params = convert(sd, cfg.whisper, dtype=dtype)
    except ConversionError as e:
        raise ConversionError(f"{src}: {e}") from None
    return save_params(out, params, cfg, overwrite=args.overwrite)
