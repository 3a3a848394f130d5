"""The demo application: a small HunyuanCustom-shaped model trained from nothing on synthetic subject videos.

Not library code (floor 5 of ``hcjax/__init__.py``): it uses the data pipeline, training, precompute, loading and
sampling. ``python -m demo build --workdir RUN`` runs the committed bundle's recipe into ``assets/demo/model``
(:mod:`.build`); ``python -m demo references`` writes the held-out reference images; ``benchmarks/demo_eval.py``
measures the model (:mod:`.evaluate`). The subjects, held-out split, captions and evaluation pairs are in
:mod:`.subjects`.
"""

from .build import build, crop_start, make_dataset, make_llava_tokenizer, make_text_towers, tokenizer_corpus
from .evaluate import (centroid, components, descriptor, distance, evaluate_multi, evaluate_videos, foreground,
                       generate_eval, load_demo, pieces, silhouette)
from .subjects import (DEMO_BUNDLE, DEMO_CONFIG, DEMO_DIR, DEMO_VAE, DEMO_WORLD, EVAL_PROMPT, FRAMES, HELD_OUT,
                       PHRASES, REF_RADIUS, SIZE, SUBJECTS, TEMPLATES, TRAIN_SUBJECTS, TRAVEL, TWO_SIZE, TWO_TEMPLATES,
                       WORLD_FILE, World, caption, caption_two, committed_ref_radius, eval_pairs, random_color,
                       reference_image, seen_pairs, subject_name, two_subject_pairs, world_references,
                       write_eval_references)

__all__ = [
    "DEMO_BUNDLE", "DEMO_CONFIG", "DEMO_DIR", "DEMO_VAE", "DEMO_WORLD", "EVAL_PROMPT", "FRAMES", "HELD_OUT", "PHRASES",
    "REF_RADIUS", "SIZE", "SUBJECTS", "TEMPLATES", "TRAIN_SUBJECTS", "TRAVEL", "TWO_SIZE", "TWO_TEMPLATES",
    "WORLD_FILE", "World",
    "build", "caption", "caption_two", "centroid", "committed_ref_radius", "components", "crop_start", "descriptor",
    "distance", "eval_pairs", "evaluate_multi", "evaluate_videos", "foreground", "generate_eval", "load_demo",
    "make_dataset", "make_llava_tokenizer", "make_text_towers", "pieces", "random_color", "reference_image",
    "seen_pairs", "silhouette", "subject_name", "tokenizer_corpus", "two_subject_pairs", "world_references",
    "write_eval_references",
]
