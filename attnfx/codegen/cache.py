"""Generated-module cache: source on disk (a person can open it), modules in process.

Each spec yields two modules, ``<hash>_fwd.py`` and ``<hash>_bwd.py``, written to
``$ATTNFX_CACHE_DIR`` (default ``~/.cache/attnfx``) under a version folder, and copied to
``$ATTNFX_DUMP_DIR`` when that is set.  A module is loaded once per (spec, part, target):
``interpret=True`` loads it with ``TRITON_INTERPRET=1`` in effect while its functions are
decorated (Triton reads the flag in ``@triton.jit``), so the kernels run under Triton's
interpreter on CPU tensors; ``interpret=False`` gives real ``JITFunction`` objects (GPU
launches and ahead-of-time compiles).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

from attnfx.codegen import emit
from attnfx.spec import AttentionSpec

# Bump when the generated code changes meaning: it keys the on-disk and in-process caches.
VERSION = "2"

_lock = threading.RLock()
_sources: dict[tuple[str, str], str] = {}
_modules: dict[tuple[str, str, bool], object] = {}


def short_hash(spec: AttentionSpec) -> str:
    return hashlib.sha256(f"{VERSION}:{spec.key}".encode()).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("ATTNFX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "attnfx"
    )
    return Path(root) / f"v{VERSION}"


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            if path.read_text() == text:
                return
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def get_source(spec: AttentionSpec, part: str) -> str:
    key = (spec.key, part)
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
    key = (spec.key, part, interpret)
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        text = get_source(spec, part)
        h = short_hash(spec)
        path = cache_dir() / f"{h}_{part}.py"
        atomic_write(path, text)
        dump = os.environ.get("ATTNFX_DUMP_DIR")
        if dump:
            atomic_write(Path(dump) / f"{h}_{part}.py", text)
        name = f"attnfx_generated.{h}_{part}_{'interp' if interpret else 'jit'}"
        mspec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(mspec)
        # inspect.getsource (used by triton.jit) reads the file through linecache
        sys.modules[name] = mod
        try:
            with _interpret_mode(interpret):
                mspec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _check_mode(mod, interpret)
        _modules[key] = mod
        return mod


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
