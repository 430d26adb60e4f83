"""The neighborhood benchmark's plumbing on the CPU (not gpu-marked): ``--dry-run`` on a
tiny bucketed shape runs attnfx (the read-back site through the interpreter kernels), its
inductor baseline and eager, and writes the table and the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_neighborhood.py"


def test_bucketed_dry_run(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["ATTNFX_CACHE_DIR"] = str(tmp_path / "attnfx-cache")
    env.pop("ATTNFX_CPU_REWRITE", None)  # (as users run it)
    out = tmp_path / "nb.json"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--shapes", "cbucket:24:4"]
    cmd += ["--providers", "attnfx,inductor,eager", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "vs ind" in proc.stdout and "cbucket 24 w=4" in proc.stdout
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"attnfx", "inductor", "eager"}
    assert rows["attnfx"]["site"] == "rewritten.neighborhood", rows["attnfx"]
    for r in rows.values():
        assert "error" not in r and r["rel_err"] < 1e-2, r
    # kept pairs: the first bucket keeps 1..4 keys, the others 5..8 (one bucket back)
    assert abs(rows["attnfx"]["density"] - (10 + 5 * 26) / 24**2) < 1e-9
