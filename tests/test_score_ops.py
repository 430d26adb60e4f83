"""The score-op table and the activations (``attnfx.score_ops``, ``attnfx.activation``):
each entry's torch reference, derivative, aux gradient, fill and saturation claims and
Triton line agree with each other and with autograd.  A new entry needs a sample here."""

from __future__ import annotations

import math

import pytest
import sympy
import torch

from attnfx.activation import ACTIVATIONS
from attnfx.codegen.emit import score_program
from attnfx.codegen.plan import make_plan
from attnfx.predicate import NK, K, MaskPredicate, Q
from attnfx.score_ops import TABLE, TorchEnv, run
from attnfx.spec import AttentionSpec, ScoreOp

NQ_, NK_ = 5, 7
CAUSAL = MaskPredicate(K <= Q).to_key()

# One op per entry; aux 0 is a float tensor, aux 1 a bool mask, aux 2 a bias table.
SAMPLES = {
    "mul": ScoreOp("mul", 0.5),
    "add": ScoreOp("add", -1.5),
    "mul_aux": ScoreOp("mul_aux", aux=0),
    "add_aux": ScoreOp("add_aux", aux=0),
    "fill_aux": ScoreOp("fill_aux", -math.inf, aux=1, fill_where=False),
    "fill_pred": ScoreOp("fill_pred", -1e30, pred=CAUSAL),
    "tanh": ScoreOp("tanh"),
    "add_sym": ScoreOp("add_sym", expr=sympy.srepr(-sympy.log(NK))),
    "mul_sym": ScoreOp("mul_sym", expr=sympy.srepr(sympy.log(NK))),
    "add_pos_aux": ScoreOp("add_pos_aux", aux=0, expr=sympy.srepr(K - Q)),
    "add_table_aux": ScoreOp(
        "add_table_aux", aux=2, expr=sympy.srepr(sympy.Min(8, sympy.Max(0, K - Q + 4)))
    ),
}
TABLE_SIZE = 9


def _aux():
    g = torch.Generator().manual_seed(3)
    return [
        torch.randn(2, 1, NQ_, NK_, generator=g, dtype=torch.float64),
        torch.rand(2, 1, NQ_, NK_, generator=g) > 0.3,
        torch.randn(2, 1, 1, TABLE_SIZE, generator=g, dtype=torch.float64),
    ]


def _scores():
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 1, NQ_, NK_, generator=g, dtype=torch.float64)


def test_every_entry_has_a_sample():
    assert set(SAMPLES) == set(TABLE)
    for name, op in SAMPLES.items():
        assert op.entry is TABLE[name] and op.describe()


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_in_place_and_out_of_place_agree(name):
    op, aux, s = SAMPLES[name], _aux(), _scores()
    out, hit = op.entry.apply(s, op, TorchEnv(aux, NQ_, NK_))
    assert torch.equal(s, _scores())  # not modified
    s2 = _scores()
    out2, hit2 = op.entry.apply(s2, op, TorchEnv(aux, NQ_, NK_, inplace=True))
    assert out2.data_ptr() == s2.data_ptr()
    torch.testing.assert_close(out, out2, rtol=0, atol=0, equal_nan=True)
    assert (hit is None) == (hit2 is None) == (op.entry.form != "fill")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_derivative_and_aux_gradient_match_autograd(name):
    op = SAMPLES[name]
    aux = _aux()
    i = op.aux if op.aux is not None and aux[op.aux].is_floating_point() else 0
    a = aux[i].clone().requires_grad_(True)
    aux[i] = a
    s = _scores().requires_grad_(True)
    env = TorchEnv(aux, NQ_, NK_)
    out, hit = op.entry.apply(s, op, env)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    kept = torch.ones_like(out, dtype=torch.bool) if hit is None else ~hit
    ds, da = torch.autograd.grad(out, (s, a), g, allow_unused=True)
    with torch.no_grad():
        f = op.entry.derivative(out, op, env)
        want = g if f is None else g * f
        torch.testing.assert_close(torch.where(kept, want, 0.0), torch.where(kept, ds, 0.0))
        ga = op.entry.aux_grad(g, s, op, env)
    if op.aux is not None and op.entry.form != "fill":
        assert ga is not None
        if op.entry.operand == "table":  # summed into the entries each pair reads
            assert ga.shape == a.shape
            torch.testing.assert_close(ga, da)
        else:
            torch.testing.assert_close(ga.expand_as(g).sum(1, keepdim=True), da)
    else:
        assert ga is None


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("fill", [-math.inf, -1e30])
def test_preserved_fills_stay_below_the_fill(name, fill):
    op = SAMPLES[name]
    if not op.entry.preserves_fill(op, fill):
        return
    s = torch.full((2, 1, NQ_, NK_), fill, dtype=torch.float64)
    out, _ = op.entry.apply(s, op, TorchEnv(_aux(), NQ_, NK_))
    assert bool((out <= fill).all())


def test_saturation_claims():
    assert TABLE["add_aux"].may_saturate(SAMPLES["add_aux"])
    assert not TABLE["add"].may_saturate(SAMPLES["add"])
    assert TABLE["fill_pred"].may_saturate(SAMPLES["fill_pred"])  # a finite -1e30 fill
    assert not TABLE["tanh"].may_saturate(SAMPLES["tanh"])


def test_run_is_the_ops_in_order():
    ops = [SAMPLES[n] for n in ("mul", "tanh", "add_aux", "fill_pred", "mul_sym")]
    aux, s = _aux(), _scores()
    env = TorchEnv(aux, NQ_, NK_)
    out, hit, d = run(s, ops, env, with_grad=True)
    want, f = s, 1.0
    for op in ops:
        want, _ = op.entry.apply(want, op, env)
        local = op.entry.derivative(want, op, env)
        f = f if local is None else f * local
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(d, f)
    assert torch.equal(hit, ~MaskPredicate(K <= Q).materialize(NQ_, NK_))


@pytest.mark.parametrize("name", sorted(set(SAMPLES) - {"add_sym", "mul_sym"}))
def test_every_kernel_op_has_a_triton_line(name):
    op = SAMPLES[name]
    spec = AttentionSpec(
        score_ops=(ScoreOp("mul", 0.125), op),
        aux_dtypes=("float32", "bool", "float32"),
        head_dim=32,
    )
    plan = make_plan(spec)
    # (absolute indices: the forward's tile-relative coordinates add their definitions)
    fwd = score_program(spec, plan, orient="mn", s="s", relative=False)
    bwd = score_program(spec, plan, orient="nm", s="sT", grad="fT", keep="keepT")
    assert len(fwd) > 1 and len(bwd) > len(fwd) - 1
    # a derivative factor exists on every path
    assert any(ln.startswith("fT = ") for ln in bwd)


@pytest.mark.parametrize("name", ["add_sym", "mul_sym"])
def test_symbolic_ops_are_lowered_before_codegen(name):
    op = SAMPLES[name]
    assert op.entry.aux_form in TABLE and op.entry.constant_form in TABLE
    with pytest.raises(NotImplementedError):
        op.entry.triton(op, None)


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_ds_matches_autograd(name):
    act = ACTIVATIONS[name]
    s = _scores().requires_grad_(True)
    p, _ = act.probabilities(s, None, zero=False)
    dp = torch.randn(p.shape, generator=torch.Generator().manual_seed(6), dtype=p.dtype)
    (want,) = torch.autograd.grad(p, s, dp)
    with torch.no_grad():
        torch.testing.assert_close(act.ds(p, dp), want)
        torch.testing.assert_close(act.ds_(p.clone(), dp.clone()), want)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_empty_rows(name):
    act = ACTIVATIONS[name]
    s = _scores()
    s[..., 1, :] = -math.inf
    p, _ = act.probabilities(s, None, zero=True)
    assert bool((p[..., 1, :] == 0).all())
    assert act.skip_fill(-math.inf)[0]
    assert not act.skip_fill(0.0)[0]


def test_softmax_sink_joins_the_normalizer():
    act = ACTIVATIONS["softmax"]
    s = _scores()
    sink = torch.full((*s.shape[:-1], 1), 0.5, dtype=s.dtype)
    p, lse = act.probabilities(s, sink, zero=False)
    full = torch.cat([s, sink], -1)
    torch.testing.assert_close(lse, torch.logsumexp(full, -1))
    torch.testing.assert_close(p.sum(-1) + torch.exp(0.5 - lse), torch.ones_like(lse))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_kernel_pieces(name):
    act = ACTIVATIONS[name]
    assert act.update_lines(True, "", "(offs_n[None, :] < N_K)")
    assert act.epilogue_lines(True, zero=True)
    assert act.preprocess_lines("o_load", "do_load", True)
    assert act.p_lines("p", "s", "[:, None]", True, False)
    assert "dp" in act.ds_expr("p", "dp", "f", "[:, None]")
