"""Sigmoid attention (issue 3, item 1) in its eager spellings: each form is compiled with
``backend="attnfx"``, must be rewritten as a ``"sigmoid"`` site (counted under
``rewritten.sigmoid``), and must compute what eager computes under the equivalence rule
(``assert_attention_close``: cand = compiled, base = eager in the working dtype, gold =
eager in float64; ``transcendental=True``: σ is a transcendental score transform).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfx
from attnfx.testing import assert_attention_close, assert_rewrites_match_eager

B, H, N, D = 2, 2, 16, 32
NEG = float("-inf")
KIND = "sigmoid"


# ---------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------


def _qkv(n=N, d=D, h=H, hk=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hk = hk or h
    return [torch.randn(B, heads, n, d, generator=g).to(dtype) for heads in (h, hk, hk)]


def _keep(n=N, seed=1):
    """A random bool keep-mask (B, 1, N, N) with the diagonal always kept."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((B, 1, n, n), generator=g) > 0.4) | torch.eye(n, dtype=torch.bool)


def check_form(m, inputs, *, grad=False, grad_idx=(0, 1, 2), params=False, sites=1):
    """``sites`` sigmoid sites rewritten, nothing kept, outputs (and, with ``grad``, input
    and — with ``params`` — parameter gradients) equal eager under the rule (σ is a
    transcendental score transform)."""
    return assert_rewrites_match_eager(
        m,
        inputs,
        kind=KIND,
        sites=sites,
        grad=grad,
        grad_idx=grad_idx,
        params=params,
        transcendental=True,
    )


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _scores(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


# ---------------------------------------------------------------------------------------
# Spellings of σ (bias -log n, a Python float from the static shape)
# ---------------------------------------------------------------------------------------


def _b(q):
    return -math.log(q.shape[-2])


SPELLINGS = {
    "torch.sigmoid": lambda q, k, v: torch.sigmoid(_scores(q, k) + _b(q)) @ v,
    "F.sigmoid": lambda q, k, v: F.sigmoid(_scores(q, k) + _b(q)) @ v,
    "Tensor.sigmoid": lambda q, k, v: (_scores(q, k) + _b(q)).sigmoid() @ v,
    "torch.special.expit": lambda q, k, v: torch.special.expit(_scores(q, k) + _b(q)) @ v,
    "F.logsigmoid.exp": lambda q, k, v: F.logsigmoid(_scores(q, k) + _b(q)).exp() @ v,
    "1/(1+exp(-x))": lambda q, k, v: (1 / (1 + torch.exp(-(_scores(q, k) + _b(q))))) @ v,
}
GRAD_SPELLINGS = ("torch.sigmoid", "F.logsigmoid.exp", "1/(1+exp(-x))")


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling(name):
    check_form(Fn(SPELLINGS[name]), _qkv())


@pytest.mark.parametrize("name", GRAD_SPELLINGS)
def test_spelling_grad(name):
    check_form(Fn(SPELLINGS[name]), _qkv(), grad=True)


def test_spelling_report_kind():
    rep = attnfx.explain(Fn(SPELLINGS["torch.sigmoid"]), *_qkv())
    assert rep.count(KIND) == 1 and not rep.kept, str(rep)
    (site,) = rep.rewritten
    assert site.kind == KIND and site.spec.activation == "sigmoid", str(rep)


# ---------------------------------------------------------------------------------------
# Bias forms
# ---------------------------------------------------------------------------------------


class Bias(nn.Module):
    def __init__(self, how, value=-2.5):
        super().__init__()
        self.how = how
        self.value = value
        self.register_buffer("b0", torch.tensor(value))
        self.register_buffer("b1", torch.tensor([value]))

    def forward(self, q, k, v):
        s = _scores(q, k)
        n = k.shape[-2]
        if self.how == "float":
            s = s + self.value
        elif self.how == "buffer-0d":
            s = s + self.b0
        elif self.how == "buffer-[1]":
            s = s + self.b1
        elif self.how == "-math.log(n)":
            s = s - math.log(n)
        else:  # "-torch.log(tensor(n))"
            s = s - torch.log(torch.tensor(n, dtype=torch.float32))
        return torch.sigmoid(s) @ v


BIASES = ["float", "buffer-0d", "buffer-[1]", "-math.log(n)", "-torch.log(tensor(n))"]


@pytest.mark.parametrize("how", BIASES)
def test_bias(how):
    check_form(Bias(how), _qkv(), grad=how in ("buffer-0d", "-torch.log(tensor(n))"))


def test_bias_tensor_log_n_symbolic_over_dynamic_lengths():
    """``-torch.log(torch.tensor(n))``: the dynamic recompile keeps the bias symbolic in n
    (``log(NK)`` in the spec), and the outputs are right at every length."""
    records, graphs = _dynamic_run("-torch.log(tensor(n))")
    assert graphs <= 2, graphs
    assert len(records) == 2, [r.spec.describe() for r in records]
    assert "log(NK)" in records[-1].spec.describe(), records[-1].spec.describe()


def test_bias_math_log_n_right_at_every_length():
    """``-math.log(n)``: Dynamo specializes ``math.log`` of a size (a recompile per length,
    each with its constant bias); every length must still be rewritten and right."""
    records, _ = _dynamic_run("-math.log(n)")
    assert len(records) >= 2, records


def _dynamic_run(how):
    from torch._dynamo.utils import counters as dynamo_counters

    dynamo_counters.clear()
    m = Bias(how).eval()
    gold_m = copy.deepcopy(m).double()
    cm = torch.compile(m, backend="attnfx")
    with attnfx.report.collecting() as records:
        for n in (12, 20, 28):
            inputs = _qkv(n=n)
            cand = cm(*inputs)
            base = m(*inputs)
            gold = gold_m(*[x.double() for x in inputs])
            assert_attention_close(cand, base, gold, transcendental=True, context=f"N={n}")
    assert records and all(r.status == "rewritten" and r.kind == KIND for r in records), records
    return records, dynamo_counters["stats"]["unique_graphs"]


# ---------------------------------------------------------------------------------------
# Scale placements
# ---------------------------------------------------------------------------------------


def _scale_div_sqrt(q, k, v):
    return torch.sigmoid(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) - 2.0) @ v


def _scale_pow(q, k, v):
    return torch.sigmoid(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 - 2.0) @ v


def _scale_preq(q, k, v):
    q = q * q.shape[-1] ** -0.5
    return torch.sigmoid(q @ k.transpose(-2, -1) - 2.0) @ v


SCALES = {"div-sqrt(d)": _scale_div_sqrt, "mul-d**-0.5": _scale_pow, "prescaled-q": _scale_preq}


@pytest.mark.parametrize("name", list(SCALES))
def test_scale(name):
    check_form(Fn(SCALES[name]), _qkv(), grad=name == "prescaled-q")
    rep = attnfx.explain(Fn(SCALES[name]), *_qkv())
    assert rep.count(KIND) == 1, str(rep)
    # A scale applied to q before the product stays on q, outside the op (as eager computes
    # it); one applied to the scores is the spec's.
    want = 1.0 if name == "prescaled-q" else D**-0.5
    assert rep.rewritten[0].spec.scale == pytest.approx(want), str(rep)


# ---------------------------------------------------------------------------------------
# Masks applied before σ
# ---------------------------------------------------------------------------------------


def _fill_inf(q, k, v, keep):
    return torch.sigmoid((_scores(q, k) - 2.0).masked_fill(~keep, NEG)) @ v


def _fill_finfo_max(q, k, v, keep):
    s = _scores(q, k) - 2.0
    return torch.sigmoid(s.masked_fill(~keep, -torch.finfo(s.dtype).max)) @ v


def _causal_arange(q, k, v):
    i = torch.arange(q.shape[-2], device=q.device)[:, None]
    j = torch.arange(k.shape[-2], device=q.device)[None, :]
    s = (_scores(q, k) - math.log(k.shape[-2])).masked_fill(j > i, NEG)
    return torch.sigmoid(s) @ v


def _alibi(q, k, v, bias):
    return torch.sigmoid(_scores(q, k) + bias - 2.0) @ v


def _alibi_bias(n=N):
    slopes = torch.tensor([2.0**-1, 2.0**-4])[:H]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (slopes[:, None, None] * -(i - j).abs()).unsqueeze(0)  # (1, H, N, N)


def test_mask_fill_inf():
    check_form(Fn(_fill_inf), _qkv() + [_keep()], grad=True)


def test_mask_fill_finfo_max():
    check_form(Fn(_fill_finfo_max), _qkv() + [_keep()])


def test_mask_causal_arange():
    check_form(Fn(_causal_arange), _qkv(), grad=True)
    rep = attnfx.explain(Fn(_causal_arange), *_qkv())
    assert rep.count(KIND) == 1, str(rep)
    mc = rep.rewritten[0].spec.mask_class
    assert mc.kind == "causal", str(rep)


def test_mask_alibi_additive_tensor():
    check_form(Fn(_alibi), _qkv() + [_alibi_bias()], grad=True)


def test_mask_fully_masked_row_yields_zero():
    """No normalizer: a row with every key filled with -inf is exactly 0 (eager too)."""
    keep = _keep()
    keep[0, 0, 3] = False
    out = check_form(Fn(_fill_inf), _qkv() + [keep])
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))


# ---------------------------------------------------------------------------------------
# GQA and dropout
# ---------------------------------------------------------------------------------------

HK, G_ = 2, 2


def _repeat_kv(x, g):
    b, hk, n, d = x.shape
    return x[:, :, None, :, :].expand(b, hk, g, n, d).reshape(b, hk * g, n, d)


def _gqa_repeat_kv(q, k, v):
    k, v = _repeat_kv(k, G_), _repeat_kv(v, G_)
    return torch.sigmoid(_scores(q, k) - math.log(k.shape[-2])) @ v


def _gqa_repeat_interleave(q, k, v):
    k, v = k.repeat_interleave(G_, dim=1), v.repeat_interleave(G_, dim=1)
    return torch.sigmoid(_scores(q, k) - math.log(k.shape[-2])) @ v


@pytest.mark.parametrize(
    "fn", [_gqa_repeat_kv, _gqa_repeat_interleave], ids=["repeat_kv", "repeat_interleave"]
)
def test_gqa(fn):
    inputs = _qkv(h=HK * G_, hk=HK)
    check_form(Fn(fn), inputs, grad=fn is _gqa_repeat_kv)
    rep = attnfx.explain(Fn(fn), *inputs)
    assert rep.count(KIND) == 1, str(rep)
    assert rep.rewritten[0].spec.gqa_group == G_, str(rep)


class DropoutEval(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.functional = functional
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v):
        p = torch.sigmoid(_scores(q, k) - 2.0)
        p = F.dropout(p, 0.1, training=self.training) if self.functional else self.drop(p)
        return p @ v


@pytest.mark.parametrize("functional", [False, True], ids=["nn.Dropout", "F.dropout"])
def test_dropout_eval(functional):
    check_form(DropoutEval(functional), _qkv())
