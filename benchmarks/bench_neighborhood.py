#!/usr/bin/env python
"""Neighborhood attention benchmark: attnfx against FlexAttention with NATTEN's mask,
dense SDPA and eager, forward and forward+backward, in one run.

Every provider computes the attention core of ``attnfx.nn.NeighborhoodAttention{1,2}D``
(q, k, v of shape (B, H, N, D) over a token grid, NATTEN's window: shifted inward at the
borders) from the same inputs:

===============  ======================================================================
attnfx           ``torch.compile(core, backend="attnfx")`` of the plain-PyTorch core
                 (the mask built by index arithmetic, ``scores.masked_fill``, softmax):
                 the recognizer reads the window, the site runs the generated kernels
                 (tiled token order where it visits fewer tile pairs)
flex             ``flex_attention`` (compiled) with the window as a ``mask_mod`` and its
                 block mask, tokens in raster order
flex-tiled       the same with tokens permuted into 8x8 (2-D) tiles first, so that a
                 block of 128 queries is a compact patch (the permutation is not timed)
sdpa-masked      ``F.scaled_dot_product_attention`` with the (N, N) bool mask (the
                 backend PyTorch picks for a mask)
sdpa-dense       SDPA without a mask (FA2 / cuDNN on the GPU): the dense upper bound
                 on work, shown for scale, not the same computation
eager            the plain core, uncompiled
inductor         the plain core compiled by inductor (the backend attnfx wraps); by
                 default only for bucketed shapes
===============  ======================================================================

Bucketed local attention (``bucket:N:w``, ``cbucket:N:w`` causal): the core is written
on buckets as lucidrains' ``local-attention`` and HaloNet-style code write it — q, k, v
reshaped into buckets of ``w`` tokens, k and v joined with the buckets before and after
(``pad`` + ``cat``), a mask from the padded positions — and attnfx reads it back as a
band over the tokens (``attnfx.passes.recognize.bucketed``); the other providers take
the same kept pairs as a token mask.

A shape with ``:rpb`` (``2d:56x56:7:rpb``) adds NAT's relative position bias, a
(H, 2k-1, 2k-1) table gathered at the key's per-axis offset from the query: attnfx reads
it from the table inside the kernel (``add_table_aux``), flex in a ``score_mod``,
``sdpa-masked`` takes the gathered (1, H, N, N) bias with -inf outside the window.

Useful FLOPs (FlashAttention's convention, applied to the kept pairs only): forward =
4 * B * H * D * pairs, forward+backward = 3.5 x forward; ``sdpa-dense`` is credited the
same useful FLOPs (its extra work is waste).  Times: median of
``triton.testing.do_bench`` on CUDA; on the CPU (``--dry-run``: tiny shapes, attnfx's
kernels under the Triton interpreter) timings mean nothing, the run checks plumbing and
numbers.  Each provider's output is checked once against the float64 eager core
(relative error ||cand - ref|| / ||ref||); a provider that cannot run is ``n/a`` with
the reason, and the run goes on.

    PYTHONPATH=. python benchmarks/bench_neighborhood.py                  # the issue's shapes
    PYTHONPATH=. python benchmarks/bench_neighborhood.py --shapes 2d:96x96:13 --bwd
    PYTHONPATH=. python benchmarks/bench_neighborhood.py --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

# Targets of the neighborhood issue (H100/H200, bf16, D64): the grids and windows; and
# NAT's first stage (56x56, k=7) with its relative position bias.
DEFAULT_SHAPES = (
    "2d:128x128:31,2d:96x96:13,2d:128x128:7,1d:16384:1025,bucket:16384:512,2d:56x56:7:rpb"
)
DRY_SHAPES = "2d:8x8:3,2d:8x8:3:rpb,1d:24:5,cbucket:48:8"
PROVIDERS = ("attnfx", "inductor", "flex", "flex-tiled", "sdpa-masked", "sdpa-dense", "eager")


@dataclasses.dataclass(frozen=True)
class Shape:
    grid: tuple[int, ...]
    kernel: int  # the window; for a bucketed shape, the bucket size w
    bucket: str | None = None  # "bucket" (one bucket back and one ahead) or "cbucket"
    rpb: bool = False  # NAT's relative position bias: a learnable (H, 2k-1, ...) table

    @property
    def n(self) -> int:
        return math.prod(self.grid)

    def label(self) -> str:
        if self.bucket:
            return f"{self.bucket} {self.n} w={self.kernel}"
        rpb = " rpb" if self.rpb else ""
        return f"{len(self.grid)}-D {'x'.join(map(str, self.grid))} k={self.kernel}{rpb}"


def parse_shapes(text: str) -> list[Shape]:
    out = []
    for item in text.split(","):
        try:
            dims, grid, k, *extra = item.strip().split(":")
            g = tuple(int(x) for x in grid.split("x"))
            if extra not in ([], ["rpb"]) or (extra and dims.endswith("bucket")):
                raise ValueError
            if dims in ("bucket", "cbucket"):
                if len(g) != 1 or int(k) < 1 or g[0] % int(k) or g[0] < 2 * int(k):
                    raise ValueError
                out.append(Shape(g, int(k), dims))
                continue
            if dims != f"{len(g)}d" or int(k) < 1 or min(g) < 1:
                raise ValueError
        except ValueError:
            raise SystemExit(  # noqa: B904 - the message says it all
                f"bad shape {item!r}: want '<n>d:<L1>x...:<kernel>[:rpb]' (e.g. 2d:96x96:13) or"
                " '[c]bucket:<N>:<w>' with w dividing N (e.g. bucket:16384:512)"
            )
        out.append(Shape(g, int(k), rpb=bool(extra)))
    return out


def mask(shape: Shape, device) -> torch.Tensor:
    if shape.bucket:
        return bucket_mask(shape, device)
    from attnfx.nn.neighborhood import neighborhood_mask

    return neighborhood_mask(shape.grid, shape.kernel, device=device)


def bucket_mask(shape: Shape, device) -> torch.Tensor:
    """(N, N) kept pairs of a bucketed shape: keys in the query's bucket and the ones
    next to it (one back, one ahead), causal by position for ``cbucket``."""
    i = torch.arange(shape.n, device=device)
    qb, kb = i[:, None] // shape.kernel, i[None, :] // shape.kernel
    keep = (kb >= qb - 1) & (kb <= qb + (0 if shape.bucket == "cbucket" else 1))
    return keep & (i[None, :] <= i[:, None]) if shape.bucket == "cbucket" else keep


def _around(x, back: int, fwd: int, pad):
    """(b, nb, w, ...) buckets -> each joined with ``back`` buckets before, ``fwd`` after."""
    nb = x.shape[1]
    p = F.pad(x, [0, 0] * (x.dim() - 2) + [back, fwd], value=pad)
    return torch.cat([p[:, s : s + nb] for s in range(back + fwd + 1)], dim=2)


def bucketed_core(w: int, causal: bool):
    """Bucketed local attention over (B, H, N, D), written on buckets."""

    def fn(q, k, v):
        b, h, n, d = q.shape
        nb, fwd = n // w, 0 if causal else 1
        bq, bk, bv = (t.reshape(b * h, nb, w, d) for t in (q, k, v))
        bk, bv = _around(bk, 1, fwd, 0.0), _around(bv, 1, fwd, 0.0)
        pos = torch.arange(n, device=q.device).reshape(1, nb, w)
        kpos = _around(pos[..., None], 1, fwd, -1)[..., 0]
        s = (bq @ bk.transpose(-1, -2)) * d**-0.5
        drop = kpos[:, :, None, :] < 0
        if causal:
            drop = drop | (kpos[:, :, None, :] > pos[..., :, None])
        p = s.masked_fill(drop, float("-inf")).softmax(dim=-1)
        return (p @ bv).reshape(b, h, n, d)

    return fn


def core_of(shape: Shape, table: torch.Tensor | None = None):
    if shape.bucket:
        return bucketed_core(shape.kernel, shape.bucket == "cbucket")
    return core(shape.grid, shape.kernel, table)


def rpb_table(shape: Shape, heads: int, device, dtype) -> torch.Tensor | None:
    """The shape's relative position bias table (H, 2k-1, ...), or None."""
    if not shape.rpb:
        return None
    g = torch.Generator().manual_seed(1)
    size = (heads, *(2 * shape.kernel - 1 for _ in shape.grid))
    return torch.randn(size, generator=g).to(device=device, dtype=dtype)


def core(grid: tuple[int, ...], kernel: int, table: torch.Tensor | None = None):
    """The attention core as the reference modules write it (the mask, and the relative
    position bias's index, from index arithmetic inside the traced function, so the
    recognizer reads the window and the table read)."""
    from attnfx.nn.neighborhood import neighborhood_mask, relative_index

    def fn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if table is not None:
            idx = relative_index(grid, kernel).to(q.device)
            s = s + table.to(s.dtype).flatten(1)[:, idx]
        keep = neighborhood_mask(grid, kernel, device=q.device)
        return s.masked_fill(~keep, float("-inf")).softmax(dim=-1) @ v

    return fn


def rpb_dense(shape: Shape, table: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(1, H, N, N) additive mask: the bias gathered, -inf outside the window."""
    from attnfx.nn.neighborhood import relative_index

    idx = relative_index(shape.grid, shape.kernel).to(table.device)
    return table.flatten(1)[:, idx].masked_fill(~m, float("-inf")).unsqueeze(0)


def tiled_order(grid: tuple[int, ...], tile: int = 8) -> torch.Tensor:
    """Raster index of each token in a tile-major order (tile x tile patches, row-major
    within and across patches); 1-D grids keep their order."""
    if len(grid) == 1:
        return torch.arange(grid[0])
    idx = torch.arange(math.prod(grid)).view(grid)
    h, w = grid
    th, tw = min(tile, h), min(tile, w)
    if h % th or w % tw:
        return idx.flatten()
    return idx.view(h // th, th, w // tw, tw).permute(0, 2, 1, 3).flatten()


def flex_fn(shape: Shape, device, perm: torch.Tensor | None, table=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnfx.nn.neighborhood import window

    grid = shape.grid
    order = (perm if perm is not None else torch.arange(shape.n)).to(device)
    if shape.bucket:
        w, ahead = shape.kernel, 0 if shape.bucket == "cbucket" else 1

        def bucket_mod(b, h, q_idx, kv_idx):
            qb, kb = q_idx // w, kv_idx // w
            keep = (kb >= qb - 1) & (kb <= qb + ahead)
            return keep & (kv_idx <= q_idx) if ahead == 0 else keep

        bm = create_block_mask(bucket_mod, None, None, shape.n, shape.n, device=str(device))
        fa = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
        return lambda q, k, v: fa(q, k, v, block_mask=bm)

    def mask_mod(b, h, q_idx, kv_idx):
        qi, ki = order[q_idx], order[kv_idx]
        keep = qi >= 0
        stride = 1
        for length in reversed(grid):  # row-major: the last axis varies fastest
            qc, kc = (qi // stride) % length, (ki // stride) % length
            start, end = window(qc, length, shape.kernel, 1, 1, False)
            keep = keep & (kc >= start) & (kc < end)
            stride *= length
        return keep

    bm = create_block_mask(mask_mod, None, None, shape.n, shape.n, device=str(device))
    fa = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    if table is None:
        return lambda q, k, v: fa(q, k, v, block_mask=bm)
    flat, span = table.float().flatten(1), 2 * shape.kernel - 1

    def score_mod(score, b, h, q_idx, kv_idx):  # NAT's bias: per-axis offsets, clamped
        qi, ki = order[q_idx], order[kv_idx]
        idx = 0
        for a, length in enumerate(grid):  # row-major: the first axis is the slowest
            stride = math.prod(grid[a + 1 :])
            qc, kc = (qi // stride) % length, (ki // stride) % length
            idx = idx * span + (kc - qc + shape.kernel - 1).clamp(0, span - 1)
        return score + flat[h, idx]

    return lambda q, k, v: fa(q, k, v, score_mod=score_mod, block_mask=bm)


def build(name: str, shape: Shape, device, m: torch.Tensor, table=None):
    """(fn, input permutation or None) for a provider."""
    if name == "attnfx":
        from attnfx.backend import ensure_registered

        ensure_registered()  # (a checkout run without ``pip install``)
        return torch.compile(core_of(shape, table), backend="attnfx"), None
    if name == "inductor":
        return torch.compile(core_of(shape, table)), None
    if name == "eager":
        return core_of(shape, table), None
    if name == "flex":
        return flex_fn(shape, device, None, table), None
    if name == "flex-tiled":
        perm = tiled_order(shape.grid)
        return flex_fn(shape, device, perm, table), perm
    if name == "sdpa-masked" and table is not None:
        bias = rpb_dense(shape, table, m)
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)), None
    if name == "sdpa-masked":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m)), None
    if name == "sdpa-dense":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v)), None
    raise KeyError(name)


def timer(device, quick: bool):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu(fn):
        fn()
        times = []
        for _ in range(1 if quick else 5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    return cpu


def run_case(name, shape, args, device, dtype) -> dict:
    row = dict(provider=name, shape=shape.label(), n=shape.n, kernel=shape.kernel)
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, d = args.batch, args.heads, args.d

    def rnd():
        return torch.randn(b, h, shape.n, d, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(), rnd(), rnd()
    m = mask(shape, device)
    table = rpb_table(shape, h, device, dtype)
    pairs = int(m.sum())
    row["density"] = pairs / shape.n**2
    flops = 4 * b * h * d * pairs
    try:
        fn, perm = build(name, shape, device, m, table)
        if perm is not None:  # the permutation is a layout choice, not timed
            perm = perm.to(device)
            q, k, v = (t[:, :, perm] for t in (q, k, v))
        before = dict(_counters())
        out = fn(q, k, v)
        if name == "attnfx":  # what ran: the rewritten site, or a fallback and its reason
            delta = {c: n - before.get(c, 0) for c, n in _counters().items()}
            row["site"] = ", ".join(f"{c}" for c, n in sorted(delta.items()) if n > 0) or "-"
        # checked on the first (batch, head) slice: the float64 reference is N x N
        first = (slice(0, 1), slice(0, 1))
        if name == "sdpa-dense":
            row["rel_err"] = None  # a different computation
        else:
            inv = torch.argsort(perm) if perm is not None else slice(None)
            q1, k1, v1 = (t[first][:, :, inv].double() for t in (q, k, v))
            t1 = table[:1].double() if table is not None else None
            ref = core_of(shape, t1)(q1, k1, v1)
            if perm is not None:  # flex-tiled: back to its permuted order
                ref = ref[:, :, perm]
            row["rel_err"] = float((out[first].double() - ref).norm() / ref.norm())
        time_it = timer(device, args.dry_run)
        row["fwd_ms"] = time_it(lambda: fn(q, k, v))
        row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
    except Exception as e:  # noqa: BLE001 - a provider that cannot run is n/a
        row["error"] = _why(e)
        return row
    if args.bwd:
        try:
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            do = torch.randn_like(fn(qg, kg, vg))

            def step():
                for t in (qg, kg, vg):
                    t.grad = None
                fn(qg, kg, vg).backward(do)

            row["fwd_bwd_ms"] = time_it(step)
            row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
        except Exception as e:  # noqa: BLE001 - forward numbers stand; backward is n/a
            row["bwd_error"] = _why(e)
    return row


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:140] if text else ''}"


def _counters() -> dict:
    import attnfx

    return dict(attnfx.counters)


def table(rows: list[dict], bwd: bool) -> str:
    head = f"{'shape':<22}{'provider':<13}{'fwd ms':>10}{'TFLOP/s':>9}"
    head += f"{'f+b ms':>10}{'TFLOP/s':>9}" if bwd else ""
    head += f"{'vs flex':>9}{'vs ind':>9}{'rel err':>10}  site"
    out = [head, "-" * len(head)]
    # the flex baseline: tile-permuted where the shape has a tiled order, else plain
    flex = {r["shape"]: r.get("fwd_ms") for r in rows if r["provider"] == "flex"}
    flex.update(
        {r["shape"]: r["fwd_ms"] for r in rows if r["provider"] == "flex-tiled" and "fwd_ms" in r}
    )
    ind = {r["shape"]: r.get("fwd_ms") for r in rows if r["provider"] == "inductor"}
    for r in rows:
        lead = f"{r['shape']:<22}{r['provider']:<13}"
        if "error" in r:
            out.append(lead + "n/a  " + r["error"])
            continue
        line = lead + f"{r['fwd_ms']:>10.3f}{r['fwd_tflops']:>9.2f}"
        if bwd and "fwd_bwd_ms" in r:
            line += f"{r['fwd_bwd_ms']:>10.3f}{r['fwd_bwd_tflops']:>9.2f}"
        elif bwd:
            line += f"{'n/a':>10}{'':>9}"
        ref = flex.get(r["shape"])
        line += f"{ref / r['fwd_ms']:>8.2f}x" if ref else f"{'-':>9}"
        base = ind.get(r["shape"])
        line += f"{base / r['fwd_ms']:>8.2f}x" if base else f"{'-':>9}"
        err = r.get("rel_err")
        line += f"{err:>10.2e}" if err is not None else f"{'-':>10}"
        line += f"  {r.get('site', '')}"
        if "bwd_error" in r:
            line += f"  (backward n/a: {r['bwd_error']})"
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help=f"default: {DEFAULT_SHAPES}")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--bwd", action="store_true", help="also time forward+backward")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (plumbing only)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda:
        args.dry_run = True
        os.environ.setdefault("ATTNFX_INTERPRET", "1")  # the kernels, under the interpreter
        args.heads, args.d = min(args.heads, 2), min(args.d, 32)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if not cuda and dtype == torch.bfloat16:
        dtype = torch.float16  # the interpreter's bf16 dot is wrong
    shapes = parse_shapes(args.shapes or (DRY_SHAPES if args.dry_run else DEFAULT_SHAPES))
    names = [x.strip() for x in args.providers.split(",") if x.strip()]
    for nm in names:
        if nm not in PROVIDERS:
            p.error(f"unknown provider {nm!r}; known: {', '.join(PROVIDERS)}")
    where = (
        torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: timings mean nothing)"
    )
    print(f"neighborhood attention | {where} | {dtype} | B={args.batch} H={args.heads} D={args.d}")
    print(
        "baselines: flex-tiled (FlexAttention, NATTEN mask, 8x8-tiled tokens; plain flex for 1-D"
        " bands), inductor (bucketed shapes); forward ms ratios; useful FLOPs on kept pairs"
    )
    explicit = args.providers != ",".join(PROVIDERS)
    rows = []
    for shape in shapes:
        for nm in names:
            if nm == "inductor" and not shape.bucket and not explicit:
                continue  # (by default the bucketed shapes' baseline only)
            if nm == "flex-tiled" and shape.bucket:
                continue  # a 1-D band: no tiled order
            torch._dynamo.reset()
            rows.append(run_case(nm, shape, args, device, dtype))
            r = rows[-1]
            print(
                f"  {shape.label():<22}{nm:<13}{r.get('fwd_ms', r.get('error'))}", file=sys.stderr
            )
        if args.json:  # after each shape: a run cut short by its time limit keeps its rows
            with open(args.json, "w") as f:
                json.dump(dict(device=where, dtype=str(dtype), rows=rows), f, indent=1)
    print(table(rows, args.bwd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
