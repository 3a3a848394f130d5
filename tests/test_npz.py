"""The loader's ``.npz`` reader (hcjax/data/npz.py) against ``np.load``: the same arrays, no AST on the common
path (the thread-unsafe part of ``np.load`` on CPython 3.11), and damaged archives refused with a named reason."""

from __future__ import annotations

import ast
import io
import zipfile

import ml_dtypes
import numpy as np
import pytest

from hcjax.data.npz import load_npz


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32), "f16": rng.standard_normal(5).astype(np.float16),
        "i64": np.arange(7), "bool": np.array([True, False, True]), "empty": np.zeros((0, 3), np.uint8),
        "scalar": np.float64(3.5), "fortran": np.asfortranarray(rng.standard_normal((3, 5))),
        "big_endian": np.arange(4, dtype=">i4"), "unicode": np.array(["ab", "c"]),
        "bf16": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        "large": rng.standard_normal(70_000).astype(np.float32),              # more than one zip read
        "structured": np.array([(1.5, 2), (3.0, -1)], [("a", "<f4"), ("b", "<i2")]),     # numpy's reader
    }


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_same_arrays_as_np_load(tmp_path, save):
    path = tmp_path / "a.npz"
    save(path, **_arrays())
    got = load_npz(path)
    with np.load(path) as z:
        assert sorted(got) == sorted(z.files)
        for k in z.files:
            ref = z[k]
            assert got[k].dtype == ref.dtype and got[k].shape == ref.shape, k
            assert got[k].tobytes(order="A") == ref.tobytes(order="A"), k
            assert got[k].flags.f_contiguous == ref.flags.f_contiguous and got[k].flags.writeable, k
    assert list(load_npz(path, ["i64", "f32"])) == ["i64", "f32"]


def test_plain_arrays_are_read_without_building_an_ast(tmp_path, monkeypatch):
    path = tmp_path / "a.npz"
    arrays = {k: v for k, v in _arrays().items() if k != "structured"}
    np.savez(path, **arrays)

    def no_ast(*a, **k):
        raise AssertionError("ast used")

    monkeypatch.setattr(ast, "parse", no_ast)
    with pytest.raises(AssertionError, match="ast used"), np.load(path) as z:     # what the loader threads avoid
        z["f32"]
    got = load_npz(path)
    for k, v in arrays.items():
        assert got[k].tobytes() == np.asarray(v).tobytes(), k


def test_damaged_archives_are_refused_with_the_reason(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, x=np.arange(1000, dtype=np.float32), y=np.zeros(3))
    data = path.read_bytes()
    with pytest.raises(ValueError, match=r"missing arrays \['z'\]"):
        load_npz(path, ["x", "z"])
    (tmp_path / "half.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        load_npz(tmp_path / "half.npz")
    flipped = bytearray(data)
    flipped[data.index(b"x.npy") + 400] ^= 0xFF          # inside x's data: the zip CRC no longer matches
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="BadZipFile"):
        load_npz(tmp_path / "flipped.npz", ["x"])
    np.savez(tmp_path / "obj.npz", o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npz(tmp_path / "obj.npz")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf:       # a header promising more data than follows
        zf.writestr("x.npy", data_of(np.arange(10, dtype=np.int32))[:-8])
    with pytest.raises(ValueError, match="truncated"):
        load_npz(tmp_path / "short.npz")
    with pytest.raises(OSError):
        load_npz(tmp_path / "absent.npz")


def data_of(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()
