"""Regenerate the bundled tiny tokenizers (assets/tiny_tokenizers) used by the embedded default of sample.py.

They are the same tiny byte-level BPE (LLaVA-style, with <image> and <pad>) and ASCII CLIP BPE that the tests
build, saved with transformers' save_pretrained so that sample.py loads them through the user code path.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_text_encoders import make_clip_tokenizer, make_llava_tokenizer  # noqa: E402

out = ROOT / "assets" / "tiny_tokenizers"
make_llava_tokenizer(out / "llava")
make_clip_tokenizer(out / "clip")
print(f"wrote {out}")
