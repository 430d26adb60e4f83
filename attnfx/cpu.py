"""The op's CPU implementation: the fastest path that computes the spec, all in float32
(float64 is only the gold, ``ops.reference_attention``, for tests and verification).

* **SDPA path** — PyTorch's fused CPU ``scaled_dot_product_attention`` (flash-style, O(N)
  memory, causal block skipping) wherever the spec is one SDPA expresses with the same
  values:

  - softmax; the score program is multipliers — constants, length-dependent scalars
    (``mul_sym``) and per-query tensors (``mul_aux`` constant along keys, moved onto q:
    ``(q·kᵀ)·τ = (q·τ)·kᵀ``) — followed by additive float masks and fills;
  - a fill is a -inf fill, or a fill so negative (≤ -1e30, float32/bfloat16 working
    dtype) that ``s + v == v`` exactly, in a call where every query row keeps a key —
    then ``exp(v − max)`` is exactly 0 as ``exp(−inf)`` is, and the filled scores'
    gradient is exactly 0 as ``masked_fill``'s is;
  - only ``K <= Q`` alone becomes ``is_causal``; other fills and additive masks are
    combined into one additive mask of their broadcast shape (never B·H·N² unless an
    input already is: the kernel reads size-1 dims of the mask as broadcast);
  - run-time conditions, checked per call: q, k, v all finite (SDPA adds a -inf mask to a
    NaN score, which stays NaN; the spec never reads masked-out keys), and for
    ``fully_masked="preserve"`` no row entirely -inf (eager gives NaN there, SDPA 0).
    ``fully_masked="zero"`` *is* SDPA's semantics.

  Backward: for ``fully_masked="zero"`` specs (sites written as SDPA, whose eager run is
  this same fused kernel) the fused backward. Otherwise the blocked float32 backward
  below: the fused backward recomputes probabilities with a reduced-precision ``exp``
  (about 20 bits), which puts its float32 gradients at 4–15× eager's error for head dims
  other than 16 and 64 — outside the equivalence rule (R = 3) — while the forward, which
  normalizes by the row sum, stays at eager's error.

* **Blocked path** — everything else (sigmoid, tanh soft-capping, non -inf fills,
  multipliers after a mask, ...) runs the spec's own formulas in float32, in blocks of
  query rows (memory bounded by ``BLOCK_BYTES`` whatever the length; a block that fits
  in cache is also faster than one pass over N² scores). Under a -inf ``fill_pred``
  (causal, sliding window) a block reads only keys up to the last one its rows keep.
  The backward is eager's autograd formulas (``ops.reference_gradients``), so its
  rounding is eager's.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import sympy
import torch
from torch import Tensor

from attnfx import score_ops
from attnfx.layout import torch_dtype
from attnfx.predicate import K, Q
from attnfx.reference import probabilities, reference_aux_gradients
from attnfx.score_ops import TorchEnv, compact
from attnfx.spec import AttentionSpec

# Upper bound of one block's float32 score tensor in the blocked path (measured on 2
# cores: 1–8 MiB blocks are within the noise of each other; larger ones leave the cache,
# and each block's few temporaries are the path's peak memory beyond q, k, v).
BLOCK_BYTES = 1 << 20
_MIN_ROWS = 16  # below this the matrix products lose more than the cache gains
_HUGE_NEGATIVE = -1e30
# PyTorch's fused CPU attention (what F.scaled_dot_product_attention runs on CPU), called
# directly: its backward takes the saved output and log-sum-exp, as the op's does.
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_ACC = torch.float32


def profitable(spec: AttentionSpec, needs_grad: bool) -> bool:
    """Whether the op's CPU path beats inductor's code for the site's eager form (by the
    CPU benchmark, ``benchmarks/bench_cpu.py``): the fused SDPA forward does, and, with
    gradients, the fused backward of SDPA-semantics sites; the blocked path (sigmoid,
    soft-capping, other fills, learnable biases, the blocked backward) does not — inductor
    fuses those eager forms better.  The backend keeps unprofitable CPU sites (option
    ``cpu="auto"``, the default) so that attnfx never makes a CPU model slower."""
    if spec.routing is not None or _sdpa_plan(spec) is None:
        return False  # routed: the gathers cost what inductor's code costs (bench_routed)
    if spec.table_aux:
        # a bias table is gathered into an N×N mask on every call (the table may change):
        # NeighborhoodAttention2D 64x64 k=13 with its bias ran 1.25 s against inductor's
        # 0.59 s (no_grad, 2 threads)
        return False
    return not needs_grad or spec.fully_masked == "zero"


# ---------------------------------------------------------------------------------------
# SDPA path
# ---------------------------------------------------------------------------------------


def _sdpa_plan(spec: AttentionSpec):
    """(leading multipliers, mask ops, causal op) when the spec's form is one SDPA can
    run, else None."""
    if not spec.act.sdpa or spec.sink is not None:
        return None  # (a sink is an extra logit in the normalizer: not SDPA's form)
    ops = list(spec.score_ops)
    muls = []
    while ops and ops[0].entry.form == "mul":
        muls.append(ops.pop(0))
    if spec.dtype == "float32" and any(op.entry.operand == "aux" for op in muls):
        # SDPA takes a per-row multiplier only on q: q·τ rounded to float32 errs up to 4x
        # eager's (q·kᵀ)·τ on the output (the recognizer keeps float32 τ on the scores).
        return None
    causal_op = None
    masks = []
    for op in ops:
        form = op.entry.form
        if (
            form == "add"
            and op.aux is not None
            and spec.aux_dtypes[op.aux]
            in (
                "float16",
                "bfloat16",
                "float32",
            )
        ):
            masks.append(op)  # a position bias becomes part of the additive mask here
        elif form == "fill":
            v = op.value
            if v == -math.inf:
                pass
            elif v <= _HUGE_NEGATIVE and spec.dtype in ("float32", "bfloat16"):
                pass
            else:
                return None
            if op.pred is not None and _top_left_causal(op.pred) and causal_op is None:
                causal_op = op  # SDPA's is_causal is exactly K <= Q (top-left)
                continue
            masks.append(op)
        else:
            return None
    return muls, masks, causal_op


@functools.lru_cache(maxsize=256)
def _top_left_causal(pred_key: str) -> bool:
    """Whether the predicate is ``K <= Q`` in any spelling (``Q >= K``, ``K - Q <= 0``)."""
    from attnfx.predicate import MaskPredicate

    pred = MaskPredicate.from_key(pred_key)
    if pred.expr == (K <= Q):
        return True
    mc = pred.mask_class
    return mc.kind == "causal" and mc.right is not None and sympy.sympify(mc.right) == 0


@functools.lru_cache(maxsize=128)  # (per block shape: blocks are rows × keys)
def _keep(
    pred_key: str, nq: int, nk: int, r0: int = 0, len_q: int | None = None,
    len_k: int | None = None,
) -> Tensor:  # fmt: skip
    """The (nq, nk) bool keep-mask of a predicate, cached: evaluating the sympy
    expression costs more than the attention at small sizes, and shapes repeat.  With
    ``len_q``/``len_k``: the block of query rows ``r0..r0+nq`` of a ``len_q`` × ``len_k``
    call (the predicate evaluated at global indices, not rewritten per block: a large
    predicate, e.g. a neighborhood's, costs seconds to substitute and parse)."""
    from attnfx.predicate import MaskPredicate

    pred = MaskPredicate.from_key(pred_key)
    if len_q is None:
        return pred.materialize(nq, nk).contiguous()
    q = torch.arange(r0, r0 + nq).view(nq, 1)
    k = torch.arange(nk).view(1, nk)
    out = torch.as_tensor(pred.evaluate(q, k, len_q, len_k))
    return out.to(torch.bool).expand(nq, nk).contiguous()


def _multipliers(muls, aux, nq, nk):
    """(scalar scale, per-query tensor or None) of the leading multipliers, or None when
    one is not constant along keys (a full-size ``mul_aux``)."""
    scale, rows = 1.0, None
    for op in muls:
        if op.entry.operand == "const":
            scale *= op.value
        elif op.entry.operand == "sym":
            scale *= _value_at(op, nq, nk)
        else:
            t = compact(aux[op.aux])
            if t.shape[-1] != 1:
                return None
            t = t.to(_ACC)
            rows = t if rows is None else rows * t
    return scale, rows


def _combined_mask(spec, ops, aux, nq, nk, dtype, device):
    """One additive float mask for ``ops`` (broadcast shape), and whether it has a fill
    whose value is finite (those need every row to keep a key)."""
    mask = None
    finite_fill = False
    env = _CachedEnv(aux, nq, nk, device=device)
    for op in ops:
        if op.entry.form == "add":
            # the op's additive term: the op applied to a zero score
            term, _ = op.entry.apply(torch.zeros((), dtype=dtype, device=device), op, env)
        else:
            hit = op.entry.hit(op, env)
            finite_fill |= op.value != -math.inf
            term = torch.zeros(hit.shape, dtype=dtype, device=device).masked_fill(
                hit, float("-inf")
            )
        mask = term if mask is None else mask + term
    return mask, finite_fill


def _finite(t: Tensor) -> bool:
    # A finite sum proves every element finite (NaN and ±inf do not cancel away); one
    # pass, no N-sized temporary. A float32 overflow of a finite tensor only sends the
    # call to the blocked path, which computes the same spec.
    # (a Python float's isfinite: torch.isfinite on the 0-dim sum is four small ops,
    # ~50 µs a call on 2 cores)
    return math.isfinite(float(t.sum(dtype=_ACC)))


# Beyond this bound on |q|·|k|·D (float32's largest is 2^128 ≈ 3.4e38), a float32
# product q·kᵀ may overflow — where eager's may not: its summation order differs, and a
# scale the program applied to the scores comes after the product in both — so the call
# runs in float64 instead (exact against the gold; 2^-8 of the range is left for score
# multipliers).  Only adversarial magnitudes reach it: |q|, |k| ~ 1e18 and more.
_RANGE = 2.0**120


def _magnitude(t: Tensor) -> float:
    """max |t|, or inf when an element is not finite (aminmax propagates NaN): one pass
    that also proves the tensor finite."""
    if t.numel() == 0:
        return 0.0
    lo, hi = (float(x) for x in torch.aminmax(t))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return math.inf
    return max(-lo, hi)


def _may_overflow(q: Tensor, k: Tensor) -> bool:
    """Whether a float32 q·kᵀ of this call may overflow (or round to 0 in a way eager's
    summation would not): one min/max pass over q and k, no temporary."""
    if q.dtype == torch.float64 or q.numel() == 0 or k.numel() == 0:
        return False
    return _beyond_range(_magnitude(q), _magnitude(k), q.shape[-1])


def _beyond_range(mq: float, mk: float, d: int) -> bool:
    # (a NaN bound compares False, as before: NaN inputs stay NaN on either path)
    return mq * mk * d >= _RANGE


def _prepare(q, k, v, aux, spec):
    """SDPA arguments for this call, or None when the SDPA path does not apply to it."""
    plan = _sdpa_plan(spec)
    if plan is None or q.dtype == torch.float64 or spec.out_dtype != spec.dtype:
        return None
    if q.shape[-1] != v.shape[-1] or q.device.type != "cpu":
        return None  # the fused kernel takes one head dim
    muls, ops, causal_op = plan
    nq, nk = q.shape[-2], k.shape[-2]
    mult = _multipliers(muls, aux, nq, nk)
    if mult is None or not math.isfinite(mult[0]):
        return None
    scale, rows = mult
    if rows is not None and not _finite(rows):
        return None
    # one pass per operand: q's and k's min/max prove them finite and bound q·kᵀ; v's
    # proves it finite (aminmax is the cheapest full pass: 20 µs against the sum's 57 on
    # 1x2x1024x64 float32)
    mq, mk, mv = _magnitude(q), _magnitude(k), _magnitude(v)
    if not (math.isfinite(mq) and math.isfinite(mk) and math.isfinite(mv)):
        return None
    if _beyond_range(mq, mk, q.shape[-1]):
        return None  # may overflow float32: the blocked path computes it in float64
    if all(op.pred is not None for op in ops):  # the mask depends on the lengths only
        mask = _static_mask(spec.key, nq, nk)
        if mask is False:
            return None
    else:
        mask = _mask(spec, ops, causal_op, [compact(a) for a in aux], nq, nk)
        if mask is False:
            return None
    return dict(attn_mask=mask, is_causal=causal_op is not None, scale=scale, rows=rows)


# Query rows × keys of one block of a static mask's construction.
_MASK_BLOCK = 1 << 22


@functools.lru_cache(maxsize=8)  # (an N×N float mask each, for windows)
def _static_mask(spec_key: str, nq: int, nk: int):
    """``_mask`` of a spec whose masks are all index predicates, built a block of query
    rows at a time: a predicate's integer temporaries stay block-sized (evaluated whole,
    a 2-D 128x128 neighborhood's were N² int64 each, 2 GiB apiece)."""
    spec = AttentionSpec.from_key(spec_key)
    _, ops, causal_op = _sdpa_plan(spec)
    if not ops:
        return _mask(spec, ops, causal_op, [], nq, nk)
    finite_fill = any(op.value != -math.inf for op in ops) or (
        causal_op is not None and causal_op.value != -math.inf
    )
    mask = torch.empty(nq, nk, dtype=_ACC)
    keys = torch.arange(nk)
    step = max(1, _MASK_BLOCK // max(nk, 1))
    for r0 in range(0, nq, step):
        rows = min(step, nq - r0)
        keep = None
        for op in ops:  # (uncached: the blocks do not repeat)
            m = _keep.__wrapped__(op.pred, rows, nk, r0, nq, nk)
            keep = m if keep is None else keep & m
        mask[r0 : r0 + rows].zero_().masked_fill_(~keep, float("-inf"))
        dead = ~keep.any(-1)
        if causal_op is not None:  # is_causal also drops keys > row
            dead |= ~(keep & (keys[None, :] <= torch.arange(r0, r0 + rows)[:, None])).any(-1)
        if bool(dead.any()) and (finite_fill or spec.fully_masked == "preserve"):
            return False
    return mask


def _mask(spec, ops, causal_op, aux, nq, nk):
    """The additive mask (None: none), or False when a row with no key makes the
    fused kernel's result differ from the spec's."""
    mask, finite_fill = _combined_mask(spec, ops, aux, nq, nk, _ACC, None)
    if causal_op is not None and causal_op.value != -math.inf:
        finite_fill = True
    if mask is not None:
        dead = torch.isneginf(mask).all(-1)
        if causal_op is not None:
            # with is_causal, row r also loses keys > r: dead if keys 0..r are all -inf
            dead = dead | _causal_dead(mask)
        if dead.any() and (finite_fill or spec.fully_masked == "preserve"):
            return False
        # The fused kernel reads size-1 dims as broadcast; other dims must be dense.
        mask = mask.contiguous()
    # (is_causal alone keeps key 0 in every row: no row is dead.)
    return mask


def _causal_dead(mask: Tensor) -> Tensor:
    nq, nk = mask.shape[-2], mask.shape[-1]
    keep = ~torch.isneginf(mask.expand(*mask.shape[:-2], nq, nk))
    causal = torch.ones(nq, nk, dtype=torch.bool, device=mask.device).tril()
    return ~(keep & causal).any(-1)


def _kv(k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    if spec.gqa_group > 1:  # (B·Hk·N·D copies: small next to the N² work saved)
        return k.repeat_interleave(spec.gqa_group, 1), v.repeat_interleave(spec.gqa_group, 1)
    return k, v


def _fold_group(g: Tensor, spec: AttentionSpec) -> Tensor:
    if spec.gqa_group == 1:
        return g
    b, h, n, d = g.shape
    return g.view(b, h // spec.gqa_group, spec.gqa_group, n, d).sum(2)


def _dense(t: Tensor) -> Tensor:
    """``t`` in float32, contiguous: the fused kernel, called directly, reads a
    (B, H, N, D) operand whose head dim is not the innermost one wrongly (measured: a
    transposed k, strides (…, 1, N), gives errors of order 1; ``F.sdpa`` copies first)."""
    # (``.to(dtype, memory_format=...)`` returns a strided ``t`` as is when the dtype
    # already matches: measured, torch 2.13.)
    return t.to(_ACC).contiguous()


def _flash_args(q, k, v, spec, args):
    kk, vv = _kv(k, v, spec)
    qq = _dense(q)
    if args["rows"] is not None:
        qq = qq * args["rows"]
    return qq, _dense(kk), _dense(vv)


def _flash(qq, kk, vv, args):
    return _FLASH(
        qq, kk, vv, 0.0, args["is_causal"], attn_mask=args["attn_mask"], scale=args["scale"]
    )


def forward(q, k, v, aux, spec) -> tuple[Tensor, Tensor] | None:
    """The SDPA path's output and float32 log-sum-exp, or None when it does not apply
    to this call (then the caller runs the blocked path)."""
    args = _prepare(q, k, v, aux, spec)
    if args is None:
        return None
    out, lse = _flash(*_flash_args(q, k, v, spec, args), args)[:2]
    return out.to(q.dtype), lse


def backward(dout, q, k, v, aux, spec, out=None, lse=None) -> tuple[Tensor, Tensor, Tensor] | None:
    """SDPA's fused backward for ``fully_masked="zero"`` specs (the same run-time
    conditions as the forward's decide), else None (the caller runs the blocked
    backward). The saved ``out`` and ``lse`` are used when they are the fused kernel's
    own (a float32 site); otherwise the forward is recomputed in float32."""
    if spec.fully_masked != "zero":
        return None
    args = _prepare(q, k, v, aux, spec)
    if args is None:
        return None
    qq, kk, vv = _flash_args(q, k, v, spec, args)
    if out is None or lse is None or out.dtype != _ACC or args["rows"] is not None:
        out, lse = _flash(qq, kk, vv, args)[:2]
    else:
        out = _dense(out)
    dq, dk, dv = _FLASH_BACKWARD(
        _dense(dout), qq, kk, vv, out, lse, 0.0, args["is_causal"],
        attn_mask=args["attn_mask"], scale=args["scale"],
    )  # fmt: skip
    if args["rows"] is not None:
        dq = dq * args["rows"]
    return dq.to(q.dtype), _fold_group(dk, spec).to(k.dtype), _fold_group(dv, spec).to(v.dtype)


# ---------------------------------------------------------------------------------------
# Blocked float32 path, in blocks of query rows
# ---------------------------------------------------------------------------------------


def _row_block(q: Tensor, nk: int) -> int:
    b, h, nq, _ = q.shape
    rows = BLOCK_BYTES // max(1, b * h * nk * 4)
    return max(1, min(nq, max(rows, _MIN_ROWS)))


@functools.lru_cache(maxsize=1024)  # (sympy substitutions cost more than a small block)
def _rows_spec(spec: AttentionSpec, r0: int, nq: int, nk: int, preds: bool = True) -> AttentionSpec:
    """The spec of query rows ``r0..`` of an ``nq`` × ``nk`` call: predicates and
    length-dependent scalars still see global indices and lengths (a block may also read
    fewer keys).  ``preds=False``: predicates stay as they are (``_CachedEnv`` evaluates
    them at the block's global rows)."""
    ops = tuple(
        op if op.pred is not None and not preds else op.entry.rows(op, r0, nq, nk)
        for op in spec.score_ops
    )
    return spec if ops == spec.score_ops else dataclasses.replace(spec, score_ops=ops)


def _drops(value: float) -> bool:
    """A fill value whose probability is exactly 0 beside any kept score: -inf, or a
    finite value so negative (``finfo.min``, -1e30...) that ``exp`` of it is 0."""
    return value == -math.inf or value <= _HUGE_NEGATIVE


def _key_limit_ops(spec: AttentionSpec) -> bool:
    """Whether the score program lets a block skip keys none of its rows keeps: its
    dropping ``fill_pred`` ops are followed only by dropping fills, small finite constant
    additions and positive multipliers that keep a finite fill below -1e20."""
    found, factor, tensors = False, 1.0, False
    for op in spec.score_ops:
        form, operand = op.entry.form, op.entry.operand
        if operand == "pred" and _drops(op.value):
            if op.value != -math.inf and tensors:
                # a tensor before a finite fill may push kept scores as low as the fill
                return False
            found = True
        elif found and form == "fill" and operand == "aux" and op.value == -math.inf:
            pass  # (-inf stays -inf; a kept pair it fills is dropped as eager drops it)
        elif op.aux is not None:
            tensors = True
            if found:
                return False
        elif not found:
            continue
        elif (form, operand) == ("add", "const") and abs(op.value) < 1e10:
            pass
        elif (
            (form, operand) == ("mul", "const")
            and 0 < op.value < math.inf
            and _HUGE_NEGATIVE * factor * op.value < -1e20
        ):
            factor *= op.value
        else:
            return False
    return found


def _key_limit(sp: AttentionSpec, r0: int, rows: int, nq: int, nk: int) -> int:
    """How many leading keys a block's rows can keep (``sp``: the block's spec); every
    key when a finite fill leaves a softmax row with no kept key (eager averages over
    all keys there)."""
    keep, finite = None, False
    for op in sp.score_ops:
        if op.pred is None or not _drops(op.value):
            continue
        m = _keep(op.pred, rows, nk, r0, nq, nk)
        keep = m if keep is None else keep & m
        finite |= op.value != -math.inf
    if keep is None:
        return nk
    if finite and sp.act.normalized and not bool(keep.any(-1).all()):
        return nk
    cols = keep.any(0).nonzero()
    return int(cols.max()) + 1 if cols.numel() else 1


def _blocks(q: Tensor, k: Tensor, aux: list[Tensor], spec: AttentionSpec):
    """(row slice, key count, aux block, spec of those rows) per block of query rows."""
    nq, nk = q.shape[-2], k.shape[-2]
    rb = _row_block(q, nk)
    limit_ops = _key_limit_ops(spec)
    for r0 in range(0, nq, rb):
        rows = slice(r0, min(nq, r0 + rb))
        sp = _rows_spec(spec, r0, nq, nk, preds=False)
        keys = _key_limit(sp, r0, rows.stop - r0, nq, nk) if limit_ops else nk
        yield rows, keys, sp


def _aux_block(aux, rows, keys, nk, tables=frozenset()):
    """The aux tensors over a block's rows and leading keys (a table stays whole)."""
    return [
        a if i in tables else a[..., rows, :keys] if keys < nk else a[..., rows, :]
        for i, a in enumerate(aux)
    ]


@functools.lru_cache(maxsize=1024)
def _value_at(op, nq: int, nk: int) -> float:
    return op.value_at(nq, nk)


class _CachedEnv(TorchEnv):
    """The score ops' operands with the predicates' keep-masks and the length scalars
    cached (they repeat block after block); predicates at the block's global rows
    ``r0..`` of a ``len_q`` × ``len_k`` call."""

    def __init__(
        self, aux, nq, nk, *, r0: int = 0, len_q: int | None = None,
        len_k: int | None = None, device=None, inplace: bool = False,
    ):  # fmt: skip
        super().__init__(aux, nq, nk, device=device, inplace=inplace)
        self.r0, self.len_q, self.len_k = r0, len_q, len_k

    def value_at(self, op) -> float:
        return _value_at(op, self.nq, self.nk)

    def keep(self, op) -> Tensor:
        return _keep(op.pred, self.nq, self.nk, self.r0, self.len_q, self.len_k)


def _probs(qb, kb, a, sp, where, *, with_grad, range32=False):
    """(probabilities, log-sum-exp, filled pairs or None, d scores/d raw) of one block,
    in float32: the score program in place on the block's scores (the table's torch
    references: the same ops in the same order as ``reference.apply_score_ops``, so the
    same values); the derivative is not zeroed on filled pairs (the caller does).
    ``range32``: float64 scores of a call that may overflow float32 (``_may_overflow``)
    are rounded to float32 after the product and after the score program, so that a score
    beyond float32's range is ±inf as in the program's float32 tensors (a finite one keeps
    its value: the product itself does not overflow on the way)."""
    s = torch.matmul(qb, kb.transpose(-2, -1))
    if range32:
        s = s.float().double()
    r0, len_q, len_k = where
    env = _CachedEnv(a, s.shape[-2], s.shape[-1], r0=r0, len_q=len_q, len_k=len_k, inplace=True)
    s, hit, d = score_ops.run(s, sp.score_ops, env, with_grad=with_grad)
    if range32:
        s = s.float().double()
    p, lse = probabilities(s, sp, a)  # (a sink joins the normalizer)
    return p, lse, hit, d


def _work_dtype(q: Tensor, k: Tensor, backward: bool = False) -> torch.dtype:
    """float32 for float16/bfloat16/float32 sites; a float64 site stays float64.  The
    blocked backward of a float32 site accumulates in float64: in float32 its gradients
    (recomputed probabilities, a temperature moved onto q) err up to ~1.2x beyond the
    equivalence rule's 3x of eager's; it runs only where the backend chose it (on CPU,
    by default, forms whose gradients take it stay with inductor: ``profitable``).  A call
    whose float32 scores may overflow (``_may_overflow``) runs in float64 too."""
    if q.dtype == torch.float64 or (backward and q.dtype == torch.float32):
        return torch.float64
    if _may_overflow(q, k):
        return torch.float64
    return _ACC


def _operands(q, k, v, spec, backward: bool = False):
    kk, vv = _kv(k, v, spec)
    acc = _work_dtype(q, k, backward)
    return q.to(acc), kk.to(acc), vv.to(acc)


def reference_forward(q, k, v, aux, spec) -> tuple[Tensor, Tensor]:
    """The blocked float32 forward: output (``out_dtype``) and float32 log-sum-exp."""
    qq, kk, vv = _operands(q, k, v, spec)
    range32 = q.dtype != torch.float64 and _may_overflow(q, k)
    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    out = torch.empty((b, h, nq, vv.shape[-1]), dtype=torch_dtype(spec.out_dtype))
    lse = torch.empty((b, h, nq), dtype=torch.float32)
    for rows, keys, sp in _blocks(q, k, aux, spec):
        for attempt in (keys, nk) if keys < nk else (nk,):
            a = _aux_block(aux, rows, attempt, nk, spec.table_aux)
            where = (rows.start, nq, nk)
            p, ls, _, _ = _probs(
                qq[..., rows, :], kk[..., :attempt, :], a, sp, where, with_grad=False,
                range32=range32,
            )  # fmt: skip
            o = torch.matmul(p, vv[..., :attempt, :])
            if attempt == nk or not torch.isnan(o).any():
                break  # a NaN row reads every key in eager (and in the gold)
        out[..., rows, :] = o
        lse[..., rows] = ls
    return out, lse


def reference_backward(dout, q, k, v, aux, spec) -> tuple[Tensor, Tensor, Tensor]:
    """The blocked backward: eager's formulas (``ops.reference_gradients``) per block of
    query rows; dQ by rows, dK and dV accumulated over the blocks (float32; float64 for a
    float32 site, see ``_work_dtype``)."""
    qq, kk, vv = _operands(q, k, v, spec, backward=True)
    range32 = q.dtype != torch.float64 and _may_overflow(q, k)
    acc = qq.dtype
    do = dout.to(acc)
    nq, nk = qq.shape[-2], kk.shape[-2]
    dq = torch.empty(qq.shape, dtype=acc)
    dk = torch.zeros(kk.shape, dtype=acc)
    dv = torch.zeros(vv.shape, dtype=acc)
    for rows, keys, sp in _blocks(q, k, aux, spec):
        for attempt in (keys, nk) if keys < nk else (nk,):
            a = _aux_block(aux, rows, attempt, nk, spec.table_aux)
            kb, vb, qb, dob = (
                kk[..., :attempt, :],
                vv[..., :attempt, :],
                qq[..., rows, :],
                do[..., rows, :],
            )
            p, _, filled, factor = _probs(
                qb, kb, a, sp, (rows.start, nq, nk), with_grad=True, range32=range32
            )
            if attempt == nk or not torch.isnan(p).any():
                break
        dv[..., :attempt, :] += torch.matmul(p.transpose(-2, -1), dob)
        ds = torch.matmul(dob, vb.transpose(-2, -1))  # dp, made ds in place below
        ds = sp.act.ds_(p, ds)
        if isinstance(factor, Tensor) or factor != 1.0:
            ds.mul_(factor)
        if filled is not None:
            # Filled scores get exactly zero gradient (as masked_fill's backward gives),
            # even where the row's probabilities are NaN.
            ds.masked_fill_(filled, 0.0)
        dq[..., rows, :] = torch.matmul(ds, kb)
        dk[..., :attempt, :] += torch.matmul(ds.transpose(-2, -1), qb)
    return dq.to(q.dtype), _fold_group(dk, spec).to(k.dtype), _fold_group(dv, spec).to(v.dtype)


def reference_aux_backward(dout, q, k, v, aux, spec, which) -> list[Tensor]:
    """``reference.reference_aux_gradients`` in blocks of query rows, each gradient summed over
    its aux tensor's broadcast dims in the accumulation dtype (across blocks too) and
    rounded once (``reference.concentrate_gradient``)."""
    from attnfx.reference import broadcast_dims, concentrate_gradient

    nq = q.shape[-2]
    rb = max(1, min(nq, BLOCK_BYTES * 2 // max(1, q.shape[0] * q.shape[1] * k.shape[-2] * 8)))
    dims = {i: broadcast_dims(aux[i]) for i in which}
    totals: dict[int, Tensor] = {}
    for r0 in range(0, nq, rb):
        rows = slice(r0, min(nq, r0 + rb))
        a = _aux_block(aux, rows, k.shape[-2], k.shape[-2], spec.table_aux)
        sp = _rows_spec(spec, r0, nq, k.shape[-2])
        parts = reference_aux_gradients(dout[..., rows, :], q[..., rows, :], k, v, a, sp, which)
        for i, g in zip(which, parts):
            if dims[i]:
                g = g.sum(dim=dims[i], keepdim=True)
            elif i not in spec.table_aux:  # (a table's sums stay in the accumulation dtype)
                g = g.to(aux[i].dtype)  # a full bias: rounded per block (bounded memory)
            if i not in totals:
                shape = [1 if d in dims[i] else n for d, n in enumerate(aux[i].shape)]
                totals[i] = torch.zeros(shape, dtype=g.dtype, device=g.device)
            if g.dim() >= 2 and totals[i].shape[-2] == 1:
                totals[i] += g  # broadcast along the query rows: summed over the blocks
            else:
                totals[i][..., rows, :] = g
    return [concentrate_gradient(totals[i], aux[i]) for i in which]
