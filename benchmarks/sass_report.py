"""Static sm_90 report of the generated kernels (no GPU): registers, spills, shared
memory, CTAs per SM and the inner loops' instruction mix, for every default and
candidate launch config of a set of specs (``attnfx.codegen.sass``).

    PYTHONPATH=. python benchmarks/sass_report.py                       # all kinds, D 64,128
    PYTHONPATH=. python benchmarks/sass_report.py --kinds causal --d 64 --defaults
    PYTHONPATH=. python benchmarks/sass_report.py --json benchmarks/out/sass.json

Columns: ``reg`` registers per thread, ``spill`` stack + local bytes, ``smem`` shared
memory bytes, ``cta`` CTAs per SM; for the unmasked loop (full tiles) ``instr`` its
instructions per iteration, ``mma`` its MMAs (HGMMA shapes, or HMMA: no wgmma), ``mufu``
EX2/TANH, ``fp`` FMUL/FFMA/FADD/FMNMX, ``int``/``i64`` 32- and 64-bit integer ops,
``cp``/``bar`` async copies and barriers; ``masked`` the other MMA loops' instruction
counts; ``bound`` (softmax-family forwards) the loop's tile arithmetic over the
hand-counted bound ``sass.softmax_forward_bound``.  Kernels are compiled as the
launcher's JIT specializes them on contiguous inputs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def _analyze_case(case: tuple) -> list[dict]:
    """Every kernel target of one (kind, d, dtype) case (runs in a worker)."""
    from attnfx.codegen import kernel_targets, sass

    kind, d, dtype, candidates, maxnreg = case
    spec = sass.sample_spec(kind, d, dtype)
    rows = []
    for t in kernel_targets(spec, candidates=candidates):
        r = sass.analyze(t, maxnreg=maxnreg)
        row = dict(kind=kind, d=d, dtype=dtype, **r.to_dict())
        u = r.unmasked
        if t.name == "fwd" and u is not None and spec.activation == "softmax":
            c = t.config
            bound = sass.softmax_forward_bound(c.BLOCK_M, c.BLOCK_N, c.num_warps, d, d)
            row["bound"] = bound
            row["arith"] = sass.arithmetic(u)
        rows.append(row)
    return rows


def _mma(u: dict) -> str:
    return "+".join(f"{n}x{s.split('.', 1)[1]}" for s, n in sorted(u["mma_shapes"].items()))


def table(rows: list[dict]) -> str:
    head = (
        f"{'kind':<12}{'D':>4} {'kernel':<9}{'#':>2} {'config':<19}|{'reg':>4}{'spill':>6}"
        f"{'smem':>7}{'cta':>4} |{'instr':>6} {'mma':<28}{'mufu':>5}{'fp':>16}{'int':>5}"
        f"{'i64':>5}{'cp':>4}{'bar':>4} | {'masked':<12}{'bound':>7}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['kind']:<12}{r['d']:>4} {r['kernel']:<9}{r['index']:>2} {r['config']:<19}|"
        if r.get("error"):
            out.append(lead + " ERROR " + r["error"][:120])
            continue
        res = f"{r['reg']:>4}{r['spill']:>6}{r['smem']:>7}{r['ctas']:>4} |"
        u = r["unmasked"]
        if u is None:
            out.append(lead + res + "   (no MMA loop)")
            continue
        c = u["counts"]
        mufu = c.get("MUFU.EX2", 0) + c.get("MUFU.TANH", 0) + c.get("MUFU.RCP", 0)
        fp = "/".join(str(c.get(k, 0)) for k in ("FMUL", "FFMA", "FADD", "FMNMX"))
        masked = ",".join(str(m["total"]) for m in r["masked"]) or "-"
        bound = f"{r['arith'] / r['bound']['total']:.2f}" if r.get("bound") else "-"
        out.append(
            lead + res + f"{u['total']:>6} {_mma(u):<28}{mufu:>5}{fp:>16}{c.get('int', 0):>5}"
            f"{c.get('int64', 0):>5}{c.get('async copy', 0):>4}{c.get('barrier', 0):>4} | "
            f"{masked:<12}{bound:>7}"
        )
    out.append(
        "per thread, per loop iteration; bound = tile arithmetic (MMA, EX2, FP32, SHFL, F2FP) /"
        " sass.softmax_forward_bound (1.00: nothing beyond the online softmax's own)"
    )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kinds", default="softmax,causal,sigmoid,temperature,softcap")
    p.add_argument("--d", default="64,128", help="head dims")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--defaults", action="store_true", help="default configs only")
    p.add_argument("--maxnreg", type=int, default=None, help="compile with this register cap")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from attnfx.codegen import sass

    if not sass.available():
        print("triton's CUDA backend tools (cuobjdump) are missing", file=sys.stderr)
        return 2
    cases = [
        (k, int(d), args.dtype, not args.defaults, args.maxnreg)
        for k in args.kinds.split(",")
        for d in args.d.split(",")
    ]
    t0 = time.time()
    if args.workers <= 1:
        results = list(map(_analyze_case, cases))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=ctx) as ex:
            results = list(ex.map(_analyze_case, cases))
    rows = [r for rs in results for r in rs]
    print(table(rows))
    print(f"{len(rows)} kernels compiled for sm_90 in {time.time() - t0:.0f} s")
    if args.json:
        import triton

        meta = {"target": "sm_90 (ahead of time, no GPU)", "triton": triton.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
