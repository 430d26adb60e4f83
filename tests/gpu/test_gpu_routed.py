"""Routed kernels on the GPU (skipped without CUDA): the compiled forward and backward
against eager's gather/softmax/scatter program under the equivalence rule in bf16, fp16
and fp32 (the interpreter cannot check bf16), at the issue's cluster sizes, and the
compiled reference module end to end."""

from __future__ import annotations

import pytest
import torch

from attnfx import ops
from attnfx.spec import AttentionSpec, Routing, ScoreOp
from attnfx.testing import assert_attention_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CAUSAL_SELF = (("lt", float("-inf")), ("eq", -5e4))


def _eager(q, k, v, qi, ki, c, w, fills):
    b, h, n, d = q.shape

    def rows(t, idx):
        return t.gather(2, idx[..., None].expand(-1, -1, -1, d)).view(b, h, c, w, d)

    qp, kp = qi.view(b, h, c, w), ki.view(b, h, c, w)
    s = rows(q, qi) @ rows(k, ki).transpose(-1, -2) * d**-0.5
    for rel, value in fills:
        s = s.masked_fill(getattr(torch, rel)(qp[..., :, None], kp[..., None, :]), value)
    o = (s.softmax(-1) @ rows(v, ki)).view(b, h, c * w, d)
    num = torch.zeros_like(v).scatter_add(2, qi[..., None].expand(-1, -1, -1, d), o)
    cnt = torch.zeros(b, h, n, dtype=v.dtype, device=v.device)
    cnt = cnt.scatter_add(2, qi, torch.ones_like(qi, dtype=v.dtype))
    return num / cnt.clamp(min=1)[..., None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,w,d,fills", [(2048, 256, 64, CAUSAL_SELF), (1024, 128, 128, ())])
def test_routed_kernels_match_eager(dtype, n, w, d, fills):
    b, h, c = 1, 2, n // w
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype) for _ in range(3))
    means = torch.nn.functional.normalize(torch.randn(h, c, d, device="cuda", generator=g), dim=-1)
    sim = torch.einsum("bhnd,hcd->bhcn", torch.nn.functional.normalize(q.float(), dim=-1), means)
    qi = sim.topk(w, dim=-1).indices.sort(-1).values.reshape(b, h, c * w)
    ki = qi
    spec = AttentionSpec(
        kind="routed",
        score_ops=(ScoreOp("mul", value=d**-0.5),),
        aux_dtypes=("int64", "int64"),
        head_dim=d,
        head_dim_v=d,
        dtype=str(dtype)[6:],
        out_dtype=str(dtype)[6:],
        routing=Routing(window=w, key_window=w, fills=fills),
    )
    c_in = [t.clone().requires_grad_() for t in (q, k, v)]
    b_in = [t.clone().requires_grad_() for t in (q, k, v)]
    g_in = [t.double().requires_grad_() for t in (q, k, v)]
    # float32: no TF32 on either side (the kernels use IEEE products for float32)
    assert not torch.backends.cuda.matmul.allow_tf32
    cand = ops.routed_attention(*c_in, qi, ki, spec)
    base = _eager(*b_in, qi, ki, c, w, fills)
    gold = _eager(*g_in, qi, ki, c, w, fills)
    assert_attention_close(cand, base, gold, context="output")
    cot = torch.randn(cand.shape, device="cuda", generator=g).to(dtype)
    for o in (cand, base, gold):
        o.backward(cot.to(o.dtype))
    for i in range(3):
        assert_attention_close(
            c_in[i].grad, b_in[i].grad, g_in[i].grad, grad=True, context=f"grad {i}"
        )


def test_routed_module_compiles_end_to_end():
    import attnfx
    from attnfx.nn import RoutedAttention

    attnfx.reset_counters()
    torch._dynamo.reset()
    m = RoutedAttention(256, 4, window=64, num_clusters=8, causal=True).cuda().to(torch.bfloat16)
    x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16)
    out = torch.compile(m.eval(), backend="attnfx")(x)
    assert attnfx.counters["rewritten.routed"] == 1, dict(attnfx.counters)
    assert out.isfinite().all()
