"""Static decisions codegen takes from a spec: score domain, block skipping, launch configs.

Everything here is a pure function of the spec (plus the sequence lengths at launch time
for the skip bounds), so the generated source is a deterministic function of the spec.
"""

from __future__ import annotations

import dataclasses
import math

import sympy

from attnfx.predicate import NK as SYM_NK
from attnfx.predicate import NQ as SYM_NQ
from attnfx.spec import AttentionSpec

LOG2E = 1.4426950408889634
FP32_MAX = 3.4028234663852886e38
# Skip bounds are runtime ints; "unbounded" is a large value that still leaves headroom
# for int32 index arithmetic (row_start + BIG must not overflow).
UNBOUNDED = 2**30
# A finite fill value at or below this makes exp(fill - max) underflow to exactly 0 in
# float32 as long as the row keeps one key (scores are far above it).
SOFTMAX_SKIP_FINITE_FILL = -1e20
# sigmoid(x) is exactly 0.0 in float32 (reference and tanh form) at or below this.
SIGMOID_SKIP_FILL = -1e4


def _padded(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Plan:
    """What codegen decided for one spec."""

    fold_log2e: bool  # softmax scores carried in log2 units (exp2 with log2e folded)
    skip_op: int | None  # index into score_ops of the fill_pred used for block skipping
    skip_needs_rows_kept: bool  # skipping is exact only when every row keeps a key
    aux_used: tuple[int, ...]  # aux indices the score program reads
    block_d: int
    block_dv: int
    has_fill: bool  # any fill op: rows may end up with no kept key

    @property
    def can_skip(self) -> bool:
        return self.skip_op is not None


def _finite(x: float) -> bool:
    return math.isfinite(x)


def make_plan(spec: AttentionSpec) -> Plan:
    if spec.dtype == "float64":
        raise NotImplementedError("attnfx codegen: float64 attention has no Triton kernel")
    ops = spec.score_ops
    softmax = spec.activation == "softmax"
    # exp2 with log2e folded into the score program is exact only when no value of the
    # program overflows when scaled by log2e: finite fills near finfo(float32).min and
    # additive tensors (HF masks use finfo.min) keep the natural domain.
    fold = softmax and not any(op.op == "add_aux" for op in ops)
    for op in ops:
        if op.op in ("add", "fill_aux", "fill_pred") and op.value is not None:
            if _finite(op.value) and abs(op.value) * LOG2E >= FP32_MAX:
                fold = False
    preds = [i for i, op in enumerate(ops) if op.op == "fill_pred"]
    skip_op = None
    needs_rows = False
    if len(preds) == 1:
        op = ops[preds[0]]
        if op.predicate.mask_class.kind in ("causal", "window"):
            v = op.value
            if softmax:
                if v == -math.inf:
                    skip_op = preds[0]
                elif _finite(v) and v <= SOFTMAX_SKIP_FINITE_FILL:
                    skip_op, needs_rows = preds[0], True
            elif v <= SIGMOID_SKIP_FILL:
                skip_op = preds[0]
    aux_used = tuple(sorted({op.aux for op in ops if op.aux is not None}))
    return Plan(
        fold_log2e=fold,
        skip_op=skip_op,
        skip_needs_rows_kept=needs_rows,
        aux_used=aux_used,
        block_d=_padded(spec.head_dim),
        block_dv=_padded(spec.head_dim_v),
        has_fill=any(op.op in ("fill_aux", "fill_pred") for op in ops),
    )


def _eval_bound(expr, nq: int, nk: int) -> int:
    val = sympy.sympify(expr).subs({SYM_NQ: nq, SYM_NK: nk})
    return int(sympy.floor(val))


def skip_bounds(spec: AttentionSpec, plan: Plan, nq: int, nk: int) -> tuple[int, int, int, int]:
    """(visit_lo, visit_hi, diag_lo, diag_hi) at run time.

    Every pair kept by the skip predicate satisfies diag_lo <= k - q <= diag_hi: tiles
    inside the band run without the fine mask.  Key blocks outside the visit band are
    skipped; it equals the diag band when skipping is exact and is unbounded otherwise
    (no skip predicate, or a finite fill with a row that keeps no key)."""
    if plan.skip_op is None:
        return -UNBOUNDED, UNBOUNDED, -UNBOUNDED, UNBOUNDED
    mc = spec.score_ops[plan.skip_op].predicate.mask_class
    lo = -UNBOUNDED if mc.left is None else -_eval_bound(mc.left, nq, nk)
    hi = UNBOUNDED if mc.right is None else _eval_bound(mc.right, nq, nk)
    lo, hi = max(lo, -UNBOUNDED), min(hi, UNBOUNDED)
    if plan.skip_needs_rows_kept and not _every_row_kept(lo, hi, nq, nk):
        return -UNBOUNDED, UNBOUNDED, lo, hi
    return lo, hi, lo, hi


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

    def launch_kwargs(self, interpret: bool) -> dict:
        if interpret:
            return {}
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


# The interpreter runs a Python loop per block: small tiles keep tests fast.
INTERPRET_CONFIG = Config(16, 16, 1, 1)


def configs(spec: AttentionSpec, interpret: bool = False) -> dict[str, list[Config]]:
    """Launch configs per kernel ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq").

    Each entry is a list so that an autotuner can be plugged in later; today the first
    config is used.  Chosen (per padded head dim) to compile without spills and within
    the 227 KB of shared memory of sm_90 (tests/codegen/test_aot_sm90.py checks it).
    """
    if interpret:
        c = INTERPRET_CONFIG
        return {"fwd": [c], "bwd_pre": [c], "bwd_dkdv": [c], "bwd_dq": [c]}
    d = max(_padded(spec.head_dim), _padded(spec.head_dim_v))
    f32 = spec.dtype == "float32"
    # (picked from sm_90 ptxas resource usage: no spills, shared memory within 227 KB)
    if d <= 32:
        fwd, dkdv, dq = Config(128, 64, 4, 3), Config(32, 128, 4, 3), Config(128, 32, 4, 3)
    elif d <= 64:
        fwd, dkdv, dq = Config(128, 64, 4, 3), Config(32, 128, 8, 2), Config(128, 32, 8, 2)
    elif d <= 128:
        fwd, dkdv, dq = Config(128, 64, 8, 3), Config(16, 32, 4, 1), Config(32, 32, 4, 1)
    else:
        fwd, dkdv, dq = Config(64, 16, 8, 1), Config(16, 32, 8, 1), Config(32, 16, 8, 1)
    if any(op.aux is not None for op in spec.score_ops) and d <= 128:
        # aux tiles (and their load masks) add register pressure
        fwd = Config(64, 32, 8, 2)
    if spec.activation == "sigmoid":
        fwd = dataclasses.replace(fwd, num_warps=8)
        dkdv = dataclasses.replace(dkdv, num_warps=8)
    if f32:  # fp32 tiles take twice the registers and shared memory
        fwd = Config(max(16, fwd.BLOCK_M // 2), fwd.BLOCK_N, fwd.num_warps, 1)
        dkdv = Config(dkdv.BLOCK_M, max(16, dkdv.BLOCK_N // 2), dkdv.num_warps, 1)
        dq = Config(max(16, dq.BLOCK_M // 2), dq.BLOCK_N, dq.num_warps, 1)
    pre = Config(16, 64, 4, 1)
    return {"fwd": [fwd], "bwd_pre": [pre], "bwd_dkdv": [dkdv], "bwd_dq": [dq]}
