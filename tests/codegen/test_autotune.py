"""Autotuner selection, pruning and caching (CPU: fake timings, fake compile metadata)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnfx.codegen import autotune, plan
from attnfx.codegen.autotune import Autotuner, make_key, prune_by_size, seq_bucket
from attnfx.codegen.plan import Config
from attnfx.layout import lse_value
from attnfx.spec import AttentionSpec, ScoreOp

VERS = {"torch": "2.11.0", "triton": "3.6.0", "codegen": "1"}
CANDS = [Config(128, 64, 8, 3), Config(64, 32, 4, 3), Config(32, 16, 4, 1)]


def _spec(d=64, dtype="float16"):
    return AttentionSpec(
        activation="softmax",
        score_ops=(ScoreOp("mul", d**-0.5),),
        aux_dtypes=(),
        head_dim=d,
        head_dim_v=d,
        gqa_group=1,
        dtype=dtype,
        out_dtype=dtype,
    )


def _key(kernel="fwd", nq=4096, nk=4096, vers=VERS, cands=CANDS, **kw):
    return make_key(_spec(**kw), kernel, nq, nk, "NVIDIA H100 80GB HBM3", cands, vers=vers)


class Fake:
    """Fake compile metadata and timings; counts calls."""

    def __init__(self, ms, meta=None, fail=()):
        self.ms, self.meta, self.fail = ms, meta or {}, set(fail)
        self.compiled, self.timed = [], []

    def compile_fn(self, c):
        self.compiled.append(c)
        if c in self.fail:
            raise RuntimeError("out of resources")
        return self.meta.get(c, {"n_spills": 0, "shared": 1024, "n_regs": 128})

    def bench_fn(self, c):
        return lambda: c

    def timer(self, fn):
        c = fn()
        self.timed.append(c)
        return self.ms[c]

    def kw(self, max_shared=232448):
        return dict(
            compile_fn=self.compile_fn,
            bench_fn=self.bench_fn,
            timer=self.timer,
            max_shared=max_shared,
        )


def test_seq_bucket():
    assert [seq_bucket(n) for n in (1, 16, 17, 1000, 1024, 1025)] == [16, 16, 32, 1024, 1024, 2048]
    assert seq_bucket(10**6) == autotune.SEQ_CAP


def test_picks_fastest(tmp_path):
    f = Fake({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    t = Autotuner(tmp_path)
    assert t.choose(_key(), CANDS, **f.kw()) == CANDS[1]
    assert f.timed == CANDS


def test_prune_by_size():
    # BLOCK_M more than 2x the bucketed NQ: dropped (NQ=20 -> 32: BLOCK_M 128 goes)
    assert prune_by_size(CANDS, "fwd", 20, 4096) == CANDS[1:]
    assert prune_by_size(CANDS, "fwd", 64, 4096) == CANDS
    # dK/dV rows are keys: BLOCK_N against NK too
    dkdv = [Config(64, 128, 8, 2), Config(32, 64, 4, 2)]
    assert prune_by_size(dkdv, "bwd_dkdv", 4096, 20) == [dkdv[1]]
    assert prune_by_size(dkdv, "bwd_dq", 4096, 20) == dkdv
    # never empty: the smallest tile stays
    assert prune_by_size(CANDS[:2], "fwd", 1, 1) == [CANDS[1]]


def test_size_pruned_candidates_are_not_compiled(tmp_path):
    f = Fake({c: 1.0 for c in CANDS})
    Autotuner(tmp_path).choose(_key(nq=20), CANDS, **f.kw())
    assert CANDS[0] not in f.compiled and CANDS[0] not in f.timed


def test_prunes_spills_shared_memory_and_compile_errors(tmp_path):
    c4 = Config(16, 16, 4, 1)
    cands = CANDS + [c4]
    meta = {
        CANDS[0]: {"n_spills": 8, "shared": 1024},  # spills
        CANDS[1]: {"n_spills": 0, "shared": 300_000},  # above max_shared_mem
    }
    f = Fake({c: 0.5 for c in cands} | {c4: 9.0}, meta, fail={CANDS[2]})
    t = Autotuner(tmp_path)
    key = _key(cands=cands)
    assert t.choose(key, cands, **f.kw()) == c4
    assert f.timed == []  # a single survivor needs no timing
    doc = json.loads(t.path(key).read_text())
    why = [e.get("pruned", "") for e in doc["timings"]]
    assert why[0] == "spills" and why[1] == "shared memory" and why[2].startswith("compile")


def test_nothing_usable_falls_back_to_first(tmp_path):
    f = Fake({}, fail=set(CANDS))
    assert Autotuner(tmp_path).choose(_key(), CANDS, **f.kw()) == CANDS[0]


def test_in_process_cache(tmp_path):
    f = Fake({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    t = Autotuner(tmp_path)
    t.choose(_key(), CANDS, **f.kw())
    n = len(f.compiled)
    assert t.choose(_key(), CANDS, **f.kw()) == CANDS[1]
    # another length bucket is another key
    assert t.choose(_key(nq=4000, nk=3000), CANDS, **f.kw()) == CANDS[1]  # same buckets
    assert len(f.compiled) == n
    t.choose(_key(nq=8192), CANDS, **f.kw())
    assert len(f.compiled) == 2 * n


def test_disk_cache_round_trip(tmp_path):
    f = Fake({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    key = _key()
    Autotuner(tmp_path).choose(key, CANDS, **f.kw())
    doc = json.loads(Autotuner(tmp_path).path(key).read_text())
    assert doc["key"] == key.as_dict() and Config(**doc["config"]) == CANDS[1]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file
    # a fresh process (new tuner) reads the choice: no compile, no timing
    g = Fake({c: 0.1 for c in CANDS})
    assert Autotuner(tmp_path).choose(key, CANDS, **g.kw()) == CANDS[1]
    assert g.compiled == [] and g.timed == []


def test_versions_and_candidates_key_the_cache(tmp_path):
    f = Fake({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    Autotuner(tmp_path).choose(_key(), CANDS, **f.kw())
    for key, cands in [
        (_key(vers=dict(VERS, triton="3.7.0")), CANDS),
        (_key(vers=dict(VERS, torch="2.12.0")), CANDS),
        (_key(vers=dict(VERS, codegen="2")), CANDS),
        (_key(d=128), CANDS),
        (_key(dtype="bfloat16"), CANDS),
        (_key(kernel="bwd_dq"), CANDS),
        (_key(cands=CANDS[1:]), CANDS[1:]),
    ]:
        assert key.digest() != _key().digest()
        g = Fake({CANDS[0]: 1.0, CANDS[1]: 2.0, CANDS[2]: 3.0})
        assert Autotuner(tmp_path).choose(key, cands, **g.kw()) == cands[0]
        assert g.timed, key  # re-tuned
    assert len(list(tmp_path.glob("*.json"))) == 8


def test_corrupt_or_foreign_cache_file_retunes(tmp_path):
    key = _key()
    t = Autotuner(tmp_path)
    t.path(key).parent.mkdir(parents=True, exist_ok=True)
    t.path(key).write_text("{not json")
    f = Fake({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    assert t.choose(key, CANDS, **f.kw()) == CANDS[1]
    # a stored config that is no longer a candidate is ignored
    doc = json.loads(t.path(key).read_text())
    doc["config"] = {"BLOCK_M": 999, "BLOCK_N": 1}
    t.path(key).write_text(json.dumps(doc))
    g = Fake({CANDS[0]: 1.0, CANDS[1]: 2.0, CANDS[2]: 3.0})
    assert Autotuner(tmp_path).choose(key, CANDS, **g.kw()) == CANDS[0]


@pytest.mark.parametrize(
    "content",
    [b"[]", b"null", b'"text"', b"3", b"\xff\xfe\x80", b'{"key": [], "config": {}}', None],
)
def test_unreadable_cache_entry_is_absent(tmp_path, content):
    """Valid JSON that is not an object, bytes that are not UTF-8, a key that is not the
    key, a config that is not a mapping, a directory in the file's place: re-tuned."""
    key = _key()
    t = Autotuner(tmp_path)
    p = t.path(key)
    p.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    f = Fake({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    assert t.cached(key, CANDS) is None
    assert t.choose(key, CANDS, **f.kw()) == CANDS[1]
    assert f.timed
    # a doc with the right key but a config of the wrong shape
    for bad in ([64, 32], "64x32", None, {"BLOCK_M": [1]}):
        doc = {"key": key.as_dict(), "config": bad}
        q = Autotuner(tmp_path / "other")
        q.path(key).parent.mkdir(parents=True, exist_ok=True)
        q.path(key).write_text(json.dumps(doc))
        assert q.cached(key, CANDS) is None, bad


def test_unwritable_cache_dir_keeps_the_choice_in_process(tmp_path):
    (tmp_path / "file").write_text("x")
    t = Autotuner(tmp_path / "file" / "autotune")
    f = Fake({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    assert t.choose(_key(), CANDS, **f.kw()) == CANDS[1]
    assert t.cached(_key(), CANDS) == CANDS[1]


def test_launch_failure_drops_candidate(tmp_path):
    f = Fake({CANDS[0]: 1.0, CANDS[1]: 2.0, CANDS[2]: 3.0})
    timer = f.timer

    def bad_timer(fn):
        if fn() == CANDS[0]:
            raise RuntimeError("launch failed")
        return timer(fn)

    kw = dict(f.kw(), timer=bad_timer)
    assert Autotuner(tmp_path).choose(_key(), CANDS, **kw) == CANDS[1]


def test_enabled_env(monkeypatch):
    monkeypatch.delenv("ATTNFX_AUTOTUNE", raising=False)
    assert autotune.enabled()
    monkeypatch.setenv("ATTNFX_AUTOTUNE", "0")
    assert not autotune.enabled()


def test_interpreter_and_disabled_never_tune(monkeypatch, tmp_path):
    from attnfx.codegen import launch

    def boom(*a, **k):
        raise AssertionError("tuned")

    monkeypatch.setattr(autotune.TUNER, "choose", boom)
    cands = plan.configs(_spec(), interpret=False)["fwd"]
    args = (None, cands, None, 64, 64, None, None, None, {})
    assert launch._pick(_spec(), "fwd", *args[:2], True, *args[3:]) == cands[0]
    monkeypatch.setenv("ATTNFX_AUTOTUNE", "0")
    assert launch._pick(_spec(), "fwd", *args[:2], False, *args[3:]) == cands[0]


def test_features_env(monkeypatch):
    monkeypatch.setenv(plan.FEATURES_ENV, "tma,-ws")
    assert plan.features() == {"tma": True, "ws": False}
    assert plan.features_key() == "tma,-ws"
    cands = [Config(128, 64, 8, 3), Config(128, 64, 8, 3, tma=True), Config(64, 32, 4, 3)]
    forced = plan.apply_features(cands, plan.features(), {"tma": True})
    assert forced == [Config(128, 64, 8, 3, tma=True), Config(64, 32, 4, 3, tma=True)]
    # strides that do not allow TMA switch it off even when forced
    assert not any(c.tma for c in plan.apply_features(cands, plan.features(), {"tma": False}))
    monkeypatch.setenv(plan.FEATURES_ENV, "notma")
    assert plan.features() == {"tma": False}
    assert not any(c.tma for c in plan.apply_features(cands, plan.features(), {}))
    monkeypatch.setenv(plan.FEATURES_ENV, "bogus")
    with pytest.raises(ValueError):
        plan.features()


def test_tma_eligibility():
    from attnfx.codegen.launch import _tma_ok

    x = torch.empty(2, 4, 33, 64, dtype=torch.float16)
    assert _tma_ok(x)
    assert not _tma_ok(x[..., :40][..., 1:])  # misaligned base
    assert not _tma_ok(torch.empty(2, 4, 33, 20, dtype=torch.float16))  # 40-byte rows
    assert not _tma_ok(x.transpose(-1, -2))  # last stride not 1


@pytest.mark.parametrize("features", ["tma", "-tma"])
def test_tma_forward_under_interpreter(monkeypatch, tmp_path, features):
    """The TMA (tensor descriptor) path computes what the pointer path does."""
    from attnfx.codegen import run_forward

    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(plan.FEATURES_ENV, features)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 24, generator=g) for n in (17, 33, 33))
    out, lse = run_forward(_spec(24, "float32"), q, k, v, [])
    s = q @ k.transpose(-1, -2) * 24**-0.5
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, atol=1e-5, rtol=1e-5)
    assert lse.shape == (1, 2, 17, 2)  # a float32 softmax's (value, remainder) pair
    torch.testing.assert_close(lse_value(lse), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    assert not math.isnan(out.sum().item())


def test_cached_lookup(tmp_path):
    key = _key()
    assert Autotuner(tmp_path).cached(key, CANDS) is None
    f = Fake({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    Autotuner(tmp_path).choose(key, CANDS, **f.kw())
    assert Autotuner(tmp_path).cached(key, CANDS) == CANDS[1]
