"""Fully masked query rows hold the semantics of the code a site came from, for every
input the spec admits — not only for the masks verification saw.

SDPA (``fully_masked="zero"``): a row whose scores are all -inf gives 0 and zero
gradients, whether the -inf comes from a bool mask, ``is_causal`` or a float additive
mask.  Eager softmax (``"preserve"``) gives NaN there.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnfx
from attnfx import ops
from attnfx.spec import AttentionSpec, ScoreOp

D = 16


def _additive_mask(nq, nk, dead_rows=(), dtype=torch.float32):
    torch.manual_seed(3)
    m = torch.randn(1, 1, nq, nk, dtype=dtype)
    m[..., :, 1::3] = -math.inf  # partly masked rows
    for r in dead_rows:
        m[..., r, :] = -math.inf
    return m


def _qkv(b=2, h=2, nq=19, nk=23, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(b, h, n, D, dtype=dtype, requires_grad=True) for n in (nq, nk, nk)]


def _grads(out, inputs, seed=1):
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, inputs, cot)


def _spec(fm, dtype="float32"):
    return AttentionSpec(
        score_ops=(ScoreOp("mul", 1 / math.sqrt(D)), ScoreOp("add_aux", aux=0)),
        aux_dtypes=(dtype,),
        head_dim=D,
        head_dim_v=D,
        dtype=dtype,
        out_dtype=dtype,
        fully_masked=fm,
    )


@pytest.mark.parametrize("interpret", [False, True], ids=["reference", "kernel"])
def test_op_zero_rows_from_additive_mask(interpret, monkeypatch, tmp_path):
    if interpret:
        monkeypatch.setenv("ATTNFX_INTERPRET", "1")
        monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    q, k, v = _qkv()
    mask = _additive_mask(19, 23, dead_rows=(0, 7, 18))
    out = ops.attention(q, k, v, _spec("zero"), [mask])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not out.isnan().any()
    assert (out[:, :, [0, 7, 18]] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, gr in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        assert not g.isnan().any()
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("interpret", [False, True], ids=["reference", "kernel"])
def test_op_preserve_keeps_eager_nan(interpret, monkeypatch, tmp_path):
    """Eager ``softmax(s + mask)`` with an all -inf row gives NaN: kept as it is."""
    if interpret:
        monkeypatch.setenv("ATTNFX_INTERPRET", "1")
        monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    q, k, v = _qkv()
    mask = _additive_mask(19, 23, dead_rows=(4,))
    out = ops.attention(q, k, v, _spec("preserve"), [mask])
    ref = ((q @ k.transpose(-2, -1)) / math.sqrt(D) + mask).softmax(-1) @ v
    assert out[:, :, 4].isnan().all() and ref[:, :, 4].isnan().all()
    live = [r for r in range(19) if r != 4]
    torch.testing.assert_close(out[:, :, live], ref[:, :, live], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interpret", [False, True], ids=["reference", "kernel"])
def test_op_zero_keeps_nan_rows_nan(interpret, monkeypatch, tmp_path):
    """SDPA semantics zero a row whose scores are all -inf, not a row whose scores are
    NaN: SDPA gives NaN there.  The kernels' row max ignores NaN (max.f32), so such a row
    had the running max of an all -inf one and came out 0 -- a NaN turned into a finite
    number; its sum is NaN, which tells them apart.  Fully masked rows stay 0."""
    if interpret:
        monkeypatch.setenv("ATTNFX_INTERPRET", "1")
        monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    q, k, v = _qkv()
    with torch.no_grad():
        q[:, :, 3] = float("nan")  # every kept score of row 3 is NaN
        q[1, 0, 11, 2] = float("inf")  # row 11 of one head: ±inf and NaN scores
    # a bool mask: its filled scores are -inf even in a NaN row, so that every tile's
    # max, which skips NaN on the GPU, is -inf there (the interpreter's nanmax too)
    keep = torch.ones(19, 23, dtype=torch.bool)
    keep[:, 1::3] = False
    keep[[0, 7]] = False  # fully masked rows
    spec = AttentionSpec(
        score_ops=(ScoreOp("mul", 1 / math.sqrt(D)), ScoreOp("fill_aux", -math.inf, aux=0)),
        aux_dtypes=("bool",),
        head_dim=D,
        head_dim_v=D,
        dtype="float32",
        out_dtype="float32",
        fully_masked="zero",
    )
    out = ops.attention(q, k, v, spec, [~keep[None, None]])  # fill_aux fills where True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert ref[:, :, 3].isnan().all() and ref[1, 0, 11].isnan().all()
    assert torch.equal(out.isnan(), ref.isnan())
    assert (out[:, :, [0, 7]] == 0).all()
    torch.testing.assert_close(out.nan_to_num(7.0), ref.nan_to_num(7.0), rtol=1e-5, atol=1e-5)
    dq, dk, dv = _grads(out, [q, k, v])
    rq, rk, rv = _grads(ref, [q, k, v])
    assert dq[:, :, 3].isnan().all() and rq[:, :, 3].isnan().all()
    assert torch.equal(dq.isnan(), rq.isnan())


class _Sdpa(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_sdpa_site_zero_rows_not_seen_at_verification(inner):
    """Verified on a mask with no dead row, then run on one with dead rows (same shapes:
    no recompile): the rewrite must still return SDPA's zeros, not NaN."""
    q, k, v = _qkv(nq=12, nk=12)
    m = torch.compile(_Sdpa(), backend="attnfx", options={"inner": inner})
    m(q, k, v, _additive_mask(12, 12))
    assert attnfx.counters["rewritten.softmax"] == 1, dict(attnfx.counters)
    mask = _additive_mask(12, 12, dead_rows=(2, 11))
    out = m(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert attnfx.counters["rewritten.softmax"] == 1  # no recompile: the same rewrite ran
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, gr in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        assert not g.isnan().any()
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)
