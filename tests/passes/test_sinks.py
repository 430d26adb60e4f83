"""Learned attention sinks (gpt-oss; Xiao et al. 2023): ``softmax(cat(s, sink))`` with the
sink's column dropped is one softmax site whose spec carries the sink as an extra logit
of the normalizer; its gradient reaches the sink parameter.  A row-max subtraction before
the softmax is looked through.  Near-misses are kept with their reasons."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfx
from attnfx.testing import assert_rewrites_match_eager

B, H, HK, N, D = 2, 4, 2, 13, 16


class GptOssStyle(nn.Module):
    """Written like gpt-oss's eager attention: scaled scores plus an additive mask, a
    per-head sink column, the row max subtracted, softmax, the sink dropped."""

    def __init__(self, sink_first=False, subtract_max=True, window=None):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.sinks = nn.Parameter(torch.randn(H, generator=g) * 2)
        self.sink_first, self.subtract_max, self.window = sink_first, subtract_max, window

    def forward(self, q, k, v):
        n = q.shape[-2]
        k = k[:, :, None].expand(B, HK, H // HK, n, D).reshape(B, H, n, D)  # repeat_kv
        v = v[:, :, None].expand(B, HK, H // HK, n, D).reshape(B, H, n, D)
        i = torch.arange(n, device=q.device)
        keep = i[None, :] <= i[:, None]
        if self.window is not None:
            keep = keep & (i[:, None] - i[None, :] < self.window)
        mask = torch.zeros(n, n, device=q.device, dtype=q.dtype)
        mask = mask.masked_fill(~keep, torch.finfo(q.dtype).min)
        w = torch.matmul(q, k.transpose(2, 3)) * D**-0.5 + mask
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        parts = [sinks, w] if self.sink_first else [w, sinks]
        c = torch.cat(parts, dim=-1)
        if self.subtract_max:
            c = c - c.max(dim=-1, keepdim=True).values
        p = F.softmax(c, dim=-1, dtype=c.dtype)
        p = p[..., 1:] if self.sink_first else p[..., :-1]
        p = F.dropout(p, p=0.0, training=self.training).to(v.dtype)
        return torch.matmul(p, v).transpose(1, 2).reshape(B, n, H * D)


def _qkv(dtype=torch.float32, n=N):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, h, n, D, generator=g).to(dtype) for h in (H, HK, HK)]


def _site(m, *inputs):
    rep = attnfx.explain(m, *inputs)
    assert len(rep.sites) == 1, rep
    return rep.sites[0]


@pytest.mark.parametrize(
    "sink_first,subtract_max,window",
    [(False, True, None), (True, True, None), (False, False, 5)],
    ids=["gpt-oss", "sink-first", "no-max-window"],
)
def test_sink_site_rewritten_with_gradients(sink_first, subtract_max, window):
    m = GptOssStyle(sink_first, subtract_max, window)
    site = _site(m, *_qkv())
    assert site.status == "rewritten", site
    assert site.kind == "softmax"
    spec = site.spec
    assert spec.sink is not None and spec.gqa_group == H // HK, spec
    # the sink is an aux operand of the op, not a score op
    assert all(op.aux != spec.sink for op in spec.score_ops)
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, _qkv(), grad=True, params=True)


def test_sink_gradient_reaches_the_parameter():
    m = GptOssStyle()
    ref = GptOssStyle()
    ref.load_state_dict(m.state_dict())
    cm = torch.compile(m, backend="attnfx")
    q, k, v = _qkv()
    cm(q, k, v).square().sum().backward()
    ref(q, k, v).square().sum().backward()
    assert attnfx.counters["rewritten.softmax"] >= 1
    assert m.sinks.grad.abs().min() > 0
    torch.testing.assert_close(m.sinks.grad, ref.sinks.grad, atol=1e-5, rtol=1e-4)


def test_row_max_subtraction_without_sink_is_looked_through():
    class Stable(nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-2, -1) / math.sqrt(D)
            s = s - s.amax(-1, keepdim=True).detach()
            return s.softmax(-1) @ v

    g = torch.Generator().manual_seed(1)
    qkv = [torch.randn(B, H, N, D, generator=g) for _ in range(3)]
    assert _site(Stable(), *qkv).status == "rewritten"
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(Stable(), qkv, grad=True)


def test_sink_under_the_kernels(monkeypatch, tmp_path):
    # the generated kernels (Triton interpreter): fp16 forward and gradients
    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    m = GptOssStyle().half()
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, _qkv(torch.float16, n=9), grad=True, params=True)


# -- near-misses: kept, with the reason --------------------------------------------------


class NearMiss(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.sinks = nn.Parameter(torch.randn(H, generator=torch.Generator().manual_seed(4)))

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * D**-0.5
        col = self.sinks.reshape(1, -1, 1, 1).expand(B, H, q.shape[-2], 1)
        if self.form == "from-scores":  # a "sink" computed from the scores themselves
            c = torch.cat([s, s.mean(-1, keepdim=True)], -1)
        elif self.form == "two-columns":
            c = torch.cat([s, torch.cat([col, col], -1)], -1)
        else:  # the sink's probability is kept (values padded with a zero row)
            c = torch.cat([s, col], -1)
            v = torch.cat([v, torch.zeros_like(v[..., :1, :])], -2)
        p = c.softmax(-1)
        if self.form != "not-dropped":
            p = p[..., : -(c.shape[-1] - s.shape[-1])]
        return p @ v


@pytest.mark.parametrize(
    "form,reason",
    [
        ("from-scores", "the sink logit depends on the scores"),
        ("two-columns", "scores concatenated with more than one extra column"),
        ("not-dropped", "the sink column's probability is not dropped after the softmax"),
    ],
)
def test_sink_near_misses_are_kept_with_reasons(form, reason):
    g = torch.Generator().manual_seed(2)
    qkv = [torch.randn(B, H, N, D, generator=g) for _ in range(3)]
    site = _site(NearMiss(form), *qkv)
    assert site.status == "kept" and site.reason == reason, site


# -- StreamingLLM: the first S keys stay visible besides a causal band -----------------------


class StreamingLLM(nn.Module):
    """Xiao et al. 2023: attention sinks as the first ``sinks`` tokens kept by every
    query, besides a causal window of ``window`` keys; the mask built with ``arange``."""

    def __init__(self, sinks=3, window=5):
        super().__init__()
        self.sinks, self.window = sinks, window

    def forward(self, q, k, v):
        n = q.shape[-2]
        i = torch.arange(n, device=q.device)
        qi, ki = i[:, None], i[None, :]
        keep = (ki <= qi) & ((qi - ki < self.window) | (ki < self.sinks))
        s = q @ k.transpose(-2, -1) * D**-0.5
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def test_streaming_llm_prefix_and_band_is_one_predicate_with_two_ranges():
    g = torch.Generator().manual_seed(3)
    qkv = [torch.randn(B, H, 40, D, generator=g) for _ in range(3)]
    site = _site(StreamingLLM(), *qkv)
    assert site.status == "rewritten", site
    mc = site.spec.mask_class
    assert (mc.kind, mc.left, mc.right, mc.prefix) == ("window", 4, 0, 3), mc
    assert "prefix(3)" in mc.describe()
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(StreamingLLM(), qkv, grad=True)
