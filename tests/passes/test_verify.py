"""The verify pass: the site's subgraph against its candidate, on real and random inputs."""

import torch
from torch import nn

from attnfx.passes import graph as G
from attnfx.passes import verify
from attnfx.passes.canonicalize import canonicalize
from attnfx.passes.match import find_sites


class Attn(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


def _prepare():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 2, 9, 16, generator=g) for _ in range(3)]
    torch.compile(Attn(), backend=backend)(*inputs)
    gm, ex = graphs[0]
    canonicalize(gm)
    (site,) = find_sites(gm)
    gnx = G.to_networkx(gm.graph)
    return gm, ex, site, gnx


def test_correct_rewrite_is_accepted():
    gm, ex, site, gnx = _prepare()
    orig, cand, ext = verify.build_graphs(gm, gnx, site)
    assert len(ext) == 3  # q, k, v: the region reads nothing else
    captured = verify.capture_inputs(gm, ex, set(ext))
    v = verify.verify_site(gm, gnx, site, captured)
    assert v.ok and v.max_rel_err < 1e-5


def test_wrong_rewrite_is_rejected(monkeypatch):
    from attnfx import ops

    gm, ex, site, gnx = _prepare()
    real = ops.reference_attention
    monkeypatch.setattr(
        ops, "reference_attention", lambda *a, **k: (real(*a, **k)[0] * 1.001, real(*a, **k)[1])
    )
    captured = verify.capture_inputs(gm, ex, set(verify.build_graphs(gm, gnx, site)[2]))
    v = verify.verify_site(gm, gnx, site, captured)
    assert not v.ok and "max rule" in v.message


def test_capture_does_not_mutate_inputs():
    class Mut(nn.Module):
        def forward(self, x, buf):
            buf.add_(1.0)
            return x * 2

    graphs = []
    torch._dynamo.reset()
    torch.compile(Mut(), backend=lambda gm, ex: graphs.append((gm, ex)) or gm)(
        torch.ones(2), torch.zeros(2)
    )
    gm, ex = graphs[0]
    before = [t.clone() for t in ex if isinstance(t, torch.Tensor)]
    verify.capture_inputs(gm, ex, set(gm.graph.nodes))
    after = [t for t in ex if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
