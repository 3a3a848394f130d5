"""The HunyuanCustom text stage: LLaVA-Llama-3 text+image fusion and CLIP-L pooling (spec section 3).

Ports ``LlavaForConditionalGeneration`` of transformers **4.41.2** as HunyuanCustom uses it, plus the prompt
templates, cropping and mask construction of ``hymm_sp/text_encoder``. Shapes: ``T = text_len + crop_start``
tokenizer positions (351), ``n`` image features (576 = (336/14)^2), merged length ``T + n - 1`` (926), output
``S = text_len + n - 1`` (831) tokens of width ``D`` (4096); CLIP pooled ``[B, D2]`` (768).

* Legacy merge (3.2): the single ``<image>`` token at index ``k`` is replaced *in place* by the ``n`` projected
  image features: text ``[0, k)``, image ``[k, k+n)``, then the remaining tokens (pads). Merged attention mask =
  tokenizer mask on text, 1 on image; ``position_ids = cumsum(mask) - 1`` and **1 on every masked position**;
  the input embedding of every token whose id equals ``llava.pad_token_id`` is replaced by zeros. Attention is
  causal with masked keys, so every pad position ends with the same hidden vector.
* Output (3.2/3.3): ``hidden_states[-(skip+1)]`` (layer 30 of 32, no final norm), minus the first
  ``crop_start`` positions. The mask is *not* the merged one: ``(tokenizer_mask ++ ones(n-1))[crop_start:]``
  (misaligned with the states on purpose, as the original).
* Unconditional branch (3.4): the negative prompt (name 'person', white image); its mask is rewritten to a
  prefix of ``sum - (n-1)`` ones.
* CLIP-L (3.5): raw prompt, 77 tokens, pooled output.

:func:`encode_prompts` returns :class:`TextConditioning` ``(text_states, text_mask, text_states_2)`` for the
positive and negative branches: exactly what the DiT consumes (3.6). Tokenizers (``AutoTokenizer``) and the
image normalisation come from the user's local model directories (``local_files_only``), never the network.

Parameter tree of :class:`LlavaModel`: ``vision_tower/...`` (:class:`ClipVisionModel`),
``multi_modal_projector/linear_{1,2}``, ``language_model/...`` (:class:`LlamaModel`), ``lm_head/kernel``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import ClipVisionConfig, Config, LlamaConfig, LlavaConfig
from ..layers import Dense, to_dtype
from .clip import ClipTextModel, ClipVisionModel
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
# Logical-axis rules for placing the text encoders on a mesh (same names and defaults as the DiT).
TEXT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
    ("head_dim", None), ("layers", None),
    ("act_batch", ("data", "fsdp")), ("act_seq", "sequence"), ("act_embed", None), ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def build_prompt(prompt: str, name: str) -> str:
    """The string HunyuanCustom tokenises: template + ``"\\nThe {name} looks like<image>"`` (spec 3.1)."""
    return PROMPT_TEMPLATE.format(prompt) + "\nThe " + name + " looks like" + IMAGE_TOKEN


def num_image_features(c: ClipVisionConfig) -> int:
    return (c.image_size // c.patch_size) ** 2


# ------------------------------------------------------------------------------------------- the model


def legacy_merge(input_ids, attention_mask, text_embeds, image_features, image_token_index: int,
                 pad_token_id: int):
    """transformers 4.41.2 ``_merge_input_ids_with_image_features`` for one ``<image>`` token per row.

    ``input_ids, attention_mask [B, T]``, ``text_embeds [B, T, D]``, ``image_features [B, n, D]`` ->
    ``embeds [B, T+n-1, D]``, ``mask [B, T+n-1]``, ``position_ids [B, T+n-1]`` (see the module docstring).
    """
    b, t = input_ids.shape
    n = image_features.shape[1]
    j = jnp.arange(t + n - 1)[None, :]
    k = jnp.argmax(input_ids == image_token_index, axis=1)[:, None]
    is_img = (j >= k) & (j < k + n)
    text_idx = jnp.clip(jnp.where(j < k, j, j - (n - 1)), 0, t - 1)
    feat_idx = jnp.clip(j - k, 0, n - 1)
    ids = jnp.take_along_axis(input_ids, text_idx, axis=1)
    text = jnp.take_along_axis(text_embeds, text_idx[..., None], axis=1)
    text = jnp.where((ids == pad_token_id)[..., None], jnp.zeros_like(text), text)
    feats = jnp.take_along_axis(image_features, feat_idx[..., None], axis=1).astype(text.dtype)
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

    ``__call__(input_ids [B,T], attention_mask [B,T], pixels [B,H,W,3])`` -> ``(hidden [B, T+n-1, D], mask,
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
        feats = self.vision_tower(pixels, feature_layer=self.llava.vision_feature_layer)[:, 1:]
        return self.multi_modal_projector(feats.astype(to_dtype(self.llama.dtype)))

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


# ------------------------------------------------------------------------------------------- text stage


class TextConditioning(NamedTuple):
    """What the DiT consumes for one CFG branch (spec 3.6)."""

    text_states: jax.Array      # [B, S, D]   LLaVA states after the crop
    text_mask: jax.Array        # [B, S]      int32, as spec 3.3 (positive) / 3.4 (negative)
    text_states_2: jax.Array    # [B, D2]     CLIP-L pooled output


def llava_states(params, cfg: Config, input_ids, attention_mask, pixels):
    """Cropped states ``[B, S, D]`` and the spec-3.3 mask ``[B, S]`` (jit with ``cfg`` static)."""
    hidden, _, _ = llava_model(cfg).apply({"params": params}, input_ids, attention_mask, pixels)
    n = num_image_features(cfg.clip_vision)
    crop = cfg.llava.crop_start
    mask = jnp.concatenate([attention_mask.astype(jnp.int32),
                            jnp.ones((attention_mask.shape[0], n - 1), jnp.int32)], axis=1)
    return hidden[:, crop:], mask[:, crop:]


def uncond_mask_rewrite(text_mask, n_image_features: int):
    """Spec 3.4: rows with ``sum > n-1`` become a prefix of ``sum - (n-1)`` ones (others are kept)."""
    total = jnp.sum(text_mask, axis=1, keepdims=True)
    prefix = (jnp.arange(text_mask.shape[1])[None] < total - (n_image_features - 1)).astype(text_mask.dtype)
    return jnp.where(total > n_image_features - 1, prefix, text_mask)


def clip_pooled(params, cfg: Config, input_ids, attention_mask):
    return ClipTextModel(cfg.clip_text).apply({"params": params}, input_ids, attention_mask)[1]


_llava_states = jax.jit(llava_states, static_argnums=1)
_clip_pooled = jax.jit(clip_pooled, static_argnums=1)


# ------------------------------------------------------------------------------------------- tokenizers


def _need(model_dir: Path, files: Sequence[str], what: str) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{what}: model directory not found: {model_dir}")
    for f in files:
        if not (model_dir / f).is_file():
            raise FileNotFoundError(f"{what}: missing file {f} in {model_dir}")


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


def tokenize_llava(tokenizer, texts: Sequence[str], cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise full LLaVA strings to ``max_length = text_len + crop_start`` (right padding).

    Raises ``ValueError`` when a string would lose its ``<image>`` token to truncation (the original crashes)
    or does not contain exactly one, and when the tokenizer's ``<image>`` id disagrees with the config.
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
        if count != 1:
            raise ValueError(f"a LLaVA prompt must contain exactly one {IMAGE_TOKEN} token, found {count} "
                             f"(do not write {IMAGE_TOKEN} in the prompt text)")
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
    enc = tokenizer(list(texts), max_length=cfg.llava.clip_text_len, padding="max_length", truncation=True,
                    return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


# ------------------------------------------------------------------------------------------- images


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """Spec 2.1 LLaVA copy: padding-resize to ``size`` (white), ``/255``, normalise. Output ``[size, size, 3]``."""

    size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, image) -> np.ndarray:
        img = pad_resize(load_rgb(image), self.size, self.size)
        return self.normalise(img)

    def normalise(self, img_uint8: np.ndarray) -> np.ndarray:
        x = img_uint8.astype(np.float32) / 255.0
        return ((x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)

    def white(self) -> np.ndarray:
        """The unconditional image: constant 255, normalised (per channel ``(1 - mean) / std``)."""
        return self.normalise(np.full((self.size, self.size, 3), 255, np.uint8))


def load_image_preprocessor(model_dir: str | Path | None, cfg: Config) -> ImagePreprocessor:
    """Mean/std from ``preprocessor_config.json`` of the local LLaVA dir when present (else the CLIP values)."""
    size = cfg.clip_vision.image_size
    if model_dir is not None and (Path(model_dir) / "preprocessor_config.json").is_file():
        meta = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
        return ImagePreprocessor(size, tuple(meta.get("image_mean", CLIP_MEAN)), tuple(meta.get("image_std", CLIP_STD)))
    return ImagePreprocessor(size)


def load_rgb(image) -> np.ndarray:
    """``image``: path (read with OpenCV as BGR -> RGB, PIL fallback), PIL image, or ``[H, W, 3]`` uint8 RGB."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            import cv2

            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is not None:
                return np.ascontiguousarray(bgr[:, :, ::-1])
        except ImportError:
            pass
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB image [H, W, 3] uint8, got {arr.shape} {arr.dtype}")
    return arr


def pad_resize(img: np.ndarray, tw: int, th: int) -> np.ndarray:
    """Spec 2.1 padding-resize of ``[H, W, 3]`` uint8 into ``th x tw``: keep aspect, bilinear, white padding."""
    ih, iw = img.shape[:2]
    if th / ih < tw / iw:
        nh, nw = th, int(iw / ih * th)
    else:
        nw, nh = tw, int(ih / iw * tw)
    try:
        import cv2

        resized = cv2.resize(img, (nw, nh))
    except ImportError:  # pragma: no cover - OpenCV is the reference; PIL's bilinear differs slightly
        from PIL import Image

        resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out = np.full((th, tw, 3), 255, np.uint8)
    top, left = (th - nh) // 2, (tw - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


# ------------------------------------------------------------------------------------------- loading


@dataclasses.dataclass
class TextEncoders:
    """Everything :func:`encode_prompts` needs: config, params (possibly sharded), tokenizers, preprocessing."""

    cfg: Config
    llava_params: Any
    clip_params: Any
    llava_tokenizer: Any
    clip_tokenizer: Any
    image_preprocessor: ImagePreprocessor


def _is_hcjax_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "params").is_dir()


def _weights(path: Path, what: str):
    """Lazy state dict of a HF model dir (``model.safetensors`` or an index + shards), naming missing files."""
    from convert_weights.readers import read_state_dict

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

    ``abstract`` (e.g. :func:`abstract_sharded_params`) restores a checkpoint straight into that layout.
    """
    from convert_weights.llava import from_hf

    path = Path(path)
    if _is_hcjax_checkpoint(path):
        from ..checkpoint import load_params

        return load_params(path, abstract)
    return from_hf(_weights(path, "LLaVA weights"), cfg, dtype=dtype)


def load_clip_params(path: str | Path, cfg: Config, dtype=None, abstract=None):
    """CLIP-L text params from a converted hcjax checkpoint dir or a HF model dir with safetensors."""
    from convert_weights.clip import from_hf

    path = Path(path)
    if _is_hcjax_checkpoint(path):
        from ..checkpoint import load_params

        return load_params(path, abstract)
    return from_hf(_weights(path, "CLIP text weights"), cfg.clip_text, dtype=dtype)


def load_text_encoders(llava_dir: str | Path, clip_dir: str | Path, cfg: Config, *, llava_params=None,
                       clip_params=None, llava_weights: str | Path | None = None,
                       clip_weights: str | Path | None = None, mesh=None, rules=TEXT_RULES, dtype=None
                       ) -> TextEncoders:
    """Tokenizers and preprocessing from the local model dirs; params given, or read from ``*_weights`` (hcjax
    checkpoint or HF dir; default: the model dirs themselves), cast to ``dtype`` when given (converted HF weights /
    sharded restores). With ``mesh`` the params are placed on it by the logical-axis ``rules``."""
    from .clip import abstract_text_params

    dtype = None if dtype is None else jnp.dtype(dtype)
    llava_tok = load_llava_tokenizer(llava_dir)
    clip_tok = load_clip_tokenizer(clip_dir)
    boxed = (abstract_params(cfg), abstract_text_params(cfg.clip_text)) if mesh is not None else (None, None)
    targets = [None if b is None else abstract_sharded_params(b, mesh, rules, dtype) for b in boxed]
    if llava_params is None:
        llava_params = load_llava_params(llava_weights or llava_dir, cfg, dtype, targets[0])
    if clip_params is None:
        clip_params = load_clip_params(clip_weights or clip_dir, cfg, dtype, targets[1])
    if mesh is not None:   # no-op for params restored straight into their shardings
        llava_params = shard_params(llava_params, boxed[0], mesh, rules)
        clip_params = shard_params(clip_params, boxed[1], mesh, rules)
    return TextEncoders(cfg, llava_params, clip_params, llava_tok, clip_tok, load_image_preprocessor(llava_dir, cfg))


# ------------------------------------------------------------------------------------------- encode


def _as_list(x, n: int, what: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{what}: expected {n} entries, got {len(x)}")
        return list(x)
    return [x] * n


def encode_prompts(enc: TextEncoders, prompts: str | Sequence[str], images, *,
                   negative_prompts: str | Sequence[str] = "", item_names: str | Sequence[str] | None = None
                   ) -> tuple[TextConditioning, TextConditioning]:
    """Encode the positive (with the reference image and item name) and negative (white image, 'person') branches.

    ``images``: one reference image or one per prompt (path, PIL, ``[H,W,3]`` uint8 RGB, or an already
    preprocessed ``[size,size,3]`` float32 array). Returns ``(positive, negative)`` :class:`TextConditioning`;
    the negative mask has the spec-3.4 rewrite applied (``llava.uncond_mask_rewrite``). Stack as
    ``[negative, positive]`` for CFG.
    """
    cfg, lc = enc.cfg, enc.cfg.llava
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    b = len(prompts)
    negs = _as_list(negative_prompts, b, "negative_prompts")
    names = _as_list(lc.item_name if item_names is None else item_names, b, "item_names")
    imgs = _as_list(images, b, "images") if isinstance(images, (list, tuple)) else [images] * b
    pix = [im if isinstance(im, np.ndarray) and im.dtype == np.float32 else enc.image_preprocessor(im) for im in imgs]
    want = (cfg.clip_vision.image_size, cfg.clip_vision.image_size, 3)
    for p in pix:
        if p.shape != want:
            raise ValueError(f"preprocessed image has shape {p.shape}, expected {want}")
    white = enc.image_preprocessor.white()
    texts = [build_prompt(p, nm) for p, nm in zip(prompts, names)] + \
            [build_prompt(p, lc.negative_item_name) for p in negs]
    ids, mask = tokenize_llava(enc.llava_tokenizer, texts, cfg)
    pixels = np.stack(pix + [white] * b)
    states, tmask = _llava_states(enc.llava_params, cfg, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    cids, cmask = tokenize_clip(enc.clip_tokenizer, prompts + negs, cfg)
    pooled = _clip_pooled(enc.clip_params, cfg, jnp.asarray(cids), jnp.asarray(cmask))
    neg_mask = tmask[b:]
    if lc.uncond_mask_rewrite:
        neg_mask = uncond_mask_rewrite(neg_mask, num_image_features(cfg.clip_vision))
    pos = TextConditioning(states[:b], tmask[:b], pooled[:b])
    neg = TextConditioning(states[b:], neg_mask, pooled[b:])
    return pos, neg


# ------------------------------------------------------------------------------------------- sharding


def _fit(spec, shape, mesh):
    """Drop mesh axes from dimensions they do not divide (that dimension is then replicated)."""
    from jax.sharding import PartitionSpec as P

    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        kept: list[str] = []
        for a in names:
            if a in mesh.shape and dim % (math.prod(mesh.shape[x] for x in kept) * mesh.shape[a]) == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def param_shardings(abstract_boxed, mesh, rules=TEXT_RULES):
    """Boxed abstract params (``nn.Partitioned`` leaves) -> tree of ``NamedSharding`` by logical-axis ``rules``."""
    from jax.sharding import NamedSharding

    def one(x):
        if isinstance(x, nn.Partitioned):
            spec = nn.logical_to_mesh_axes(tuple(x.names), rules)
            return NamedSharding(mesh, _fit(spec, x.value.shape, mesh))
        return NamedSharding(mesh, jax.sharding.PartitionSpec())

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def shard_params(params, abstract_boxed, mesh, rules=TEXT_RULES):
    """Place plain ``params`` (e.g. converter output) on ``mesh`` using the logical names of ``abstract_boxed``.

    ``rules`` is a sequence of ``(logical_name, mesh_axis | tuple | None)``; default: ``embed -> fsdp``,
    ``heads/mlp/vocab -> tensor``. Axes that do not divide a dimension are dropped (replicated) for it.
    """
    shardings = param_shardings(abstract_boxed, mesh, rules)
    values = nn.unbox(params)
    if jax.tree.structure(values) != jax.tree.structure(shardings):
        raise ValueError("shard_params: the params tree does not match the model's parameter tree")
    return jax.device_put(values, shardings)


def abstract_sharded_params(abstract_boxed, mesh, rules=TEXT_RULES, dtype=None):
    """``ShapeDtypeStruct`` tree with shardings (nothing allocated), e.g. an orbax restore target."""
    shardings = param_shardings(abstract_boxed, mesh, rules)
    return jax.tree.map(lambda v, sh: jax.ShapeDtypeStruct(v.shape, jnp.dtype(dtype or v.dtype), sharding=sh),
                        nn.unbox(abstract_boxed), shardings)


def shard_llava_params(params, cfg: Config, mesh, rules=TEXT_RULES):
    """:func:`shard_params` for :class:`LlavaModel` (the 8B encoder)."""
    return shard_params(params, abstract_params(cfg), mesh, rules)
