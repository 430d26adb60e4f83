"""Compile every generated kernel ahead of time for sm_90 (no GPU needed).

For a representative set of specs and the candidate launch configs of every kernel: the
default (first) config of every kernel has no register spills (a later candidate that
spills for a heavy variant is reported; the autotuner prunes it by ``n_spills``; spills
are stack / local memory bytes from ``cuobjdump --dump-resource-usage``), shared memory within the 227 KB an sm_90 block
may use, tensor-core MMA (HGMMA/HMMA) in the forward's SASS, and TMA loads (UTMALDG)
in every forward config with ``tma``.  Kernels are compiled as the launcher's JIT
specializes them on contiguous inputs (row strides divisible by 16).

Every case checks its default configs; the ``FULL`` cases (padded head dims 64, 128 and
256, the 128 one with soft-capping) check every candidate.  ``ATTNFX_AOT_ALL=1`` checks every candidate of
every case (about 3x the compile time).  The compiles run in a small process pool (they
are independent and CPU bound); ``-s`` prints the table (kernel, config, registers,
spills, shared memory).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor

import pytest
import sympy

from attnfx.codegen import sass
from attnfx.predicate import K, MaskPredicate, Q
from attnfx.spec import AttentionSpec, ScoreOp

CAUSAL = MaskPredicate(sympy.Le(K, Q)).to_key()
SMEM_LIMIT = sass.SMEM_PER_BLOCK

pytestmark = pytest.mark.skipif(not sass.available(), reason="triton's CUDA backend tools missing")


def _spec(d, dtype, kind):
    ops_ = [ScoreOp("mul", d**-0.5)]
    aux, act, group, sink, bcast = (), "softmax", 1, None, ()
    if kind == "causal":
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=CAUSAL))
    elif kind == "mask":
        ops_.append(ScoreOp("fill_aux", -math.inf, aux=0))
        aux = ("bool",)
    elif kind == "hfmask":  # additive finfo.min mask + causal: the backward's row_norm path
        ops_ += [ScoreOp("add_aux", aux=0), ScoreOp("fill_pred", -math.inf, pred=CAUSAL)]
        aux = ("float32",)
    elif kind == "kpad":  # a key-padding mask (B, 1, 1, NK): read per key
        ops_.append(ScoreOp("fill_aux", -math.inf, aux=0))
        aux, bcast = ("bool",), ("col",)
    elif kind == "temp":  # a per-query temperature (B, H, NQ, 1): read per query
        ops_.append(ScoreOp("mul_aux", aux=0))
        aux, bcast = ("float32",), ("row",)
    elif kind == "gqa":
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=CAUSAL))
        group = 4
    elif kind == "sigmoid":
        act = "sigmoid"
        ops_.append(ScoreOp("add", -math.log(4096)))
    elif kind == "softcap":  # 30·tanh(s/30), causal
        ops_ += [ScoreOp("mul", 1 / 30), ScoreOp("tanh"), ScoreOp("mul", 30.0)]
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=CAUSAL))
    elif kind == "tanh":
        ops_.append(ScoreOp("tanh"))
    elif kind == "alibi":  # per-head slope × (K − Q), causal: no N×N bias tensor
        ops_ += [ScoreOp("add_pos_aux", aux=0, expr=sympy.srepr(K - Q))]
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=CAUSAL))
        aux = ("float32",)
    elif kind == "stream":  # StreamingLLM: 4 sink tokens besides a causal band of 256
        band = sympy.Or(sympy.Gt(K, Q - 256), sympy.Lt(K, 4))
        pred = MaskPredicate(sympy.And(sympy.Le(K, Q), band)).to_key()
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=pred))
    elif kind == "chunk":  # chunked causal (the tiles schedule): chunks of 64 keys
        chunk = sympy.And(sympy.Eq(sympy.floor(Q / 64), sympy.floor(K / 64)), sympy.Le(K, Q))
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=MaskPredicate(chunk).to_key()))
    elif kind == "sinkwin":  # 4 sinks for every query besides a causal window of 256 (tiles)
        window = sympy.And(sympy.Le(K, Q), sympy.Lt(Q - K, 256))
        pred = MaskPredicate(sympy.Or(sympy.Lt(K, 4), window)).to_key()
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=pred))
    elif kind == "relbias":  # a relative position bias table read at clamp(K - Q) + 64
        idx = sympy.Min(128, sympy.Max(0, K - Q + 64))
        ops_.append(ScoreOp("add_table_aux", aux=0, expr=sympy.srepr(idx)))
        aux, bcast = ("float32",), ("col",)  # (B, H, 1, T), as the launcher reads it
    elif kind in ("natten", "nattenrpb"):  # 2-D NA 128x128 k=31, tiled token order (tiles)
        if kind == "nattenrpb":  # NAT's relative position bias, read from its table
            ops_.append(ScoreOp("add_table_aux", aux=0, expr=_natten_rpb_tiled(128, 31)))
            aux = ("float32",)
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=_natten_tiled(128, 31)))
    elif kind in ("sink", "sinkmask"):  # gpt-oss: learned per-head sink, causal (+ hf mask)
        if kind == "sinkmask":
            ops_.append(ScoreOp("add_aux", aux=0))
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=CAUSAL))
        aux = ("bfloat16",) * (2 if kind == "sinkmask" else 1)
        sink, group = len(aux) - 1, (8 if kind == "sink" else 1)
    return AttentionSpec(
        activation=act,
        score_ops=tuple(ops_),
        aux_dtypes=aux,
        head_dim=d,
        head_dim_v=d,
        gqa_group=group,
        dtype=dtype,
        out_dtype=dtype,
        sink=sink,
        aux_bcast=bcast,
    )


def _natten_tiled(side: int, k: int) -> str:
    """NATTEN's 2-D window on a side x side grid, on the tiled token order (8x8 blocks)."""
    from attnfx.passes.recognize.neighborhood import Layout

    conds = []
    for stride in (side, 1):
        qa, ka = sympy.Mod(sympy.floor(Q / stride), side), sympy.Mod(sympy.floor(K / stride), side)
        start = sympy.Min(side - k, sympy.Max(0, qa - k // 2))
        conds += [sympy.Ge(ka, start), sympy.Lt(ka, start + k)]
    plain = MaskPredicate(sympy.And(*conds)).to_key()
    return Layout((side, side), (8, 8)).permuted(plain)


def _natten_rpb_tiled(side: int, k: int) -> str:
    """NAT's relative position bias index into its (2k-1, 2k-1) table on a side x side
    grid, on the tiled token order (8x8 blocks)."""
    from attnfx.passes.recognize.neighborhood import Layout

    idx = 0
    for stride in (side, 1):
        qa, ka = sympy.Mod(sympy.floor(Q / stride), side), sympy.Mod(sympy.floor(K / stride), side)
        idx = idx * (2 * k - 1) + sympy.Min(2 * k - 2, sympy.Max(0, ka - qa + k - 1))
    return Layout((side, side), (8, 8)).permuted(sympy.srepr(idx))


CASES = [(d, "float16", "causal") for d in (16, 64, 80, 128, 256)]
CASES += [(128, "bfloat16", "none")]
CASES += [(64, "float16", "mask"), (128, "bfloat16", "mask"), (128, "bfloat16", "gqa")]
CASES += [(128, "float16", "hfmask")]
CASES += [(64, "bfloat16", "sigmoid"), (128, "float16", "sigmoid")]
CASES += [(64, "float16", "softcap"), (128, "bfloat16", "softcap"), (256, "float16", "softcap")]
CASES += [(128, "float16", "tanh"), (64, "bfloat16", "alibi")]
CASES += [(64, "bfloat16", "sink"), (64, "bfloat16", "sinkmask"), (128, "float16", "stream")]
CASES += [(128, "float16", "chunk"), (64, "bfloat16", "sinkwin")]  # the tiles schedule
CASES += [(64, "float16", "temp"), (128, "bfloat16", "temp"), (64, "float16", "kpad")]
CASES += [(64, "bfloat16", "natten"), (64, "float16", "nattenrpb")]  # tiles, tiled order
CASES += [(64, "bfloat16", "relbias"), (128, "float16", "relbias")]  # a bias table
IDS = [f"{d}-{t}-{k}" for d, t, k in CASES]
# cases whose every candidate config is compiled (the others: the default configs)
FULL = {(64, "float16", "causal"), (256, "float16", "causal"), (128, "bfloat16", "softcap")}
ALL = os.environ.get("ATTNFX_AOT_ALL") == "1"


def compile_case(case) -> list[dict]:
    """Compile every kernel and candidate config of one case (runs in a worker)."""
    from attnfx.codegen import kernel_targets

    rows = []
    for t in kernel_targets(_spec(*case), candidates=ALL or case in FULL):
        row = dict(kernel=t.name, index=t.index, config=t.config, fn=type(t.fn).__name__)
        try:
            k = sass.compile_sm90(t)
        except Exception as e:  # reported by the test, with the others
            rows.append(dict(row, error=f"{type(e).__name__}: {e}"[:2000]))
            continue
        row.update(sass.resource_usage(k.asm["cubin"]), smem=k.metadata.shared)
        listing = sass.disassemble(k.asm["cubin"])
        row["mma_kinds"] = set(re.findall(r"\b(HGMMA|HMMA)\b", listing))
        row["mma"] = bool(row["mma_kinds"])
        row["tma"] = "UTMALDG" in listing  # bulk tensor copies (tensor descriptors)
        row["ctas"] = sass.ctas_per_sm(row["reg"], row["smem"], t.config.num_warps)
        row["unmasked"], _ = sass.main_loops(sass.loop_mixes(sass.parse(listing)))
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    os.environ.setdefault("ATTNFX_CACHE_DIR", str(tmp_path_factory.mktemp("attnfx-cache")))
    workers = max(1, min(len(CASES), os.cpu_count() or 1, 8))
    if workers == 1:
        return dict(zip(CASES, map(compile_case, CASES), strict=True))
    ctx = multiprocessing.get_context("spawn")
    # big cases first: the pool drains evenly
    order = sorted(CASES, key=lambda c: (c not in FULL, -c[0]))
    with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        return dict(zip(order, ex.map(compile_case, order), strict=True))


def _fmt(r) -> str:
    cfg = r["config"].describe()
    if "error" in r:
        return f"{r['kernel']:9s} #{r['index']} {cfg:20s} ERROR {r['error'][:200]}"
    return (
        f"{r['kernel']:9s} #{r['index']} {cfg:20s} reg={r['reg']:3d} stack={r['stack']} "
        f"local={r['local']} smem={r['smem']}"
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sm90_compiles_without_spills(case, compiled):
    rows = compiled[case]
    print(_spec(*case).describe(), *map(_fmt, rows), sep="\n  ")
    assert {r["kernel"] for r in rows} >= {"fwd", "bwd_dkdv", "bwd_dq"}
    bad = []
    for r in rows:
        if r["fn"] != "JITFunction":
            bad.append(f"{r['kernel']}: {r['fn']} is not a JITFunction")
        elif "error" in r:
            bad.append(_fmt(r))
        elif (r["stack"] or r["local"]) and r["index"] == 0:
            bad.append("spills: " + _fmt(r))
        elif r["stack"] or r["local"]:
            # a later candidate that spills for this variant: the autotuner prunes it
            # (compiled n_spills) and never picks it; the default must not spill
            print("  (pruned at run time) " + _fmt(r))
        elif r["smem"] > SMEM_LIMIT:
            bad.append("shared memory: " + _fmt(r))
        elif r["kernel"] == "fwd" and not r["mma"]:
            bad.append("no tensor-core MMA in the forward: " + _fmt(r))
        elif r["kernel"] == "fwd" and r["config"].tma and not r["tma"]:
            bad.append("tma config without TMA loads (UTMALDG): " + _fmt(r))
    assert not bad, "\n".join(bad)


# Lean score programs (no aux tile, GQA or sink; causal or no mask): the launch configs
# chosen for them from the static report (attnfx.codegen.plan._LEAN).
LEAN = [(64, "float16", "causal"), (128, "float16", "causal"), (128, "bfloat16", "none")]
LEAN += [(64, "bfloat16", "sigmoid"), (128, "float16", "sigmoid")]
LEAN += [(64, "float16", "softcap"), (128, "bfloat16", "softcap")]
# per-query or per-key aux operands (a temperature, a key-padding mask) are read as vectors
LEAN += [(64, "float16", "temp"), (128, "bfloat16", "temp"), (64, "float16", "kpad")]
# a tiles-schedule predicate (plan._TILES_LEAN_FWD): the TMA forward capped at 128
LEAN += [(64, "bfloat16", "natten")]


@pytest.mark.parametrize("case", LEAN, ids=[f"{d}-{t}-{k}" for d, t, k in LEAN])
def test_lean_defaults_use_wgmma_and_two_ctas(case, compiled):
    """Every matrix product of every default kernel is a wgmma (HGMMA, no mma.sync HMMA:
    the D128 dK/dV default was 16x32 with HMMA only; the preprocess's rare row_norm walk
    of the keys -- a per-query temperature -- was 16 rows of HMMA), and the 8-warp forward
    keeps two CTAs per SM (at D64 the causal and soft-capped forwards took 159 registers
    and one)."""
    rows = [r for r in compiled[case] if r["index"] == 0]
    assert {r["kernel"] for r in rows} >= {"fwd", "bwd_dkdv", "bwd_dq"}
    for r in rows:
        if r["kernel"] == "bwd_pre" and not r["mma_kinds"]:
            continue  # the row sums only (no row_norm): no matrix product
        assert r["mma_kinds"] == {"HGMMA"}, _fmt(r)
    (fwd,) = [r for r in rows if r["kernel"] == "fwd"]
    assert fwd["ctas"] >= 2, _fmt(fwd)


@pytest.mark.parametrize(
    "case", [(64, "float16", "causal"), (128, "float16", "causal"), (128, "bfloat16", "none")]
)
def test_softmax_forward_loop_meets_the_hand_counted_bound(case, compiled):
    """The default softmax forward's unmasked loop does no tile arithmetic (MMA, EX2,
    FP32, shuffles, conversions) beyond 5 % over ``sass.softmax_forward_bound``: the
    online softmax's own.  Multiplying every score by the scale before the row max (an
    FMUL per score, 30 more at D64) put it at 1.15."""
    (fwd,) = [r for r in compiled[case] if r["kernel"] == "fwd" and r["index"] == 0]
    c, d = fwd["config"], case[0]
    bound = sass.softmax_forward_bound(c.BLOCK_M, c.BLOCK_N, c.num_warps, d, d)["total"]
    got = sass.arithmetic(fwd["unmasked"])
    assert got <= 1.05 * bound, (got, bound, fwd["unmasked"].counts)


@pytest.mark.parametrize("case", [(64, "float16", "temp"), (128, "bfloat16", "temp")])
def test_temperature_forward_loop_near_the_bound(case, compiled):
    """A per-query temperature costs the default forward's unmasked loop one multiply per
    score over the online softmax's own arithmetic (the constant scale is folded into the
    temperature vector, and the scale can no longer ride in the exp2): within 20 % of
    ``sass.softmax_forward_bound``.  Read as a tile of repeated values with the small
    aux configs, it was 2.2x (D64) and 2.5x (D128) at one CTA per SM."""
    (fwd,) = [r for r in compiled[case] if r["kernel"] == "fwd" and r["index"] == 0]
    c, d = fwd["config"], case[0]
    bound = sass.softmax_forward_bound(c.BLOCK_M, c.BLOCK_N, c.num_warps, d, d)["total"]
    got = sass.arithmetic(fwd["unmasked"])
    assert got <= 1.2 * bound, (got, bound, fwd["unmasked"].counts)
