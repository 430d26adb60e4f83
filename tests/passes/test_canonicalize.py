"""Canonicalize turns each surface spelling into its one canonical call, exactly."""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from attnfx.passes.canonicalize import canonicalize


def _graph(fn, *inputs):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(*inputs)
    return graphs[0]


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _qk():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)


@pytest.mark.parametrize(
    "fn,want",
    [
        (lambda q, k: q @ k.transpose(-2, -1), [torch.transpose, torch.matmul]),
        (lambda q, k: torch.matmul(q, k.mT), [torch.transpose, torch.matmul]),
        (lambda q, k: q.matmul(k.permute(0, 1, 3, 2)), [torch.permute, torch.matmul]),
        (lambda q, k: torch.einsum("bhqd,bhkd->bhqk", q, k), [torch.transpose, torch.matmul]),
        (lambda q, k: F.softmax(q + k, dim=-1) * 2.0, [operator.add, torch.softmax, operator.mul]),
        (
            lambda q, k: (q - k).softmax(-1).div(3.0),
            [operator.sub, torch.softmax, operator.truediv],
        ),
        (
            lambda q, k: torch.swapaxes(q, -2, -1).add(k.mT),
            [torch.transpose, torch.transpose, operator.add],
        ),
        (lambda q, k: q.masked_fill(k > 0, -1.0), [operator.gt, torch.masked_fill]),
    ],
)
def test_canonical_targets_and_values(fn, want):
    q, k = _qk()
    gm = _graph(fn, q, k)
    before = gm(q, k)
    canonicalize(gm)
    assert _targets(gm) == want
    after = gm(q, k)
    assert torch.equal(before[0], after[0])


def test_baddbmm_splits_into_scale_and_bias():
    g = torch.Generator().manual_seed(1)
    bias, a, b = (
        torch.randn(4, 5, 5, generator=g),
        torch.randn(4, 5, 8, generator=g),
        torch.randn(4, 8, 5, generator=g),
    )
    fn = lambda bias, a, b: torch.baddbmm(bias, a, b, beta=0.5, alpha=0.25)  # noqa: E731
    gm = _graph(fn, bias, a, b)
    want = fn(bias, a, b)
    canonicalize(gm)
    assert torch.baddbmm not in _targets(gm)
    assert {torch.matmul, operator.mul, operator.add} <= set(_targets(gm))
    torch.testing.assert_close(gm(bias, a, b)[0], want)


def test_untouched_forms_stay():
    q, k = _qk()
    gm = _graph(lambda q, k: torch.log_softmax(q, -1) + k.sum(), q, k)
    assert canonicalize(gm) == 0
