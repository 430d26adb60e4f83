#!/usr/bin/env python
"""What verification costs on the CPU: compile-time peak memory and first-call time.

One causal attention written in eager (``q @ kᵀ * scale``, ``masked_fill`` with a
tril/arange causal mask, softmax, ``@ v``), fp32, at B1 H8 N4096 D64 by default, compiled
three ways, each in its own subprocess (so that peak RSS is that mode's alone):

=================  ==============================================================
inductor           ``torch.compile(model)``
attnfx             ``torch.compile(model, backend="attnfx")`` (verify="first")
attnfx-noverify    the same with ``options={"verify": "off"}``
=================  ==============================================================

Each child reports its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the
wall time of the first call (compile included), then the same two taken when the backend
returns (the compile's share: Dynamo, attnfx's passes and verification, inductor), its
RSS before compiling (inputs made, torch imported) and the time of a second call (what
the compiled function itself costs: for attnfx, the op).  The backend is passed as a
function wrapping ``lookup_backend("inductor")`` or ``attnfx.attnfx_backend`` (what
``backend="inductor"`` / ``backend="attnfx"`` resolve to) so that it can be timed.  The
parent prints a table with the ratios to inductor and writes JSON.

    PYTHONPATH=. python benchmarks/bench_verify_cpu.py                   # B1 H8 N4096 D64
    PYTHONPATH=. python benchmarks/bench_verify_cpu.py --n 1024 --repeat 3 --out /tmp/v.json
    PYTHONPATH=. python benchmarks/bench_verify_cpu.py --workload na2d:128:31

``--workload na2d:S:K``: ``attnfx.nn.NeighborhoodAttention2D`` (16 channels, one head,
window K) on an S x S grid instead: its N² mask built by index arithmetic is what the
mask pass and verification run at compile time.  ``na2d:S:K:rpb`` adds NAT's relative
position bias (an N² gather of its (1, 2K-1, 2K-1) table at an N² int64 index).

With ``--repeat R`` every mode runs R times (fresh subprocesses); the table shows the
median.  Timings on a shared machine are noisy: compare runs made side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

MODES = ("inductor", "attnfx", "attnfx-noverify")


def _child(args) -> dict:
    import resource
    import time

    import torch

    torch.manual_seed(0)

    class CausalAttention(torch.nn.Module):
        def forward(self, q, k, v):
            n = q.shape[-2]
            s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
            s = s.masked_fill(~causal, float("-inf"))
            return torch.softmax(s, dim=-1) @ v

    if args.workload.startswith("na2d:"):
        from attnfx.nn import NeighborhoodAttention2D

        _, side, kernel, *extra = args.workload.split(":")
        rpb = extra == ["rpb"]  # NAT's relative position bias, gathered from its table
        model = NeighborhoodAttention2D(16, 1, int(kernel), rel_pos_bias=rpb).eval()
        inputs = (torch.randn(1, int(side), int(side), 16),)
    else:
        shape = (args.b, args.h, args.n, args.d)
        inputs = tuple(torch.randn(shape) for _ in range(3))
        model = CausalAttention()
    if args.mode == "inductor":
        from torch._dynamo.backends.registry import lookup_backend

        inner = lookup_backend("inductor")
    else:
        import functools

        import attnfx

        opts = {"verify": "off"} if args.mode == "attnfx-noverify" else None
        inner = functools.partial(attnfx.attnfx_backend, options=opts)
    compile_stats = {"compile_s": 0.0}

    def backend(gm, example_inputs):
        # The backend's own share of the first call: Dynamo hands it the graph, and what
        # it returns runs after.  ru_maxrss here is the peak up to the end of compiling.
        t = time.perf_counter()
        fn = inner(gm, example_inputs)
        compile_stats["compile_s"] += time.perf_counter() - t
        compile_stats["compile_peak_rss_mb"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        return fn

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    compiled = torch.compile(model, backend=backend)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = compiled(*inputs)
        t1 = time.perf_counter()
        compiled(*inputs)
        t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {
        "mode": args.mode,
        "rss_before_mb": rss0 / 1024,
        "peak_rss_mb": peak / 1024,
        "first_call_s": t1 - t0,
        "second_call_s": t2 - t1,
        "threads": torch.get_num_threads(),
        **compile_stats,
    }
    if args.mode.startswith("attnfx"):
        res["counters"] = {k: v for k, v in attnfx.counters.items() if v}
    # The three modes must agree with eager, or the comparison means nothing.
    with torch.no_grad():
        ref = model(*inputs)
    res["max_abs_err_vs_eager"] = (out - ref).abs().max().item()
    return res


def _run_child(mode: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, __file__, "--child", mode, "--child-out", path]
    cmd += ["--b", str(args.b), "--h", str(args.h), "--n", str(args.n), "--d", str(args.d)]
    cmd += ["--workload", args.workload]
    env = dict(os.environ)
    # A fresh inductor cache per child: every mode pays its compile, as a new user would.
    env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"mode": mode, "error": proc.stderr[-2000:]}
    with open(path) as f:
        res = json.load(f)
    os.unlink(path)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--h", type=int, default=8)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--workload", default="causal", help="causal | na2d:<side>:<window>[:rpb]")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--out", default="benchmarks/out/bench_verify_cpu.json")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        # The attnfx of the checkout this script is in (a worktree of an older commit too).
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        args.mode = args.child
        res = _child(args)
        with open(args.child_out, "w") as f:
            json.dump(res, f)
        return 0

    modes = [m for m in args.modes.split(",") if m]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for m in modes:  # interleaved, so that drift in machine load hits every mode alike
            runs[m].append(_run_child(m, args))

    summary = {}
    for m, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            summary[m] = {"error": rs[0].get("error", "no run")}
            continue
        summary[m] = {
            key: statistics.median(r[key] for r in ok)
            for key in (
                "peak_rss_mb",
                "rss_before_mb",
                "compile_peak_rss_mb",
                "compile_s",
                "first_call_s",
                "second_call_s",
            )
        }
        summary[m]["max_abs_err_vs_eager"] = max(r["max_abs_err_vs_eager"] for r in ok)
        if "counters" in ok[0]:
            summary[m]["counters"] = ok[0]["counters"]
    ind = summary.get("inductor", {})

    shape = (
        f"{args.workload} (NeighborhoodAttention2D, C16 H1) fp32"
        if args.workload.startswith("na2d:")
        else f"B{args.b} H{args.h} N{args.n} D{args.d} fp32 causal"
    )
    print(f"verification cost on CPU, {shape}, median of {args.repeat} run(s)")
    cols = (
        ("peak RSS MB", "peak_rss_mb", "{:.0f}", True),
        ("1st call s", "first_call_s", "{:.2f}", True),
        ("compile peak MB", "compile_peak_rss_mb", "{:.0f}", True),
        ("compile s", "compile_s", "{:.2f}", True),
        ("2nd call s", "second_call_s", "{:.2f}", False),
    )
    hdr = f"{'mode':<17}" + "".join(
        f"{name:>16}" + (f"{'x ind.':>8}" if ratio else "") for name, _, _, ratio in cols
    )
    print(hdr)
    print("-" * len(hdr))
    for m, s in summary.items():
        if "error" in s:
            print(f"{m:<17} error: {s['error'].strip().splitlines()[-1] if s['error'] else ''}")
            continue
        line = f"{m:<17}"
        for _, key, fmt, ratio in cols:
            line += f"{fmt.format(s[key]):>16}"
            if ratio:
                r = s[key] / ind[key] if ind.get(key) else float("nan")
                s[f"{key}_vs_inductor"] = r
                line += f"{r:>8.2f}"
        print(line)
    for m, s in summary.items():
        if "counters" in s:
            print(f"{m}: {s['counters']}")

    result = {"shape": shape, "repeat": args.repeat, "summary": summary, "runs": runs}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
