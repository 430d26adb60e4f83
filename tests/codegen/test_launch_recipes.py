"""Launch recipes (``attnfx.codegen.launch``): what a kernel launch needs besides its
tensors is found once per spec, shapes and device, and reused.

A repeated call must not redo the spec's plan, signatures, configs or band bounds (they
cost more host time than a whole kernel at N=4096 on a GPU), and a call that differs in
anything a launch depends on must not reuse another call's recipe."""

from __future__ import annotations

import math

import pytest
import sympy
import torch

from attnfx import ops
from attnfx.codegen import autotune, cache, launch
from attnfx.predicate import K, MaskPredicate, Q
from attnfx.spec import AttentionSpec, ScoreOp

CAUSAL = MaskPredicate(sympy.Le(K, Q)).to_key()


@pytest.fixture(autouse=True)
def _interpret(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnfx-cache"))
    launch.clear_recipes()


def _spec(causal=True, d=16):
    ops_ = [ScoreOp("mul", 1 / math.sqrt(d))]
    if causal:
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=CAUSAL))
    return AttentionSpec(score_ops=tuple(ops_), head_dim=d, head_dim_v=d, dtype="float32",
                         out_dtype="float32")  # fmt: skip


def _qkv(n, nk=None, b=1, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, h, nk or n, d, generator=g)
    v = torch.randn(b, h, nk or n, d, generator=g)
    return q, k, v


def _count_builds(monkeypatch):
    built = {"fwd": 0, "bwd": 0}
    fwd, bwd = launch._forward_recipe, launch._backward_recipe

    def f(*a, **kw):
        built["fwd"] += 1
        return fwd(*a, **kw)

    def b(*a, **kw):
        built["bwd"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(launch, "_forward_recipe", f)
    monkeypatch.setattr(launch, "_backward_recipe", b)
    return built


def test_a_repeated_call_reuses_its_recipe(monkeypatch):
    built = _count_builds(monkeypatch)
    spec = _spec()
    q, k, v = _qkv(24)
    out1, lse1 = launch.run_forward(spec, q, k, v, [])
    dout = torch.randn_like(out1)
    g1 = launch.run_backward(spec, dout, q, k, v, [], out1, lse1)
    assert built == {"fwd": 1, "bwd": 1}

    # a hit computes no plan, signature, config or bound
    def boom(*a, **kw):
        raise AssertionError("recomputed on a recipe hit")

    for name in ("make_plan", "configs", "skip_bounds", "_candidates", "_schedule_args"):
        monkeypatch.setattr(launch, name, boom)
    monkeypatch.setattr(launch.signature, "forward_args", boom)
    q2, k2, v2 = _qkv(24, seed=1)  # other data, same shapes
    out2, lse2 = launch.run_forward(spec, q2, k2, v2, [])
    g2 = launch.run_backward(spec, dout, q2, k2, v2, [], out2, lse2)
    assert built == {"fwd": 1, "bwd": 1}
    ref, _ = ops.reference_attention(q2, k2, v2, [], spec)
    torch.testing.assert_close(out2, ref, atol=2e-5, rtol=2e-5)
    refg = ops.reference_attention_backward(dout, q2, k2, v2, [], spec)
    for got, want in zip(g2, refg):
        torch.testing.assert_close(got, want.to(got.dtype), atol=5e-5, rtol=5e-5)
    assert not torch.equal(out1, out2) and not torch.equal(g1[0], g2[0])


@pytest.mark.parametrize(
    "other",
    [
        dict(n=40),  # another query and key length: other band bounds and grid
        dict(n=24, nk=40),  # keys only
        dict(n=24, b=2),  # batch: the grid
        dict(n=24, h=4),  # heads: the grid
    ],
)
def test_another_shape_gets_its_own_recipe(monkeypatch, other):
    built = _count_builds(monkeypatch)
    spec = _spec()
    for kw in (dict(n=24), other, dict(n=24), other):
        q, k, v = _qkv(**kw)
        out, _ = launch.run_forward(spec, q, k, v, [])
        ref, _ = ops.reference_attention(q, k, v, [], spec)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert built["fwd"] == 2


def test_aux_broadcast_pattern_is_part_of_the_key(monkeypatch):
    """A per-query multiplier read as a row vector and the same values as a full tensor
    are two kernels: the recipe of one must not launch the other."""
    built = _count_builds(monkeypatch)
    spec = AttentionSpec(
        score_ops=(ScoreOp("mul", 0.25), ScoreOp("mul_aux", aux=0)),
        aux_dtypes=("float32",), head_dim=16, head_dim_v=16, dtype="float32",
        out_dtype="float32",
    )  # fmt: skip
    q, k, v = _qkv(24)
    row = torch.rand(1, 2, 24, 1) + 0.5
    for a in (row.expand(1, 2, 24, 24), row.expand(1, 2, 24, 24).contiguous()):
        out, _ = launch.run_forward(spec, q, k, v, [a])
        ref, _ = ops.reference_attention(q, k, v, [a], spec)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert built["fwd"] == 2


def test_a_stale_recipe_is_found_again(monkeypatch):
    """A module dropped from the module cache, or autotuner choices forgotten: the
    recipe made from them is rebuilt."""
    built = _count_builds(monkeypatch)
    spec = _spec()
    q, k, v = _qkv(24)
    launch.run_forward(spec, q, k, v, [])
    monkeypatch.setattr(cache, "_modules", {})
    launch.run_forward(spec, q, k, v, [])
    assert built["fwd"] == 2
    autotune.TUNER.clear_memory()
    out, _ = launch.run_forward(spec, q, k, v, [])
    assert built["fwd"] == 3
    ref, _ = ops.reference_attention(q, k, v, [], spec)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_forced_habits_are_part_of_the_key(monkeypatch):
    built = _count_builds(monkeypatch)
    spec = _spec(causal=False)
    q, k, v = _qkv(24)
    launch.run_forward(spec, q, k, v, [])
    monkeypatch.setenv("ATTNFX_CODEGEN_FEATURES", "-tma")
    launch.run_forward(spec, q, k, v, [])
    assert built["fwd"] == 2


def test_recipes_are_bounded(monkeypatch):
    monkeypatch.setattr(launch, "_RECIPES_MAX", 3)
    spec = _spec(causal=False)
    for n in (8, 9, 10, 11, 12):
        launch.run_forward(spec, *_qkv(n), [])
    assert len(launch._RECIPES) == 3
    assert [key[3][2] for key in launch._RECIPES] == [10, 11, 12]  # the latest kept


def test_a_dtype_that_does_not_match_the_recipe_is_refused():
    spec = _spec()
    q, k, v = _qkv(24)
    launch.run_forward(spec, q, k, v, [])
    with pytest.raises(TypeError):
        launch.run_forward(spec, q, k.double(), v, [])


@pytest.mark.parametrize(
    "expr",
    [
        "NK - NQ",
        "NK - NQ + 3",
        "Max(NK - NQ, 0) - 7",
        "Min(NQ, NK) - 1",
        "floor(NK/2) - NQ",  # a fraction: sympy's exact path
        "NK - NQ - 2*Max(1, NK - 4)",
        "1/NK",  # a power: sympy's exact path
    ],
)
def test_band_bounds_are_sympy_floor_at_every_length(expr):
    """The band's bounds come from a compiled function of the lengths where Python's
    integer arithmetic is exact; everything else from sympy: both equal sympy's floor."""
    from attnfx.codegen import plan
    from attnfx.predicate import NK, NQ

    e = sympy.sympify(expr, locals={"NQ": NQ, "NK": NK})
    key = sympy.srepr(e)
    for nq, nk in [(1, 1), (7, 13), (64, 64), (1000, 3), (4097, 8191)]:
        want = int(sympy.floor(e.subs({NQ: nq, NK: nk})))
        assert plan._eval_bound(key, nq, nk) == want, (expr, nq, nk)
    compiled = plan._bound_fn(key) is not None
    assert compiled == (expr not in ("floor(NK/2) - NQ", "1/NK"))
