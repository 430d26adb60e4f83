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
from attnfx.passes.canonicalize import canonicalize
from attnfx.passes.recognize import bucketed, find_sites
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


class ScaledCopy(nn.Module):
    """``Buckets`` on a copy of v scaled in place (``v = v.clone(); v.mul_(0.5)``)."""

    def __init__(self, w):
        super().__init__()
        self.inner = Buckets(w=w, back=1, fwd=0, causal=False)

    def forward(self, q, k, v):
        v = v.clone()
        v.mul_(0.5)
        return self.inner(q, k, v)


@pytest.mark.parametrize("w", [1, 4])
def test_copy_written_in_place_is_read_from_after_the_write(w):
    """fuzz seed 5150 #90/#91: v is read from the copy written in place, not from the
    input before it (that reading would drop the ``mul_``: the verifier caught it as a
    write inside the site, and the site was kept); buckets of one token are a sequence,
    not an (N, 1) image (whose reading started before the write)."""
    n = 16
    m = ScaledCopy(w)
    site = _site(m, *_qkv(n))
    assert site.kind == "neighborhood", site  # (kept, it was not in ``rewritten``)
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


# ---------------------------------------------------------------------------------------
# 2-D: blocked local attention over an image with a halo (HaloNet)
# ---------------------------------------------------------------------------------------

EAGER = {"cpu": "always", "inner": "eager"}


def _zero_window(x, win, b, halo):
    """(B, C, H, W) -> (B, C, nh, nw, win, win): windows of ``win`` with stride ``b``
    over the image padded with ``halo`` zeros (``F.pad`` + ``Tensor.unfold`` per axis)."""
    p = F.pad(x, [halo, halo, halo, halo])
    return p.unfold(2, win, b).unfold(3, win, b)


class Halo(nn.Module):
    """Blocked local attention over an image: q cut into ``b``×``b`` blocks, k and v into
    (b + 2·halo)² windows with stride ``b`` around them, a mask from a ones image cut the
    same way filling the slots that fall on the padding.  ``channels``: "first" (B, C,
    H, W) or "last" (B, H, W, C), C = heads·D.  ``spelling``: "pad" (``F.pad`` +
    ``Tensor.unfold``) or "im2col" (``F.unfold``).  ``flat``: batch, heads and blocks in
    one dim (the mask repeated over it) rather than (B·heads, blocks, ...).  ``fill``:
    the masked slots' value.  ``bad`` knobs break what the read-back needs: ``unmasked``
    (the zero pads join the softmax, no mask at all), ``q_term`` (an additive term
    computed from q)."""

    def __init__(
        self, b=4, halo=1, heads=1, channels="first", spelling="pad", flat=False, fill=NEG, **bad
    ):
        super().__init__()
        self.b, self.halo, self.heads, self.channels = b, halo, heads, channels
        self.spelling, self.flat, self.fill, self.bad = spelling, flat, fill, bad
        if bad.get("q_term"):
            win = b + 2 * halo
            g = torch.Generator().manual_seed(5)
            self.rel = nn.Parameter(torch.randn(16, win * win, generator=g) * 0.1)

    def windows(self, x):
        """(B, C, H, W) -> (B, heads, nh·nw, win², D)."""
        b, halo, heads = self.b, self.halo, self.heads
        big, c, hh, ww = x.shape
        win, blocks = b + 2 * halo, (hh // b) * (ww // b)
        if self.spelling == "im2col":  # (B, C·win², blocks), channel-major
            u = F.unfold(x, kernel_size=win, stride=b, padding=halo)
            u = u.reshape(big, heads, c // heads, win * win, blocks)
            return u.permute(0, 1, 4, 3, 2)
        u = _zero_window(x, win, b, halo).reshape(big, heads, c // heads, blocks, win * win)
        return u.permute(0, 1, 3, 4, 2)

    def forward(self, q, k, v):
        b, halo, heads = self.b, self.halo, self.heads
        if self.channels == "last":
            big, hh, ww, c = q.shape
            d, nh, nw = c // heads, hh // b, ww // b
            qb = q.reshape(big, nh, b, nw, b, heads, d).permute(0, 5, 1, 3, 2, 4, 6)
            k, v = k.permute(0, 3, 1, 2), v.permute(0, 3, 1, 2)  # (windows: channels first)
        else:
            big, c, hh, ww = q.shape
            d, nh, nw = c // heads, hh // b, ww // b
            qb = q.reshape(big, heads, d, nh, b, nw, b).permute(0, 1, 3, 5, 4, 6, 2)
        win2, blocks = (b + 2 * halo) ** 2, nh * nw
        qb = qb.reshape(big * heads, blocks, b * b, d)
        kb, vb = (self.windows(t).reshape(big * heads, blocks, win2, d) for t in (k, v))
        if self.flat:  # one dim of B·heads·blocks, as lucid-style code has it
            qb, kb, vb = qb.flatten(0, 1), kb.flatten(0, 1), vb.flatten(0, 1)
        s = qb @ kb.transpose(-1, -2) * d**-0.5  # (B·heads, blocks, b², win²)
        if self.bad.get("q_term"):
            s = s + qb @ self.rel
        if not self.bad.get("unmasked"):
            ones = torch.ones(1, 1, hh, ww, device=q.device)
            if self.spelling == "im2col":
                m = F.unfold(ones, kernel_size=b + 2 * halo, stride=b, padding=halo)
                m = m.transpose(1, 2)  # (1, blocks, win²)
            else:
                m = _zero_window(ones, b + 2 * halo, b, halo).reshape(1, blocks, win2)
            m = m[:, :, None, :]
            if self.flat:  # (the mask repeated over batch and heads)
                m = m.expand(big * heads, -1, -1, -1).flatten(0, 1)
            s = s.masked_fill(m == 0, self.fill)
        o = s.softmax(-1) @ vb
        o = o.reshape(big, heads, nh, nw, b, b, d)
        if self.channels == "last":
            return o.permute(0, 2, 4, 3, 5, 1, 6).reshape(big, hh, ww, c)
        return o.permute(0, 1, 6, 2, 4, 3, 5).reshape(big, c, hh, ww)


def _image(m: Halo, hh, ww, d=16, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = m.heads * d
    shape = (batch, hh, ww, c) if m.channels == "last" else (batch, c, hh, ww)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def _halo_brute(hh, ww, b, halo):
    """(N, N) kept pairs of an H×W image, token by token: the key in the query block
    grown by ``halo`` on each side, cut at the image's border."""
    t = torch.arange(hh * ww)
    y, x = t // ww, t % ww
    ky, kx = y[None, :], x[None, :]
    y0, x0 = (b * (y // b))[:, None], (b * (x // b))[:, None]
    return (ky >= y0 - halo) & (ky < y0 + b + halo) & (kx >= x0 - halo) & (kx < x0 + b + halo)


def _span(length, b, halo) -> int:
    """The most keys a query keeps on an axis: b + 2·halo, less where every block's
    window is cut by the border."""
    y = torch.arange(length)
    y0 = b * (y // b)
    return int(
        (torch.minimum(y0 + b + halo, torch.tensor(length)) - (y0 - halo).clamp(min=0)).max()
    )


def _program_keep(m: Halo, hh, ww) -> torch.Tensor:
    """(N, N) pairs the program itself keeps, read off eager: q = 0 (every kept score
    equal) and v one-hot over the tokens, so each query's output is 1/count on its kept
    keys and exactly 0 elsewhere (per head; channels D = N)."""
    n = hh * ww
    zero = _image(m, hh, ww, d=n, batch=1)[0].zero_()
    eye = torch.eye(n).repeat(1, m.heads)  # (N tokens, heads·N channels)
    v = eye.view(1, hh, ww, -1) if m.channels == "last" else eye.t().reshape(1, -1, hh, ww)
    with torch.no_grad():
        o = m(zero, zero, v)
    # (query token, head, key): channels last (token, head·key); first (head·key, token)
    if m.channels == "last":
        o = o.reshape(n, m.heads, n)
    else:
        o = o.reshape(m.heads, n, n).permute(2, 0, 1)
    keep = o[:, 0] > 0
    assert all(torch.equal(o[:, h] > 0, keep) for h in range(m.heads))
    return keep


HALO_CASES = [
    dict(channels="first", spelling="pad", b=4, halo=1, heads=1, size=(8, 8)),
    dict(channels="first", spelling="im2col", b=4, halo=2, heads=2, size=(8, 12)),
    dict(channels="last", spelling="pad", b=4, halo=1, heads=2, size=(12, 8)),
    dict(channels="last", spelling="im2col", b=2, halo=1, heads=1, size=(6, 10)),
    dict(channels="first", spelling="im2col", b=4, halo=1, heads=2, size=(8, 8), flat=True),
    dict(channels="first", spelling="pad", b=4, halo=2, heads=1, size=(12, 12), fill="finfo"),
]
HALO_IDS = ["first-pad", "first-im2col-heads", "last-pad-heads", "last-im2col", "flat", "finfo"]


def _halo(kw) -> tuple[Halo, tuple[int, int]]:
    kw = dict(kw)
    size = kw.pop("size")
    if kw.get("fill") == "finfo":  # lucid-style: the most negative finite float32
        kw["fill"] = -torch.finfo(torch.float32).max
    return Halo(**kw), size


@pytest.mark.parametrize("kw", HALO_CASES, ids=HALO_IDS)
def test_halo_blocks_read_back_over_the_image(kw):
    """An image's q blocks, k/v windows grown by a halo and a ones-image mask: the site
    is read back over the H·W tokens, its predicate keeps exactly the pairs the program
    keeps (read off eager, and by brute force: the block grown by the halo, cut at the
    border, per axis), it is labelled a 2-D neighborhood of (b + 2·halo)² keys, and the
    rewrite (forward and gradients) passes the rule against eager."""
    m, (hh, ww) = _halo(kw)
    n, b, halo = hh * ww, kw["b"], kw["halo"]
    site = _site(m, *_image(m, hh, ww), options=EAGER)
    assert site.kind == "neighborhood", site
    assert site.mask == f"neighborhood 2-D {hh}x{ww} k=({_span(hh, b, halo)},{_span(ww, b, halo)})"
    assert site.spec.aux_dtypes == ()  # no mask tensor: the predicate is the mask
    (fill,) = [op for op in site.spec.score_ops if op.op == "fill_pred"]
    keep = fill.predicate.materialize(n, n)
    assert torch.equal(keep, _program_keep(m, hh, ww))
    assert torch.equal(keep, _halo_brute(hh, ww, b, halo))
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, _image(m, hh, ww), kind="neighborhood", grad=True, options=EAGER)


def _found(m, *inputs):
    """The matched site of ``m``'s graph (``find_sites`` on the canonical graph)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(m, backend=backend)(*inputs)
    (gm,) = graphs
    canonicalize(gm)
    (site,) = [s for s in find_sites(gm) if s.spec is not None]
    return site


def test_halo_operands_are_the_images():
    """The op reads the images themselves: channels first, an (B, heads, D, H·W) view
    put features last; channels last, (B, H·W, heads, D) with heads moved out; the
    predicate is the AND of per-axis block bounds on ``Q // W`` and ``Q % W``, and the
    output is permuted back into the image's layout."""
    m = Halo(b=4, halo=1, heads=2)
    site = _found(m, *_image(m, 8, 12))
    assert site.kind == "neighborhood" and site.bucketed is not None
    assert all(o.node.op == "placeholder" for o in (site.q, site.k, site.v))
    assert (site.q.view, site.q.permute) == ((2, 2, 16, 96), (0, 1, 3, 2))
    assert site.out_permute == (0, 1, 3, 2) and site.out_shape == (2, 32, 8, 12)
    (fill,) = [op for op in site.spec.score_ops if op.op == "fill_pred"]
    assert str(fill.predicate) == (
        "(Mod(K, 12) >= 4*floor((Mod(Q, 12))/4) - 1)"
        " & (Mod(K, 12) <= 4*floor((Mod(Q, 12))/4) + 4)"
        " & (floor(K/12) >= 4*floor(floor(Q/12)/4) - 1)"
        " & (floor(K/12) <= 4*floor(floor(Q/12)/4) + 4)"
    )
    last = Halo(b=4, halo=1, heads=2, channels="last")
    site = _found(last, *_image(last, 8, 12))
    assert (site.q.view, site.q.permute) == ((2, 96, 2, 16), (0, 2, 1, 3))
    assert site.out_permute == (0, 2, 1, 3) and site.spec.out_layout == "bnhd"


def test_halo_cpu_runs_keep_the_bucketed_form():
    """As in 1-D: on CPU with ``cpu="auto"`` the read-back would run the token mask
    densely, so the site stays in its blocked form (a tensor mask)."""
    m = Halo(b=4, halo=1)
    auto = _site(m, *_image(m, 8, 8), options={"cpu": "auto", "inner": "eager"})
    assert auto.kind == "softmax" and _tensor_mask(auto)


@pytest.mark.parametrize(
    "bad, why",
    [
        # timm-style halo attention: k and v padded with zeros, no mask: the pads' zero
        # scores join every border query's softmax — not attention over the tokens
        (dict(unmasked=True), "no fill: nothing bucketed is masked"),
        (dict(q_term=True), "score op add_aux"),  # relative logits from q: data
    ],
    ids=["unmasked-pads", "q-term"],
)
def test_halo_what_is_not_exact_stays_bucketed(bad, why, caplog, monkeypatch):
    """Unmasked zero pads, or an additive term computed from q: the site stays the
    blocked (dense per block) one, with the reason in the debug log, and still matches
    eager."""
    m = Halo(b=4, halo=1, heads=2, **bad)
    monkeypatch.setenv("ATTNFX_DEBUG", "1")
    with caplog.at_level("WARNING", logger="attnfx"):
        site = _site(m, *_image(m, 8, 8), options=EAGER)
    assert site.kind == "softmax"  # the blocks as heads: no predicate over the tokens
    assert not [op for op in site.spec.score_ops if op.op == "fill_pred"]
    assert why in caplog.text
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, _image(m, 8, 8), kind="softmax", options=EAGER)


@pytest.mark.parametrize("kw", HALO_CASES[:3:2], ids=["first", "last-heads"])
def test_halo_kernels_match_eager(kw, monkeypatch, tmp_path):
    """The read-back image site through the generated kernels (interpreter), fp32, 8×8
    image, blocks of 4, forward and gradients."""
    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    m, _ = _halo(kw)
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(
        m, _image(m, 8, 8), kind="neighborhood", grad=True, options={"inner": "eager"}
    )
