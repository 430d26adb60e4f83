"""Routed sparse attention (Routing Transformer) benchmark: one routed layer — k-means
routing (similarities, top-w, sort), the gathered per-cluster attention and the scatter
back — forward and forward+backward, in one run:

    eager      the plain PyTorch routed program (gather, q·kᵀ, masks, softmax, @v, scatter_add)
    inductor   the same, torch.compile(backend="inductor")
    attnfx     the same, torch.compile(backend="attnfx") (on CPU with cpu="always")
    op         attnfx::routed_attention alone, on precomputed indices (no routing)
    eager-attn the plain program's attention alone, on the same indices (the op's baseline)
    sdpa       dense F.scaled_dot_product_attention over all N keys (the dense baseline;
               on CUDA also pinned to FlashAttention-2 and cuDNN)

Prints the device, then per case the time of every provider and its ratio to eager and to
dense SDPA (the op's to eager-attn too).  GPU shapes by default (bf16, B1 H16 D64, N 4096…
65536 with w = 256…1024, C = N / w); ``--cpu`` runs small CPU shapes (float32).

    PYTHONPATH=. python benchmarks/bench_routed.py                 # GPU
    PYTHONPATH=. python benchmarks/bench_routed.py --cpu           # CPU, small N
    PYTHONPATH=. python benchmarks/bench_routed.py --cases 16384:512 --modes fwd
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from attnfx.nn.routed import TOKEN_SELF_VALUE as SELF_VALUE
from attnfx.nn.routed import cluster_members
from attnfx.nn.routed import routed_attention as _routed

GPU_CASES = "4096:256,16384:512,65536:1024"
CPU_CASES = "1024:64,2048:128"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="small shapes on the CPU")
    p.add_argument("--cases", help="N:w,... (C = N / w); default by device")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--causal", action="store_true", help="causal, shared-QK routing")
    p.add_argument("--providers", default="eager,inductor,attnfx,op,eager-attn,sdpa")
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    gpu = not a.cpu
    if gpu and not torch.cuda.is_available():
        p.error("no CUDA device: pass --cpu for the CPU shapes")
    a.device = "cuda" if gpu else "cpu"
    a.cases = a.cases or (GPU_CASES if gpu else CPU_CASES)
    a.heads = a.heads or (16 if gpu else 4)
    a.d = a.d or (64 if gpu else 32)
    a.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        a.dtype or ("bf16" if gpu else "fp32")
    ]
    return a


# ---------------------------------------------------------------------------------------
# The plain PyTorch routed program
# ---------------------------------------------------------------------------------------


def members(x, means, w):
    """(B, H, C, w) top-w tokens of each centroid, in position order."""
    return cluster_members(x, means, w)


def routed_attention(q, k, v, qi, ki, causal):
    """The plain PyTorch routed attention (``attnfx.nn.routed``): causal with shared QK."""
    scale = q.shape[-1] ** -0.5
    self_value = SELF_VALUE if causal else None
    return _routed(q, k, v, qi, ki, scale, causal=causal, self_value=self_value)


def layer(q, k, v, means, w, causal):
    """Routing and attention, as a model's routed heads run them."""
    if causal:
        k = F.normalize(q, dim=-1)
    qi = members(q, means, w)
    ki = qi if causal else members(k, means, w)
    return routed_attention(q, k, v, qi, ki, causal)


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def _time_ms(fn, device, rep_ms):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms)
    fn()
    times, t_end = [], time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _providers(args, n, w):
    import attnfx  # noqa: F401  (registers the backend and the ops)
    from attnfx import ops
    from attnfx.spec import AttentionSpec, Routing, ScoreOp

    causal = args.causal
    opts = {"cpu": "always"} if args.device == "cpu" else None
    from attnfx.backend import ensure_registered

    ensure_registered()  # (a checkout run without ``pip install``)
    compiled = {
        "inductor": torch.compile(layer, backend="inductor", dynamic=False),
        "attnfx": torch.compile(layer, backend="attnfx", options=opts, dynamic=False),
    }
    fills = (("lt", float("-inf")), ("eq", SELF_VALUE)) if causal else ()
    spec = AttentionSpec(
        kind="routed",
        score_ops=(ScoreOp("mul", value=args.d**-0.5),),
        aux_dtypes=("int64", "int64"),
        head_dim=args.d,
        head_dim_v=args.d,
        dtype=str(args.dtype).removeprefix("torch."),
        out_dtype=str(args.dtype).removeprefix("torch."),
        routing=Routing(window=w, key_window=w, fills=fills),
    )

    def call(name, q, k, v, means, qi, ki):
        if name == "eager":
            return layer(q, k, v, means, w, causal)
        if name in compiled:
            return compiled[name](q, k, v, means, w, causal)
        if name == "op":
            kk = F.normalize(q, dim=-1) if causal else k
            return ops.routed_attention(q, kk, v, qi.flatten(2), ki.flatten(2), spec)
        if name == "eager-attn":
            kk = F.normalize(q, dim=-1) if causal else k
            return routed_attention(q, kk, v, qi, ki, causal)
        backend = {"sdpa": None, "sdpa-fa2": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}
        if name in backend:
            if backend[name] is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(getattr(SDPBackend, backend[name])):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        raise ValueError(name)

    return call


def run_case(args, n, w, mode, call, names):
    b, h, d, dev, dt = args.batch, args.heads, args.d, args.device, args.dtype
    c = n // w
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dev, dt) for _ in range(3))
    means = F.normalize(torch.randn(h, c, d, generator=g), dim=-1).to(dev)
    qi = members(q, means, w)
    ki = qi if args.causal else members(k, means, w)
    grad = mode == "fwdbwd"
    leaves = [t.requires_grad_(grad) for t in (q, k, v)]
    do = torch.randn(b, h, n, d, generator=g).to(dev, dt)
    row = {"n": n, "w": w, "clusters": c, "mode": mode, "ms": {}, "error": {}}
    for name in names:

        def fn(name=name):
            out = call(name, *leaves, means, qi, ki)
            if grad:
                torch.autograd.grad(out, leaves, do, allow_unused=True)

        try:
            fn()  # compile / warm up
            row["ms"][name] = _time_ms(fn, dev, args.rep_ms)
        except Exception as e:  # noqa: BLE001 - a provider that cannot run: n/a
            row["error"][name] = f"{type(e).__name__}: {str(e)[:200]}"
        if dev == "cuda":
            torch.cuda.empty_cache()
    return row


def environment(args) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def format_rows(rows, names) -> str:
    lines = []
    for r in rows:
        ms = r["ms"]
        head = f"N={r['n']} w={r['w']} C={r['clusters']} {r['mode']}"
        lines.append(head)
        base, dense, attn = ms.get("eager"), ms.get("sdpa"), ms.get("eager-attn")
        for name in names:
            if name not in ms:
                lines.append(f"  {name:<11} n/a ({r['error'].get(name, 'not run')})")
                continue
            t = ms[name]
            parts = [f"  {name:<11} {t:9.3f} ms"]
            if base:
                parts.append(f"eager/x {base / t:6.2f}")
            if dense:
                parts.append(f"sdpa/x {dense / t:6.2f}")
            if name == "op" and attn:
                parts.append(f"eager-attn/x {attn / t:6.2f}")
            lines.append("  ".join(parts))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    names = [p for p in args.providers.split(",") if p]
    if args.device == "cuda":
        names += [p for p in ("sdpa-fa2", "sdpa-cudnn") if p not in names and "sdpa" in names]
    env = environment(args)
    print(
        f"[routed] device {args.device} ({env['device']}) | torch {env['torch']} | "
        f"triton {env['triton']} | {str(args.dtype).removeprefix('torch.')} "
        f"B{args.batch} H{args.heads} D{args.d} causal={args.causal} | baseline: eager "
        "(plain PyTorch routed program) and dense sdpa; ratios are baseline time / time",
        flush=True,
    )
    rows = []
    for case in args.cases.split(","):
        n, w = (int(x) for x in case.split(":"))
        if n % w:
            raise SystemExit(f"N {n} is not a multiple of w {w}")
        call = _providers(args, n, w)
        for mode in args.modes.split(","):
            rows.append(run_case(args, n, w, mode, call, names))
            print(format_rows(rows[-1:], names), flush=True)
    print("=== routed table")
    print(format_rows(rows, names))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "environment": env,
                    "args": vars(args) | {"dtype": str(args.dtype)},
                    "results": rows,
                },
                f,
                indent=1,
                default=str,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
