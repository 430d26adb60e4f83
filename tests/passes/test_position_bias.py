"""Position biases built with ``arange`` (ALiBi: a per-head slope times ``k − q``; also
``−|k − q|`` and a per-key ramp times a learnable slope) are read back as one symbolic
score op (``add_pos_aux``): no N×N bias tensor reaches the op.  Forward and gradients
(learnable slopes included) equal eager, on the CPU path and through the generated
kernels."""

from __future__ import annotations

import math

import pytest
import sympy
import torch
import torch.nn as nn

import attnfx
from attnfx import ops
from attnfx.predicate import K, MaskPredicate, Q
from attnfx.spec import AttentionSpec, ScoreOp
from attnfx.testing import assert_rewrites_match_eager

B, H, N, D = 2, 4, 19, 32


def _slopes():
    return torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)])


class Alibi(nn.Module):
    """BLOOM / MPT / x-transformers style: slopes[:, None, None] * (k_pos − q_pos)."""

    def __init__(self, form="rel", learnable=False, causal=True):
        super().__init__()
        slopes = _slopes()
        if learnable:
            self.slopes = nn.Parameter(slopes)
        else:
            self.register_buffer("slopes", slopes)
        self.form, self.causal = form, causal

    def forward(self, q, k, v):
        n = q.shape[-2]
        pos = torch.arange(n, device=q.device)
        if self.form == "rel":
            term = pos[None, :] - pos[:, None]
        else:  # symmetric: −|k − q|
            term = -(pos[None, :] - pos[:, None]).abs()
        bias = self.slopes[:, None, None] * term[None]
        s = q @ k.transpose(-2, -1) / math.sqrt(D) + bias
        if self.causal:
            keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def _spec_ops(m, q, k, v):
    rep = attnfx.explain(m, q, k, v)
    (site,) = rep.rewritten
    return site.spec


@pytest.mark.parametrize("form", ["rel", "abs"])
@pytest.mark.parametrize("causal", [True, False])
def test_alibi_is_one_symbolic_op(form, causal):
    m = Alibi(form, causal=causal)
    spec = _spec_ops(m, *_qkv())
    pos = [op for op in spec.score_ops if op.op == "add_pos_aux"]
    assert len(pos) == 1 and not any(op.op == "add_aux" for op in spec.score_ops), spec
    want = K - Q if form == "rel" else -sympy.Abs(K - Q)
    assert sympy.simplify(pos[0].sym - want) == 0, pos[0].sym
    if causal:
        assert spec.mask_class.kind == "causal"  # blocks still skipped
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, _qkv(), grad=True)


def test_learnable_slopes_get_their_gradient():
    assert_rewrites_match_eager(Alibi(learnable=True), _qkv(), grad=True, params=True)


def test_position_bias_through_the_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    assert_rewrites_match_eager(Alibi("abs", learnable=True), _qkv(), grad=True, params=True)


@pytest.mark.parametrize("interpret", [False, True], ids=["cpu", "kernel"])
def test_op_position_bias_matches_materialized_bias(interpret, monkeypatch, tmp_path):
    """The op with ``add_pos_aux`` against the same scores with the bias materialized as
    an ``add_aux`` tensor, forward and backward, at lengths off the block size."""
    if interpret:
        monkeypatch.setenv("ATTNFX_INTERPRET", "1")
        monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    nq, nk = 21, 29
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, nq, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, H, nk, D, generator=g, requires_grad=True) for _ in range(2))
    slope = _slopes().view(1, H, 1, 1)
    causal = MaskPredicate(sympy.Le(K, Q + nk - nq)).to_key()
    base = dict(head_dim=D, head_dim_v=D, dtype="float32", out_dtype="float32")
    sym = AttentionSpec(
        score_ops=(
            ScoreOp("mul", D**-0.5),
            ScoreOp("add_pos_aux", aux=0, expr=sympy.srepr(K - Q)),
            ScoreOp("fill_pred", value=-math.inf, pred=causal),
        ),
        aux_dtypes=("float32",),
        **base,
    )
    dense = AttentionSpec(
        score_ops=(
            ScoreOp("mul", D**-0.5),
            ScoreOp("add_aux", aux=0),
            ScoreOp("fill_pred", value=-math.inf, pred=causal),
        ),
        aux_dtypes=("float32",),
        **base,
    )
    rel = (torch.arange(nk)[None, :] - torch.arange(nq)[:, None]).float()
    out = ops.attention(q, k, v, sym, [slope])
    ref = ops.attention(q, k, v, dense, [slope * rel])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    cot = torch.randn(out.shape, generator=g)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bias_varying_along_keys_without_index_arithmetic_stays_a_tensor():
    class TableBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.randn(H, N, N))

        def forward(self, q, k, v):
            s = q @ k.transpose(-2, -1) / math.sqrt(D) + self.table
            return s.softmax(-1) @ v

    spec = _spec_ops(TableBias(), *_qkv())
    assert [op.op for op in spec.score_ops].count("add_aux") == 1
