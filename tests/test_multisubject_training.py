"""Multi-subject training and data (issue 24): 2-subject synthetic clips, K references through the scan, the raw
loader, the online encoders, precompute and the precomputed loader; mixed-K batches padded to K_max and masked
(attention key holes, the DiT's ``ref_mask``), so padding does not change a sample's prediction or loss; train
steps on a mixed dataset."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hcjax import attention as A
from hcjax import dit, sharding, training
from hcjax.axes import AXES, DEFAULT_RULES
from hcjax.checkpoint import random_params
from hcjax.config import load_config
from hcjax.data import Loader, TrainBatch, scan_raw
from hcjax.data.encode import Encoders, precompute
from hcjax.data.synthetic import COLORS, generate, make_clip
from hcjax.media import decode_frames, pad_resize

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "train_tiny.yaml"
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def cfg_for(path, *overrides, mode="raw"):
    # text_len 32: a two-subject caption + two item names fit the word-hash text stage without truncation
    return load_config(TINY, [f"train.data.path={path}", f"train.data.mode={mode}", "train.data.num_frames=5",
                              "train.batch_size=4", "train.steps=3", "llava.text_len=32", *overrides])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """3 one-subject and 3 two-subject clips (7 frames, 32x32): any 4 of them mix K = 1 and K = 2."""
    root = tmp_path_factory.mktemp("mixed")
    generate(root / "one", num_clips=3, frames=7, height=32, width=32, seed=1)
    generate(root / "two", num_clips=3, frames=7, height=32, width=32, seed=2, subjects=2)
    return root


@pytest.fixture(scope="module")
def enc(mixed):
    return Encoders(cfg_for(mixed))


@pytest.fixture(scope="module")
def cache(mixed, tmp_path_factory):
    """The mixed dataset precomputed: ``(index, directory)``."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    return precompute(cfg_for(mixed), mixed, out), out


def _near(frames: np.ndarray, color) -> np.ndarray:
    return np.abs(frames.astype(np.float32) - np.asarray(color, np.float32)).max(-1) < 40


# ------------------------------------------------------------------------------------------- synthetic


def test_two_subject_clips_have_two_references_and_two_motion_phrases(tmp_path):
    generate(tmp_path, num_clips=4, frames=9, height=64, width=64, seed=3, subjects=2)
    for m in sorted(tmp_path.glob("*.json")):
        meta = json.loads(m.read_text())
        phrases = re.fullmatch(r"the (\w+) object moves (\w+) and the (\w+) object moves (\w+)", meta["caption"])
        assert phrases, meta["caption"]
        subs = meta["subjects"]
        assert len(meta["ref_images"]) == len(meta["item_names"]) == len(subs) == 2 and "ref_image" not in meta
        assert [phrases[1], phrases[3]] == [s["color"] for s in subs] and subs[0]["color"] != subs[1]["color"]
        assert [phrases[2], phrases[4]] == [s["motion"] for s in subs]
        assert meta["item_names"] == [f"{s['color']} {s['texture']} {s['shape']}" for s in subs]
        video = decode_frames(m.with_suffix(".mp4"), range(9))
        for s, ref_name in zip(subs, meta["ref_images"]):
            ref = np.asarray(Image.open(tmp_path / ref_name).convert("RGB"))
            assert ref.shape == (64, 64, 3) and (ref == 255).all(-1).mean() > 0.6       # alone, on white
            assert np.all(ref[_near(ref, COLORS[s["color"]])] == COLORS[s["color"]])   # its own colour, exact
            assert _near(ref, COLORS[s["color"]]).sum() > 20
            # the subject (pixels of its colour) moves as its own phrase says
            first, last = (np.argwhere(_near(video[f], COLORS[s["color"]])).mean(0) for f in (0, 8))
            dy, dx = last - first
            want = {"left": dx < -8, "right": dx > 8, "up": dy < -8, "down": dy > 8}[s["motion"]]
            assert want, (m.name, s, dx, dy)


def test_single_subject_output_is_unchanged():
    """``--subjects 1`` (the default) draws exactly what the generator drew before multi-subject support: digests
    written by the code before the change."""
    h = hashlib.sha256()
    for i in range(3):
        v, r, meta, mask = make_clip(np.random.default_rng([7, i]), 5, 32, 48, return_mask=True)
        for a in (v, r, mask):
            h.update(a.tobytes())
        h.update(json.dumps(meta, sort_keys=True).encode())
    assert h.hexdigest() == "75115fc7f7eb9ab0155b22ae19c51c88ac5d3596a7a94d86faaef25b3e9127e5"


def test_generate_writes_the_same_single_subject_json(tmp_path):
    generate(tmp_path, num_clips=2, frames=5, height=32, width=32, seed=7, masks=True)
    digests = [hashlib.sha256((tmp_path / f"clip_{i:04d}.json").read_bytes()).hexdigest() for i in range(2)]
    assert digests == ["cd9a40fe30c267b54e1d33c21d0fef30144748b50f347afd5955318a7bb5377c",
                       "e781a0ea7683ab817c60b9525cbc2ba44c10ee8e50d32f2c2695c287c5b86545"]
    with pytest.raises(ValueError, match="--subjects must be 1..4"):
        generate(tmp_path / "x", num_clips=1, frames=5, height=32, width=32, subjects=5)


# ------------------------------------------------------------------------------------------- scan / raw loader


def test_scan_reads_k_references_and_skips_bad_lists(mixed, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(mixed, root)
    clips, report = scan_raw(cfg_for(root).train.data, root=root)
    assert sorted(c.subjects for c in clips) == [1, 1, 1, 2, 2, 2] and report.skipped == {}
    two = [c for c in clips if c.subjects == 2][0]
    assert two.ref_image == two.ref_images[0] and two.item_name == two.item_names[0]
    assert all(Path(p).is_file() for p in two.ref_images)
    src = root / "two" / "clip_0000"
    bad = {"names": dict(json.loads(src.with_suffix(".json").read_text()), item_names=["only one"]),
           "noimage": dict(json.loads(src.with_suffix(".json").read_text()), ref_images=["nope.png", "x.png"]),
           "listone": {"caption": "the object moves up", "ref_images": ["../two/clip_0000_ref0.png"]}}
    for name, meta in bad.items():
        (root / "bad").mkdir(exist_ok=True)
        shutil.copy(src.with_suffix(".mp4"), root / "bad" / f"{name}.mp4")
        (root / "bad" / f"{name}.json").write_text(json.dumps(meta))
    clips, report = scan_raw(cfg_for(root).train.data, root=root)
    assert dict(report.skipped) == {"bad_json": 1, "missing_ref_image": 1}
    single = [c for c in clips if c.video.endswith("listone.mp4")][0]         # a list of one: one subject
    assert single.subjects == 1 and single.item_name == "object" and single.ref_images == ()


def test_raw_mixed_batch_is_padded_and_masked_and_encodes(mixed, enc):
    cfg = cfg_for(mixed, "train.steps=2")
    loader = Loader(cfg, process_index=0, process_count=1)
    b = next(loader)
    loader.close()
    counts = np.asarray(b["ref_mask"]).sum(1)
    assert b["ref_images"].shape == (4, 2, 32, 32, 3) and b["llava_images"].shape == (4, 2, 28, 28, 3)
    assert sorted(set(counts.tolist())) == [1, 2] and np.all(b["text_slots"] == 2)
    for i, n in enumerate(counts):
        assert len(b["item_names"][i]) == n and b["item_names"][i][0] == b["item_name"][i]
        assert np.array_equal(b["ref_images"][i, 0], b["ref_image"][i])
        assert np.all(b["ref_images"][i, n:] == 255)                            # padded slots: white images
        phrases = b["caption"][i].count(" object moves ")
        assert phrases == n
    tb = enc.encode(b)
    assert tb.ref_latents.shape == (4, 2, 4, 4, 4) and tb.null_ref_latents.shape == tb.ref_latents.shape
    assert np.array_equal(tb.ref_mask, b["ref_mask"]) and tb.text_states.shape == (4, 32, 32)
    one = int(np.argmax(counts == 1))
    alone = enc.vae_encode(b["ref_images"][one][:, None])[:, 0]                # its two slots, each alone
    np.testing.assert_allclose(tb.ref_latents[one], alone, atol=1e-5)
    np.testing.assert_allclose(tb.ref_latents[one, 1], tb.null_ref_latents[one, 1], atol=1e-5)
    # the word-hash text holds "<item> name" once per subject: bos + caption words + K * (1 + 3 name words)
    for i, n in enumerate(counts):
        words = len(b["caption"][i].split())
        assert tb.text_mask[i].sum() == 1 + words + 4 * n


# ------------------------------------------------------------------------------------------- precompute


def test_precompute_round_trip_of_two_subject_clips(mixed, enc, cache):
    index, out = cache
    subjects = {e["source"]: e["subjects"] for e in index["clips"]}
    assert sorted(subjects.values()) == [1, 1, 1, 2, 2, 2] and index["text"]["length"] == 32
    for e in index["clips"]:
        with np.load(out / e["file"]) as z:
            ref, mask = z["ref_latents"], z["text_mask"]
            assert ref.shape == (e["subjects"], 4, 4, 4) and "ref_mask" not in z.files
        meta = json.loads((mixed / e["source"]).with_suffix(".json").read_text())
        names = meta.get("ref_images", [meta.get("ref_image")])
        pixels = np.stack([pad_resize(np.asarray(Image.open((mixed / e["source"]).parent / p).convert("RGB")), 32, 32)
                           for p in names])
        want = enc.vae_encode(pixels[:, None])[:, 0]                              # each image its own frame
        np.testing.assert_allclose(ref, want, atol=1e-5)
        items = meta.get("item_names", [meta.get("item_name")])
        assert mask.sum() == 1 + len(meta["caption"].split()) + sum(1 + len(n.split()) for n in items)
    pc = cfg_for(out, "train.steps=2", mode="precomputed")
    loader = Loader(pc, process_index=0, process_count=1)
    b = next(loader)
    loader.close()
    assert isinstance(b, TrainBatch) and b.ref_latents.shape == (4, 2, 4, 4, 4)
    assert b.null_ref_latents.shape == (4, 2, 4, 4, 4) and b.ref_mask.shape == (4, 2)
    for i, n in enumerate(b.ref_mask.sum(1)):
        assert np.array_equal(b.ref_latents[i, n:], b.null_ref_latents[i, n:])    # padding: white latents
        assert not np.allclose(b.ref_latents[i, :n], b.null_ref_latents[i, :n])
    assert sorted(set(b.ref_mask.sum(1).tolist())) == [1, 2]


# ------------------------------------------------------------------------------------------- masking


def _hole_reference(q, k, v, rows) -> np.ndarray:
    """float64 attention: sample b sees keys < rows[b, 0] outside [rows[b, 1], rows[b, 2])."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(q.shape[-1])
    pos = np.arange(k.shape[1])[None]
    rows = np.asarray(rows)
    ok = (pos < rows[:, :1]) & ~((pos >= rows[:, 1:2]) & (pos < rows[:, 2:3]))
    s = np.where(ok[:, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnqk,bknd->bqnd", p / p.sum(-1, keepdims=True), v)


def test_attention_key_holes_in_every_kernel_and_sequence_parallel_mode():
    ks = jax.random.split(jax.random.key(4), 3)
    q, k, v = (jax.random.normal(key, (3, 27, 4, 8)) for key in ks)
    rows = jnp.asarray([[27, 3, 9], [20, 0, 0], [25, 9, 18]], jnp.int32)
    want = _hole_reference(q, k, v, rows)
    pos = np.arange(27)[None]
    r = np.asarray(rows)
    valid_q = (pos < r[:, :1]) & ~((pos >= r[:, 1:2]) & (pos < r[:, 2:3]))      # [B, L]
    for impl, extra in (("xla", {}), ("chunked", dict(block_q=8, block_kv=5)), ("splash", dict(interpret=True))):
        got = np.asarray(A.dot_product_attention(q, k, v, kv_lengths=rows, impl=impl, **extra))
        # splash: the masked tokens form the padding segment, so only the valid queries' rows are the reference's
        err = np.abs(got - want).max((2, 3))
        assert float((err[valid_q] if impl == "splash" else err).max()) <= 2e-5, impl
    for shape, mode, impl in (((1, 2, 4, 1), "ring", "chunked"), ((1, 2, 4, 1), "ulysses", "chunked"),
                              ((2, 1, 2, 2), "ring", "xla")):
        mesh = jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
        with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
            got = jax.jit(lambda *a: A.dot_product_attention(*a[:3], kv_lengths=a[3], impl=impl, block_q=4,
                                                             block_kv=4, sequence_parallel=mode))(q, k, v, rows)
        assert float(np.abs(np.asarray(got) - want).max()) <= 2e-5, (shape, mode, impl)
    with pytest.raises(ValueError, match=r"kv_lengths must be \[B\]"):
        A.dot_product_attention(q, k, v, kv_lengths=rows[:, :2], impl="xla")


@pytest.fixture(scope="module")
def tiny_dit():
    cfg = cfg_for("x", "train.drop_text=0.5", "train.drop_image=0.5")
    params = random_params(dit.abstract_params(cfg.dit), 2, std=None)        # no init program to compile
    r = np.random.default_rng(0)
    c = cfg.dit
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
    mask = np.ones((2, 8), np.int32)
    mask[0, 5:] = 0
    args = (f(2, 2, 4, 4, c.in_channels), jnp.asarray([300.0, 700.0]), f(2, 8, c.text_states_dim),
            jnp.asarray(mask), f(2, c.text_states_dim_2))
    refs = f(2, 2, 4, 4, c.in_channels)            # sample 0: K = 1, its slot 2 holds garbage (not white)
    return cfg, params, args, refs


def test_padded_reference_does_not_change_the_prediction(tiny_dit):
    cfg, params, args, refs = tiny_dit
    model = dit.HunyuanDiT(cfg.dit)
    run = jax.jit(lambda a, r, m: model.apply({"params": params}, *a, ref_latents=r, ref_mask=m))
    mixed = run(args, refs, jnp.asarray([[1, 0], [1, 1]]))
    alone = jax.jit(lambda a, r: model.apply({"params": params}, *a, ref_latents=r))
    one = alone(tuple(a[:1] for a in args), refs[:1, :1])
    two = alone(tuple(a[1:] for a in args), refs[1:])
    np.testing.assert_allclose(mixed[0], one[0], atol=2e-5)
    np.testing.assert_allclose(mixed[1], two[0], atol=2e-5)
    unmasked = run(args, refs, jnp.asarray([[1, 1], [1, 1]]))                  # the garbage frame counts
    assert float(np.abs(unmasked[0] - one[0]).max()) > 1e-2
    np.testing.assert_array_equal(unmasked[1], mixed[1])                          # all-ones mask: no hole
    with pytest.raises(ValueError, match="ones then zeros"):
        model.apply({"params": params}, *args, ref_latents=refs, ref_mask=jnp.asarray([[0, 1], [1, 1]]))
    with pytest.raises(ValueError, match=r"ref_mask must be \[B,K\]"):
        model.apply({"params": params}, *args, ref_latents=refs, ref_mask=jnp.ones((2, 3), jnp.int32))


def test_padded_reference_does_not_change_the_loss(tiny_dit):
    """The training loss of a K = 1 sample padded to K_max = 2 (garbage slot, masked) equals its loss at K = 1,
    through condition dropout (keys where the image is dropped to white and the text to the shorter null text, and
    keys where they are kept)."""
    cfg, params, args, refs = tiny_dit
    x, _, text, mask, pooled = args
    c = cfg.dit
    null = {"text_states": np.zeros((5, c.text_states_dim), np.float32), "text_mask": np.ones(5, np.int32),
            "text_states_2": np.zeros(c.text_states_dim_2, np.float32)}
    white = jnp.full_like(refs, 0.25)

    def batch(k, ref_mask=None):
        return TrainBatch(latents=x[:1], ref_latents=refs[:1, :k], null_ref_latents=white[:1, :k],
                          text_states=text[:1], text_mask=mask[:1], text_states_2=pooled[:1], ref_mask=ref_mask)

    loss = jax.jit(lambda b_, key: training.flow_matching_loss(params, b_, null, key, cfg)[0])
    dropped = set()
    for seed in range(6):
        key = jax.random.key(seed)
        u = jax.random.uniform(jax.random.split(key, 3)[2], (3, 1))        # apply_dropout's draw
        dropped.add((bool(u[0, 0] < 0.5), bool(u[1, 0] < 0.5)))
        padded = loss(batch(2, jnp.asarray([[1, 0]])), key)
        np.testing.assert_allclose(padded, loss(batch(1), key), rtol=1e-5)
        assert abs(float(loss(batch(2), key)) - float(padded)) > 1e-6          # unmasked, the padding counts
    assert {d[1] for d in dropped} == {True, False} and {d[0] for d in dropped} == {True, False}


# ------------------------------------------------------------------------------------------- train steps


def test_train_steps_on_a_mixed_dataset(cache):
    _, out = cache
    cfg = cfg_for(out, "train.steps=3", mode="precomputed")
    mesh, rules = training.make_mesh(cfg, jax.devices()[:1]), sharding.rules_for(name="default")
    optimizer, _ = training.make_optimizer(cfg.train)
    state = training.create_state(cfg, mesh, rules, optimizer)
    step = training.make_train_step(cfg, optimizer, mesh, rules, compiler_options=FAST)
    loader = Loader(cfg, process_index=0, process_count=1)
    with np.load(out / "null.npz") as z:
        null = training.device_null({k: z[k] for k in training.NULL_KEYS}, mesh)
    losses = []
    for b in loader:
        assert b.ref_mask is not None and sorted(set(b.ref_mask.sum(1).tolist())) == [1, 2]
        state, m = step(state, training.to_global(b, mesh, rules), null)
        assert bool(m["finite"]) and np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0
        losses.append(float(m["loss"]))
        if len(losses) == 1:        # train.microbatch=2 on this mixed-K batch: the whole batch's loss and gradients
            mcfg = cfg_for(out, "train.steps=3", "train.microbatch=2", mode="precomputed")
            mstep = training.make_train_step(mcfg, optimizer, mesh, rules, compiler_options=FAST, with_grads=True)
            wstep = training.make_train_step(cfg, optimizer, mesh, rules, compiler_options=FAST, with_grads=True)
            got = [f(training.create_state(cfg, mesh, rules, optimizer), training.to_global(b, mesh, rules), null)[1]
                   for f in (mstep, wstep)]
            np.testing.assert_allclose(got[0]["loss"], got[1]["loss"], rtol=1e-5)
            for a, w in zip(jax.tree.leaves(got[0]["grads"]), jax.tree.leaves(got[1]["grads"])):
                np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(w))))
    loader.close()
    assert len(losses) == 3 and int(state["step"]) == 3 and np.all(np.isfinite(losses))


def test_raw_reader_columns_layout_places_each_reference(mixed):
    """``train.data.ref_layout=columns``: a two-subject clip's reference k (and its LLaVA image) is the image
    padding-resized into column k of a white frame (built here by hand); a one-subject clip reads as before."""
    from hcjax.data.pipeline import RawReader
    from hcjax.media import read_image

    clips, _ = scan_raw(cfg_for(mixed).train.data, root=mixed)
    readers = {lay: RawReader(cfg_for(mixed, f"train.data.ref_layout={lay}").train.data, clips, 28)
               for lay in ("centre", "columns")}
    for record, clip in enumerate(clips):
        centre, cols = (readers[lay](record, np.random.default_rng(0), slots=2) for lay in ("centre", "columns"))
        assert np.array_equal(centre["video"], cols["video"])
        if clip.subjects == 1:
            for key in ("ref_image", "llava_image", "ref_images", "llava_images"):
                assert np.array_equal(centre[key], cols[key]), key
            continue
        for k, path in enumerate(clip.ref_images):
            want = np.full((32, 32, 3), 255, np.uint8)
            want[:, 16 * k:16 * k + 16] = pad_resize(read_image(path), 32, 16)
            assert np.array_equal(cols["ref_images"][k], want)
            assert np.array_equal(cols["llava_images"][k], pad_resize(want, 28, 28))
            assert not np.array_equal(centre["ref_images"][k], want)
    with pytest.raises(Exception, match="ref_layout"):
        cfg_for(mixed, "train.data.ref_layout=rows")
