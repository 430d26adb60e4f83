"""Checkpoint files, one tensor at a time.

Sources: a transformers model directory (``config.json`` and ``model.safetensors`` or
shards with ``model.safetensors.index.json``), one ``.safetensors`` file, or a ``.pt``
state dict (loaded with ``mmap=True``: tensors stay on disk until read).  Safetensors are
read from their header and byte ranges directly, so a tensor that a conversion leaves alone
is copied as the bytes it was stored as, never decoded.

The writer (``ShardWriter``) writes a safetensors file whose header is known up front
(every tensor's dtype and shape), then each tensor's bytes in order: at most one tensor is
held in memory.  Output goes to a temporary directory beside the destination, renamed into
place only when everything is written and checked (``atomic_dir``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from attnfx.convert.base import ConvertError, TensorInfo

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 1 << 24


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes as safetensors stores them (little-endian, row-major)."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SafetensorsFile:
    """A safetensors file read from its header; tensors read by byte range."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConvertError(f"corrupt shard {self.path}: shorter than a header")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise ConvertError(f"corrupt shard {self.path}: header length {n} is invalid")
                header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"corrupt shard {self.path}: unreadable header ({e})") from e
        except OSError as e:
            raise ConvertError(f"cannot read {self.path}: {e.strerror or e}") from e
        if not isinstance(header, dict):
            raise ConvertError(f"corrupt shard {self.path}: the header is not a table")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        end_max = 0
        for name, e in header.items():
            try:
                code, shape, (b, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise ConvertError(f"corrupt shard {self.path}: bad entry {name!r}") from err
            if code not in DTYPES:
                raise ConvertError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
            want = DTYPES[code].itemsize * _prod(shape)
            if end - b != want or b < 0:
                raise ConvertError(f"corrupt shard {self.path}: tensor {name!r} has a bad size")
            self.entries[name] = (code, shape, b, end)
            end_max = max(end_max, end)
        if self.data_start + end_max != size:
            raise ConvertError(
                f"corrupt shard {self.path}: {size} bytes, the header describes "
                f"{self.data_start + end_max} (truncated or padded)"
            )

    def info(self, name: str) -> TensorInfo:
        code, shape, _, _ = self.entries[name]
        return TensorInfo(DTYPES[code], shape)

    def raw(self, name: str) -> bytes:
        _, _, b, e = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + b)
            data = f.read(e - b)
        if len(data) != e - b:
            raise ConvertError(f"corrupt shard {self.path}: tensor {name!r} is truncated")
        return data

    def tensor(self, name: str) -> torch.Tensor:
        return from_bytes(self.raw(name), self.info(name))


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def from_bytes(data: bytes, info: TensorInfo) -> torch.Tensor:
    if not data:
        return torch.empty(info.shape, dtype=info.dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(info.dtype).reshape(info.shape).clone()


class PtFile:
    """A ``.pt`` state dict, memory-mapped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            sd = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for a bad archive
            raise ConvertError(f"corrupt checkpoint {self.path}: {str(e).splitlines()[0]}") from e
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConvertError(f"{self.path} is not a state dict of tensors")
        self._sd = sd
        self.metadata: dict = {}
        self.entries = {k: None for k in sd}

    def info(self, name: str) -> TensorInfo:
        t = self._sd[name]
        return TensorInfo(t.dtype, tuple(t.shape))

    def raw(self, name: str) -> bytes:
        return tensor_bytes(self._sd[name])

    def tensor(self, name: str) -> torch.Tensor:
        return self._sd[name].clone()


class Checkpoint:
    """The source's tensors by name, across its files, and the files' layout."""

    def __init__(self, files: dict[str, SafetensorsFile | PtFile]):
        self.files = files  # output shard name -> reader
        self.where: dict[str, str] = {}
        for shard, f in files.items():
            for name in f.entries:
                if name in self.where:
                    raise ConvertError(f"tensor {name!r} is stored twice ({shard})")
                self.where[name] = shard

    def info(self, name: str) -> TensorInfo:
        return self.files[self.where[name]].info(name)

    def raw(self, name: str) -> bytes:
        return self.files[self.where[name]].raw(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self.files[self.where[name]].tensor(name)

    def tensors(self) -> dict[str, TensorInfo]:
        return {n: self.info(n) for n in self.where}


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except FileNotFoundError as e:
        raise ConvertError(f"missing {what}: {path}") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(out, dict):
        raise ConvertError(f"{what} {path} is not a JSON object")
    return out


def open_source(src: str | os.PathLike, config: str | os.PathLike | None = None):
    """``(config dict, Checkpoint, source directory or None)``; every file is checked
    (headers, sizes) before anything is converted."""
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"no such file or directory: {src}")
    if src.is_dir():
        cfg = read_json(Path(config) if config else src / "config.json", "config.json")
        if (src / INDEX).exists():
            index = read_json(src / INDEX, "shard index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{src / INDEX} has no weight_map")
            files = {}
            for shard in sorted(set(weight_map.values())):
                if not (src / shard).exists():
                    raise ConvertError(f"missing shard {src / shard} (named in {INDEX})")
                files[shard] = SafetensorsFile(src / shard)
            ckpt = Checkpoint(files)
            listed, stored = set(weight_map), set(ckpt.where)
            if listed != stored:
                odd = sorted(listed ^ stored)[0]
                raise ConvertError(f"{INDEX} does not match its shards (e.g. {odd!r})")
            return cfg, ckpt, src
        if (src / SINGLE).exists():
            return cfg, Checkpoint({SINGLE: SafetensorsFile(src / SINGLE)}), src
        pts = sorted(src.glob("*.bin")) + sorted(src.glob("*.pt"))
        if len(pts) == 1:
            return cfg, Checkpoint({SINGLE: PtFile(pts[0])}), src
        raise ConvertError(f"{src} has no model.safetensors, shard index or single .pt/.bin")
    cfg_path = Path(config) if config else src.parent / "config.json"
    if not cfg_path.exists():
        raise ConvertError(
            f"missing config: {src} is a single file and {cfg_path} does not exist (--config)"
        )
    cfg = read_json(cfg_path, "config")
    if src.suffix == ".safetensors":
        return cfg, Checkpoint({SINGLE: SafetensorsFile(src)}), None
    if src.suffix in (".pt", ".pth", ".bin"):
        return cfg, Checkpoint({SINGLE: PtFile(src)}), None
    raise ConvertError(f"{src}: expected a model directory, a .safetensors or a .pt file")


class ShardWriter:
    """Writes one safetensors file: the header from ``infos`` first, then each tensor's
    bytes through ``write`` in the header's order."""

    def __init__(self, path: Path, infos: dict[str, TensorInfo], metadata: dict | None = None):
        self.path = Path(path)
        self.order = list(infos)
        header: dict = {}
        off = 0
        self.sizes = {}
        for name in self.order:
            info = infos[name]
            n = info.dtype.itemsize * _prod(info.shape)
            header[name] = {
                "dtype": CODES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [off, off + n],
            }
            self.sizes[name] = n
            off += n
        header["__metadata__"] = dict(metadata or {"format": "pt"})
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(text)) + text)
        self._next = 0

    def write(self, name: str, data: bytes) -> None:
        want = self.order[self._next]
        if name != want:
            raise RuntimeError(f"writer: expected {want!r}, got {name!r}")
        if len(data) != self.sizes[name]:
            raise RuntimeError(
                f"writer: {name!r} has {len(data)} bytes, expected {self.sizes[name]}"
            )
        self._f.write(data)
        self._next += 1

    @contextlib.contextmanager
    def closing_on_error(self):
        """Close the file (left for the caller to remove) when the block raises."""
        try:
            yield self
        except BaseException:
            self._f.close()
            raise

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self._next != len(self.order):
            raise RuntimeError(f"writer: {self.path.name} closed after {self._next} tensors")


@contextlib.contextmanager
def atomic_dir(dst: Path, force: bool) -> Iterator[Path]:
    """A temporary directory beside ``dst``, renamed to ``dst`` when the block ends
    normally, removed when it does not (an exception, KeyboardInterrupt)."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise ConvertError(f"{dst} exists (use --force to replace it)")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.exists():
        raise ConvertError(f"no such directory: {parent}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = parent / f".{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


class Progress:
    """``[#####.....] done/total what`` on stderr, when it is a terminal or forced."""

    def __init__(self, total: int, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = isatty if enabled is None else enabled
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def step(self, what: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / max(1, self.total))
        el = time.perf_counter() - self.t0
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} tensors "
            f"{el:5.1f}s {what[:40]:<40}"
        )
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
