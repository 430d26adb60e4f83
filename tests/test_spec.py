import math

import pytest
import sympy
import torch

from attnfx.codegen.printer import index_expr
from attnfx.predicate import NK, NQ, K, MaskPredicate, Q
from attnfx.spec import AttentionSpec, ScoreOp


def _spec(**kw):
    base = dict(
        score_ops=(
            ScoreOp("mul", 0.125),
            ScoreOp("fill_pred", value=float("-inf"), pred=MaskPredicate(K <= Q).to_key()),
            ScoreOp("add_sym", expr=sympy.srepr(-sympy.log(NK))),
        ),
        head_dim=64,
        head_dim_v=32,
        gqa_group=4,
        dtype="float16",
        out_dtype="float16",
    )
    base.update(kw)
    return AttentionSpec(**base)


def test_key_round_trip_and_hash():
    s = _spec()
    s2 = AttentionSpec.from_key(s.key)
    assert s2 == s and hash(s2) == hash(s)
    assert isinstance(s.key, str)
    assert _spec(gqa_group=2).key != s.key


def test_summaries():
    s = _spec()
    assert s.scale == 0.125
    assert s.mask_class.kind == "causal"
    assert "log(NK)" in s.describe()
    assert s.score_ops[2].value_at(8, 16) == pytest.approx(-math.log(16))
    d = s.to_dict()
    assert d["mask"] == "causal" and d["scale"] == 0.125


@pytest.mark.parametrize(
    "bad",
    [
        dict(activation="relu"),
        dict(dtype="int8"),
        dict(fully_masked="nan"),
        dict(out_layout="nhbd"),
        dict(gqa_group=0),
        dict(score_ops=(ScoreOp("add_aux", aux=0),)),  # no aux dtypes declared
    ],
)
def test_invalid_specs_raise(bad):
    with pytest.raises(ValueError):
        _spec(**bad)


def test_invalid_score_ops_raise():
    with pytest.raises(ValueError):
        ScoreOp("pow", 2.0)
    with pytest.raises(ValueError):
        ScoreOp("fill_pred", value=0.0)
    with pytest.raises(ValueError):
        ScoreOp("add_sym")


@pytest.mark.parametrize(
    "expr,kind,left,right",
    [
        (sympy.true, "none", None, None),
        (K <= Q, "causal", None, 0),
        (K < Q + NK - NQ + 1, "causal", None, NK - NQ),
        (sympy.And(K <= Q, K > Q - 4), "window", 3, 0),
        (sympy.And(K >= Q - 2, K <= Q + 5), "window", 2, 5),
        (sympy.Eq(K % 2, 0), "predicate", None, None),
    ],
)
def test_predicate_classification(expr, kind, left, right):
    c = MaskPredicate(expr).mask_class
    assert c.kind == kind
    if kind in ("causal", "window"):
        assert sympy.simplify(c.right - right) == 0
    if kind == "window":
        assert sympy.simplify(c.left - left) == 0


@pytest.mark.parametrize(
    "expr",
    [
        K <= Q,
        K < Q + NK - NQ + 1,
        sympy.And(K <= Q, K > Q - 3),
        sympy.Eq(K % 3, Q % 3),
        sympy.Eq(sympy.floor(K / 4), sympy.floor(Q / 4)),
        sympy.Or(K <= 1, sympy.Abs(K - Q) <= 1),
    ],
)
def test_predicate_materialize_matches_eager_and_round_trips(expr):
    nq, nk = 7, 9
    p = MaskPredicate.from_key(MaskPredicate(expr).to_key())
    got = p.materialize(nq, nk)
    q = torch.arange(nq)[:, None]
    k = torch.arange(nk)[None, :]
    want = torch.tensor(
        [[bool(expr.subs({Q: i, K: j, NQ: nq, NK: nk})) for j in range(nk)] for i in range(nq)]
    )
    assert torch.equal(got, want)
    del q, k
    text = index_expr(p.expr)
    assert "offs_m" in text or "offs_n" in text
