"""The generated-module cache: a damaged or unusable cache directory never stops a model."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import attnfx
from attnfx import ops
from attnfx.codegen import cache
from attnfx.spec import AttentionSpec, ScoreOp


def _spec(d=16):
    return AttentionSpec(
        activation="softmax",
        score_ops=(ScoreOp("mul", 1 / math.sqrt(d)),),
        aux_dtypes=(),
        head_dim=d,
        head_dim_v=d,
        gqa_group=1,
        dtype="float32",
        out_dtype="float32",
    )


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Interpreter on, an empty in-process cache and a cache dir of the test's own."""
    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ATTNFX_DUMP_DIR", raising=False)
    monkeypatch.setattr(cache, "_modules", {})
    monkeypatch.setattr(cache, "_warned", set())
    return tmp_path


def _qkv(n=8, d=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, d, generator=g) for _ in range(3)]


def _check_forward(spec):
    from attnfx.codegen import run_forward

    q, k, v = _qkv(d=spec.head_dim)
    out, _ = run_forward(spec, q, k, v, [])
    ref, _ = ops.reference_attention(q, k, v, [], spec)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_non_utf8_entry_is_rebuilt(fresh):
    spec = _spec()
    path = cache.cache_dir() / f"{cache.short_hash(spec)}_fwd.py"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff\xfe\x00 not python \x80\x81")
    _check_forward(spec)
    assert path.read_text(encoding="utf-8") == cache.get_source(spec, "fwd")


def test_damaged_entry_is_rebuilt(fresh):
    spec = _spec()
    path = cache.cache_dir() / f"{cache.short_hash(spec)}_fwd.py"
    path.parent.mkdir(parents=True)
    path.write_text(cache.get_source(spec, "fwd")[:200])  # half-written by a killed process
    _check_forward(spec)
    assert path.read_text() == cache.get_source(spec, "fwd")
    assert not list(path.parent.glob(".*.tmp"))  # no temporary files left behind


@pytest.mark.parametrize("how", ["file", "entry-is-a-directory", "under-a-file"])
def test_unusable_cache_dir_falls_back_with_one_warning(fresh, monkeypatch, caplog, how):
    spec = _spec()
    if how == "file":
        bad = fresh / "not-a-dir"
        bad.write_text("x")
        monkeypatch.setenv("ATTNFX_CACHE_DIR", str(bad))
    elif how == "under-a-file":
        (fresh / "f").write_text("x")
        monkeypatch.setenv("ATTNFX_CACHE_DIR", str(fresh / "f" / "cache"))
    else:
        (cache.cache_dir() / f"{cache.short_hash(spec)}_fwd.py").mkdir(parents=True)
        (cache.cache_dir() / f"{cache.short_hash(spec)}_bwd.py").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="attnfx"):
        _check_forward(spec)
        cache.load_module(spec, "bwd", interpret=True)
        cache.load_module(_spec(32), "fwd", interpret=True)
    warnings = [r for r in caplog.records if "kernel cache unusable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


def test_in_memory_module_survives_a_cleared_linecache(fresh, monkeypatch):
    """Triton's interpreter reads a kernel's source at its first call: a module kept in
    memory must still give it after ``linecache.clearcache()``."""
    import linecache

    bad = fresh / "not-a-dir"
    bad.write_text("x")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(bad))
    spec = _spec(24)
    cache.load_module(spec, "fwd", interpret=True)
    linecache.clearcache()
    _check_forward(spec)


def test_unwritable_dump_dir_does_not_stop_the_kernel(fresh, monkeypatch):
    (fresh / "dump").write_text("a file, not a directory")
    monkeypatch.setenv("ATTNFX_DUMP_DIR", str(fresh / "dump"))
    _check_forward(_spec())


class Attn(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


@pytest.mark.parametrize("verify", ["off", "always"])
def test_model_runs_and_is_rewritten_with_a_damaged_cache(fresh, verify):
    spec_files = cache.cache_dir()
    spec_files.mkdir(parents=True)
    # every entry this model could use is damaged: write garbage under every name later
    # asked for, by damaging whatever the first (clean) run wrote
    q, k, v = _qkv()
    torch.compile(Attn(), backend="attnfx", options={"verify": verify, "inner": "eager"})(q, k, v)
    files = list(spec_files.glob("*.py"))
    assert files
    for f in files:
        f.write_bytes(b"\xff\xfe garbage \x80")
    cache._modules.clear()
    torch._dynamo.reset()
    attnfx.reset_counters()
    m = Attn()
    out = torch.compile(m, backend="attnfx", options={"verify": verify, "inner": "eager"})(q, k, v)
    torch.testing.assert_close(out, m(q, k, v), atol=1e-5, rtol=1e-5)
    assert attnfx.counters["rewritten.softmax"] == 1, dict(attnfx.counters)


def test_cache_failure_is_reported_as_such(fresh, monkeypatch):
    """Should the cache fail outright, the site is kept with a reason that says so."""

    def broken(*a, **kw):
        raise cache.CacheError("kernel cache unusable: planted")

    monkeypatch.setattr(cache, "load_module", broken)
    m = Attn()
    q, k, v = _qkv()
    out = torch.compile(m, backend="attnfx", options={"verify": "always", "inner": "eager"})(
        q, k, v
    )
    torch.testing.assert_close(out, m(q, k, v))
    assert attnfx.counters["rewritten.softmax"] == 0
    reasons = [k for k in attnfx.counters if k.startswith("kept.")]
    assert reasons == ["kept.kernel cache unusable: planted"], dict(attnfx.counters)


def test_kind_is_not_part_of_the_kernel(fresh):
    """A "temperature" and a "softmax" site with the same math share their source, their
    loaded module (one compiled kernel) and their tuning key."""
    import dataclasses

    from attnfx.codegen import autotune, generate_source, load_module

    a = _spec()
    b = dataclasses.replace(a, kind="temperature")
    assert a.key != b.key and a.kernel_key == b.kernel_key
    for part in ("fwd", "bwd"):
        assert generate_source(a, part) == generate_source(b, part)
        assert load_module(a, part, True) is load_module(b, part, True)
    assert cache.short_hash(a) == cache.short_hash(b)
    vers = {"torch": "t", "triton": "t", "codegen": "c"}
    keys = [autotune.make_key(s, "fwd", 64, 64, "gpu", [], vers=vers) for s in (a, b)]
    assert keys[0] == keys[1]
    _check_forward(b)
