"""The static Triton library of the generated kernels: what is never specialized.

Every generated module calls these ``@triton.jit`` helpers by name; the loader
(``attnfx.codegen.cache``) executes this file once per mode -- compiled (``JITFunction``)
and interpreted (``InterpretedFunction``) -- and binds its helpers into each generated
module of the same mode (an interpreted kernel cannot call a compiled helper, nor the
reverse).  Imported as an ordinary module it is linted and unit-tested like any code
(tests/codegen/test_library.py).

The helpers use only Triton builtins (no ``tl.max`` / ``tl.sum`` / ``tl.zeros`` /
``tl.cdiv``, which are themselves ``@triton.jit`` functions of the process's own mode):
the interpreted copy then also runs in a process that imported triton without
``TRITON_INTERPRET=1``.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

# The names the loader binds into a generated module (everything a template may call).
__all__ = [
    "_block_range",
    "_floordiv",
    "_max_combine",
    "_online_softmax",
    "_online_softmax_scaled",
    "_row_sum",
    "_sigmoid",
    "_sum_combine",
    "_tanh",
    "_tile_range",
]


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum_combine(a, b):
    return a + b


@triton.jit
def _row_sum(x):
    # the row sums of a tile (BLOCK_M, BLOCK_N) -> (BLOCK_M,)
    return tl.reduce(x, 1, _sum_combine)


@triton.jit
def _row_sum_in_order(x):
    # the same sums, added left to right as the interpreter's element-by-element reduce
    # adds them, from one running sum along the row (its last column): what interpreted
    # kernels take for _row_sum (attnfx.codegen.cache._interpreter_reductions)
    run = tl.associative_scan(x, 1, _sum_combine)
    last = tl.arange(0, x.shape[1])[None, :] == x.shape[1] - 1
    return tl.reduce(tl.where(last, run, 0.0), 1, _sum_combine)


@triton.jit
def _floordiv(a, b):
    # floored integer division (Python / sympy semantics); Triton's // truncates
    q = a // b
    return tl.where((a % b != 0) & ((a < 0) != (b < 0)), q - 1, q)


@triton.jit
def _block_range(
    row_start,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    N_COLS,
    visit_lo,
    visit_hi,
    diag_lo,
    diag_hi,
):
    # Column blocks that rows [row_start, row_start + BLOCK_ROWS) visit, and which of them
    # are kept entirely.  Kept pairs satisfy diag_lo <= col - row <= diag_hi; blocks with
    # no pair in visit_lo <= col - row <= visit_hi are skipped (visit = diag when skipping
    # is exact, unbounded otherwise).  Returns (lo, full_lo, full_hi, hi): blocks in
    # [lo, full_lo) and [full_hi, hi) need the fine mask, blocks in [full_lo, full_hi) are
    # kept entirely and lie inside N_COLS.
    first = tl.maximum(row_start + visit_lo, 0)
    last = tl.minimum(row_start + BLOCK_ROWS + visit_hi, N_COLS)  # exclusive
    lo = (first // BLOCK_COLS) * BLOCK_COLS
    hi = tl.where(last > first, ((last + BLOCK_COLS - 1) // BLOCK_COLS) * BLOCK_COLS, lo)
    full_first = tl.maximum(row_start + BLOCK_ROWS - 1 + diag_lo, 0)
    full_lo = ((full_first + BLOCK_COLS - 1) // BLOCK_COLS) * BLOCK_COLS
    full_last = tl.minimum(row_start + diag_hi - BLOCK_COLS + 1, N_COLS - BLOCK_COLS)
    full_hi = tl.where(full_last >= 0, (tl.maximum(full_last, 0) // BLOCK_COLS + 1) * BLOCK_COLS, 0)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _tile_range(TileOff, row):
    # A row tile's entries in the host tile map (attnfx.codegen.tiles): its partial
    # column tiles are TileIdx[lo:mid], its full ones TileIdx[mid:hi].
    lo = tl.load(TileOff + 2 * row)
    mid = tl.load(TileOff + 2 * row + 1)
    hi = tl.load(TileOff + 2 * row + 2)
    return lo, mid, hi


@triton.jit
def _online_softmax(m_i, s, LOG2_UNITS: tl.constexpr):
    # One block of an online softmax: the new running row max m_ij, the block's
    # probabilities p relative to it, and alpha, the factor that rescales what was summed
    # before.  A row still all -inf uses 0 as its max so that exp2(-inf - 0) = 0 instead
    # of NaN (it is not poisoned by a masked block).  LOG2_UNITS: s and m_i are already
    # in log2 units (log2(e) folded into the score program).
    m_ij = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
    m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    if LOG2_UNITS:
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
    else:
        p = tl.exp2((s - m_safe[:, None]) * 1.4426950408889634)
        alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
    return m_ij, p, alpha


@triton.jit
def _online_softmax_scaled(m_i, s, SCALE: tl.constexpr):
    # _online_softmax for scores s that still lack their positive constant scale SCALE
    # (the spec's multiplier times log2(e)): the max is scaled once per row, not once
    # per score, since rounding is monotonic (round(max(s) * c) == max(round(s * c)) for
    # c > 0), and s * SCALE - m meets the exp2 as one fused multiply-add.  m_i is in
    # scaled log2 units.
    m_ij = tl.maximum(m_i, tl.reduce(s, 1, _max_combine) * SCALE)
    m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    p = tl.exp2(s * SCALE - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return m_ij, p, alpha


@triton.jit
def _tanh(x, TANH_IMPL: tl.constexpr):
    # 0: exp formula (interpreter), 1: libdevice (accurate), 2: tanh.approx.f32 (MUFU)
    if TANH_IMPL == 2:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    elif TANH_IMPL == 1:
        return libdevice.tanh(x)
    else:
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _sigmoid(x, TANH_IMPL: tl.constexpr):
    # sigmoid through one tanh: 0.5 + 0.5 * tanh(x / 2)
    return 0.5 + 0.5 * _tanh(0.5 * x, TANH_IMPL)
