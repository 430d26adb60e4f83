"""Bucketed local attention (``attnfx.passes.recognize.bucketed``): q, k, v reshaped into
buckets, k and v joined by their neighbour buckets (``pad`` + ``cat`` of shifted slices,
or ``pad`` + ``unfold``), a mask from the positions padded the same way.  Such a site is
read back as attention over the tokens with an index predicate that keeps exactly the
pairs the buckets keep (a neighborhood); what cannot be read back exactly stays the
bucketed (dense per bucket) site."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfx
from attnfx.passes.recognize import bucketed
from attnfx.testing import assert_rewrites_match_eager

NEG = float("-inf")
ALWAYS = {"cpu": "always"}


def _neighbours(x, back, fwd, pad, order=None):
    """(b, nb, w, ...) buckets -> (b, nb, (back+fwd+1)·w, ...): each bucket with the
    ``back`` buckets before it and ``fwd`` after it (``pad`` past the ends)."""
    nb = x.shape[1]
    p = F.pad(x, [0, 0] * (x.dim() - 2) + [back, fwd], value=pad)
    shifts = list(range(back + fwd + 1)) if order is None else order
    return torch.cat([p[:, s : s + nb] for s in shifts], dim=2)


def _unfolded(x, w, back, fwd, pad):
    """(b, n, d) tokens -> (b, nb, (back+fwd+1)·w, d) by a sliding window over the padded
    token axis (``unfold`` with step ``w``)."""
    p = F.pad(x, [0, 0, back * w, fwd * w], value=pad)
    return p.unfold(1, (back + fwd + 1) * w, w).transpose(-1, -2)


class Buckets(nn.Module):
    """Local attention over (B·H, N, D) tokens in buckets of ``w``, looking ``back`` and
    ``fwd`` buckets around; ``causal`` by position, ``exact`` also cuts keys more than
    ``back·w`` before the query.  ``spelling``: "cat" or "unfold"; the other knobs break
    what the read-back needs (and must leave the site bucketed)."""

    def __init__(self, w=8, back=1, fwd=0, causal=True, exact=False, spelling="cat", **bad):
        super().__init__()
        self.w, self.back, self.fwd, self.causal, self.exact = w, back, fwd, causal, exact
        self.spelling, self.bad = spelling, bad

    def look(self, x, pad, tokens=None):
        if self.spelling == "unfold":
            return _unfolded(tokens, self.w, self.back, self.fwd, pad)
        return _neighbours(x, self.back, self.fwd, pad, self.bad.get("order"))

    def forward(self, q, k, v, keep=None):
        b, n, d = q.shape
        w, nb = self.w, q.shape[1] // self.w
        pos = torch.arange(n, device=q.device)
        bq, bk, bv = (t.reshape(b, nb, w, d) for t in (q, k, v))
        bk = self.look(bk, -1.0, k)
        vorder = self.bad.get("v_order")
        bv = _neighbours(bv, self.back, self.fwd, 0.0, vorder) if vorder else self.look(bv, 0.0, v)
        qpos = pos.reshape(1, nb, w)
        kpos = self.look(qpos[..., None], -1, pos[None, :, None])[..., 0]
        s = torch.einsum("bnid,bnjd->bnij", bq, bk) * d**-0.5
        qp, kp = qpos[..., :, None], kpos[..., None, :]
        mask = torch.zeros_like(qp < kp) if self.bad.get("pads_kept") else kp == -1
        if self.causal:
            mask = mask | (qp < kp)
        if self.exact:
            mask = mask | (qp - kp > self.back * w)
        if keep is not None:
            mask = (
                mask
                | ~self.look(keep.reshape(1, nb, w, 1), False, keep[None, :, None])[..., 0][
                    ..., None, :
                ]
            )
        fill = -torch.finfo(s.dtype).max if self.bad.get("finite_fill") else NEG
        p = s.masked_fill(mask, fill).softmax(-1)
        return torch.einsum("bnij,bnjd->bnid", p, bv).reshape(b, n, d)


def _brute(n, w, back, fwd, causal, exact):
    """(n, n) kept pairs, token by token."""
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    keep = (k // w >= q // w - back) & (k // w <= q // w + fwd)
    if causal:
        keep &= k <= q
    if exact:
        keep &= q - k <= back * w
    return keep


def _qkv(n=64, d=16, bh=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(bh, n, d, generator=g) for _ in range(3)]


def _site(m, *inputs, options=ALWAYS):
    torch._dynamo.reset()
    rep = attnfx.explain(m, *inputs, options=options)
    (site,) = rep.rewritten
    return site


def _tensor_mask(site) -> bool:
    """Whether the site fills by a mask tensor (the bucketed reading)."""
    return any(op.op == "fill_aux" for op in site.spec.score_ops)


CASES = [
    dict(back=1, fwd=0, causal=True),
    dict(back=1, fwd=1, causal=False),
    dict(back=2, fwd=1, causal=False),
    dict(back=2, fwd=0, causal=True, exact=True),
    dict(back=1, fwd=0, causal=True, spelling="unfold"),
    dict(back=1, fwd=1, causal=False, spelling="unfold"),
]
IDS = ["causal", "both-sides", "wide", "exact-window", "unfold-causal", "unfold"]


@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_look_around_buckets_read_back_over_the_tokens(kw):
    """The site's predicate keeps exactly the token pairs the buckets keep (brute force),
    it is labelled a neighborhood, and the rewrite (forward and gradients) passes the rule
    against eager."""
    n, w = 64, 8
    m = Buckets(w=w, **kw)
    site = _site(m, *_qkv(n))
    assert site.kind == "neighborhood", site
    (fill,) = [op for op in site.spec.score_ops if op.op == "fill_pred"]
    want = _brute(n, w, kw["back"], kw["fwd"], kw["causal"], kw.get("exact", False))
    assert torch.equal(fill.predicate.materialize(n, n), want)
    assert site.spec.aux_dtypes == ()  # no mask tensor: the predicate is the mask
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, _qkv(n), kind="neighborhood", grad=True, options=ALWAYS)


def test_read_back_predicate_is_a_bucket_and_band_form():
    """Causal look-back: ``K >= w·(Q // w) - w`` and ``K <= Q``, and the report names a
    1-D causal window of two buckets."""
    site = _site(Buckets(w=16, back=1), *_qkv(128))
    (fill,) = [op for op in site.spec.score_ops if op.op == "fill_pred"]
    assert str(fill.predicate) == "(K <= Q) & (K >= 16*floor(Q/16) - 16)"
    assert site.mask == "neighborhood 1-D 128 k=(32) causal=(1)"


def test_heads_in_their_own_dim_read_back():
    """(B, H, N, D) operands bucketed as (B·H, nb, w, D) and put back as (B, H, N, D): the
    op runs on the 4-D tensors, each head's queries with its own keys."""

    class FourD(nn.Module):
        def forward(self, q, k, v):
            b, h, n, d = q.shape
            w, nb = 8, n // 8
            bq, bk, bv = (t.reshape(b * h, nb, w, d) for t in (q, k, v))
            bk, bv = _neighbours(bk, 1, 1, 0.0), _neighbours(bv, 1, 1, 0.0)
            kpos = _neighbours(torch.arange(n).reshape(1, nb, w, 1), 1, 1, -1)[..., 0]
            s = (bq @ bk.transpose(-1, -2)) / d**0.5
            s = s.masked_fill(kpos[:, :, None, :] < 0, NEG)
            return (s.softmax(-1) @ bv).reshape(b, h, n, d)

    g = torch.Generator().manual_seed(3)
    qkv = [torch.randn(2, 2, 48, 16, generator=g) for _ in range(3)]
    site = _site(FourD(), *qkv)
    assert site.kind == "neighborhood"
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(FourD(), qkv, kind="neighborhood", grad=True, options=ALWAYS)


@pytest.mark.parametrize(
    "bad, why",
    [
        (dict(pads_kept=True), "a padded key slot is not masked"),
        (dict(order=[0, 2]), "not an interval"),  # dilated look-around: a hole per row
        (dict(v_order=[2, 1, 0]), "v is not moved as k is"),
    ],
    ids=["pads-kept", "hole", "v-elsewhere"],
)
def test_what_is_not_exact_stays_bucketed(bad, why, caplog, monkeypatch):
    """A padded slot the mask keeps (the pad joins the softmax), a window with holes, or v
    joined in another order than k: the site stays the bucketed (dense per bucket) one,
    with a tensor mask, and still matches eager."""
    kw = dict(back=1, fwd=1, causal=False)
    m = Buckets(**kw, **bad)
    monkeypatch.setenv("ATTNFX_DEBUG", "1")  # says why the site was not read back
    with caplog.at_level("WARNING", logger="attnfx"):
        site = _site(m, *_qkv())
    assert site.kind == "softmax" and _tensor_mask(site)
    assert why in caplog.text
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, _qkv(), kind="softmax", options=ALWAYS)


def test_mask_from_an_input_stays_bucketed():
    """A key mask passed in (bucketed the same way) is data, not positions: not read back."""
    keep = torch.rand(64, generator=torch.Generator().manual_seed(4)) > 0.3
    keep[::8] = True  # every query keeps its bucket's first key
    m = Buckets(back=1, fwd=0, causal=True)
    site = _site(m, *_qkv(), keep)
    assert site.kind == "softmax" and _tensor_mask(site)


def test_cpu_runs_keep_the_bucketed_form():
    """On CPU (``cpu="auto"``) the op's path would run the token mask densely: the site
    stays bucketed there, and is read back when the kernels run (``cpu="always"`` forces
    the op's path, as the tests do)."""
    m = Buckets(back=1, causal=True)
    auto = _site(m, *_qkv(), options={"cpu": "auto"})
    assert auto.kind == "softmax" and _tensor_mask(auto)
    assert _site(m, *_qkv()).kind == "neighborhood"


def test_plain_attention_is_not_replayed(monkeypatch):
    """The replay runs only where k is padded, joined or unfolded."""
    calls = []
    monkeypatch.setattr(bucketed, "_read", lambda *a, **k: calls.append(a) or 1 / 0)

    class Plain(nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-1, -2)).softmax(-1) @ v

    assert _site(Plain(), *_qkv()).kind == "softmax"
    assert calls == []


def test_bucketed_kernels_match_eager(monkeypatch, tmp_path):
    """The read-back site through the generated kernels (interpreter), fp32, forward and
    gradients."""
    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    m = Buckets(w=16, back=1, fwd=0, causal=True)
    qkv = _qkv(n=96, d=16, bh=2)
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, qkv, kind="neighborhood", grad=True)


def test_finite_fill_reads_back_where_exp_drops_it():
    """``-finfo.max`` as the fill (local-attention code writes it so): in float32 it is
    below -1e30, so a masked slot's probability is exactly 0 beside any kept key, as a
    dropped key's is — read back.  In float16 it is -65504: a masked slot counts where
    the kept scores come within ~100 of it, and the token reading has other masked slots
    than the buckets — not read back."""
    m = Buckets(back=1, causal=True, finite_fill=True)
    site = _site(m, *_qkv())
    assert site.kind == "neighborhood"
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, _qkv(), kind="neighborhood", options=ALWAYS)
    half = [t.half() for t in _qkv()]
    assert _tensor_mask(_site(m.half(), *half))
