"""The inner-compiler guard: softmax over a non-last axis reaches inductor transposed, so
that inductor's attention patterns (which ignore the softmax dim) cannot mis-match it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnfx
from attnfx.passes.inner_guard import guard_for_inductor, needs_guard


def _scores(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


FORMS = {
    "method dim=-2": lambda q, k, v: _scores(q, k).softmax(dim=-2) @ v,
    "torch.softmax dim=2": lambda q, k, v: torch.softmax(_scores(q, k), 2) @ v,
    "F.softmax dtype": lambda q, k, v: (
        F.softmax(_scores(q, k), dim=-2, dtype=torch.float32).to(v.dtype) @ v
    ),
    "head axis": lambda q, k, v: _scores(q, k).softmax(1) @ v,
}


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *a):
        return self.fn(*a)


@pytest.mark.parametrize("name", FORMS)
def test_non_last_axis_softmax_equals_eager(name):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 16) for _ in range(3))
    m = Fn(FORMS[name])
    got = torch.compile(m, backend="attnfx")(q, k, v)
    assert attnfx.counters["rewritten.softmax"] == 0
    torch.testing.assert_close(got, m(q, k, v))


def _dynamo_graph(fn, *inputs):
    from torch._dynamo.testing import EagerAndRecordGraphs

    rec = EagerAndRecordGraphs()
    torch.compile(Fn(fn), backend=rec)(*inputs)
    (gm,) = rec.graphs
    return gm


def test_guard_leaves_last_axis_softmax_alone():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    gm = _dynamo_graph(lambda q, k, v: _scores(q, k).softmax(-1) @ v, q, k, v)
    assert guard_for_inductor(gm) is gm


def test_guard_rewrites_only_non_last_axes():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    gm = _dynamo_graph(FORMS["method dim=-2"], q, k, v)
    assert len(needs_guard(gm)) == 1
    new = guard_for_inductor(gm)
    assert new is not gm and not needs_guard(new)
    assert len(needs_guard(gm)) == 1  # the graph Dynamo gave is not changed
    torch.testing.assert_close(new(q, k, v)[0], gm(q, k, v)[0])
