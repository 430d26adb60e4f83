"""The op's CPU implementation (attnfx/cpu.py): the fused SDPA path where the spec is one
SDPA expresses exactly, the blocked float32 path elsewhere; both equal the float64
reference to float32 rounding, forward and backward."""

from __future__ import annotations

import dataclasses
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


TOL = dict(rtol=1e-5, atol=1e-5)  # float32 arithmetic against the float64 reference
# The fused backward recomputes probabilities with a ~20-bit exp.
FUSED_TOL = dict(rtol=1e-4, atol=1e-4)


def _backward(dout, q, k, v, aux, spec):
    """What the op runs: the fused backward where it applies, else the blocked one."""
    got = cpu.backward(dout, q, k, v, aux, spec)
    return got if got is not None else cpu.reference_backward(dout, q, k, v, aux, spec)


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


@pytest.mark.parametrize("fm", ["preserve", "zero"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("name", SDPA_CASES)
def test_sdpa_path_equals_reference(name, group, fm):
    nq, nk = 23, 23
    q, k, v = _inputs(nq, nk, group=group)
    score_ops, aux = SDPA_CASES[name](nq, nk)
    aux = [a[:, :1].expand(2, 2 * group, nq, nk) for a in aux]
    dtypes = [ops.dtype_name(a.dtype) for a in aux]
    spec = _spec(score_ops, dtypes, group=group, fm=fm)
    got = cpu.forward(q, k, v, aux, spec)
    assert got is not None, "the fused path must take this spec"
    ref, _ = ops.reference_attention(q, k, v, aux, spec)
    torch.testing.assert_close(got[0], ref, **TOL)
    dout = torch.randn_like(ref)
    # the fused backward only for SDPA's own semantics (sites written as SDPA)
    assert (cpu.backward(dout, q, k, v, aux, spec) is not None) == (fm == "zero")
    grads = _backward(dout, q, k, v, aux, spec)
    for g, r in zip(grads, ops.reference_attention_backward(dout, q, k, v, aux, spec)):
        torch.testing.assert_close(g, r, **(FUSED_TOL if fm == "zero" else TOL))


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
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 2 * 2 * nk * 4 * 5)  # 5 rows per block
    monkeypatch.setattr(cpu, "_MIN_ROWS", 1)
    assert cpu._row_block(q, nk) == 5
    out, lse = cpu.reference_forward(q, k, v, [], spec)
    ref, ref_lse = ops.reference_attention(q, k, v, [], spec)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    dout = torch.randn_like(ref)
    got = cpu.reference_backward(dout, q, k, v, [], spec)
    for g, r in zip(got, ops.reference_attention_backward(dout, q, k, v, [], spec)):
        torch.testing.assert_close(g, r, **TOL)


@pytest.mark.parametrize("nq,nk", [(19, 31), (31, 19)])
def test_sdpa_path_causal_unequal_lengths(nq, nk):
    """``K <= Q`` with NQ != NK is top-left aligned: the fused kernel's is_causal must
    agree (rows past NK keep every key; no row is empty)."""
    q, k, v = _inputs(nq, nk)
    spec = _spec([ScoreOp("fill_pred", value=-INF, pred=CAUSAL)])
    got = cpu.forward(q, k, v, [], spec)
    assert got is not None
    ref, _ = ops.reference_attention(q, k, v, [], spec)
    torch.testing.assert_close(got[0], ref, **TOL)
    dout = torch.randn_like(ref)
    for g, r in zip(
        _backward(dout, q, k, v, [], spec),
        ops.reference_attention_backward(dout, q, k, v, [], spec),
    ):
        torch.testing.assert_close(g, r, **TOL)


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
    torch.testing.assert_close(got[0], ref, **TOL)
    dout = torch.randn(2, 12, 2, D, generator=g).transpose(1, 2)
    for a, r in zip(
        _backward(dout, q, k, v, aux, spec),
        ops.reference_attention_backward(dout, q, k, v, aux, spec),
    ):
        torch.testing.assert_close(a, r, **TOL)


def test_per_query_temperature_takes_the_fused_path():
    """A leading ``mul_aux`` constant along keys (and a ``mul_sym``) is moved onto q /
    the scale: ``(q·kᵀ)·τ = (q·τ)·kᵀ``; a full-size multiplier is not, nor a float32
    site's (q·τ rounded to float32 errs up to 4x eager's order)."""
    nq, nk = 21, 21
    q, k, v = _inputs(nq, nk, dtype=torch.bfloat16)
    tau = (torch.rand(2, 2, nq, 1) + 0.5).expand(2, 2, nq, nk)
    ops_ = [
        ScoreOp("mul_aux", aux=0),
        ScoreOp("mul_sym", expr=sympy.srepr(sympy.log(NK))),
        ScoreOp("fill_pred", value=-INF, pred=CAUSAL),
    ]
    spec = _spec(ops_, ["float32"], fm="zero", dtype="bfloat16")
    got = cpu.forward(q, k, v, [tau], spec)
    assert got is not None
    ref, _ = ops.reference_attention(q, k, v, [tau], spec)
    bf16 = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[0], ref, **bf16)
    dout = torch.randn_like(ref)
    grads = cpu.backward(dout, q, k, v, [tau], spec)
    assert grads is not None
    for g, r in zip(grads, ops.reference_attention_backward(dout, q, k, v, [tau], spec)):
        torch.testing.assert_close(g, r, **bf16)
    full = torch.rand(2, 2, nq, nk) + 0.5
    assert cpu.forward(q, k, v, [full], spec) is None
    f32 = _spec(ops_, ["float32"], fm="zero")
    assert cpu.forward(*(t.float() for t in (q, k, v)), [tau], f32) is None
    assert not cpu.profitable(f32, needs_grad=False)


BLOCKED_FORMS = {
    "sigmoid": dict(act="sigmoid", ops=[ScoreOp("add", value=-math.log(31))]),
    "sigmoid causal": dict(act="sigmoid", ops=[ScoreOp("fill_pred", value=-INF, pred=CAUSAL)]),
    "softcap causal": dict(
        ops=[
            ScoreOp("mul", value=1 / 30),
            ScoreOp("tanh"),
            ScoreOp("mul", value=30.0),
            ScoreOp("fill_pred", value=-INF, pred=CAUSAL),
        ]
    ),
    "finite fill": dict(ops=[ScoreOp("fill_pred", value=-1e4, pred=WINDOW)]),
    "temperature after a bias": dict(
        ops=[ScoreOp("add_aux", aux=0), ScoreOp("mul_aux", aux=1)], aux=True
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", BLOCKED_FORMS)
def test_blocked_float32_path(name, dtype, monkeypatch):
    """Forms SDPA cannot express run the blocked float32 path (several blocks here, with
    keys skipped under the causal fill) and equal the float64 reference."""
    monkeypatch.setattr(cpu, "_MIN_ROWS", 4)
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 2 * 2 * 31 * 4 * 4)
    nq, nk = 29, 31
    q, k, v = _inputs(nq, nk, dtype=dtype)
    form = BLOCKED_FORMS[name]
    aux = []
    if form.get("aux"):
        aux = [torch.randn(1, 1, nq, nk).expand(2, 2, nq, nk), torch.rand(2, 2, nq, 1) + 0.5]
        aux[1] = aux[1].expand(2, 2, nq, nk)
    spec = dataclasses.replace(
        _spec(form["ops"], ["float32"] * len(aux), dtype=ops.dtype_name(dtype)),
        activation=form.get("act", "softmax"),
    )
    assert cpu.forward(q, k, v, aux, spec) is None
    tol = TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    out, lse = cpu.reference_forward(q, k, v, aux, spec)
    ref, ref_lse = ops.reference_attention(q, k, v, aux, spec)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    dout = torch.randn(ref.shape).to(dtype)
    got = cpu.reference_backward(dout, q, k, v, aux, spec)
    for g, r in zip(got, ops.reference_attention_backward(dout, q, k, v, aux, spec)):
        torch.testing.assert_close(g, r, **tol)


def test_blocked_key_skipping_keeps_nan_rows():
    """A NaN query row reaches every key's dV in eager: a block that skips keys under a
    causal fill redoes itself with every key when one of its rows is NaN."""
    nq = nk = 40
    q, k, v = _inputs(nq, nk)
    q[0, 0, 3, 0] = math.nan
    spec = dataclasses.replace(
        _spec([ScoreOp("fill_pred", value=-INF, pred=CAUSAL)]), activation="sigmoid"
    )
    dout = torch.randn(2, 2, nq, D)
    got = cpu.reference_backward(dout, q, k, v, [], spec)
    ref = ops.reference_attention_backward(dout, q, k, v, [], spec)
    for g, r in zip(got, ref):
        assert torch.equal(g.isnan(), r.isnan())
        torch.testing.assert_close(g.nan_to_num(), r.nan_to_num(), **TOL)


class _Dtypes(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.add(t.dtype)
        return out


@pytest.mark.parametrize(
    "name", ["causal", "sigmoid", "softcap", "temperature", "temperature after a bias"]
)
def test_no_float64_on_the_op_path(name):
    """The op's CPU path computes in float32 (float64 is the tests' gold only)."""
    nq = nk = 24
    q, k, v = (t.requires_grad_() for t in _inputs(nq, nk))
    aux, act, fm = [], "softmax", "preserve"
    if name == "causal":
        score_ops = [ScoreOp("fill_pred", value=-INF, pred=CAUSAL)]
    elif name == "sigmoid":
        score_ops, act = [ScoreOp("add", value=-math.log(nk))], "sigmoid"
    elif name == "softcap":
        score_ops = [ScoreOp("mul", value=0.1), ScoreOp("tanh"), ScoreOp("mul", value=10.0)]
    elif name == "temperature":
        score_ops, fm = [ScoreOp("mul_aux", aux=0)], "zero"
        aux = [(torch.rand(2, 2, nq, 1) + 0.5).expand(2, 2, nq, nk)]
    else:
        score_ops = [ScoreOp("add_aux", aux=0), ScoreOp("mul_aux", aux=1)]
        aux = [
            torch.randn(nq, nk).expand(2, 2, nq, nk),
            torch.rand(2, 2, nq, 1).expand(2, 2, nq, nk),
        ]
    spec = dataclasses.replace(_spec(score_ops, ["float32"] * len(aux), fm=fm), activation=act)
    mode = _Dtypes()
    with mode:
        out, _ = ops.attention_op(q, k, v, aux, spec.key)
    assert torch.float64 not in mode.seen, mode.seen
    grad_mode = _Dtypes()
    with grad_mode:
        out.sum().backward()
    if fm == "zero":  # SDPA's fused backward; the blocked one is float64 for fp32 sites
        assert torch.float64 not in grad_mode.seen, grad_mode.seen
    ref, _ = ops.reference_attention(q.detach(), k.detach(), v.detach(), aux, spec)
    torch.testing.assert_close(out.detach(), ref, **TOL)


@pytest.mark.parametrize("nq,nk", [(29, 31), (31, 29)])
def test_blocked_key_skipping_under_a_finite_fill(nq, nk, monkeypatch):
    """``finfo.min`` fills (GPT-2, LLaMA eager) skip keys like -inf ones, except in a
    block with a row that keeps no key: eager averages that row over every key."""
    monkeypatch.setattr(cpu, "_MIN_ROWS", 4)
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 2 * 2 * 31 * 4 * 4)
    q, k, v = _inputs(nq, nk)
    lo = torch.finfo(torch.float32).min
    spec = _spec([ScoreOp("fill_pred", value=lo, pred=CAUSAL_BR), ScoreOp("mul", value=0.5)])
    assert cpu._key_limit_ops(spec)
    out, _ = cpu.reference_forward(q, k, v, [], spec)
    ref, _ = ops.reference_attention(q, k, v, [], spec)
    torch.testing.assert_close(out, ref, **TOL)
    dout = torch.randn_like(ref)
    got = cpu.reference_backward(dout, q, k, v, [], spec)
    for g, r in zip(got, ops.reference_attention_backward(dout, q, k, v, [], spec)):
        torch.testing.assert_close(g, r, **TOL)
    # a tensor before a finite fill: no skipping
    bias = _spec(
        [ScoreOp("add_aux", aux=0), ScoreOp("fill_pred", value=lo, pred=CAUSAL)], ["float32"]
    )
    assert not cpu._key_limit_ops(bias)


@pytest.mark.parametrize("name", ["plain", "causal", "tanh cap"])
def test_float32_scores_that_may_overflow_run_in_float64(name):
    """|q|·|k|·D beyond float32's range: a float32 q·kᵀ overflows where eager's product of
    the same values (another summation order, or a scale applied to q first) may not; the
    CPU paths compute such a call in float64, so its output is the float64 reference's."""
    ops_ = {
        "plain": [],
        "causal": [ScoreOp("fill_pred", value=-INF, pred=CAUSAL)],
        "tanh cap": [ScoreOp("mul", 0.2), ScoreOp("tanh"), ScoreOp("mul", 5.0)],
    }[name]
    spec = _spec(ops_)
    q, k, v = _inputs(nq=5, nk=5)
    q, k = q * 1e18, k * 1e18  # scores within float32's range, their bound beyond it
    assert cpu._may_overflow(q, k) and not cpu._may_overflow(q / 1e18, k)
    assert (q.double() @ k.double().transpose(-2, -1)).abs().max() < 1e38
    gold, _ = ops.reference_attention(q.double(), k.double(), v.double(), [], spec)
    assert torch.isfinite(gold).all()
    got = ops.attention(q, k, v, spec)
    torch.testing.assert_close(got, gold.float(), **TOL)
    dout = torch.randn_like(v)
    dq, dk, dv = _backward(dout, q, k, v, [], spec)
    gq, gk, gv = ops.reference_gradients(
        dout.double(), q.double(), k.double(), v.double(), [], spec
    )
    torch.testing.assert_close(dv, gv.float(), **TOL)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_scores_beyond_float32_range_are_infinite_as_in_eager():
    """Where the true score exceeds float32's range, the program's float32 score tensor
    holds ±inf (and its softmax NaN): the float64 path of a call that may overflow rounds
    its scores to float32 range, so it returns what eager returns, not a finite value."""
    spec = _spec([])
    q, k, v = _inputs(nq=4, nk=1)
    q, k = q * 1e21, k * 1e21
    s = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(D))
    eager = torch.softmax(s, -1) @ v
    assert torch.isnan(eager).any()
    got = ops.attention(q, k, v, spec)
    assert torch.equal(torch.isnan(got), torch.isnan(eager))
    torch.testing.assert_close(got.nan_to_num(), eager.nan_to_num(), **TOL)


def _pred_spec(*preds, value=-math.inf, fully_masked="preserve"):
    fills = tuple(ScoreOp("fill_pred", value=value, pred=MaskPredicate(p).to_key()) for p in preds)
    return AttentionSpec(
        score_ops=(ScoreOp("mul", 0.25), *fills),
        head_dim=16, head_dim_v=16, dtype="float32", out_dtype="float32",
        fully_masked=fully_masked,
    )  # fmt: skip


@pytest.mark.parametrize(
    "preds, value, fm",
    [
        ((sympy.And(K <= Q, K > Q - 5),), -math.inf, "preserve"),  # window (with causal)
        # a 2-D window on a 6 x 7 grid (coordinates by // and %), and a band besides
        (
            (
                sympy.And(
                    sympy.Abs(sympy.floor(Q / 7) - sympy.floor(K / 7)) <= 1,
                    sympy.Abs(sympy.Mod(Q, 7) - sympy.Mod(K, 7)) <= 2,
                ),
                sympy.Abs(Q - K) <= 20,
            ),
            -math.inf,
            "preserve",
        ),
        ((K <= Q, Q - K <= 3), -math.inf, "preserve"),  # is_causal and a band
        ((K <= Q, K >= 40), -math.inf, "preserve"),  # dead under is_causal only
        ((K >= Q + 3,), -math.inf, "preserve"),  # rows with no key: not the fused path
        ((K >= Q + 3,), -math.inf, "zero"),  # ... unless the spec says SDPA's zeros
        ((K >= Q + 3,), -1e30, "zero"),  # a finite fill needs a key in every row
    ],
    ids=[
        "window",
        "grid-and-band",
        "causal-band",
        "causal-dead",
        "dead-rows",
        "dead-rows-zero",
        "finite-dead",
    ],  # fmt: skip
)
def test_static_mask_built_in_row_blocks(preds, value, fm, monkeypatch, request):
    """The static mask of predicate-only specs, built a few rows at a time (bounded
    temporaries), equals the mask built whole, declines the same calls (False), and the
    causal op's dropped keys count toward dead rows."""
    monkeypatch.setattr(cpu, "_MASK_BLOCK", 3 * 42)  # 3 rows of 42 keys per block
    spec = _pred_spec(*preds, value=value, fully_masked=fm)
    _, mops, causal_op = cpu._sdpa_plan(spec)
    want = cpu._mask(spec, mops, causal_op, [], 42, 42)
    if "causal" in request.node.name:
        assert causal_op is not None  # (the case exercises is_causal)
    cpu._static_mask.cache_clear()
    got = cpu._static_mask(spec.key, 42, 42)
    if want is False:
        assert got is False
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["nan q", "inf k", "inf v", "overflow"])
def test_the_fused_forward_checks_its_operands(case):
    """The SDPA forward proves q, k, v finite and q·kᵀ within float32's range first; else
    the call runs the blocked path, eager's semantics.  The check cannot move after the
    call onto the result: in the last case a row whose float32 scores all overflowed to
    -inf comes out of the fused kernel as a fully masked row's zeros with a log-sum-exp of
    0 (eager's row is NaN, the float64 gold's finite and not zero)."""
    n = 1100  # (the fused kernel works in blocks of 512 keys)
    spec = _spec([ScoreOp("fill_pred", value=-INF, pred=CAUSAL)])  # (scores * 0.25 first)
    q, k, v = _inputs(nq=n, nk=n)
    if case == "nan q":
        q[0, 0, 3, 2] = math.nan
    elif case == "inf k":
        k[0, 1, 5, 0] = math.inf
    elif case == "inf v":
        v[0, 0, 0, 1] = -math.inf  # a key every row sees
    else:  # every score of row 0 below -finfo.max: eager's float32 row is -inf
        q[0, 0, 0] = -3e19
        k[0, 0] = k[0, 0].abs() * 3e19 + 3e19
    s = (q @ k.transpose(-2, -1)) * 0.25
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -INF)
    eager = torch.softmax(s, -1) @ v
    gold, _ = ops.reference_attention(q.double(), k.double(), v.double(), [], spec)

    def same_kind(a, b):
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())

    args = dict(attn_mask=None, is_causal=True, scale=0.25, rows=None)
    raw, lse = cpu._flash(*cpu._flash_args(q, k, v, spec, args), args)[:2]
    if case == "overflow":  # the fused kernel takes the row for a fully masked one: zeros
        assert not torch.allclose(raw[0, 0, 0], gold[0, 0, 0].float(), **TOL)
        assert lse[0, 0, 0] == 0 and cpu._prepare(q, k, v, [], spec) is None
    got = ops.attention(q, k, v, spec)  # eager's (there: the overflowed row's NaN)
    assert same_kind(got, eager)
    torch.testing.assert_close(got.nan_to_num(), eager.nan_to_num(), **TOL)
