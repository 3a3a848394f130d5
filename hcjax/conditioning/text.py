"""The HunyuanCustom text stage around the models: tokenisation, the LLaVA image copy, CFG branches (spec 3).

Ports the prompt handling of ``hymm_sp/text_encoder`` (tokenise the template-wrapped prompt, crop, mask rules) and
the LLaVA image preprocessing (spec 2.1). The models are :mod:`.llava` (LLaVA-Llama-3) and :mod:`.clip` (CLIP-L);
loading tokenizers and weights from disk is :mod:`hcjax.models.text`.

Shapes: ``T = text_len + crop_start`` LLaVA tokenizer positions (351), ``S = text_len + n - 1`` output states (831)
of width ``D`` (4096) for ``n`` image features (576), CLIP-L ``clip_text_len`` tokens (77) pooled to ``[B, D2]``
(768). The LLaVA image copy is ``float32 [size, size, 3]`` (336), channels-last.

:func:`encode_prompts` returns :class:`TextConditioning` ``(text_states, text_mask, text_states_2)`` for the
positive (prompt, item name, reference image) and negative (negative prompt, 'person', white image, spec-3.4 mask
rewrite) branches: exactly what the DiT consumes (3.6).

Multi-subject (issue 24): ``K`` reference images and ``K`` item names per prompt give the positive string one
``"\nThe {name_k} looks like<image>"`` per subject, each ``<image>`` merged with its own image's features (``S =
text_len + K(n-1)``, mask as spec 3.3 with ``K(n-1)`` appended ones). The negative branch stays the released one
(negative prompt, one 'person' phrase, one white image, spec-3.4 rewrite), its states and mask zero-padded to the
positive length (the padded positions are masked, so the DiT and the refiner ignore them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..media import pad_resize, read_image
from .clip import ClipTextModel
from .llava import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, build_prompt, llava_states, num_image_features


class TextConditioning(NamedTuple):
    """What the DiT consumes for one CFG branch (spec 3.6)."""

    text_states: jax.Array      # [B, S, D]   LLaVA states after the crop
    text_mask: jax.Array        # [B, S]      int32, as spec 3.3 (positive) / 3.4 (negative)
    text_states_2: jax.Array    # [B, D2]     CLIP-L pooled output


def uncond_mask_rewrite(text_mask, n_image_features: int):
    """Spec 3.4: rows with ``sum > n-1`` become a prefix of ``sum - (n-1)`` ones (others are kept)."""
    total = jnp.sum(text_mask, axis=1, keepdims=True)
    prefix = (jnp.arange(text_mask.shape[1])[None] < total - (n_image_features - 1)).astype(text_mask.dtype)
    return jnp.where(total > n_image_features - 1, prefix, text_mask)


def clip_pooled(params, cfg: Config, input_ids, attention_mask):
    """CLIP-L pooled output ``[B, D2]`` (spec 3.5; jit with ``cfg`` static)."""
    return ClipTextModel(cfg.clip_text).apply({"params": params}, input_ids, attention_mask)[1]


_llava_states = jax.jit(llava_states, static_argnums=1)
_clip_pooled = jax.jit(clip_pooled, static_argnums=1)


# ------------------------------------------------------------------------------------------- tokenisation


def tokenize_llava(tokenizer, texts: Sequence[str], cfg: Config, image_count: int = 1
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise full LLaVA strings to ``max_length = text_len + crop_start`` (right padding).

    Raises ``ValueError`` when a string would lose an ``<image>`` token to truncation (the original crashes)
    or does not contain exactly ``image_count`` of them, and when the tokenizer's ``<image>`` id disagrees with the
    config.
    """
    lc = cfg.llava
    limit = lc.text_len + lc.crop_start
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != lc.image_token_index:
        raise ValueError(f"the LLaVA tokenizer maps {IMAGE_TOKEN} to id {image_id}, but llava.image_token_index "
                         f"is {lc.image_token_index}; tokenizer and config do not belong together")
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        count = sum(i == image_id for i in ids)
        if count != image_count:
            want = "one" if image_count == 1 else str(image_count)
            raise ValueError(f"a LLaVA prompt must contain exactly {want} {IMAGE_TOKEN} token(s) (one per "
                             f"reference image), found {count} (do not write {IMAGE_TOKEN} in the prompt text)")
        if len(ids) > limit:
            raise ValueError(
                f"prompt too long: {len(ids)} LLaVA tokens exceed the limit of {limit} (text_len {lc.text_len} + "
                f"crop_start {lc.crop_start}); truncation would remove the {IMAGE_TOKEN} token. The user prompt "
                f"may use at most about {limit - (len(ids) - _user_tokens(tokenizer, text))} tokens; shorten it "
                f"by {len(ids) - limit} or more tokens")
    enc = tokenizer(list(texts), max_length=limit, padding="max_length", truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def _user_tokens(tokenizer, text: str) -> int:
    """Rough token count of the user prompt inside a full LLaVA string (for the error message)."""
    head, _, rest = text.partition("<|start_header_id|>user<|end_header_id|>\n\n")
    user = rest.split("<|eot_id|>")[0] if rest else text
    return len(tokenizer(user, add_special_tokens=False)["input_ids"])


def tokenize_clip(tokenizer, texts: Sequence[str], cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-L tokens of the raw prompts, ``clip_text_len`` (77) positions, truncated and right-padded."""
    enc = tokenizer(list(texts), max_length=cfg.llava.clip_text_len, padding="max_length", truncation=True,
                    return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


# ------------------------------------------------------------------------------------------- image copy


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """Spec 2.1 LLaVA copy: padding-resize to ``size`` (white), ``/255``, normalise. Output ``[size, size, 3]``.

    Accepts whatever :func:`hcjax.media.read_image` reads (transparency is composited onto white there)."""

    size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, image) -> np.ndarray:
        return self.normalise(pad_resize(read_image(image), self.size, self.size))

    def normalise(self, img_uint8: np.ndarray) -> np.ndarray:
        x = img_uint8.astype(np.float32) / 255.0
        return ((x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)

    def white(self) -> np.ndarray:
        """The unconditional image: constant 255, normalised (per channel ``(1 - mean) / std``)."""
        return self.normalise(np.full((self.size, self.size, 3), 255, np.uint8))


# ------------------------------------------------------------------------------------------- encode


@dataclasses.dataclass
class TextEncoders:
    """Everything :func:`encode_prompts` needs: config, params (possibly sharded), tokenizers, preprocessing.

    Built from disk by :func:`hcjax.models.text.load_text_encoders`."""

    cfg: Config
    llava_params: Any
    clip_params: Any
    llava_tokenizer: Any
    clip_tokenizer: Any
    image_preprocessor: ImagePreprocessor


def _as_list(x, n: int, what: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{what}: expected {n} entries, got {len(x)}")
        return list(x)
    return [x] * n


def _per_subject(x, b: int, one_prompt: bool, what: str) -> list[list]:
    """Per prompt, the list of its subjects' entries: for one prompt (a str) a list/tuple is its ``K`` subjects;
    for ``b`` prompts a list/tuple has one entry per prompt, each a single value or a list of ``K``."""
    if isinstance(x, (list, tuple)):
        if one_prompt:
            return [list(x)]
        if len(x) != b:
            raise ValueError(f"{what}: expected {b} entries (one per prompt), got {len(x)}")
        return [list(e) if isinstance(e, (list, tuple)) else [e] for e in x]
    return [[x] for _ in range(b)]


def encode_prompts(enc: TextEncoders, prompts: str | Sequence[str], images, *,
                   negative_prompts: str | Sequence[str] = "", item_names=None
                   ) -> tuple[TextConditioning, TextConditioning]:
    """Encode the positive (with the reference images and item names) and negative (white image, 'person') branches.

    ``images``: per prompt one reference image or a list of ``K`` (multi-subject; the same ``K`` for every prompt),
    each a path, PIL, ``[H,W,3]`` uint8 RGB, or an already preprocessed ``[size,size,3]`` float32 array; for a single
    prompt (a str) a list is that prompt's ``K`` images. ``item_names`` likewise (one name per image; ``None`` =
    ``llava.item_name`` for each). Returns ``(positive, negative)`` :class:`TextConditioning`; the negative mask
    has the spec-3.4 rewrite applied (:func:`uncond_mask_rewrite`) and, for ``K > 1``, is zero-padded with its
    states to the positive length. Stack as ``[negative, positive]`` for CFG.
    """
    cfg, lc = enc.cfg, enc.cfg.llava
    one = isinstance(prompts, str)
    prompts = [prompts] if one else list(prompts)
    b = len(prompts)
    negs = _as_list(negative_prompts, b, "negative_prompts")
    imgs = _per_subject(images, b, one, "images")
    k = len(imgs[0])
    if k < 1 or any(len(row) != k for row in imgs):
        raise ValueError(f"images: every prompt needs the same number (>= 1) of reference images; got "
                         f"{[len(row) for row in imgs]}")
    names = [[lc.item_name] * k for _ in range(b)] if item_names is None else \
        _per_subject(item_names, b, one, "item_names")
    if any(len(row) != k for row in names):
        raise ValueError(f"item_names: one name per reference image is needed ({k} per prompt); got "
                         f"{[len(row) for row in names]}")
    pix = [[im if isinstance(im, np.ndarray) and im.dtype == np.float32 else enc.image_preprocessor(im) for im in row]
           for row in imgs]
    want = (cfg.clip_vision.image_size, cfg.clip_vision.image_size, 3)
    for p in (q for row in pix for q in row):
        if p.shape != want:
            raise ValueError(f"preprocessed image has shape {p.shape}, expected {want}")
    white = enc.image_preprocessor.white()
    pos_texts = [build_prompt(p, nm if k > 1 else nm[0]) for p, nm in zip(prompts, names)]
    neg_texts = [build_prompt(p, lc.negative_item_name) for p in negs]
    if k == 1:                      # the released path: one LLaVA batch [positive ; negative]
        ids, mask = tokenize_llava(enc.llava_tokenizer, pos_texts + neg_texts, cfg)
        pixels = np.stack([row[0] for row in pix] + [white] * b)
        states, tmask = _llava_states(enc.llava_params, cfg, jnp.asarray(ids), jnp.asarray(mask),
                                      jnp.asarray(pixels))
        pos_states, pos_mask, neg_states, neg_mask = states[:b], tmask[:b], states[b:], tmask[b:]
    else:                           # K images per positive row; the negative keeps one white image, padded
        ids, mask = tokenize_llava(enc.llava_tokenizer, pos_texts, cfg, image_count=k)
        pos_states, pos_mask = _llava_states(enc.llava_params, cfg, jnp.asarray(ids), jnp.asarray(mask),
                                             jnp.asarray(np.stack([np.stack(row) for row in pix])))
        ids, mask = tokenize_llava(enc.llava_tokenizer, neg_texts, cfg)
        neg_states, neg_mask = _llava_states(enc.llava_params, cfg, jnp.asarray(ids), jnp.asarray(mask),
                                             jnp.asarray(np.stack([white] * b)))
    cids, cmask = tokenize_clip(enc.clip_tokenizer, prompts + negs, cfg)
    pooled = _clip_pooled(enc.clip_params, cfg, jnp.asarray(cids), jnp.asarray(cmask))
    if lc.uncond_mask_rewrite:
        neg_mask = uncond_mask_rewrite(neg_mask, num_image_features(cfg.clip_vision))
    extra = pos_states.shape[1] - neg_states.shape[1]
    if extra:
        neg_states = jnp.pad(neg_states, ((0, 0), (0, extra), (0, 0)))
        neg_mask = jnp.pad(neg_mask, ((0, 0), (0, extra)))
    pos = TextConditioning(pos_states, pos_mask, pooled[:b])
    neg = TextConditioning(neg_states, neg_mask, pooled[b:])
    return pos, neg
