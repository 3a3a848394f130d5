"""LLaVA-Llama-3 text+image fusion as HunyuanCustom uses it, and its prompt template (spec 3.1-3.3).

Ports ``LlavaForConditionalGeneration`` of transformers **4.41.2** (the model) and the prompt template of
``hymm_sp/text_encoder``. Shapes: ``T = text_len + crop_start`` tokenizer positions (351), ``n`` image features
(576 = (336/14)^2), merged length ``T + n - 1`` (926), output ``S = text_len + n - 1`` (831) tokens of width
``D`` (4096).

* Legacy merge (3.2): the single ``<image>`` token at index ``k`` is replaced *in place* by the ``n`` projected
  image features: text ``[0, k)``, image ``[k, k+n)``, then the remaining tokens (pads). Merged attention mask =
  tokenizer mask on text, 1 on image; ``position_ids = cumsum(mask) - 1`` and **1 on every masked position**;
  the input embedding of every token whose id equals ``llava.pad_token_id`` is replaced by zeros. Attention is
  causal with masked keys, so every pad position ends with the same hidden vector.
* Multi-subject (issue 24, not in the release): the template ends with one ``"\nThe {name_k} looks like<image>"``
  per subject; ``pixels [B, K, H, W, 3]`` and each ``<image>`` (in order) is replaced by ITS image's ``n``
  features, so the merged length is ``T + K(n-1)``; mask, position ids and pad zeroing follow the same rules.
  ``K = 1`` (``pixels [B, H, W, 3]``) is the release, bit for bit.
* Output (3.2/3.3, :func:`llava_states`): ``hidden_states[-(skip+1)]`` (layer 30 of 32, no final norm), minus the
  first ``crop_start`` positions. The mask is *not* the merged one: ``(tokenizer_mask ++ ones(K(n-1)))[crop_start:]``
  (misaligned with the states on purpose, as the original).

Tokenisation, the image copy, CLIP-L pooling and the CFG branches are :mod:`.text`; reading tokenizers and
weights from disk is :mod:`hcjax.models.text`.

Parameter tree of :class:`LlavaModel`: ``vision_tower/...`` (:class:`ClipVisionModel`),
``multi_modal_projector/linear_{1,2}``, ``language_model/...`` (:class:`LlamaModel`), ``lm_head/kernel``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import sharding
from ..axes import TEXT_RULES
from ..config import ClipVisionConfig, Config, LlamaConfig, LlavaConfig
from ..layers import Dense, to_dtype
from .clip import ClipVisionModel
from .llama import LlamaModel

PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
IMAGE_TOKEN = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.4082107)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROJECTOR_ACTS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
}


def build_prompt(prompt: str, name: str | Sequence[str]) -> str:
    """The string HunyuanCustom tokenises: template + ``"\\nThe {name} looks like<image>"`` (spec 3.1); a list of
    ``K`` names (multi-subject) appends one such phrase per subject, in order."""
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("build_prompt: at least one item name is needed")
    return PROMPT_TEMPLATE.format(prompt) + "".join("\nThe " + nm + " looks like" + IMAGE_TOKEN for nm in names)


def num_image_features(c: ClipVisionConfig) -> int:
    return (c.image_size // c.patch_size) ** 2


# ------------------------------------------------------------------------------------------- the model


def legacy_merge(input_ids, attention_mask, text_embeds, image_features, image_token_index: int,
                 pad_token_id: int):
    """transformers 4.41.2 ``_merge_input_ids_with_image_features``, one image per ``<image>`` token.

    ``input_ids, attention_mask [B, T]``, ``text_embeds [B, T, D]``, ``image_features [B, n, D]`` (one ``<image>``
    per row) or ``[B, K, n, D]`` (``K`` per row, in order) -> ``embeds [B, T+K(n-1), D]``, ``mask``,
    ``position_ids [B, T+K(n-1)]`` (see the module docstring).
    """
    b, t = input_ids.shape
    if image_features.ndim == 3:
        image_features = image_features[:, None]
    n_img, n = image_features.shape[1], image_features.shape[2]
    length = t + n_img * (n - 1)
    j = jnp.arange(length)[None, :]
    is_tok = input_ids == image_token_index
    # input position p starts at output p + (n-1) * (image tokens before p); output j belongs to the last p <= j
    start = jnp.arange(t)[None, :] + (n - 1) * (jnp.cumsum(is_tok, axis=1) - is_tok)
    src = jax.vmap(lambda st: jnp.searchsorted(st, j[0], side="right") - 1)(start)
    text_idx = jnp.clip(src, 0, t - 1)
    offset = j - jnp.take_along_axis(start, text_idx, axis=1)
    is_img = jnp.take_along_axis(is_tok, text_idx, axis=1)
    which = jnp.clip(jnp.take_along_axis(jnp.cumsum(is_tok, axis=1) - 1, text_idx, axis=1), 0, n_img - 1)
    feat_idx = which * n + jnp.clip(offset, 0, n - 1)
    ids = jnp.take_along_axis(input_ids, text_idx, axis=1)
    text = jnp.take_along_axis(text_embeds, text_idx[..., None], axis=1)
    text = jnp.where((ids == pad_token_id)[..., None], jnp.zeros_like(text), text)
    flat = image_features.reshape(b, n_img * n, image_features.shape[-1])
    feats = jnp.take_along_axis(flat, feat_idx[..., None], axis=1).astype(text.dtype)
    embeds = jnp.where(is_img[..., None], feats, text)
    mask = jnp.where(is_img, 1, jnp.take_along_axis(attention_mask, text_idx, axis=1)).astype(jnp.int32)
    position_ids = jnp.where(mask == 0, 1, jnp.cumsum(mask, axis=1) - 1)
    return embeds, mask, position_ids


class MultiModalProjector(nn.Module):
    out_features: int
    act: str = "gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(self.out_features, ("embed", "mlp"), name="linear_1", **kw)(x)
        return Dense(self.out_features, ("mlp", "embed"), name="linear_2", **kw)(PROJECTOR_ACTS[self.act](h))


class LlavaModel(nn.Module):
    """LLaVA forward with the 4.41.2 legacy merge; returns the hidden state HunyuanCustom uses.

    ``__call__(input_ids [B,T], attention_mask [B,T], pixels [B,H,W,3] or [B,K,H,W,3] (K <image> tokens per
    row))`` -> ``(hidden [B, T+K(n-1), D], mask,
    position_ids)`` with ``hidden = hidden_states[-(hidden_state_skip_layer + 1)]`` (only the layers needed
    run). ``output_hidden_states=True`` runs every layer and returns ``(all_hidden_states, mask, position_ids)``.
    Only the valid (non-pad) positions are equal to a modern LLaVA fed with ``n`` placeholder tokens.
    """

    llama: LlamaConfig
    vision: ClipVisionConfig
    llava: LlavaConfig

    def setup(self):
        keep = self.llava.keep_unused
        self.vision_tower = ClipVisionModel(self.vision, with_post_layernorm=keep)
        self.multi_modal_projector = MultiModalProjector(
            self.llama.hidden_size, self.llava.projector_hidden_act, to_dtype(self.llama.dtype),
            to_dtype(self.llama.param_dtype))
        self.language_model = LlamaModel(self.llama, with_norm=keep)
        if keep:
            self.lm_head = Dense(self.llama.vocab_size, ("embed", "vocab"), use_bias=False,
                                 dtype=to_dtype(self.llama.dtype), param_dtype=to_dtype(self.llama.param_dtype))

    def image_features(self, pixels):
        """``[B, H, W, 3] -> [B, n, D]`` or (multi-subject) ``[B, K, H, W, 3] -> [B, K, n, D]``."""
        lead = pixels.shape[:-3]
        pixels = pixels.reshape(-1, *pixels.shape[-3:])
        feats = self.vision_tower(pixels, feature_layer=self.llava.vision_feature_layer)[:, 1:]
        feats = self.multi_modal_projector(feats.astype(to_dtype(self.llama.dtype)))
        return feats.reshape(*lead, *feats.shape[1:])

    def __call__(self, input_ids, attention_mask, pixels, output_hidden_states: bool = False):
        c, lc = self.llama, self.llava
        embeds, mask, position_ids = legacy_merge(
            input_ids, attention_mask, self.language_model.embed(input_ids), self.image_features(pixels),
            lc.image_token_index, lc.pad_token_id)
        skip = lc.hidden_state_skip_layer
        if self.is_initializing() or output_hidden_states:
            last, hidden = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                               output_hidden_states=True, final_norm=lc.keep_unused)
            if self.is_initializing() and lc.keep_unused:
                self.lm_head(last[:, :1])
            return (hidden if output_hidden_states else hidden[-(skip + 1)]), mask, position_ids
        if skip > c.num_hidden_layers:
            raise ValueError(f"hidden_state_skip_layer={skip} exceeds the {c.num_hidden_layers} layers")
        if skip == 0 and not lc.keep_unused:
            raise ValueError("hidden_state_skip_layer=0 needs the final norm (set llava.keep_unused=true)")
        out, _ = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                     num_layers=c.num_hidden_layers - skip, final_norm=skip == 0)
        return out, mask, position_ids


def llava_model(cfg: Config) -> LlavaModel:
    return LlavaModel(cfg.llama, cfg.clip_vision, cfg.llava)


def example_inputs(cfg: Config, batch: int = 1, tokens: int = 2):
    ids = jnp.zeros((batch, tokens), jnp.int32).at[:, -1].set(cfg.llava.image_token_index)
    v = cfg.clip_vision
    return ids, jnp.ones((batch, tokens), jnp.int32), jnp.zeros((batch, v.image_size, v.image_size, 3), jnp.float32)


def init_params(cfg: Config, key: jax.Array) -> dict:
    """Random (boxed) parameters of :class:`LlavaModel`."""
    return llava_model(cfg).init(key, *example_inputs(cfg))["params"]


def abstract_params(cfg: Config) -> dict:
    """``jax.eval_shape`` of :func:`init_params` (nothing allocated), boxed with logical axes."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def count_params(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))


# ------------------------------------------------------------------------------------------- output


def llava_states(params, cfg: Config, input_ids, attention_mask, pixels):
    """Cropped states ``[B, S, D]`` and the spec-3.3 mask ``[B, S]`` (jit with ``cfg`` static); ``pixels
    [B, K, H, W, 3]`` (``K`` images per row) gives ``S = T - crop_start + K(n-1)`` and ``K(n-1)`` appended ones."""
    hidden, _, _ = llava_model(cfg).apply({"params": params}, input_ids, attention_mask, pixels)
    n = num_image_features(cfg.clip_vision)
    k = pixels.shape[1] if pixels.ndim == 5 else 1
    crop = cfg.llava.crop_start
    mask = jnp.concatenate([attention_mask.astype(jnp.int32),
                            jnp.ones((attention_mask.shape[0], k * (n - 1)), jnp.int32)], axis=1)
    return hidden[:, crop:], mask[:, crop:]


# ------------------------------------------------------------------------------------------- sharding


def shard_llava_params(params, cfg: Config, mesh, rules=TEXT_RULES):
    """Place plain :class:`LlavaModel` params (the 8B encoder) on ``mesh`` by their logical names
    (:func:`hcjax.sharding.shard_params` with the text-tower rules)."""
    return sharding.shard_params(params, mesh, like=abstract_params(cfg), rules=rules)
