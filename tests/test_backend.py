"""Backend options, fallbacks, the report and the debug switch."""

import json
import logging

import pytest
import torch
from torch import nn

import attnfx
from attnfx.passes import verify
from attnfx.testing import assert_attention_close


class Attn(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if self.causal:
            n = q.shape[-2]
            i = torch.arange(n, device=q.device)
            s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
        return torch.softmax(s, dim=-1) @ v


def _qkv(n=12, d=16, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(2, 2, n, d, generator=g).requires_grad_(requires_grad) for _ in range(3)
    )


@pytest.fixture
def count_verify(monkeypatch):
    calls = []
    real = verify.verify_site

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(verify, "verify_site", counting)
    return calls


@pytest.mark.parametrize("mode,expected", [("always", 2), ("off", 0)])
def test_verify_modes(count_verify, mode, expected):
    m = Attn()
    for _ in range(2):
        torch._dynamo.reset()
        torch.compile(m, backend="attnfx", options={"verify": mode})(*_qkv())
    assert len(count_verify) == expected
    assert attnfx.counters["rewritten.softmax"] == 2


def test_verify_first_verifies_each_site_once(count_verify):
    m = Attn(causal=True)  # a spec no other test verifies
    q, k, v = _qkv(d=24)
    for _ in range(2):
        torch._dynamo.reset()
        torch.compile(m, backend="attnfx")(q, k, v)
    assert len(count_verify) <= 1
    assert attnfx.counters["rewritten.softmax"] == 2


def test_internal_error_keeps_graph_and_counts(monkeypatch):
    import attnfx.backend as backend

    def boom(gm):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(backend, "find_sites", boom)
    m = Attn()
    q, k, v = _qkv()
    out = torch.compile(m, backend="attnfx")(q, k, v)
    torch.testing.assert_close(out, m(q, k, v))
    assert attnfx.counters["kept.internal error"] == 1
    assert attnfx.counters["rewritten.softmax"] == 0


def test_inner_eager_and_inductor_agree():
    m = Attn(causal=True)
    q, k, v = _qkv()
    a = torch.compile(m, backend="attnfx", options={"inner": "eager"})(q, k, v)
    torch._dynamo.reset()
    b = torch.compile(m, backend="attnfx")(q, k, v)
    torch.testing.assert_close(a, b)
    assert attnfx.counters["rewritten.softmax"] == 2


def test_report_table_and_json():
    rep = attnfx.explain(Attn(causal=True), *_qkv())
    assert rep.count("softmax") == 1
    (site,) = rep.sites
    assert site.kind == "softmax" and site.status == "rewritten" and site.reason is None
    assert site.spec.mask_class.kind == "causal"
    assert site.max_rel_err is not None and 0 <= site.max_rel_err < 1e-3
    text = str(rep)
    assert "causal" in text and "rewritten" in text and "1 attention site(s)" in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["sites"][0]["spec"]["mask"] == "causal"


class ChunkedCausal(nn.Module):
    """Causal attention inside chunks of 64 tokens (block-diagonal causal)."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        i = torch.arange(q.shape[-2], device=q.device)
        keep = (i[:, None] // 64 == i[None, :] // 64) & (i[None, :] <= i[:, None])
        return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def test_report_density():
    # the share of (query tile, key tile) pairs the forward kernel visits (float32:
    # 64 x 64 tiles, 16 x 16 of them at n = 1024)
    rep = attnfx.explain(Attn(causal=True), *_qkv(n=1024))
    (site,) = rep.sites
    assert site.density == 136 / 256  # query tile r visits key tiles 0 .. r
    assert "density" in str(rep) and "0.531" in str(rep)
    assert json.loads(rep.to_json())["sites"][0]["density"] == site.density
    assert attnfx.explain(Attn(), *_qkv()).sites[0].density == 1.0
    (chunked,) = attnfx.explain(ChunkedCausal(), *_qkv(n=1024)).rewritten
    assert chunked.spec.mask_class.kind == "predicate"
    assert chunked.density == 16 / 256  # C / N: each query tile meets its own chunk


def test_debug_switch_says_why(monkeypatch, caplog):
    class NotAttn(nn.Module):
        def forward(self, q, k):
            return torch.softmax(q @ k.transpose(-2, -1), dim=-1).sum(-1)

    monkeypatch.setenv("ATTNFX_DEBUG", "1")
    with caplog.at_level(logging.WARNING, logger="attnfx"):
        torch.compile(NotAttn(), backend="attnfx")(*_qkv()[:2])
    assert "probabilities are not multiplied by values" in caplog.text


def test_triton_path_end_to_end_under_interpreter(monkeypatch):
    """The generated kernels (not the PyTorch reference) run the rewritten site, forward
    and backward, and match eager under the rule."""
    from attnfx import codegen

    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    m = Attn(causal=True)
    q, k, v = _qkv(n=20, requires_grad=True)
    before = dict(codegen.LAUNCHES)
    out = torch.compile(m, backend="attnfx", options={"verify": "always"})(q, k, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    after = dict(codegen.LAUNCHES)
    assert after.get("fwd", 0) > before.get("fwd", 0)
    assert after.get("bwd_pre", 0) > before.get("bwd_pre", 0)
    assert attnfx.counters["rewritten.softmax"] == 1
    base = m(q, k, v)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    gold = m(qd, kd, vd)
    assert_attention_close(out.detach(), base.detach(), gold.detach())
    gbase = torch.autograd.grad(base, (q, k, v), g)
    ggold = torch.autograd.grad(gold, (qd, kd, vd), g.double())
    for c, b, gd in zip(grads, gbase, ggold):
        assert_attention_close(c, b, gd, grad=True, check_strides=False)


def test_inner_compiler_failure_falls_back_and_is_counted(monkeypatch):
    """An inner compiler that rejects the rewritten graph: the original graph is compiled
    instead, and the site is counted as kept, not rewritten."""
    import attnfx.backend as backend

    real = backend._inner

    def picky(gm, example_inputs, opts):
        if any(
            n.op == "call_function" and "site_attention" in str(n.target) for n in gm.graph.nodes
        ):
            raise RuntimeError("planted inner-compiler failure")
        return real(gm, example_inputs, opts)

    monkeypatch.setattr(backend, "_inner", picky)
    m = Attn()
    q, k, v = _qkv()
    out = torch.compile(m, backend="attnfx")(q, k, v)
    torch.testing.assert_close(out, m(q, k, v))
    assert attnfx.counters["rewritten.softmax"] == 0
    assert attnfx.counters["kept.inner compiler failed on rewritten graph"] == 1


def test_inductor_cache_keys_on_the_op_contract(monkeypatch):
    """Inductor's FX graph cache keys on the graph's code, not on a custom op's fake impl:
    a graph cached against another attnfx op contract (e.g. a log-sum-exp of another
    shape) must not be served.  The inner compile carries ``backend.op_contract`` in the
    key (a no-op post-grad pass's uuid)."""
    import uuid

    from torch._dynamo.utils import counters

    import attnfx.backend as B

    def f(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.25
        keep = torch.ones(16, 16, dtype=torch.bool).tril()
        return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v

    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    seen = []
    for contract in (first, first, second):
        monkeypatch.setattr(B, "op_contract", lambda c=contract: c)
        torch._dynamo.reset()
        counters.clear()
        torch.compile(f, backend="attnfx", options={"cpu": "always"})(q, k, v)
        seen.append(
            (counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
        )
    assert seen == [(0, 1), (1, 0), (0, 1)], seen
    torch._dynamo.reset()
