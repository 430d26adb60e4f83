"""On CPU the backend rewrites a site only where the op's CPU path beats inductor's code
for the eager form (option ``cpu="auto"``, the default): attnfx never makes a CPU model
slower than the backend it wraps.  The rest is kept with a counted reason."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfx

SLOWER = "on CPU, inductor is faster for this form"
SDPA = "on CPU, the program's SDPA call already runs the fused kernel"
INDUCTOR_SDPA = "on CPU, inductor's own SDPA pattern fuses this form"


class Softmax(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v


class Sigmoid(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) - math.log(k.shape[-2])
        return torch.sigmoid(s) @ v


class Sdpa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _site(model, grad, cpu="auto"):
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, 2, 32, 16, generator=g).requires_grad_(grad) for _ in range(3)]
    (site,) = attnfx.explain(model, *qkv, options={"cpu": cpu}).sites
    return site


class Causal(nn.Module):
    def forward(self, q, k, v):
        n = q.shape[-2]
        keep = torch.ones(n, n, dtype=torch.bool).tril()
        s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v


def test_fused_forms_are_rewritten_on_cpu():
    # inference: the op runs the fused SDPA kernel, which inductor does not reach from
    # this eager form
    assert _site(Causal(), grad=False).status == "rewritten"


def test_forms_inductor_fuses_itself_are_kept():
    """``softmax(q @ kᵀ / c) @ v`` is one of inductor's own SDPA patterns: it runs the same
    fused kernel without the op's dispatch and checks."""
    site = _site(Softmax(), grad=False)
    assert site.status == "kept" and site.reason == INDUCTOR_SDPA, site
    assert _site(Softmax(), grad=False, cpu="always").status == "rewritten"


def test_the_inductor_probe_answers_per_form_and_leaves_its_counters():
    from torch._dynamo.utils import counters

    from attnfx.passes import inductor_probe

    answers = {}

    def probe(gm, example_inputs):  # Dynamo's graph, with its fake example values
        before = {k: dict(v) for k, v in counters.items()}
        ext = [n for n in gm.graph.nodes if n.op == "placeholder"]
        answers[name] = inductor_probe.fuses_to_sdpa(gm, ext)
        assert {k: dict(v) for k, v in counters.items()} == before
        return gm

    qkv = [torch.randn(1, 2, 32, 16) for _ in range(3)]
    for name, model in (("softmax", Softmax()), ("causal", Causal()), ("sigmoid", Sigmoid())):  # noqa: B007 (read by probe)
        torch._dynamo.reset()
        torch.compile(model, backend=probe)(*qkv)
    assert answers == {"softmax": True, "causal": False, "sigmoid": False}


def test_sdpa_calls_are_kept_on_cpu():
    """An SDPA call already runs PyTorch's fused CPU kernel (what inductor hands on): the
    op would run the same kernel plus its per-call checks."""
    for grad in (False, True):
        site = _site(Sdpa(), grad=grad)
        assert site.status == "kept" and site.reason == SDPA, site
    assert _site(Sdpa(), grad=True, cpu="always").status == "rewritten"


def test_slower_forms_are_kept_with_the_reason():
    for model, grad in ((Sigmoid(), False), (Softmax(), True)):
        site = _site(model, grad)
        assert site.status == "kept" and site.reason == SLOWER, site


def test_always_rewrites_them():
    assert _site(Sigmoid(), grad=False, cpu="always").status == "rewritten"
    assert _site(Softmax(), grad=True, cpu="always").status == "rewritten"


def test_the_policy_counts_its_refusals():
    attnfx.reset_counters()
    torch._dynamo.reset()
    qkv = [torch.randn(1, 2, 32, 16) for _ in range(3)]
    cm = torch.compile(Sigmoid(), backend="attnfx", options={"cpu": "auto"})
    torch.testing.assert_close(cm(*qkv), Sigmoid()(*qkv))
    assert attnfx.counters[f"kept.{SLOWER}"] == 1, dict(attnfx.counters)


class CausalByIndex(nn.Module):
    """A causal mask built from positions: its predicate is read back and checked."""

    def forward(self, q, k, v):
        n = q.shape[-2]
        i = torch.arange(n)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
        return s.softmax(-1) @ v


def _count_proofs(monkeypatch):
    from attnfx.passes import masks

    ran = []
    for name in ("_verify", "_check_rows"):
        real = getattr(masks, name)

        def counted(*a, _real=real, _name=name, **kw):
            ran.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(masks, name, counted)
    return ran


def test_a_kept_cpu_site_never_runs_its_mask_and_index_checks(monkeypatch):
    """NAT with its bias table on CPU is kept (inductor is faster): the N² checks of its
    mask and of the table's index are the rewrite's, and are not run for it."""
    from attnfx.nn import NeighborhoodAttention2D

    m = NeighborhoodAttention2D(32, 2, 3, rel_pos_bias=True)
    x = torch.randn(1, 6, 7, 32)
    ran = _count_proofs(monkeypatch)
    (site,) = attnfx.explain(m, x, options={"cpu": "auto"}).sites
    assert site.status == "kept" and site.reason == SLOWER, site
    assert site.kind == "neighborhood"  # recognized, then kept
    assert ran == []
    (site,) = attnfx.explain(m, x, options={"cpu": "always"}).sites
    assert site.status == "rewritten" and "_verify" in ran  # rewritten: checked


def test_a_rewritten_cpu_site_runs_its_checks(monkeypatch):
    ran = _count_proofs(monkeypatch)
    qkv = [torch.randn(1, 2, 32, 16) for _ in range(3)]
    (site,) = attnfx.explain(CausalByIndex(), *qkv, options={"cpu": "auto"}).sites
    assert site.status == "rewritten" and site.spec.mask_class.kind == "causal", site
    assert ran == ["_verify"]


def test_a_deferred_check_that_fails_keeps_the_site(monkeypatch):
    from attnfx.passes import masks

    def wrong(*a, **kw):
        raise masks._Refuse("pair (3, 5) differs")

    monkeypatch.setattr(masks, "_verify", wrong)
    qkv = [torch.randn(1, 2, 32, 16) for _ in range(3)]
    attnfx.reset_counters()
    (site,) = attnfx.explain(CausalByIndex(), *qkv, options={"cpu": "auto"}).sites
    assert site.status == "kept", site
    assert site.reason == "mask disagrees with its expression: pair (3, 5) differs"
    torch._dynamo.reset()
    cm = torch.compile(CausalByIndex(), backend="attnfx", options={"cpu": "auto"})
    torch.testing.assert_close(cm(*qkv), CausalByIndex()(*qkv))
