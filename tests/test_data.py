"""Data: synthetic generator, grain pipeline (shapes, buckets, determinism, hosts, workers, resume), bad clips,
editing masks, precompute + precomputed loader (typed batches)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hcjax.config import load_config
from hcjax.data import BatchPlan, Loader, TrainBatch, scan_raw
from hcjax.data.encode import check_compatible, precompute
from hcjax.data import sources
from hcjax.data.pipeline import LoadBatch, NpzReader, RawReader
from hcjax.data.synthetic import generate
from hcjax.media import decode_frames, probe, write_video

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "train_tiny.yaml"


def cfg_for(path, *overrides, mode="raw"):
    return load_config(TINY, [f"train.data.path={path}", f"train.data.mode={mode}", "train.data.num_frames=9",
                              "train.data.buckets=[[32,32],[32,64]]", "train.batch_size=2", "train.steps=6",
                              *overrides])


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """12 clips of 13 frames: 6 square (32x32) and 6 wide (32x64)."""
    root = tmp_path_factory.mktemp("raw")
    generate(root / "square", num_clips=6, frames=13, height=32, width=32, seed=1)
    generate(root / "wide", num_clips=6, frames=13, height=32, width=64, seed=2)
    return root


def batches(cfg, n=None, **kw):
    loader = Loader(cfg, process_index=kw.pop("process_index", 0), process_count=kw.pop("process_count", 1), **kw)
    try:
        out = list(loader) if n is None else [next(loader) for _ in range(n)]
    finally:
        loader.close()
    return out, loader


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


# ------------------------------------------------------------------------------------------- synthetic


def test_synthetic_clips_move_as_captioned(raw):
    metas = sorted((raw / "square").glob("*.json")) + sorted((raw / "wide").glob("*.json"))
    assert len(metas) == 12
    for m in metas:
        meta = json.loads(m.read_text())
        video = decode_frames(m.with_suffix(".mp4"), range(13)).astype(np.float32)
        info = probe(m.with_suffix(".mp4"))
        assert info.frames == 13 and meta["caption"] == f"the object moves {meta['motion']}"
        # subject = pixels far from the grey background: its centroid moves as the caption says
        sat = video.max(-1) - video.min(-1)
        cy, cx = [], []
        for f in sat:
            ys, xs = np.nonzero(f > 60)
            cy.append(ys.mean())
            cx.append(xs.mean())
        dx, dy = cx[-1] - cx[0], cy[-1] - cy[0]
        want = {"left": (dx < -4), "right": (dx > 4), "up": (dy < -4), "down": (dy > 4)}[meta["motion"]]
        assert want, (m.name, meta["motion"], dx, dy)
        ref = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(m.parent / meta["ref_image"]))
        assert ref.shape == video.shape[1:] and (ref == 255).all(-1).mean() > 0.5      # subject on white


def test_synthetic_subject_radius_and_colour_override():
    """``make_clip(radius=, rgb=)``: the defaults make the clips the generator made before these options existed
    (fingerprint of 12 clips computed with that code, commit 754943a); a fixed radius gives the subject the area its
    shape has at that radius; ``rgb`` repaints the subject (video and reference; stripes at 0.45x) and changes
    nothing else: the same rng draws, region and metadata (+ ``rgb``)."""
    import hashlib

    from hcjax.data import synthetic

    h = hashlib.sha256()
    for i in range(6):
        for args, kw in (((np.random.default_rng([0, i]), 9, 64, 64), dict(subject=("red", "striped", "triangle"),
                                                                             travel=0.5)),
                         ((np.random.default_rng([1, i]), 5, 32, 48), {})):
            v, r, m = synthetic.make_clip(*args, **kw)
            h.update(v.tobytes()), h.update(r.tobytes()), h.update(repr(sorted(m.items())).encode())
    assert h.hexdigest() == "06b0ad10c0094a64ee73ea30a5f0fe0a606695db16b34eade4343daa2ed4e66c"

    subject = ("red", "plain", "circle")
    for frac in (0.2, 0.3):
        _, ref, _ = synthetic.make_clip(np.random.default_rng(0), 5, 64, 64, subject=subject, radius=(frac, frac))
        area = (ref != 255).any(-1).sum()
        assert abs(area - np.pi * (64 * frac) ** 2) < 0.03 * area, (frac, area)
    for i in range(4):
        plain = synthetic.make_clip(np.random.default_rng([2, i]), 9, 64, 64, return_mask=True)
        paint = synthetic.make_clip(np.random.default_rng([2, i]), 9, 64, 64, return_mask=True, rgb=(10, 200, 30))
        np.testing.assert_array_equal(paint[3], plain[3])
        assert paint[2] == {**plain[2], "rgb": [10, 200, 30]}
        inside = paint[3][..., 0] > 0
        np.testing.assert_array_equal(paint[0][~inside], plain[0][~inside])
        got = {tuple(c) for c in paint[0][inside].reshape(-1, 3)} | {tuple(c) for c in paint[1][(paint[1] != 255)
                                                                                                .any(-1)]}
        assert got <= {(10, 200, 30), (5, 90, 14)}, got          # the colour, and x0.45 on the texture's off cells
    with pytest.raises(ValueError, match="radius"):
        synthetic.make_clip(np.random.default_rng(0), 5, 64, 64, radius=(0.3, 0.2))
    with pytest.raises(ValueError, match="rgb"):
        synthetic.make_clip(np.random.default_rng(0), 5, 64, 64, rgb=(0, 300, 0))


@pytest.mark.parametrize("travel", [0.5, 0.25])
def test_synthetic_travel_is_the_fraction_of_the_frame_crossed(travel):
    """With ``travel`` < 1 the subject moves ``travel`` x as far as in the edge-to-edge clip drawn from the same
    seed (same subject and size), at constant speed, from a start that varies between clips."""
    from hcjax.data import synthetic

    def leading_edge(video):
        sat = video.astype(np.float32).max(-1) - video.astype(np.float32).min(-1)
        return np.array([np.nonzero(f > 60)[1].min() for f in sat], np.float32)

    starts = set()
    for i in range(6):
        video, _, meta = synthetic.make_clip(np.random.default_rng([3, i]), 9, 64, 64, direction="right",
                                             travel=travel)
        full, _, meta_full = synthetic.make_clip(np.random.default_rng([3, i]), 9, 64, 64, direction="right")
        assert meta == meta_full
        x, x_full = leading_edge(video), leading_edge(full)
        assert np.all(np.diff(x) >= 0) and np.all(np.diff(x_full) >= 0)
        assert abs((x[-1] - x[0]) - travel * (x_full[-1] - x_full[0])) <= 2.0, (x, x_full)
        starts.add(int(x[0]))
    assert len(starts) > 1
    with pytest.raises(ValueError, match="travel"):
        synthetic.make_clip(np.random.default_rng(0), 9, 64, 64, travel=0.0)


def test_synthetic_refuses_to_overwrite(tmp_path):
    generate(tmp_path / "d", num_clips=1, frames=5, height=16, width=16)
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(tmp_path / "d", num_clips=1, frames=5, height=16, width=16)


# ------------------------------------------------------------------------------------------- grain pipeline


def test_raw_batches_shapes_buckets_and_determinism(raw):
    cfg = cfg_for(raw)
    got, loader = batches(cfg)
    assert len(got) == 6 and loader.state()["next_step"] == 6 and loader.skipped == {}
    widths = set()
    for b in got:
        w = b["video"].shape[3]
        widths.add(w)
        assert b["video"].shape == (2, 9, 32, w, 3) and b["video"].dtype == np.uint8
        assert b["ref_image"].shape == (2, 32, w, 3) and b["llava_image"].shape == (2, 28, 28, 3)
        assert b["frame_index"].shape == (2, 9) and np.all(np.diff(b["frame_index"], axis=1) == 1)
        assert b["frame_index"].min() >= 0 and b["frame_index"].max() < 13
        assert len(b["caption"]) == 2 and all(c.startswith("the object moves ") for c in b["caption"])
        assert all(len(n.split()) == 3 for n in b["item_name"])             # "<colour> <texture> <shape>"
    assert widths == {32, 64}                                  # both buckets, never mixed inside a batch
    again, _ = batches(cfg)
    assert all(same(a, b) for a, b in zip(got, again))        # deterministic for a seed
    other, _ = batches(cfg_for(raw, "train.data.seed=1"))
    assert not all(same(a, b) for a, b in zip(got, other))


def test_two_hosts_split_the_global_batch_without_overlap(raw):
    cfg = cfg_for(raw, "train.batch_size=4", "train.steps=3")
    full, _ = batches(cfg)
    h0, _ = batches(cfg, process_index=0, process_count=2)
    h1, _ = batches(cfg, process_index=1, process_count=2)
    for f, a, b in zip(full, h0, h1):
        for k in f:
            joined = (a[k] + b[k]) if isinstance(f[k], list) else np.concatenate([a[k], b[k]])
            assert np.array_equal(np.asarray(joined), np.asarray(f[k])), k
    plan = BatchPlan([0] * 6 + [1] * 6, 4, 0)
    for step in range(9):                                       # across epoch boundaries too
        ids0, ids1 = plan.host_ids(step, 0, 2), plan.host_ids(step, 1, 2)
        assert not set(ids0) & set(ids1) and sorted([*ids0, *ids1]) == sorted(plan.global_batch_ids(step))
        assert len({0 if i < 6 else 1 for i in plan.global_batch_ids(step)}) == 1
    for e in range(2):                                          # an epoch uses each clip at most once
        ids = np.concatenate(plan.epoch(e))
        assert len(ids) == len(set(ids.tolist())) == 8


def test_resume_from_state_and_worker_processes(raw):
    cfg = cfg_for(raw)
    full, loader = batches(cfg)
    tail, resumed = batches(cfg, start_step=3)
    assert len(tail) == 3 and all(same(a, b) for a, b in zip(full[3:], tail))
    assert resumed.state()["next_step"] == 6
    workers, _ = batches(cfg, n=4, workers=2)
    assert all(same(a, b) for a, b in zip(full, workers))


def test_dataset_too_small_for_the_batch(raw):
    with pytest.raises(ValueError, match="dataset too small.*batch_size"):
        Loader(cfg_for(raw, "train.batch_size=8"), process_index=0, process_count=1)


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture()
def messy(tmp_path, raw):
    d = tmp_path / "messy"
    shutil.copytree(raw / "square", d)
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (d / "corrupt.json").write_text(json.dumps({"caption": "noise"}))
    write_video(d / "short.mp4", np.zeros((3, 32, 32, 3), np.uint8))
    (d / "short.json").write_text(json.dumps({"caption": "too short"}))
    shutil.copy(d / "clip_0000.mp4", d / "nocaption.mp4")
    (d / "nocaption.json").write_text(json.dumps({"item_name": "thing"}))
    shutil.copy(d / "clip_0000.mp4", d / "nojson.mp4")
    shutil.copy(d / "clip_0000.mp4", d / "badjson.mp4")
    (d / "badjson.json").write_text("{not json")
    shutil.copy(d / "clip_0000.mp4", d / "noref.mp4")
    (d / "noref.json").write_text(json.dumps({"caption": "x", "ref_image": "missing.png"}))
    return d


def test_bad_clips_are_skipped_and_counted(messy, caplog):
    cfg = cfg_for(messy)
    clips, report = scan_raw(cfg.train.data)
    assert len(clips) == 6 and report.total == 12
    assert dict(report.skipped) == {"unreadable_video": 1, "too_short": 1, "missing_caption": 1, "missing_json": 1,
                                    "bad_json": 1, "missing_ref_image": 1}
    assert "corrupt.mp4" in caplog.text and "missing or empty \"caption\"" in caplog.text
    got, loader = batches(cfg, n=2)
    assert got[0]["video"].shape == (2, 9, 32, 32, 3) and loader.skipped["too_short"] == 1
    with pytest.raises(ValueError, match=r"bad clip .*(corrupt|badjson|nocaption|nojson|noref|short)"):
        scan_raw(cfg_for(messy, "train.data.strict=true").train.data)


def test_clip_failing_at_read_time_is_replaced_and_counted(raw, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(raw / "square", d)
    cfg = cfg_for(d)
    clips, _ = scan_raw(cfg.train.data)
    plan = BatchPlan([c.bucket for c in clips], 2, 0)
    victim = int(plan.global_batch_ids(0)[0])
    Path(clips[victim].video).write_bytes(b"\x00" * 100)       # breaks after the scan
    load = LoadBatch(plan, RawReader(cfg.train.data, clips, 28), 0, 0, 1, strict=False)
    out = load(0)
    assert int(out["skipped"]) == 1 and out["video"].shape == (2, 9, 32, 32, 3)
    assert out["caption"][0] == clips[plan.neighbor(victim, 1)].caption      # the next clip of the bucket
    strict = LoadBatch(plan, RawReader(cfg.train.data, clips, 28), 0, 0, 1, strict=True)
    with pytest.raises(ValueError, match="cannot decode"):
        strict(0)


def test_missing_or_empty_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset directory not found"):
        Loader(cfg_for(tmp_path / "nowhere"), process_index=0, process_count=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable clips"):
        Loader(cfg_for(tmp_path / "empty"), process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="hcjax.precompute"):
        Loader(cfg_for(tmp_path / "empty", mode="precomputed"), process_index=0, process_count=1)


# ------------------------------------------------------------------------------------------- precompute


def test_precompute_and_precomputed_batches(raw, tmp_path):
    cfg = cfg_for(raw / "square")
    index = precompute(cfg, raw / "square", tmp_path / "cache")
    assert len(index["clips"]) == 6 and index["scan"]["skipped"] == {}
    assert index["text"] == {"length": 16, "dim": 32, "dim_2": 16} and index["latent_channels"] == 4
    pc = cfg_for(tmp_path / "cache", "train.steps=4", mode="precomputed")
    got, loader = batches(pc)
    b = got[0]
    assert isinstance(b, TrainBatch) and b.audio_features is None and b.bg_latents is None
    assert b.latents.shape == (2, 3, 4, 4, 4) and b.ref_latents.shape == (2, 1, 4, 4, 4)
    assert b.null_ref_latents.shape == (2, 1, 4, 4, 4) and b.text_states.shape == (2, 16, 32)
    assert b.text_mask.shape == (2, 16) and b.text_states_2.shape == (2, 16)
    assert np.all(np.isfinite(b.latents)) and b.latents.std() > 0.01
    assert not np.allclose(b.ref_latents, b.null_ref_latents)
    # the white-image latents are the same for every clip of a bucket; the text differs per caption
    assert np.array_equal(b.null_ref_latents[0], b.null_ref_latents[1])
    with np.load(tmp_path / "cache" / "null.npz") as z:
        assert z["text_mask"].sum() >= 1 and "ref_4x4" in z.files
    check_compatible(index, pc, "cache")
    with pytest.raises(ValueError, match="dit.in_channels"):
        check_compatible(index, cfg_for(tmp_path / "cache", "dit.in_channels=8", "dit.out_channels=8"), "cache")
    with pytest.raises(FileExistsError, match="--overwrite"):
        precompute(cfg, raw / "square", tmp_path / "cache")
    # an editing DiT cannot train on a dataset without bg_latents, nor a text stage that was not given
    editing = cfg_for(tmp_path / "cache", "dit.video_condition=true", "dit.bg_in_channels=8", mode="precomputed")
    with pytest.raises(ValueError, match="no bg_latents"):
        check_compatible(index, editing, "cache")
    with pytest.raises(ValueError, match="text_encoder=llava needs the loaded text encoders"):
        precompute(cfg_for(raw, "train.data.text_encoder=llava"), raw / "square", tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_damaged_precomputed_clip_is_replaced_and_counted(raw, tmp_path):
    """A clip's .npz damaged after precompute (truncated: zipfile's BadZipFile; one data byte flipped: its CRC) is
    replaced by a bucket neighbour and counted, or refused by name with train.data.strict."""
    precompute(cfg_for(raw / "square"), raw / "square", tmp_path / "cache")
    dc = cfg_for(tmp_path / "cache", mode="precomputed").train.data
    entries, _, _ = sources.scan_precomputed(dc)
    plan = BatchPlan([e["bucket"] for e in entries], 2, 0)
    first, second = (int(i) for i in plan.global_batch_ids(0))
    for victim, how in ((first, "truncated"), (second, "flipped")):
        f = Path(entries[victim]["file"])
        data = bytearray(f.read_bytes())
        if how == "truncated":
            data = data[: len(data) // 2]
        else:
            data[data.index(b"latents.npy") + 300] ^= 0xFF
        f.write_bytes(bytes(data))
    reader = NpzReader(entries, str(tmp_path / "cache" / sources.NULL), audio=False)
    out = LoadBatch(plan, reader, 0, 0, 1, strict=False)(0)
    damaged, expected = {first, second}, 0
    for rec in (first, second):     # each slot tries its clip, then the bucket's next neighbours, until one reads
        r, attempt = rec, 0
        while r in damaged:
            expected, attempt = expected + 1, attempt + 1
            r = plan.neighbor(rec, attempt)
    assert int(out["skipped"]) == expected >= 2 and out["latents"].shape == (2, 3, 4, 4, 4)
    with pytest.raises(ValueError, match=rf"{Path(entries[first]['file']).name}: cannot read precomputed clip"):
        LoadBatch(plan, reader, 0, 0, 1, strict=True)(0)


def test_typed_batch_fields():
    arrays = {k: np.zeros((2, 3), np.float32) for k in ("latents", "ref_latents", "null_ref_latents", "text_states",
                                                       "text_mask", "text_states_2")}
    b = TrainBatch.from_arrays(arrays)
    assert b.size == 2 and b.bg_latents is None and len(__import__("jax").tree.leaves(b)) == 6
    with pytest.raises(ValueError, match=r"unknown arrays \['video'\]"):
        TrainBatch.from_arrays(dict(arrays, video=np.zeros(2)))
    with pytest.raises(ValueError, match=r"missing arrays \['text_mask'\]"):
        TrainBatch.from_arrays({k: v for k, v in arrays.items() if k != "text_mask"})


# ------------------------------------------------------------------------------------------- editing masks


def test_synthetic_masks_cover_the_subject_and_are_not_clips(tmp_path):
    """--masks: the same clips plus a mask video per clip (white on the subject); a scan treats the masks as the
    clips' masks, not as clips; the raw batch carries the mask window aligned with the video window; an editing
    DiT skips clips without a mask, and a mask that does not cover its clip is skipped as bad."""
    generate(tmp_path / "plain", num_clips=3, frames=13, height=32, width=32, seed=1)
    generate(tmp_path / "masked", num_clips=3, frames=13, height=32, width=32, seed=1, masks=True)
    from hcjax.data import synthetic

    for i in range(3):
        video, ref, meta = synthetic.make_clip(np.random.default_rng([1, i]), 13, 32, 32)
        v2, r2, m2, mask = synthetic.make_clip(np.random.default_rng([1, i]), 13, 32, 32, return_mask=True)
        assert meta == m2 and np.array_equal(video, v2) and np.array_equal(ref, r2) and mask.shape == video.shape
        white = decode_frames(tmp_path / "masked" / f"clip_{i:04d}_mask.mp4", range(13)).mean(-1) > 127
        exact = mask[..., 0] == 255
        assert (white & exact).sum() / (white | exact).sum() > 0.95          # the subject's region, as rendered
        on_disk = json.loads((tmp_path / "masked" / f"clip_{i:04d}.json").read_text())
        assert on_disk.pop("mask") == f"clip_{i:04d}_mask.mp4"
        assert on_disk == json.loads((tmp_path / "plain" / f"clip_{i:04d}.json").read_text())
    cfg = cfg_for(tmp_path / "masked", "train.batch_size=1", "train.steps=3", "train.data.buckets=[[32,32]]")
    clips, report = scan_raw(cfg.train.data, need_mask=True)
    assert report.total == 3 and len(clips) == 3 and all(c.mask.endswith("_mask.mp4") for c in clips)
    got, _ = batches(cfg)
    by_caption = {c.caption: c for c in clips}
    assert len(by_caption) == 3
    for b in got:
        video, mask = b["video"][0].astype(int), b["mask_video"][0]
        # the mask window is the clip's mask at the video window's frames
        np.testing.assert_array_equal(mask, decode_frames(by_caption[b["caption"][0]].mask, b["frame_index"][0]))
        subject = (video.max(-1) - video.min(-1)) > 60          # saturated pixels (chroma bleeds a little)
        white = mask.mean(-1) > 127
        assert (subject & white).sum() / white.sum() > 0.85 and (subject & white).sum() / subject.sum() > 0.75
    _, report = scan_raw(cfg_for(tmp_path / "plain").train.data, need_mask=True)
    assert report.kept == 0 and report.skipped == {"missing_mask": 3}
    meta = json.loads((tmp_path / "masked" / "clip_0001.json").read_text())
    write_video(tmp_path / "masked" / meta["mask"], np.zeros((5, 32, 32, 3), np.uint8))          # too short
    clips, report = scan_raw(cfg.train.data, need_mask=True)
    assert len(clips) == 2 and report.skipped == {"bad_mask": 1}
