"""Generated kernels on a CUDA GPU (marker ``gpu``; skipped without CUDA).

bf16 and fp16, forward and backward, softmax and sigmoid, against the equivalence rule
(``attnfx.testing.assert_attention_close``): cand = ``attnfx.ops.attention``, base = the
same math in plain PyTorch in the working dtype, gold = that math in float64.  Head dims
{16, 32, 40, 64, 80, 96, 128, 160, 192, 256}; lengths that are no multiple of any block;
q_len != kv_len; GQA groups 2 and 4; causal.  Each case is its own spec (one compile of
fwd + bwd kernels), so the case list is what bounds the run time (~26 specs).

Plus one end-to-end ``torch.compile(backend="attnfx")`` of a small GPT-2-like module in
bf16 on CUDA: both attention sites rewritten, the Triton kernels launched forward and
backward, output and gradients under the rule.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128, 160, 192, 256)
# (NQ, NK): no multiple of 16, 32, 64 or 128; equal and unequal
LENGTHS = ((77, 77), (1000, 1000), (129, 129), (77, 1000), (1000, 129), (129, 77))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _case_list():
    cases = []
    # every head dim: softmax and sigmoid, each in one dtype (the other dtype at the
    # next head dim), lengths / causal / GQA rotating so that each shows up often
    for i, d in enumerate(HEAD_DIMS):
        for j, act in enumerate(("softmax", "sigmoid")):
            dt = ("bf16", "fp16")[(i + j) % 2]
            nq, nk = LENGTHS[(2 * i + j) % len(LENGTHS)]
            causal = (i + j) % 3 == 0
            group = (1, 2, 1, 4)[(i + 2 * j) % 4]
            cases.append((act, dt, d, nq, nk, group, causal))
    # the shapes that matter most, in both dtypes: D 64 / 128, GQA 4, causal, q != kv
    for dt in ("bf16", "fp16"):
        cases.append(("softmax", dt, 128, 1000, 1000, 4, True))
        cases.append(("sigmoid", dt, 64, 129, 1000, 2, True))
        cases.append(("softmax", dt, 64, 1000, 77, 2, False))
    return cases


CASES = _case_list()


def _id(c):
    act, dt, d, nq, nk, g, causal = c
    return f"{act}-{dt}-d{d}-q{nq}-k{nk}-g{g}{'-causal' if causal else ''}"


def make_spec(act, dtype, d, nk, group, causal):
    import sympy

    from attnfx.predicate import K, MaskPredicate, Q
    from attnfx.spec import AttentionSpec, ScoreOp

    ops = [ScoreOp("mul", d**-0.5)]
    if act == "sigmoid":
        ops.append(ScoreOp("add", -math.log(nk)))
    if causal:
        ops.append(
            ScoreOp("fill_pred", value=-math.inf, pred=MaskPredicate(sympy.Le(K, Q)).to_key())
        )
    name = str(dtype).removeprefix("torch.")
    return AttentionSpec(
        kind=act,
        activation=act,
        score_ops=tuple(ops),
        head_dim=d,
        head_dim_v=d,
        gqa_group=group,
        dtype=name,
        out_dtype=name,
    )


def math_attention(q, k, v, *, act, group, causal):
    """The plain PyTorch math, in the dtype of q (base: working dtype; gold: float64)."""
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    s = (q @ k.transpose(-2, -1)) * d**-0.5
    if act == "sigmoid":
        s = s - math.log(nk)
    if causal:
        keep = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1) if act == "softmax" else torch.sigmoid(s)
    return p @ v


def check_case(case, device="cuda", dtype=None, b=2, hk=2, seed=0):
    """Forward and backward of one case under the equivalence rule (also callable on the
    CPU under ATTNFX_INTERPRET=1 with fp16/fp32, to check this file without a GPU)."""
    act, dt, d, nq, nk, group, causal = case
    dtype = dtype or DTYPES[dt]
    spec = make_spec(act, dtype, d, nk, group, causal)
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = hk * group

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(b, h, nq, d), rnd(b, hk, nk, d), rnd(b, hk, nk, d)
    dout = rnd(b, h, nq, d)
    run_under_rule(
        spec,
        lambda q, k, v: math_attention(q, k, v, act=act, group=group, causal=causal),
        (q, k, v, dout),
        context=_id(case),
        transcendental=act == "sigmoid",
    )


def run_under_rule(spec, math_fn, qkv_dout, context, transcendental=False):
    """The op (cand), ``math_fn`` in the working dtype (base) and in float64 (gold),
    forward and backward: output and dq, dk, dv under the equivalence rule."""
    from attnfx import ops
    from attnfx.codegen import LAUNCHES
    from attnfx.testing import assert_attention_close

    *qkv, dout = qkv_dout
    leaves = {
        "cand": [t.clone().requires_grad_(True) for t in qkv],
        "base": [t.clone().requires_grad_(True) for t in qkv],
        "gold": [t.double().requires_grad_(True) for t in qkv],
    }
    before = dict(LAUNCHES)
    outs = {"cand": ops.attention(*leaves["cand"], spec)}
    outs.update((label, math_fn(*leaves[label])) for label in ("base", "gold"))
    for o in outs.values():
        o.backward(dout.to(o.dtype))
    assert LAUNCHES["fwd"] > before.get("fwd", 0) and LAUNCHES["bwd_dq"] > before.get("bwd_dq", 0)
    tr = transcendental
    assert_attention_close(
        outs["cand"], outs["base"], outs["gold"], transcendental=tr, context=f"{context} out"
    )
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_attention_close(
            leaves["cand"][i].grad,
            leaves["base"][i].grad,
            leaves["gold"][i].grad,
            grad=True,
            transcendental=tr,
            context=f"{context} {name}",
        )


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_fwd_bwd(case):
    check_case(case)


# ---------------------------------------------------------------------------------------
# The tiles schedule: masks that are not a K - Q band (host tile map, skipped tiles)
# ---------------------------------------------------------------------------------------

TILE_MASKS = {  # name -> (sympy predicate builder, the same mask on index tensors)
    "chunked64": (
        lambda Q, K, sp: sp.And(sp.Eq(sp.floor(Q / 64), sp.floor(K / 64)), sp.Le(K, Q)),
        lambda q, k: (q // 64 == k // 64) & (k <= q),
    ),
    "sinks_window": (
        lambda Q, K, sp: sp.Or(sp.Lt(K, 4), sp.And(sp.Le(K, Q), sp.Lt(Q - K, 256))),
        lambda q, k: (k < 4) | ((k <= q) & (q - k < 256)),
    ),
}
# (mask, dtype, D, NQ, NK, GQA group): every row keeps a key
TILE_CASES = [
    ("chunked64", "bf16", 128, 1000, 1000, 2),
    ("chunked64", "fp16", 64, 129, 1000, 1),
    ("sinks_window", "fp16", 128, 1000, 1000, 1),
    ("sinks_window", "bf16", 64, 77, 1000, 4),
]


def check_tiles_case(case, device="cuda", dtype=None, b=2, hk=2, seed=0):
    """One tiles-schedule case under the equivalence rule (also callable on the CPU
    under ATTNFX_INTERPRET=1 with float32)."""
    import sympy

    from attnfx.codegen import make_plan
    from attnfx.codegen.plan import ScheduleKind
    from attnfx.predicate import K, MaskPredicate, Q
    from attnfx.spec import AttentionSpec, ScoreOp

    name, dt, d, nq, nk, group = case
    dtype = dtype or DTYPES[dt]
    build, mask = TILE_MASKS[name]
    pred = MaskPredicate(build(Q, K, sympy)).to_key()
    spec = AttentionSpec(
        score_ops=(ScoreOp("mul", d**-0.5), ScoreOp("fill_pred", -math.inf, pred=pred)),
        head_dim=d,
        head_dim_v=d,
        gqa_group=group,
        dtype=str(dtype).removeprefix("torch."),
        out_dtype=str(dtype).removeprefix("torch."),
    )
    assert make_plan(spec).schedule.kind is ScheduleKind.TILES
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = hk * group

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v, dout = rnd(b, h, nq, d), rnd(b, hk, nk, d), rnd(b, hk, nk, d), rnd(b, h, nq, d)
    keep = mask(torch.arange(nq, device=device)[:, None], torch.arange(nk, device=device)[None, :])

    def math_attention(q, k, v):
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        s = ((q @ k.transpose(-2, -1)) * d**-0.5).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, dim=-1) @ v

    run_under_rule(spec, math_attention, (q, k, v, dout), context="-".join(map(str, case)))


@pytest.mark.parametrize("case", TILE_CASES, ids=["-".join(map(str, c)) for c in TILE_CASES])
def test_tiles_schedule_fwd_bwd(case):
    check_tiles_case(case)


# ---------------------------------------------------------------------------------------
# End to end: a small GPT-2-like model (nanoGPT's attention) under torch.compile
# ---------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d, h, t):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.register_buffer("bias", torch.tril(torch.ones(t, t)).view(1, 1, t, t))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab=128, d=128, h=2, layers=2, t=256):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.blocks = nn.ModuleList(Block(d, h, t) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def test_gpt_end_to_end_compile():
    import attnfx
    from attnfx.codegen import LAUNCHES
    from attnfx.testing import assert_attention_close

    torch.manual_seed(0)
    model = TinyGPT().cuda().to(torch.bfloat16)
    gold_model = copy.deepcopy(model).double()
    idx = torch.randint(0, 128, (2, 77), device="cuda")

    attnfx.reset_counters()
    before = dict(LAUNCHES)
    compiled = torch.compile(model, backend="attnfx")
    out = compiled(idx)
    assert attnfx.counters["rewritten.softmax"] == 2, dict(attnfx.counters)
    assert not any(k.startswith("kept") for k in attnfx.counters), dict(attnfx.counters)
    assert LAUNCHES["fwd"] >= before.get("fwd", 0) + 2

    base = model(idx)
    gold = gold_model(idx)
    assert_attention_close(out, base, gold, check_strides=False, context="gpt logits")

    cot = torch.randn_like(base)
    grads = {}
    for label, m, o in (("cand", model, out), ("base", model, None), ("gold", gold_model, None)):
        m.zero_grad(set_to_none=True)
        if o is None:
            o = m(idx)
        o.backward(cot.to(o.dtype))
        grads[label] = m.blocks[0].qkv.weight.grad.clone()
    assert LAUNCHES["bwd_dq"] >= before.get("bwd_dq", 0) + 2
    assert_attention_close(
        grads["cand"],
        grads["base"],
        grads["gold"],
        grad=True,
        check_strides=False,
        context="gpt blocks.0.qkv.weight.grad",
    )


# ---------------------------------------------------------------------------------------
# NAT's relative position bias: the table read in the kernels, its gradient by the dQ
# kernel's TABLE_GRAD atomics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_neighborhood_relative_position_bias_end_to_end(dtype):
    import attnfx
    from attnfx.nn import NeighborhoodAttention2D
    from attnfx.testing import assert_rewrites_match_eager

    torch.manual_seed(0)
    m = NeighborhoodAttention2D(64, 2, 7, rel_pos_bias=True)
    with torch.no_grad():
        m.rpb.normal_()  # (a bias that matters: the init's std 0.02 barely moves scores)
    m = m.to(device="cuda", dtype=dtype)
    x = torch.randn(2, 24, 40, 64, device="cuda").to(dtype)
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, [x], kind="neighborhood", grad=True, grad_idx=(0,), params=True)
