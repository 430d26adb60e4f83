"""Autotuning of launch configs (CUDA only).

The first launch of a kernel for a tuning key -- (spec kernel key, kernel, padded head dims,
dtype, GPU name, sequence-length buckets, torch / triton / codegen versions, codegen
features, candidate list) -- compiles the kernel's candidate configs (``plan.configs``),
drops those that cannot win or cannot run, times the rest with a short
``triton.testing.do_bench`` and keeps the fastest: in process and on disk, as JSON under
``cache_dir()/autotune`` (atomic write: temp file + ``os.replace``).

Pruning, before any timing:
- tile size: a candidate whose query block (``BLOCK_M``) exceeds the bucketed NQ by more
  than 2x (for the dK/dV kernel, whose program rows are keys, also ``BLOCK_N`` against the
  bucketed NK) does mostly padding;
- resources: a compiled kernel that spills registers (``n_spills``) or asks for more
  shared memory than the device has (``max_shared_mem``), or that fails to compile.

``ATTNFX_AUTOTUNE=0`` disables tuning (the first candidate runs).  The CPU interpreter
never tunes.  Everything that touches the GPU comes in as callables, so the selection,
pruning and caching logic is tested on CPU with fake timings and fake metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from attnfx.codegen import cache
from attnfx.codegen.plan import Config

ENV = "ATTNFX_AUTOTUNE"
# sequence lengths are bucketed to the next power of two, between these
SEQ_MIN, SEQ_CAP = 16, 16384
# do_bench budget per candidate (ms): short -- the first launch pays it once per key
WARMUP_MS, REP_MS = 5, 25


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def seq_bucket(n: int) -> int:
    """Next power of two of ``n``, within [SEQ_MIN, SEQ_CAP]."""
    n = max(int(n), 1)
    return min(SEQ_CAP, max(SEQ_MIN, 1 << (n - 1).bit_length()))


def versions() -> dict[str, str]:
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "codegen": cache.VERSION}


@dataclasses.dataclass(frozen=True)
class TuneKey:
    spec_key: str
    kernel: str  # "fwd", "bwd_dkdv", "bwd_dq", ...
    block_d: int
    block_dv: int
    dtype: str
    gpu: str
    nq: int  # bucketed
    nk: int  # bucketed
    torch: str
    triton: str
    codegen: str
    features: str  # codegen features in effect (attnfx.codegen.plan.features)
    candidates: tuple[tuple, ...]  # the candidate list itself: a new list re-tunes

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["candidates"] = [list(c) for c in self.candidates]
        return d

    def digest(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def config_tuple(c: Config) -> tuple:
    return tuple(dataclasses.astuple(c))


def make_key(
    spec,
    kernel: str,
    nq: int,
    nk: int,
    gpu: str,
    candidates: Sequence[Config],
    features: str = "",
    block_d: int | None = None,
    block_dv: int | None = None,
    vers: dict[str, str] | None = None,
) -> TuneKey:
    from attnfx.codegen.plan import _padded

    v = vers or versions()
    return TuneKey(
        spec_key=spec.kernel_key,
        kernel=kernel,
        block_d=block_d or _padded(spec.head_dim),
        block_dv=block_dv or _padded(spec.head_dim_v),
        dtype=spec.dtype,
        gpu=gpu,
        nq=seq_bucket(nq),
        nk=seq_bucket(nk),
        torch=v["torch"],
        triton=v["triton"],
        codegen=v["codegen"],
        features=features,
        candidates=tuple(config_tuple(c) for c in candidates),
    )


def prune_by_size(candidates: Sequence[Config], kernel: str, nq: int, nk: int) -> list[Config]:
    """Candidates whose tiles are not mostly padding at these (bucketed) lengths; never
    empty (the candidate with the smallest tile stays when every one is too big)."""
    nq, nk = seq_bucket(nq), seq_bucket(nk)

    def fits(c: Config) -> bool:
        if c.BLOCK_M > 2 * nq:
            return False
        return not (kernel == "bwd_dkdv" and c.BLOCK_N > 2 * nk)

    kept = [c for c in candidates if fits(c)]
    if not kept and candidates:
        kept = [min(candidates, key=lambda c: (c.BLOCK_M * c.BLOCK_N, c.BLOCK_M))]
    return kept


def resources_ok(meta: dict, max_shared: int | None) -> bool:
    """``meta``: {"n_spills": int, "shared": int} of a compiled kernel."""
    if meta.get("n_spills", 0):
        return False
    return max_shared is None or meta.get("shared", 0) <= max_shared


def default_timer(fn: Callable[[], object]) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


class Autotuner:
    """Chooses one config per ``TuneKey``; remembers it in process and on disk."""

    def __init__(self, root: Path | None = None):
        self._root = root
        self._mem: dict[TuneKey, Config] = {}
        self._lock = threading.RLock()
        self.log: list[dict] = []  # one entry per tuning run (tests, debugging)
        # bumped when choices are forgotten: launch recipes made from them are stale
        self.generation = 0

    def root(self) -> Path:
        return self._root or (cache.cache_dir() / "autotune")

    def path(self, key: TuneKey) -> Path:
        return self.root() / f"{key.kernel}-{key.digest()}.json"

    def clear_memory(self) -> None:
        with self._lock:
            self._mem.clear()
            self.generation += 1

    def _load(self, key: TuneKey, candidates: Sequence[Config]) -> Config | None:
        """The stored choice for ``key``; None (re-tune) for any entry that cannot be
        read as one: absent, unreadable, not UTF-8 or JSON, not an object, another key,
        a config of the wrong shape or no longer a candidate."""
        try:
            data = json.loads(self.path(key).read_bytes().decode("utf-8"))
            if not isinstance(data, dict) or data.get("key") != key.as_dict():
                return None  # a foreign or damaged file, or a digest collision
            cfg = Config(**data["config"])
            return cfg if cfg in candidates else None
        except Exception:  # noqa: BLE001 - whatever is on disk, a bad entry is a miss
            return None

    def _store(self, key: TuneKey, cfg: Config, timings: list[dict]) -> None:
        doc = {"key": key.as_dict(), "config": dataclasses.asdict(cfg), "timings": timings}
        try:
            cache.atomic_write(self.path(key), json.dumps(doc, indent=1, sort_keys=True) + "\n")
        except (OSError, ValueError):
            pass  # an unwritable cache dir: the in-process choice still holds

    def cached(self, key: TuneKey, candidates: Sequence[Config]) -> Config | None:
        """A choice already made for ``key`` (in process or on disk), else None."""
        with self._lock:
            hit = self._mem.get(key) or self._load(key, list(candidates))
            if hit is not None:
                self._mem[key] = hit
            return hit

    def choose(
        self,
        key: TuneKey,
        candidates: Sequence[Config],
        *,
        compile_fn: Callable[[Config], dict],
        bench_fn: Callable[[Config], Callable[[], object]],
        max_shared: int | None = None,
        timer: Callable[[Callable[[], object]], float] = default_timer,
    ) -> Config:
        """The fastest usable candidate for ``key``.

        ``compile_fn(cfg)`` compiles the kernel and returns its metadata
        ({"n_spills", "shared"}); it may raise (the candidate is dropped).
        ``bench_fn(cfg)`` returns a callable that launches the kernel once (on scratch
        outputs); ``timer`` times such a callable (ms)."""
        candidates = list(candidates)
        with self._lock:
            hit = self._mem.get(key)
            if hit is not None:
                return hit
            hit = self._load(key, candidates)
            if hit is not None:
                self._mem[key] = hit
                return hit
            cfg, timings = self._tune(key, candidates, compile_fn, bench_fn, max_shared, timer)
            self._mem[key] = cfg
            self._store(key, cfg, timings)
            self.log.append({"key": key, "config": cfg, "timings": timings})
            return cfg

    def _tune(self, key, candidates, compile_fn, bench_fn, max_shared, timer):
        timings: list[dict] = []
        sized = prune_by_size(candidates, key.kernel, key.nq, key.nk)
        usable = []
        for c in candidates:
            entry = {"config": dataclasses.asdict(c)}
            timings.append(entry)
            if c not in sized:
                entry["pruned"] = "size"
                continue
            try:
                meta = compile_fn(c)
            except Exception as e:  # noqa: BLE001 - out of resources, compile errors
                entry["pruned"] = f"compile: {type(e).__name__}: {e}"[:300]
                continue
            entry.update({k: int(meta.get(k, 0)) for k in ("n_spills", "shared", "n_regs")})
            if not resources_ok(meta, max_shared):
                entry["pruned"] = "spills" if meta.get("n_spills") else "shared memory"
                continue
            usable.append((c, entry))
        if not usable:
            return candidates[0], timings
        if len(usable) == 1:
            return usable[0][0], timings
        best, best_ms = None, float("inf")
        for c, entry in usable:
            try:
                ms = float(timer(bench_fn(c)))
            except Exception as e:  # noqa: BLE001 - a launch failure drops the candidate
                entry["pruned"] = f"launch: {type(e).__name__}: {e}"[:300]
                continue
            entry["ms"] = ms
            if ms < best_ms:
                best, best_ms = c, ms
        return (best or usable[0][0]), timings


TUNER = Autotuner()
