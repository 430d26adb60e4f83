"""The CPU benchmark's bookkeeping (``benchmarks/bench_cpu.py``) on made-up rounds: the
best round by time, memory as the lowest peak of the rounds, and rows where attnfx kept
every site (inductor's own graph) marked as such."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "benchmarks" / "bench_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(ms, peak, counters):
    return {"fwd": {"status": "ok", "ms": ms, "peak_mib": peak, "counters": counters}}


def test_best_round_by_time_memory_by_lowest_peak():
    b = _bench()
    rounds = [_run(5.0, 30.0, {}), _run(4.0, 50.0, {}), _run(6.0, 20.0, {})]
    best = b._best(rounds, ["fwd"])["fwd"]
    assert best["ms"] == 4.0 and best["rounds_ms"] == [5.0, 4.0, 6.0]
    assert best["peak_mib"] == 20.0 and best["rounds_peak_mib"] == [30.0, 50.0, 20.0]


def test_rows_of_kept_sites_say_the_graph_is_inductors():
    b = _bench()

    def row(counters):
        prov = {p: _run(3.0, 10.0, {}) for p in ("eager", "inductor", "attnfx-op", "sdpa")}
        prov["attnfx"] = _run(3.3, 12.0, counters)
        return {"work": "softmax", "n": 1024, "providers": prov}

    kept = b.table([row({"kept.on CPU, inductor's own SDPA pattern fuses this form": 1})])
    rewritten = b.table([row({"rewritten.softmax": 1})])
    assert "every site kept: inductor's graph" in kept
    assert "inductor's graph" not in rewritten
    assert "0.91" in kept and "0.91" in rewritten  # the measured ratio is still shown
