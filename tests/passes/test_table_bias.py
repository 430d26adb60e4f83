"""Bias tables read at positions (NAT's relative position bias: a learnable (H, 2k−1, …)
table gathered at the key's offset from the query) are read back as one score op
(``add_table_aux``): the op reads the table at an index expression of (Q, K), so no
N×N bias (nor its N×N int64 index) reaches it.  Forward and gradients — the table's
included — equal eager, on the CPU path and through the generated kernels."""

from __future__ import annotations

import math

import pytest
import sympy
import torch
import torch.nn as nn

import attnfx
from attnfx import ops
from attnfx.nn import NeighborhoodAttention1D, NeighborhoodAttention2D
from attnfx.predicate import K, Q
from attnfx.spec import AttentionSpec, ScoreOp
from attnfx.testing import assert_rewrites_match_eager

B, H, N, D = 2, 3, 23, 16
W = 5  # the relative window of the 1-D tables: offsets -W..W


class RelTable(nn.Module):
    """A 1-D relative position bias, clamped to ±W, in three spellings: an (H, 2W+1)
    table indexed ``table[:, idx]``, a head-shared (2W+1,) table, and Swin's (2W+1, H)
    table indexed ``table[idx].permute(2, 0, 1)``."""

    def __init__(self, form="heads"):
        super().__init__()
        shape = {"heads": (H, 2 * W + 1), "shared": (2 * W + 1,), "swin": (2 * W + 1, H)}[form]
        self.table = nn.Parameter(torch.randn(shape))
        self.form = form

    def forward(self, q, k, v):
        n = q.shape[-2]
        pos = torch.arange(n, device=q.device)
        idx = (pos[None, :] - pos[:, None]).clamp(-W, W) + W
        if self.form == "heads":
            bias = self.table[:, idx]
        elif self.form == "shared":
            bias = self.table[idx]
        else:
            bias = self.table[idx].permute(2, 0, 1).contiguous().unsqueeze(0)
        s = q @ k.transpose(-2, -1) / math.sqrt(D) + bias
        return s.softmax(-1) @ v


def _qkv(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g) for _ in range(3)]


def _site(m, *inputs):
    attnfx.reset_counters()
    torch._dynamo.reset()
    with torch.no_grad():
        (site,) = attnfx.explain(m, *inputs).rewritten
    torch._dynamo.reset()
    return site


@pytest.mark.parametrize("form", ["heads", "shared", "swin"])
def test_table_is_one_op_reading_the_table(form):
    m = RelTable(form)
    site = _site(m, *_qkv())
    ops_ = [op for op in site.spec.score_ops if op.op == "add_table_aux"]
    assert len(ops_) == 1 and not any(op.op == "add_aux" for op in site.spec.score_ops)
    # the index expression is the program's: clamp(K - Q, -W, W) + W, at every pair
    idx = (torch.arange(N)[None, :] - torch.arange(N)[:, None]).clamp(-W, W) + W
    got = sympy.lambdify((Q, K), ops_[0].sym, "numpy")(
        torch.arange(N)[:, None].numpy(), torch.arange(N)[None, :].numpy()
    )
    assert torch.equal(torch.as_tensor(got).expand(N, N), idx)
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, _qkv(), grad=True, params=True)


def test_neighborhood_rpb_reads_its_table(monkeypatch):
    """NAT's 2-D bias: the op's aux is the (H, 2k-1, 2k-1) table flattened, not a
    (H, N, N) gather; the site is still the neighborhood, and the table's gradient
    matches eager's."""
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(32, 2, 3, rel_pos_bias=True)
    with torch.no_grad():
        m.rpb.normal_()  # (a bias that matters: the init's std 0.02 barely moves scores)
    x = torch.randn(2, 6, 7, 32)
    site = _site(m, x)
    assert site.mask == "neighborhood 2-D 6x7 k=(3,3)"
    (i,) = [op.aux for op in site.spec.score_ops if op.op == "add_table_aux"]
    seen = []
    real = ops.broadcast_aux
    monkeypatch.setattr(ops, "broadcast_aux", lambda q, k, a, s: seen.append(a) or real(q, k, a, s))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(m, backend="attnfx", options={"inner": "eager"})(x)
    assert [tuple(a[i].shape) for a in seen] == [(2, 1, 25)]  # the table, not (2, 42, 42)
    monkeypatch.undo()
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(
        m, [x], kind="neighborhood", grad=True, grad_idx=(0,), params=True,
        options={"inner": "eager"},
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_neighborhood_rpb_through_the_kernels(dtype, monkeypatch, tmp_path):
    """The same module through the generated kernels: the table read in the forward and
    backward kernels, its gradient added into the table by the dQ kernel (TABLE_GRAD);
    output and every gradient (the table's included) pass against eager."""
    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(32, 2, 3, rel_pos_bias=True)
    with torch.no_grad():
        m.rpb.normal_()
    m = m.to(dtype)
    from attnfx import cpu

    def blocked(*args):
        raise AssertionError("the table's gradient took the blocked PyTorch path")

    monkeypatch.setattr(cpu, "reference_aux_backward", blocked)
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(
        m, [torch.randn(2, 6, 7, 32).to(dtype)], kind="neighborhood", grad=True, grad_idx=(0,),
        params=True, options={"inner": "eager"},
    )  # fmt: skip


def test_dilated_1d_rpb(monkeypatch):
    torch.manual_seed(1)
    m = NeighborhoodAttention1D(32, 2, 5, dilation=2, rel_pos_bias=True)
    with torch.no_grad():
        m.rpb.normal_()
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(
        m, [torch.randn(2, 29, 32)], kind="neighborhood", grad=True, grad_idx=(0,), params=True,
        options={"inner": "eager"},
    )  # fmt: skip


def test_index_from_an_input_stays_a_tensor():
    """An index that is not index arithmetic of the positions (an input) is not a
    position: the gathered bias stays an N×N tensor operand."""

    class FromInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(H, 2 * W + 1))

        def forward(self, q, k, v, idx):
            s = q @ k.transpose(-2, -1) / math.sqrt(D) + self.table[:, idx]
            return s.softmax(-1) @ v

    idx = torch.randint(0, 2 * W + 1, (N, N))
    site = _site(FromInput(), *_qkv(), idx)
    names = [op.op for op in site.spec.score_ops]
    assert "add_table_aux" not in names and "add_aux" in names


def _specs(nq, nk, dtype):
    expr = sympy.Min(2 * W, sympy.Max(0, K - Q + W))
    base = dict(head_dim=D, head_dim_v=D, dtype=dtype, out_dtype=dtype, aux_dtypes=("float32",))
    table = AttentionSpec(
        score_ops=(
            ScoreOp("mul", D**-0.5),
            ScoreOp("add_table_aux", aux=0, expr=sympy.srepr(expr)),
        ),
        **base,
    )
    dense = AttentionSpec(score_ops=(ScoreOp("mul", D**-0.5), ScoreOp("add_aux", aux=0)), **base)
    idx = (torch.arange(nk)[None, :] - torch.arange(nq)[:, None]).clamp(-W, W) + W
    return table, dense, idx


@pytest.mark.parametrize("interpret", [False, True], ids=["cpu", "kernel"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_op_table_matches_the_gathered_bias(interpret, dtype, monkeypatch, tmp_path):
    """The op with ``add_table_aux`` against the same scores with the table gathered into
    an ``add_aux`` tensor: outputs, dq/dk/dv and the table's gradient, at lengths off the
    block size (tail lanes must not read past the table)."""
    if interpret:
        monkeypatch.setenv("ATTNFX_INTERPRET", "1")
        monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    nq, nk = 37, 45
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, H, nq, D, generator=g).to(dt).requires_grad_()
    k, v = (torch.randn(B, H, nk, D, generator=g).to(dt).requires_grad_() for _ in range(2))
    t1 = torch.randn(H, 2 * W + 1, generator=g).requires_grad_()
    t2 = t1.detach().clone().requires_grad_()
    table, dense, idx = _specs(nq, nk, dtype)
    out = ops.attention(q, k, v, table, [t1.view(1, H, 1, 2 * W + 1)])
    ref = ops.attention(q, k, v, dense, [t2[:, idx].unsqueeze(0)])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out, ref, **tol)
    cot = torch.randn(out.shape, generator=g).to(dt)
    got = torch.autograd.grad(out, (q, k, v, t1), cot)
    want = torch.autograd.grad(ref, (q, k, v, t2), cot)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, **tol)
    # the table's gradient (float32): in float16, the kernels' dS takes rowsum(dO·O) of
    # the rounded output where the blocked path takes rowsum(P·dP)
    table_tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(got[3], want[3], **table_tol)


def test_index_outside_the_table_is_an_error():
    """At lengths where the index expression leaves the table, the op raises as eager's
    gather does (the kernels would read past the table)."""
    q, k, v = _qkv(8)
    spec = AttentionSpec(
        score_ops=(ScoreOp("add_table_aux", aux=0, expr=sympy.srepr(K - Q + 3)),),
        aux_dtypes=("float32",), head_dim=D, head_dim_v=D, dtype="float32",
        out_dtype="float32",
    )  # fmt: skip
    with pytest.raises(IndexError, match="outside the table's 7 entries"):
        ops.attention(q, k, v, spec, [torch.zeros(1, 1, 1, 7)])
    q, k, v = _qkv(4)  # K - Q + 3 spans [0, 6] at length 4
    out = ops.attention(q, k, v, spec, [torch.zeros(1, 1, 1, 7)])
    assert torch.isfinite(out).all()


def test_loose_interval_bounds_do_not_refuse_an_index_inside_the_table():
    """(K + 1) % 2 + K % 2 + 2 is 3 everywhere; interval arithmetic bounds it by [2, 4],
    past a 4-entry table: the exact range decides, and the op runs as eager would."""
    from attnfx.score_ops import index_range

    key = sympy.srepr(sympy.Mod(K + 1, 2) + sympy.Mod(K, 2) + 2)
    assert index_range(key, 8, 8) == (2, 4)
    q, k, v = _qkv(8)
    spec = AttentionSpec(
        score_ops=(ScoreOp("add_table_aux", aux=0, expr=key),),
        aux_dtypes=("float32",), head_dim=D, head_dim_v=D, dtype="float32",
        out_dtype="float32",
    )  # fmt: skip
    assert index_range(key, 8, 8, exact=True) == (3, 3)
    table = torch.zeros(1, 1, 1, 4)
    table[..., 3] = 1.0
    out = ops.attention(q, k, v, spec, [table])
    torch.testing.assert_close(out, torch.softmax(q @ k.transpose(-2, -1) + 1.0, -1) @ v)


def test_index_range_is_exact_beyond_interval_arithmetic():
    from attnfx.score_ops import index_range

    # a floor by a non-constant is not bounded by the interval rules: evaluated
    assert index_range(sympy.srepr(sympy.floor((K + 7) / (Q + 1))), 5, 3) == (1, 9)
    assert index_range(sympy.srepr(sympy.Min(4, sympy.Max(0, K - Q + 2))), 100, 100) == (0, 4)


def test_large_index_is_checked_by_row_blocks(monkeypatch):
    """An index tensor past the whole-tensor limit (2^24 pairs) is checked against its
    expression a block of query rows at a time: the (N, N) int64 temporaries of its
    index arithmetic are never built whole (here the whole-subgraph run is disabled)."""
    from attnfx.passes import masks

    def whole(*args, **kwargs):
        raise AssertionError("the index subgraph ran whole")

    monkeypatch.setattr(masks, "_run_subgraph", whole)
    n = 4100  # 4100^2 > 2^24
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, 16, generator=g) for _ in range(3))
    site = _site(RelTable("heads"), q, k, v)
    assert [op.op for op in site.spec.score_ops].count("add_table_aux") == 1


def test_table_followed_by_a_multiplier_takes_the_blocked_gradient(monkeypatch, tmp_path):
    """A table whose gradient is not dS of the final scores (a multiplier after it) is not
    one the dQ kernel scatters (``Plan.table_grads``): its gradient comes from the
    blocked PyTorch path, and still matches the gathered bias's."""
    from attnfx.codegen import make_plan

    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    nq = nk = 19
    table, dense, idx = _specs(nq, nk, "float32")
    table = AttentionSpec(score_ops=(*table.score_ops, ScoreOp("mul", 0.5)), **_base(table))
    dense = AttentionSpec(score_ops=(*dense.score_ops, ScoreOp("mul", 0.5)), **_base(dense))
    assert make_plan(table).table_grads == () and make_plan(
        _specs(nq, nk, "float32")[0]
    ).table_grads == (0,)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, H, nq, D, generator=g).requires_grad_() for _ in range(3))
    t1 = torch.randn(H, 2 * W + 1, generator=g).requires_grad_()
    t2 = t1.detach().clone().requires_grad_()
    out = ops.attention(q, k, v, table, [t1.view(1, H, 1, 2 * W + 1)])
    ref = ops.attention(q, k, v, dense, [t2[:, idx].unsqueeze(0)])
    cot = torch.randn(out.shape, generator=g)
    (a,) = torch.autograd.grad(out, (t1,), cot)
    (b,) = torch.autograd.grad(ref, (t2,), cot)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _base(spec):
    keys = ("head_dim", "head_dim_v", "dtype", "out_dtype", "aux_dtypes")
    return {key: getattr(spec, key) for key in keys}


def test_table_under_dynamic_shapes():
    """``dynamic=True``: one graph serves every length; the index expression (of Q and
    K, no length) is read at each call's lengths, and forward and the table's gradient
    match eager at each."""
    m = RelTable("heads")
    attnfx.reset_counters()
    torch._dynamo.reset()
    cm = torch.compile(m, backend="attnfx", dynamic=True)
    for n in (23, 40, 57):
        q, k, v = _qkv(n)
        out, ref = cm(q, k, v), m(q, k, v)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        (a,) = torch.autograd.grad(out.sum(), m.table)
        (b,) = torch.autograd.grad(ref.sum(), m.table)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert attnfx.counters["rewritten.softmax"] == 1
