"""The demo's world: the synthetic subjects, which of them are held out, the captions and the evaluation pairs.

A subject is ``(colour, texture, shape)`` of :mod:`hcjax.data.synthetic` (7 x 4 x 4 = 112); :data:`HELD_OUT` (24,
seeded) never appear in training and form the evaluation set. Clips are :data:`FRAMES` frames of
:data:`SIZE` x :data:`SIZE`; a subject crosses :data:`TRAVEL` of the frame. Captions never name the subject (the
text carries the motion only; the DiT must take the subject's look from the reference image). Images are
``uint8 [H, W, 3]`` RGB.

Two-subject clips (issue 24) name each subject by its colour only (``the red object moves left and the blue object
moves right``, item names ``red object`` / ``blue object``): the caption must say which subject makes which motion,
and the shape and texture still have to come from the references. Their evaluation set pairs held-out subjects
(:func:`two_subject_pairs`; the references are the held-out ``subject_NN.png``).
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import typing
from pathlib import Path

import numpy as np
from PIL import Image

from hcjax.data import synthetic

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DIR = ROOT / "assets" / "demo"
DEMO_BUNDLE = DEMO_DIR / "model"
# the VAE trained once (git 754943a) and kept frozen since: every build uses it unless told to train one
DEMO_VAE = DEMO_BUNDLE / "vae"

SUBJECTS = [(c, t, s) for c in synthetic.COLORS for t in synthetic.TEXTURES for s in synthetic.SHAPES]
HELD_OUT = [SUBJECTS[i] for i in sorted(np.random.default_rng(2026).choice(len(SUBJECTS), 24, replace=False))]
TRAIN_SUBJECTS = [s for s in SUBJECTS if s not in HELD_OUT]
PHRASES = {"left": ("left", "to the left"), "right": ("right", "to the right"),
           "up": ("up", "upward"), "down": ("down", "downward")}
# no template names the subject: the text carries the motion only, the DiT must take the subject's look from the
# reference image (as at evaluation, where the prompt is EVAL_PROMPT and the subject was never seen)
TEMPLATES = ("the object moves {p}", "an object moves {p} across a gray background", "the object is moving {p}",
             "an object, moving {p}")
EVAL_PROMPT = "the object moves {p}"
FRAMES, SIZE, REF_RADIUS = 9, 64, 14.0
TWO_SIZE = (SIZE, 2 * SIZE)     # two-subject clips of the "cells" layout: one SIZE x SIZE cell per subject
TRAVEL = 0.5       # the subject crosses half the frame in a clip (less motion per 4-frame latent for the VAE)


WORLD_FILE = "demo.json"      # in a bundle: the World its DiT was trained in (absent: the default World)


@dataclasses.dataclass(frozen=True)
class World:
    """How a build draws its single-subject training clips, recorded in the bundle (:data:`WORLD_FILE`) so that
    the evaluation gives the model references like the ones it was trained with. ``subject_radius``: the range of
    the subject's radius (fraction of the frame; :func:`hcjax.data.synthetic.make_clip`); ``ref_radius``: the
    radius (pixels at :data:`SIZE`) of the evaluation references; ``random_colors``: every training clip paints its
    subject (video and reference alike) in a random saturated colour (:func:`random_color`) instead of its colour
    name's, so that no colour + texture of the training set names a shape. The defaults are the world of the
    bundles before demo v2 (git 754943a and older, which have no ``demo.json``); the committed bundle's world, which
    ``python -m demo build`` builds by default, is :data:`DEMO_WORLD`. Two-subject clips keep their named colours
    (their captions name them).

    ``two_subject_layout``: ``"lanes"`` (default): two-subject clips are :data:`SIZE` square, the subjects crossing
    two half-frame lanes (radius 10-13 pixels); ``"cells"``: they are :data:`TWO_SIZE` (twice as wide), each
    subject moving in its own :data:`SIZE` square cell at ``subject_radius`` (as large as a single subject), and the
    two-subject evaluation samples at that size. ``two_subject_clips``: how many such clips the build's
    ``dit_two`` stage adds to the single-subject clips (with ``train.two_subject_steps``)."""

    subject_radius: tuple[float, float] = (0.18, 0.26)
    ref_radius: float = REF_RADIUS
    random_colors: bool = False
    two_subject_layout: str = "lanes"
    two_subject_clips: int = 0

    LAYOUTS: typing.ClassVar[tuple[str, ...]] = ("lanes", "cells")

    def __post_init__(self):
        lo, hi = self.subject_radius
        if not 0.0 < lo <= hi < 0.5:
            raise ValueError(f"subject radius must be 0 < lo <= hi < 0.5 of the frame, got {self.subject_radius}")
        if not 2.0 <= self.ref_radius < SIZE / 2:
            raise ValueError(f"reference radius must be in [2, {SIZE // 2}) pixels, got {self.ref_radius}")
        if self.two_subject_layout not in self.LAYOUTS:
            raise ValueError(f"two-subject layout must be one of {self.LAYOUTS}, got {self.two_subject_layout!r}")
        if self.two_subject_clips < 0:
            raise ValueError(f"two-subject clips must be >= 0, got {self.two_subject_clips}")

    @classmethod
    def with_radius(cls, lo: float, hi: float, random_colors: bool = False, **kw) -> "World":
        """Subjects of radius ``lo..hi`` (fraction of the frame), evaluation references at the middle of that
        range (rounded to a pixel)."""
        return cls((lo, hi), float(round(SIZE * (lo + hi) / 2)), random_colors, **kw)

    @property
    def two_subject_size(self) -> tuple[int, int]:
        """``(height, width)`` of this world's two-subject clips and two-subject evaluation videos."""
        return TWO_SIZE if self.two_subject_layout == "cells" else (SIZE, SIZE)

    def two_subject_clip(self, rng: np.random.Generator, picks=None, directions=None):
        """A two-subject clip of this world (:func:`hcjax.data.synthetic.make_multi_clip`, half-lane travel). In the
        cells layout the references are :data:`SIZE` squares (the middle of the generator's full-width ones, which
        are white outside it), the size of a single subject's reference and of its cell."""
        cells = self.two_subject_layout == "cells"
        video, refs, meta, mask = synthetic.make_multi_clip(
            rng, FRAMES, *self.two_subject_size, 2, picks=picks, directions=directions, travel=TRAVEL, cells=cells,
            radius=self.subject_radius if cells else None)
        if cells:
            left = (refs.shape[2] - SIZE) // 2
            refs = np.ascontiguousarray(refs[:, :, left:left + SIZE])
        return video, refs, meta, mask

    def save(self, bundle: Path) -> Path:
        path = Path(bundle) / WORLD_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, bundle: str | Path | None = None) -> "World":
        """The world of ``bundle`` (default: the committed one); a bundle without :data:`WORLD_FILE` was built in
        the default world."""
        path = Path(DEMO_BUNDLE if bundle is None else bundle) / WORLD_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(tuple(data["subject_radius"]), float(data["ref_radius"]), bool(data["random_colors"]),
                       str(data.get("two_subject_layout", "lanes")), int(data.get("two_subject_clips", 0)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a demo world ({e})") from None


DEMO_WORLD = World.with_radius(0.25, 0.35, True, two_subject_layout="cells", two_subject_clips=1200)
"""The committed bundle's world (its ``demo.json``) and the default of ``python -m demo build`` / :func:`demo.build`:
subjects of radius 0.25-0.35 of the frame in random colours, and 1200 two-subject clips in the cells layout."""


def random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random saturated colour (any hue; saturation 0.65-0.9, value 0.75-0.95): far from the gray and white
    backgrounds, as the named colours are."""
    h, s, v = rng.uniform(0.0, 1.0), rng.uniform(0.65, 0.9), rng.uniform(0.75, 0.95)
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))


TWO_TEMPLATES = ("the {c0} object moves {p0} and the {c1} object moves {p1}",
                 "a {c0} object moves {p0}, a {c1} object moves {p1}")
EVAL_PROMPT_TWO = TWO_TEMPLATES[0]
TWO_DIRECTIONS = (("left", "right"), ("up", "down"), ("right", "left"), ("down", "up"))


def subject_name(subject) -> str:
    return " ".join(subject)


def caption(rng: np.random.Generator, direction: str) -> tuple[str, str]:
    """A random caption (one of :data:`TEMPLATES`) and the item name for a subject moving in ``direction``."""
    p = PHRASES[direction][rng.integers(2)]
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(p=p), "object"


def caption_two(rng: np.random.Generator, colors, motions) -> tuple[str, list[str]]:
    """A random two-subject caption (one of :data:`TWO_TEMPLATES`) and the item names (``<colour> object``)."""
    p = [PHRASES[d][rng.integers(2)] for d in motions]
    t = TWO_TEMPLATES[rng.integers(len(TWO_TEMPLATES))]
    return t.format(c0=colors[0], c1=colors[1], p0=p[0], p1=p[1]), [f"{c} object" for c in colors]


def reference_image(subject, size: int = SIZE, radius: float = REF_RADIUS) -> np.ndarray:
    """The subject centred on white (``radius`` pixels at :data:`SIZE`), as the dataset's reference images."""
    color, texture, shape = subject
    white = np.full((size, size, 3), 255, np.float32)
    return synthetic.render(shape, texture, synthetic.COLORS[color], size / 2, size / 2, radius * size / SIZE,
                            size, size, white)


def _pair(i: int, subject, ref_image: Path) -> dict:
    """Evaluation pair ``i``: the subject, a direction (cycling over the four) and the eval prompt, at the
    single-subject clips' size (not the bundle's sampling default: ``hcjax.export`` sets that to a run's largest
    bucket, 64x128 for a run with two-subject clips)."""
    d = list(synthetic.DIRECTIONS)[i % 4]
    return {"index": i, "subject": subject, "direction": d, "prompt": EVAL_PROMPT.format(p=PHRASES[d][1]),
            "ref_image": ref_image, "video_size": (SIZE, SIZE)}


def eval_pairs(ref_dir: Path = DEMO_DIR) -> list[dict]:
    """The held-out evaluation set: each held-out subject with one direction (cycling) and the eval prompt;
    references ``ref_dir/subject_NN.png`` (:func:`write_eval_references`)."""
    return [_pair(i, s, Path(ref_dir) / f"subject_{i:02d}.png") for i, s in enumerate(HELD_OUT)]


def two_subject_pairs(n: int = 12, seed: int = 11, ref_dir: Path = DEMO_DIR, world: World | None = None) -> list[dict]:
    """``n`` evaluation pairs of two held-out subjects each (distinct colours and shapes, drawn with ``seed``),
    directions cycling over :data:`TWO_DIRECTIONS`, prompt :data:`EVAL_PROMPT_TWO`; ``"refs"`` are the subjects'
    indices in :data:`HELD_OUT` (their references are ``subject_NN.png``). With ``world``, each pair is sampled at
    its ``two_subject_size`` (``"video_size"``; otherwise the model's default size)."""
    rng = np.random.default_rng(seed)
    pairs, used = [], set()
    while len(pairs) < n:
        a, b = (int(x) for x in rng.choice(len(HELD_OUT), 2, replace=False))
        sa, sb = HELD_OUT[a], HELD_OUT[b]
        if sa[0] == sb[0] or sa[2] == sb[2] or (a, b) in used or (b, a) in used:
            continue
        used.add((a, b))
        i = len(pairs)
        dirs = TWO_DIRECTIONS[i % len(TWO_DIRECTIONS)]
        prompt = EVAL_PROMPT_TWO.format(c0=sa[0], c1=sb[0], p0=PHRASES[dirs[0]][1], p1=PHRASES[dirs[1]][1])
        pairs.append({"index": i, "subjects": (sa, sb), "refs": (a, b), "directions": dirs, "prompt": prompt,
                      "item_names": [f"{sa[0]} object", f"{sb[0]} object"],
                      "ref_images": [Path(ref_dir) / f"subject_{a:02d}.png", Path(ref_dir) / f"subject_{b:02d}.png"]})
        if world is not None:
            pairs[-1]["video_size"] = world.two_subject_size
    return pairs


def seen_pairs(ref_dir: Path, n: int = 24, seed: int = 5, radius: float = REF_RADIUS) -> list[dict]:
    """``n`` training subjects in the layout of :func:`eval_pairs` (eval prompt, cycling directions), references
    written to ``ref_dir``. The model saw these subjects (never these videos): scoring them separates what the DiT
    fits from what it generalises to the held-out subjects."""
    ref_dir.mkdir(parents=True, exist_ok=True)
    picks = sorted(np.random.default_rng(seed).choice(len(TRAIN_SUBJECTS), n, replace=False))
    pairs = [_pair(i, TRAIN_SUBJECTS[k], ref_dir / f"seen_{i:02d}.png") for i, k in enumerate(picks)]
    for p in pairs:
        Image.fromarray(reference_image(p["subject"], radius=radius)).save(p["ref_image"])
    return pairs


def committed_ref_radius() -> float:
    """The radius of the committed references ``assets/demo/subject_NN.png``: the committed bundle's world's."""
    return World.load(DEMO_BUNDLE).ref_radius


def world_references(world: World, scratch: Path) -> Path:
    """The directory of held-out references for a model of ``world``: the committed ``assets/demo`` when its
    references have the world's radius, else ``scratch/references`` (written here)."""
    if world.ref_radius == committed_ref_radius():
        return DEMO_DIR
    write_eval_references(Path(scratch) / "references", world.ref_radius)
    return Path(scratch) / "references"


def write_eval_references(out: Path = DEMO_DIR, radius: float | None = None) -> list[Path]:
    """The held-out subjects' reference images ``subject_NN.png`` in ``out``, ``radius`` pixels (default:
    :func:`committed_ref_radius`, as committed in ``assets/demo``)."""
    radius = committed_ref_radius() if radius is None else radius
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in eval_pairs(out):
        path = p["ref_image"]
        Image.fromarray(reference_image(p["subject"], radius=radius)).save(path)
        paths.append(path)
    return paths
