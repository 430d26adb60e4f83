"""``benchmarks/bench_routed.py`` on the CPU (not gpu-marked): its ``--cpu`` mode runs
the plain routed program, the op and dense SDPA at a tiny size and prints the device,
the baselines and the ratios, and the table last."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_run_prints_device_baselines_and_ratios(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["ATTNFX_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_routed.py"),
            "--cpu",
            "--cases",
            "64:16",
            "--heads",
            "1",
            "--d",
            "16",
            "--rep-ms",
            "1",
            "--providers",
            "eager,op,eager-attn,sdpa",
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("[routed] device cpu") and "baseline" in out
    table = out.split("=== routed table")[1]
    for mode in ("fwd", "fwdbwd"):
        assert f"N=64 w=16 C=4 {mode}" in table
    assert "eager-attn/x" in table and "sdpa/x" in table and "n/a" not in table
    assert (tmp_path / "r.json").exists()
