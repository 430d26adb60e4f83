"""Softmax attention in its many eager spellings: each form is compiled with
``backend="attnfx"``, must be rewritten (counted under ``rewritten.softmax``), and must
compute what eager computes under the equivalence rule (``assert_attention_close``:
cand = compiled, base = eager in the working dtype, gold = eager in float64).
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


# ---------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------


def _qkv(n=N, d=D, h=H, hk=None, dtype=torch.float32, layout="bhnd"):
    g = torch.Generator().manual_seed(0)
    hk = hk or h

    def t(heads):
        shape = (B, heads, n, d) if layout == "bhnd" else (B, n, heads, d)
        return torch.randn(shape, generator=g).to(dtype)

    return [t(h), t(hk), t(hk)]


def _keep(n=N, batch=B, seed=1):
    """A random bool keep-mask (B, 1, N, N) with the diagonal always kept (no empty rows)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand((batch, 1, n, n), generator=g) > 0.4
    return keep | torch.eye(n, dtype=torch.bool)


def _pad(n=N):
    """A (B, 1, 1, N) bool padding mask: True = a real token (batch 1 has 5 pads)."""
    keep = torch.ones(B, 1, 1, n, dtype=torch.bool)
    keep[1, ..., n - 5 :] = False
    return keep


def check_form(m, inputs, *, grad=False, grad_idx=(0, 1, 2), options=None, sites=1):
    """``sites`` softmax sites rewritten, nothing kept, outputs (and input gradients with
    ``grad``) equal eager under the rule."""
    return assert_rewrites_match_eager(
        m, inputs, kind="softmax", sites=sites, grad=grad, grad_idx=grad_idx, options=options
    )


class Fn(nn.Module):
    """One form, written as a plain function of the inputs."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


# ---------------------------------------------------------------------------------------
# Scores, scale and softmax spellings on (B, H, N, D) q, k, v
# ---------------------------------------------------------------------------------------


def _scores_at(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _scores_matmul(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.matmul(s.softmax(dim=-1), v)


def _scores_bmm(q, k, v):
    b, h, n, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, n, d) for x in (q, k, v))
    s = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(d)
    return torch.bmm(torch.softmax(s, dim=-1), v3).view(b, h, n, d)


def _scores_einsum(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * (q.shape[-1] ** -0.5)
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def _einsum_scores_only(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D)
    return s.softmax(-1) @ v


def _einsum_pv_only(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def _scores_mT(q, k, v):
    return (q @ k.mT / math.sqrt(D)).softmax(-1) @ v


def _scores_permute(q, k, v):
    return (q @ k.permute(0, 1, 3, 2) / math.sqrt(D)).softmax(-1) @ v


def _scores_bnhd(q, k, v):  # (B, N, H, D) inputs
    s = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / math.sqrt(q.shape[-1])
    return (s.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)


def _scale_const(q, k, v):
    return (q @ k.transpose(-2, -1) * 32**-0.5).softmax(-1) @ v


def _scale_preq(q, k, v):
    q = q * (q.shape[-1] ** -0.5)
    return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def _scale_qk_quarter(q, k, v):
    c = q.shape[-1] ** -0.25
    return ((q * c) @ (k * c).transpose(-2, -1)).softmax(-1) @ v


def _scale_none(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def _scale_div_tensor_method(q, k, v):
    return (q @ k.transpose(-2, -1)).div(math.sqrt(D)).softmax(-1) @ v


def _sdpa_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.3)


def _sdpa_default(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _softmax_hf_cast(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return p @ v


def _softmax_float_type_as(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return s.float().softmax(-1).type_as(q) @ v


def _dropout_functional_p0(q, k, v):
    p = (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1)
    return F.dropout(p, p=0.0, training=True) @ v


FN_FORMS = {
    "at-transpose/F.softmax/div-sqrt": (_scores_at, {}),
    "torch.matmul/Tensor.softmax/pow-half": (_scores_matmul, {}),
    "bmm-3d": (_scores_bmm, {}),
    "einsum-both": (_scores_einsum, {}),
    "einsum-scores-only": (_einsum_scores_only, {}),
    "einsum-pv-only": (_einsum_pv_only, {}),
    "k.mT": (_scores_mT, {}),
    "k.permute": (_scores_permute, {}),
    "bnhd-permute": (_scores_bnhd, {"layout": "bnhd"}),
    "scale-const": (_scale_const, {}),
    "scale-prescaled-q": (_scale_preq, {}),
    "scale-q-and-k-quarter": (_scale_qk_quarter, {}),
    "scale-none/torch.softmax": (_scale_none, {}),
    "scale-Tensor.div": (_scale_div_tensor_method, {}),
    "sdpa-scale": (_sdpa_scale, {}),
    "sdpa-default": (_sdpa_default, {}),
    "softmax-dtype-f32-to(fp32 in)": (_softmax_hf_cast, {}),
    "softmax-dtype-f32-to(fp16 in)": (_softmax_hf_cast, {"dtype": torch.float16}),
    "float-softmax-type_as(fp16 in)": (_softmax_float_type_as, {"dtype": torch.float16}),
    "float-softmax-type_as(bf16 in)": (_softmax_float_type_as, {"dtype": torch.bfloat16}),
    "F.dropout-p0-training": (_dropout_functional_p0, {}),
}


XFAIL: dict[str, tuple[bool, str]] = {}


def _params(names):
    out = []
    for n in names:
        if n in XFAIL:
            cond, reason = XFAIL[n]
            out.append(pytest.param(n, marks=pytest.mark.xfail(cond, strict=True, reason=reason)))
        else:
            out.append(n)
    return out


@pytest.mark.parametrize("name", _params(FN_FORMS))
def test_fn_form(name):
    fn, kw = FN_FORMS[name]
    check_form(Fn(fn), _qkv(**kw))


def _scale_kt(q, k, v):
    return (q @ (k.transpose(-2, -1) * 32**-0.5)).softmax(-1) @ v


@pytest.mark.parametrize("fn", [_scale_preq, _scale_qk_quarter, _scale_kt])
def test_scale_on_an_operand_stays_there(fn):
    """A scale the program applies to q or k before the product stays on that operand,
    outside the op: moved after the product, float32 q·kᵀ overflows at |q|, |k| ~ 1e19
    where eager's (q·c)·kᵀ does not, and a one-key row came out 0 instead of v."""
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 1, 2, 16, generator=g) * 1e19 for _ in range(2))
    v = torch.randn(1, 1, 2, 16, generator=g)
    for nk in (1, 2):
        ins = [q, k[..., :nk, :], v[..., :nk, :]]
        torch._dynamo.reset()
        attnfx.reset_counters()
        out = check_form(Fn(fn), ins, options={"verify": "off"})
        assert torch.isfinite(out).all()
    rep = attnfx.explain(Fn(fn), *_qkv())
    assert rep.rewritten[0].spec.scale == 1.0  # the op computes an unscaled q·kᵀ


class ScaleAttr(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.scale = d**-0.5  # a Python float attribute

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * self.scale).softmax(-1) @ v


class Baddbmm(nn.Module):
    def __init__(self, beta):
        super().__init__()
        self.beta = beta

    def forward(self, q, k, v, bias):
        b, h, n, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, n, d) for x in (q, k, v))
        s = torch.baddbmm(bias, q3, k3.transpose(1, 2), beta=self.beta, alpha=d**-0.5)
        return torch.bmm(s.softmax(-1), v3).reshape(b, h, n, d)


class DropoutEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v):
        return self.drop((q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1)) @ v


def test_scale_python_float_attribute():
    check_form(ScaleAttr(), _qkv())


@pytest.mark.parametrize(
    "beta",
    [1.0, 0.5, 0.0],
)
def test_baddbmm(beta):
    bias = torch.randn(B * H, N, N, generator=torch.Generator().manual_seed(3))
    check_form(Baddbmm(beta), _qkv() + [bias])


def test_dropout_module_eval():
    check_form(DropoutEval(), _qkv())


# ---------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------


def _additive_right(q, k, v, keep):
    m = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, NEG)
    return ((q @ k.transpose(-2, -1)) / math.sqrt(D) + m).softmax(-1) @ v


def _additive_left(q, k, v, keep):
    m = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
    return (m + (q @ k.transpose(-2, -1)) / math.sqrt(D)).softmax(-1) @ v


def _additive_input(q, k, v, m):
    return (q @ k.transpose(-2, -1) * D**-0.5 + m).softmax(-1) @ v


def _additive_input_left(q, k, v, m):
    return torch.softmax(m + q @ k.transpose(-2, -1) * D**-0.5, dim=-1) @ v


def _fill_inf(q, k, v, keep):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    return s.masked_fill(~keep, NEG).softmax(-1) @ v


def _fill_masked_inf(q, k, v, masked):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    return s.masked_fill(masked, NEG).softmax(-1) @ v


def _fill_not_min(q, k, v, keep):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    return s.masked_fill(~keep, torch.finfo(s.dtype).min).softmax(-1) @ v


def _where_mask(q, k, v, keep):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    return torch.where(keep, s, torch.finfo(s.dtype).min).softmax(-1) @ v


def _sdpa_bool_mask(q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _sdpa_float_mask(q, k, v, keep):
    m = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, NEG)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


# name -> (form, what it takes: the bool "keep" mask, the bool "masked out" mask, or an
# additive float mask input with 0 / -inf)
MASK_FORMS = {
    "additive s+m (built inside)": (_additive_right, "keep"),
    "additive m+s (built inside, finfo.min)": (_additive_left, "keep"),
    "additive s+m (input)": (_additive_input, "additive"),
    "additive m+s (input)": (_additive_input_left, "additive"),
    "masked_fill(masked, -inf)": (_fill_masked_inf, "masked"),
    "masked_fill(~keep, -inf)": (_fill_inf, "keep"),
    "masked_fill(~keep, finfo.min)": (_fill_not_min, "keep"),
    "where(keep, s, finfo.min)": (_where_mask, "keep"),
    "sdpa bool attn_mask": (_sdpa_bool_mask, "keep"),
    "sdpa float attn_mask": (_sdpa_float_mask, "keep"),
}


def _mask_case(name, mask="random"):
    fn, takes = MASK_FORMS[name]
    keep = _keep() if mask == "random" else _pad()
    if takes == "masked":
        keep = ~keep
    elif takes == "additive":
        keep = torch.zeros(keep.shape).masked_fill(~keep, NEG)
    return Fn(fn), _qkv() + [keep]


@pytest.mark.parametrize("mask", ["random", "padding"])
@pytest.mark.parametrize("name", list(MASK_FORMS))
def test_tensor_mask_form(name, mask):
    check_form(*_mask_case(name, mask))


class CausalBuffer(nn.Module):
    """Causal masks from a registered buffer, sliced ``[:N, :N]``."""

    def __init__(self, how, max_len=64):
        super().__init__()
        self.how = how
        ones = torch.ones(max_len, max_len)
        self.register_buffer("tril", torch.tril(ones).bool().view(1, 1, max_len, max_len))
        self.register_buffer("triu", torch.triu(ones, diagonal=1))

    def forward(self, q, k, v):
        n = q.shape[-2]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.how == "tril-where":
            s = torch.where(self.tril[:, :, :n, :n], s, torch.finfo(s.dtype).min)
        elif self.how == "tril-eq0-fill":
            s = s.masked_fill(self.tril[0, 0, :n, :n] == 0, NEG)
        else:  # triu(diagonal=1) float buffer, as bool
            s = s.masked_fill(self.triu[:n, :n].bool(), NEG)
        return F.softmax(s, dim=-1) @ v


class CausalArange(nn.Module):
    """A causal mask from ``arange`` comparisons computed in forward."""

    def __init__(self, how="masked_fill"):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        nq, nk = q.shape[-2], k.shape[-2]
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.how == "masked_fill":
            s = s.masked_fill(j > i, NEG)
        else:
            s = torch.where(i >= j, s, torch.finfo(s.dtype).min)
        return s.softmax(-1) @ v


class SdpaCausal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("how", ["tril-where", "tril-eq0-fill", "triu-bool-fill"])
def test_causal_buffer(how):
    # A registered buffer is an opaque tensor (its values may change): it stays a tensor mask.
    check_form(CausalBuffer(how), _qkv())


@pytest.mark.parametrize("how", ["masked_fill", "where"])
def test_causal_arange_is_read_as_causal(how):
    check_form(CausalArange(how), _qkv())
    rep = attnfx.explain(CausalArange(how), *_qkv())
    assert rep.count("softmax") == 1, str(rep)
    mc = rep.rewritten[0].spec.mask_class
    assert mc.kind == "causal" and mc.right == 0, str(rep)


def test_sdpa_is_causal():
    check_form(SdpaCausal(), _qkv())
    rep = attnfx.explain(SdpaCausal(), *_qkv())
    assert rep.rewritten[0].spec.mask_class.kind == "causal", str(rep)


# ---------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------

HK, G_ = 2, 2  # key/value heads, group


def _repeat_kv(x, g):
    b, hk, n, d = x.shape
    return x[:, :, None, :, :].expand(b, hk, g, n, d).reshape(b, hk * g, n, d)


def _gqa_repeat_kv(q, k, v):
    k, v = _repeat_kv(k, G_), _repeat_kv(v, G_)
    return (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1) @ v


def _gqa_repeat_interleave(q, k, v):
    k, v = k.repeat_interleave(G_, dim=1), v.repeat_interleave(G_, dim=1)
    return (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1) @ v


def _gqa_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


GQA_FORMS = {
    "repeat_kv": _gqa_repeat_kv,
    "repeat_interleave": _gqa_repeat_interleave,
    "sdpa-enable_gqa": _gqa_sdpa,
}


@pytest.mark.parametrize("name", list(GQA_FORMS))
def test_gqa(name):
    inputs = _qkv(h=HK * G_, hk=HK)
    check_form(Fn(GQA_FORMS[name]), inputs, grad=name == "repeat_kv")
    rep = attnfx.explain(Fn(GQA_FORMS[name]), *inputs)
    assert rep.count("softmax") == 1, str(rep)
    assert rep.rewritten[0].spec.gqa_group == G_, str(rep)


# ---------------------------------------------------------------------------------------
# Fused qkv projections and layouts
# ---------------------------------------------------------------------------------------


class FusedQKV(nn.Module):
    """x (B, N, C) → one qkv projection → split → (B, H, N, D) heads → attention → proj."""

    def __init__(self, how, c=H * D):
        super().__init__()
        self.how = how
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.scale = D**-0.5

    def forward(self, x):
        b, n, c = x.shape
        y = self.qkv(x)
        if self.how in ("unbind", "index"):
            qkv = y.reshape(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
            if self.how == "unbind":
                q, k, v = qkv.unbind(0)
            else:
                q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            parts = y.chunk(3, dim=-1) if self.how == "chunk" else y.split(c, dim=-1)
            q, k, v = (t.view(b, n, H, D).transpose(1, 2) for t in parts)
        a = (q @ k.transpose(-2, -1)) * self.scale
        o = a.softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


def _x(n=N):
    return [torch.randn(B, n, H * D, generator=torch.Generator().manual_seed(5))]


@pytest.mark.parametrize("how", ["chunk", "unbind", "split", "index"])
def test_fused_qkv(how):
    torch.manual_seed(0)
    check_form(FusedQKV(how), _x(), grad=how == "chunk", grad_idx=(0,))


class BNHDProjections(nn.Module):
    """Separate projections, (B, N, H, D) views, attention on transposed heads."""

    def __init__(self, c=H * D):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x).view(b, n, H, D).transpose(1, 2)
        k = self.k(x).view(b, n, H, D).permute(0, 2, 3, 1)  # kᵀ straight from BNHD
        v = self.v(x).view(b, n, H, D).transpose(1, 2)
        o = F.softmax(q @ k / math.sqrt(D), dim=-1) @ v
        return o.transpose(1, 2).reshape(b, n, c)


def test_bnhd_projections():
    torch.manual_seed(0)
    check_form(BNHDProjections(), _x(), grad=True, grad_idx=(0,))


# ---------------------------------------------------------------------------------------
# Training, no_grad, inference_mode, inner="eager"
# ---------------------------------------------------------------------------------------

GRAD_FORMS = [
    "at-transpose/F.softmax/div-sqrt",
    "bmm-3d",
    "einsum-both",
    "bnhd-permute",
    "scale-q-and-k-quarter",
    "sdpa-default",
]


@pytest.mark.parametrize("name", _params(GRAD_FORMS))
def test_grad_fn_form(name):
    fn, kw = FN_FORMS[name]
    check_form(Fn(fn), _qkv(**kw), grad=True)


@pytest.mark.parametrize("name", ["additive s+m (input)", "masked_fill(~keep, -inf)"])
def test_grad_mask_form(name):
    check_form(*_mask_case(name), grad=True)


def test_grad_causal_arange():
    check_form(CausalArange(), _qkv(), grad=True)


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_no_grad_contexts(ctx):
    m = Fn(_scores_at).eval()
    inputs = _qkv()
    cm = torch.compile(m, backend="attnfx")
    with torch.no_grad() if ctx == "no_grad" else torch.inference_mode():
        cand = cm(*inputs)
        base = m(*inputs)
    assert attnfx.counters["rewritten.softmax"] == 1, dict(attnfx.counters)
    gold = copy.deepcopy(m).double()(*[x.double() for x in inputs])
    assert_attention_close(cand, base, gold)


@pytest.mark.parametrize("grad", [False, True])
def test_inner_eager(grad):
    check_form(CausalArange(), _qkv(), grad=grad, options={"inner": "eager"})


# ---------------------------------------------------------------------------------------
# Dynamic sequence lengths
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: Fn(_scores_at), CausalArange, lambda: CausalBuffer("tril-where")],
    ids=["plain", "causal-arange", "causal-buffer"],
)
def test_dynamic_lengths(make, request):
    from torch._dynamo.utils import counters as dynamo_counters

    dynamo_counters.clear()
    m = make().eval()
    gold_m = copy.deepcopy(m).double()
    cm = torch.compile(m, backend="attnfx")
    with attnfx.report.collecting() as records:
        for n in (16, 24, 20):
            inputs = _qkv(n=n)
            cand = cm(*inputs)
            base = m(*inputs)
            gold = gold_m(*[x.double() for x in inputs])
            assert_attention_close(cand, base, gold, context=f"N={n}")
    rewritten = attnfx.counters["rewritten.softmax"]
    assert 1 <= rewritten <= 2, dict(attnfx.counters)
    assert dynamo_counters["stats"]["unique_graphs"] <= 2
    assert not [k for k in attnfx.counters if k.startswith("kept.")], dict(attnfx.counters)
    if request.node.callspec.id == "causal-arange":
        # the mask is read back as causal in the dynamic-shape graph too
        assert all(r.spec.mask_class.kind == "causal" for r in records), records
