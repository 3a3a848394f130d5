"""--pose-enhance (DWPose through onnxruntime): tiny ONNX graphs with the released models' input/output signatures.

* detector (``yolox_l.onnx``): ``images [1, 3, 640, 640] -> output [1, 8400, 85]``, a constant anchor table with
  one person box written in the YOLOX encoding (stride-8 cell offset, log size), so the box is known;
* pose (``dw-ll_ucoco_384.onnx``): ``input [1, 3, 384, 288] -> simcc_x [1, 133, 576], simcc_y [1, 133, 768]``,
  either a *tracker* (every keypoint at the brightest red pixel of the crop: the column / row maxima, two SimCC
  bins per pixel) or constant one-hot SimCC rows (known keypoints for the drawing checks).

Expected keypoints come from where the test put the bright dot; expected skeleton pixels from the original's
drawing rules written out here (limb colour x scores x 0.6, point colour x score, BGR canvas shown as RGB).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from hcjax.conditioning import pose  # noqa: E402
from hcjax.conditioning.video import prepare_editing_pixels  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

N_ANCHORS = 80 * 80 + 40 * 40 + 20 * 20
R_SHOULDER, R_ELBOW = 6, 8            # COCO-WholeBody indices


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _constant_graph(name, inp, in_shape, outputs):
    """Outputs = constants + 0 * max(input) (the input is consumed, the values are the constants)."""
    nodes = [helper.make_node("ReduceMax", [inp], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outs = []
    for out_name, value in outputs.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{out_name}_c"))
        nodes.append(helper.make_node("Add", [f"{out_name}_c", "z"], [out_name]))
        outs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, list(value.shape)))
    return helper.make_graph(nodes, name, [helper.make_tensor_value_info(inp, TensorProto.FLOAT, in_shape)], outs,
                             initializer=inits)


def detector_onnx(path, boxes_letterbox):
    """A YOLOX-shaped detector reporting the given person boxes (x0, y0, x1, y1 in 640x640 input pixels)."""
    raw = np.zeros((1, N_ANCHORS, 85), np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes_letterbox):
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
        gx, gy = int(cx // 8), int(cy // 8)
        idx = gy * 80 + gx
        assert not raw[0, idx, 4], "two boxes in one cell"
        raw[0, idx, :6] = [cx / 8 - gx, cy / 8 - gy, np.log(w / 8), np.log(h / 8), 1.0, 0.9 - 0.1 * k]
    return _save(_constant_graph("det", "images", [1, 3, 640, 640], {"output": raw}), path)


def pose_constant_onnx(path, bins: dict[int, tuple[int, int, float]]):
    """SimCC rows one-hot at ``{keypoint: (x bin, y bin, value)}``; every other keypoint scores 0."""
    sx, sy = np.zeros((1, 133, 576), np.float32), np.zeros((1, 133, 768), np.float32)
    for k, (bx, by, v) in bins.items():
        sx[0, k, bx], sy[0, k, by] = v, v
    return _save(_constant_graph("pose", "input", [1, 3, 384, 288], {"simcc_x": sx, "simcc_y": sy}), path)


def pose_tracker_onnx(path):
    """Every keypoint at the crop's brightest channel-0 pixel: column maxima -> x bins, row maxima -> y bins."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Slice", ["input", "s0", "s1", "ax1"], ["red"])]           # [1, 1, 384, 288]
    for axis, length, name in ((2, 288, "simcc_x"), (3, 384, "simcc_y")):
        nodes += [
            helper.make_node("ReduceMax", ["red"], [f"{name}_p"], axes=[axis], keepdims=0),     # [1, 1, L]
            helper.make_node("Unsqueeze", [f"{name}_p", "last"], [f"{name}_u"]),               # [1, 1, L, 1]
            helper.make_node("Tile", [f"{name}_u", "rep2"], [f"{name}_t"]),                    # [1, 1, L, 2]
            helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [f"{name}_r"]),         # [1, 1, 2L]
            helper.make_node("Expand", [f"{name}_r", f"{name}_full"], [name]),                 # [1, 133, 2L]
        ]
    inits = [i64("s0", [0]), i64("s1", [1]), i64("ax1", [1]), i64("last", [3]), i64("rep2", [1, 1, 1, 2]),
             i64("simcc_x_shape", [1, 1, 576]), i64("simcc_y_shape", [1, 1, 768]),
             i64("simcc_x_full", [1, 133, 576]), i64("simcc_y_full", [1, 133, 768])]
    graph = helper.make_graph(
        nodes, "tracker", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 384, 288])],
        [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, 133, 576]),
         helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, 133, 768])], initializer=inits)
    return _save(graph, path)


def box_for(cx, cy, k):
    """A person box whose 1.25x crop is exactly (288k x 384k) around (cx, cy)."""
    w, h = 288 * k / 1.25, 384 * k / 1.25
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


@pytest.mark.parametrize("frame_hw,centre,k,dot", [
    ((576, 640), (320, 288), 1.0, (300, 250)),      # letterbox factor 1, crop 1:1
    ((576, 640), (330, 300), 0.5, (341, 262)),      # crop magnified 2x
    ((288, 320), (160, 144), 1.0, (120, 80)),       # letterbox factor 2 (box reported in 640-pixel units)
])
def test_keypoints_follow_the_dot_through_detector_crop_and_simcc(tmp_path, frame_hw, centre, k, dot):
    h, w = frame_hw
    r = min(640 / h, 640 / w)
    box = box_for(*centre, k)
    det = detector_onnx(tmp_path / "yolox_l.onnx", [tuple(v * r for v in box)])
    pos = pose_tracker_onnx(tmp_path / "dw-ll_ucoco_384.onnx")
    img = np.zeros((h, w, 3), np.uint8)
    img[dot[1]:dot[1] + 3, dot[0]:dot[0] + 3, 0] = 255
    model = pose.DWPose(det, pos)
    boxes = pose.detect_people(model.detector, img)
    np.testing.assert_allclose(boxes, [box], atol=1e-2)
    kps, scores = model(img)
    assert kps.shape == (1, 134, 2) and scores.shape == (1, 134)
    assert np.all(np.abs(kps[0] - np.array(dot, np.float32)) <= 1.0), kps[0, :3]
    # every keypoint's score is the peak of the normalised red channel; the neck scores 1 (both shoulders seen)
    red_peak = (255 - 123.675) / 58.395
    np.testing.assert_allclose(np.delete(scores[0], 1), red_peak, rtol=1e-4)
    assert scores[0, 1] == 1.0


def test_no_person_box_uses_the_whole_frame(tmp_path):
    det = detector_onnx(tmp_path / "yolox_l.onnx", [])
    pos = pose_tracker_onnx(tmp_path / "dw-ll_ucoco_384.onnx")
    img = np.zeros((288, 384, 3), np.uint8)           # crop 480x640 around the centre, shrunk 0.6x into 288x384
    img[200:203, 90:93, 0] = 255
    model = pose.DWPose(det, pos)
    assert pose.detect_people(model.detector, img).shape == (0, 4)
    kps, _ = model(img)
    assert np.all(np.abs(kps[0] - [90, 200]) <= 1 / 0.6)


def test_two_overlapping_boxes_are_suppressed_to_one(tmp_path):
    a = box_for(320, 288, 1.0)
    b = tuple(v + 10 for v in a)                      # IoU ~0.86 > 0.45: the lower-scoring one goes
    c = box_for(100, 120, 0.5)                        # apart: kept
    det = detector_onnx(tmp_path / "d.onnx", [a, b, c])
    boxes = pose.detect_people(pose.DWPose(det, pose_tracker_onnx(tmp_path / "p.onnx")).detector,
                               np.zeros((576, 640, 3), np.uint8))
    assert boxes.shape == (2, 4)
    np.testing.assert_allclose(boxes, [a, c], atol=1e-2)


FRAME_H, FRAME_W, CX, CY = 576, 640, 320, 288          # short side 576 = the drawing canvas: no resize
SHOULDER, ELBOW = (250, 200), (330, 260)               # image pixels (drawn at +0.5: the int() of the original)


def _bins(x, y):
    """SimCC bins of image point (x + 0.5, y + 0.5) for the 1:1 crop centred at (CX, CY)."""
    return 2 * (x - CX + 144) + 1, 2 * (y - CY + 192) + 1


@pytest.fixture()
def arm_model(tmp_path):
    det = detector_onnx(tmp_path / "yolox_l.onnx", [box_for(CX, CY, 1.0)])
    pos = pose_constant_onnx(tmp_path / "dw-ll_ucoco_384.onnx",
                             {R_SHOULDER: (*_bins(*SHOULDER), 1.0), R_ELBOW: (*_bins(*ELBOW), 1.0)})
    return pose.DWPose(det, pos)


def test_known_keypoints_and_openpose_order(arm_model):
    kps, scores = arm_model(np.zeros((FRAME_H, FRAME_W, 3), np.uint8))
    # OpenPose body order: 2 = right shoulder, 3 = right elbow; the neck (1) needs both shoulders
    np.testing.assert_allclose(kps[0, 2], np.add(SHOULDER, 0.5), atol=1e-2)
    np.testing.assert_allclose(kps[0, 3], np.add(ELBOW, 0.5), atol=1e-2)
    assert scores[0, 2] == scores[0, 3] == 1.0
    assert np.count_nonzero(scores[0]) == 2


def test_drawn_arm_pixels(arm_model):
    img = np.zeros((FRAME_H, FRAME_W, 3), np.uint8)
    drawn = pose.draw_pose(*arm_model(img), FRAME_H, FRAME_W)
    assert drawn.shape == (FRAME_H, FRAME_W, 3) and drawn.dtype == np.uint8
    # limb shoulder->elbow: OpenPose limb 2, colour (255, 170, 0) on the BGR canvas x 1 x 1 x 0.6 -> RGB (0, 102, 153)
    mid = ((SHOULDER[0] + ELBOW[0] + 1) // 2, (SHOULDER[1] + ELBOW[1] + 1) // 2)
    np.testing.assert_array_equal(drawn[mid[1], mid[0]], [0, 102, 153])
    for t in (0.25, 0.75):                                                     # along the stick
        x, y = (np.array(SHOULDER) + t * (np.array(ELBOW) - SHOULDER) + 0.5).astype(int)
        assert tuple(drawn[y, x]) == (0, 102, 153), (t, drawn[y - 1:y + 2, x - 1:x + 2])
    # points at full colour: right shoulder = body colour 2, right elbow = body colour 3 (BGR -> RGB)
    np.testing.assert_array_equal(drawn[SHOULDER[1], SHOULDER[0]], [0, 170, 255])
    np.testing.assert_array_equal(drawn[ELBOW[1], ELBOW[0]], [0, 255, 255])
    # the stick is thin (minor axis 1): 4 px across it nothing is drawn
    normal = np.array([-(ELBOW[1] - SHOULDER[1]), ELBOW[0] - SHOULDER[0]], float)
    off = (np.array(mid) + 4 * normal / np.linalg.norm(normal)).astype(int)
    np.testing.assert_array_equal(drawn[off[1], off[0]], [0, 0, 0])
    coloured = np.any(drawn > 0, axis=-1)
    assert 60 < coloured.sum() < 600                        # one stick and two dots, nothing else visible
    ys, xs = np.nonzero(coloured)
    assert xs.min() >= SHOULDER[0] - 3 and xs.max() <= ELBOW[0] + 3 and ys.min() >= SHOULDER[1] - 3


def test_drawn_on_a_larger_canvas_then_resized(arm_model):
    """Frame short side 288: drawn at 2x, resized down (bilinear): the stick is still there, in its hue."""
    det_frame = np.zeros((FRAME_H, FRAME_W, 3), np.uint8)
    kps, scores = arm_model(det_frame)
    drawn = pose.draw_pose(kps / 2, scores, FRAME_H // 2, FRAME_W // 2)
    x, y = (SHOULDER[0] + ELBOW[0]) // 4, (SHOULDER[1] + ELBOW[1]) // 4
    patch = drawn[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).astype(int)
    best = patch[np.argmax(patch.sum(1))]
    assert best[0] == 0 and best[2] > best[1] > 30          # (0, 102, 153)-like: blue > green, no red


def test_pose_fills_only_the_masked_region(arm_model):
    rng = np.random.default_rng(0)
    frames = rng.integers(30, 220, (5, FRAME_H, FRAME_W, 3), dtype=np.uint8)
    mask = np.zeros((5, FRAME_H, FRAME_W, 3), np.uint8)
    mask[:, 150:320, 200:400] = 255
    bg, m = prepare_editing_pixels(frames, mask, expand_scale=0)
    poses = pose.pose_frames(frames, arm_model)
    filled = pose.fill_mask_with_pose(bg, m, poses)
    to_u8 = lambda p: np.rint((p + 1) / 2 * 255).astype(np.uint8)  # noqa: E731
    out = to_u8(filled[0])
    np.testing.assert_array_equal(out[:, :150], frames[:, :150])                 # outside: the video
    np.testing.assert_array_equal(out[:, 150:320, 200:400], poses[:, 150:320, 200:400])   # inside: the skeleton
    mid = ((SHOULDER[0] + ELBOW[0] + 1) // 2, (SHOULDER[1] + ELBOW[1] + 1) // 2)
    np.testing.assert_array_equal(out[:, mid[1], mid[0]], [[0, 102, 153]] * 5)
    assert np.all(out[:, 300, 210] == 0)                                         # masked, no skeleton: black


def test_missing_files_named_in_one_line(tmp_path):
    (tmp_path / "yolox_l.onnx").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as e:
        pose.model_files(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "dw-ll_ucoco_384.onnx" in msg and "yolox_l.onnx" not in msg
    with pytest.raises(FileNotFoundError, match=r"nowhere/yolox_l\.onnx, .*nowhere/dw-ll_ucoco_384\.onnx"):
        pose.model_files(tmp_path / "nowhere")


def test_unloadable_onnx_file_is_a_value_error(tmp_path):
    for f in ("yolox_l.onnx", "dw-ll_ucoco_384.onnx"):
        (tmp_path / f).write_bytes(b"not a model")
    with pytest.raises(ValueError, match="yolox_l.onnx"):
        pose.DWPose(*pose.model_files(tmp_path))


# ------------------------------------------------------------------------------------------- sampling wiring


def _editing_files(tmp_path, h=32, w=48):
    from hcjax.media import write_video

    rng = np.random.default_rng(1)
    video = rng.integers(30, 220, (5, h, w, 3), dtype=np.uint8)
    mask = np.zeros((5, h, w, 3), np.uint8)
    mask[:, 8:24, 16:40] = 255
    write_video(tmp_path / "v.mp4", video, lossless=True)
    write_video(tmp_path / "m.mp4", mask, lossless=True)
    return str(tmp_path / "v.mp4"), str(tmp_path / "m.mp4")


def test_sample_cli_missing_onnx_files_exit_2_one_line(tmp_path, capsys):
    import sample

    video, mask = _editing_files(tmp_path)
    rc = sample.main(["--config", "configs/default_tiny.yaml", "--set", "dit.video_condition=true",
                      "--input-video", video, "--mask-video", mask, "--pose-enhance",
                      "--dwpose-dir", str(tmp_path / "dw"), "--save-path", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "yolox_l.onnx" in err[0] and "dw-ll_ucoco_384.onnx" in err[0], err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_pose_enhance_needs_editing():
    from hcjax import models as M
    from hcjax.config import load_config
    from hcjax.pipeline import Request, validate_request

    cfg = load_config(M.DEFAULT_CONFIG)
    req = Request.from_config(cfg.sample, pose_enhance=True)
    with pytest.raises(ValueError, match="--pose-enhance.*--input-video"):
        validate_request(cfg, req)


def test_prepare_encodes_the_pose_filled_background(tmp_path):
    import dataclasses

    import jax.numpy as jnp

    from hcjax import models as M
    from hcjax.conditioning.video import encode_editing_latents
    from hcjax.config import load_config
    from hcjax.pipeline import Request, prepare

    h, w = 32, 48
    video, mask = _editing_files(tmp_path, h, w)
    dw = tmp_path / "dw"
    dw.mkdir()
    # a person box around the frame centre, one-hot shoulder/elbow keypoints inside the mask
    r = min(640 / h, 640 / w)
    detector_onnx(dw / "yolox_l.onnx", [tuple(v * r for v in box_for(24, 16, w / 288 * 0.8))])
    pose_constant_onnx(dw / "dw-ll_ucoco_384.onnx", {R_SHOULDER: (100, 300, 1.0), R_ELBOW: (400, 420, 1.0)})
    cfg = load_config(M.DEFAULT_CONFIG, ["dit.video_condition=true"])
    models = M.random_models(cfg, seed=2)
    req = Request(ref_image=str(ROOT / "assets/demo_subject.png"),
                  pos_prompt="a dancer", input_video=video, mask_video=mask, steps=1, cfg_scale=1.0,
                  sample_posterior=False, pose_enhance=True, dwpose_dir=str(dw))
    with_pose = np.asarray(prepare(models, req).conds.bg_latents)
    plain = np.asarray(prepare(models, dataclasses.replace(req, pose_enhance=False)).conds.bg_latents)
    bg, m = pose.pose_editing_pixels(video, mask, req.expand_scale, pose.detector(str(dw)))
    assert np.any(bg[0, :, 8:24, 16:40] > -1)                     # the skeleton is in the masked region
    expected = np.asarray(encode_editing_latents(models.vae, cfg.vae, jnp.asarray(bg), jnp.asarray(m)))
    np.testing.assert_allclose(with_pose, np.concatenate([expected] * with_pose.shape[0]), atol=1e-5)
    assert not np.allclose(with_pose, plain, atol=1e-3)
