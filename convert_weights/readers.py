"""Checkpoint readers: PyTorch ``.pt``/``.bin`` (weights_only, mmap) and safetensors, to numpy without copies.

``read_state_dict`` returns a lazy mapping name -> numpy array: tensors are converted only when a rule reads
them, so converting a large checkpoint never holds two full copies. bf16 / fp8 tensors are viewed through
their integer bit patterns into ``ml_dtypes`` numpy dtypes (no fp32 round trip). Every mapping also has
``shapes()`` / ``dtypes()`` (metadata only) and ``path`` (the file it came from, for error messages);
``float8_keys`` lists the float8 tensors of a state dict from that metadata.

Broken files fail when opened, with a ``ValueError`` naming the file: a safetensors header that is not JSON or
lists tensors beyond the end of the file (a truncated download) or whose byte ranges do not match their shapes;
a ``.pt`` that is empty, truncated or not a PyTorch checkpoint.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes: too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a mapping)")
    header.pop("__metadata__", None)
    _check_layout(path, header, size - 8 - n)
    return header, 8 + n


def _check_layout(path: Path, header: dict, data_bytes: int) -> None:
    """Every tensor's byte range lies inside the file and matches its shape and dtype (a truncated file fails)."""
    end, wrong = 0, []
    for k, info in header.items():
        try:
            a, b = (int(x) for x in info["data_offsets"])
            shape, dt = [int(d) for d in info["shape"]], _ST_DTYPES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry {k!r}: {info!r}") from None
        if dt is not None and b - a != int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize or b < a:
            wrong.append(k)
        end = max(end, b)
    if end > data_bytes:
        raise ValueError(f"{path}: truncated: the header lists {end:,} bytes of tensor data but the file holds "
                         f"{data_bytes:,} (re-download or re-copy it)")
    if wrong:
        raise ValueError(f"{path}: corrupt safetensors header: byte ranges do not match the shapes of "
                         f"{len(wrong)} tensors ({', '.join(wrong[:5])})")


class SafetensorsDict(Mapping):
    """Lazy, memory-mapped safetensors state dict (supports bf16 and fp8 as ml_dtypes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self.offset = _safetensors_header(self.path)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")

    def __getitem__(self, key: str) -> np.ndarray:
        info = self.header[key]
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        buf = self._mm[self.offset + a : self.offset + b]
        return buf.view(dt).reshape(info["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self.header)

    def __len__(self) -> int:
        return len(self.header)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.header.items()}

    def dtypes(self) -> dict[str, str]:
        return {k: v["dtype"] for k, v in self.header.items()}


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor (or a plain number) -> numpy, keeping bf16/fp8 bit-exact through ml_dtypes views."""
    import torch

    if not isinstance(t, torch.Tensor):
        return np.asarray(t)
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if t.dtype == torch.float8_e5m2:
        return t.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e5m2)
    return t.contiguous().numpy()


class TorchDict(Mapping):
    """Lazy numpy view of a dict of torch tensors (converted on access); ``path``: the source file, if any."""

    def __init__(self, tensors: Mapping[str, Any], path: Path | None = None):
        self.tensors = tensors
        self.path = path

    def __getitem__(self, key):
        return torch_to_numpy(self.tensors[key])

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def dtypes(self) -> dict[str, str]:
        return {k: str(getattr(v, "dtype", type(v).__name__)).replace("torch.", "") for k, v in self.tensors.items()}


def _torch_load(path: Path):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a conversion dependency
        raise ImportError("reading .pt checkpoints needs torch: pip install 'hcjax[test]'") from e
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a PyTorch checkpoint")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Legacy (non-zip) files cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError, KeyError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot read the PyTorch checkpoint ({size:,} bytes): truncated, corrupt or not "
                         f"a torch.save file ({first[:200]})") from None


def _select(obj: Any, key: str | None, path: Path) -> Mapping:
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"{path}: expected a top-level key {key!r}; found {have}")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping of tensors), got {type(obj).__name__}")
    return obj


def read_state_dict(path: str | Path, key: str | None = None) -> Mapping[str, np.ndarray]:
    """Open a checkpoint lazily. ``key`` selects a nested dict (e.g. ``module`` for DeepSpeed files)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: directory has no *.safetensors files")
        return ShardedDict([SafetensorsDict(f) for f in files], path)
    if path.suffix == ".safetensors":
        return SafetensorsDict(path)
    return TorchDict(_select(_torch_load(path), key, path), path)


def is_float8_name(dtype: str) -> bool:
    """A dtype name from ``dtypes()`` (torch ``float8_e4m3fn``, safetensors ``F8_E4M3``, numpy) is a float8."""
    return dtype.startswith(("float8", "F8_"))


def float8_keys(state: Mapping[str, Any]) -> list[str]:
    """Names of the float8 tensors of ``state``, from metadata when the mapping has ``dtypes()``."""
    if hasattr(state, "dtypes"):
        return [k for k, d in state.dtypes().items() if is_float8_name(str(d))]
    return [k for k, v in state.items() if is_float8_name(np.dtype(v.dtype).name)]


class ShardedDict(Mapping):
    """Several safetensors shards seen as one state dict."""

    def __init__(self, shards: list[SafetensorsDict], path: Path | None = None):
        self.path = path
        self.where: dict[str, SafetensorsDict] = {}
        for s in shards:
            for k in s:
                if k in self.where:
                    raise ValueError(f"tensor {k!r} appears in both {self.where[k].path} and {s.path}")
                self.where[k] = s

    def __getitem__(self, key):
        return self.where[key][key]

    def __iter__(self):
        return iter(self.where)

    def __len__(self):
        return len(self.where)

    def shapes(self):
        return {k: tuple(s.header[k]["shape"]) for k, s in self.where.items()}

    def dtypes(self):
        return {k: s.header[k]["dtype"] for k, s in self.where.items()}
