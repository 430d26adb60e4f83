"""Temperature-scaled attention (issue 5, items 1–2): scores rescaled per query, per head or
by position before the softmax, written the ways real models write them.  Each form is
compiled with ``backend="attnfx"``, must be rewritten as a ``"temperature"`` site
(counted under ``rewritten.temperature``) and must compute what eager computes under the
equivalence rule (cand = compiled, base = eager in the working dtype, gold = eager in
float64), gradients of learnable temperatures included; the refusals keep the site with
their reason and still compute what eager computes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import attnfx
from attnfx.testing import assert_rewrites_match_eager

B, H, N, D = 2, 2, 16, 32
C = H * D
NEG = float("-inf")
KIND = "temperature"


# ---------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------


def _qkv(n=N, d=D, h=H, layout="bhnd", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, h, n, d) if layout == "bhnd" else (B, n, h, d)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def _x(n=N, seed=5):
    return [torch.randn(B, n, C, generator=torch.Generator().manual_seed(seed))]


def _row_temp(n=N, seed=2, shape=None):
    """A positive per-row temperature (B, H, N, 1) in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 1.5 * torch.rand(shape or (B, H, n, 1), generator=g)


def check_form(
    m, inputs, *, grad=False, grad_idx=(0, 1, 2), params=False, transcendental=False, sites=1
):
    """``sites`` temperature sites rewritten, nothing kept, outputs (and, with ``grad``,
    input and — with ``params`` — parameter gradients) equal eager under the rule."""
    return assert_rewrites_match_eager(
        m,
        inputs,
        kind=KIND,
        sites=sites,
        grad=grad,
        grad_idx=grad_idx,
        params=params,
        transcendental=transcendental,
    )


def check_kept(m, inputs, reason_any, *, activation_kind="softmax"):
    """Compile ``m``: its one site is kept with a reason containing one of ``reason_any``,
    nothing is rewritten, and the output equals eager's."""
    m = m.eval()
    got = torch.compile(m, backend="attnfx")(*inputs)
    counters = dict(attnfx.counters)
    assert not [k for k in counters if k.startswith("rewritten.")], counters
    kept = [k for k in counters if k.startswith("kept.")]
    assert len(kept) == 1, counters
    assert any(r in kept[0] for r in reason_any), counters
    torch.testing.assert_close(got, m(*inputs))
    rep = attnfx.explain(m, *inputs)
    assert rep.count(status="kept") == 1 and not rep.rewritten, str(rep)
    assert any(r in rep.kept[0].reason for r in reason_any), str(rep)
    return got


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _scores(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def _causal(n, device=None):
    i = torch.arange(n, device=device)
    return i[None, :] > i[:, None]  # True = masked out


# ---------------------------------------------------------------------------------------
# Selective attention: q * tau[..., None], tau from a small Linear of the hidden state
# ---------------------------------------------------------------------------------------


class SelectiveQ(nn.Module):
    """Per-token query temperature ``τ = 1 + tanh(W·x)`` (a Linear C → H), applied as
    ``q * tau[..., None]`` before the product."""

    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal
        self.qkv = nn.Linear(C, 3 * C)
        self.tau = nn.Linear(C, H)
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        tau = 1 + torch.tanh(self.tau(x)).transpose(1, 2)  # (B, H, N)
        q = q * tau[..., None]
        s = _scores(q, k)
        if self.causal:
            s = s.masked_fill(_causal(n, x.device), NEG)
        o = s.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_selective_q_times_tau(causal):
    torch.manual_seed(0)
    check_form(SelectiveQ(causal), _x(), grad=True, grad_idx=(0,), params=True)


# ---------------------------------------------------------------------------------------
# Scores multiplied by a per-row tensor (B, H, N, 1)
# ---------------------------------------------------------------------------------------


def _row_mul(q, k, v, t):
    return (_scores(q, k) * t).softmax(-1) @ v


def _row_mul_left_causal(q, k, v, t):
    s = t * _scores(q, k)
    return s.masked_fill(_causal(q.shape[-2]), NEG).softmax(-1) @ v


def _row_div(q, k, v, t):
    return (_scores(q, k) / t).softmax(-1) @ v


ROW_FORMS = {
    "s*t": _row_mul,
    "t*s+causal": _row_mul_left_causal,
    "s/t": _row_div,
}


def _row_params():
    out = []
    for name in ROW_FORMS:
        for learnable in (False, True):
            marks = ()
            ident = f"{name}-{'learnable' if learnable else 'const'}"
            out.append(pytest.param(name, learnable, marks=marks, id=ident))
    return out


@pytest.mark.parametrize("name, learnable", _row_params())
def test_per_row_multiplier(name, learnable):
    check_form(
        Fn(ROW_FORMS[name]),
        _qkv() + [_row_temp()],
        grad=learnable,
        grad_idx=(0, 1, 2, 3),
    )


def test_per_row_multiplier_report():
    rep = attnfx.explain(Fn(_row_mul), *(_qkv() + [_row_temp()]))
    assert rep.count(KIND) == 1 and not rep.kept, str(rep)
    assert rep.rewritten[0].kind == KIND, str(rep)


# ---------------------------------------------------------------------------------------
# Scalable softmax: s * log n, s learnable per head (H, 1, 1)
# ---------------------------------------------------------------------------------------


class ScalableSoftmax(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal
        self.s = nn.Parameter(torch.linspace(0.3, 0.6, H).view(H, 1, 1))

    def forward(self, q, k, v):
        n = k.shape[-2]
        s = _scores(q, k) * (self.s * math.log(n))
        if self.causal:
            s = s.masked_fill(_causal(n, q.device), NEG)
        return s.softmax(-1) @ v


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_scalable_softmax_per_head(causal):
    check_form(ScalableSoftmax(causal), _qkv(), grad=True, params=True)


# ---------------------------------------------------------------------------------------
# Qwen: a ``logn`` buffer sliced by position, applied to q in (B, N, H, D)
# ---------------------------------------------------------------------------------------


class QwenLogn(nn.Module):
    def __init__(self, max_len=64, train_len=6):
        super().__init__()
        logn = [math.log(i, train_len) if i > train_len else 1.0 for i in range(1, max_len + 1)]
        self.register_buffer("logn", torch.tensor(logn))

    def forward(self, q, k, v):  # (B, N, H, D)
        n = q.shape[1]
        q = q * self.logn[:n][None, :, None, None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = _scores(q, k).softmax(-1) @ v
        return o.transpose(1, 2)


def test_qwen_logn_buffer():
    check_form(QwenLogn(), _qkv(layout="bnhd"), grad=True)


class LognThenScale(nn.Module):
    """The ``logn`` factor and then the constant scale on q: the constant stays on q
    (outside the op) and must not hide the temperature under it."""

    def __init__(self, max_len=64, train_len=6):
        super().__init__()
        logn = [math.log(i, train_len) if i > train_len else 1.0 for i in range(1, max_len + 1)]
        self.register_buffer("logn", torch.tensor(logn))

    def forward(self, q, k, v):
        q = q * self.logn[: q.shape[-2]][None, None, :, None]
        q = q * q.shape[-1] ** -0.5
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_logn_then_constant_scale_on_q():
    check_form(LognThenScale(), _qkv(), grad=True)


# ---------------------------------------------------------------------------------------
# Llama 4: log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1, multiplied into q
# ---------------------------------------------------------------------------------------


class Llama4Scale(nn.Module):
    def __init__(self, floor_scale=4.0, attn_scale=0.3):
        super().__init__()
        self.floor_scale = floor_scale
        self.attn_scale = attn_scale

    def forward(self, q, k, v):
        pos = torch.arange(q.shape[-2], device=q.device)
        scale = torch.log(torch.floor((pos + 1.0) / self.floor_scale) + 1.0) * self.attn_scale + 1.0
        q = q * scale[None, None, :, None].to(q.dtype)
        i = torch.arange(q.shape[-2], device=q.device)
        s = _scores(q, k).masked_fill(i[None, :] > i[:, None], NEG)
        return s.softmax(-1) @ v


def test_llama4_floor_log_scale():
    check_form(Llama4Scale(), _qkv(), grad=True)


# ---------------------------------------------------------------------------------------
# Soft-capping: cap * tanh(scores / cap), alone, with a per-query temperature, causal
# ---------------------------------------------------------------------------------------

CAP = 1.5


def _softcap(q, k, v):
    s = _scores(q, k)
    return (CAP * torch.tanh(s / CAP)).softmax(-1) @ v


def _softcap_method(q, k, v):
    s = q @ k.transpose(-2, -1) * D**-0.5
    return ((s / CAP).tanh() * CAP).softmax(-1) @ v


def _softcap_row_temp(q, k, v, t):
    s = _scores(q, k) * t
    return (CAP * torch.tanh(s / CAP)).softmax(-1) @ v


def _softcap_row_temp_causal(q, k, v, t):
    s = _scores(q, k) * t
    s = CAP * torch.tanh(s / CAP)
    return s.masked_fill(_causal(q.shape[-2]), NEG).softmax(-1) @ v


SOFTCAP = {
    "cap*tanh(s/cap)": (_softcap, False),
    "tanh-method*cap": (_softcap_method, False),
    "per-query-temp": (_softcap_row_temp, True),
    "per-query-temp+causal": (_softcap_row_temp_causal, True),
}


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("name", list(SOFTCAP))
def test_softcap(name, grad):
    fn, takes_t = SOFTCAP[name]
    inputs = _qkv() + ([_row_temp()] if takes_t else [])
    check_form(Fn(fn), inputs, grad=grad, grad_idx=range(len(inputs)), transcendental=True)


def test_softcap_report_and_spec():
    rep = attnfx.explain(Fn(_softcap), *_qkv())
    assert rep.count(KIND) == 1 and not rep.kept, str(rep)
    (site,) = rep.rewritten
    assert site.kind == KIND and any(op.op == "tanh" for op in site.spec.score_ops), str(rep)


def test_softcap_causal_mask_is_predicate():
    inputs = _qkv() + [_row_temp()]
    rep = attnfx.explain(Fn(_softcap_row_temp_causal), *inputs)
    assert rep.count(KIND) == 1, str(rep)
    assert rep.rewritten[0].spec.mask_class.kind == "causal", str(rep)


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------


def _key_axis_temp(q, k, v, t):
    return (_scores(q, k) * t).softmax(-1) @ v  # t: (B, H, 1, N)


def _score_dependent_temp(q, k, v):
    s = _scores(q, k)
    return (s * s.amax(-1, keepdim=True).sigmoid()).softmax(-1) @ v


def test_refuse_temperature_along_key_axis():
    t = _row_temp(shape=(B, H, 1, N))
    check_kept(Fn(_key_axis_temp), _qkv() + [t], ("key axis",))


def test_refuse_temperature_from_the_scores():
    check_kept(Fn(_score_dependent_temp), _qkv(), ("scores themselves", "other users"))
