"""The rewrite pass removes the replaced regions and nothing else: in-place ops (whose
return value nothing reads) and buffer updates around a site survive the rewrite."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.fx as fx

import attnfx
from attnfx.passes import graph as G
from attnfx.passes import rewrite

D = 16


def _attn(q, k, v):
    return (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1) @ v


class AddInplace(torch.nn.Module):
    """``acc.add_(o)``: the add's value is unused, its effect is the output."""

    def forward(self, q, k, v):
        o = _attn(q, k, v)
        acc = torch.zeros_like(o)
        acc.add_(o * 2)
        return acc


class MulInplaceBefore(torch.nn.Module):
    """An in-place op on an operand before the site: the site must see the scaled q."""

    def forward(self, q, k, v):
        q = q.clone()
        q.mul_(0.5)
        return _attn(q, k, v)


class IndexAddScatter(torch.nn.Module):
    """A router-style scatter and ``index_add_`` into an output buffer (the MoE
    pattern that lost its routed output)."""

    def forward(self, q, k, v):
        o = _attn(q, k, v)
        b, h, n, d = o.shape
        out = torch.zeros(b * h * n, d, dtype=o.dtype)
        idx = torch.arange(b * h * n).flip(0)
        out.index_add_(0, idx, o.reshape(-1, d))
        mask = torch.zeros(b * h * n, d, dtype=o.dtype)
        mask.scatter_(0, idx[:, None].expand(-1, d), 1.0)
        return out.view(b, h, n, d) * mask.view(b, h, n, d)


class BufferUpdate(torch.nn.Module):
    """A running statistic updated in forward: the buffer must change as in eager."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(D))

    def forward(self, q, k, v):
        o = _attn(q, k, v)
        self.seen.copy_(self.seen * 0.9 + o.mean((0, 1, 2)) * 0.1)
        return o + 0


class SetItem(torch.nn.Module):
    def forward(self, q, k, v):
        o = _attn(q, k, v)
        out = o.clone()
        out[:, :, 0] = 7.0
        return out


CASES = [AddInplace, MulInplaceBefore, IndexAddScatter, BufferUpdate, SetItem]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("cls", CASES, ids=lambda c: c.__name__)
def test_inplace_ops_survive_rewrite(cls, inner):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, D) for _ in range(3))
    ref_m, m = cls(), cls()
    ref = ref_m(q, k, v)
    out = torch.compile(m, backend="attnfx", options={"inner": inner})(q, k, v)
    assert attnfx.counters["rewritten.softmax"] == 1, dict(attnfx.counters)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, buf in ref_m.named_buffers():
        torch.testing.assert_close(dict(m.named_buffers())[name], buf, rtol=1e-5, atol=1e-6)


def test_side_effect_predicate():
    def f(x, y):
        a = x + y
        x.add_(1)
        torch.relu_(y)
        a.clone()
        m = (x > 0) & (y > 0) | ~(x < 1)  # operator.and_ / or_: pure, despite the name
        return a, m

    gm = fx.symbolic_trace(f)
    y = next(n for n in gm.graph.nodes if n.name == "y")
    with gm.graph.inserting_after(y):
        gm.graph.call_function(operator.setitem, (y, 0, 2.0))
        gm.graph.call_function(operator.iadd, (y, 1.0))
    effects = {n.name for n in gm.graph.nodes if G.has_side_effects(n)}
    assert {"add_", "relu_", "setitem", "iadd"} <= effects, effects
    assert "add" not in effects and "clone" not in effects
    assert not [n for n in effects if n.startswith(("and_", "or_", "invert"))], effects


def test_remove_replaced_touches_only_given_nodes():
    def f(x, y):
        x * 3  # dead, but outside the region: kept
        r1 = y * 2
        r1 + 1  # the region
        x.add_(1)
        return x

    gm = fx.symbolic_trace(f)
    nodes = {n.name: n for n in gm.graph.nodes}
    region = {nodes["mul_1"], nodes["add"]}
    assert rewrite.remove_replaced(gm, region) == 2
    left = {n.name for n in gm.graph.nodes}
    assert "mul" in left and "add_" in left
    assert "mul_1" not in left and "add" not in left


class DeadDebugClones(torch.nn.Module):
    """x-transformers keeps intermediates for debugging (``qk_similarities = sim.clone()``)
    that nothing reads: Dynamo leaves the clones in the graph, dead."""

    def forward(self, q, k, v):
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * D**-0.5
        qk_similarities = sim.clone()  # noqa: F841 - dead on purpose
        causal = torch.ones(sim.shape[-2:], dtype=torch.bool).triu(1)
        sim = sim.masked_fill(causal, -torch.finfo(sim.dtype).max)
        pre_softmax_attn = sim.clone()  # noqa: F841
        attn = sim.softmax(dim=-1)
        post_softmax_attn = attn.clone().detach()  # noqa: F841
        return torch.einsum("bhij,bhjd->bhid", attn, v)


def test_dead_users_do_not_block_the_rewrite():
    from torch._dynamo.testing import EagerAndRecordGraphs

    from attnfx.backend import Options, rewrite_graph

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, D, requires_grad=True) for _ in range(3))
    m = DeadDebugClones()
    got = torch.compile(m, backend="attnfx")(q, k, v)
    assert attnfx.counters["rewritten.softmax"] == 1, dict(attnfx.counters)
    torch.testing.assert_close(got, m(q, k, v))

    rec = EagerAndRecordGraphs()
    torch._dynamo.reset()
    torch.compile(m, backend=rec)(q, k, v)
    (gm,) = rec.graphs
    assert sum(1 for n in gm.graph.nodes if "clone" in str(n.target)) == 3
    new, _ = rewrite_graph(gm, [q, k, v], Options(verify="off"))
    left = [n for n in new.graph.nodes if "clone" in str(n.target)]
    assert not left, "the dead clones of the replaced region must go with it"


class LiveClone(torch.nn.Module):
    def forward(self, q, k, v):
        sim = q @ k.transpose(-2, -1) * D**-0.5
        kept = sim.clone()
        return sim.softmax(-1) @ v, kept


def test_live_user_still_refused():
    q, k, v = (torch.randn(2, 2, 12, D) for _ in range(3))
    torch.compile(LiveClone(), backend="attnfx")(q, k, v)
    assert attnfx.counters["rewritten.softmax"] == 0
    assert any("scores have other users" in key for key in attnfx.counters), dict(attnfx.counters)


class WriteInsideSite(torch.nn.Module):
    """``q`` is written after the scores read it and before ``p @ v``: the op, placed at
    ``p @ v``, would read the new q.  Kept, with the reason."""

    def forward(self, q, k, v):
        q = q.clone()
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        q.mul_(2.0)
        o = s.softmax(-1) @ v
        return o + q.sum()


def test_in_place_write_inside_site_is_kept():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, D) for _ in range(3))
    m = WriteInsideSite()
    got = torch.compile(m, backend="attnfx")(q, k, v)
    assert attnfx.counters["rewritten.softmax"] == 0, dict(attnfx.counters)
    assert attnfx.counters["kept.an in-place write lies inside the site"] == 1
    torch.testing.assert_close(got, m(q, k, v))


class InPlaceOnOutput(torch.nn.Module):
    """``o.mul_(2)`` on the site's output, then a view: eager's ``p @ v`` result is fresh;
    the op's output is saved for its backward (and SDPA's is a bnhd view)."""

    def __init__(self, sdpa: bool):
        super().__init__()
        self.sdpa = sdpa

    def forward(self, q, k, v):
        if self.sdpa:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            o = _attn(q, k, v)
        o.mul_(2.0)
        return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)


@pytest.mark.parametrize("sdpa", [False, True])
def test_in_place_write_on_site_output(sdpa):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, D, requires_grad=True) for _ in range(3))
    m = InPlaceOnOutput(sdpa)
    got = torch.compile(m, backend="attnfx", options={"verify": "always"})(q, k, v)
    assert attnfx.counters["rewritten.softmax"] == 1, dict(attnfx.counters)
    ref = m(q, k, v)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if sdpa:
        return  # eager SDPA's own backward refuses the in-place write (it saved its output)
    cot = torch.randn_like(ref)
    for a, b in zip(
        torch.autograd.grad(got, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
