"""The op's CPU implementation: the fastest path that computes the spec exactly.

* **SDPA path** — PyTorch's fused CPU ``scaled_dot_product_attention`` (flash-style, O(N)
  memory, causal block skipping) wherever the spec is one SDPA expresses with the same
  values and gradients:

  - softmax; the score program is constant multipliers (the scale) followed by additive
    float masks and fills;
  - a fill is a -inf fill, or a fill so negative (≤ -1e30, float32/bfloat16 working
    dtype) that ``s + v == v`` exactly, in a call where every query row keeps a key —
    then ``exp(v − max)`` is exactly 0 as ``exp(−inf)`` is, and the filled scores'
    gradient is exactly 0 as ``masked_fill``'s is;
  - only ``K <= Q`` alone becomes ``is_causal``; other fills and additive masks are
    combined into one additive mask of their broadcast shape (never B·H·N² unless an
    input already is);
  - run-time conditions, checked per call: q, k, v all finite (SDPA adds a -inf mask to a
    NaN score, which stays NaN; the spec never reads masked-out keys), and for
    ``fully_masked="preserve"`` no row entirely -inf (eager gives NaN there, SDPA 0).
    ``fully_masked="zero"`` *is* SDPA's semantics.

  Its backward is SDPA's fused backward, from the saved output and log-sum-exp.

* **Reference path** — everything else runs ``ops.reference_attention`` in blocks of
  query rows, so that memory stays bounded by ``BLOCK_BYTES`` whatever the length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnfx.predicate import K, Q
from attnfx.spec import AttentionSpec

# Upper bound of one block's float64 score tensor in the reference path.
BLOCK_BYTES = 64 << 20
_HUGE_NEGATIVE = -1e30
# PyTorch's fused CPU attention (what F.scaled_dot_product_attention runs on CPU), called
# directly: its backward takes the saved output and log-sum-exp, as the op's does.
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ---------------------------------------------------------------------------------------
# SDPA path
# ---------------------------------------------------------------------------------------


def _sdpa_plan(spec: AttentionSpec):
    """(scale, mask ops, causal) when the spec's form is one SDPA can run, else None."""
    if spec.activation != "softmax":
        return None
    ops = list(spec.score_ops)
    causal_op = None
    scale = 1.0
    while ops and ops[0].op == "mul":
        scale *= ops.pop(0).value
    masks = []
    for op in ops:
        if op.op in ("add_aux", "add_pos_aux") and spec.aux_dtypes[op.aux] in (
            "float16",
            "bfloat16",
            "float32",
        ):
            masks.append(op)  # a position bias becomes part of the additive mask here
        elif op.op in ("fill_pred", "fill_aux"):
            v = op.value
            if v == -math.inf:
                pass
            elif v <= _HUGE_NEGATIVE and spec.dtype in ("float32", "bfloat16"):
                pass
            else:
                return None
            if op.op == "fill_pred" and op.predicate.expr == (K <= Q) and causal_op is None:
                causal_op = op  # SDPA's is_causal is exactly K <= Q (top-left)
                continue
            masks.append(op)
        else:
            return None
    return scale, masks, causal_op


def _combined_mask(spec, ops, aux, nq, nk, dtype, device):
    """One additive float mask for ``ops`` (broadcast shape), and whether it has a fill
    whose value is finite (those need every row to keep a key)."""
    mask = None
    finite_fill = False
    for op in ops:
        if op.op == "add_aux":
            term = aux[op.aux].to(dtype)
        elif op.op == "add_pos_aux":
            from attnfx.predicate import materialize_expr

            pos = materialize_expr(op.sym, nq, nk, device=device).to(dtype)
            term = aux[op.aux].to(dtype) * pos
        else:
            if op.op == "fill_pred":
                hit = ~op.predicate.materialize(nq, nk, device=device)
            else:
                a = aux[op.aux]
                hit = a.to(torch.bool)
                hit = hit if op.fill_where else ~hit
            finite_fill |= op.value != -math.inf
            term = torch.zeros(hit.shape, dtype=dtype, device=device).masked_fill(
                hit, float("-inf")
            )
        mask = term if mask is None else mask + term
    return mask, finite_fill


def _compact(t: Tensor) -> Tensor:
    """A broadcast (stride-0) view shrunk back to the size-1 dims it was expanded from,
    so that combining masks does not materialize B·H·N²."""
    idx = tuple(
        slice(0, 1) if st == 0 and sz > 1 else slice(None) for sz, st in zip(t.shape, t.stride())
    )
    return t[idx]


def _prepare(q, k, v, aux, spec):
    """SDPA arguments for this call, or None when the SDPA path does not apply to it."""
    plan = _sdpa_plan(spec)
    if plan is None or q.dtype == torch.float64 or spec.out_dtype != spec.dtype:
        return None
    if q.shape[-1] != v.shape[-1] or q.device.type != "cpu":
        return None  # the fused kernel takes one head dim
    scale, ops, causal_op = plan
    for t in (q, k, v):
        # A finite sum proves every element finite (NaN and ±inf do not cancel away);
        # one pass, no N-sized temporary.
        if not torch.isfinite(t.sum(dtype=torch.float64)):
            return None
    nq, nk = q.shape[-2], k.shape[-2]
    aux = [_compact(a) for a in aux]
    mask, finite_fill = _combined_mask(spec, ops, aux, nq, nk, q.dtype, q.device)
    if causal_op is not None and causal_op.value != -math.inf:
        finite_fill = True
    if mask is not None:
        dead = torch.isneginf(mask).all(-1)
        if causal_op is not None:
            # with is_causal, row r also loses keys > r: dead if keys 0..r are all -inf
            dead = dead | _causal_dead(mask)
        if dead.any() and (finite_fill or spec.fully_masked == "preserve"):
            return None
    # (is_causal alone keeps key 0 in every row: no row is dead.)
    return dict(attn_mask=mask, is_causal=causal_op is not None, scale=scale)


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


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The fused kernel's working dtype: float64 for float32 sites (in float32 its
    backward misses the DESIGN §5 gradient bound at the margin: measured 1.6e-6 against
    a bound of 1.5e-6; float64 costs it ~1.5x), float32 for half-precision sites."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def _dense(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, contiguous: the fused kernel, called directly, reads a
    (B, H, N, D) operand whose head dim is not the innermost one wrongly (measured: a
    transposed k, strides (…, 1, N), gives errors of order 1; ``F.sdpa`` copies first)."""
    return t.to(dtype=dtype, memory_format=torch.contiguous_format)


def _flash_args(q, k, v, spec, args):
    acc = _acc(q.dtype)
    kk, vv = _kv(k, v, spec)
    mask = args["attn_mask"]
    if mask is not None:
        nq, nk = q.shape[-2], k.shape[-2]
        mask = _dense(mask.expand(*mask.shape[:-2], nq, nk), acc)
    return acc, _dense(q, acc), _dense(kk, acc), _dense(vv, acc), mask


def _run_forward(q, k, v, spec, args):
    _, qq, kk, vv, mask = _flash_args(q, k, v, spec, args)
    return _FLASH(qq, kk, vv, 0.0, args["is_causal"], attn_mask=mask, scale=args["scale"])


def forward(q, k, v, aux, spec) -> tuple[Tensor, Tensor] | None:
    """The SDPA path's output and float32 log-sum-exp, or None when it does not apply
    to this call (then the caller runs the reference path)."""
    args = _prepare(q, k, v, aux, spec)
    if args is None:
        return None
    out, lse = _run_forward(q, k, v, spec, args)
    return out.to(q.dtype), lse.float()


def backward(dout, q, k, v, aux, spec) -> tuple[Tensor, Tensor, Tensor] | None:
    """SDPA's fused backward (the same run-time conditions as the forward's decide).
    The forward is recomputed in the accumulation dtype: the saved float32 lse and
    rounded output would cost the gradients their accuracy."""
    args = _prepare(q, k, v, aux, spec)
    if args is None:
        return None
    acc, qq, kk, vv, mask = _flash_args(q, k, v, spec, args)
    out, lse = _FLASH(qq, kk, vv, 0.0, args["is_causal"], attn_mask=mask, scale=args["scale"])
    dq, dk, dv = _FLASH_BACKWARD(
        _dense(dout, acc), qq, kk, vv, out, lse, 0.0, args["is_causal"],
        attn_mask=mask, scale=args["scale"],
    )  # fmt: skip
    return dq.to(q.dtype), _fold_group(dk, spec).to(k.dtype), _fold_group(dv, spec).to(v.dtype)


# ---------------------------------------------------------------------------------------
# Reference path, in blocks of query rows
# ---------------------------------------------------------------------------------------


def _row_block(q: Tensor, nk: int) -> int:
    b, h, nq, _ = q.shape
    return max(1, min(nq, BLOCK_BYTES // max(1, b * h * nk * 8)))


def _rows_spec(spec: AttentionSpec, r0: int, nq: int) -> AttentionSpec:
    """The spec of query rows ``r0..`` of an ``nq``-row call: predicates and
    length-dependent scalars still see global indices and lengths."""
    import dataclasses

    import sympy

    from attnfx.predicate import NQ, MaskPredicate

    if r0 == 0 and not any(
        op.op in ("fill_pred", "add_pos_aux") or op.op.endswith("_sym") for op in spec.score_ops
    ):
        return spec

    ops = []
    for op in spec.score_ops:
        if op.op == "fill_pred":
            e = op.predicate.expr.subs({Q: Q + r0, NQ: nq}, simultaneous=True)
            op = dataclasses.replace(op, pred=MaskPredicate(e).to_key())
        elif op.op.endswith("_sym"):
            op = dataclasses.replace(op, expr=sympy.srepr(op.sym.subs({NQ: nq})))
        elif op.op == "add_pos_aux":
            e = op.sym.subs({Q: Q + r0, NQ: nq}, simultaneous=True)
            op = dataclasses.replace(op, expr=sympy.srepr(e))
        ops.append(op)
    return dataclasses.replace(spec, score_ops=tuple(ops))


def _blocks(q: Tensor, k: Tensor, aux: list[Tensor], spec: AttentionSpec):
    """(row slice, aux rows, spec of those rows) per block of query rows."""
    nq = q.shape[-2]
    rb = _row_block(q, k.shape[-2])
    for r0 in range(0, nq, rb):
        rows = slice(r0, min(nq, r0 + rb))
        yield rows, [a[..., rows, :] for a in aux], _rows_spec(spec, r0, nq)


def reference_forward(q, k, v, aux, spec) -> tuple[Tensor, Tensor]:
    """``ops.reference_attention`` in blocks of query rows (bounded memory)."""
    from attnfx.ops import reference_attention

    outs, lses = [], []
    for rows, a, sp in _blocks(q, k, aux, spec):
        o, lse = reference_attention(q[..., rows, :], k, v, a, sp)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def reference_backward(dout, q, k, v, aux, spec) -> tuple[Tensor, Tensor, Tensor]:
    """``ops.reference_attention_backward`` in blocks of query rows: dQ by rows, dK and
    dV summed over the blocks in float64 before the one rounding to the working dtype."""
    from attnfx.ops import reference_gradients

    dqs, dk, dv = [], None, None
    for rows, a, sp in _blocks(q, k, aux, spec):
        gq, gk, gv = reference_gradients(dout[..., rows, :], q[..., rows, :], k, v, a, sp)
        dqs.append(gq.to(q.dtype))
        dk = gk if dk is None else dk + gk
        dv = gv if dv is None else dv + gv
    return torch.cat(dqs, dim=-2), dk.to(k.dtype), dv.to(v.dtype)


def reference_aux_backward(dout, q, k, v, aux, spec, which) -> list[Tensor]:
    """``ops.reference_aux_gradients`` in blocks of query rows."""
    from attnfx.ops import reference_aux_gradients

    parts = [
        reference_aux_gradients(dout[..., rows, :], q[..., rows, :], k, v, a, sp, which)
        for rows, a, sp in _blocks(q, k, aux, spec)
    ]
    return [torch.cat([p[j] for p in parts], dim=-2) for j in range(len(which))]
