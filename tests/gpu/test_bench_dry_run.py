"""The benchmark's plumbing, on the CPU (not gpu-marked): ``--dry-run`` runs every
provider that works on a CPU (attnfx kernels under Triton's interpreter) on tiny shapes
and must produce the table and the JSON; the target/ratio logic is checked on made-up
bf16 numbers; a prewarm worker runs its shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_attention.py"
NEIGHBORHOOD = ROOT / "benchmarks" / "bench_neighborhood.py"


def _env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["ATTNFX_CACHE_DIR"] = str(tmp_path / "attnfx-cache")
    env.pop("OUT", None)
    return env


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_attention

        yield bench_attention
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_dry_run_table_and_json(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--n", "16", "--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = (out / "bench.txt").read_text()
    assert text.strip() in proc.stdout  # the table is printed last
    for head in ("fp16 fwd non-causal D16", "fp16 fwdbwd causal D16", "FLOPs"):
        assert head in text, text
    data = json.loads((out / "bench.json").read_text())
    assert data["dry_run"] and data["environment"]["torch"] and data["environment"]["triton"]
    assert "3.5" in data["flop_convention"]
    res = data["results"]
    by = {(r["provider"], r["mode"], r["causal"]): r for r in res}
    attnfx = [p for p in {r["provider"] for r in res} if p.startswith("attnfx-")]
    assert len(attnfx) == 8  # 5 kernel variants + sink, ALiBi, learnable bias (issue 9)
    for mode in ("fwd", "fwdbwd"):
        for causal in (False, True):
            for p in attnfx + ["eager-softmax", "eager-sigmoid", "sdpa-fa2"]:
                r = by[(p, mode, causal)]
                assert r["status"] == "ok", r
                assert r["tflops"] > 0 and r["check_ok"], r
            # Flex runs forward on the CPU (uncompiled), has no CPU backward
            assert by[("flex-temp", mode, causal)]["status"] == ("ok" if mode == "fwd" else "n/a")
    # backends with no CPU kernel are n/a with a reason, not a crash
    cudnn = by[("sdpa-cudnn", "fwd", False)]
    assert cudnn["status"] == "n/a" and cudnn["reason"]
    assert "n/a [" in text and "n/a reasons:" in text
    assert by[("attnfx-sigmoid", "fwd", False)]["x_fa2"] is not None
    # the issue-9 rows are compared with attnfx's own softmax
    assert by[("attnfx-sink", "fwd", True)]["x_attnfx_softmax"] is not None


def _rec(bench, provider, tflops, mode="fwd", causal=False, n=4096, d=64):
    fam, var = bench.PROVIDERS[provider]
    return {
        "provider": provider,
        "family": fam,
        "variant": var,
        "dtype": "bfloat16",
        "mode": mode,
        "causal": causal,
        "B": 4,
        "H": 16,
        "N": n,
        "D": d,
        "status": "ok" if tflops else "n/a",
        "reason": "" if tflops else "unsupported",
        "tflops": tflops,
        "check_ok": True,
        "check_rel_err": 1e-3,
        "check_tol": 2.5e-2,
    }


def test_ratios_and_targets(bench):
    rs = [
        _rec(bench, "sdpa-fa2", 300.0),
        _rec(bench, "sdpa-cudnn", 450.0),
        _rec(bench, "flex-softmax", 400.0),
        _rec(bench, "flex-softcap", 127.0),
        _rec(bench, "flex-temp", 375.0),
        _rec(bench, "attnfx-softmax", 420.0),
        _rec(bench, "attnfx-sigmoid", 480.0),
        _rec(bench, "attnfx-temp-aux", 400.0),
        _rec(bench, "attnfx-softcap", None),
    ]
    bench.add_ratios(rs)
    sig = rs[6]
    assert sig["x_fa2"] == pytest.approx(1.6) and sig["x_cudnn"] == pytest.approx(480 / 450)
    assert rs[5]["x_flex"] == pytest.approx(420 / 400)
    tg = {t["target"]: t for t in bench.targets(rs)}
    assert tg["sigmoid fwd >= 1.2x FA2 softmax"]["ok"] is True
    assert tg["sigmoid fwd >= 1.0x cuDNN softmax"]["ok"] is True
    assert tg["attnfx-temp-aux >= 0.97x attnfx softmax"]["ok"] is False  # 400/420 = 0.95
    assert tg["softcap >= 2.5x Flex softcap"]["ok"] is None  # softcap n/a
    text = bench.format_targets(bench.targets(rs))
    assert "PASS" in text and "FAIL" in text
    args = bench.parse_args(["--dry-run"])
    table = bench.format_table(rs, args)
    assert "n/a [1]" in table and "unsupported" in table


def test_prewarm_worker_runs_its_shard(bench, tmp_path):
    args = bench.parse_args(
        [
            "--dry-run",
            "--n",
            "16",
            "--modes",
            "fwd",
            "--causal",
            "no",
            "--providers",
            "attnfx-softmax,eager-softmax",
        ]
    )
    units = bench.warm_units(args)
    assert [name for _, name in units] == ["attnfx-softmax"]  # eager compiles nothing
    argv = bench.worker_argv(args, 0, 1)
    again = bench.parse_args(argv[2:])
    assert again.warm_only and again.provider_names == args.provider_names and again.n == args.n
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[warm 0/1] 1 units" in proc.stdout


def _neighborhood_dry_run(tmp_path, shapes: str, providers: str) -> tuple[str, dict]:
    """``bench_neighborhood.py --dry-run`` as users run it: (its stdout, JSON rows by
    provider)."""
    env = _env(tmp_path)
    env.pop("ATTNFX_CPU_REWRITE", None)  # (as users run it)
    out = tmp_path / "nb.json"
    cmd = [sys.executable, str(NEIGHBORHOOD), "--dry-run", "--shapes", shapes]
    cmd += ["--providers", providers, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, {r["provider"]: r for r in json.loads(out.read_text())["rows"]}


def test_neighborhood_bucketed_dry_run(tmp_path):
    """``bench_neighborhood.py --dry-run`` on a tiny bucketed shape: attnfx (the read-back
    site through the interpreter kernels), its inductor baseline and eager, the table
    and the JSON."""
    stdout, rows = _neighborhood_dry_run(tmp_path, "cbucket:24:4", "attnfx,inductor,eager")
    assert "vs ind" in stdout and "cbucket 24 w=4" in stdout
    assert set(rows) == {"attnfx", "inductor", "eager"}
    assert rows["attnfx"]["site"] == "rewritten.neighborhood", rows["attnfx"]
    for r in rows.values():
        assert "error" not in r and r["rel_err"] < 1e-2, r
    # kept pairs: the first bucket keeps 1..4 keys, the others 5..8 (one bucket back)
    assert abs(rows["attnfx"]["density"] - (10 + 5 * 26) / 24**2) < 1e-9


def test_neighborhood_rpb_dry_run(tmp_path):
    """``bench_neighborhood.py --dry-run`` on a tiny 2-D shape with NAT's relative
    position bias: attnfx reads the table inside the op (the site through the
    interpreter kernels), flex adds it in a score_mod, SDPA takes the gathered bias; all
    agree with the float64 core."""
    stdout, rows = _neighborhood_dry_run(tmp_path, "2d:8x8:3:rpb", "attnfx,flex,sdpa-masked,eager")
    assert "2-D 8x8 k=3 rpb" in stdout
    assert rows["attnfx"]["site"] == "rewritten.neighborhood", rows["attnfx"]
    for r in rows.values():
        assert "error" not in r and r["rel_err"] < 1e-2, r


def test_host_benchmark_runs_on_the_cpu(tmp_path):
    """``bench_host.py`` on the CPU (launch replaced by a no-op): every row measured and
    the JSON written (the ratios are the benchmark's to report, not a test's)."""
    out = tmp_path / "host.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_host.py"), "--calls", "20",
         "--repeats", "3", "--variants", "softmax,causal", "--json", str(out)],
        capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert "no-op" in data["device"]
    by = {(r["variant"], r["row"]): r["us_per_call"] for r in data["rows"]}
    for v in ("softmax", "causal"):
        rows = ("attnfx fwd", "attnfx fwd+bwd", "attnfx fwd, no recipe", "custom-op floor fwd+bwd")
        assert all(by[(v, r)] > 0 for r in rows)
    assert "recipes speed the fwd call up" in proc.stdout
