"""Read ``.npz`` archives from the loader's threads.

``np.load`` parses each member's header with ``ast.literal_eval``. On CPython 3.11 the AST constructor keeps its
recursion counter in interpreter-wide state, so a header parsed in one thread while another thread builds an AST
at a different stack depth fails at random with ``SystemError: AST constructor recursion depth mismatch``
(cpython gh-106905 and its relatives; a training resume in CI died of it). This module reads the headers numpy
writes for plain arrays (``{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }``) with a regular
expression and the data with ``readinto``; anything else (structured or object dtypes, hand-made headers) goes
through numpy's own reader under a lock, with pickles refused as ``np.load`` refuses them by default.
"""

from __future__ import annotations

import re
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np

_HEADER = re.compile(r"\{'descr': '([<>|=][a-zA-Z]\d+)', 'fortran_order': (True|False), "
                     r"'shape': \(((?:\d+, ?)*\d*)\), *\}\s*")
_NUMPY_LOCK = threading.Lock()


def _read_member(f) -> np.ndarray | None:
    """One .npy member; None when its header is not the plain form numpy writes (the caller falls back)."""
    major, _ = np.lib.format.read_magic(f)
    size = int.from_bytes(f.read(2 if major == 1 else 4), "little")
    header = f.read(size).decode("utf-8" if major >= 3 else "latin1")
    m = _HEADER.fullmatch(header)
    if m is None:
        return None
    dtype = np.dtype(m.group(1))
    shape = tuple(int(s) for s in m.group(3).replace(" ", "").split(",") if s)
    out = np.empty(shape, dtype, order="F" if m.group(2) == "True" else "C")
    view = memoryview(out.reshape(-1, order="A").view(np.uint8))
    got = 0
    while got < out.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"data truncated ({got} of {out.nbytes} bytes)")
        got += n
    if f.read(1):
        raise ValueError("data longer than its header says")
    return out


def load_npz(path: str | Path, keys=None) -> dict[str, np.ndarray]:
    """Arrays ``keys`` (default: all) of the archive ``path``, as ``np.load`` reads them; a missing key or a damaged
    archive raises ``ValueError`` naming the problem (``OSError`` for a missing or unreadable file)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            keys = list(members) if keys is None else list(keys)
            missing = [k for k in keys if k not in members]
            if missing:
                raise ValueError(f"missing arrays {missing}")
            out = {}
            for k in keys:
                with zf.open(members[k]) as f:
                    arr = _read_member(f)
                if arr is None:     # a header this module does not parse: numpy's reader, one thread at a time
                    with _NUMPY_LOCK, zf.open(members[k]) as f:
                        arr = np.lib.format.read_array(f, allow_pickle=False)
                out[k] = arr
            return out
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"not a readable .npz archive ({type(err).__name__}: {err})") from None
