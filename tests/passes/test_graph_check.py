"""The whole-graph check catches what per-site verification cannot: a pass that changes a
node outside every site.  Planted bugs: the old dead-code elimination (drops in-place
ops), a perturbed constant outside the site, a lost buffer update."""

from __future__ import annotations

import math
import operator

import pytest
import torch

import attnfx
from attnfx.passes import graph_check, rewrite
from attnfx.testing import graph_outputs_close

D = 16


def _attn(q, k, v):
    return (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1) @ v


class AddInplace(torch.nn.Module):
    def forward(self, q, k, v):
        o = _attn(q, k, v)
        acc = torch.zeros_like(o)
        acc.add_(o * 3)
        return acc


class BufferUpdate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(D))

    def forward(self, q, k, v):
        o = _attn(q, k, v)
        self.seen.copy_(self.seen * 0.5 + o.mean((0, 1, 2)))
        return o * 1


def _qkv(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(2, 2, 12, D, dtype=dtype) for _ in range(3)]


def _old_dce(gm, nodes):
    """The bug this check must catch: fx's dead-code elimination deletes in-place
    ``call_method`` ops whose value is unused."""
    gm.graph.eliminate_dead_code()
    return 0


def _perturb_outside_sites(gm, nodes):
    """A non-local bug: a constant multiplier outside the site changes by 1%."""
    rewrite_remove(gm, nodes)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is operator.mul and n not in nodes:
            if isinstance(n.args[1], (int, float)) and n.args[1] in (1, 3):
                n.args = (n.args[0], n.args[1] * 1.01)
    return 0


rewrite_remove = rewrite.remove_replaced


@pytest.mark.parametrize(
    "cls,plant",
    [(AddInplace, _old_dce), (AddInplace, _perturb_outside_sites), (BufferUpdate, _old_dce)],
)
def test_planted_non_local_bug_is_caught(cls, plant, monkeypatch):
    monkeypatch.setattr(rewrite, "remove_replaced", plant)
    q, k, v = _qkv()
    ref_m, m = cls(), cls()
    ref = ref_m(q, k, v)
    out = torch.compile(m, backend="attnfx", options={"verify": "always"})(q, k, v)
    assert attnfx.counters["kept.whole-graph check failed"] == 1, dict(attnfx.counters)
    assert attnfx.counters["rewritten.softmax"] == 0
    torch.testing.assert_close(out, ref)  # the graph as Dynamo gave it ran
    for name, buf in ref_m.named_buffers():
        torch.testing.assert_close(dict(m.named_buffers())[name], buf)


def test_planted_bug_raises_with_on_mismatch_raise(monkeypatch):
    monkeypatch.setattr(rewrite, "remove_replaced", _old_dce)
    m = torch.compile(AddInplace(), backend="attnfx", options={"on_mismatch": "raise"})
    with pytest.raises(Exception, match="whole-graph check failed"):
        m(*_qkv())


def test_explain_names_the_reason(monkeypatch):
    monkeypatch.setattr(rewrite, "remove_replaced", _old_dce)
    rep = attnfx.explain(AddInplace(), *_qkv())
    (site,) = rep.sites
    assert site.status == "kept" and site.reason == "whole-graph check failed", str(rep)


def test_check_leaves_model_state_alone():
    """Both runs work on copies of mutated inputs: one compiled call updates the buffer
    exactly once, as one eager call does."""
    q, k, v = _qkv()
    ref_m, m = BufferUpdate(), BufferUpdate()
    ref_m(q, k, v)
    torch.compile(m, backend="attnfx", options={"verify": "always"})(q, k, v)
    assert attnfx.counters["rewritten.softmax"] == 1, dict(attnfx.counters)
    torch.testing.assert_close(m.seen, ref_m.seen)


def test_first_mode_checks_each_graph_once(monkeypatch):
    calls = []
    real = graph_check.check_graph

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(graph_check, "check_graph", counting)
    attnfx.backend._verified.clear()
    for _ in range(2):
        torch._dynamo.reset()
        torch.compile(AddInplace(), backend="attnfx")(*_qkv())
    assert len(calls) == 1
    torch._dynamo.reset()
    torch.compile(AddInplace(), backend="attnfx", options={"verify": "off"})(*_qkv())
    assert len(calls) == 1


def test_mutated_inputs_follow_views():
    def f(x, y, z):
        x.view(-1).add_(1)
        z[0].mul_(2)
        return y + 1

    gm = torch.fx.symbolic_trace(f)
    assert graph_check.mutated_inputs(gm) == [0, 2]


@pytest.mark.parametrize(
    "dtype,rel_ok,rel_bad",
    [(torch.float32, 1e-6, 1e-2), (torch.float16, 2e-3, 5e-2), (torch.bfloat16, 8e-3, 1e-1)],
)
def test_graph_outputs_close_bounds(dtype, rel_ok, rel_bad):
    torch.manual_seed(0)
    b = torch.randn(64, 64).to(dtype)
    noise = torch.randn(64, 64)
    assert graph_outputs_close((b.double() * (1 + rel_ok * noise)).to(dtype), b).ok
    res = graph_outputs_close((b.double() * (1 + rel_bad)).to(dtype), b)
    assert not res.ok and "relative difference" in res.message


def test_graph_outputs_close_discrete_and_nonfinite():
    idx = torch.arange(10)
    assert graph_outputs_close(idx.clone(), idx).ok
    assert not graph_outputs_close(idx.flip(0), idx).ok  # topk/argmax indices: exact
    x = torch.tensor([1.0, float("nan"), float("inf")])
    assert graph_outputs_close(x.clone(), x).ok
    assert not graph_outputs_close(torch.tensor([1.0, 0.0, float("inf")]), x).ok
    assert not graph_outputs_close(torch.tensor([1.0, float("nan"), 5.0]), x).ok
    assert graph_outputs_close(3, 3).ok and not graph_outputs_close(3, 4).ok


def test_original_run_takes_site_outputs_and_skips_the_scores():
    """The original graph runs with each site's output taken from the rewritten run: the
    N² scores are never computed for the check."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    rec = EagerAndRecordGraphs()
    torch.compile(AddInplace(), backend=rec)(*_qkv())
    (gm,) = rec.graphs
    mm = [n for n in gm.graph.nodes if "matmul" in str(n.target)]
    assert len(mm) == 2  # q @ kᵀ and p @ v
    needed = graph_check._needed(gm, {mm[1].name})
    assert mm[1] in needed and mm[0] not in needed
    assert not any("softmax" in str(n.target) for n in needed)
