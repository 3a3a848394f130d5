"""Building the demo model: ``python -m demo build --workdir RUN`` runs the committed bundle's recipe
(``configs/demo.yaml`` in :data:`~demo.subjects.DEMO_WORLD`) into ``assets/demo/model``: from nothing but the VAE,
trained once and kept frozen (``--train-vae`` trains that too).

Stages (each skipped when its output in ``RUN`` exists, so an interrupted build continues; a training stage,
VAE or DiT, interrupted midway continues from its last checkpoint):

1. ``data``   synthetic subject clips (:mod:`hcjax.data.synthetic`) of the training subjects only, a share
              (``--two-subject``) of them with two subjects; the :data:`~demo.subjects.HELD_OUT` subjects never
              appear in training (they are the evaluation set);
2. ``text``   the text towers: a LLaVA BPE tokenizer trained on the prompt template and the synthetic captions,
              the bundled char-level CLIP tokenizer, and seeded random (frozen) LLaVA / CLIP text weights;
3. ``vae``    the VAE trained once and kept frozen: by default the committed bundle's
              (:data:`~demo.subjects.DEMO_VAE`), or ``--vae DIR``, copied; with ``--train-vae`` the 3D
              causal VAE trained from scratch (``train.py --stage vae``), then ``vae_finetune``: a second run from
              those weights (``vae_train.finetune_steps``, a warm restart with a fresh optimizer);
4. ``latents`` :func:`hcjax.data.encode.precompute` with that VAE and those text towers;
5. ``dit``    :func:`hcjax.training.train` (flow matching) on the cached latents, then ``dit_finetune``: with
              ``train.finetune_steps``, a second run from the first one's EMA params (a warm restart: fresh
              optimizer and learning-rate schedule peaking at ``train.finetune_learning_rate``, same seed and data);
              or, with ``--dit DIR``, a DiT trained before, copied; then ``data_two`` / ``latents_two`` /
              ``dit_two`` with ``train.two_subject_steps``: the single-subject clips plus
              ``World.two_subject_clips`` two-subject clips, encoded, and another warm restart on them, repeated
              ``train.two_subject_restarts`` times in all (``dit_two``, ``dit_two_2``, ...: each from the last);
6. ``bundle`` an hcjax bundle (``dit/ vae/ llava/ clip/``) written to ``--out`` (default ``assets/demo/model``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from hcjax import training, vae_training
from hcjax.checkpoint import (dit_differences, export_training_params, load_checkpoint_config, random_params,
                              save_params)
from hcjax.conditioning import clip, llava
from hcjax.conditioning.llava import PROMPT_TEMPLATE
from hcjax.config import Config, load_config, to_dict
from hcjax.data import encode, synthetic
from hcjax.media import write_video
from hcjax.models import TINY_TOKENIZERS
from hcjax.models.text import load_text_encoders

from .subjects import (DEMO_BUNDLE, DEMO_CONFIG, DEMO_VAE, DEMO_WORLD, FRAMES, PHRASES, SIZE, SUBJECTS, TEMPLATES,
                       TRAIN_SUBJECTS, TRAVEL, TWO_TEMPLATES, WORLD_FILE, World, caption, caption_two, random_color)


def make_dataset(out: Path, num_clips: int, seed: int = 0, two_subject: float = 0.0, world: World = World()) -> Path:
    """Training clips of :data:`TRAIN_SUBJECTS` only, with varied captions (layout of :mod:`hcjax.data.synthetic`).
    ``two_subject``: that share of the clips (every clip whose own draw falls below it) shows two training
    subjects of different colours and shapes (:meth:`demo.subjects.World.two_subject_clip`, captions
    :func:`demo.subjects.caption_two`); 0 writes exactly the single-subject dataset it always did.
    ``world``: the single-subject clips' subject radius and colours (:class:`demo.subjects.World`; a random colour
    comes from its clip's own seed); recorded as ``out/demo.json``."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i in range(num_clips):
        stem = f"clip_{i:04d}"
        if two_subject and np.random.default_rng([seed, i, 2]).uniform() < two_subject:
            _write_two_subject_clip(tmp, stem, np.random.default_rng([seed, i, 2, 1]), world)
            continue
        rng = np.random.default_rng([seed, i])
        subject = TRAIN_SUBJECTS[rng.integers(len(TRAIN_SUBJECTS))]
        rgb = random_color(np.random.default_rng([seed, i, 3])) if world.random_colors else None
        video, ref, meta = synthetic.make_clip(rng, FRAMES, SIZE, SIZE, subject=subject, travel=TRAVEL,
                                               radius=world.subject_radius, rgb=rgb)
        meta["caption"], meta["item_name"] = caption(rng, meta["motion"])
        Image.fromarray(ref).save(tmp / f"{stem}_ref.png")
        meta["ref_image"] = f"{stem}_ref.png"
        write_video(tmp / f"{stem}.mp4", video, fps=8, crf=12)
        (tmp / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    world.save(tmp)
    tmp.replace(out)
    return out


def _write_two_subject_clip(out: Path, stem: str, rng: np.random.Generator, world: World) -> None:
    """Two training subjects of different colours and shapes (``world``'s layout), caption and references."""
    while True:
        a, b = (TRAIN_SUBJECTS[j] for j in rng.choice(len(TRAIN_SUBJECTS), 2, replace=False))
        if a[0] != b[0] and a[2] != b[2]:
            break
    video, refs, meta, _ = world.two_subject_clip(rng, picks=[a, b])
    meta["caption"], meta["item_names"] = caption_two(rng, [a[0], b[0]], [sb["motion"] for sb in meta["subjects"]])
    meta["ref_images"] = [f"{stem}_ref{k}.png" for k in range(2)]
    for name, im in zip(meta["ref_images"], refs):
        Image.fromarray(im).save(out / name)
    write_video(out / f"{stem}.mp4", video, fps=8, crf=12)
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=1))


def make_two_subject_data(out: Path, single: Path, world: World, seed: int = 1) -> Path:
    """The ``dit_two`` stage's clips: every clip of the dataset ``single`` (linked, not copied) and
    ``world.two_subject_clips`` new two-subject clips ``two_NNNN`` of training subjects in ``world``'s layout."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(Path(single).iterdir()):
        if f.name != WORLD_FILE:
            (tmp / f.name).symlink_to(f.absolute())
    for i in range(world.two_subject_clips):
        _write_two_subject_clip(tmp, f"two_{i:04d}", np.random.default_rng([seed, i, 2]), world)
    world.save(tmp)
    tmp.replace(out)
    return out


def tokenizer_corpus(two_subject: bool = False) -> list[str]:
    """The captions (many times, so that their words become single tokens) + the template head and tail once;
    with ``two_subject`` also the two-subject captions and their item names."""
    caps = [t.format(p=p) + f"\nThe {n} looks like"
            for _ in SUBJECTS for t in TEMPLATES for d in PHRASES for p in PHRASES[d] for n in ("object", "person")]
    if two_subject:
        colors = list(synthetic.COLORS)
        caps += [t.format(c0=c0, c1=c1, p0=p0, p1=p1) + f"\nThe {c0} object looks like\nThe {c1} object looks like"
                 for c0 in colors for c1 in colors if c0 != c1 for t in TWO_TEMPLATES
                 for axis in (("left", "right"), ("up", "down")) for d0 in axis for d1 in axis
                 for p0 in PHRASES[d0] for p1 in PHRASES[d1]]
    return caps + [PROMPT_TEMPLATE.format("") + "\nThe person looks like"]


def make_llava_tokenizer(out: Path, base_vocab: int = 500, corpus=None, two_subject: bool = False) -> Path:
    """Llama-3-style byte-level BPE (BOS via the post-processor) trained on ``corpus`` (default: the template and
    the demo captions), ``<image>`` = ``base_vocab`` and ``<pad>`` = ``base_vocab + 1``; saved as a transformers
    fast tokenizer. The tests' tiny tokenizers are built with it too."""
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=base_vocab, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(two_subject) if corpus is None else corpus, trainer)
    if tok.get_vocab_size() < base_vocab:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(base_vocab - tok.get_vocab_size())])
    tok.add_special_tokens(["<image>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<pad>")
    fast.save_pretrained(str(out))
    return out


def crop_start(tokenizer) -> int:
    """Tokens before the user text: BOS + system part + user header of the template."""
    head = PROMPT_TEMPLATE.split("{}")[0]
    marker = "Zq"     # any text: the head must tokenise identically with and without it
    ids = tokenizer(head + marker)["input_ids"]
    n = len(tokenizer(head)["input_ids"])
    if ids[:n] != tokenizer(head)["input_ids"]:
        raise ValueError("the demo tokenizer merges the template head with the user text")
    return n


def make_text_towers(cfg: Config, out: Path, seed: int = 7, two_subject: bool = False) -> tuple[Path, Path]:
    """``out/llava`` and ``out/clip``: tokenizers (the LLaVA one also trained on two-subject captions with
    ``two_subject``) + seeded random weights as hcjax checkpoints."""
    from transformers import AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    make_llava_tokenizer(tmp / "llava.tok", two_subject=two_subject)
    tok = AutoTokenizer.from_pretrained(str(tmp / "llava.tok"), local_files_only=True)
    n = crop_start(tok)
    if n != cfg.llava.crop_start:
        raise ValueError(f"the demo tokenizer has crop_start {n} but the config says llava.crop_start="
                         f"{cfg.llava.crop_start}; set it to {n} in configs/demo.yaml")
    save_params(tmp / "llava", random_params(llava.abstract_params(cfg), seed, std=None), cfg)
    save_params(tmp / "clip", random_params(clip.abstract_text_params(cfg.clip_text), seed + 1, std=None), cfg)
    for f in (tmp / "llava.tok").iterdir():
        shutil.copy2(f, tmp / "llava" / f.name)
    for f in (TINY_TOKENIZERS / "clip").iterdir():
        shutil.copy2(f, tmp / "clip" / f.name)
    shutil.rmtree(tmp / "llava.tok")
    tmp.replace(out)
    return out / "llava", out / "clip"


def _warm_restart(cfg: Config, first: Path, run: Path, print_fn) -> None:
    """Train ``cfg`` in ``run`` from the params of the run (or copied DiT) ``first``: exported into ``run/init``
    (``cfg.train.init_from``) first, the same files again on a rerun."""
    if (first / "params").is_dir():
        shutil.copytree(first / "params", run / "init", dirs_exist_ok=True)
    else:
        export_training_params(first / "checkpoints", run / "init", overwrite=True)
    training.train(cfg, run, resume=True, print_fn=print_fn, progress=False)
    (run / "done").touch()


def _stage(name: str, done: Path, fn, print_fn) -> None:
    if done.exists():
        print_fn(f"[{name}] exists: {done}")
        return
    t0 = time.perf_counter()
    print_fn(f"[{name}] ...")
    fn()
    print_fn(f"[{name}] done in {time.perf_counter() - t0:.0f}s")


def _weight_files(d: Path) -> dict[str, bytes]:
    """A checkpoint directory's files by relative path, without its top-level ``config.json`` (a bundle rewrites
    that one; the weights are what makes two VAEs the same)."""
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*"))
            if f.is_file() and f.relative_to(d) != Path("config.json")}


def _check_workdir_vae(vae_run: Path, vae) -> None:
    """A rerun skips the ``vae`` stage when ``vae_run`` has one: refuse when that is not the VAE asked for."""
    if not (vae_run / "params").exists():
        return
    trained = (vae_run / "checkpoints").exists()
    if vae is None and not trained:
        raise ValueError(f"{vae_run} holds a frozen VAE copied by an earlier build; --train-vae needs a new "
                         "--workdir")
    if vae is not None and (trained or _weight_files(vae_run / "params") != _weight_files(Path(vae))):
        raise ValueError(f"{vae_run} holds another VAE than --vae {vae}"
                         f"{' (trained by an earlier --train-vae build)' if trained else ''}; use a new --workdir")


def build(workdir: str | Path, out: str | Path = DEMO_BUNDLE, *, config: str | Path = DEMO_CONFIG,
          num_clips: int = 1200, two_subject: float = 0.0, vae: str | Path | None = DEMO_VAE,
          dit: str | Path | None = None, world: World = DEMO_WORLD, overrides=(), overwrite: bool = False,
          print_fn=print) -> Path:
    """Run every stage (module docstring) in ``workdir``; write the bundle to ``out``. ``two_subject``: the share
    of two-subject training clips (:func:`make_dataset`; the tokenizer then learns their captions too). ``vae``:
    a trained demo VAE (an hcjax checkpoint directory, e.g. a bundle's ``vae/``; default the committed one) used
    frozen (its architecture must be the config's; it is copied into ``workdir`` first, so ``out`` may be the
    bundle it comes from); ``None`` trains one in the VAE stages (``--train-vae``). ``dit``: likewise a trained
    demo DiT taken as the result of the ``dit`` and ``dit_finetune`` stages (the ``dit_two`` stage then starts
    from it). ``world``: how the clips draw their
    subjects (:class:`demo.subjects.World`; default the committed bundle's), written into the bundle as
    ``demo.json`` for the evaluation."""
    if not 0.0 <= two_subject < 1.0:
        raise ValueError(f"two_subject must be in [0, 1), got {two_subject}")
    workdir, out = Path(workdir).absolute(), Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    for name, same in (("data", lambda w: dataclasses.replace(w, two_subject_clips=world.two_subject_clips)),
                       ("data_two", lambda w: w)):      # the first clips do not depend on the dit_two stage's count
        if (workdir / name).exists() and same(World.load(workdir / name)) != world:
            raise ValueError(f"{workdir / name} was made in another demo world ({World.load(workdir / name)}) than "
                             f"this build's ({world}); use a new --workdir")
    cfg = load_config(config, overrides)
    if vae is not None:
        if not (Path(vae) / "config.json").is_file():
            raise FileNotFoundError(f"--vae {vae}: not an hcjax checkpoint (missing config.json; a partial clone? "
                                    "--train-vae trains one)")
        given = load_checkpoint_config(vae).vae
        if dataclasses.replace(given, scaling_factor=cfg.vae.scaling_factor) != cfg.vae:
            raise ValueError(f"--vae {vae}: its VAE architecture differs from the config's vae: section "
                             "(--train-vae trains one for it)")
    _check_workdir_vae(workdir / "vae", vae)
    if dit is not None and (errors := dit_differences(to_dict(load_checkpoint_config(dit))["dit"], cfg)[0]):
        raise ValueError(f"--dit {dit}: its DiT architecture differs from the config's dit: section ("
                         + "; ".join(errors[:4]) + ")")
    if cfg.train.two_subject_steps and not world.two_subject_clips:
        raise ValueError(f"train.two_subject_steps={cfg.train.two_subject_steps} needs two-subject clips "
                         "(--two-subject-clips N; or --set train.two_subject_steps=0 to skip the stage)")
    if world.two_subject_clips and not cfg.train.two_subject_steps:
        raise ValueError(f"--two-subject-clips {world.two_subject_clips}: the two-subject stage needs its steps "
                         "(--set train.two_subject_steps=N)")
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data, text, vae_run, cache, dit_run = (workdir / n for n in ("data", "text", "vae", "latents", "dit"))
    _stage("data", data, lambda: make_dataset(data, num_clips, two_subject=two_subject, world=world), print_fn)
    _stage("text", text, lambda: make_text_towers(cfg, text, two_subject=two_subject > 0), print_fn)
    vcfg = dataclasses.replace(cfg, vae_train=dataclasses.replace(cfg.vae_train, data=str(data)))
    if vae is not None:         # trained once and frozen
        _stage("vae", vae_run / "params", lambda: shutil.copytree(vae, vae_run / "params"), print_fn)
    else:
        _stage("vae", vae_run / "params", lambda: vae_training.train_vae(vcfg, vae_run, resume=True,
                                                                         print_fn=print_fn, progress=False), print_fn)
    vc = cfg.vae_train
    if vc.finetune_steps and vae is None:      # a second run from the first one's weights (warm restart)
        first, vae_run = vae_run, workdir / "vae_finetune"
        fcfg = dataclasses.replace(vcfg, vae_train=dataclasses.replace(
            vcfg.vae_train, init_from=str(first / "params"), steps=vc.finetune_steps,
            learning_rate=vc.finetune_learning_rate, seed=vc.seed + 1))
        _stage("vae_finetune", vae_run / "params", lambda: vae_training.train_vae(
            fcfg, vae_run, resume=True, print_fn=print_fn, progress=False), print_fn)
    scale = load_checkpoint_config(vae_run / "params").vae.scaling_factor
    dc = dataclasses.replace(cfg.train.data, vae_weights=str(vae_run / "params"), llava_dir=str(text / "llava"),
                             clip_dir=str(text / "clip"), path=str(cache))
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scaling_factor=scale),
                              train=dataclasses.replace(cfg.train, data=dc)).validate()
    if dit is None:
        _stage("latents", cache, lambda: encode.precompute(
            cfg, data, cache, text_encoders=load_text_encoders(text / "llava", text / "clip", cfg)), print_fn)
    tc = cfg.train
    if dit is not None:         # trained before: the DiT stages' result
        _stage("dit", dit_run / "params", lambda: shutil.copytree(dit, dit_run / "params"), print_fn)
    else:
        _stage("dit", dit_run / "done", lambda: (training.train(cfg, dit_run, resume=True, print_fn=print_fn,
                                                                 progress=False), (dit_run / "done").touch()), print_fn)
    if tc.finetune_steps and dit is None:
        first, dit_run = dit_run, workdir / "dit_finetune"
        fcfg = dataclasses.replace(cfg, train=dataclasses.replace(
            tc, init_from=str(dit_run / "init"), steps=tc.finetune_steps, learning_rate=tc.finetune_learning_rate,
            finetune_steps=0))
        _stage("dit_finetune", dit_run / "done", lambda: _warm_restart(fcfg, first, dit_run, print_fn), print_fn)
    if tc.two_subject_steps:    # single + two-subject clips, from the DiT so far (a warm restart)
        first, dit_run = dit_run, workdir / "dit_two"
        data_two, cache_two = workdir / "data_two", workdir / "latents_two"
        _stage("data_two", data_two, lambda: make_two_subject_data(data_two, data, world), print_fn)
        tcfg = dataclasses.replace(cfg, train=dataclasses.replace(
            tc, init_from=str(dit_run / "init"), steps=tc.two_subject_steps, learning_rate=tc.finetune_learning_rate,
            finetune_steps=0, two_subject_steps=0, two_subject_restarts=1,
            data=dataclasses.replace(dc, path=str(cache_two))))
        _stage("latents_two", cache_two, lambda: encode.precompute(
            tcfg, data_two, cache_two, text_encoders=load_text_encoders(text / "llava", text / "clip", cfg)), print_fn)
        for k in range(1, tc.two_subject_restarts + 1):     # dit_two, dit_two_2, ...: each from the one before
            if k > 1:
                first, dit_run = dit_run, workdir / f"dit_two_{k}"
                tcfg = dataclasses.replace(tcfg, train=dataclasses.replace(tcfg.train, init_from=str(dit_run / "init")))
            _stage(dit_run.name, dit_run / "done", lambda: _warm_restart(tcfg, first, dit_run, print_fn), print_fn)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if (dit_run / "params").is_dir():
        shutil.copytree(dit_run / "params", tmp / "dit")
    else:
        export_training_params(dit_run / "checkpoints", tmp / "dit")
    shutil.copytree(vae_run / "params", tmp / "vae")
    shutil.copytree(text / "llava", tmp / "llava")
    shutil.copytree(text / "clip", tmp / "clip")
    # the bundle's configs are the training config (with the measured VAE scaling), not the text tower defaults;
    # its data section without the paths into this build's workdir (they mean nothing beside the bundle)
    shipped = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, data=cfg.train.data.without_local_paths()))
    for c in ("dit", "vae", "llava", "clip"):
        (tmp / c / "config.json").write_text(json.dumps(dataclasses.asdict(shipped), indent=2))
    world.save(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    print_fn(f"demo bundle written to {out} in {time.perf_counter() - t0:.0f}s total "
             f"({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    return out
