"""passes/subgraphs.py: which higher-order ops' subgraphs are visited, and what is
reported for those that are not."""

from __future__ import annotations

import torch
import torch.nn as nn

import attnfx
from attnfx.passes import inner_guard, subgraphs
from attnfx.passes.subgraphs import calls


class _Attn(nn.Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * 0.25).softmax(self.dim) @ v


class _Cond(nn.Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.a, self.b = _Attn(dim), _Attn(dim)

    def forward(self, q, k, v):
        return torch.cond(q.sum() > 0, lambda *t: self.a(*t), lambda *t: self.b(*t), (q, k, v))


def _graph(model, *args) -> torch.fx.GraphModule:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=capture)(*args)
    (gm,) = graphs
    return gm


def _qkv():
    torch.manual_seed(0)
    return [torch.randn(1, 2, 16, 16) for _ in range(3)]


def test_cond_branches_map_to_their_operands():
    gm = _graph(_Cond(), *_qkv())
    found = calls(gm)
    assert [c.hop for c in found] == ["cond", "cond"]
    for c in found:
        placeholders = [n for n in c.module.graph.nodes if n.op == "placeholder"]
        assert c.operands is not None and len(c.operands) == len(placeholders)


def test_unknown_higher_order_op_sites_reported_kept(monkeypatch):
    """A higher-order op whose operand layout is not known: its sites are not rewritten,
    but counted as kept with the reason."""
    monkeypatch.delitem(subgraphs.LAYOUTS, "cond")
    compiled = torch.compile(_Cond(), backend="attnfx", options={"inner": "eager"})
    compiled(*_qkv())
    reason = "kept.inside a cond subgraph, which attnfx does not rewrite"
    assert attnfx.counters == {reason: 2}, attnfx.counters


def test_inner_guard_reaches_subgraphs():
    """A softmax over the query axis inside a cond branch reaches inductor transposed
    (inductor's attention patterns would miscompile it; inner_guard.py)."""
    gm = _graph(_Cond(dim=-2), *_qkv())
    assert all(inner_guard.needs_guard(c.module) for c in calls(gm))
    guarded = inner_guard.guard_for_inductor(gm)
    assert guarded is not gm
    assert not any(inner_guard.needs_guard(c.module) for c in calls(guarded))
    # the graph Dynamo gave is unchanged
    assert all(inner_guard.needs_guard(c.module) for c in calls(gm))
    q, k, v = _qkv()
    torch.testing.assert_close(guarded(q, k, v), gm(q, k, v), rtol=0, atol=1e-6)
