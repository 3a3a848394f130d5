"""VAE conversion: the original ``vae_3d/hyvae_v1_0801/pytorch_model.pt`` or diffusers'
``AutoencoderKLHunyuanVideo`` state dict -> hcjax params of :class:`hcjax.vae.AutoencoderKLCausal3D`.

Both formats use the same tensor names (``hunyuanvideo-vs-diffusers.md`` section 4); the original file stores
them with a ``vae.`` prefix, possibly under a top-level ``state_dict`` key, and the original loader keeps only
the ``vae.``-prefixed keys (others are ignored, as there). The table is generated from the config and is
strict: a missing, unexpected or mis-shaped tensor, or a model parameter no row produces, is an error naming it.
Layouts: Conv3d ``[out, in, kt, kh, kw]`` -> ``[kt, kh, kw, in, out]``; Linear ``[out, in]`` -> ``[in, out]``;
GroupNorm ``weight`` -> ``scale``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from hcjax.checkpoint import save_params
from hcjax.config import Config, VAEConfig, load_config
from hcjax.vae import abstract_params, block_plan, vae_config

from .readers import read_state_dict
from .rules import ConversionError, Rule, apply_rules, check_rules, conv3d, expected_shapes, linear

FORMATS = ("original", "diffusers")
PREFIX = "vae."
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "hunyuancustom_720p.yaml"


# ------------------------------------------------------------------------------------------- table


def _conv(flax: str, key: str) -> list[Rule]:
    """A CausalConv3d (``key.conv.weight``) -> ``flax/conv/kernel``."""
    return [Rule(f"{flax}/conv/kernel", f"{key}.conv.weight", conv3d), Rule(f"{flax}/conv/bias", f"{key}.conv.bias")]


def _norm(flax: str, key: str) -> list[Rule]:
    return [Rule(f"{flax}/scale", f"{key}.weight"), Rule(f"{flax}/bias", f"{key}.bias")]


def _linear(flax: str, key: str) -> list[Rule]:
    return [Rule(f"{flax}/kernel", f"{key}.weight", linear), Rule(f"{flax}/bias", f"{key}.bias")]


def _resnet(flax: str, key: str, cin: int, cout: int) -> list[Rule]:
    rows = _norm(f"{flax}/norm1", f"{key}.norm1") + _conv(f"{flax}/conv1", f"{key}.conv1")
    rows += _norm(f"{flax}/norm2", f"{key}.norm2") + _conv(f"{flax}/conv2", f"{key}.conv2")
    if cin != cout:
        rows += _conv(f"{flax}/conv_shortcut", f"{key}.conv_shortcut")
    return rows


def _mid(flax: str, key: str, ch: int, attention: bool) -> list[Rule]:
    rows = _resnet(f"{flax}/resnets_0", f"{key}.resnets.0", ch, ch)
    if attention:
        a, ak = f"{flax}/attentions_0", f"{key}.attentions.0"
        rows += _norm(f"{a}/group_norm", f"{ak}.group_norm")
        for n in ("to_q", "to_k", "to_v"):
            rows += _linear(f"{a}/{n}", f"{ak}.{n}")
        rows += _linear(f"{a}/to_out_0", f"{ak}.to_out.0")
    return rows + _resnet(f"{flax}/resnets_1", f"{key}.resnets.1", ch, ch)


def rules(cfg: Config | VAEConfig) -> list[Rule]:
    """The conversion table (identical names in the original and diffusers formats)."""
    c = vae_config(cfg)
    boc = list(c.block_out_channels)
    down, up = block_plan(c)
    rows = _conv("encoder/conv_in", "encoder.conv_in")
    prev = boc[0]
    for i, (ch, (ft, fs)) in enumerate(zip(boc, down)):
        for j in range(c.layers_per_block):
            cin = prev if j == 0 else ch
            rows += _resnet(f"encoder/down_blocks_{i}/resnets_{j}", f"encoder.down_blocks.{i}.resnets.{j}", cin, ch)
        if ft > 1 or fs > 1:
            rows += _conv(f"encoder/down_blocks_{i}/downsamplers_0/conv",
                          f"encoder.down_blocks.{i}.downsamplers.0.conv")
        prev = ch
    rows += _mid("encoder/mid_block", "encoder.mid_block", boc[-1], c.mid_block_add_attention)
    rows += _norm("encoder/conv_norm_out", "encoder.conv_norm_out") + _conv("encoder/conv_out", "encoder.conv_out")

    rev = boc[::-1]
    rows += _conv("decoder/conv_in", "decoder.conv_in")
    rows += _mid("decoder/mid_block", "decoder.mid_block", rev[0], c.mid_block_add_attention)
    prev = rev[0]
    for i, (ch, (ft, fs)) in enumerate(zip(rev, up)):
        for j in range(c.layers_per_block + 1):
            cin = prev if j == 0 else ch
            rows += _resnet(f"decoder/up_blocks_{i}/resnets_{j}", f"decoder.up_blocks.{i}.resnets.{j}", cin, ch)
        if ft > 1 or fs > 1:
            rows += _conv(f"decoder/up_blocks_{i}/upsamplers_0/conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
        prev = ch
    rows += _norm("decoder/conv_norm_out", "decoder.conv_norm_out") + _conv("decoder/conv_out", "decoder.conv_out")
    rows += [Rule("quant_conv/kernel", "quant_conv.weight", conv3d), Rule("quant_conv/bias", "quant_conv.bias"),
             Rule("post_quant_conv/kernel", "post_quant_conv.weight", conv3d),
             Rule("post_quant_conv/bias", "post_quant_conv.bias")]
    return rows


def expected(cfg: Config | VAEConfig) -> dict[str, tuple[int, ...]]:
    """Flat parameter path -> shape of the model built from ``cfg`` (``jax.eval_shape``, cached per config)."""
    return dict(_expected(vae_config(cfg)))


@functools.lru_cache(maxsize=8)
def _expected(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    return expected_shapes(abstract_params(cfg))


# ------------------------------------------------------------------------------------------- original layout


def _strip_original(state_dict: Mapping) -> Mapping:
    """Unwrap a top-level ``state_dict`` entry and keep/strip the ``vae.`` keys (the original loader's rule).
    A mapping without any ``vae.`` key is taken as already stripped."""
    inner = _raw(state_dict, "state_dict")
    if isinstance(inner, Mapping):
        state_dict = type(state_dict)(inner) if _is_lazy(state_dict) else inner
    keys = [k for k in state_dict if isinstance(k, str) and k.startswith(PREFIX)]
    if not keys:
        return state_dict
    return _Renamed(state_dict, {k[len(PREFIX):]: k for k in keys})


def _raw(sd: Mapping, key: str):
    """The un-converted value or None (lazy readers convert tensors on access, which a nested dict must
    not go through; ``Mapping.__contains__`` would)."""
    base = getattr(sd, "tensors", None)
    base = sd if base is None else base
    return base[key] if key in set(base.keys()) else None


def _is_lazy(sd: Mapping) -> bool:
    return getattr(sd, "tensors", None) is not None


class _Renamed(Mapping):
    def __init__(self, base: Mapping, names: dict[str, str]):
        self.base, self.names = base, names

    def __getitem__(self, k):
        return self.base[self.names[k]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def _strip_shapes(shapes: Mapping) -> Mapping:
    keys = [k for k in shapes if k.startswith(PREFIX)]
    return {k[len(PREFIX):]: shapes[k] for k in keys} if keys else dict(shapes)


# ------------------------------------------------------------------------------------------- entry points


def from_original(state_dict: Mapping, cfg: Config | VAEConfig, dtype=None) -> dict:
    """Original ``pytorch_model.pt`` contents (``vae.``-prefixed, optionally under ``state_dict``) -> params."""
    return apply_rules(rules(cfg), _strip_original(state_dict), expected(cfg), what="VAE (original)", dtype=dtype)


def from_diffusers(state_dict: Mapping, cfg: Config | VAEConfig, dtype=None) -> dict:
    """diffusers ``AutoencoderKLHunyuanVideo.state_dict()`` (name -> numpy array) -> params."""
    return apply_rules(rules(cfg), state_dict, expected(cfg), what="VAE (diffusers)", dtype=dtype)


def check(shapes: Mapping, cfg: Config | VAEConfig, fmt: str = "original") -> dict[str, tuple[int, ...]]:
    """Validate tensor names/shapes (e.g. a manifest's ``params``) against the table without any data."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown VAE format {fmt!r}; expected one of {FORMATS}")
    if fmt == "original":
        shapes = _strip_shapes(shapes)
    return check_rules(rules(cfg), shapes, expected(cfg), what=f"VAE ({fmt})")


def detect_format(keys) -> str:
    keys = list(keys)
    if "state_dict" in keys or any(k.startswith(PREFIX) for k in keys):
        return "original"
    return "diffusers"


def convert_file(args) -> Path:
    """CLI: ``python -m convert_weights vae --src FILE --out DIR [--format] [--config] [--set] [--dtype]``."""
    cfg = load_config(args.config if args.config else DEFAULT_CONFIG, args.set)
    src = Path(args.src)
    if not src.exists():
        raise FileNotFoundError(f"VAE checkpoint not found: {src}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"output {out} already exists; choose another path or pass --overwrite")
    sd = read_state_dict(src, key=args.key)
    fmt = args.format or detect_format(sd.keys())
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not a VAE format; expected one of {FORMATS}")
    dtype = np.dtype(args.dtype) if args.dtype else None
    if args.dtype == "bfloat16":
        dtype = ml_dtypes.bfloat16
    try:
        params = (from_original if fmt == "original" else from_diffusers)(sd, cfg, dtype=dtype)
    except ConversionError as e:
        raise ValueError(f"{src}: not a VAE checkpoint matching {args.config or DEFAULT_CONFIG} "
                         f"(format {fmt}):\n{e}") from None
    return save_params(out, params, cfg, overwrite=args.overwrite)
