"""The custom op on its default CPU path (the PyTorch implementation of the spec)."""

import math

import pytest
import sympy
import torch

from attnfx import ops
from attnfx.predicate import NK, K, MaskPredicate, Q
from attnfx.spec import AttentionSpec, ScoreOp


def _spec(**kw):
    base = dict(
        score_ops=(ScoreOp("mul", 0.25),),
        head_dim=16,
        head_dim_v=16,
        dtype="float32",
        out_dtype="float32",
    )
    base.update(kw)
    return AttentionSpec(**base)


def _qkv(b=2, h=4, hk=2, nq=10, nk=12, d=16):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, h, nq, d, generator=g),
        torch.randn(b, hk, nk, d, generator=g),
        torch.randn(b, hk, nk, d, generator=g),
    )


def test_opcheck_reference_path():
    q, k, v = _qkv()
    causal = ScoreOp("fill_pred", value=float("-inf"), pred=MaskPredicate(K <= Q).to_key())
    spec = _spec(score_ops=(ScoreOp("mul", 0.25), causal), gqa_group=2)
    torch.library.opcheck(ops.attention_op, (q, k, v, [], spec.key))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(ops.attention_op, (qg, kg, vg, [], spec.key))


def test_matches_sdpa_with_gqa_causal_and_grads():
    q, k, v = (t.requires_grad_() for t in _qkv(nq=12))
    causal = ScoreOp("fill_pred", value=float("-inf"), pred=MaskPredicate(K <= Q).to_key())
    spec = _spec(score_ops=(ScoreOp("mul", 0.25), causal), gqa_group=2)
    out = ops.attention(q, k, v, spec)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=0.25, is_causal=True
    )
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_out_layout_bnhd_strides():
    q, k, v = _qkv(hk=4)
    out = ops.attention(q, k, v, _spec(out_layout="bnhd"))
    assert out.shape == (2, 4, 10, 16)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, ops.attention(q, k, v, _spec()))


def test_symbolic_bias_lowering_and_sigmoid():
    q, k, v = _qkv(hk=4)
    spec = _spec(
        activation="sigmoid",
        score_ops=(ScoreOp("mul", 0.25), ScoreOp("add_sym", expr=sympy.srepr(-sympy.log(NK)))),
    )
    out = ops.attention(q, k, v, spec)
    ref = torch.sigmoid(q @ k.transpose(-2, -1) * 0.25 - math.log(12)) @ v
    torch.testing.assert_close(out, ref)
    lowered, aux = ops.lower_symbolic(spec, [], q, k)
    assert [op.op for op in lowered.score_ops] == ["mul", "add_aux"]
    assert aux[0].shape == (2, 4, 10, 12) and aux[0].stride() == (0, 0, 0, 0)
    assert aux[0].flatten()[0].item() == pytest.approx(-math.log(12))


def test_fully_masked_rows_preserve_vs_zero():
    q, k, v = _qkv(hk=4, nq=4, nk=4)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1, :] = True  # row 1 fully masked
    fill = ScoreOp("fill_aux", value=float("-inf"), aux=0)
    preserve = _spec(score_ops=(fill,), aux_dtypes=("bool",))
    zero = _spec(score_ops=(fill,), aux_dtypes=("bool",), fully_masked="zero")
    a = ops.attention(q, k, v, preserve, [mask])
    b = ops.attention(q, k, v, zero, [mask])
    assert torch.isnan(a[:, :, 1]).all() and not torch.isnan(a[:, :, 0]).any()
    assert (b[:, :, 1] == 0).all()
    torch.testing.assert_close(a[:, :, 0], b[:, :, 0])


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="heads"):
        ops.attention_op(q, k, v, [], _spec(gqa_group=3).key)
    with pytest.raises(ValueError, match="4-D"):
        ops.attention_op(q[0], k[0], v[0], [], _spec(gqa_group=2).key)


def _eager_scores(q, k, case, aux):
    s = q @ k.transpose(-2, -1) * 0.25
    nq, nk = s.shape[-2:]
    if case == "causal":
        s = s.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(), float("-inf"))
    elif case == "bias_softcap":
        s = torch.tanh((s + aux[0]) / 2.0) * 2.0
    elif case == "sigmoid_bias":
        s = s - math.log(nk)
    elif case == "bool_fill_finfo":
        s = s.masked_fill(aux[0], torch.finfo(torch.float32).min)
    return s


CASE_OPS = {
    "causal": (ScoreOp("fill_pred", value=float("-inf"), pred=MaskPredicate(K <= Q).to_key()),),
    "bias_softcap": (
        ScoreOp("add_aux", aux=0),
        ScoreOp("mul", 0.5),
        ScoreOp("tanh"),
        ScoreOp("mul", 2.0),
    ),
    "sigmoid_bias": (ScoreOp("add_sym", expr=sympy.srepr(-sympy.log(NK))),),
    "bool_fill_finfo": (ScoreOp("fill_aux", value=torch.finfo(torch.float32).min, aux=0),),
}


@pytest.mark.parametrize("case", list(CASE_OPS))
def test_op_backward_matches_autograd_of_eager(case, monkeypatch):
    """The op's backward on the CPU path (``reference_attention_backward``, written out by
    hand) against autograd through the same computation spelled in eager PyTorch."""
    monkeypatch.delenv("ATTNFX_INTERPRET", raising=False)
    q, k, v = (t.requires_grad_() for t in _qkv(nq=9, nk=11))
    g = torch.Generator().manual_seed(1)
    aux, dts = [], ()
    if case == "bias_softcap":
        aux, dts = [torch.randn(1, 1, 9, 11, generator=g)], ("float32",)
    elif case == "bool_fill_finfo":
        m = torch.rand(2, 1, 9, 11, generator=g) < 0.4
        m[0, :, 3] = True  # a fully masked row: uniform weights, finite gradients
        aux, dts = [m], ("bool",)
    spec = _spec(
        score_ops=(ScoreOp("mul", 0.25), *CASE_OPS[case]),
        aux_dtypes=dts,
        gqa_group=2,
        activation="sigmoid" if case == "sigmoid_bias" else "softmax",
    )
    out = ops.attention(q, k, v, spec, aux)
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = _eager_scores(
        qd,
        kd.repeat_interleave(2, 1),
        case,
        [a.double() if a.is_floating_point() else a for a in aux],
    )
    p = torch.sigmoid(s) if case == "sigmoid_bias" else s.softmax(-1)
    ref = p @ vd.repeat_interleave(2, 1)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        torch.testing.assert_close(
            a, b.float(), atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


class _Biased(torch.nn.Module):
    """Softmax attention with a learnable additive bias (an aux operand with a gradient)."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(
            torch.randn(1, 2, 9, 9, generator=torch.Generator().manual_seed(4))
        )

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * 0.25 + self.bias).softmax(-1) @ v


def test_double_backward_with_inner_eager_matches_eager():
    # a gradient of a gradient (gradient penalty) through a rewritten site, inner="eager":
    # the op's backward has its own backward through the reference math
    import attnfx
    from attnfx.testing import assert_attention_close

    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 2, 9, 16, generator=g) for _ in range(3)]
    m = _Biased()

    def second_order(model, tensors):
        q, k, v = (t.clone().requires_grad_() for t in tensors)
        out = model(q, k, v)
        (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        return torch.autograd.grad(gq.square().sum(), (k, v, q, model.bias))

    attnfx.reset_counters()
    cm = torch.compile(m, backend="attnfx", options={"inner": "eager"})
    cand = second_order(cm, base)
    assert attnfx.counters["rewritten.softmax"] == 1
    eager = second_order(m, base)
    gold = second_order(_Biased().double(), [t.double() for t in base])
    for name, c, b, gd in zip(("k", "v", "q", "bias"), cand, eager, gold):
        assert_attention_close(c, b, gd, grad=True, check_strides=False, context=f"d2/d{name}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_broadcast_aux_gradient_is_summed_before_rounding(dtype, monkeypatch):
    """A learnable per-query temperature (B, H, NQ, 1), read by the op as a stride-0
    (B, H, NQ, NK) view: its gradient is the sum over the keys, taken in the
    accumulation dtype and rounded once (fuzz seed 20261126, example 4): the correctly
    rounded sum.  Rounding each of the NK terms to the working dtype first, as autograd's
    broadcast backward does, erred 2-2.4x beyond that.  The same for a per-key bias
    (B, 1, 1, NK), summed across the op's blocks of query rows."""
    from attnfx import cpu

    monkeypatch.setattr(cpu, "BLOCK_BYTES", 4096)  # blocks of 4 query rows
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(3)
    b, h, n, d = 2, 2, 64, 32
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dt) for _ in range(3))
    tau = (0.5 + torch.rand(b, h, n, 1, generator=g)).to(dt)
    bias = (0.3 * torch.randn(b, 1, 1, n, generator=g)).to(dt)
    spec = _spec(
        score_ops=(ScoreOp("mul", d**-0.5), ScoreOp("mul_aux", aux=0), ScoreOp("add_aux", aux=1)),
        head_dim=d, head_dim_v=d, dtype=dtype, out_dtype=dtype, aux_dtypes=(dtype, dtype),
    )  # fmt: skip
    dout = torch.randn(b, h, n, d, generator=g).to(dt)

    def eager(q, k, v, t, bias):
        s = (q @ k.transpose(-1, -2)) * d**-0.5 * t + bias
        return torch.softmax(s.float(), -1).to(q.dtype) @ v

    def grads(fn, *xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = fn(*xs)
        return torch.autograd.grad(out, xs[3:], dout.to(out.dtype))

    gold = grads(eager, *(x.double() for x in (q, k, v, tau, bias)))
    base = grads(eager, q, k, v, tau, bias)
    cand = grads(lambda q, k, v, t, bb: ops.attention(q, k, v, spec, [t, bb]), q, k, v, tau, bias)
    for c, e, gg in zip(cand, base, gold):
        assert c.shape == gg.shape and c.dtype == dt
        err_c = (c.double() - gg).abs().mean().item()
        err_e = (e.double() - gg).abs().mean().item()
        err_r = (gg.to(dt).double() - gg).abs().mean().item()  # gold rounded once
        assert err_c <= err_e, (err_c, err_e)
        assert err_c <= 1.25 * err_r, (err_c, err_r)


def test_opcheck_bias_table_and_its_gradient():
    """A bias table (``add_table_aux``): the op and its aux backward (the table's
    gradient, (B, H, 1, T)) pass opcheck, fake impls included."""
    import sympy

    q, k, v = _qkv(hk=4)
    expr = sympy.srepr(sympy.Min(6, sympy.Max(0, K - Q + 3)))
    spec = _spec(
        score_ops=(ScoreOp("mul", 0.25), ScoreOp("add_table_aux", aux=0, expr=expr)),
        aux_dtypes=("float32",),
    )
    table = torch.randn(1, 4, 1, 7).expand(2, 4, 1, 7).requires_grad_()
    aux = ops.broadcast_aux(q, k, [table], spec)
    torch.library.opcheck(ops.attention_op, (q, k, v, aux, spec.key))
    out, lse = ops.attention_op(q, k, v, aux, spec.key)
    dout = torch.randn_like(out)
    # (the aux backward has no double backward: its inputs are plain tensors)
    det = [a.detach() for a in aux]
    args = (dout, q, k, v, det, out.detach(), lse.detach(), spec.key, [0])
    torch.library.opcheck(ops.attention_aux_backward_op, args)
    (g,) = ops.attention_aux_backward_op(*args)
    assert g.shape == (2, 4, 1, 7)


# ---------------------------------------------------------------------------------------
# Eager calls: the op's implementation under an autograd.Function (_EagerAttention)
# ---------------------------------------------------------------------------------------


def _bias_case():
    q, k, v = _qkv()
    bias = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(1))
    causal = ScoreOp("fill_pred", value=float("-inf"), pred=MaskPredicate(K <= Q).to_key())
    spec = _spec(
        score_ops=(ScoreOp("mul", 0.25), ScoreOp("add_aux", aux=0), causal),
        aux_dtypes=("float32",), gqa_group=2,
    )  # fmt: skip
    return spec, (q, k, v), bias


def _run(fn, spec, qkv, bias):
    leaves = [t.clone().requires_grad_() for t in (*qkv, bias)]
    out = fn(*leaves)
    out.backward(torch.ones_like(out))
    return out.detach(), [t.grad for t in leaves]


def test_eager_calls_skip_the_custom_op_and_agree_with_it(monkeypatch):
    """Plain eager tensors: no custom-op dispatch, and the same numbers (out, dq, dk,
    dv, the learnable bias's gradient) as the op with its registered autograd."""
    spec, qkv, bias = _bias_case()
    via_op = _run(
        lambda q, k, v, b: ops.attention_op(q, k, v, ops.broadcast_aux(q, k, [b], spec), spec.key)[0],
        spec, qkv, bias,
    )  # fmt: skip

    def boom(*a, **kw):
        raise AssertionError("the custom op was dispatched")

    monkeypatch.setattr(ops, "attention_op", boom)
    monkeypatch.setattr(ops, "attention_backward_op", boom)
    eager = _run(lambda q, k, v, b: ops.attention(q, k, v, spec, [b]), spec, qkv, bias)
    assert torch.equal(eager[0], via_op[0])
    for got, want in zip(eager[1], via_op[1]):
        assert torch.equal(got, want)


def test_modes_and_transforms_see_the_op():
    """A dispatch mode (a FLOP counter, fake or functional tensors) must see
    ``attnfx::attention``; torch.func transforms get the op (no vmap rule: an error,
    never a kernel run on a wrapped tensor)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    spec, (q, k, v), bias = _bias_case()
    with Seen() as seen:
        ops.attention(q, k, v, spec, [bias])
    assert any("attnfx.attention" in o for o in seen.ops), seen.ops
    with pytest.raises(Exception, match="vmap|batching rule|Batching"):
        torch.func.vmap(lambda qq: ops.attention(qq, k, v, spec, [bias]))(q[None])


def test_eager_double_backward_goes_through_the_backward_op():
    """``create_graph=True`` (a gradient penalty): the backward is the backward op, whose
    own autograd gives the second derivative — as the op path's."""
    spec, qkv, _ = _bias_case()
    spec = _spec(gqa_group=2)

    def second(fn):
        q, k, v = (t.clone().requires_grad_() for t in qkv)
        out = fn(q, k, v)
        (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), k)
        return gg

    eager = second(lambda q, k, v: ops.attention(q, k, v, spec))
    via_op = second(lambda q, k, v: ops.attention_op(q, k, v, [], spec.key)[0])
    torch.testing.assert_close(eager, via_op)
    assert eager.abs().sum() > 0
