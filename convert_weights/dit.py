"""DiT conversion: the original HunyuanCustom/HunyuanVideo checkpoint or diffusers' transformer -> hcjax params.

``from_original(state_dict, cfg, fp8_scales=None)`` and ``from_diffusers(state_dict, cfg)`` return a nested
numpy params dict; ``check(shapes, cfg, fmt)`` validates names and shapes only (a 13B manifest in about a second).
Every table row is strict: a missing, unexpected or mis-shaped tensor, or a parameter no row produces, is an error
naming it. The variant (image / audio / editing, guidance) is read from the key names and must match the config.

fp8 release (spec section 7, "fp8 variant"): ``mp_rank_00_model_states_fp8.pt`` holds float8_e4m3fn weights for
the Linears of the double/single blocks, and ``mp_rank_00_model_states_fp8_map.pt`` holds
``{'module': {layer_name: scale}}``. Each such weight is de-quantised on load as ``bf16(W_fp8) * bf16(scale)``
(product rounded to bf16), then cast like every other tensor. ``read_original(path)`` opens a checkpoint and,
if it holds float8 tensors, its map (``X.pt`` -> ``X_map.pt``); ``find_original_dit(folder)`` picks the bf16 or
the fp8 file of a released variant folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from hcjax.checkpoint import save_params
from hcjax.config import PRESET_DIR, Config, DiTConfig, load_config
from hcjax.dit import abstract_params

from .readers import float8_keys, read_state_dict, torch_to_numpy
from .rules import (
    ConversionError, Rule, _format_list, apply_rules, check_rules, concat, conv3d, expected_shapes, linear,
    linear_from, linear_to, reshape_to,
)

FORMATS = ("original", "diffusers")


def _dit_cfg(cfg: Config | DiTConfig) -> DiTConfig:
    return cfg.dit if isinstance(cfg, Config) else cfg


# ------------------------------------------------------------------------------------------- row helpers


def _lin(flax: str, key: str, out_shape=None, layers=0, bias=True, in_shape=None) -> list[Rule]:
    """A torch Linear ``key.weight/.bias`` -> ``flax/kernel`` (+ ``flax/bias``) with optional reshapes."""
    if in_shape:
        kt = linear_from(*in_shape)
    elif out_shape:
        kt = linear_to(*out_shape)
    else:
        kt = linear
    rows = [Rule(f"{flax}/kernel", f"{key}.weight", kt, layers)]
    if bias:
        rows.append(Rule(f"{flax}/bias", f"{key}.bias", reshape_to(*out_shape) if out_shape else (lambda b: b),
                         layers))
    return rows


def _fused(flax: str, keys: tuple[str, ...], out_shape, layers=0, bias=True) -> list[Rule]:
    """Several torch Linears (e.g. diffusers to_q/to_k/to_v) fused on the output axis into one kernel."""

    def kernel(*ws):
        return concat(list(ws), axis=0).T.reshape(ws[0].shape[1], *out_shape)

    rows = [Rule(f"{flax}/kernel", tuple(f"{k}.weight" for k in keys), kernel, layers)]
    if bias:
        rows.append(Rule(f"{flax}/bias", tuple(f"{k}.bias" for k in keys),
                         lambda *bs: concat(list(bs), axis=0).reshape(*out_shape), layers))
    return rows


def _norm(flax: str, key: str, layers=0, bias=True) -> list[Rule]:
    rows = [Rule(f"{flax}/scale", f"{key}.weight", layers=layers)]
    if bias:
        rows.append(Rule(f"{flax}/bias", f"{key}.bias", layers=layers))
    return rows


def _patch(flax: str, key: str) -> list[Rule]:
    return [Rule(f"{flax}/proj/kernel", f"{key}.weight", conv3d), Rule(f"{flax}/proj/bias", f"{key}.bias")]


def _swap_halves(w):
    h = w.shape[0] // 2
    return concat([w[h:], w[:h]], axis=0)


# ------------------------------------------------------------------------------------------- tables


def _extras_original(c: DiTConfig) -> list[Rule]:
    """HunyuanCustom-only groups (same names in both formats: diffusers has no counterpart)."""
    d = c.hidden_size
    rows: list[Rule] = []
    if c.video_condition:
        rows += _patch("bg_in", "bg_in.proj") + _lin("bg_proj", "bg_proj")
    if c.audio_condition:
        heads, dh = c.audio_ca_heads, c.audio_ca_dim_hidden // c.audio_ca_heads
        rows += _lin("audio_proj/proj1", "audio_proj.proj1") + _lin("audio_proj/proj2", "audio_proj.proj2")
        rows += _lin("audio_proj/proj3", "audio_proj.proj3", out_shape=(c.audio_context_tokens, d))
        rows += _norm("audio_proj/norm", "audio_proj.norm")
        for i in range(len(c.audio_inject_blocks)):
            f, k = f"audio_models_{i}", f"audio_models.{i}"
            rows += _norm(f"{f}/norm1", f"{k}.norm1") + _norm(f"{f}/norm2", f"{k}.norm2")
            rows += _lin(f"{f}/to_q", f"{k}.to_q", out_shape=(heads, dh), bias=False)
            rows += _lin(f"{f}/to_kv", f"{k}.to_kv", out_shape=(2, heads, dh), bias=False)
            rows += _lin(f"{f}/to_out", f"{k}.to_out", in_shape=(heads, dh), bias=False)
    return rows


def original_rules(cfg: Config | DiTConfig) -> list[Rule]:
    c = _dit_cfg(cfg)
    d, n, k, f = c.hidden_size, c.num_heads, c.head_dim, c.mlp_hidden
    qkv = (3, n, k)
    rows = _patch("img_in", "img_in.proj")
    rows += _lin("time_in/mlp_0", "time_in.mlp.0") + _lin("time_in/mlp_2", "time_in.mlp.2")
    rows += _lin("vector_in/in_layer", "vector_in.in_layer") + _lin("vector_in/out_layer", "vector_in.out_layer")
    if c.guidance_embed:
        rows += _lin("guidance_in/mlp_0", "guidance_in.mlp.0") + _lin("guidance_in/mlp_2", "guidance_in.mlp.2")
    # token refiner
    rows += _lin("txt_in/input_embedder", "txt_in.input_embedder")
    rows += _lin("txt_in/t_embedder/mlp_0", "txt_in.t_embedder.mlp.0")
    rows += _lin("txt_in/t_embedder/mlp_2", "txt_in.t_embedder.mlp.2")
    rows += _lin("txt_in/c_embedder/linear_1", "txt_in.c_embedder.linear_1")
    rows += _lin("txt_in/c_embedder/linear_2", "txt_in.c_embedder.linear_2")
    r, rk, L = "txt_in/individual_token_refiner", "txt_in.individual_token_refiner.blocks.{i}", c.refiner_depth
    rows += _norm(f"{r}/norm1", f"{rk}.norm1", L) + _norm(f"{r}/norm2", f"{rk}.norm2", L)
    rows += _lin(f"{r}/self_attn_qkv", f"{rk}.self_attn_qkv", qkv, L, bias=c.qkv_bias)
    rows += _lin(f"{r}/self_attn_proj", f"{rk}.self_attn_proj", layers=L, in_shape=(n, k))
    rows += _lin(f"{r}/mlp/fc1", f"{rk}.mlp.fc1", layers=L) + _lin(f"{r}/mlp/fc2", f"{rk}.mlp.fc2", layers=L)
    rows += _lin(f"{r}/adaLN_modulation/linear", f"{rk}.adaLN_modulation.1", (2, d), L)
    # double blocks
    L, b = c.depth_double_blocks, "double_blocks.{i}"
    for s in ("img", "txt"):
        rows += _lin(f"double_blocks/{s}_mod/linear", f"{b}.{s}_mod.linear", (6, d), L)
        rows += _lin(f"double_blocks/{s}_attn_qkv", f"{b}.{s}_attn_qkv", qkv, L, bias=c.qkv_bias)
        rows += _norm(f"double_blocks/{s}_attn_q_norm", f"{b}.{s}_attn_q_norm", L, bias=False)
        rows += _norm(f"double_blocks/{s}_attn_k_norm", f"{b}.{s}_attn_k_norm", L, bias=False)
        rows += _lin(f"double_blocks/{s}_attn_proj", f"{b}.{s}_attn_proj", layers=L, in_shape=(n, k))
        rows += _lin(f"double_blocks/{s}_mlp/fc1", f"{b}.{s}_mlp.fc1", layers=L)
        rows += _lin(f"double_blocks/{s}_mlp/fc2", f"{b}.{s}_mlp.fc2", layers=L)
    # single blocks: linear1 -> (qkv, mlp) rows; linear2 -> (attn, mlp) columns
    L, b = c.depth_single_blocks, "single_blocks.{i}"
    rows += [
        Rule("single_blocks/linear1_qkv/kernel", f"{b}.linear1.weight", lambda w: w[: 3 * d].T.reshape(d, *qkv), L),
        Rule("single_blocks/linear1_qkv/bias", f"{b}.linear1.bias", lambda w: w[: 3 * d].reshape(qkv), L),
        Rule("single_blocks/linear1_mlp/kernel", f"{b}.linear1.weight", lambda w: w[3 * d :].T, L),
        Rule("single_blocks/linear1_mlp/bias", f"{b}.linear1.bias", lambda w: w[3 * d :], L),
        Rule("single_blocks/linear2_attn/kernel", f"{b}.linear2.weight", lambda w: w[:, :d].T.reshape(n, k, d), L),
        Rule("single_blocks/linear2_mlp/kernel", f"{b}.linear2.weight", lambda w: w[:, d:].T, L),
        Rule("single_blocks/linear2_mlp/bias", f"{b}.linear2.bias", layers=L),
    ]
    rows += _norm("single_blocks/q_norm", f"{b}.q_norm", L, bias=False)
    rows += _norm("single_blocks/k_norm", f"{b}.k_norm", L, bias=False)
    rows += _lin("single_blocks/modulation/linear", f"{b}.modulation.linear", (3, d), L)
    rows += _lin("final_layer/adaLN_modulation/linear", "final_layer.adaLN_modulation.1", (2, d))
    rows += _lin("final_layer/linear", "final_layer.linear")
    return rows + _extras_original(c)


def diffusers_rules(cfg: Config | DiTConfig) -> list[Rule]:
    c = _dit_cfg(cfg)
    d, n, k = c.hidden_size, c.num_heads, c.head_dim
    qkv = (3, n, k)
    rows = _patch("img_in", "x_embedder.proj")
    te = "time_text_embed"
    rows += _lin("time_in/mlp_0", f"{te}.timestep_embedder.linear_1")
    rows += _lin("time_in/mlp_2", f"{te}.timestep_embedder.linear_2")
    rows += _lin("vector_in/in_layer", f"{te}.text_embedder.linear_1")
    rows += _lin("vector_in/out_layer", f"{te}.text_embedder.linear_2")
    if c.guidance_embed:
        rows += _lin("guidance_in/mlp_0", f"{te}.guidance_embedder.linear_1")
        rows += _lin("guidance_in/mlp_2", f"{te}.guidance_embedder.linear_2")
    ce = "context_embedder"
    rows += _lin("txt_in/input_embedder", f"{ce}.proj_in")
    rows += _lin("txt_in/t_embedder/mlp_0", f"{ce}.time_text_embed.timestep_embedder.linear_1")
    rows += _lin("txt_in/t_embedder/mlp_2", f"{ce}.time_text_embed.timestep_embedder.linear_2")
    rows += _lin("txt_in/c_embedder/linear_1", f"{ce}.time_text_embed.text_embedder.linear_1")
    rows += _lin("txt_in/c_embedder/linear_2", f"{ce}.time_text_embed.text_embedder.linear_2")
    r, rk, L = "txt_in/individual_token_refiner", f"{ce}.token_refiner.refiner_blocks.{{i}}", c.refiner_depth
    rows += _norm(f"{r}/norm1", f"{rk}.norm1", L) + _norm(f"{r}/norm2", f"{rk}.norm2", L)
    rows += _fused(f"{r}/self_attn_qkv", (f"{rk}.attn.to_q", f"{rk}.attn.to_k", f"{rk}.attn.to_v"), qkv, L,
                   bias=c.qkv_bias)
    rows += _lin(f"{r}/self_attn_proj", f"{rk}.attn.to_out.0", layers=L, in_shape=(n, k))
    rows += _lin(f"{r}/mlp/fc1", f"{rk}.ff.net.0.proj", layers=L) + _lin(f"{r}/mlp/fc2", f"{rk}.ff.net.2", layers=L)
    rows += _lin(f"{r}/adaLN_modulation/linear", f"{rk}.norm_out.linear", (2, d), L)
    L, b = c.depth_double_blocks, "transformer_blocks.{i}"
    names = {
        "img": dict(mod="norm1", q="attn.to_q", k="attn.to_k", v="attn.to_v", qn="attn.norm_q", kn="attn.norm_k",
                    proj="attn.to_out.0", ff="ff"),
        "txt": dict(mod="norm1_context", q="attn.add_q_proj", k="attn.add_k_proj", v="attn.add_v_proj",
                    qn="attn.norm_added_q", kn="attn.norm_added_k", proj="attn.to_add_out", ff="ff_context"),
    }
    for s, m in names.items():
        rows += _lin(f"double_blocks/{s}_mod/linear", f"{b}.{m['mod']}.linear", (6, d), L)
        rows += _fused(f"double_blocks/{s}_attn_qkv", (f"{b}.{m['q']}", f"{b}.{m['k']}", f"{b}.{m['v']}"), qkv, L,
                       bias=c.qkv_bias)
        rows += _norm(f"double_blocks/{s}_attn_q_norm", f"{b}.{m['qn']}", L, bias=False)
        rows += _norm(f"double_blocks/{s}_attn_k_norm", f"{b}.{m['kn']}", L, bias=False)
        rows += _lin(f"double_blocks/{s}_attn_proj", f"{b}.{m['proj']}", layers=L, in_shape=(n, k))
        rows += _lin(f"double_blocks/{s}_mlp/fc1", f"{b}.{m['ff']}.net.0.proj", layers=L)
        rows += _lin(f"double_blocks/{s}_mlp/fc2", f"{b}.{m['ff']}.net.2", layers=L)
    L, b = c.depth_single_blocks, "single_transformer_blocks.{i}"
    rows += _fused("single_blocks/linear1_qkv", (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"), qkv, L,
                   bias=c.qkv_bias)
    rows += _lin("single_blocks/linear1_mlp", f"{b}.proj_mlp", layers=L)
    rows += [
        Rule("single_blocks/linear2_attn/kernel", f"{b}.proj_out.weight", lambda w: w[:, :d].T.reshape(n, k, d), L),
        Rule("single_blocks/linear2_mlp/kernel", f"{b}.proj_out.weight", lambda w: w[:, d:].T, L),
        Rule("single_blocks/linear2_mlp/bias", f"{b}.proj_out.bias", layers=L),
    ]
    rows += _norm("single_blocks/q_norm", f"{b}.attn.norm_q", L, bias=False)
    rows += _norm("single_blocks/k_norm", f"{b}.attn.norm_k", L, bias=False)
    rows += _lin("single_blocks/modulation/linear", f"{b}.norm.linear", (3, d), L)
    rows += [
        Rule("final_layer/adaLN_modulation/linear/kernel", "norm_out.linear.weight",
             lambda w: _swap_halves(w).T.reshape(d, 2, d)),
        Rule("final_layer/adaLN_modulation/linear/bias", "norm_out.linear.bias",
             lambda w: _swap_halves(w).reshape(2, d)),
    ]
    rows += _lin("final_layer/linear", "proj_out")
    return rows + _extras_original(c)


# ------------------------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
    audio: bool
    editing: bool
    guidance: bool

    @property
    def name(self) -> str:
        return "audio" if self.audio else "editing" if self.editing else "image"


def detect_variant(keys, fmt: str) -> Variant:
    keys = set(keys)
    guidance_key = "guidance_in.mlp.0.weight" if fmt == "original" else \
        "time_text_embed.guidance_embedder.linear_1.weight"
    return Variant(audio="audio_proj.proj1.weight" in keys, editing="bg_in.proj.weight" in keys,
                   guidance=guidance_key in keys)


def _check_variant(keys, cfg: DiTConfig, fmt: str) -> None:
    v = detect_variant(keys, fmt)
    problems = []
    if v.audio != cfg.audio_condition:
        problems.append(f"the state dict is {'' if v.audio else 'not '}the audio variant (audio_proj.*) but the "
                        f"config has audio_condition={cfg.audio_condition}")
    if v.editing != cfg.video_condition:
        problems.append(f"the state dict is {'' if v.editing else 'not '}the editing variant (bg_in.*) but the "
                        f"config has video_condition={cfg.video_condition}")
    if v.guidance != cfg.guidance_embed:
        problems.append(f"the state dict {'has' if v.guidance else 'has no'} guidance embedding but the config "
                        f"has guidance_embed={cfg.guidance_embed}")
    if problems:
        raise ConversionError("wrong DiT variant: " + "; ".join(problems) +
                              f" (detected variant: {v.name}{', guidance' if v.guidance else ''})")


def _rules(cfg: DiTConfig, fmt: str) -> list[Rule]:
    if fmt == "original":
        return original_rules(cfg)
    if fmt == "diffusers":
        return diffusers_rules(cfg)
    raise ValueError(f"unknown DiT checkpoint format {fmt!r}; expected one of {FORMATS}")


def _expected(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    return expected_shapes(abstract_params(cfg))


# ------------------------------------------------------------------------------------------- fp8 release

ORIGINAL_DIT_FILE = "mp_rank_00_model_states.pt"
ORIGINAL_DIT_FP8_FILE = "mp_rank_00_model_states_fp8.pt"


def fp8_map_path(path: str | Path) -> Path:
    """The original's naming of the scale map beside an fp8 checkpoint: ``X.pt`` -> ``X_map.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_map{path.suffix}")


def find_original_dit(folder: str | Path) -> Path:
    """The DiT file of a released variant folder: the bf16 file if present, else the fp8 one."""
    folder = Path(folder)
    for name in (ORIGINAL_DIT_FILE, ORIGINAL_DIT_FP8_FILE):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no DiT checkpoint; expected {ORIGINAL_DIT_FILE} or {ORIGINAL_DIT_FP8_FILE} "
                            f"(+ {fp8_map_path(ORIGINAL_DIT_FP8_FILE).name})")


def dequantize_fp8(weight, scale) -> np.ndarray:
    """``bf16(W_fp8) * bf16(scale)`` with the product rounded to bf16, as the original's fp8 Linear does.

    float8 -> fp32 is exact and the product of an fp8 and a bf16 value is exact in fp32 (12 significant bits),
    so one fp32 multiply followed by one round-to-nearest-even to bf16 gives the correctly rounded bf16 product.
    """
    s = np.asarray(scale)
    if s.size != 1:
        raise ValueError(f"an fp8 scale must be a single number, got shape {s.shape}")
    s32 = s.reshape(()).astype(ml_dtypes.bfloat16).astype(np.float32)
    return (np.asarray(weight).astype(np.float32) * s32).astype(ml_dtypes.bfloat16)


def _scale_array(value) -> np.ndarray:
    if isinstance(value, (np.ndarray, np.generic, float, int)):
        return np.asarray(value)
    return torch_to_numpy(value)  # torch tensors from a caller's own torch.load


def _in(mapping) -> str:
    path = getattr(mapping, "path", None)
    return f" in {path}" if path is not None else ""


def _fp8_scale_table(state: Mapping, fp8_scales: Mapping | None) -> dict[str, np.ndarray]:
    """Weight key -> scale for every float8 tensor of ``state``; strict in both directions."""
    f8 = float8_keys(state)
    src, msrc = _in(state), _in(fp8_scales) if fp8_scales is not None else ""
    if not f8:
        if fp8_scales:
            raise ConversionError(_format_list(f"an fp8 scale map{msrc} was given but the state dict{src} holds no "
                                               f"float8 tensors; scales for layers", sorted(fp8_scales)))
        return {}
    if fp8_scales is None:
        path = getattr(state, "path", None)
        where = f"its scale map {fp8_map_path(path)}" if path is not None else "the fp8 scale map ('module' dict)"
        raise ConversionError(_format_list(f"float8 tensors{src} but no scales were given (need {where})", f8))
    layers = {k[: -len(".weight")]: k for k in f8 if k.endswith(".weight")}
    problems = []
    odd = [k for k in f8 if not k.endswith(".weight")]
    if odd:
        problems.append(_format_list(f"float8 tensors{src} that are not Linear weights (the fp8 release quantises "
                                     f"weights only)", odd))
    missing = [layer for layer in layers if layer not in fp8_scales]
    if missing:
        problems.append(_format_list(f"float8 weights{src} with no scale in the fp8 map{msrc}: layers", missing))
    unused = sorted(set(fp8_scales) - set(layers))
    if unused:
        problems.append(_format_list(f"scales in the fp8 map{msrc} for layers that hold no float8 weight{src}",
                                     unused))
    table = {}
    for layer, key in layers.items():
        if layer in fp8_scales:
            scale = _scale_array(fp8_scales[layer])
            if scale.size != 1:
                problems.append(f"fp8 scale of layer {layer}{msrc} has shape {scale.shape}; expected one number")
            table[key] = scale
    if problems:
        raise ConversionError("\n".join(problems))
    return table


class _Dequantized(Mapping):
    """``state`` seen with each float8 weight de-quantised (on access, one tensor at a time)."""

    def __init__(self, state: Mapping, scales: Mapping[str, np.ndarray]):
        self.state, self.scales = state, scales
        self.path = getattr(state, "path", None)

    def __getitem__(self, key):
        w = self.state[key]
        return dequantize_fp8(w, self.scales[key]) if key in self.scales else w

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)


def read_original(path: str | Path, fp8_map: str | Path | None = None, key: str | None = None):
    """Open a DiT checkpoint lazily -> ``(state, fp8_scales or None)``.

    ``state``: the ``module`` dict of a ``.pt`` file (``key`` to choose another; weights_only, mmap) or a
    safetensors file/directory. If it holds float8 tensors, ``fp8_scales`` is the ``module`` dict of ``fp8_map``
    (default: ``X_map.pt`` beside ``X.pt``, the original's naming); a missing map is an error naming the file.
    """
    path = Path(path)
    state = open_state_dict(path, key)
    f8 = float8_keys(state)
    if fp8_map is not None:
        fp8_map = Path(fp8_map)
        if not f8:
            raise ValueError(f"an fp8 scale map ({fp8_map}) was given but {path} holds no float8 tensors")
        if not fp8_map.is_file():
            raise FileNotFoundError(f"fp8 scale map not found: {fp8_map}")
    elif not f8:
        return state, None
    else:
        fp8_map = fp8_map_path(path)
        if not fp8_map.is_file():
            raise FileNotFoundError(f"{path} holds {len(f8)} float8 tensors but its scale map {fp8_map} does not "
                                    f"exist (put it beside the checkpoint or name it with --fp8-map)")
    return state, read_state_dict(fp8_map, "module")


# ------------------------------------------------------------------------------------------- API


def convert(state_dict: Mapping[str, np.ndarray], cfg: Config | DiTConfig, fmt: str, dtype=None,
            fp8_scales: Mapping | None = None) -> dict:
    c = _dit_cfg(cfg)
    _check_variant(state_dict.keys(), c, fmt)
    scales = _fp8_scale_table(state_dict, fp8_scales)
    if scales:
        state_dict = _Dequantized(state_dict, scales)
    return apply_rules(_rules(c, fmt), state_dict, _expected(c), what=f"DiT ({fmt} format)", dtype=dtype)


def from_original(state_dict: Mapping[str, np.ndarray], cfg: Config | DiTConfig, fp8_scales: Mapping | None = None,
                  dtype=None) -> dict:
    """Original HunyuanCustom state dict (``torch.load(...)['module']``, name -> numpy) -> hcjax params.

    ``fp8_scales``: for the fp8 release, the map file's ``module`` dict (layer name -> 0-d scale); every float8
    weight is de-quantised (:func:`dequantize_fp8`). float8 tensors without scales, or unused scales, are errors.
    """
    return convert(state_dict, cfg, "original", dtype, fp8_scales)


def from_diffusers(state_dict: Mapping[str, np.ndarray], cfg: Config | DiTConfig, dtype=None) -> dict:
    """diffusers ``HunyuanVideoTransformer3DModel.state_dict()`` (numpy) -> hcjax params."""
    return convert(state_dict, cfg, "diffusers", dtype)


def check(shapes: Mapping[str, tuple[int, ...]], cfg: Config | DiTConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """Validate names and shapes only (no tensor data). Returns the hcjax path -> shape it would produce."""
    c = _dit_cfg(cfg)
    _check_variant(shapes.keys(), c, fmt)
    return check_rules(_rules(c, fmt), shapes, _expected(c), what=f"DiT ({fmt} format)")


def detect_format(keys) -> str:
    keys = set(keys)
    if "img_in.proj.weight" in keys:
        return "original"
    if "x_embedder.proj.weight" in keys:
        return "diffusers"
    raise ConversionError("not a DiT state dict: neither img_in.proj.weight (original) nor "
                          "x_embedder.proj.weight (diffusers) is present")


def preset_for(keys, fmt: str) -> Path:
    v = detect_variant(keys, fmt)
    return PRESET_DIR / {"image": "hunyuancustom_720p.yaml", "audio": "hunyuancustom_720p_audio.yaml",
                         "editing": "hunyuancustom_720p_editing.yaml"}[v.name]


def convert_file(args) -> Path:
    """CLI: read ``--src`` (original: weights under ``module``; fp8: + its map), convert, write an orbax checkpoint."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    src = Path(args.src)
    sd, scales = read_original(src, getattr(args, "fp8_map", None), args.key)
    fmt = args.format or detect_format(sd.keys())
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; expected one of {FORMATS}")
    cfg = load_config(args.config or preset_for(sd.keys(), fmt), args.set)
    dit = cfg.dit
    if args.dtype:
        dit = dataclasses.replace(dit, param_dtype=args.dtype)
        cfg = dataclasses.replace(cfg, dit=dit)
    try:
        params = convert(sd, dit, fmt, dtype=_np_dtype(args.dtype), fp8_scales=scales)
    except ConversionError as e:
        raise ConversionError(str(e) if str(src) in str(e) else f"{src}: {e}") from None
    return save_params(out, params, cfg, overwrite=args.overwrite)


def open_state_dict(src: Path, key: str | None = None):
    """A checkpoint's state dict: safetensors file/dir, or a .pt's ``key`` (default ``module``, else top level)."""
    if src.suffix in (".safetensors",) or src.is_dir():
        return read_state_dict(src)
    if key is not None:
        return read_state_dict(src, key)
    try:
        return read_state_dict(src, "module")
    except ValueError:
        return read_state_dict(src)


def _np_dtype(name):
    if name is None:
        return None
    return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name]
