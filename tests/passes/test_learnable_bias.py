"""Learnable score biases in training (T5's bucketed embedding, Swin's bias table, an
``nn.Parameter`` (H, N, N)): rewritten, with the bias's gradient from the op's backward
equal to eager's under the rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfx
from attnfx.testing import assert_rewrites_match_eager

B, H, N, D = 2, 2, 16, 32


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3)]


class ParamBias(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(H, N, N) * 0.5)
        self.causal = causal

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(D) + self.bias
        if self.causal:
            keep = torch.ones(N, N, dtype=torch.bool).tril()
            s = s.masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v


class BucketedBias(nn.Module):
    """T5-style: a per-head embedding of relative-position buckets, gathered to (1, H, N, N)."""

    def __init__(self, buckets=8):
        super().__init__()
        self.emb = nn.Embedding(buckets, H)
        rel = torch.arange(N)[None, :] - torch.arange(N)[:, None]
        self.register_buffer("bucket", rel.clamp(-buckets // 2, buckets // 2 - 1) + buckets // 2)

    def forward(self, q, k, v):
        bias = self.emb(self.bucket).permute(2, 0, 1).unsqueeze(0)
        s = q @ k.transpose(-2, -1) + bias  # T5 does not scale
        return s.softmax(-1) @ v


class TemperatureThenBias(nn.Module):
    """A learnable per-head multiplier after a bias (it cannot move onto q): a ``mul_aux``
    whose gradient is the scores before it."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, H, 1, N) * 0.5)
        self.tau = nn.Parameter(torch.rand(1, H, 1, 1) + 0.5)

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1) / math.sqrt(D) + self.bias) * self.tau
        return s.softmax(-1) @ v


class SdpaLearnableMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.mask = nn.Parameter(torch.randn(1, H, N, N) * 0.5)

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


CASES = {
    "parameter bias": (ParamBias, "softmax"),
    "parameter bias + causal": (lambda: ParamBias(causal=True), "softmax"),
    "T5 bucketed embedding": (BucketedBias, "softmax"),
    "multiplier after bias": (TemperatureThenBias, "temperature"),
    "sdpa learnable mask": (SdpaLearnableMask, "softmax"),
}


@pytest.mark.parametrize("name", CASES)
def test_learnable_bias_rewritten_with_gradient(name):
    torch.manual_seed(0)
    cls, kind = CASES[name]
    m = cls()
    assert_rewrites_match_eager(m, _qkv(), kind=kind, grad=True, params=True)


@pytest.mark.parametrize("interpret", [False, True], ids=["cpu", "kernel"])
def test_bias_gradient_through_the_kernels_path(interpret, monkeypatch, tmp_path):
    """The aux gradient comes from its own op whatever computes dq/dk/dv (here the
    generated kernels under the interpreter)."""
    if interpret:
        monkeypatch.setenv("ATTNFX_INTERPRET", "1")
        monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    m = ParamBias(causal=True)
    assert_rewrites_match_eager(m, _qkv(), grad=True, params=True)


def test_bias_depending_on_scores_still_refused():
    class ScoreBias(nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-2, -1)
            return (s + s.detach().mean(-1, keepdim=True)).softmax(-1) @ v

    q, k, v = _qkv()
    torch.compile(ScoreBias(), backend="attnfx")(q, k, v)
    assert attnfx.counters["rewritten.softmax"] == 0
