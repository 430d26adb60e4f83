"""Scores computed on merged (batch·head) operands and viewed back to (B, H, N, N): the
batched-heads ``bmm`` style and GPT-2's ``baddbmm(empty, q, kᵀ, beta=0, alpha=...)``
(``reorder_and_upcast_attn``).  Each is rewritten with outputs and gradients equal to
eager under the rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import attnfx
from attnfx.testing import assert_rewrites_match_eager

B, H, N, D = 2, 3, 16, 32


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3)]


class BatchedHeads(nn.Module):
    """``bmm`` over (B·H, N, D), scores viewed to (B, H, N, N) for the mask, back to 3-D
    for the value product (older fairseq / Megatron style)."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        b, h, n, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, k, v))
        s = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(d)
        s = s.view(b, h, n, n)
        if self.causal:
            keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        p = s.softmax(dim=-1)
        o = torch.bmm(p.view(b * h, n, n), v3)
        return o.view(b, h, n, d)


class BaddbmmUpcast(nn.Module):
    """GPT-2's ``_upcast_and_reordered_attn``: ``baddbmm`` on a garbage ``empty`` with
    ``beta=0`` (never read), scale in ``alpha``, reshape to 4-D, float32 softmax."""

    def __init__(self, layer_idx: int = 1):
        super().__init__()
        self.alpha = 1.0 / math.sqrt(D) / float(layer_idx + 1)

    def forward(self, q, k, v):
        b, h, n, d = q.shape
        w = torch.empty(b * h, n, n, dtype=torch.float32, device=q.device)
        q3, kt3 = q.reshape(-1, n, d), k.transpose(-1, -2).reshape(-1, d, n)
        w = torch.baddbmm(w, q3.float(), kt3.float(), beta=0, alpha=self.alpha)
        w = w.reshape(b, h, n, n)
        keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        w = torch.where(keep, w, torch.tensor(torch.finfo(w.dtype).min))
        p = nn.functional.softmax(w, dim=-1).type(v.dtype)
        return torch.matmul(p, v)


@pytest.mark.parametrize("causal", [False, True])
def test_batched_heads(causal):
    assert_rewrites_match_eager(BatchedHeads(causal), _qkv(), grad=True)


def test_baddbmm_beta0_reshaped():
    # float32 model: q, k, v share the dtype.  (A float16 model upcasts q and k only:
    # mixed q/k/v dtypes are kept, with that reason.)
    assert_rewrites_match_eager(BaddbmmUpcast(), _qkv(), grad=True)


def test_baddbmm_garbage_is_never_read():
    """``beta=0``: the preallocated tensor's contents (NaN here) must not reach the
    result."""

    class NanInit(BaddbmmUpcast):
        def forward(self, q, k, v):
            b, h, n, d = q.shape
            w = torch.full((b * h, n, n), float("nan"), dtype=q.dtype)
            w = torch.baddbmm(
                w,
                q.reshape(-1, n, d),
                k.transpose(-1, -2).reshape(-1, d, n),
                beta=0,
                alpha=self.alpha,
            )
            return torch.matmul(w.reshape(b, h, n, n).softmax(-1), v)

    out = assert_rewrites_match_eager(NanInit(), _qkv())
    assert not out.isnan().any()


def test_reshape_that_mixes_query_rows_is_not_split():
    """A view that does not split the merged batch·head dim (here it folds query rows into
    the batch) is no head split: the site is not taken as attention over keys."""

    class Mixed(nn.Module):
        def forward(self, q, k, v):
            b, h, n, d = q.shape
            s = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2))
            s = s.view(b, h * 2, n // 2, n)  # query rows regrouped: not (B, H, N, N)
            p = s.softmax(-1).reshape(b * h, n, n)
            return torch.bmm(p, v.reshape(b * h, n, d)).view(b, h, n, d)

    m = Mixed()
    q, k, v = _qkv()
    got = torch.compile(m, backend="attnfx")(q, k, v)
    assert attnfx.counters["rewritten.softmax"] == 0
    torch.testing.assert_close(got, m(q, k, v))


class ClassAttention(nn.Module):
    """CaiT-style class attention: the class token's query (NQ = 1, from a slice) over
    ``cat(cls, tokens)`` (NK = N + 1)."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x[:, 0:1]).reshape(b, 1, self.h, self.d).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, self.h, self.d).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, self.h, self.d).permute(0, 2, 1, 3)
        attn = (q * self.d**-0.5) @ k.transpose(-2, -1)
        cls = attn.softmax(dim=-1) @ v
        return cls.transpose(1, 2).reshape(b, 1, c)


def test_class_attention_single_query():
    torch.manual_seed(0)
    x = torch.randn(2, 17, 64)
    assert_rewrites_match_eager(ClassAttention(), [x], grad=True, grad_idx=(0,), params=True)


class WindowAttention(nn.Module):
    """Swin-style shifted-window attention: a (H, N, N) relative bias, then the per-window
    mask added through a (B, nW, H, N, N) view and viewed back."""

    def __init__(self, n_windows=4, heads=2, n=16):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.register_buffer("bias", torch.randn(heads, n, n, generator=g))
        mask = torch.zeros(n_windows, n, n)
        mask[1:, : n // 2, n // 2 :] = -100.0  # shifted windows mix regions
        mask[1:, n // 2 :, : n // 2] = -100.0
        self.register_buffer("mask", mask)
        self.nw = n_windows

    def forward(self, q, k, v):
        bw, h, n, d = q.shape
        attn = (q * d**-0.5) @ k.transpose(-2, -1)
        attn = attn + self.bias.unsqueeze(0)
        attn = attn.view(-1, self.nw, h, n, n) + self.mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, h, n, n)
        return attn.softmax(dim=-1) @ v


def test_swin_window_mask_through_5d_view():
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(2 * 4, 2, 16, D, generator=g) for _ in range(3)]
    assert_rewrites_match_eager(WindowAttention(), qkv, grad=True)
