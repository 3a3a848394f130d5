"""PyTorch LoRAs for HunyuanVideo / HunyuanCustom -> an hcjax adapter tree (``hcjax.lora``).

Formats (auto-detected from the key names, ``fmt`` / ``--format`` to force):

* ``diffusers`` (peft / diffusers / finetrainers): ``[transformer.]transformer_blocks.0.attn.to_q.lora_A.weight``
  ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``. Scale ``alpha / r`` with ``alpha`` from a ``<module>.alpha``
  tensor if present, else from the file's peft config (safetensors metadata ``lora_adapter_metadata``:
  ``lora_alpha``, ``alpha_pattern``, ``use_rslora`` -> ``alpha / sqrt(r)``), else ``alpha = r`` (scale 1, as
  diffusers assumes; the user's ``--lora-scale`` then carries ``lora_alpha / r``).
* ``kohya`` (musubi-tuner, sd-scripts): ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha``; scale ``alpha / r`` (``r`` = ``lora_down`` rows; no ``.alpha``: ``alpha = r``).
  Module names are the original's or diffusers' with ``.`` -> ``_``.
* ``original`` (diffusion-pipe, ComfyUI): ``[diffusion_model.]double_blocks.0.img_attn_qkv.lora_A.weight`` (or
  ``lora_down``/``lora_up``), optional ``.alpha``; scaled as ``diffusers``.

Mapping onto our layout (a LoRA ``dW = s * B @ A``, torch ``[out, in]``; our kernels ``[*in, *out]``):
``lora_a = A.T`` reshaped to the kernel's input dims + ``[r]``, ``lora_b = s * B.T`` reshaped to ``[r]`` + output
dims. A LoRA on a slice of a fused kernel (diffusers ``to_q`` of ``img_attn_qkv [D, 3, N, K]``, or the single
block's ``to_q/to_k/to_v`` -> ``linear1_qkv``, ``proj_mlp`` -> ``linear1_mlp``) fills its rows of ``lora_b`` and
leaves the others zero; several LoRAs on one kernel are concatenated along ``r``. The original single block's
``linear1`` (rows ``[qkv ; mlp]``) becomes two adapters sharing ``A``; ``linear2`` / diffusers ``proj_out``
(columns ``[attn ; mlp]``) two adapters sharing ``B``. Layers without a LoRA get zero rows (ranks padded to the
largest per target). Exact: the merged delta equals the PyTorch delta mapped through the base conversion table.

Strict: every key must be consumed; a key of an unknown module or suffix, a half pair, an ``.alpha`` without
weights, or a mis-shaped tensor is a ``ValueError`` naming the keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open

from hcjax.config import PRESET_DIR, Config, DiTConfig, load_config
from hcjax.dit import abstract_params
from hcjax.lora import ADAPTER_FILE, LORA_A, LORA_B, count, save_adapter

from .readers import read_state_dict
from .rules import ConversionError, _format_list, expected_shapes

FORMATS = ("diffusers", "kohya", "original")
ALIASES = {"peft": "diffusers", "musubi": "kohya", "comfy": "original"}
PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.")
SUFFIX_A = ("lora_A.weight", "lora_down.weight")
SUFFIX_B = ("lora_B.weight", "lora_up.weight")
KOHYA_PREFIX = "lora_unet_"
PEFT_METADATA_KEY = "lora_adapter_metadata"


@dataclasses.dataclass(frozen=True)
class LoraRule:
    """One PyTorch Linear (``module``, ``{i}`` = layer) -> its share of one of our Dense kernels (``target``).

    ``rows``: ``(src_lo, src_hi, dst_lo)`` ranges of the Linear's output rows placed at flat output position
    ``dst_lo`` of the kernel (``None``: all rows, in order); ``cols``: the Linear's input columns feeding this
    kernel (``None``: all); ``in_ndim``: the kernel's number of input dims.
    """

    module: str
    target: str
    layers: int = 0
    rows: tuple[tuple[int, int, int], ...] | None = None
    cols: tuple[int, int] | None = None
    in_ndim: int = 1

    def names(self) -> list[tuple[str, int | None]]:
        if self.layers:
            return [(self.module.format(i=i), i) for i in range(self.layers)]
        return [(self.module, None)]


def _dit(cfg: Config | DiTConfig) -> DiTConfig:
    return cfg.dit if isinstance(cfg, Config) else cfg


def original_rules(cfg: Config | DiTConfig) -> list[LoraRule]:
    c = _dit(cfg)
    d, f = c.hidden_size, c.mlp_hidden
    R = LoraRule
    rows = [R("time_in.mlp.0", "time_in/mlp_0"), R("time_in.mlp.2", "time_in/mlp_2"),
            R("vector_in.in_layer", "vector_in/in_layer"), R("vector_in.out_layer", "vector_in/out_layer"),
            R("txt_in.input_embedder", "txt_in/input_embedder"),
            R("txt_in.t_embedder.mlp.0", "txt_in/t_embedder/mlp_0"),
            R("txt_in.t_embedder.mlp.2", "txt_in/t_embedder/mlp_2"),
            R("txt_in.c_embedder.linear_1", "txt_in/c_embedder/linear_1"),
            R("txt_in.c_embedder.linear_2", "txt_in/c_embedder/linear_2"),
            R("final_layer.linear", "final_layer/linear"),
            R("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation/linear")]
    if c.guidance_embed:
        rows += [R("guidance_in.mlp.0", "guidance_in/mlp_0"), R("guidance_in.mlp.2", "guidance_in/mlp_2")]
    if c.video_condition:
        rows += [R("bg_proj", "bg_proj")]
    rb, rt, L = "txt_in.individual_token_refiner.blocks.{i}", "txt_in/individual_token_refiner", c.refiner_depth
    rows += [R(f"{rb}.self_attn_qkv", f"{rt}/self_attn_qkv", L), R(f"{rb}.self_attn_proj", f"{rt}/self_attn_proj", L,
                                                                    in_ndim=2),
             R(f"{rb}.mlp.fc1", f"{rt}/mlp/fc1", L), R(f"{rb}.mlp.fc2", f"{rt}/mlp/fc2", L),
             R(f"{rb}.adaLN_modulation.1", f"{rt}/adaLN_modulation/linear", L)]
    b, L = "double_blocks.{i}", c.depth_double_blocks
    for s in ("img", "txt"):
        rows += [R(f"{b}.{s}_mod.linear", f"double_blocks/{s}_mod/linear", L),
                 R(f"{b}.{s}_attn_qkv", f"double_blocks/{s}_attn_qkv", L),
                 R(f"{b}.{s}_attn_proj", f"double_blocks/{s}_attn_proj", L, in_ndim=2),
                 R(f"{b}.{s}_mlp.fc1", f"double_blocks/{s}_mlp/fc1", L),
                 R(f"{b}.{s}_mlp.fc2", f"double_blocks/{s}_mlp/fc2", L)]
    b, L = "single_blocks.{i}", c.depth_single_blocks
    rows += [R(f"{b}.linear1", "single_blocks/linear1_qkv", L, rows=((0, 3 * d, 0),)),
             R(f"{b}.linear1", "single_blocks/linear1_mlp", L, rows=((3 * d, 3 * d + f, 0),)),
             R(f"{b}.linear2", "single_blocks/linear2_attn", L, cols=(0, d), in_ndim=2),
             R(f"{b}.linear2", "single_blocks/linear2_mlp", L, cols=(d, d + f)),
             R(f"{b}.modulation.linear", "single_blocks/modulation/linear", L)]
    return rows


def diffusers_rules(cfg: Config | DiTConfig) -> list[LoraRule]:
    c = _dit(cfg)
    d = c.hidden_size
    R = LoraRule
    qkv = lambda j: ((0, d, j * d),)  # noqa: E731  (q, k, v slices of a fused [D, 3, N, K] kernel)
    te, ce = "time_text_embed", "context_embedder"
    rows = [R(f"{te}.timestep_embedder.linear_1", "time_in/mlp_0"),
            R(f"{te}.timestep_embedder.linear_2", "time_in/mlp_2"),
            R(f"{te}.text_embedder.linear_1", "vector_in/in_layer"),
            R(f"{te}.text_embedder.linear_2", "vector_in/out_layer"),
            R(f"{ce}.proj_in", "txt_in/input_embedder"),
            R(f"{ce}.time_text_embed.timestep_embedder.linear_1", "txt_in/t_embedder/mlp_0"),
            R(f"{ce}.time_text_embed.timestep_embedder.linear_2", "txt_in/t_embedder/mlp_2"),
            R(f"{ce}.time_text_embed.text_embedder.linear_1", "txt_in/c_embedder/linear_1"),
            R(f"{ce}.time_text_embed.text_embedder.linear_2", "txt_in/c_embedder/linear_2"),
            R("proj_out", "final_layer/linear"),
            # diffusers' norm_out emits (scale, shift); ours (shift, scale)
            R("norm_out.linear", "final_layer/adaLN_modulation/linear", rows=((d, 2 * d, 0), (0, d, d)))]
    if c.guidance_embed:
        rows += [R(f"{te}.guidance_embedder.linear_1", "guidance_in/mlp_0"),
                 R(f"{te}.guidance_embedder.linear_2", "guidance_in/mlp_2")]
    if c.video_condition:
        rows += [R("bg_proj", "bg_proj")]
    rb, rt, L = f"{ce}.token_refiner.refiner_blocks.{{i}}", "txt_in/individual_token_refiner", c.refiner_depth
    rows += [R(f"{rb}.attn.{p}", f"{rt}/self_attn_qkv", L, rows=qkv(j)) for j, p in enumerate(("to_q", "to_k", "to_v"))]
    rows += [R(f"{rb}.attn.to_out.0", f"{rt}/self_attn_proj", L, in_ndim=2),
             R(f"{rb}.ff.net.0.proj", f"{rt}/mlp/fc1", L), R(f"{rb}.ff.net.2", f"{rt}/mlp/fc2", L),
             R(f"{rb}.norm_out.linear", f"{rt}/adaLN_modulation/linear", L)]
    b, L = "transformer_blocks.{i}", c.depth_double_blocks
    for s, mod, qkv_names, proj, ff in (
        ("img", "norm1", ("to_q", "to_k", "to_v"), "to_out.0", "ff"),
        ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context"),
    ):
        rows += [R(f"{b}.attn.{p}", f"double_blocks/{s}_attn_qkv", L, rows=qkv(j)) for j, p in enumerate(qkv_names)]
        rows += [R(f"{b}.{mod}.linear", f"double_blocks/{s}_mod/linear", L),
                 R(f"{b}.attn.{proj}", f"double_blocks/{s}_attn_proj", L, in_ndim=2),
                 R(f"{b}.{ff}.net.0.proj", f"double_blocks/{s}_mlp/fc1", L),
                 R(f"{b}.{ff}.net.2", f"double_blocks/{s}_mlp/fc2", L)]
    b, L = "single_transformer_blocks.{i}", c.depth_single_blocks
    rows += [R(f"{b}.attn.{p}", "single_blocks/linear1_qkv", L, rows=qkv(j))
             for j, p in enumerate(("to_q", "to_k", "to_v"))]
    rows += [R(f"{b}.proj_mlp", "single_blocks/linear1_mlp", L),
             R(f"{b}.proj_out", "single_blocks/linear2_attn", L, cols=(0, d), in_ndim=2),
             R(f"{b}.proj_out", "single_blocks/linear2_mlp", L, cols=(d, d + c.mlp_hidden)),
             R(f"{b}.norm.linear", "single_blocks/modulation/linear", L)]
    return rows


def kohya_name(module: str) -> str:
    return KOHYA_PREFIX + module.replace(".", "_")


# ------------------------------------------------------------------------------------------- key parsing


def _split_key(key: str, fmt: str) -> tuple[str, str] | None:
    """``key`` -> (module, suffix) with suffix in ``A``/``B``/``alpha``; ``None`` if the suffix is unknown."""
    if fmt == "kohya":
        module, _, suffix = key.partition(".")
    else:
        for p in PREFIXES:
            if key.startswith(p):
                key = key[len(p):]
                break
        suffix = next((s for s in (*SUFFIX_A, *SUFFIX_B, "alpha") if key.endswith("." + s)), None)
        if suffix is None:
            return None
        module = key[: -len(suffix) - 1]
    kind = "A" if suffix in SUFFIX_A else "B" if suffix in SUFFIX_B else "alpha" if suffix == "alpha" else None
    return (module, kind) if kind else None


def detect_format(keys) -> str:
    keys = list(keys)
    if not keys:
        raise ConversionError("empty LoRA state dict")
    if all(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    mods = [m for m, _ in filter(None, (_split_key(k, "diffusers") for k in keys))]
    if any(m.startswith(("transformer_blocks.", "single_transformer_blocks.", "context_embedder.", "time_text_embed.",
                         "norm_out.")) or m == "proj_out" for m in mods):
        return "diffusers"
    if any(m.startswith(("double_blocks.", "single_blocks.", "txt_in.", "final_layer.", "time_in.", "vector_in."))
           for m in mods):
        return "original"
    raise ConversionError("cannot detect the LoRA format from its keys (e.g. " + ", ".join(keys[:3]) + "); expected "
                          "diffusers/peft (transformer_blocks.N.attn.to_q.lora_A.weight), kohya/musubi "
                          "(lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight) or original "
                          "(double_blocks.0.img_attn_qkv.lora_A.weight); pass --format")


def _table(cfg: DiTConfig, fmt: str) -> dict[str, list[tuple[LoraRule, int | None]]]:
    """Source module name (as it appears in the file) -> the (rule, layer) pairs it feeds."""
    if fmt == "diffusers":
        rules = diffusers_rules(cfg)
    elif fmt == "original":
        rules = original_rules(cfg)
    else:
        rules = original_rules(cfg) + diffusers_rules(cfg)
    table: dict[str, list] = {}
    for r in rules:
        for name, i in r.names():
            table.setdefault(kohya_name(name) if fmt == "kohya" else name, []).append((r, i))
    return table


# ------------------------------------------------------------------------------------------- alpha


def _pattern_value(patterns: Mapping, module: str):
    for pat, v in patterns.items():
        if pat.startswith("^") and re.match(pat, module) or re.fullmatch(rf"(.*\.)?{pat}", module):
            return v
    return None


def _scale(module: str, rank: int, alpha_tensor, peft_config: Mapping | None) -> tuple[float, float]:
    """(alpha, scale) of one module."""
    if alpha_tensor is not None:
        alpha = float(np.asarray(alpha_tensor, np.float64).reshape(()))
        return alpha, alpha / rank
    if peft_config:
        alpha = _pattern_value(peft_config.get("alpha_pattern") or {}, module)
        alpha = float(peft_config.get("lora_alpha", rank) if alpha is None else alpha)
        if peft_config.get("use_rslora"):
            return alpha, alpha / math.sqrt(rank)
        return alpha, alpha / rank
    return float(rank), 1.0


# ------------------------------------------------------------------------------------------- convert


def _as_f32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def convert(state_dict: Mapping, cfg: Config | DiTConfig, fmt: str | None = None, *,
            peft_config: Mapping | None = None, dtype=np.float32, info: dict | None = None) -> dict:
    """A PyTorch LoRA state dict (name -> numpy / torch tensor) -> hcjax adapter tree (numpy, ``dtype``).

    ``peft_config``: the adapter's peft ``LoraConfig`` as a dict (``lora_alpha``, ``alpha_pattern``,
    ``use_rslora``) when the file carries it; ``info`` (optional dict) receives the format and per-module
    ``alpha``/``rank``/``scale``.
    """
    c = _dit(cfg)
    fmt = ALIASES.get(fmt, fmt) if fmt else detect_format(state_dict.keys())
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; expected one of {FORMATS + tuple(ALIASES)}")
    table = _table(c, fmt)
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in state_dict.keys():
        parsed = _split_key(key, fmt)
        if parsed is None or parsed[0] not in table:
            unknown.append(key)
            continue
        module, kind = parsed
        if kind in groups.setdefault(module, {}):
            raise ConversionError(f"LoRA ({fmt}): keys {groups[module][kind]!r} and {key!r} are the same tensor "
                                  f"({module} {kind})")
        groups[module][kind] = key
    problems = []
    if unknown:
        problems.append(_format_list(f"LoRA ({fmt} format): unexpected keys (no such Linear in the DiT, or an "
                                     f"unsupported LoRA kind such as DoRA/LoHa/bias)", sorted(unknown)))
    for module, g in sorted(groups.items()):
        for kind, suffixes in (("A", SUFFIX_A), ("B", SUFFIX_B)):
            if kind not in g:
                have = ", ".join(g.values())
                problems.append(f"LoRA ({fmt} format): {module} has {have} but no {'/'.join(suffixes)}")
    if problems:
        raise ConversionError("\n".join(problems))

    expected = expected_shapes(abstract_params(c))
    # target -> layer -> list of (a, b)
    parts: dict[str, dict[int | None, list]] = {}
    rules_of: dict[str, LoraRule] = {}
    report: dict[str, dict] = {}
    bad = []
    for module, g in sorted(groups.items()):
        A, B = _as_f32(state_dict[g["A"]]), _as_f32(state_dict[g["B"]])
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            bad.append(f"{g['A']} {A.shape} / {g['B']} {B.shape}: expected [r, in] / [out, r] (Linear LoRA)")
            continue
        rank = A.shape[0]
        alpha, scale = _scale(module, rank, state_dict[g["alpha"]] if "alpha" in g else None, peft_config)
        report[module] = {"rank": int(rank), "alpha": alpha, "scale": scale}
        Bs = B * np.float32(scale)
        for rule, layer in table[module]:
            kshape = expected[f"{rule.target}/kernel"][1 if rule.layers else 0:]
            n_in = rule.in_ndim
            in_shape, out_shape = kshape[:n_in], kshape[n_in:]
            n_out = int(np.prod(out_shape))
            lo, hi = rule.cols or (0, int(np.prod(in_shape)))
            want_out = max(s_hi for _, s_hi, _ in rule.rows) if rule.rows else n_out
            if A.shape[1] < hi or (rule.cols is None and A.shape[1] != hi) or B.shape[0] < want_out or (
                    rule.rows is None and B.shape[0] != n_out):
                bad.append(f"{g['A']} {A.shape} / {g['B']} {B.shape}: does not fit {rule.target} (kernel "
                           f"{tuple(kshape)}, input columns {lo}:{hi}, output rows {want_out})")
                continue
            a = A[:, lo:hi].T.reshape(*in_shape, rank)
            if rule.rows is None:
                b = Bs.T
            else:
                b = np.zeros((rank, n_out), np.float32)
                for s_lo, s_hi, d_lo in rule.rows:
                    b[:, d_lo:d_lo + s_hi - s_lo] = Bs[s_lo:s_hi].T
            parts.setdefault(rule.target, {}).setdefault(layer, []).append((a, b.reshape(rank, *out_shape)))
            rules_of[rule.target] = rule
    if bad:
        raise ConversionError(_format_list(f"LoRA ({fmt} format): mis-shaped tensors", bad, limit=10))

    flat = {}
    for target, per_layer in parts.items():
        rule = rules_of[target]
        cat = {i: (np.concatenate([a for a, _ in ab], -1), np.concatenate([b for _, b in ab], 0))
               for i, ab in per_layer.items()}
        if not rule.layers:
            a, b = cat[None]
        else:
            r = max(a.shape[-1] for a, _ in cat.values())
            a0, b0 = next(iter(cat.values()))
            a = np.zeros((rule.layers, *a0.shape[:-1], r), np.float32)
            b = np.zeros((rule.layers, r, *b0.shape[1:]), np.float32)
            for i, (ai, bi) in cat.items():
                a[i, ..., : ai.shape[-1]] = ai
                b[i, : bi.shape[0]] = bi
        flat[f"{target}/{LORA_A}"] = a.astype(dtype)
        flat[f"{target}/{LORA_B}"] = b.astype(dtype)
    if info is not None:
        info.update(format=fmt, modules=report)
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *head, leaf = path.split("/")
        for p in head:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


# ------------------------------------------------------------------------------------------- files / CLI


def read_peft_config(path: Path) -> dict | None:
    """The peft ``LoraConfig`` diffusers stores in a safetensors header (``lora_adapter_metadata``), if any."""
    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    raw = meta.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: header metadata {PEFT_METADATA_KEY!r} is not JSON: {e}") from None


def convert_lora_file(src: str | Path, out: str | Path, cfg: Config | DiTConfig, fmt: str | None = None, *,
                      key: str | None = None, dtype=np.float32, overwrite: bool = False) -> Path:
    src, out = Path(src), Path(out)
    target = out / ADAPTER_FILE
    if target.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already holds {ADAPTER_FILE}; pass --overwrite to replace it")
    sd = read_state_dict(src, key)
    info: dict = {}
    try:
        adapters = convert(sd, cfg, fmt, peft_config=read_peft_config(src), dtype=dtype, info=info)
    except ConversionError as e:
        raise ConversionError(f"{src}: {e}") from None
    meta = {"source": str(src), "format": info["format"], "scaled": True, "params": count(adapters),
            "source_modules": info["modules"]}
    path = save_adapter(target, adapters, meta)
    (out / "adapter.json").write_text(json.dumps(meta, indent=2))
    return path


def convert_file(args) -> Path:
    """CLI entry (``python -m convert_weights lora``)."""
    cfg = load_config(args.config or PRESET_DIR / "hunyuancustom_720p.yaml", args.set)
    dtype = {None: np.float32, "float32": np.float32, "float16": np.float16}.get(args.dtype)
    if dtype is None:
        raise ValueError(f"--dtype {args.dtype}: adapters are written as float32 or float16")
    return convert_lora_file(args.src, args.out, cfg, args.format, key=args.key, dtype=dtype,
                             overwrite=args.overwrite)
