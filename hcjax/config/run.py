"""Run configs: the device mesh (and its check against the DiT), training data, DiT and VAE training (full or
LoRA), sampling defaults, and the top-level :class:`Config` whose sections are the YAML file's top-level keys."""

from __future__ import annotations

import dataclasses
import re
import typing

from ..axes import AXES, RING_KERNELS, RULE_SETS
from .base import ConfigError
from .models import (
    ClipTextConfig, ClipVisionConfig, DiTConfig, LlamaConfig, LlavaConfig, VAEConfig, WhisperConfig,
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh over axes (data, fsdp, sequence, tensor); -1 fills with the remaining devices. How attention
    uses the sequence axis is the model's choice: ``dit.sequence_parallel``."""

    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1
    rules: str = "default"               # logical-axis rule set (hcjax.axes.RULE_SETS)

    AXES: typing.ClassVar[tuple[str, ...]] = AXES
    RULE_SETS: typing.ClassVar[tuple[str, ...]] = tuple(RULE_SETS)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in self.AXES)

    def validate(self, where: str = "mesh") -> None:
        """Checks that need no devices or model (those are in :func:`check_mesh`)."""
        for a in self.AXES:
            v = getattr(self, a)
            if v == 0 or v < -1:
                raise ConfigError(f"{where}.{a}={v}: mesh degrees are positive integers, or -1 to fill the devices")
        if sum(v == -1 for v in self.shape) > 1:
            raise ConfigError(f"{where}: at most one of {self.AXES} may be -1 (got {dict(zip(self.AXES, self.shape))})")
        if self.rules not in self.RULE_SETS:
            raise ConfigError(f"{where}.rules={self.rules!r}; expected one of {self.RULE_SETS}")


def check_mesh(mesh_cfg: MeshConfig, dit_cfg: DiTConfig, shape: tuple[int, ...] | None = None) -> str | None:
    """Validate mesh degrees against the DiT (heads, MLP width, attention kernel and ``dit.sequence_parallel``).

    ``shape``: the resolved degrees (default: the config's, ``-1`` read as 1). Returns the sequence-parallel mode
    attention will use (``ulysses``, ``ring`` or ``hybrid`` with ``dit.ulysses_degree``), or None without a
    sequence axis."""
    shape = shape or tuple(max(s, 1) for s in mesh_cfg.shape)
    named = dict(zip(AXES, shape))
    tp, sp = named["tensor"], named["sequence"]
    heads = dit_cfg.num_heads
    if heads % tp:
        raise ConfigError(f"mesh.tensor={tp} must divide the {heads} attention heads "
                          f"(valid: {[d for d in range(1, heads + 1) if heads % d == 0]})")
    if dit_cfg.mlp_hidden % tp:
        raise ConfigError(f"mesh.tensor={tp} must divide the MLP width {dit_cfg.mlp_hidden}")
    if sp == 1:
        return None
    local = heads // tp
    u = dit_cfg.ulysses_degree
    if u:
        if sp % u:
            raise ConfigError(f"dit.ulysses_degree={u} must divide mesh.sequence={sp} (Ulysses groups of {u} x ring "
                              f"across sequence/{u} groups; valid: {[d for d in range(1, sp + 1) if sp % d == 0]})")
        if local % u:
            raise ConfigError(f"dit.ulysses_degree={u} must divide the {local} heads per tensor shard ({heads} heads "
                              f"/ tensor {tp})")
        if u < sp and dit_cfg.attention not in RING_KERNELS:
            raise ConfigError(f"dit.ulysses_degree={u} < mesh.sequence={sp} runs ring attention across the groups, "
                              f"which needs dit.attention in {RING_KERNELS} (got {dit_cfg.attention!r})")
        return "ulysses" if u == sp else "ring" if u == 1 else "hybrid"
    ulysses_ok = local % sp == 0
    ring_ok = dit_cfg.attention in RING_KERNELS
    mode = dit_cfg.sequence_parallel
    if mode == "auto":
        mode = "ulysses" if ulysses_ok else "ring"
    ulysses_why = (f"Ulysses needs the {local} heads per tensor shard ({heads} heads / tensor {tp}) to be "
                   f"divisible by {sp}")
    ring_why = f"ring attention needs dit.attention in {RING_KERNELS} (got {dit_cfg.attention!r})"
    if not ulysses_ok and not ring_ok:
        raise ConfigError(f"mesh.sequence={sp} fits neither Ulysses nor ring: {ulysses_why}; {ring_why}")
    if mode == "ulysses" and not ulysses_ok:
        raise ConfigError(f"mesh.sequence={sp} does not fit Ulysses: {ulysses_why}; "
                          "set dit.sequence_parallel: ring (or auto)")
    if mode == "ring" and not ring_ok:
        raise ConfigError(f"mesh.sequence={sp} with ring: {ring_why}; Ulysses would fit: "
                          "set dit.sequence_parallel: ulysses (or auto)")
    return mode


# How 2-4 reference images are laid out before encoding (hcjax.media.layout_references): "centre" (the release:
# each image padding-resized to the whole frame) or "columns" (image k padding-resized into the k-th of K equal
# columns of a white frame, where a model trained that way draws subject k). One image: the same in both.
REF_LAYOUTS = ("centre", "columns")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data (``hcjax.data``): a raw dataset directory (mp4 + per-clip JSON) in ``raw`` mode, or the output
    of ``python -m hcjax.precompute`` (cached latents and text embeddings) in ``precomputed`` mode."""

    path: str = ""
    mode: str = "precomputed"          # precomputed | raw
    num_frames: int = 33               # video frames per sample (4k+1)
    frame_stride: int = 1              # temporal subsampling of the source video
    buckets: tuple[tuple[int, int], ...] = ((256, 256),)    # (height, width) in pixels, multiples of 16
    ref_source: str = "auto"           # auto (the clip's reference image if any, else a frame) | image | frame
    ref_frame: int = 0                 # frame of the sampled window used as reference (-1: a random frame)
    ref_layout: str = "centre"         # clips of K >= 2 subjects: centre | columns (hcjax.media.layout_references)
    workers: int = 0                   # grain worker processes (0: read in the training process)
    threads: int = 2                   # reading threads per process
    prefetch: int = 2                  # per-thread read-ahead buffer
    seed: int = 0                      # shuffling / frame sampling
    strict: bool = False               # raise on the first bad clip instead of logging and skipping it
    # encoders (raw mode and hcjax.precompute)
    vae_weights: str = ""              # hcjax VAE checkpoint dir, or "random" (random weights: tests/demos only)
    text_encoder: str = "llava"        # llava | hash (deterministic word-hash stand-in without weights: tests/demos)
    llava_dir: str = ""                # tokenizer + preprocessor dir of llava-llama-3-8b-v1_1
    clip_dir: str = ""                 # tokenizer dir of openai_clip-vit-large-patch14
    llava_weights: str = ""            # default: llava_dir
    clip_weights: str = ""             # default: clip_dir
    whisper_weights: str = ""          # audio models: hcjax Whisper checkpoint dir

    LOCAL_PATHS: typing.ClassVar[tuple[str, ...]] = ("path", "vae_weights", "llava_dir", "clip_dir", "llava_weights",
                                                     "clip_weights", "whisper_weights")
    MODES: typing.ClassVar[tuple[str, ...]] = ("precomputed", "raw")
    TEXT_ENCODERS: typing.ClassVar[tuple[str, ...]] = ("llava", "hash")
    REF_SOURCES: typing.ClassVar[tuple[str, ...]] = ("auto", "image", "frame")

    def without_local_paths(self) -> "DataConfig":
        """This section with the paths into one machine's files (``LOCAL_PATHS``) emptied; ``vae_weights: random``
        (no file) kept. What a shared bundle carries: its data settings without its training machine's paths."""
        return dataclasses.replace(self, **{f: "" for f in self.LOCAL_PATHS
                                            if not (f == "vae_weights" and self.vae_weights == "random")})

    def validate(self, where: str = "train.data") -> None:
        if self.mode not in self.MODES:
            raise ConfigError(f"{where}.mode={self.mode!r}; expected one of {self.MODES}")
        if self.text_encoder not in self.TEXT_ENCODERS:
            raise ConfigError(f"{where}.text_encoder={self.text_encoder!r}; expected one of {self.TEXT_ENCODERS}")
        if self.ref_source not in self.REF_SOURCES:
            raise ConfigError(f"{where}.ref_source={self.ref_source!r}; expected one of {self.REF_SOURCES}")
        if self.ref_layout not in REF_LAYOUTS:
            raise ConfigError(f"{where}.ref_layout={self.ref_layout!r}; expected one of {REF_LAYOUTS}")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ConfigError(f"{where}.num_frames={self.num_frames}: the causal VAE needs 4k+1 frames (1, 5, 9, ...)")
        if self.frame_stride < 1:
            raise ConfigError(f"{where}.frame_stride={self.frame_stride} must be >= 1")
        if not self.buckets:
            raise ConfigError(f"{where}.buckets is empty; give at least one [height, width]")
        for hw in self.buckets:
            if len(hw) != 2 or any(v < 16 or v % 16 for v in hw):
                raise ConfigError(f"{where}.buckets entry {list(hw)}: expected [height, width], positive multiples "
                                  "of 16 (VAE 8x and patch 2x)")
        if not -1 <= self.ref_frame < self.num_frames:
            raise ConfigError(f"{where}.ref_frame={self.ref_frame} must be in [-1, num_frames)")
        if self.workers < 0 or self.threads < 1 or self.prefetch < 0:
            raise ConfigError(f"{where}: need workers >= 0, threads >= 1 and prefetch >= 0")


# default LoRA targets (``re.fullmatch`` over DiT module paths): the attention qkv/proj and MLP linears of the
# double and single blocks; modulations, refiner, embedders and final layer excluded (musubi-tuner's choice)
DEFAULT_LORA_TARGETS = (r"(double_blocks/(img|txt)_(attn_qkv|attn_proj|mlp/fc1|mlp/fc2)"
                        r"|single_blocks/(linear1_qkv|linear1_mlp|linear2_attn|linear2_mlp))")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA training (``train.lora``; ``hcjax.lora``): ``rank > 0`` trains adapters on the frozen DiT (off by
    default). The adapted Dense computes ``W x + (alpha / rank) * b(a(dropout(x)))``."""

    rank: int = 0                      # 0: full fine-tuning
    alpha: float = 0.0                 # scale alpha / rank (0: alpha = rank, scale 1)
    targets: str = DEFAULT_LORA_TARGETS
    dropout: float = 0.0               # dropout on each adapted Dense's LoRA input (per layer, per step)
    init: str = "gaussian"             # gaussian (a ~ N(0, 1/rank)) | kaiming (peft's default); b = 0 either way

    INITS: typing.ClassVar[tuple[str, ...]] = ("gaussian", "kaiming")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank if self.rank else 1.0

    def validate(self, where: str = "train.lora") -> None:
        if self.rank < 0 or self.alpha < 0:
            raise ConfigError(f"{where}: need rank >= 0 (0: off) and alpha >= 0 (0: alpha = rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout={self.dropout} must be in [0, 1)")
        if self.init not in self.INITS:
            raise ConfigError(f"{where}.init={self.init!r}; expected one of {self.INITS}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ConfigError(f"{where}.targets={self.targets!r} is not a regular expression: {e}") from None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Flow-matching training (``hcjax.training``, ``train.py``)."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 8                # global batch over all hosts; must divide by mesh data * fsdp
    microbatch: int = 0                # samples per DiT forward/backward, gradients averaged (0: the whole batch)
    text_bucket: int = 0               # > 0: each batch's text cut to its longest prompt (valid tokens moved up
                                       # ahead of the padding, training.cut_text), rounded up to a multiple of
                                       # this (same maths, fewer tokens; one compile per length); 0: every batch
                                       # at the data's full text length
    learning_rate: float = 1e-5
    lr_schedule: str = "cosine"        # cosine | constant (both after a linear warmup)
    warmup_steps: int = 100
    end_lr_ratio: float = 0.0          # cosine end value as a fraction of learning_rate
    weight_decay: float = 0.0          # AdamW decay (kernels and embeddings only)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0             # global-norm clipping (0: off)
    ema_decay: float = 0.0             # EMA of params (0: off)
    timestep_sampling: str = "logit_normal"   # logit_normal | uniform
    flow_shift: float = 1.0            # sigma shift of the training noise levels
    drop_text: float = 0.1             # condition dropout for CFG: negative-branch text conditioning
    drop_image: float = 0.0            # white-image reference latents (ip-CFG)
    drop_audio: float = 0.1            # all-zero audio features
    init_from: str = ""                # hcjax DiT checkpoint dir (converted weights); "" = random init
    finetune_steps: int = 0            # demo build: a second run from the first's (EMA) params, same seed and data
    finetune_learning_rate: float = 5e-4
    two_subject_steps: int = 0         # demo build: then a run on single + two-subject clips (finetune_learning_rate)
    two_subject_restarts: int = 1      # demo build: that many such runs in a row, each from the one before
    log_every: int = 10
    save_every: int = 500
    keep: int = 3                      # checkpoints kept
    async_save: bool = True
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()

    LR_SCHEDULES: typing.ClassVar[tuple[str, ...]] = ("cosine", "constant")
    SAMPLING: typing.ClassVar[tuple[str, ...]] = ("logit_normal", "uniform")

    def validate(self, where: str = "train") -> None:
        for f in ("steps", "batch_size", "log_every", "save_every", "keep"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{where}.{f}={getattr(self, f)} must be >= 1")
        if self.learning_rate <= 0 or self.warmup_steps < 0:
            raise ConfigError(f"{where}: need learning_rate > 0 and warmup_steps >= 0")
        if self.lr_schedule not in self.LR_SCHEDULES:
            raise ConfigError(f"{where}.lr_schedule={self.lr_schedule!r}; expected one of {self.LR_SCHEDULES}")
        if self.timestep_sampling not in self.SAMPLING:
            raise ConfigError(f"{where}.timestep_sampling={self.timestep_sampling!r}; expected one of {self.SAMPLING}")
        if self.flow_shift <= 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError(f"{where}: need flow_shift > 0, grad_clip >= 0 and weight_decay >= 0")
        if (self.finetune_steps < 0 or self.finetune_learning_rate <= 0 or self.two_subject_steps < 0
                or self.two_subject_restarts < 1):
            raise ConfigError(f"{where}: need finetune_steps >= 0, two_subject_steps >= 0, two_subject_restarts >= 1 "
                              f"and finetune_learning_rate > 0")
        if self.text_bucket < 0:
            raise ConfigError(f"{where}.text_bucket={self.text_bucket} must be >= 0 (0: off)")
        if self.microbatch < 0 or (self.microbatch and self.batch_size % self.microbatch):
            raise ConfigError(f"{where}.microbatch={self.microbatch} must be 0 (whole batch) or divide "
                              f"{where}.batch_size={self.batch_size}")
        for f in ("drop_text", "drop_image", "drop_audio", "ema_decay"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ConfigError(f"{where}.{f}={getattr(self, f)} must be in [0, 1)")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ConfigError(f"{where}.end_lr_ratio={self.end_lr_ratio} must be in [0, 1]")
        self.data.validate(f"{where}.data")
        self.lora.validate(f"{where}.lora")


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    """Training the 3D causal VAE from scratch (``train.py --stage vae``; the demo model): L1 + MSE reconstruction
    of random ``crop`` x ``crop`` x ``frames`` windows of a raw clip directory, plus ``kl_weight`` x KL."""

    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    frames: int = 5                    # 4k+1 frames per training window
    crop: int = 32                     # square crop side in pixels (multiple of the spatial compression)
    kl_weight: float = 1e-4
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    init_logvar: float = -6.0          # initial posterior log-variance (quant_conv bias of the logvar half)
    seed: int = 0
    log_every: int = 50
    data: str = ""                     # raw clip directory (mp4 files); default: train.data.path
    init_from: str = ""                # hcjax VAE checkpoint to continue from ("" : random init)
    ref_fraction: float = 0.0          # share of windows that are stills of the clips' *_ref.png reference images
    finetune_steps: int = 0            # demo build: a second run continuing the first (fresh optimizer, seed + 1)
    finetune_learning_rate: float = 1e-3
    microbatch: int = 0                # windows per forward/backward pass, gradients averaged (0 : the whole batch)
    save_every: int = 500              # checkpoint every N steps (RUN/checkpoints; train.py --stage vae --resume)
    keep: int = 2                      # newest checkpoints kept

    def validate(self, where: str = "vae_train") -> None:
        for f in ("steps", "batch_size", "frames", "crop", "log_every", "save_every", "keep"):
            if getattr(self, f) < 1:
                raise ConfigError(f"{where}.{f}={getattr(self, f)} must be >= 1")
        if (self.frames - 1) % 4:
            raise ConfigError(f"{where}.frames={self.frames}: the causal VAE needs 4k+1 frames (1, 5, 9, ...)")
        if self.learning_rate <= 0 or self.kl_weight < 0 or self.mse_weight < 0 or self.warmup_steps < 0:
            raise ConfigError(f"{where}: need learning_rate > 0 and kl_weight, mse_weight, warmup_steps >= 0")
        if not 0.0 <= self.ref_fraction <= 1.0:
            raise ConfigError(f"{where}.ref_fraction={self.ref_fraction} must be in [0, 1]")
        if self.microbatch < 0 or (self.microbatch and self.batch_size % self.microbatch):
            raise ConfigError(f"{where}.microbatch={self.microbatch} must be 0 (whole batch) or divide "
                              f"{where}.batch_size={self.batch_size}")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Defaults of ``sample.py`` for this model (each is a CLI flag; the flag wins). Released presets: 720p."""

    video_size: tuple[int, int] = (720, 1280)
    frames: int = 129
    steps: int = 30
    flow_shift: float = 13.0
    cfg_scale: float = 7.5
    ip_cfg_scale: float = 0.0          # image guidance (spec 6.3; image model only, 0 = off as released)
    fps: int = 25
    ref_image: str = ""                # path relative to the repository root ("" : assets/demo_subject.png)
    pos_prompt: str = "Realistic, High-quality. The object moves across the scene."
    neg_prompt: str = ""
    item_name: str = "object"
    use_deepcache: bool = True         # the original's fixed step cache (spec 6.4)
    seed: int = 1024
    audio_strength: float = 0.8        # audio model: scale of the AudioNet injections (the original's default)
    expand_scale: int = 5              # editing: mask dilation in latent pixels (the original's default)
    ref_layout: str = "centre"         # 2-4 reference images: centre | columns (hcjax.media.layout_references)

    def validate(self, where: str = "sample") -> None:
        if self.ref_layout not in REF_LAYOUTS:
            raise ConfigError(f"{where}.ref_layout={self.ref_layout!r}; expected one of {REF_LAYOUTS}")
        h, w = self.video_size
        if h < 16 or w < 16 or h % 16 or w % 16:
            raise ConfigError(f"{where}.video_size={list(self.video_size)}: need multiples of 16")
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ConfigError(f"{where}.frames={self.frames}: need 4k+1 frames")
        if self.steps < 1 or self.flow_shift <= 0 or self.fps < 1:
            raise ConfigError(f"{where}: need steps >= 1, flow_shift > 0 and fps >= 1")


@dataclasses.dataclass(frozen=True)
class Config:
    dit: DiTConfig = DiTConfig()
    vae: VAEConfig = VAEConfig()
    llama: LlamaConfig = LlamaConfig()
    clip_vision: ClipVisionConfig = ClipVisionConfig()
    clip_text: ClipTextConfig = ClipTextConfig()
    llava: LlavaConfig = LlavaConfig()
    mesh: MeshConfig = MeshConfig()
    whisper: WhisperConfig = WhisperConfig()
    train: TrainConfig = TrainConfig()
    vae_train: VAETrainConfig = VAETrainConfig()
    sample: SampleConfig = SampleConfig()

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if hasattr(sub, "validate"):
                sub.validate(f.name)
        check_mesh(self.mesh, self.dit)           # mesh vs DiT heads / kernel, device-count independent
        if self.dit.ref_tokens == "column" and self.train.data.ref_layout != "columns":
            raise ConfigError(f"dit.ref_tokens=column reads reference k from its k-th column only: it needs "
                              f"train.data.ref_layout=columns (got {self.train.data.ref_layout!r})")
        return self
