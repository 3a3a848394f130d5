"""LLaVA-Llama-3-8B v1.1 conversion (``LlavaForConditionalGeneration``) -> hcjax :class:`LlavaModel` params.

Formats (auto-detected from the key names; keys of another layout are reported as unexpected):

==============  ================================  ==========================  ===================================
part            ``hub`` (hub files, 4.41.2)       ``hub5`` (5.x save)         ``transformers5`` (5.x state_dict,
                                                                              the manifest)
==============  ================================  ==========================  ===================================
language model  ``language_model.model.X``        same as hub                 ``model.language_model.X``
lm head         ``language_model.lm_head.weight`` same as hub                 ``lm_head.weight``
vision tower    ``vision_tower.vision_model.X``   ``vision_tower.X``          ``model.vision_tower.X``
projector       ``multi_modal_projector.X``       same as hub                 ``model.multi_modal_projector.X``
==============  ================================  ==========================  ===================================

(``hub5`` is what transformers 5.x ``save_pretrained`` writes: the legacy layout, but its CLIP vision tower has
no ``vision_model`` level.)

Every tensor is consumed: ``lm_head``, the final ``norm`` and the vision ``post_layernorm`` are unused by the
text stage but are part of the params tree (so counts equal the manifest), unless ``llava.keep_unused=False``,
in which case exactly those tensors are recognised and dropped. Non-learned buffers of older saves
(``*.embeddings.position_ids``, ``*.rotary_emb.inv_freq``) are recognised and dropped; anything else unknown
is an error naming the key. A sharded safetensors directory is read lazily, shard by shard (memory-mapped),
so conversion holds one copy of the weights.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hcjax.checkpoint import save_params
from hcjax.conditioning.llama import abstract_params as llama_abstract_params
from hcjax.conditioning.llava import abstract_params as llava_abstract_params
from hcjax.config import Config, LlamaConfig, load_config

from .readers import read_state_dict
from .clip import _Without, check_layer_shapes, np_dtype, vision_rules
from .rules import ConversionError, Rule, apply_rules, check_rules, expected_shapes, linear, linear_from, linear_to

FORMATS = ("hub", "hub5", "transformers5")
PREFIXES = {
    "hub": dict(lm="language_model.model.", head="language_model.lm_head.", vision="vision_tower.vision_model.",
                proj="multi_modal_projector."),
    "hub5": dict(lm="language_model.model.", head="language_model.lm_head.", vision="vision_tower.",
                 proj="multi_modal_projector."),
    "transformers5": dict(lm="model.language_model.", head="lm_head.", vision="model.vision_tower.",
                          proj="model.multi_modal_projector."),
}
_BUFFERS = re.compile(r"^.*(\.embeddings\.position_ids|\.rotary_emb\.inv_freq)$")


def llama_rules(c: LlamaConfig, prefix: str = "", flax_prefix: str = "", final_norm: bool = True) -> list[Rule]:
    """Table of transformers' ``LlamaModel`` (keys under ``prefix``) -> :class:`hcjax...llama.LlamaModel`."""
    n, nkv, k, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    L, f, t = c.num_hidden_layers, f"{flax_prefix}layers", f"{prefix}layers.{{i}}"
    rows = [
        Rule(f"{flax_prefix}embed_tokens/embedding", f"{prefix}embed_tokens.weight"),
        Rule(f"{f}/self_attn/q_proj/kernel", f"{t}.self_attn.q_proj.weight", linear_to(n, k), L),
        Rule(f"{f}/self_attn/k_proj/kernel", f"{t}.self_attn.k_proj.weight", linear_to(nkv, k), L),
        Rule(f"{f}/self_attn/v_proj/kernel", f"{t}.self_attn.v_proj.weight", linear_to(nkv, k), L),
        Rule(f"{f}/self_attn/o_proj/kernel", f"{t}.self_attn.o_proj.weight", linear_from(n, k), L),
        Rule(f"{f}/mlp/gate_proj/kernel", f"{t}.mlp.gate_proj.weight", linear, L),
        Rule(f"{f}/mlp/up_proj/kernel", f"{t}.mlp.up_proj.weight", linear, L),
        Rule(f"{f}/mlp/down_proj/kernel", f"{t}.mlp.down_proj.weight", linear, L),
        Rule(f"{f}/input_layernorm/scale", f"{t}.input_layernorm.weight", layers=L),
        Rule(f"{f}/post_attention_layernorm/scale", f"{t}.post_attention_layernorm.weight", layers=L),
    ]
    if final_norm:
        rows.append(Rule(f"{flax_prefix}norm/scale", f"{prefix}norm.weight"))
    del d
    return rows


def llava_rules(cfg: Config, fmt: str) -> list[Rule]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown LLaVA checkpoint format {fmt!r}; expected one of {FORMATS}")
    p, keep = PREFIXES[fmt], cfg.llava.keep_unused
    rows = vision_rules(cfg.clip_vision, p["vision"], "vision_tower/")
    if not keep:
        rows = [r for r in rows if not r.flax_path.startswith("vision_tower/post_layernorm/")]
    rows += [
        Rule("multi_modal_projector/linear_1/kernel", f"{p['proj']}linear_1.weight", linear),
        Rule("multi_modal_projector/linear_1/bias", f"{p['proj']}linear_1.bias"),
        Rule("multi_modal_projector/linear_2/kernel", f"{p['proj']}linear_2.weight", linear),
        Rule("multi_modal_projector/linear_2/bias", f"{p['proj']}linear_2.bias"),
    ]
    rows += llama_rules(cfg.llama, p["lm"], "language_model/", final_norm=keep)
    if keep:
        rows.append(Rule("lm_head/kernel", f"{p['head']}weight", linear))
    return rows


def unused_keys(fmt: str) -> list[str]:
    """The tensors the text stage never reads (dropped when ``llava.keep_unused`` is False)."""
    p = PREFIXES[fmt]
    return [f"{p['head']}weight", f"{p['lm']}norm.weight", f"{p['vision']}post_layernorm.weight",
            f"{p['vision']}post_layernorm.bias"]


def detect_format(keys) -> str:
    keys = set(keys)
    if "model.language_model.embed_tokens.weight" in keys:
        return "transformers5"
    if "language_model.model.embed_tokens.weight" in keys:
        return "hub" if "vision_tower.vision_model.embeddings.class_embedding" in keys else "hub5"
    raise ConversionError(
        "not a LLaVA state dict: found neither language_model.model.embed_tokens.weight (hub / transformers 4.x "
        "names) nor model.language_model.embed_tokens.weight (transformers 5.x names)")


def _drop(keys, cfg: Config, fmt: str) -> list[str]:
    drop = [k for k in keys if _BUFFERS.match(k)]
    if not cfg.llava.keep_unused:
        drop += [k for k in unused_keys(fmt) if k in set(keys)]
    return drop


def _expected(cfg: Config):
    return expected_shapes(llava_abstract_params(cfg))


def _as_config(cfg) -> Config:
    if not isinstance(cfg, Config):
        raise TypeError("LLaVA conversion needs the full hcjax Config (llama, clip_vision and llava sections)")
    return cfg


# ------------------------------------------------------------------------------------------- API


def from_hf(state_dict: Mapping[str, np.ndarray], cfg: Config, fmt: str | None = None, dtype=None) -> dict:
    """LLaVA state dict (hub or transformers 5.x names, numpy values, may be lazy) -> hcjax params."""
    cfg = _as_config(cfg)
    fmt = fmt or detect_format(state_dict.keys())
    sd = _Without(state_dict, _drop(state_dict.keys(), cfg, fmt))
    return apply_rules(llava_rules(cfg, fmt), sd, _expected(cfg), what=f"LLaVA ({fmt} names)", dtype=dtype)


def check(shapes: Mapping[str, tuple[int, ...]], cfg: Config, fmt: str | None = None) -> dict[str, tuple[int, ...]]:
    """Validate names and shapes only (no tensor data), e.g. against the manifest. Returns hcjax path -> shape."""
    cfg = _as_config(cfg)
    fmt = fmt or detect_format(shapes.keys())
    drop = set(_drop(shapes.keys(), cfg, fmt))
    shapes = {k: v for k, v in shapes.items() if k not in drop}
    rules, what = llava_rules(cfg, fmt), f"LLaVA ({fmt} names)"
    check_layer_shapes(rules, shapes, what)
    return check_rules(rules, shapes, _expected(cfg), what=what)


def from_hf_llama(state_dict: Mapping[str, np.ndarray], cfg: Config | LlamaConfig, dtype=None) -> dict:
    """A standalone transformers ``LlamaModel.state_dict()`` (``embed_tokens``, ``layers.*``, ``norm``)."""
    c = cfg.llama if isinstance(cfg, Config) else cfg
    sd = _Without(state_dict, [k for k in state_dict if _BUFFERS.match(k)])
    return apply_rules(llama_rules(c), sd, expected_shapes(llama_abstract_params(c)), what="Llama", dtype=dtype)


def convert_file(args) -> Path:
    """CLI: ``python -m convert_weights llava --src <model dir | file> --out <dir>``."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    sd = read_state_dict(Path(args.src), args.key)
    fmt = args.format or detect_format(sd.keys())
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; expected one of {FORMATS}")
    cfg = load_config(args.config, args.set)
    if args.dtype:
        cfg = dataclasses.replace(
            cfg, llama=dataclasses.replace(cfg.llama, param_dtype=args.dtype),
            clip_vision=dataclasses.replace(cfg.clip_vision, param_dtype=args.dtype))
    params = from_hf(sd, cfg, fmt, dtype=np_dtype(args.dtype))
    return save_params(out, params, cfg, overwrite=args.overwrite)
