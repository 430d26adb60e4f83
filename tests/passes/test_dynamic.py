"""``torch.compile(..., dynamic=True)``: the head dim is a symbol like the lengths.

The spec keeps it symbolic (``head_dim=None``; a scale computed from it, ``D ** -0.5``,
``1 / math.sqrt(D)`` or SDPA's default, is a ``mul_sym`` over ``spec.HEAD_DIM``) and the op
resolves it from q and v when it runs, so one compiled graph serves every length *and*
every head dim in the kernels' range; kernels are generated per concrete head dim.
"""

from __future__ import annotations

import copy
import math

import pytest
import sympy
import torch
import torch.nn.functional as F

import attnfx
from attnfx import ops
from attnfx.backend import attnfx_backend
from attnfx.spec import HEAD_DIM, AttentionSpec, ScoreOp
from attnfx.testing import assert_attention_close

LENGTHS = (17, 40, 96)
HEAD_DIMS = (32, 64)


class Sdpa(torch.nn.Module):
    def __init__(self, causal=False, scale_from_d=False):
        super().__init__()
        self.causal, self.scale_from_d = causal, scale_from_d

    def forward(self, q, k, v):
        scale = q.size(-1) ** -0.5 if self.scale_from_d else None
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=scale)


class MatmulDScale(torch.nn.Module):
    def forward(self, q, k, v):
        d = q.size(-1)
        return (q @ k.transpose(-2, -1) * d**-0.5).softmax(-1) @ v


class MatmulSqrtCausal(torch.nn.Module):
    def forward(self, q, k, v):
        n = q.size(-2)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        i = torch.arange(n, device=q.device)
        s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class MatmulConstScale(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-1) @ v


class Sigmoid(torch.nn.Module):
    """σ(q·kᵀ/√D − log n)·v: the bias in the length, the scale in the head dim."""

    def forward(self, q, k, v):
        n = k.size(-2)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        s = s - torch.log(torch.tensor(n, dtype=torch.float32))
        return torch.sigmoid(s) @ v


def _compile_counting(model, options=None):
    """``model`` compiled with attnfx and dynamic=True; the list counts backend calls."""
    calls = []

    def backend(gm, example_inputs):
        calls.append(gm)
        return attnfx_backend(gm, example_inputs, options=options)

    return torch.compile(model, backend=backend, dynamic=True), calls


def _qkv(n, d, b=2, h=3, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed * 1000 + n * 10 + d)
    return [torch.randn(b, h, n, d, generator=g).requires_grad_(grad) for _ in range(3)]


def _check_equal(compiled, model, n, d, *, grad, transcendental=False, b=2, h=3):
    """The compiled model against eager (base) and float64 eager (gold), outputs and
    gradients of q, k and v, under the DESIGN §5 rule."""
    c_in = _qkv(n, d, b, h, grad=grad)
    b_in = [x.detach().clone().requires_grad_(grad) for x in c_in]
    g_in = [x.detach().double().requires_grad_(grad) for x in c_in]
    gold_m = copy.deepcopy(model).double()
    cand, base, gold = compiled(*c_in), model(*b_in), gold_m(*g_in)
    ctx = f"N={n} D={d}"
    kw = dict(transcendental=transcendental, context=ctx)
    assert_attention_close(cand.detach(), base.detach(), gold.detach(), **kw)
    if grad:
        cot = torch.randn(cand.shape, generator=torch.Generator().manual_seed(n + d))
        for o in (cand, base, gold):
            o.backward(cot.to(o.dtype))
        for i in range(3):
            assert_attention_close(c_in[i].grad, b_in[i].grad, g_in[i].grad, grad=True, **kw)


# (id, model, kind, whether a new head dim recompiles)
CASES = [
    ("sdpa", lambda: Sdpa(), "softmax", False),
    ("sdpa_causal", lambda: Sdpa(causal=True), "softmax", False),
    # SDPA takes its scale as a Python float: Dynamo guards on the value of
    # q.size(-1) ** -0.5, so a new head dim recompiles there (a new length does not).
    ("sdpa_scale_from_d", lambda: Sdpa(scale_from_d=True), "softmax", True),
    ("matmul_d_pow", MatmulDScale, "softmax", False),
    ("matmul_sqrt_causal", MatmulSqrtCausal, "softmax", False),
    ("matmul_const_scale", MatmulConstScale, "softmax", False),
    ("sigmoid", Sigmoid, "sigmoid", False),
]


@pytest.mark.parametrize(
    "build,kind,d_recompiles", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rewritten_at_every_length_and_head_dim_without_recompiling(build, kind, d_recompiles):
    """Rewritten (counters), equal to eager at two head dims × three lengths, forward and
    backward; a new length never recompiles, and a new head dim does not either (except
    where Dynamo itself guards on it)."""
    model = build()
    compiled, calls = _compile_counting(model)
    with attnfx.report.collecting() as records:
        for i, d in enumerate(HEAD_DIMS):
            for n in LENGTHS:
                _check_equal(compiled, model, n, d, grad=True, transcendental=kind == "sigmoid")
            assert len(calls) == 1 + (i if d_recompiles else 0), f"{len(calls)} compiles at D={d}"
    assert attnfx.counters[f"rewritten.{kind}"] == len(calls), dict(attnfx.counters)
    assert not [c for c in attnfx.counters if c.startswith("kept.")], dict(attnfx.counters)
    assert len(records) == len(calls)
    for rec in records:
        assert rec.spec.head_dim is None and rec.spec.head_dim_v is None, rec.spec


def test_spec_keeps_the_scale_symbolic_in_the_head_dim():
    compiled, _ = _compile_counting(MatmulDScale())
    with attnfx.report.collecting() as records:
        compiled(*_qkv(17, 32))
    (rec,) = records
    assert rec.status == "rewritten" and rec.kind == "softmax", rec
    (op,) = rec.spec.score_ops
    assert op.op == "mul_sym" and op.sym == HEAD_DIM**-0.5, op
    assert "D=sym" in rec.spec.describe()


def test_constant_scale_stays_a_constant():
    compiled, _ = _compile_counting(MatmulConstScale())
    with attnfx.report.collecting() as records:
        compiled(*_qkv(17, 32))
    (rec,) = records
    assert rec.spec.score_ops == (ScoreOp("mul", 0.125),) and rec.spec.head_dim is None


def test_resolved_spec():
    """The op's view of a symbolic spec: dims filled in, scalars over D made constants
    (the CPU fast path and the kernels see a plain scale), length terms kept symbolic."""
    from attnfx.predicate import NK

    spec = AttentionSpec(
        activation="sigmoid",
        score_ops=(
            ScoreOp("mul_sym", expr=sympy.srepr(1 / sympy.sqrt(HEAD_DIM))),
            ScoreOp("add_sym", expr=sympy.srepr(-sympy.log(NK) / HEAD_DIM)),
        ),
        head_dim=None,
        head_dim_v=None,
        dtype="float32",
        out_dtype="float32",
    )
    r = spec.resolved(64, 48)
    assert (r.head_dim, r.head_dim_v) == (64, 48)
    assert r.score_ops[0] == ScoreOp("mul", 0.125)
    assert r.score_ops[1].op == "add_sym" and r.score_ops[1].sym == -sympy.log(NK) / 64
    assert not r.symbolic_head_dim and r.resolved(80, 80) is r
    assert AttentionSpec.from_key(spec.key) == spec  # the key round-trips D


def test_op_resolves_the_head_dim_on_the_cpu_path():
    spec = AttentionSpec(
        score_ops=(ScoreOp("mul_sym", expr=sympy.srepr(HEAD_DIM**-0.5)),),
        head_dim=None,
        head_dim_v=None,
        dtype="float32",
        out_dtype="float32",
    )
    for d in (16, 40):
        q, k, v = _qkv(9, d, grad=True)
        out = ops.attention(q, k, v, spec)
        ref = F.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(out)
        for a, b in zip(
            torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)
        ):
            torch.testing.assert_close(a, b)


def test_head_dim_outside_the_kernels_range_recompiles_and_is_kept():
    """The range check guards the graph: a head dim past MAX_HEAD_DIM recompiles, and that
    graph keeps the site (with its reason) instead of handing the op a head dim the
    kernels do not take."""
    from attnfx.passes.match import MAX_HEAD_DIM

    model = MatmulDScale()
    compiled, calls = _compile_counting(model)
    with attnfx.report.collecting() as records:
        for d in (32, 2 * MAX_HEAD_DIM):
            q, k, v = _qkv(17, d, b=1, h=2)
            torch.testing.assert_close(compiled(q, k, v), model(q, k, v))
    assert len(calls) == 2
    assert [r.status for r in records] == ["rewritten", "kept"], records
    assert "unsupported" in records[1].reason


def test_through_the_kernels_under_the_interpreter(monkeypatch, tmp_path):
    """ATTNFX_INTERPRET=1: the generated kernels run the rewritten site, forward and
    backward, one kernel per concrete head dim from the one compiled graph."""
    from attnfx.codegen import cache, launch

    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path))
    loaded = []
    orig = cache.load_module

    def load_module(spec, part, interpret):
        loaded.append((spec.head_dim, part))
        return orig(spec, part, interpret)

    monkeypatch.setattr(cache, "load_module", load_module)
    before = dict(launch.LAUNCHES)
    model = Sdpa(causal=True)
    compiled, calls = _compile_counting(model)
    for d in (16, 32):
        for n in (17, 40, 70):
            _check_equal(compiled, model, n, d, grad=True, b=1, h=2)
    assert len(calls) == 1
    assert attnfx.counters["rewritten.softmax"] == 1, dict(attnfx.counters)
    assert launch.LAUNCHES["fwd"] > before.get("fwd", 0)
    assert launch.LAUNCHES["bwd_dkdv"] > before.get("bwd_dkdv", 0)
    assert {d for d, _ in loaded} == {16, 32}, loaded


def test_library_sigmoid_module_one_compile_across_lengths():
    """``attnfx.nn.SigmoidAttention`` (head dim fixed by the module, −log n bias from the
    input length) under dynamic=True: one compile for every length."""
    from attnfx.nn import SigmoidAttention

    torch.manual_seed(0)
    model = SigmoidAttention(64, num_heads=2, causal=True).eval()
    compiled, calls = _compile_counting(model)
    gold_m = copy.deepcopy(model).double()
    for n in LENGTHS:
        x = torch.randn(2, n, 64)
        assert_attention_close(
            compiled(x).detach(),
            model(x).detach(),
            gold_m(x.double()).detach(),
            transcendental=True,
            check_strides=False,
        )
    assert len(calls) == 1
    assert attnfx.counters["rewritten.sigmoid"] == 1, dict(attnfx.counters)
