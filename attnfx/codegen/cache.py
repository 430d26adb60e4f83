"""Generated-module cache: source on disk (a person can open it), modules in process.

Each spec yields two modules, ``<hash>_fwd.py`` and ``<hash>_bwd.py``, written to
``$ATTNFX_CACHE_DIR`` (default ``~/.cache/attnfx``) under a version folder, and copied to
``$ATTNFX_DUMP_DIR`` when that is set.  A module is loaded once per (spec, part, target),
the spec by its ``kernel_key`` (the report's kind is not part of the kernel):
``interpret=True`` loads it with ``TRITON_INTERPRET=1`` in effect while its functions are
decorated (Triton reads the flag in ``@triton.jit``), so the kernels run under Triton's
interpreter on CPU tensors; ``interpret=False`` gives real ``JITFunction`` objects (GPU
launches and ahead-of-time compiles).

The module is always executed from the source generated in this process (``linecache``
is seeded with it, so ``inspect.getsource`` in ``@triton.jit`` reads exactly that text):
the files on disk are a copy for people and are never trusted.  A damaged entry (a
half-written file, foreign bytes) is rewritten; a cache directory that cannot be written
(read-only, a file, under a file) costs one warning and the modules are kept in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import linecache
import logging
import os
import sys
import tempfile
import threading
import types
from pathlib import Path

from attnfx.codegen import emit
from attnfx.spec import AttentionSpec

# Bump when the generated code changes meaning: it keys the on-disk and in-process caches.
VERSION = "3"

_lock = threading.RLock()
_sources: dict[tuple[str, str], str] = {}
_modules: dict[tuple[str, str, bool], object] = {}
_warned: set[str] = set()  # cache directories already warned about (one warning each)

log = logging.getLogger("attnfx")


class CacheError(RuntimeError):
    """The kernel cache could not provide a generated module (messages start with
    "kernel cache unusable: ")."""


def short_hash(spec: AttentionSpec) -> str:
    return hashlib.sha256(f"{VERSION}:{spec.kernel_key}".encode()).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("ATTNFX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "attnfx"
    )
    return Path(root) / f"v{VERSION}"


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) unless it already holds exactly that: a temporary
    file in the same directory, then ``os.replace``, so that no reader ever sees a
    half-written file.  An existing file that cannot be read or decoded is rewritten."""
    data = text.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass  # absent, unreadable or not a file: (re)write it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save(path: Path, text: str, problem: str) -> bool:
    """Write a copy of a generated module for people to read; never raises.  The first
    failure per directory is logged (one warning), as ``problem``."""
    try:
        atomic_write(path, text)
        return True
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        where = str(path.parent)
        with _lock:
            first = where not in _warned
            _warned.add(where)
        if first:
            log.warning("attnfx: %s (%s: %s)", problem.format(where=where), type(e).__name__, e)
        return False


def get_source(spec: AttentionSpec, part: str) -> str:
    key = (spec.kernel_key, part)
    with _lock:
        if key not in _sources:
            _sources[key] = emit.source(spec, part)
        return _sources[key]


@contextlib.contextmanager
def _interpret_mode(interpret: bool):
    """Make ``@triton.jit`` produce interpreted (or real) functions while a module loads."""
    from triton import knobs

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        with knobs.runtime.scope():
            knobs.runtime.interpret = interpret
            yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def load_module(spec: AttentionSpec, part: str, interpret: bool):
    """The generated module for ``spec`` (``part``: "fwd" or "bwd")."""
    key = (spec.kernel_key, part, interpret)
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        text = get_source(spec, part)
        h = short_hash(spec)
        path = cache_dir() / f"{h}_{part}.py"
        problem = (
            "kernel cache unusable: cannot write to {where}; generated kernels are kept in memory"
        )
        if _save(path, text, problem):
            filename = str(path)
        else:
            filename = f"attnfx-generated-in-memory/{h}_{part}.py"
        dump = os.environ.get("ATTNFX_DUMP_DIR")
        if dump:
            _save(Path(dump) / f"{h}_{part}.py", text, "ATTNFX_DUMP_DIR: cannot write to {where}")
        name = f"attnfx_generated.{h}_{part}_{'interp' if interpret else 'jit'}"
        try:
            mod = _exec(name, filename, text, interpret)
        except OSError as e:
            raise CacheError(f"kernel cache unusable: {type(e).__name__}: {e}") from e
        _check_mode(mod, interpret)
        _modules[key] = mod
        return mod


class _SourceLoader:
    """Gives linecache the generated text again should its entry be cleared (Triton's
    interpreter reads a kernel's source at its first call, not when it is decorated)."""

    def __init__(self, text: str):
        self.text = text

    def get_source(self, name: str) -> str:
        return self.text


_libraries: dict[bool, types.ModuleType] = {}


def library(interpret: bool) -> types.ModuleType:
    """The static Triton library (``attnfx/codegen/library.py``) built for one mode: its
    file executed afresh with ``@triton.jit`` making compiled (or interpreted) functions,
    whatever mode the ordinary import of the module was made in."""
    with _lock:
        mod = _libraries.get(interpret)
        if mod is None:
            from attnfx.codegen import library as lib

            path = lib.__file__
            text = Path(path).read_text(encoding="utf-8")
            name = f"attnfx_generated.library_{'interp' if interpret else 'jit'}"
            mod = _exec(name, path, text, interpret, bind=False)
            if interpret:  # (its helpers read these from the module's globals)
                mod.__dict__.update(_interpreter_reductions())
                mod._row_sum = mod._row_sum_in_order
            _libraries[interpret] = mod
        return mod


def load_text(name: str, text: str, interpret: bool):
    """Triton source ``text`` (not a spec's) as a module with the library bound, as the
    generated modules are: small kernels of tests and tools."""
    with _lock:
        return _exec(f"attnfx_generated.{name}", f"attnfx-text/{name}.py", text, interpret)


def _exec(name: str, filename: str, text: str, interpret: bool, bind: bool = True):
    """Execute ``text`` as module ``name`` whose functions report ``filename``; with
    ``bind``, the library's helpers of the same mode are its globals first."""
    # inspect.getsource (used by triton.jit) reads the source through linecache: seeded
    # with this very text (mtime None: never re-read from disk), whatever the file holds.
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    mod = types.ModuleType(name)
    mod.__file__ = filename
    mod.__loader__ = _SourceLoader(text)
    if bind:
        lib = library(interpret)
        mod.__dict__.update({n: getattr(lib, n) for n in lib.__all__})
    sys.modules[name] = mod
    try:
        code = compile(text, filename, "exec")
        with _interpret_mode(interpret):
            exec(code, mod.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def _interpreter_reductions() -> dict:
    """The interpreter runs ``tl.reduce`` (and ``tl.associative_scan``) with a combine
    function of its own element by element in Python (Triton 3.6: ``generic_reduce``,
    ~1 s per 64x64 tile), and with Triton's own ``_sum_combine`` / ``_elementwise_max``
    as one numpy call.  The library's combines are the same ``a + b`` and
    ``tl.maximum(a, b)``: interpreted kernels take Triton's (compiled ones keep the
    library's, see its docstring).  A maximum is exact in any order; a sum is not, so
    ``_row_sum`` becomes ``_row_sum_in_order``: the same left-to-right float sums the
    element-by-element reduce made (a running sum by ``np.cumsum``), not numpy's
    pairwise ones."""
    import triton.language as tl

    return {"_sum_combine": tl.standard._sum_combine, "_max_combine": tl.standard._elementwise_max}


def _check_mode(mod, interpret: bool) -> None:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name in dir(mod):
        fn = getattr(mod, name)
        if name.startswith("_attn"):
            want = InterpretedFunction if interpret else JITFunction
            if not isinstance(fn, want):
                raise RuntimeError(
                    f"attnfx codegen: {name} is a {type(fn).__name__}, expected {want.__name__}"
                )
