"""Static decisions codegen takes from a spec: score domain, block skipping, launch configs.

Everything here is a pure function of the spec (plus the sequence lengths at launch time
for the skip bounds), so the generated source is a deterministic function of the spec.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math

import sympy

from attnfx.layout import split_lse
from attnfx.predicate import NK as SYM_NK
from attnfx.predicate import NQ as SYM_NQ
from attnfx.score_ops import HUGE_LSE  # noqa: F401 - the kernels' threshold, emit prints it
from attnfx.spec import AttentionSpec

LOG2E = 1.4426950408889634
FP32_MAX = 3.4028234663852886e38
# Skip bounds are runtime ints; "unbounded" is a large value that still leaves headroom
# for int32 index arithmetic (row_start + BIG must not overflow).
UNBOUNDED = 2**30


def _padded(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


class ScheduleKind(enum.Enum):
    """How a kernel iterates over the (query tile, key tile) pairs.

    ``BAND``: the key tiles of a K - Q band (plus a kept key prefix), their ranges
    computed in the kernel from four bounds (``skip_bounds``); also the schedule of a spec
    with nothing to skip (unbounded band: every tile).  ``TILES``: per row tile, a list of
    column tiles marked partial (the predicate is evaluated) or full (it is not), computed
    on the host from the mask predicate, exactly (``attnfx.codegen.tiles``); the
    transposed lists drive dK/dV.  Next: ``GATHER`` (rows of Q/K/V through an index
    tensor) and multi-dimensional tiles -- a new kind adds its record here, its kernel
    parameters (``signature.schedule_params``) and its loops (``emit``'s schedules)."""

    BAND = "band"
    TILES = "tiles"


@dataclasses.dataclass(frozen=True)
class Schedule:
    kind: ScheduleKind
    # the fill_pred (index into score_ops) whose kept pairs bound the visited tiles;
    # None: nothing is skipped
    skip_op: int | None = None
    # BAND: the predicate keeps a prefix of keys besides its band (StreamingLLM)
    prefix: bool = False

    def describe(self) -> str:
        return self.kind.value


@dataclasses.dataclass(frozen=True)
class Plan:
    """What codegen decided for one spec."""

    fold_log2e: bool  # softmax scores carried in log2 units (exp2 with log2e folded)
    skip_op: int | None  # index into score_ops of the fill_pred used for block skipping
    skip_needs_rows_kept: bool  # skipping is exact only when every row keeps a key
    # the skip predicate keeps a prefix of keys besides its band (StreamingLLM): kernels
    # also visit the key blocks [0, visit_prefix) outside the band
    skip_prefix: bool
    aux_used: tuple[int, ...]  # aux indices the score program reads
    block_d: int
    block_dv: int
    has_fill: bool  # any fill op: rows may end up with no kept key
    uses_tanh: bool  # a tanh op or the sigmoid activation: kernels take TANH_IMPL
    fold_start: int  # log2e is folded in at the first op at or after this index
    # softmax rows may have a huge finite log-sum-exp (finfo.min fills, additive masks):
    # float32 lse then loses log(l), and the backward recomputes (max, log l) for them
    row_norm: bool
    schedule: Schedule
    # the forward leaves the leading constant scale off the scores and applies it (times
    # log2 e) inside the exp2 and to the row max: one FFMA per score instead of an FMUL
    # more; set when the rest of the program is -inf fills only (they stay -inf scaled)
    scale_in_exp: float | None = None
    # bias tables (``add_table_aux``) whose gradient the dQ kernel scatters (TABLE_GRAD):
    # those followed only by additions and fills, so that their gradient is dS of the
    # final scores on the kept pairs
    table_grads: tuple[int, ...] = ()
    # a float32 softmax: the forward sums lse in float64 and stores it as a float32
    # (value, remainder) pair (``layout.split_lse``); the backward splits it into the
    # float32 row statistic and a small rest (``lg``), so that exp(s − lse) loses nothing
    # to |lse|·eps
    lse64: bool = False

    @property
    def can_skip(self) -> bool:
        return self.skip_op is not None

    @property
    def uses_lg(self) -> bool:
        """Whether the backward kernels read a second row statistic (``Lg``)."""
        return self.row_norm or self.lse64


def make_plan(spec: AttentionSpec) -> Plan:
    if spec.dtype == "float64":
        raise TypeError(
            "attnfx codegen: float64 attention has no Triton kernel (the backend keeps float64 sites)"
        )
    ops = spec.score_ops
    act = spec.act
    # exp2 with log2e folded into the score program is exact only when no value of the
    # program overflows when scaled by log2e: finite fills near finfo(float32).min and
    # additive tensors (HF masks use finfo.min) keep the natural domain.  float32 keeps
    # it too: folded, each score is rounded after its multiply by log2e (|s|·eps, and
    # again at every term added after the fold), where exp2((s − m)·log2e) rounds
    # |s − m|·eps, small on the rows' dominant terms.  Eager's own error is that small
    # in float32 (in 16 bits the inputs' rounding dwarfs it).  Measured through the
    # kernels (unscaled, scores ~100): output 0.63 -> 0.50 of the rule's max bound, dK
    # 1.40 -> 1.20 of eager's mean error.  It costs one multiply per score.
    fold = (
        act.normalized
        and spec.dtype != "float32"
        and not any(op.entry.log2 == "natural" for op in ops)
    )
    for op in ops:
        if op.value is not None and math.isfinite(op.value):
            if abs(op.value) * LOG2E >= FP32_MAX:
                fold = False
    preds = [i for i, op in enumerate(ops) if op.entry.operand == "pred"]
    skip_op = None
    needs_rows = False
    kind = ScheduleKind.BAND
    if len(preds) == 1 and all(
        o.entry.preserves_fill(o, ops[preds[0]].value) for o in ops[preds[0] + 1 :]
    ):
        op = ops[preds[0]]
        skips, needs = act.skip_fill(op.value)
        if op.predicate.mask_class.kind in ("causal", "window"):
            if skips:
                skip_op, needs_rows = preds[0], needs
        elif op.predicate.mask_class.kind == "predicate" and skips and not needs:
            # any other predicate, under a fill that leaves exactly 0 probability: the host
            # lists each query tile's non-empty key tiles (a finite fill would need every
            # row to keep a key: not skipped)
            skip_op, kind = preds[0], ScheduleKind.TILES
    skip_prefix = skip_op is not None and ops[skip_op].predicate.mask_class.prefix is not None
    aux_used = tuple(sorted({op.aux for op in ops if op.aux is not None} | {spec.sink} - {None}))
    return Plan(
        fold_log2e=fold,
        skip_op=skip_op,
        skip_needs_rows_kept=needs_rows,
        skip_prefix=skip_prefix,
        aux_used=aux_used,
        block_d=_padded(spec.head_dim),
        block_dv=_padded(spec.head_dim_v),
        has_fill=any(op.entry.form == "fill" for op in ops),
        uses_tanh="_tanh" in act.helpers or any("_tanh" in op.entry.helpers for op in ops),
        row_norm=act.normalized and any(op.entry.may_saturate(op) for op in ops),
        # an op that does not commute with the log2(e) scaling (tanh): fold it in after
        # the last one
        fold_start=max((i + 1 for i, op in enumerate(ops) if op.entry.log2 == "before"), default=0),
        schedule=Schedule(kind, skip_op, skip_prefix),
        scale_in_exp=_scale_in_exp(spec, fold),
        table_grads=_table_grads(spec),
        lse64=split_lse(spec),
    )


def _table_grads(spec: AttentionSpec) -> tuple[int, ...]:
    """The table aux tensors whose gradient is dS of the final scores: each read by one
    ``add_table_aux`` op, after which come only additions and fills (derivative 1 on the
    kept pairs, 0 on the filled ones: the dQ kernel's gate)."""
    out = []
    for i in sorted(spec.table_aux):
        at = [j for j, op in enumerate(spec.score_ops) if op.aux == i]
        if len(at) == 1 and all(
            op.entry.form in ("add", "fill") for op in spec.score_ops[at[0] + 1 :]
        ):
            out.append(i)
    return tuple(out)


def _scale_in_exp(spec: AttentionSpec, fold: bool) -> float | None:
    """The forward's deferred scale (``Plan.scale_in_exp``), or None: a softmax in log2
    units whose program is one positive finite constant multiplier followed by -inf
    fills only -- or -inf fills alone: the scale is log2(e) itself -- and no sink (a
    sink's logit is not scaled by it).  The exp2's fused multiply-add takes the scale
    where an FMUL per score did (16-bit specs: float32 ones keep the natural domain,
    ``fold`` False), and the product s·scale is not rounded there."""
    ops = spec.score_ops
    if not (fold and spec.act.normalized and spec.sink is None):
        return None
    lead = ops[:1]
    if lead and (lead[0].entry.form, lead[0].entry.operand) == ("mul", "const"):
        if not (0 < lead[0].value < math.inf):
            return None
        scale, rest = lead[0].value, ops[1:]
    else:
        scale, rest = 1.0, ops
    if not all(op.entry.form == "fill" and op.value == -math.inf for op in rest):
        return None
    return scale * LOG2E


def _eval_bound(expr, nq: int, nk: int) -> int:
    """floor(expr) at the lengths: a compiled Python function of (NQ, NK) (a sympy
    substitution costs ~0.1 ms, paid on every new length under dynamic shapes), exact
    through sympy where it cannot be used."""
    fn = _bound_fn(expr if isinstance(expr, str) else sympy.srepr(expr))
    if fn is not None:
        try:
            val = fn(nq, nk)
            if isinstance(val, int) or (isinstance(val, float) and math.isfinite(val)):
                return math.floor(val)
        except (ArithmeticError, TypeError, ValueError):
            pass
    val = sympy.sympify(expr).subs({SYM_NQ: nq, SYM_NK: nk})
    return int(sympy.floor(val))


@functools.lru_cache(maxsize=256)
def _bound_fn(expr: str):
    """``expr`` (over NQ, NK) as a Python function, when it is integer arithmetic that
    Python evaluates exactly (sums, products, floor division, min/max); else None."""
    e = sympy.sympify(expr)
    if e.free_symbols - {SYM_NQ, SYM_NK}:
        return None
    allowed = (sympy.Add, sympy.Mul, sympy.Min, sympy.Max, sympy.floor, sympy.ceiling)
    for node in sympy.preorder_traversal(e):
        if node.is_Atom:
            if node.is_Number and not node.is_Integer:
                return None  # a fraction: float division would round
            continue
        if not isinstance(node, allowed):
            return None  # powers (1/x), Piecewise, ...: sympy's exact path
    return sympy.lambdify((SYM_NQ, SYM_NK), e, modules="math")


def skip_bounds(
    spec: AttentionSpec, plan: Plan, nq: int, nk: int
) -> tuple[int, int, int, int, int]:
    """(visit_lo, visit_hi, diag_lo, diag_hi, visit_prefix) at run time.

    Every pair kept by the skip predicate's band satisfies diag_lo <= k - q <= diag_hi:
    tiles inside the band run without the fine mask.  Key blocks outside the visit band
    are skipped, except the blocks of the first ``visit_prefix`` keys (a predicate that
    keeps a prefix besides its band; 0 otherwise), visited with the fine mask.  The
    visit band equals the diag band when skipping is exact and is unbounded otherwise
    (no skip predicate, or a finite fill with a row that keeps no key)."""
    assert plan.schedule.kind is ScheduleKind.BAND, plan.schedule
    if plan.skip_op is None:
        return -UNBOUNDED, UNBOUNDED, -UNBOUNDED, UNBOUNDED, 0
    mc = spec.score_ops[plan.skip_op].predicate.mask_class
    lo = -UNBOUNDED if mc.left is None else -_eval_bound(mc.left, nq, nk)
    hi = UNBOUNDED if mc.right is None else _eval_bound(mc.right, nq, nk)
    lo, hi = max(lo, -UNBOUNDED), min(hi, UNBOUNDED)
    prefix = 0
    if mc.prefix is not None:
        prefix = min(max(_eval_bound(mc.prefix, nq, nk), 0), nk)
    if plan.skip_needs_rows_kept and not _every_row_kept(lo, hi, nq, nk):
        return -UNBOUNDED, UNBOUNDED, lo, hi, 0
    return lo, hi, lo, hi, prefix


def _every_row_kept(lo: int, hi: int, nq: int, nk: int) -> bool:
    # row q keeps keys [max(0, q + lo), min(nk - 1, q + hi)]; the width is smallest at
    # an end row (it is concave in q)
    for q in {0, nq - 1}:
        if max(0, q + lo) > min(nk - 1, q + hi):
            return False
    return lo <= hi


# ---------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int = 4
    num_stages: int = 2
    # Hopper habits (forward only; codegen constexprs USE_TMA / WARP_SPEC):
    tma: bool = False  # q/k/v through device-side tensor descriptors (TMA loads)
    ws: bool = False  # warp-specialized key loop (tl.range(..., warp_specialize=True))
    # ptxas register cap: at <= 128 registers two 8-warp CTAs share an SM (64K registers)
    maxnreg: int | None = None

    def launch_kwargs(self, interpret: bool) -> dict:
        if interpret:
            return {}
        kw = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            kw["maxnreg"] = self.maxnreg
        return kw

    def habit_constexprs(self) -> dict:
        return {"USE_TMA": self.tma, "WARP_SPEC": self.ws}

    def describe(self) -> str:
        tail = "".join(f" {h}" for h in ("tma", "ws") if getattr(self, h))
        tail += f" r{self.maxnreg}" if self.maxnreg else ""
        return f"{self.BLOCK_M}x{self.BLOCK_N} w{self.num_warps} s{self.num_stages}{tail}"


# ATTNFX_CODEGEN_FEATURES: comma list forcing a habit on ("tma") or off ("-tma", "notma");
# a habit not named is left to the candidate list (and the autotuner).
FEATURES_ENV = "ATTNFX_CODEGEN_FEATURES"
HABITS = ("tma", "ws")


def features() -> dict[str, bool]:
    """{habit: forced on (True) / off (False)} from ``ATTNFX_CODEGEN_FEATURES``."""
    import os

    out: dict[str, bool] = {}
    for item in os.environ.get(FEATURES_ENV, "").replace(" ", "").lower().split(","):
        if not item:
            continue
        on = not item.startswith(("-", "no"))
        name = item.lstrip("-")
        name = name[2:] if name.startswith("no") else name
        if name not in HABITS:
            raise ValueError(f"{FEATURES_ENV}: unknown habit {item!r} (known: {', '.join(HABITS)})")
        out[name] = on
    return out


def features_key() -> str:
    return ",".join(f"{'' if v else '-'}{k}" for k, v in sorted(features().items()))


def apply_features(cands: list[Config], forced: dict[str, bool], allowed: dict[str, bool]) -> list:
    """Force habits on/off in a forward candidate list; ``allowed``: habits the launch
    can use at all (e.g. TMA needs 16-byte aligned strides).  Order kept, duplicates
    dropped."""
    out: list[Config] = []
    for c in cands:
        kw = {}
        for h in HABITS:
            if not allowed.get(h, True):
                kw[h] = False
            elif h in forced:
                kw[h] = forced[h]
        c2 = dataclasses.replace(c, **kw)
        if c.tma and not c2.tma:
            c2 = dataclasses.replace(c2, maxnreg=None)  # the cap was sized for TMA's registers
        if c2 not in out:
            out.append(c2)
    return out


# The interpreter runs a Python loop per block: small tiles keep tests fast.
INTERPRET_CONFIG = Config(16, 16, 1, 1)


# Candidate launch configs per kernel and padded head dim, best first: (BLOCK_M, BLOCK_N,
# num_warps, num_stages[, tma, ws]).  Picked from the sm_90 resource usage that Triton
# 3.6's ptxas reports for the kernels as the JIT specializes them on contiguous inputs
# (row strides divisible by 16: vectorized, cp.async-pipelined loads;
# tests/codegen/test_aot_sm90.py compiles *every* candidate of every spec it covers and
# fails on spills or on more than 227 KB of shared memory).  The autotuner
# (attnfx.codegen.autotune) times them on the GPU; with ATTNFX_AUTOTUNE=0 the first runs.
# The first candidate of each list compiles without spills for every variant the AOT
# test covers (aux tensors, tanh, GQA); bigger tiles after it may spill for the heavier
# variants -- the autotuner drops those (n_spills) before timing.
# Forward candidates with tma=True load q/k/v through tensor descriptors (TMA): fewer
# registers (no pointer tiles), used only when the strides allow it.
_TMA = True
_FP16_CONFIGS: dict[int, dict[str, list[tuple]]] = {
    32: {
        "fwd": [(128, 64, 8, 3), (128, 64, 8, 3, _TMA), (128, 32, 8, 3)],
        "bwd_dkdv": [(32, 128, 8, 2), (16, 64, 4, 2)],
        "bwd_dq": [(128, 64, 8, 2), (64, 32, 4, 2)],
    },
    64: {
        "fwd": [(128, 64, 8, 3), (128, 64, 8, 3, _TMA), (128, 128, 8, 2), (64, 32, 4, 3)],
        "bwd_dkdv": [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)],
        "bwd_dq": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2)],
    },
    128: {
        "fwd": [(128, 64, 8, 2), (128, 64, 8, 2, _TMA), (128, 64, 8, 3, _TMA), (128, 32, 8, 3)],
        "bwd_dkdv": [(16, 32, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2), (32, 64, 8, 2)],
        "bwd_dq": [(128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 8, 2)],
    },
    256: {
        "fwd": [(32, 16, 4, 1), (16, 16, 4, 1)],
        "bwd_dkdv": [(16, 32, 8, 1)],
        # 4 warps took 253-255 registers (causal: 8 bytes of stack with the tile-relative
        # masks); 8 warps take 164 -- one CTA per SM either way, twice the warps
        "bwd_dq": [(16, 16, 8, 1), (16, 16, 4, 1)],
    },
}
# Variants with more live tiles (aux tensors and their load masks, tanh) at D <= 128
_AUX_FWD = {
    32: [(64, 32, 8, 2), (64, 16, 4, 2)],
    64: [(64, 32, 8, 2), (64, 16, 4, 2)],
    128: [(64, 16, 8, 1), (32, 16, 4, 1)],
}
_PRE = [(16, 64, 4, 1)]
# With row_norm the preprocess may walk the keys (rows whose lse lost log(l)): 64 query
# rows on one warpgroup make its q·kᵀ a wgmma (16 rows: mma.sync), up to D128 and with no
# aux tile (an additive mask tile at D128 spilled 256 bytes); the common path (delta) is
# the same row sums over 4x the rows per program.
_PRE_ROW_NORM = [(64, 64, 4, 1)]

# Lean score programs (``_lean``) at D64 / D128 take these lists first: tuned on the
# static sm_90 report (benchmarks/sass_report.py), each entry compiled without a spill for
# the lean kinds (softmax, causal, sigmoid, soft-capping).  Heavier programs (aux tensors,
# GQA, sinks, prefix masks) spill with them and keep the lists above.
_CAP = 128
_LEAN = {
    64: {
        # uncapped, ptxas gave the causal and soft-capped forwards 159 registers: one CTA
        # per SM; capped at 128 they do not spill and two CTAs fit
        "fwd": [(128, 64, 8, 3, False, False, _CAP), (128, 64, 8, 3, _TMA, False, _CAP)],
        # softmax only: 64 queries per step, 5.9 loop instructions per query against 6.9
        # at 32x128, same one CTA per SM (soft-capping and a per-query temperature spill
        # here; sigmoid's 32x128 runs two CTAs per SM, which 64x128 would halve)
        "bwd_dkdv": [(64, 128, 8, 2)],
    },
    128: {
        # only the TMA forward (no pointer tiles) fits 128 registers without spilling
        "fwd": [(128, 64, 8, 2, _TMA, False, _CAP)],
        # wgmma for every product (the 16x32 tile has only mma.sync)
        "bwd_dkdv": [(32, 128, 8, 2)],
    },
}


# A tiles-schedule predicate (a neighborhood, chunks) with an otherwise lean program at
# D64: uncapped, the forward took 192 registers (one CTA per SM); capped at 128, the
# pointer-tile forward spills (32 bytes of stack) and the TMA one does not (two CTAs).
# Where TMA does not apply the launcher drops the cap with it (``apply_features``).
_TILES_LEAN_FWD = {64: [(128, 64, 8, 3, _TMA, False, _CAP)]}


# A bias table read per score (``add_table_aux``) at D128: the default 16x32 dK/dV tile
# spilled 8 bytes on its offset tile (sm_90 report, kind relbias); 32x128 does not and
# runs wgmma.
_TABLE_DKDV = {128: [(32, 128, 8, 2)]}


def _tile_aux(spec: AttentionSpec) -> bool:
    """Whether a score op reads an aux tensor as a whole tile (``aux_bcast`` "full", or a
    table read at an index per score: a tile of offsets and values): a per-query or
    per-key vector costs a few registers, a tile as many as the scores."""
    return any(
        op.aux is not None and (spec.aux_broadcast(op.aux) == "full" or op.entry.operand == "table")
        for op in spec.score_ops
    )


def _lean(spec: AttentionSpec) -> bool:
    """No aux tile, sink or GQA, and at most one mask, causal or none."""
    from attnfx.predicate import classify

    if spec.sink is not None or spec.gqa_group != 1:
        return False
    fills = [op for op in spec.score_ops if op.entry.operand == "pred"]
    if _tile_aux(spec) or len(fills) > 1:
        return False
    return all(classify(op.predicate.expr).kind in ("none", "causal") for op in fills)


def _tiles_lean(spec: AttentionSpec) -> bool:
    """No aux tile, sink or GQA, and one mask: a predicate of the ``tiles`` kind."""
    from attnfx.predicate import classify

    if spec.sink is not None or spec.gqa_group != 1 or _tile_aux(spec):
        return False
    fills = [op for op in spec.score_ops if op.entry.operand == "pred"]
    return len(fills) == 1 and classify(fills[0].predicate.expr).kind == "predicate"


def configs(spec: AttentionSpec, interpret: bool = False) -> dict[str, list[Config]]:
    """Launch configs per kernel ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq"): candidate
    lists, best first (autotune-ready; today the launcher takes the first)."""
    if interpret:
        c = INTERPRET_CONFIG
        return {"fwd": [c], "bwd_pre": [c], "bwd_dkdv": [c], "bwd_dq": [c]}
    d = max(32, _padded(spec.head_dim), _padded(spec.head_dim_v))
    d = min(c for c in _FP16_CONFIGS if c >= d) if d <= 256 else 256
    table = {k: list(v) for k, v in _FP16_CONFIGS[d].items()}
    if d <= 128 and _tile_aux(spec):
        table["fwd"] = list(_AUX_FWD[d])
    if d in _LEAN and _lean(spec):
        plain = spec.act.normalized and not any(
            "_tanh" in op.entry.helpers or op.aux is not None for op in spec.score_ops
        )
        for kernel, first in _LEAN[d].items():
            if plain or not (d == 64 and kernel == "bwd_dkdv"):
                table[kernel] = [*first, *table[kernel]]
    elif d in _TILES_LEAN_FWD and _tiles_lean(spec) and spec.act.normalized:
        table["fwd"] = [*_TILES_LEAN_FWD[d], *table["fwd"]]
    if d in _TABLE_DKDV and spec.table_aux:
        table["bwd_dkdv"] = [*_TABLE_DKDV[d], *table["bwd_dkdv"]]
    if spec.dtype == "float32":  # fp32 tiles take twice the registers and shared memory
        table = {
            "fwd": [(max(16, c[0] // 2), c[1], c[2], 1, *c[4:]) for c in table["fwd"]],
            "bwd_dkdv": [(c[0], max(16, c[1] // 2), c[2], 1) for c in table["bwd_dkdv"]],
            "bwd_dq": [(max(16, c[0] // 2), c[1], c[2], 1) for c in table["bwd_dq"]],
        }
    wide_pre = make_plan(spec).row_norm and d <= 128 and not _tile_aux(spec)
    table["bwd_pre"] = list(_PRE_ROW_NORM if wide_pre else _PRE)
    out = {}
    for k in ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq"):
        seen = []
        for c in table[k]:
            if Config(*c) not in seen:
                seen.append(Config(*c))
        out[k] = seen
    return out
