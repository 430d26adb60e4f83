"""The static Triton library (attnfx/codegen/library.py) as ordinary code: each helper in
a small kernel under Triton's interpreter, against plain Python / torch."""

from __future__ import annotations

import math

import pytest
import torch

from attnfx.codegen import cache, library

KERNELS = """
import triton
import triton.language as tl


@triton.jit
def _floordiv_kernel(A, B, Out, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Out + offs, _floordiv(tl.load(A + offs), tl.load(B + offs)))


@triton.jit
def _block_range_kernel(Out, N_COLS, visit_lo, visit_hi, diag_lo, diag_hi, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    pid = tl.program_id(0)
    lo, full_lo, full_hi, hi = _block_range(pid * BLOCK_ROWS, BLOCK_ROWS, BLOCK_COLS, N_COLS, visit_lo, visit_hi, diag_lo, diag_hi)
    tl.store(Out + 4 * pid, lo)
    tl.store(Out + 4 * pid + 1, full_lo)
    tl.store(Out + 4 * pid + 2, full_hi)
    tl.store(Out + 4 * pid + 3, hi)


@triton.jit
def _tile_range_kernel(TileOff, Out):
    pid = tl.program_id(0)
    lo, mid, hi = _tile_range(TileOff, pid)
    tl.store(Out + 3 * pid, lo)
    tl.store(Out + 3 * pid + 1, mid)
    tl.store(Out + 3 * pid + 2, hi)


@triton.jit
def _online_softmax_kernel(S, M, L, N_BLOCKS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, LOG2_UNITS: tl.constexpr, SCALE: tl.constexpr):
    # SCALE 0: _online_softmax; else _online_softmax_scaled with that scale
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.full([ROWS], 0, dtype=tl.float32)
    for b in range(N_BLOCKS):
        s = tl.load(S + rows[:, None] * (N_BLOCKS * COLS) + b * COLS + cols[None, :])
        if SCALE == 0.0:
            m_ij, p, alpha = _online_softmax(m_i, s, LOG2_UNITS)
        else:
            m_ij, p, alpha = _online_softmax_scaled(m_i, s, SCALE)
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        m_i = m_ij
    tl.store(M + rows, m_i)
    tl.store(L + rows, l_i)


@triton.jit
def _row_sum_kernel(X, Out, M: tl.constexpr, N: tl.constexpr):
    rows = tl.arange(0, M)
    cols = tl.arange(0, N)
    x = tl.load(X + rows[:, None] * N + cols[None, :])
    tl.store(Out + rows, _row_sum(x))


@triton.jit
def _act_kernel(X, T, S, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    tl.store(T + offs, _tanh(x, 0))
    tl.store(S + offs, _sigmoid(x, 0))
"""


@pytest.fixture(scope="module")
def kernels():
    return cache.load_text("library_tests", KERNELS, interpret=True)


def test_every_exported_helper_is_a_jit_function():
    from triton.runtime.jit import JITFunction

    for name in library.__all__:
        assert isinstance(getattr(library, name), JITFunction), name
    interp = cache.library(True)
    from triton.runtime.interpreter import InterpretedFunction

    fast = cache._interpreter_reductions()  # Triton's own combines: numpy reductions
    for n in library.__all__:
        if n in fast:
            assert getattr(interp, n) is fast[n], n
        else:
            assert isinstance(getattr(interp, n), InterpretedFunction), n


def test_interpreted_reductions_take_numpy(monkeypatch):
    """The interpreted kernels' row max and row sum are Triton's combines, which its
    interpreter runs as one numpy reduction; a combine of its own runs element by
    element in Python (a 64x64 neighborhood forward took 77 s instead of 9 s)."""
    from triton.runtime import interpreter

    slow = []
    real = interpreter.ReduceOps.generic_reduce
    monkeypatch.setattr(
        interpreter.ReduceOps, "generic_reduce", lambda self, x: slow.append(1) or real(self, x)
    )
    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    from attnfx import codegen, ops
    from attnfx.spec import AttentionSpec, ScoreOp

    spec = AttentionSpec(score_ops=(ScoreOp("mul", 0.25),), head_dim=16, head_dim_v=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 40, 16, generator=g) for _ in range(3))
    out, _ = codegen.run_forward(spec, q, k, v, [])
    ref, _ = ops.reference_attention(q, k, v, [], spec)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)  # (the spec's float16)
    assert not slow


def test_floordiv_is_floored(kernels):
    a = torch.tensor([7, -7, 7, -7, 0, -1, 6, -6], dtype=torch.int32)
    b = torch.tensor([2, 2, -2, -2, 3, 4, 3, 3], dtype=torch.int32)
    out = torch.empty_like(a)
    kernels._floordiv_kernel[(1,)](a, b, out, N=8)
    assert out.tolist() == [x // y for x, y in zip(a.tolist(), b.tolist(), strict=True)]


@pytest.mark.parametrize(
    "bounds",
    [(-(2**30), 0, -(2**30), 0), (-5, 2, -5, 2), (-40, -9, -40, -9), (3, 30, 3, 30)],
    ids=["causal", "window", "left-band", "right-band"],
)
@pytest.mark.parametrize("rows,cols,n_cols", [(16, 16, 70), (32, 16, 53), (16, 64, 100)])
def test_block_range_bounds_the_band(kernels, bounds, rows, cols, n_cols):
    # exact skipping (visit = diag): [lo, hi) holds every column block with a kept pair of
    # the row block, [full_lo, full_hi) only blocks whose pairs are all kept and in range
    n_rows = 5
    out = torch.empty(4 * n_rows, dtype=torch.int32)
    kernels._block_range_kernel[(n_rows,)](out, n_cols, *bounds, BLOCK_ROWS=rows, BLOCK_COLS=cols)
    lo_b, hi_b = bounds[0], bounds[1]
    for r, (lo, full_lo, full_hi, hi) in enumerate(out.view(-1, 4).tolist()):
        assert lo % cols == 0 and hi % cols == 0 and lo <= full_lo <= full_hi <= hi
        for c0 in range(0, n_cols, cols):
            pairs = [
                (q, k)
                for q in range(r * rows, (r + 1) * rows)
                for k in range(c0, min(c0 + cols, n_cols))
            ]
            kept = [lo_b <= k - q <= hi_b for q, k in pairs]
            if any(kept):
                assert lo <= c0 < hi, (r, c0)
            if full_lo <= c0 < full_hi:
                assert all(kept) and c0 + cols <= n_cols, (r, c0)


def test_tile_range_reads_the_row_entries(kernels):
    off = torch.tensor([0, 2, 3, 3, 3, 5, 9], dtype=torch.int32)
    out = torch.empty(9, dtype=torch.int32)
    kernels._tile_range_kernel[(3,)](off, out)
    assert out.tolist() == [0, 2, 3, 3, 3, 3, 3, 5, 9]


@pytest.mark.parametrize("log2_units", [False, True])
def test_online_softmax_gives_the_row_max_and_sum(kernels, log2_units):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 4 * 16, generator=g) * 4
    s[3] = -math.inf  # a row masked everywhere: max -inf, sum 0, no NaN
    s[5, :16] = -math.inf  # a row whose first block is masked
    m, l_ = torch.empty(16), torch.empty(16)
    kernels._online_softmax_kernel[(1,)](
        s, m, l_, N_BLOCKS=4, ROWS=16, COLS=16, LOG2_UNITS=log2_units, SCALE=0.0
    )
    base = 2.0 if log2_units else math.e
    want_m = s.max(1).values
    want_l = torch.where(
        want_m.isinf(), 0.0, (base ** (s - want_m[:, None].nan_to_num(neginf=0.0))).sum(1)
    )
    torch.testing.assert_close(m, want_m)
    torch.testing.assert_close(l_, want_l, rtol=1e-5, atol=1e-6)


def test_online_softmax_scaled_scales_in_the_exp(kernels):
    """Scores still lacking their scale c: the row max is c·max(s) (in c's units) and the
    sum Σ 2^(c·s − max), as _online_softmax gives on pre-scaled scores; masked rows stay
    (-inf, 0)."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(16, 4 * 16, generator=g) * 4
    s[3] = -math.inf
    s[5, :16] = -math.inf
    c = 0.125 * 1.4426950408889634
    m, l_ = torch.empty(16), torch.empty(16)
    kernels._online_softmax_kernel[(1,)](
        s, m, l_, N_BLOCKS=4, ROWS=16, COLS=16, LOG2_UNITS=True, SCALE=c
    )
    want_m = (s * c).max(1).values
    want_l = torch.where(
        want_m.isinf(), 0.0, (2.0 ** (s * c - want_m[:, None].nan_to_num(neginf=0.0))).sum(1)
    )
    torch.testing.assert_close(m, want_m)
    torch.testing.assert_close(l_, want_l, rtol=1e-5, atol=1e-6)


def test_tanh_and_sigmoid(kernels):
    x = torch.linspace(-12, 12, 64)
    t, s = torch.empty(64), torch.empty(64)
    kernels._act_kernel[(1,)](x, t, s, N=64)
    torch.testing.assert_close(t, torch.tanh(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s, torch.sigmoid(x), atol=1e-6, rtol=1e-5)


def test_interpreted_row_sums_add_left_to_right(kernels):
    """Interpreted, ``_row_sum`` is one numpy running sum, and gives bit for bit the
    float32 sums the element-by-element reduce gave (left to right), not numpy's
    pairwise ones (which moved a gradient of the position-bias test past the rule)."""
    import functools

    import numpy as np

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 64, generator=g) * torch.logspace(-4, 4, 64)).float()
    out = torch.empty(16)
    kernels._row_sum_kernel[(1,)](x, out, M=16, N=64)
    rows = x.numpy()
    want = [functools.reduce(np.add, r) for r in rows]  # float32, in order
    assert out.tolist() == [float(w) for w in want]
    assert out.tolist() != [float(np.sum(r)) for r in rows]  # (pairwise differs here)
