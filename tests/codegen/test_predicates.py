"""Every class of mask predicate through the generated kernels against the reference.

Each case is a ``fill_pred`` spec run through ``attnfx.ops.attention_op`` under Triton's
interpreter (ATTNFX_INTERPRET=1), forward and backward (dq, dk, dv), and compared with
``ops.reference_attention`` / ``reference_attention_backward``, at lengths that are not
multiples of the interpreter's block (16).  The mask each predicate keeps is checked
against a plain-Python oracle (Python's floored ``//`` and ``%``), and the cases with
negative operands of ``//`` or ``%`` are checked to keep a different mask under C's
truncating semantics -- Triton's -- so that a printer that forgets the floor fix fails.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import sympy
import torch

from attnfx import codegen, ops
from attnfx.codegen.plan import ScheduleKind
from attnfx.layout import lse_value
from attnfx.predicate import NK, NQ, K, MaskPredicate, Q
from attnfx.spec import AttentionSpec, ScoreOp

NEG_INF = -math.inf


@pytest.fixture(autouse=True)
def _interpret(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnfx-cache"))


def _tdiv(a: int, b: int) -> int:  # C / Triton integer division: truncates toward zero
    return int(a / b)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    expr: sympy.Basic
    keep: Callable[[int, int, int, int], bool]  # (q, k, nq, nk) -> kept, Python semantics
    # "causal" | "window" (the band schedule) | "predicate" (the tiles schedule)
    mask_class: str
    nq: int = 35
    nk: int = 35
    dtype: str = "float32"
    # the same predicate under truncating // and %: must keep a different mask
    truncated: Callable[[int, int, int, int], bool] | None = None


CASES = [
    Case(
        "mod_negative",
        sympy.Eq(sympy.Mod(K - Q, 3), 1),
        lambda q, k, nq, nk: (k - q) % 3 == 1,
        "predicate",
        truncated=lambda q, k, nq, nk: math.fmod(k - q, 3) == 1,
    ),
    Case(
        "floordiv_negative",
        sympy.Ge(sympy.floor((K - Q) / 3), -1),  # K - Q < 0 below the diagonal
        lambda q, k, nq, nk: (k - q) // 3 >= -1,
        "predicate",
        nq=21,
        nk=37,
        dtype="float16",
        truncated=lambda q, k, nq, nk: _tdiv(k - q, 3) >= -1,
    ),
    Case(
        "abs",
        sympy.Le(sympy.Abs(K - Q), 4),
        lambda q, k, nq, nk: abs(k - q) <= 4,
        "predicate",
    ),
    Case(
        "eq_blocks",
        sympy.Eq(sympy.floor(K / 4), sympy.floor(Q / 4)),
        lambda q, k, nq, nk: k // 4 == q // 4,
        "predicate",
    ),
    Case("ne", sympy.Ne(K, Q), lambda q, k, nq, nk: k != q, "predicate", nq=19, nk=33),
    Case(
        "or_global_tokens",
        sympy.Or(sympy.Le(K, Q), sympy.Lt(K, 2)),
        lambda q, k, nq, nk: k <= q or k < 2,
        "predicate",
        dtype="float16",
    ),
    Case(
        "and_nonlinear",
        sympy.And(sympy.Le(K, Q), sympy.Ge(2 * K, Q)),
        lambda q, k, nq, nk: k <= q and 2 * k >= q,
        "predicate",
    ),
    Case("causal_offset", sympy.Le(K, Q + 3), lambda q, k, nq, nk: k <= q + 3, "causal"),
    Case(
        "causal_bottom_right",
        sympy.Le(K, Q + NK - NQ),
        lambda q, k, nq, nk: k <= q + nk - nq,
        "causal",
        nq=21,
        nk=37,
    ),
    Case(
        "window",
        sympy.And(sympy.Ge(K, Q - 5), sympy.Le(K, Q + 2)),
        lambda q, k, nq, nk: q - 5 <= k <= q + 2,
        "window",
        dtype="float16",
    ),
]


def _mask(fn, nq, nk) -> torch.Tensor:
    return torch.tensor([[bool(fn(q, k, nq, nk)) for k in range(nk)] for q in range(nq)])


def _close(got, want, what, dtype):
    atol, rtol = (1e-4, 1e-3) if dtype == "float32" else (4e-2, 2e-2)
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern differs"
    torch.testing.assert_close(
        got.float().nan_to_num(0.0), want.float().nan_to_num(0.0), atol=atol, rtol=rtol
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_predicate_through_kernels(case):
    nq, nk = case.nq, case.nk
    assert nq % 16 and nk % 16  # a partial last block on both axes
    pred = MaskPredicate(case.expr)
    keep = _mask(case.keep, nq, nk)
    assert torch.equal(pred.materialize(nq, nk), keep), "the reference's mask is not Python's"
    assert keep.any(-1).all(), "every row keeps a key (no NaN row hides a difference)"
    assert not keep.all(), "the predicate masks something"
    if case.truncated is not None:
        assert not torch.equal(_mask(case.truncated, nq, nk), keep), "no negative operand"

    spec = AttentionSpec(
        score_ops=(ScoreOp("mul", 0.25), ScoreOp("fill_pred", NEG_INF, pred=pred.to_key())),
        head_dim=16,
        head_dim_v=16,
        dtype=case.dtype,
        out_dtype=case.dtype,
    )
    assert pred.mask_class.kind == case.mask_class
    plan = codegen.make_plan(spec)
    assert plan.can_skip  # a -inf fill: empty tiles are skipped, whatever the predicate
    band = case.mask_class in ("causal", "window")
    assert plan.schedule.kind is (ScheduleKind.BAND if band else ScheduleKind.TILES)

    g = torch.Generator().manual_seed(0)
    dt = ops.torch_dtype(case.dtype)
    q, k, v = (torch.randn(1, 1, n, 16, generator=g).to(dt).requires_grad_() for n in (nq, nk, nk))
    dout = torch.randn(1, 1, nq, 16, generator=g).to(dt)
    before = dict(codegen.LAUNCHES)
    out, lse = ops.attention_op(q, k, v, [], spec.key)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):  # the generated kernels ran
        assert codegen.LAUNCHES[kernel] == before.get(kernel, 0) + 1, kernel

    qd, kd, vd = q.detach(), k.detach(), v.detach()
    ref, ref_lse = ops.reference_attention(qd, kd, vd, [], spec)
    _close(out.detach(), ref, "out", case.dtype)
    torch.testing.assert_close(lse_value(lse), ref_lse, atol=1e-4, rtol=1e-4)
    ref_grads = ops.reference_attention_backward(dout, qd, kd, vd, [], spec)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        _close(got, want, name, case.dtype)


def test_nonnegative_operands_print_as_triton_ops():
    """Of indices (never negative), floored ``//`` and ``%`` are the truncating ones:
    printed as Triton's, and by powers of two as shifts and masks (a 2-D neighborhood's
    partial tile: 1182 -> 855 SASS instructions per iteration, bf16 D64 on sm_90).  A
    term that may be negative keeps the floor fix."""
    from attnfx.codegen.printer import index_expr

    assert index_expr(sympy.Mod(Q, 8)) == "(offs_m[:, None] & 7)"
    assert index_expr(sympy.floor(K / 64)) == "(offs_n[None, :] >> 6)"
    assert index_expr(sympy.floor(K / 24)) == "(offs_n[None, :] // 24)"
    assert index_expr(sympy.Mod(sympy.floor(Q / 8) + 3, 5)) == "((3 + (offs_m[:, None] >> 3)) % 5)"
    assert "_floordiv" in index_expr(sympy.floor((K - Q) / 4))
    assert "+ (8)) % (8)" in index_expr(sympy.Mod(K - Q, 8))


def test_shift_invariant_predicates_print_on_tile_relative_coordinates():
    """Expressions of K - Q alone are evaluated on coordinates relative to the loop's
    tile (``rel_m``, ``rel_n``: 32-bit, one of them a ``tl.arange``); the others keep the
    absolute indices.  On relative coordinates a query may lie before the key tile, so
    ``//`` and ``%`` of them print with the floor fix even where the absolute form need
    not."""
    from attnfx.codegen import emit
    from attnfx.codegen.printer import shift_invariant

    invariant = [
        sympy.Le(K, Q),
        sympy.Le(K, Q + NK - NQ),
        sympy.And(sympy.Ge(K, Q - 5), sympy.Le(K, Q + 2)),
        sympy.Eq(sympy.Mod(K - Q, 3), 1),
        sympy.Le(sympy.Abs(K - Q), 4),
        sympy.Ne(K, Q),
        K - Q + 12,  # a position term (a table index, ALiBi's distance)
    ]
    variant = [
        sympy.Lt(K, 4),
        sympy.Eq(sympy.floor(K / 4), sympy.floor(Q / 4)),
        sympy.Or(sympy.Le(K, Q), sympy.Lt(K, 2)),
        sympy.Ge(2 * K, Q),
        K + 12,
    ]
    assert all(shift_invariant(e) for e in invariant)
    assert not any(shift_invariant(e) for e in variant)

    fwd, dkdv = emit._Tile("mn", relative=True), emit._Tile("nm", relative=True)
    assert fwd.index(sympy.Le(K, Q)) == "(rel_n[None, :] <= rel_m[:, None])"
    assert dkdv.index(sympy.Le(K, Q)) == "(rel_n[:, None] <= rel_m[None, :])"
    assert "rel_m = offs_m - start_n" in fwd.relative_lines()
    assert "rel_n = offs_n - start_m" in dkdv.relative_lines()
    # rel_m may be negative in the forward's tile: K - Q's floor is the floored one
    assert "_floordiv" in fwd.index(sympy.Ge(sympy.floor((K - Q) / 4), -1))
    assert "offs_n" in fwd.index(sympy.Lt(K, 4))  # not invariant: absolute indices
    absolute = emit._Tile("mn")
    assert absolute.index(sympy.Le(K, Q)) == "(offs_n[None, :] <= offs_m[:, None])"
    assert not absolute.relative_lines()

    spec = AttentionSpec(
        score_ops=(
            ScoreOp("mul", 0.25),
            ScoreOp("fill_pred", NEG_INF, pred=MaskPredicate(sympy.Le(K, Q)).to_key()),
        ),
        head_dim=64,
        head_dim_v=64,
    )
    fwd_src, bwd_src = codegen.generate_source(spec, "fwd"), codegen.generate_source(spec, "bwd")
    assert "kept1 = (rel_n[None, :] <= rel_m[:, None])" in fwd_src
    dq = bwd_src[bwd_src.index("def _attn_bwd_dq_inner") :]
    dkdv = bwd_src[
        bwd_src.index("def _attn_bwd_dkdv_inner") : bwd_src.index("def _attn_bwd_dq_inner")
    ]
    assert "kept1 = (rel_n[None, :] <= rel_m[:, None])" in dq
    # dK/dV's key rows are fixed per program: absolute indices (no gain measured)
    assert "kept1 = (offs_n[:, None] <= offs_m[None, :])" in dkdv and "rel_" not in dkdv
