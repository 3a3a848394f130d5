"""The layering rule of ``hcjax/__init__.py``: imports point down (or sideways) only, no module cycle, and
function-level imports only for optional heavy libraries.

The checker parses every Python file of the project (function-level imports included) without importing it.
Its own tests plant a cycle, an upward edge and a hidden function-level import in a temporary tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("hcjax", "convert_weights", "demo", "benchmarks", "scripts", "sample.py", "train.py")
INTERNAL = ("hcjax", "convert_weights", "demo", "sample", "train", "benchmarks", "scripts")

# module-name prefix -> floor (the longest matching prefix wins); see hcjax/__init__.py
FLOORS = {
    "hcjax": 0, "hcjax.config": 0, "hcjax.axes": 0, "hcjax.cli": 0,
    "hcjax.layers": 1, "hcjax.attention": 1, "hcjax.rope": 1, "hcjax.scheduler": 1, "hcjax.media": 1,
    "hcjax.sharding": 1, "hcjax.checkpoint": 1, "hcjax.runtime": 1,
    "hcjax.dit": 2, "hcjax.vae": 2, "hcjax.conditioning": 2,
    "hcjax.pipeline": 3, "hcjax.training": 3, "hcjax.vae_training": 3, "hcjax.data": 3, "hcjax.lora": 3,
    "hcjax.memory": 3, "hcjax.batching": 3,
    "convert_weights": 3,
    "hcjax.models": 4,
    "hcjax.precompute": 5, "hcjax.export": 5, "hcjax.app": 5, "hcjax.calibrate_cache": 5,
    "convert_weights.__main__": 5, "sample": 5, "train": 5, "demo": 5, "benchmarks": 5, "scripts": 5,
}
EXACT = {"hcjax"}          # the package __init__ alone, not every module below it
# the only libraries a function may import (optional or heavy; everything else goes at the module top)
LAZY_OK = {"torch", "transformers", "diffusers", "peft", "av", "cv2", "gradio", "onnx", "onnxruntime",
           "tensorboardX", "soundfile", "soxr", "playwright", "qwix"}
LAZY_OK_MODULES = ("jax.experimental.pallas",)   # TPU kernels: importing them elsewhere costs seconds


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def collect(root: Path, sources=SOURCES) -> dict[str, Path]:
    files = {}
    for s in sources:
        p = root / s
        for f in ([p] if p.is_file() else sorted(p.rglob("*.py")) if p.is_dir() else []):
            files[module_name(f, root)] = f
    return files


def floor_of(mod: str, floors=FLOORS) -> int | None:
    best = None
    for prefix, fl in floors.items():
        covers = mod == prefix or (mod.startswith(prefix + ".") and prefix not in EXACT)
        if covers and (best is None or len(prefix) > len(best[0])):
            best = (prefix, fl)
    return None if best is None else best[1]


def _imports(tree: ast.AST, mod: str, is_pkg: bool, modules: set[str]):
    """Yield (target module, line, at module level?, external top-level name or None)."""
    top_level = set()
    for node in tree.body:
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            top_level.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module
            names = [(src, a.name) for a in node.names]
        else:
            continue
        for src, attr in names:
            target = f"{src}.{attr}" if attr and f"{src}.{attr}" in modules else src
            yield target, node.lineno, id(node) in top_level


def check(root: Path, floors=FLOORS, sources=SOURCES) -> list[str]:
    files = collect(root, sources)
    modules = set(files)
    problems, graph = [], {m: set() for m in modules}
    for mod, path in files.items():
        if floor_of(mod, floors) is None:
            problems.append(f"{mod}: not on any floor (add it to FLOORS and hcjax/__init__.py)")
            continue
        tree = ast.parse(path.read_text(), str(path))
        for target, line, module_level in _imports(tree, mod, path.name == "__init__.py", modules):
            internal = target.split(".")[0] in INTERNAL
            where = f"{path.relative_to(root)}:{line}"
            if not module_level and not (target.split(".")[0] in LAZY_OK or target.startswith(LAZY_OK_MODULES)):
                problems.append(f"{where}: function-level import of {target}")
            if not internal:
                continue
            if target not in modules:
                target = max((m for m in modules if target.startswith(m + ".")), key=len, default=target)
            if target not in modules:
                problems.append(f"{where}: import of unknown module {target}")
                continue
            if target != mod:
                graph[mod].add(target)
            fs, ft = floor_of(mod, floors), floor_of(target, floors)
            if ft is not None and ft > fs:
                problems.append(f"{where}: upward import {mod} (floor {fs}) -> {target} (floor {ft})")
    problems = list(dict.fromkeys(problems))        # one line per (file, line, target)
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_project_is_layered():
    problems = check(ROOT)
    assert not problems, "\n".join(problems)


def _tree(tmp_path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


CLEAN = {"hcjax/__init__.py": "", "hcjax/config.py": "import json\n",
         "hcjax/layers.py": "from .config import x\n", "hcjax/dit.py": "from hcjax import layers\nimport torch\n",
         "hcjax/models.py": "from . import dit\nfrom convert_weights import tables\n",
         "convert_weights/__init__.py": "", "convert_weights/tables.py": "from hcjax.dit import D\n",
         "sample.py": "def main():\n    import torch\n"}


def test_checker_accepts_a_clean_tree(tmp_path):
    assert check(_tree(tmp_path, CLEAN)) == []


@pytest.mark.parametrize("plant, expect", [
    ({"hcjax/config.py": "from hcjax.dit import D\n"}, "upward import hcjax.config (floor 0) -> hcjax.dit"),
    ({"hcjax/layers.py": "from .config import x\nfrom . import rope\n", "hcjax/rope.py": "from . import layers\n"},
     "import cycle: hcjax.layers -> hcjax.rope -> hcjax.layers"),
    ({"hcjax/dit.py": "def f():\n    from hcjax import models\n"}, "function-level import of hcjax.models"),
    ({"hcjax/dit.py": "def f():\n    import numpy\n"}, "function-level import of numpy"),
    ({"hcjax/dit.py": "from convert_weights import tables\n"}, "upward import hcjax.dit (floor 2) -> convert_weights"),
    ({"hcjax/newthing.py": ""}, "hcjax.newthing: not on any floor"),
])
def test_checker_finds_planted_problems(tmp_path, plant, expect):
    problems = check(_tree(tmp_path, {**CLEAN, **plant}))
    assert any(expect in p for p in problems), problems
