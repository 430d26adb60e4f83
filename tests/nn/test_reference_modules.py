"""The plain-PyTorch reference modules of ``attnfx.nn`` (issue 3 item 2, issue 5 item 3):
compiled with ``backend="attnfx"`` each is recognized as its kind (``"sigmoid"``,
``"temperature"``) and computes what eager computes, outputs and every parameter's
gradient, under the equivalence rule (cand = compiled, base = eager in float32, gold =
eager in float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import attnfx
from attnfx.nn import SelectiveAttention, SigmoidAttention
from attnfx.testing import assert_attention_close
from attnfx.variants import VARIANTS

B, H, N, D = 2, 2, 16, 16
C = H * D


def _x(n=N, seed=5):
    return torch.randn(B, n, C, generator=torch.Generator().manual_seed(seed))


def check_module(m, x, kind, *, transcendental=False):
    """Compile ``m``: one ``kind`` site is rewritten, nothing kept; the output and the
    gradients of ``x`` and of every parameter pass the rule against eager."""
    m = m.eval()
    base_m, gold_m = copy.deepcopy(m), copy.deepcopy(m).double()
    cm = torch.compile(m, backend="attnfx")
    xc, xb = (x.detach().clone().requires_grad_(True) for _ in range(2))
    xg = x.detach().double().requires_grad_(True)
    cand = cm(xc)
    counters = dict(attnfx.counters)
    assert attnfx.counters[f"rewritten.{kind}"] == 1, counters
    assert not [k for k in counters if k.startswith("kept.")], counters
    base, gold = base_m(xb), gold_m(xg)
    kw = {"transcendental": transcendental}
    assert_attention_close(cand, base, gold, context="output", **kw)
    cot = torch.randn(cand.shape, generator=torch.Generator().manual_seed(7))
    cand.backward(cot)
    base.backward(cot)
    gold.backward(cot.double())
    assert_attention_close(xc.grad, xb.grad, xg.grad, grad=True, context="grad x", **kw)
    named = zip(m.named_parameters(), base_m.parameters(), gold_m.parameters(), strict=True)
    for (name, pc), pb, pg in named:
        assert pc.grad is not None, f"no gradient for parameter {name}"
        assert_attention_close(pc.grad, pb.grad, pg.grad, grad=True, context=name, **kw)
    rep = attnfx.explain(m, x)
    assert rep.count(kind) == 1 and not rep.kept, str(rep)
    assert rep.rewritten[0].kind == kind, str(rep)
    return rep


# ---------------------------------------------------------------------------------------
# SigmoidAttention
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bias", [None, -3.0], ids=["bias=-log n", "bias=-3.0"])
def test_sigmoid_attention(causal, bias):
    torch.manual_seed(0)
    m = SigmoidAttention(C, H, causal=causal, bias=bias)
    rep = check_module(m, _x(), "sigmoid", transcendental=True)
    spec = rep.rewritten[0].spec
    assert spec.activation == "sigmoid", str(rep)
    assert (spec.mask_class.kind == "causal") == causal, str(rep)


def test_sigmoid_attention_default_bias_is_minus_log_n():
    """The module's default bias is -log n: σ(s - log n) differs from σ(s)."""
    torch.manual_seed(0)
    m = SigmoidAttention(C, H).eval()
    ref = SigmoidAttention(C, H, bias=0.0).eval()
    ref.load_state_dict(m.state_dict())
    x = _x()
    assert not torch.allclose(m(x), ref(x))
    pinned = SigmoidAttention(C, H, bias=-float(torch.log(torch.tensor(float(N))))).eval()
    pinned.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), pinned(x))


def test_sigmoid_attention_dynamic_lengths():
    from torch._dynamo.utils import counters as dynamo_counters

    dynamo_counters.clear()
    torch.manual_seed(0)
    m = SigmoidAttention(C, H, causal=True).eval()
    gold_m = copy.deepcopy(m).double()
    cm = torch.compile(m, backend="attnfx")
    with torch.no_grad():
        for n in (12, 20, 28):
            x = _x(n)
            assert_attention_close(
                cm(x), m(x), gold_m(x.double()), transcendental=True, context=f"N={n}"
            )
    assert dynamo_counters["stats"]["unique_graphs"] <= 2
    assert attnfx.counters["rewritten.sigmoid"] >= 1, dict(attnfx.counters)
    assert not [k for k in attnfx.counters if k.startswith("kept.")], dict(attnfx.counters)


# ---------------------------------------------------------------------------------------
# SelectiveAttention
# ---------------------------------------------------------------------------------------


class PlainSoftmax(nn.Module):
    """Softmax attention with SelectiveAttention's qkv / proj weights and no temperature."""

    def __init__(self, sel: SelectiveAttention):
        super().__init__()
        self.qkv, self.proj, self.causal = sel.qkv, sel.proj, sel.causal
        self.h, self.d = sel.num_heads, sel.head_dim

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        s = q @ k.transpose(-2, -1) / self.d**0.5
        if self.causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        o = s.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


def _selective(causal, value_temperature, perturb):
    torch.manual_seed(0)
    m = SelectiveAttention(C, H, causal=causal, value_temperature=value_temperature)
    if perturb:
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for lin in (m.tau_q, m.tau_v):
                if lin is not None:
                    lin.weight.copy_(0.3 * torch.randn(lin.weight.shape, generator=g))
            m.pos_q.copy_(torch.tensor([0.2, -0.1])[:H])
    return m


CASES = [(c, vt) for c in (False, True) for vt in (False, True)]
IDS = [f"{'causal' if c else 'full'}-{'vtemp' if vt else 'qtemp'}" for c, vt in CASES]


@pytest.mark.parametrize("causal, value_temperature", CASES, ids=IDS)
def test_selective_identity_at_init(causal, value_temperature):
    """τ ≡ 1 at init: eager output equals plain softmax attention with the same weights,
    and the compiled module passes the rule against that plain attention."""
    m = _selective(causal, value_temperature, perturb=False).eval()
    plain = PlainSoftmax(m).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)
        cand = torch.compile(m, backend="attnfx")(x)
        gold = copy.deepcopy(plain).double()(x.double())
        assert_attention_close(cand, plain(x), gold, context="compiled vs plain softmax")
    assert attnfx.counters["rewritten.temperature"] == 1, dict(attnfx.counters)


@pytest.mark.parametrize("causal, value_temperature", CASES, ids=IDS)
def test_selective_attention_perturbed(causal, value_temperature):
    m = _selective(causal, value_temperature, perturb=True)
    x = _x()
    assert not torch.allclose(m(x), PlainSoftmax(m)(x)), "perturbation had no effect"
    rep = check_module(m, x, "temperature", transcendental=True)
    assert (rep.rewritten[0].spec.mask_class.kind == "causal") == causal, str(rep)


# ---------------------------------------------------------------------------------------
# Every reference module of the variant registry
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "v", [v for v in VARIANTS if v.reference is not None], ids=lambda v: v.kind
)
def test_registry_reference_is_rewritten_as_its_kind(v):
    """Each record's reference module, built with its defaults, is one site of the
    record's kind."""
    torch.manual_seed(0)
    check_module(v.load("reference")(C, H), _x(), v.kind, transcendental=True)
