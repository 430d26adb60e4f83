"""The routed op (``attnfx::routed_attention``, ``attnfx/routed.py``): registered through
torch.library (opcheck), its deterministic CPU path equal to the spec's reference in
float64 and within the equivalence rule of eager's gather/softmax/scatter program in the
working dtype — outputs and gradients, with duplicated and uncovered tokens, causal and
shared-QK fills, both count denominators, and eager's NaN for a row with no visible key."""

from __future__ import annotations

import math

import pytest
import torch

from attnfx import ops, routed
from attnfx.spec import AttentionSpec, Routing, ScoreOp
from attnfx.testing import assert_attention_close

B, H, N, D = 2, 3, 40, 16
C, W = 4, 12  # 48 slots over 40 tokens: duplicates and, by construction, uncovered tokens

CAUSAL = (("lt", float("-inf")),)
SELF = (("eq", -5e4),)


def _spec(dtype="float32", fills=(), eps=None, w=W):
    return AttentionSpec(
        kind="routed",
        score_ops=(ScoreOp("mul", value=D**-0.5),),
        aux_dtypes=("int64", "int64"),
        head_dim=D,
        head_dim_v=D,
        dtype=dtype,
        out_dtype=dtype,
        routing=Routing(window=w, key_window=w, fills=fills, eps=eps),
    )


def _members(seed, shared=True, n=N, c=C, w=W):
    """(B, H, C·w) slot indices sorted per cluster, tokens 0 and n-1 never chosen, some
    tokens in several clusters (and, unsorted clusters aside, the same as routing gives)."""
    g = torch.Generator().manual_seed(seed)
    qi = torch.stack([torch.randperm(n - 2, generator=g)[:w] + 1 for _ in range(B * H * c)]).view(
        B, H, c, w
    )
    qi = qi.sort(-1).values.reshape(B, H, c * w)
    if shared:
        return qi, qi
    ki = torch.stack([torch.randperm(n - 2, generator=g)[:w] + 1 for _ in range(B * H * c)]).view(
        B, H, c, w
    )
    return qi, ki.sort(-1).values.reshape(B, H, c * w)


def _qkv(dtype, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to(dtype) for _ in range(3)]


def eager(q, k, v, qi, ki, fills, eps, w=W):
    """The program as plain PyTorch code writes it (gathers, masks, softmax, scatter)."""
    b, h, n, d = q.shape
    c = qi.shape[-1] // w

    def rows(t, idx):
        return t.gather(2, idx[..., None].expand(-1, -1, -1, d)).view(b, h, c, w, d)

    qp, kp = qi.view(b, h, c, w), ki.view(b, h, c, w)
    s = rows(q, qi) @ rows(k, ki).transpose(-1, -2) * d**-0.5
    for rel, value in fills:
        m = getattr(torch, rel)(qp[..., :, None], kp[..., None, :])
        s = s.masked_fill(m, value)
    o = (s.softmax(-1) @ rows(v, ki)).view(b, h, c * w, d)
    num = torch.zeros_like(v).scatter_add(2, qi[..., None].expand(-1, -1, -1, d), o)
    cnt = torch.zeros(b, h, n, dtype=v.dtype).scatter_add(2, qi, torch.ones_like(qi, dtype=v.dtype))
    den = cnt + eps if eps is not None else cnt.clamp(min=1)
    return num / den[..., None]


def test_members_have_duplicates_and_uncovered_tokens():
    qi, _ = _members(0)
    counts = torch.stack([torch.bincount(r, minlength=N) for r in qi.view(-1, C * W)])
    assert (counts == 0).any() and (counts > 1).any()


def test_opcheck():
    q, k, v = _qkv(torch.float32)
    qi, ki = _members(1, shared=False)
    spec = _spec(fills=SELF, eps=1e-5)
    torch.library.opcheck(ops.routed_attention_op, (q, k, v, qi, ki, spec.key))
    # a gather index (trailing stride-0 dim) is read as the same slots
    qx = qi[..., None].expand(-1, -1, -1, D)
    torch.library.opcheck(ops.routed_attention_op, (q, k, v, qx, qx, spec.key))


def test_spec_key_round_trip_and_validation():
    spec = _spec(fills=CAUSAL + SELF, eps=1e-2)
    assert AttentionSpec.from_key(spec.key) == spec
    assert "routed(w=12/12" in spec.describe()
    with pytest.raises(ValueError):
        Routing(window=4, key_window=4, fills=(("before", 0.0),))
    with pytest.raises(ValueError):
        AttentionSpec(kind="routed", aux_dtypes=("float32",), routing=Routing(4, 4))


@pytest.mark.parametrize(
    "fills,eps,shared",
    [((), None, False), (CAUSAL + SELF, None, True), (SELF, 1e-5, True), (CAUSAL, 1e-2, False)],
)
def test_float64_equals_the_program(fills, eps, shared):
    q, k, v = (t.requires_grad_() for t in _qkv(torch.float64, seed=2))
    qi, ki = _members(3, shared=shared)
    spec = _spec("float64", fills, eps)
    out = ops.routed_attention(q, k, v, qi, ki, spec)
    ref = eager(q, k, v, qi, ki, fills, eps)
    nan = ref.isnan()
    assert torch.equal(out.isnan(), nan)
    if fills == CAUSAL:  # separate clusters, causal: some query slot sees no key
        assert nan.any()
    torch.testing.assert_close(out[~nan], ref[~nan], rtol=1e-12, atol=1e-12)
    if nan.any():
        return
    # uncovered tokens: exactly 0
    cnt = torch.zeros(B, H, N, dtype=torch.long).scatter_add(2, qi, torch.ones_like(qi))
    assert (out[cnt == 0] == 0).all()
    cot = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g_op = torch.autograd.grad(out, (q, k, v), cot)
    g_ref = torch.autograd.grad(ref, (q, k, v), cot)
    for a, b in zip(g_op, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # tokens no cluster chose get no gradient
    assert (g_op[0][cnt == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fills,eps", [(CAUSAL + SELF, None), (SELF, 1e-5), ((), None)])
def test_working_dtype_within_the_rule(dtype, fills, eps):
    qi, ki = _members(5)
    inputs = _qkv(dtype, seed=6)
    c_in = [t.clone().requires_grad_() for t in inputs]
    b_in = [t.clone().requires_grad_() for t in inputs]
    g_in = [t.double().requires_grad_() for t in inputs]
    spec = _spec(str(dtype).removeprefix("torch."), fills, eps)
    cand = ops.routed_attention(*c_in, qi, ki, spec)
    base = eager(*b_in, qi, ki, fills, eps)
    gold = eager(*g_in, qi, ki, fills, eps)
    assert_attention_close(cand, base, gold, context="output")
    cot = torch.randn(cand.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    for o in (cand, base, gold):
        o.backward(cot.to(o.dtype))
    for i in range(3):
        assert_attention_close(
            c_in[i].grad, b_in[i].grad, g_in[i].grad, grad=True, context=f"grad {i}"
        )


def test_deterministic_and_blocked():
    """Two runs give the same bits; a block of clusters at a time (tiny blocks) gives
    what one block gives."""
    q, k, v = (t.requires_grad_() for t in _qkv(torch.float32, seed=9))
    qi, ki = _members(10)
    spec = _spec(fills=CAUSAL + SELF)
    runs = []
    for elems in (routed._CLUSTER_ELEMS, W * W):
        old, routed._CLUSTER_ELEMS = routed._CLUSTER_ELEMS, elems
        try:
            for _ in range(2):
                out = ops.routed_attention(q, k, v, qi, ki, spec)
                grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
                runs.append((out, *grads))
        finally:
            routed._CLUSTER_ELEMS = old
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


def test_lse_and_slot_outputs():
    q, k, v = _qkv(torch.float32, seed=11)
    qi, ki = _members(12)
    spec = _spec(fills=SELF)
    out, slot_o, lse = ops.routed_attention_op(q, k, v, qi, ki, spec.key)
    assert slot_o.shape == (B, H, C * W, D) and lse.shape == (B, H, C * W)
    # lse of slot 0 by hand
    qq, kk = q[0, 0, qi[0, 0, :W]].double(), k[0, 0, ki[0, 0, :W]].double()
    s = qq @ kk.T / math.sqrt(D)
    s = s.masked_fill(qi[0, 0, :W, None] == ki[0, 0, None, :W], -5e4)
    torch.testing.assert_close(lse[0, 0, :W].double(), s.logsumexp(-1), rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_refused():
    q, k, v = _qkv(torch.float32)
    qi, ki = _members(0)
    with pytest.raises(ValueError, match="clusters"):
        ops.routed_attention(q, k, v, qi[..., :-1], ki, _spec())
