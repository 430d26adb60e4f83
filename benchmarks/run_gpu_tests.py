#!/usr/bin/env python
"""Run tests/gpu/test_gpu_kernels.py without pytest (for a GPU machine that has torch and
triton but no pytest): a stub ``pytest`` module supplies the decorators, every case runs,
failures are printed, and the exit code is the number of failures (capped at 100).

    PYTHONPATH=. python benchmarks/run_gpu_tests.py [--shard i/n] [-x]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import types
from pathlib import Path


def _stub_pytest():
    class _Mark:
        def __getattr__(self, name):
            def mark(*args, **kwargs):
                if len(args) == 1 and callable(args[0]) and not kwargs:
                    return args[0]
                return lambda fn: fn

            return mark

    mod = types.ModuleType("pytest")
    mod.mark = _Mark()
    mod.importorskip = __import__
    sys.modules["pytest"] = mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shard", default="0/1")
    p.add_argument("-x", action="store_true", help="stop at the first failure")
    args = p.parse_args(argv)
    i, n = (int(x) for x in args.shard.split("/"))
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(root / "tests" / "gpu"))
    try:
        import pytest  # noqa: F401
    except ImportError:
        _stub_pytest()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to run")
        return 0
    import test_gpu_kernels as t

    items = [(t._id(c), lambda c=c: t.check_case(c)) for c in t.CASES]
    items.append(("gpt_end_to_end_compile", t.test_gpt_end_to_end_compile))
    items = items[i::n]
    failed = 0
    t0 = time.perf_counter()
    for name, fn in items:
        t1 = time.perf_counter()
        try:
            import torch._dynamo

            torch._dynamo.reset()
            fn()
            print(f"PASS {name} ({time.perf_counter() - t1:.1f}s)", flush=True)
        except Exception:  # noqa: BLE001
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
            if args.x:
                break
    print(f"{len(items) - failed} passed, {failed} failed in {time.perf_counter() - t0:.0f}s")
    return min(failed, 100)


if __name__ == "__main__":
    sys.exit(main())
