"""The op's CPU implementation (attnfx/cpu.py): the fused SDPA path where the spec is one
SDPA expresses exactly, the blocked reference elsewhere; both equal the float64
reference, forward and backward."""

from __future__ import annotations

import math

import pytest
import sympy
import torch

from attnfx import cpu, ops
from attnfx.predicate import NK, NQ, K, MaskPredicate, Q
from attnfx.spec import AttentionSpec, ScoreOp

D = 16
INF = math.inf
CAUSAL = MaskPredicate(sympy.Le(K, Q)).to_key()
CAUSAL_BR = MaskPredicate(sympy.Le(K, Q + NK - NQ)).to_key()
WINDOW = MaskPredicate(sympy.And(sympy.Ge(K, Q - 3), sympy.Le(K, Q + 2))).to_key()
CHUNK = MaskPredicate(sympy.Eq(sympy.floor(Q / 4), sympy.floor(K / 4))).to_key()


def _spec(ops_, aux_dtypes=(), group=1, fm="preserve", dtype="float32"):
    return AttentionSpec(
        score_ops=tuple([ScoreOp("mul", 1 / math.sqrt(D))] + ops_),
        aux_dtypes=tuple(aux_dtypes),
        head_dim=D,
        head_dim_v=D,
        gqa_group=group,
        dtype=dtype,
        out_dtype=dtype,
        fully_masked=fm,
    )


def _inputs(nq=19, nk=23, group=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2 * group, nq, D, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, nk, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def _pad_mask(nq, nk):
    m = torch.zeros(2, 1, 1, nk)
    m[1, ..., nk - 5 :] = -INF
    return m.expand(2, 4, nq, nk)


SDPA_CASES = {
    "plain": (lambda nq, nk: ([], [])),
    "causal": (lambda nq, nk: ([ScoreOp("fill_pred", value=-INF, pred=CAUSAL)], [])),
    "causal finfo.min": (
        lambda nq, nk: (
            [ScoreOp("fill_pred", value=torch.finfo(torch.float32).min, pred=CAUSAL)],
            [],
        )
    ),
    "window": (lambda nq, nk: ([ScoreOp("fill_pred", value=-INF, pred=WINDOW)], [])),
    "additive + causal": (
        lambda nq, nk: (
            [ScoreOp("add_aux", aux=0), ScoreOp("fill_pred", value=-INF, pred=CAUSAL)],
            [_pad_mask(nq, nk)],
        )
    ),
    "bool padding": (
        lambda nq, nk: (
            [ScoreOp("fill_aux", value=-INF, aux=0, fill_where=False)],
            [(_pad_mask(nq, nk) == 0)],
        )
    ),
}


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("name", SDPA_CASES)
def test_sdpa_path_equals_reference(name, group):
    nq, nk = 23, 23
    q, k, v = _inputs(nq, nk, group=group)
    score_ops, aux = SDPA_CASES[name](nq, nk)
    aux = [a[:, :1].expand(2, 2 * group, nq, nk) for a in aux]
    dtypes = [ops.dtype_name(a.dtype) for a in aux]
    spec = _spec(score_ops, dtypes, group=group)
    got = cpu.forward(q, k, v, aux, spec)
    assert got is not None, "the fused path must take this spec"
    ref, _ = ops.reference_attention(q, k, v, aux, spec)
    torch.testing.assert_close(got[0], ref, rtol=1e-6, atol=1e-6)
    dout = torch.randn_like(ref)
    grads = cpu.backward(dout, q, k, v, aux, spec)
    for g, r in zip(grads, ops.reference_attention_backward(dout, q, k, v, aux, spec)):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_sdpa_path_declines_what_it_would_compute_differently():
    q, k, v = _inputs()
    causal = [ScoreOp("fill_pred", value=-INF, pred=CAUSAL)]
    # a transcendental score op, a per-row multiplier: not SDPA's form
    assert cpu.forward(q, k, v, [], _spec([ScoreOp("tanh")])) is None
    # NaN in a key: SDPA would add -inf to a NaN score; the spec never reads masked keys
    k_nan = k.clone()
    k_nan[0, 0, -1] = math.nan
    assert cpu.forward(q, k_nan, v, [], _spec(causal)) is None
    # an all -inf row under "preserve": eager gives NaN, SDPA 0
    m = torch.zeros(1, 1, 19, 23)
    m[..., 4, :] = -INF
    aux = [m.expand(2, 2, 19, 23)]
    assert cpu.forward(q, k, v, aux, _spec([ScoreOp("add_aux", aux=0)], ["float32"])) is None
    zero = _spec([ScoreOp("add_aux", aux=0)], ["float32"], fm="zero")
    assert cpu.forward(q, k, v, aux, zero) is not None  # SDPA's own semantics
    # a huge finite fill where a row is empty: eager averages uniformly there
    bottom_right = [ScoreOp("fill_pred", value=-3e38, pred=CAUSAL_BR)]
    qq = torch.randn(2, 2, 23, D)
    assert cpu.forward(qq, k[:, :, :19], v[:, :, :19], [], _spec(bottom_right)) is None


def test_op_falls_back_to_reference_semantics():
    """Through the op: the declined calls still compute the spec (NaN row kept)."""
    q, k, v = _inputs()
    m = torch.zeros(1, 1, 19, 23)
    m[..., 4, :] = -INF
    aux = [m.expand(2, 2, 19, 23)]
    spec = _spec([ScoreOp("add_aux", aux=0)], ["float32"])
    out, _ = ops.attention_op(q, k, v, aux, spec.key)
    assert out[:, :, 4].isnan().all() and not out[:, :, :4].isnan().any()


BLOCKED_CASES = {
    "causal": [ScoreOp("fill_pred", value=-INF, pred=CAUSAL)],
    "bottom-right causal": [ScoreOp("fill_pred", value=-INF, pred=CAUSAL_BR)],
    "window tanh": [ScoreOp("tanh"), ScoreOp("fill_pred", value=-INF, pred=WINDOW)],
    "chunks": [ScoreOp("fill_pred", value=-INF, pred=CHUNK)],
    "log n scale": [ScoreOp("mul_sym", expr=sympy.srepr(sympy.log(NQ) / 3))],
}


@pytest.mark.parametrize("name", BLOCKED_CASES)
def test_blocked_reference_equals_full(name, monkeypatch):
    """Blocks of query rows see global row indices and lengths (a predicate or a scale
    that depends on Q or NQ would be wrong in every block but the first)."""
    nq, nk = 29, 31
    q, k, v = _inputs(nq, nk)
    spec = _spec(BLOCKED_CASES[name])
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 2 * 2 * nk * 8 * 5)  # 5 rows per block
    assert cpu._row_block(q, nk) == 5
    out, lse = cpu.reference_forward(q, k, v, [], spec)
    ref, ref_lse = ops.reference_attention(q, k, v, [], spec)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    dout = torch.randn_like(ref)
    got = cpu.reference_backward(dout, q, k, v, [], spec)
    for g, r in zip(got, ops.reference_attention_backward(dout, q, k, v, [], spec)):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nq,nk", [(19, 31), (31, 19)])
def test_sdpa_path_causal_unequal_lengths(nq, nk):
    """``K <= Q`` with NQ != NK is top-left aligned: the fused kernel's is_causal must
    agree (rows past NK keep every key; no row is empty)."""
    q, k, v = _inputs(nq, nk)
    spec = _spec([ScoreOp("fill_pred", value=-INF, pred=CAUSAL)])
    got = cpu.forward(q, k, v, [], spec)
    assert got is not None
    ref, _ = ops.reference_attention(q, k, v, [], spec)
    torch.testing.assert_close(got[0], ref, rtol=1e-6, atol=1e-6)
    dout = torch.randn_like(ref)
    for g, r in zip(
        cpu.backward(dout, q, k, v, [], spec),
        ops.reference_attention_backward(dout, q, k, v, [], spec),
    ):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_sdpa_path_any_strides():
    """A transposed k (head dim not innermost), a (B, N, H, D) v and a per-query mask:
    the fused kernel reads such operands wrongly when called directly, so they are made
    dense first."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 12, D, generator=g)
    k = torch.randn(2, 2, D, 12, generator=g).transpose(-2, -1)
    v = torch.randn(2, 12, 2, D, generator=g).transpose(1, 2)
    rowmask = torch.zeros(2, 1, 12, 1)
    rowmask[0, ..., 3, :] = -2.0
    aux = [rowmask.expand(2, 2, 12, 12)]
    spec = _spec(
        [ScoreOp("add_aux", aux=0), ScoreOp("fill_pred", value=-INF, pred=CAUSAL)], ["float32"]
    )
    got = cpu.forward(q, k, v, aux, spec)
    assert got is not None
    ref, _ = ops.reference_attention(q, k, v, aux, spec)
    torch.testing.assert_close(got[0], ref, rtol=1e-6, atol=1e-6)
    dout = torch.randn(2, 12, 2, D, generator=g).transpose(1, 2)
    for a, r in zip(
        cpu.backward(dout, q, k, v, aux, spec),
        ops.reference_attention_backward(dout, q, k, v, aux, spec),
    ):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
