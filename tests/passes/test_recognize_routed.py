"""The routed recognizer (``attnfx/passes/recognize/routed.py``): the gather → per-cluster
attention → scatter-back sequence in two independently written forms is rewritten to
one ``attnfx::routed_attention`` call (the gathers, the attention and the scatters gone
from the graph, the routing kept), verified like every rewrite; near-miss programs are
kept with a counted reason."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnfx
from attnfx.nn.routed import RoutedAttention
from attnfx.testing import assert_attention_close

SELF_VALUE = -5e4


# -- a second form, written independently of attnfx.nn.RoutedAttention: heads flattened
# into the batch ((B·H, N, D) operands), members by top-k over the token dim of
# (B·H, N, C) similarities, an index-select helper, einsum products, a position mask
# built beforehand, ``where`` for the self mask and a per-element scatter mean with eps.
def _pick_rows(values, indices):
    """values (BH, N, D), indices (BH, M) -> (BH, M, D)."""
    last = values.shape[-1]
    return values.gather(1, indices[:, :, None].expand(-1, -1, last))


def _mean_scatter(target_len, indices, rows, eps):
    bh, _, d = rows.shape
    idx = indices[:, :, None].expand(-1, -1, d)
    total = rows.new_zeros(bh, target_len, d).scatter_add(1, idx, rows)
    hits = rows.new_zeros(bh, target_len, d).scatter_add(1, idx, torch.ones_like(rows))
    return total / (hits + eps)


class ClusterBlock(nn.Module):
    def __init__(self, d, clusters, window, *, causal=False, share=False, eps=1e-5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "centroids", F.normalize(torch.randn(clusters, d, generator=g), dim=-1)
        )
        self.window, self.causal, self.share, self.eps = window, causal, share, eps

    def _assign(self, x):
        sims = F.normalize(x, dim=-1) @ self.centroids.to(x.dtype).t()  # (BH, N, C)
        top = sims.topk(self.window, dim=1).indices  # (BH, w, C)
        return top.transpose(1, 2).sort(dim=-1).values  # (BH, C, w)

    def forward(self, q, k, v):
        bh, n, d = q.shape
        if self.share:
            k = F.normalize(q, dim=-1)
        with torch.no_grad():
            qm = self._assign(q)
            km = qm if self.share else self._assign(k)
        c, w = qm.shape[1], qm.shape[2]
        qflat, kflat = qm.reshape(bh, c * w), km.reshape(bh, c * w)
        qs = _pick_rows(q, qflat).reshape(bh, c, w, d)
        ks = _pick_rows(k, kflat).reshape(bh, c, w, d)
        vs = _pick_rows(v, kflat).reshape(bh, c, w, v.shape[-1])
        dots = torch.einsum("bcid,bcjd->bcij", qs, ks) * (d**-0.5)
        if self.causal:
            later = qm[:, :, :, None] < km[:, :, None, :]
            dots = dots.masked_fill(later, float("-inf"))
        if self.share:
            same = qm[:, :, :, None] == km[:, :, None, :]
            dots = torch.where(same, SELF_VALUE, dots)
        attn = dots.softmax(dim=-1)
        out = torch.einsum("bcij,bcjd->bcid", attn, vs).reshape(bh, c * w, v.shape[-1])
        return _mean_scatter(n, qflat, out, self.eps)


def _qkv(bh=4, n=40, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bh, n, d, generator=g).to(dtype) for _ in range(3)]


def _compile_and_check(m, inputs, *, grad=True):
    """Compile ``m``: one routed site rewritten, none kept; outputs and q/k/v gradients
    within the rule against eager (gold: eager in float64 on the same members)."""
    cm = torch.compile(m, backend="attnfx")
    c_in = [x.clone().requires_grad_(grad) for x in inputs]
    b_in = [x.clone().requires_grad_(grad) for x in inputs]
    out = cm(*c_in)
    counters = dict(attnfx.counters)
    assert counters.get("rewritten.routed") == 1, counters
    assert not [k for k in counters if k.startswith("kept.")], counters
    base = m(*b_in)
    # gold: float64 on the members the working dtype chose (routing is not differentiable)
    members = m._assign(inputs[0])
    kmembers = members if m.share else m._assign(inputs[1])
    calls = iter([members] if m.share else [members, kmembers])
    gold_m = ClusterBlock(1, 1, m.window, causal=m.causal, share=m.share, eps=m.eps)
    gold_m._assign = lambda x: next(calls)
    g_in = [x.double().requires_grad_(grad) for x in inputs]
    gold = gold_m(*g_in)
    assert_attention_close(out, base, gold.to(torch.float64), context="output")
    if grad:
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
        for o in (out, base, gold):
            o.backward(cot.to(o.dtype))
        for i in range(3):
            if m.share and i == 1:
                continue
            assert_attention_close(
                c_in[i].grad, b_in[i].grad, g_in[i].grad, grad=True, context=f"grad {i}"
            )
    return cm, out


@pytest.mark.parametrize(
    "causal,share,eps", [(False, False, 1e-5), (True, True, 1e-5), (False, True, 1e-2)]
)
def test_second_form_is_rewritten(causal, share, eps):
    m = ClusterBlock(16, 4, 10, causal=causal, share=share, eps=eps)
    _compile_and_check(m, _qkv())


def test_rewritten_graph_has_no_gather_or_scatter():
    # the rewritten graph: one routed op call, no gathers / scatters / softmax left;
    # the routing (topk, sort) stays
    m = ClusterBlock(16, 4, 10, causal=True, share=True)
    code = _rewritten_code(m, _qkv())
    assert code.count("site_attention(") == 1 and "topk" in code and "sort" in code, code
    for gone in ("gather", "scatter_add", "softmax", "einsum", "masked_fill"):
        assert gone not in code, code


def _rewritten_code(m, inputs) -> str:
    from attnfx.backend import Options, rewrite_graph

    codes = []

    def capture(gm, example_inputs):
        new, _ = rewrite_graph(gm, example_inputs, Options.from_dict({"inner": "eager"}))
        codes.append(re.sub(r"'[^']*'", "''", new.code))  # the spec key string left out
        return gm.forward

    torch._dynamo.reset()
    torch.compile(m, backend=capture)(*inputs)
    return codes[0]


def test_reference_module_forms():
    m = RoutedAttention(64, 2, window=8, num_clusters=4, causal=True).eval()
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(1))
    code = _rewritten_code(m, (x,))
    assert "site_attention" in code and "gather" not in code and "scatter_add" not in code


def test_count_of_other_indices_is_kept():
    class Wrong(ClusterBlock):
        def forward(self, q, k, v):
            bh, n, d = q.shape
            qm = self._assign(q)
            c, w = qm.shape[1], qm.shape[2]
            flat = qm.reshape(bh, c * w)
            other = flat.flip(-1)  # counts taken over other indices
            qs = _pick_rows(q, flat).reshape(bh, c, w, d)
            ks = _pick_rows(k, flat).reshape(bh, c, w, d)
            vs = _pick_rows(v, flat).reshape(bh, c, w, d)
            attn = (qs @ ks.transpose(-1, -2) * d**-0.5).softmax(-1)
            o = (attn @ vs).reshape(bh, c * w, d)
            idx = flat[:, :, None].expand(-1, -1, d)
            num = q.new_zeros(bh, n, d).scatter_add(1, idx, o)
            den = q.new_zeros(bh, n).scatter_add(1, other, torch.ones_like(other, dtype=q.dtype))
            return num / den.clamp(min=1)[..., None]

    m = Wrong(16, 4, 10)
    inputs = _qkv()
    out = torch.compile(m, backend="attnfx")(*inputs)
    counters = dict(attnfx.counters)
    assert "rewritten.routed" not in counters, counters
    assert any("routed" in k and k.startswith("kept.") for k in counters), counters
    torch.testing.assert_close(out, m(*inputs))


def test_probabilities_with_another_user_are_kept():
    class Leaky(ClusterBlock):
        def forward(self, q, k, v):
            bh, n, d = q.shape
            qm = self._assign(q)
            c, w = qm.shape[1], qm.shape[2]
            flat = qm.reshape(bh, c * w)
            qs = _pick_rows(q, flat).reshape(bh, c, w, d)
            ks = _pick_rows(k, flat).reshape(bh, c, w, d)
            vs = _pick_rows(v, flat).reshape(bh, c, w, d)
            attn = (qs @ ks.transpose(-1, -2) * d**-0.5).softmax(-1)
            o = (attn @ vs).reshape(bh, c * w, d)
            out = _mean_scatter(n, flat, o, 1e-5)
            return out, attn.sum()

    m = Leaky(16, 4, 10)
    torch.compile(m, backend="attnfx")(*_qkv())
    counters = dict(attnfx.counters)
    assert "rewritten.routed" not in counters
    assert counters.get("kept.probabilities have other users (e.g. returned or logged)") == 1


def test_a_wrong_op_is_rejected_by_the_verifier(monkeypatch):
    from attnfx import routed

    real = routed.forward

    def off_by_one(q, k, v, qi, ki, spec):
        out, o, lse = real(q, k, v, qi, ki, spec)
        return out * 1.01, o, lse

    monkeypatch.setattr(routed, "forward", off_by_one)
    m = ClusterBlock(16, 4, 10)
    inputs = _qkv()
    out = torch.compile(m, backend="attnfx")(*inputs)
    counters = dict(attnfx.counters)
    assert counters.get("kept.verifier rejected the rewrite") == 1, counters
    torch.testing.assert_close(out, m(*inputs))


def test_fp16_second_form():
    m = ClusterBlock(16, 4, 10, causal=True, share=True)
    _compile_and_check(m, _qkv(dtype=torch.float16), grad=False)
