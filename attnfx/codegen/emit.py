"""Spec -> Triton source text (forward and backward), by filling the kernel templates.

The generated modules follow the Triton fused-attention tutorial: ``_``-prefixed
``@triton.jit`` functions, UPPER_CASE constexprs, explicit strides, int64 base offsets
per (batch, head), and one comment per algorithmic step.  The kernels' text is in
``attnfx.codegen.templates``, the helpers they call in ``attnfx.codegen.library``, their
argument lists in ``attnfx.codegen.signature``.  This module fills the templates' holes:
the score program (``spec.score_ops``, emitted in order as straight-line code), the
activation's pieces, the loads (aux tensors, padded head dims), and the schedule's loops
and calls (``plan.schedule``: ``_Band`` or ``_Tiles``).

Everything here is deterministic: the same spec always yields the same text.
"""

from __future__ import annotations

import math
import textwrap

from attnfx.codegen import library, templates
from attnfx.codegen.plan import HUGE_LSE, LOG2E, Plan, ScheduleKind, make_plan
from attnfx.codegen.printer import index_expr, shift_invariant
from attnfx.codegen.signature import KERNEL_ARGS, Param, Signature, dead_rows_fix
from attnfx.predicate import NK, NQ, K, Q
from attnfx.spec import AttentionSpec

LN2 = 0.6931471805599453


def _lit(v: float) -> str:
    if math.isnan(v):
        return 'float("nan")'
    if math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    return repr(float(v))


class _Tile:
    """Index expressions of a score tile in one orientation.

    ``mn``: rows are queries (offs_m), columns keys (offs_n); ``nm``: transposed.

    ``relative``: the tile is one step of a loop whose variable (``start_n`` over key
    tiles, ``start_m`` over query tiles) offsets the walked axis; an expression of K - Q
    alone (``printer.shift_invariant``: causal, bands, windows, ALiBi distances) is then
    evaluated on coordinates relative to it -- ``rel_m``, ``rel_n``: the walked axis is
    ``tl.arange`` (constant per register), the other one a vector of BLOCK rows minus the
    loop variable.  The absolute indices grow from the loop variable, which the compiler
    widens to 64 bits: compared per element they cost two compares and a select each
    (sm_90 report: causal D64 forward diagonal loop 161 + 57 integer ops)."""

    def __init__(self, orient: str, relative: bool = False):
        self.orient = orient
        self.relative = relative
        self.used_relative = False
        if orient == "mn":
            self.m, self.n = "offs_m[:, None]", "offs_n[None, :]"
        else:
            self.m, self.n = "offs_m[None, :]", "offs_n[:, None]"

    def index(self, expr) -> str:
        """An index expression or predicate of Q, K, NQ, NK over the tile."""
        nm = self.orient == "nm"
        if self.relative and shift_invariant(expr):
            self.used_relative = True
            walked = Q if nm else K  # the tl.arange side: never negative
            return index_expr(expr, "rel_m", "rel_n", transposed=nm, nonneg=(walked, NQ, NK))
        return index_expr(expr, transposed=nm)

    def relative_lines(self) -> list[str]:
        """The relative coordinates' definitions, where ``index`` used them."""
        if not self.used_relative:
            return []
        if self.orient == "mn":
            return [
                "# -- tile-relative 32-bit coordinates for the K - Q predicates",
                "rel_m = offs_m - start_n",
                "rel_n = tl.arange(0, BLOCK_N)",
            ]
        return [
            "# -- tile-relative 32-bit coordinates for the K - Q predicates",
            "rel_n = offs_n - start_m",
            "rel_m = tl.arange(0, BLOCK_M)",
        ]


class _ScoreEmitter:
    """Where a score op's Triton lines go (``ScoreOpKind.triton``): the tile's names and
    orientation, the log2 state, and the derivative factor, kept as a constant until an
    op needs it as a tensor."""

    def __init__(self, tile: _Tile, s: str | None, grad: str | None, keep: str | None):
        self.tile, self.index = tile, tile.index
        self.s, self.grad, self.keep = s, grad, keep
        self.out: list[str] = []
        self.body: list[str] = []  # the current op's lines
        self.idx = 0
        self.scaled, self.L = False, 1.0
        self.grad_const, self.grad_var = 1.0, False
        self.lit = _lit

    def line(self, text: str) -> None:
        self.body.append(text)

    def scale_grad(self, factor: float) -> None:
        if self.grad_var:
            self.line(f"{self.grad} = {self.grad} * {_lit(factor)}")
        else:
            self.grad_const *= factor

    def need_grad(self) -> None:
        """The derivative as a variable, defined ahead of the current op's lines (which
        may be guarded: the factor must exist on every path)."""
        if not self.grad_var:
            self.out.append(f"{self.grad} = {_lit(self.grad_const)}")
            self.grad_var = True

    def set_grad(self, expr: str) -> None:
        if not self.grad_var:
            self.line(f"{self.grad} = {_lit(self.grad_const)}")
            self.grad_var = True
        self.line(f"{self.grad} = {expr}")

    def fold_scale(self, op) -> None:
        """A constant multiplier that also brings the scores to log2 units."""
        self.body = []
        self.line(f"{self.s} = {self.s} * {_lit(op.value * LOG2E)}  # * {op.value!r} * log2(e)")
        if self.grad is not None:
            self.scale_grad(op.value)
        self.out.extend(self.body)

    def vector_product(self, pair, idx: int, folded: bool) -> None:
        """A constant multiplier and a vector ``mul_aux`` (``_vector_products``): the
        vector is scaled (by log2(e) too where the scores enter log2 units here), then
        the tile."""
        self.idx, self.body = idx, []
        (vec,) = [op for op in pair if op.entry.operand == "aux"]
        (c,) = [op.value for op in pair if op.entry.operand == "const"]
        a = f"a{vec.aux}.to(tl.float32)"
        if self.s is not None:
            k = c * LOG2E if folded else c
            note = f"{c!r} * log2(e)" if folded else f"{c!r}"
            self.line(f"{self.s} = {self.s} * ({a} * {_lit(k)})  # aux{vec.aux} * {note}")
        if self.grad is not None:
            self.scale_grad(c)
            self.set_grad(f"{self.grad} * {a}")
        self.out.extend(self.body)

    def emit(self, op, idx: int, guarded: bool) -> None:
        self.idx, self.body = idx, []
        if guarded and self.grad is not None:
            self.need_grad()
        op.entry.triton(op, self)
        if guarded:
            self.out.append("if APPLY_MASK:  # only tiles the mask cuts through")
            self.out.extend("    " + b for b in self.body)
        else:
            self.out.extend(self.body)


def score_program(
    spec: AttentionSpec,
    plan: Plan,
    *,
    orient: str,
    s: str | None,
    grad: str | None = None,
    keep: str | None = None,
    guard_skip: bool = True,
    defer_scale: bool = False,
    relative: bool = True,
) -> list[str]:
    """Straight-line code for ``spec.score_ops`` on a tile.

    ``s``: name of the float32 score tile to transform in place (None: no scores, e.g.
    only the keep mask).  ``grad``: name of the derivative factor to build (the product
    of the multipliers, 0 where filled).  ``keep``: name of a bool tile of pairs no fill
    op masked out.  The fill_pred used for block skipping is wrapped in
    ``if APPLY_MASK:`` (full tiles do not need it) when ``guard_skip``.  ``defer_scale``
    (the forward): leave the leading scale off when ``plan.scale_in_exp`` takes it.
    ``relative``: K - Q expressions on tile-relative coordinates (``_Tile``), in the
    loops over key tiles (``orient="mn"``, loop variable ``start_n``); dK/dV's ``"nm"``
    programs keep absolute indices whatever it says (see below).
    """
    # (dK/dV, "nm", keeps absolute indices: its fixed key rows are not grown from the
    # loop variable, and relative ones measured 0-4% more instructions in its loops)
    t = _Tile(orient, relative=relative and orient == "mn")
    e = _ScoreEmitter(t, s, grad, keep)
    out = e.out
    fold = s is not None and plan.fold_log2e
    for i in plan.aux_used:
        if i not in spec.table_aux:  # (a table is read by its op, at its index expression)
            load = [_aux_load(i, spec.aux_broadcast(i), t)]
            if guard_skip:  # full tiles lie inside the walked axis's length
                load = _by_tail(load, [_aux_load(i, spec.aux_broadcast(i), t, inside=True)])
            out += load
    if keep is not None:
        # (absolute: with the keys' tail relative to the tile, a full-mask dQ at D64
        # spilled 32 bytes)
        init = f"{keep} = ({t.m} >= 0) & ({t.n} < N_K)"
        if guard_skip and keep_in_masked_tiles_only(spec, plan):
            out += ["if APPLY_MASK:  # (full tiles keep every pair: no keep tile)", "    " + init]
        else:
            out.append(init)
    pairs = _vector_products(spec, plan if guard_skip else None)
    ops = spec.score_ops
    lead_mul = bool(ops) and (ops[0].entry.form, ops[0].entry.operand) == ("mul", "const")
    if fold and defer_scale and plan.scale_in_exp is not None and not lead_mul:
        # no multiplier: log2(e) alone is the scale the exp2 applies (Plan.scale_in_exp)
        e.scaled = True
        out.append("# * log2(e): applied in the exp2 and the row max")
    for idx, op in enumerate(spec.score_ops):
        e.L = LOG2E if e.scaled else 1.0
        if idx - 1 in pairs:
            continue  # the second op of a pair, emitted with the first
        if idx in pairs:
            # a constant and a per-query (or per-key) multiplier in a row: their product
            # is taken on the vector, and the tile is multiplied once
            folded = s is not None and fold and not e.scaled and idx + 1 >= plan.fold_start
            e.scaled = e.scaled or folded
            e.vector_product(spec.score_ops[idx : idx + 2], idx, folded)
            continue
        if s is not None and fold and not e.scaled and idx >= plan.fold_start:
            e.scaled = True
            if defer_scale and idx == 0 and plan.scale_in_exp is not None:
                # the forward applies this scale in the exp2 (Plan.scale_in_exp)
                out.append(f"# * {op.value!r} * log2(e): applied in the exp2 and the row max")
                continue
            if (op.entry.form, op.entry.operand) == ("mul", "const"):
                e.fold_scale(op)
                continue
            out.append(f"{s} = {s} * 1.4426950408889634  # scores in log2 units: exp -> exp2")
            e.L = LOG2E
        e.emit(op, idx, guarded=guard_skip and idx == plan.skip_op)
    if s is not None and fold and not e.scaled:
        out.append(f"{s} = {s} * 1.4426950408889634  # scores in log2 units: exp -> exp2")
    if grad is not None and not e.grad_var:
        out.append(f"{grad} = {_lit(e.grad_const)}")
    return t.relative_lines() + out


def _vector_products(spec: AttentionSpec, plan: Plan | None) -> set[int]:
    """Indices ``i`` where ops ``i`` and ``i + 1`` are a constant ``mul`` and a ``mul_aux``
    whose aux is a vector (``aux_bcast`` row, col or one), in either order, neither of them
    the skip op when ``plan`` is given: one multiply of the tile for both."""
    ops = spec.score_ops
    out: set[int] = set()
    i = 0
    while i + 1 < len(ops):
        kinds = {(op.entry.form, op.entry.operand) for op in ops[i : i + 2]}
        vec = [op for op in ops[i : i + 2] if op.entry.operand == "aux"]
        skip = plan is not None and plan.skip_op in (i, i + 1)
        if (
            kinds == {("mul", "const"), ("mul", "aux")}
            and spec.aux_broadcast(vec[0].aux) != "full"
            and not skip
        ):
            out.add(i)
            i += 2
        else:
            i += 1
    return out


# ---------------------------------------------------------------------------------------
# Loads and masks
# ---------------------------------------------------------------------------------------


def _aux_load(i: int, bcast: str, t: _Tile, inside: bool = False) -> str:
    """Aux tensor ``i`` over the tile, read as it varies (``AttentionSpec.aux_bcast``): a
    tile, a column of per-query values, a row of per-key values, or one value.
    ``inside``: a full tile, whose walked axis needs no tail mask (keys for the forward
    and dQ, queries for dK/dV: ``_by_tail``); the tile's own axis keeps its mask."""
    a = f"A{i}"
    m = None if inside and t.orient == "nm" else f"({t.m} < N_Q)"
    n = None if inside and t.orient == "mn" else f"({t.n} < N_K)"
    if bcast == "row":
        return f"a{i} = {_load(f'{a} + {t.m} * stride_a{i}m', m, '0')}  # per query"
    if bcast == "col":
        return f"a{i} = {_load(f'{a} + {t.n} * stride_a{i}n', n, '0')}  # per key"
    if bcast == "one":
        return f"a{i} = tl.load({a})  # one value per (batch, head)"
    return f"a{i} = {_load(f'{a} + {t.m} * stride_a{i}m + {t.n} * stride_a{i}n', _mask(m, n), '0')}"


def _aux_bases(plan: Plan, head: str) -> list[str]:
    return [
        f"A{i}_blk = A{i} + off_b * stride_a{i}b + {head} * stride_a{i}h" for i in plan.aux_used
    ]


def _prec(spec: AttentionSpec) -> str:
    return ', input_precision="ieee"' if spec.dtype == "float32" else ""


def _mask(*parts: str | None) -> str | None:
    parts = [p for p in parts if p]
    return " & ".join(parts) if parts else None


def _load(ptr: str, mask: str | None, other: str = "0.0") -> str:
    if mask is None:
        return f"tl.load({ptr})"
    return f"tl.load({ptr}, mask={mask}, other={other})"


class _Dims:
    def __init__(self, spec: AttentionSpec, plan: Plan):
        self.pad_d = plan.block_d != spec.head_dim
        self.pad_dv = plan.block_dv != spec.head_dim_v

    def d(self, axis: str) -> str | None:  # axis: "row" -> [:, None], "col" -> [None, :]
        if not self.pad_d:
            return None
        return "(offs_d[:, None] < HEAD_DIM)" if axis == "row" else "(offs_d[None, :] < HEAD_DIM)"

    def dv(self, axis: str) -> str | None:
        if not self.pad_dv:
            return None
        return (
            "(offs_dv[:, None] < HEAD_DIM_V)"
            if axis == "row"
            else "(offs_dv[None, :] < HEAD_DIM_V)"
        )


def _state_init(
    spec: AttentionSpec, plan: Plan, m: str, lsum: str, base: str = "_blk"
) -> list[str]:
    """The activation's initial running row state (``m``, ``lsum``: the names of an online
    softmax's max and sum), with the load of the sink's logits if the spec has a sink."""
    sink = None
    if spec.sink is not None:
        i = spec.sink
        neg_inf = 'float("-inf")'
        sink = _load(f"A{i}{base} + offs_m.to(tl.int64) * stride_a{i}m", "offs_m < N_Q", neg_inf)
    return spec.act.init_lines(m, lsum, sink, plan.fold_log2e)


def keep_in_masked_tiles_only(spec: AttentionSpec, plan: Plan) -> bool:
    """Whether the kept-pairs tile matters only where APPLY_MASK: the one fill of the
    score program is the skip predicate, which full tiles never evaluate (every pair of
    a full tile is kept, and its keys and queries exist or are never stored)."""
    fills = [i for i, op in enumerate(spec.score_ops) if op.entry.form == "fill"]
    return plan.can_skip and fills == [plan.skip_op]


def _gated(name: str, expr: str, keep: str, gate: bool, masked_only: bool = False) -> list[str]:
    """``name = expr``, zero where ``keep`` is False when ``gate`` (on masked tiles only
    with ``masked_only``: ``keep_in_masked_tiles_only``)."""
    if not gate:
        return [f"{name} = {expr}"]
    gated = f"{name} = tl.where({keep}, {expr}, 0.0)  # filled scores: exactly zero gradient"
    if not masked_only:
        return [gated]
    return [
        "if APPLY_MASK:",
        f"    {gated}",
        "else:  # a full tile: every pair kept",
        f"    {name} = {expr}",
    ]


def _row_norm_lines(spec: AttentionSpec, plan: Plan, dims: _Dims) -> list[str]:
    """Preprocess: recompute (row max, log row sum) for rows whose float32 lse is huge.

    Near finfo.min the float32 lse equals the row max: log(l) (e.g. log n for a row
    filled uniformly) is lost, and exp(s - lse) would give 1 instead of 1/n.  Such rows
    are rare (fully masked rows with a finite fill): a query block holding one walks its
    keys once more, like the forward, and the backward uses exp(s - m - log l)."""
    prog = score_program(spec, plan, orient="mn", s="s", guard_skip=False)
    if plan.fold_log2e:
        exp_arg, alpha_arg, lg = "s - m_safe[:, None]", "m_r - m_safe", "tl.log2(l_r)"
    else:
        exp_arg = "(s - m_safe[:, None]) * 1.4426950408889634"
        alpha_arg = "(m_r - m_safe) * 1.4426950408889634"
        lg = "tl.log2(l_r) * 0.6931471805599453"
    kptr = "K_blk + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd"
    return [
        "# -- rows whose lse is huge but finite (finite fills near finfo.min, additive",
        "#    masks): float32 lse lost log(l); recompute the row max and log(l) for them",
        f'huge = (tl.abs(lse) >= {HUGE_LSE!r}) & (tl.abs(lse) < float("inf"))',
        *([] if plan.lse64 else ["lg_row = tl.full([BLOCK_M], 0, dtype=tl.float32)"]),
        "if tl.reduce(huge.to(tl.int32), 0, _max_combine) > 0:",
        "    off_hk = off_h // GROUP",
        "    Q_blk = Q + off_b * stride_qb + off_h * stride_qh",
        "    K_blk = K + off_b * stride_kb + off_hk * stride_kh",
        "    offs_d = tl.arange(0, BLOCK_D)",
        f"    q = {_load('Q_blk + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd', _mask('(offs_m[:, None] < N_Q)', dims.d('col')))}",
        *["    " + x for x in _state_init(spec, plan, "m_r", "l_r", base="")],
        "    for start_n in range(0, N_K, BLOCK_N):",
        "        offs_n = start_n + tl.arange(0, BLOCK_N)",
        f"        kT = {_load(kptr, _mask('(offs_n[None, :] < N_K)', dims.d('row')))}",
        f"        s = tl.dot(q, kT{_prec(spec)})",
        *["        " + x for x in prog],
        '        s = tl.where(offs_n[None, :] < N_K, s, float("-inf"))',
        "        m_new = tl.maximum(m_r, tl.reduce(s, 1, _max_combine))",
        '        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)',
        f"        l_r = l_r * tl.exp2({alpha_arg}) + _row_sum(tl.exp2({exp_arg}))",
        "        m_r = m_new",
        "    m_row = tl.where(huge, m_r, m_row)",
        f"    lg_row = tl.where(huge, {lg}, lg_row)",
    ]


# ---------------------------------------------------------------------------------------
# Schedules: how a kernel walks its tiles (the templates' loop and visit holes)
# ---------------------------------------------------------------------------------------
#
# "rows": a query tile walks key tiles (forward, dQ); "cols": a key tile walks query tiles
# (dK/dV, the transposed schedule).  Each schedule gives the inner functions' loop
# parameters and loop head, the kernel's setup lines and its calls of the inner function
# (each call: the arguments it sets; APPLY_MASK True evaluates the mask predicate).


class _Band:
    """The K - Q band: tile ranges from ``_block_range`` in the kernel -- masked tiles,
    full tiles, masked tiles; with a kept key prefix (StreamingLLM) the first masked loop
    also walks the prefix's tiles before the band (one loop, not two: a fourth inlined
    loop costs registers), and dK/dV's last masked loop runs on to the last query."""

    def __init__(self, plan: Plan):
        self.prefix = plan.skip_prefix

    def inner_params(self, rows: bool) -> list[Param]:
        gap = [Param("gap_at", arg="hi"), Param("gap", arg="0")] if rows and self.prefix else []
        return [Param("lo"), Param("hi"), *gap]

    def loop(self, rows: bool, var: str, block: str, tl_range: bool) -> list[str]:
        if tl_range:
            head = f"for {var} in tl.range(lo, hi, {block}, warp_specialize=WARP_SPEC):"
        else:
            head = f"for {var} in range(lo, hi, {block}):"
        gap = [f"    {var} = {var} + tl.where({var} >= gap_at, gap, 0)  # prefix, then band"]
        return [
            head,
            *(gap if rows and self.prefix else []),
            f"    {var} = tl.multiple_of({var}, {block})",
        ]

    def setup(self, rows: bool) -> list[str]:
        if not rows:
            return [
                "# query tiles with q - k in [-diag_hi, -diag_lo] (kept) or [-visit_hi, -visit_lo]",
                "lo, full_lo, full_hi, hi = _block_range(pid_n * BLOCK_N, BLOCK_N, BLOCK_M, N_Q, -visit_hi, -visit_lo, -diag_hi, -diag_lo)",
            ]
        out = [
            "lo, full_lo, full_hi, hi = _block_range(pid_m * BLOCK_M, BLOCK_M, BLOCK_N, N_K, visit_lo, visit_hi, diag_lo, diag_hi)"
        ]
        if self.prefix:
            out += [
                "# -- the kept prefix (sink tokens): key blocks [0, pre_hi) before the band",
                "pre_hi = tl.minimum(((visit_prefix + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo)",
            ]
        return out

    def calls(self, rows: bool) -> list[dict | str]:
        first = dict(lo="lo", hi="full_lo", APPLY_MASK="True")
        if rows and self.prefix:
            first = dict(
                first, lo="0", hi="pre_hi + (full_lo - lo)", gap_at="pre_hi", gap="lo - pre_hi"
            )
        out: list[dict | str] = [first, dict(lo="full_lo", hi="full_hi", APPLY_MASK="False")]
        last = "hi"
        if not rows and self.prefix:
            out += [
                "# -- prefix keys (sink tokens) are kept by every later query: visit them all",
                "post_hi = tl.where(pid_n * BLOCK_N < visit_prefix, ((N_Q + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, hi)",
            ]
            last = "post_hi"
        return [*out, dict(lo="full_hi", hi=last, APPLY_MASK="True")]


class _Tiles:
    """The host tile map (``attnfx.codegen.tiles``): the row tile's list of partial
    column tiles, walked with the mask predicate, then its full ones, walked without;
    empty tiles are not listed.  dK/dV get the transposed lists."""

    def inner_params(self, rows: bool) -> list[Param]:
        return [Param("TileIdx"), Param("lo"), Param("hi")]

    def loop(self, rows: bool, var: str, block: str, tl_range: bool) -> list[str]:
        rng = "tl.range(lo, hi, warp_specialize=WARP_SPEC)" if tl_range else "range(lo, hi)"
        return [
            "nxt = tl.load(TileIdx + lo, mask=lo < hi, other=0)  # the first listed tile",
            f"for t in {rng}:",
            "    # -- the t-th listed tile; the next one's index is read a step ahead, so that",
            "    #    this step's loads do not wait on an index load (the pipeliner spilled)",
            f"    {var} = tl.multiple_of(nxt * {block}, {block})",
            "    nxt = tl.load(TileIdx + t + 1, mask=t + 1 < hi, other=0)",
        ]

    def setup(self, rows: bool) -> list[str]:
        pid = "pid_m" if rows else "pid_n"
        return [f"t_lo, t_mid, t_hi = _tile_range(TileOff, {pid})  # [partial tiles, full tiles)"]

    def calls(self, rows: bool) -> list[dict | str]:
        return [
            dict(lo="t_lo", hi="t_mid", APPLY_MASK="True"),
            dict(lo="t_mid", hi="t_hi", APPLY_MASK="False"),
        ]


def _pid_m(spec: AttentionSpec, plan: Plan, kernel: str) -> list[str]:
    """The query tile of a forward or dQ program.  Under a band open to the left (causal,
    a kept past: K − Q ≤ c) a query tile's work grows with its index: the programs take
    the tiles last to first, so that the longest ones start first and the short ones
    fill the last wave (the GPU starts programs in increasing id order).  Not in a
    forward with a head dim over 64: at its 128-register cap the reversed index cost the
    soft-capped D128 forward an 8-byte spill and the causal one 2% more instructions in
    its masked loops (sm_90 compile); dQ and the D ≤ 64 forward compile as before."""
    if not heavy_last(spec, plan) or (kernel == "fwd" and plan.block_d > 64):
        return ["pid_m = tl.program_id(0)"]
    return [
        "# -- causal band: the heaviest query tiles first (the last wave runs short tiles)",
        "pid_m = tl.num_programs(0) - 1 - tl.program_id(0)",
    ]


def heavy_last(spec: AttentionSpec, plan: Plan) -> bool:
    """Whether a band schedule's query tiles visit more key tiles the later they lie: the
    skip predicate's band has no left bound and a right one."""
    if plan.schedule.kind is not ScheduleKind.BAND or plan.skip_op is None:
        return False
    mc = spec.score_ops[plan.skip_op].predicate.mask_class
    return mc.left is None and mc.right is not None and mc.prefix is None


def _schedule(plan: Plan) -> _Band | _Tiles:
    return _Tiles() if plan.schedule.kind is ScheduleKind.TILES else _Band(plan)


def _visit(sched, rows: bool, inner: Signature, result: str) -> list[str]:
    """The schedule's calls of the inner function (and the lines between them)."""
    out = []
    for c in sched.calls(rows):
        if isinstance(c, str):
            out.append(c)
        else:
            out += [f"{result} = {inner.name}(", *inner.call(4, **c).splitlines(), ")"]
    return out


def _header(spec: AttentionSpec, plan: Plan) -> str:
    return templates.fill(
        templates.HEADER,
        describe=spec.describe(),
        key=spec.kernel_key,
        schedule=plan.schedule.describe(),
        helpers=textwrap.wrap(
            ", ".join(library.__all__), 86, initial_indent="#   ", subsequent_indent="#   "
        ),
    )


def _inner_aux_ptrs(plan: Plan) -> list[Param]:
    """An inner function's aux pointers: the caller's per-(batch, head) bases."""
    return [Param(f"A{i}", arg=f"A{i}_blk") for i in plan.aux_used]


def _inner_aux_strides(plan: Plan) -> list[Param]:
    return [Param(f"stride_a{i}{c}") for i in plan.aux_used for c in "mn"]


def _consts(plan: Plan, *names: str) -> list[Param]:
    tanh = ("TANH_IMPL",) if plan.uses_tanh else ()
    return [Param(n, "constexpr") for n in (*names, *tanh)]


def _values(*names: str) -> list[Param]:
    return [Param(n) for n in names]


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


def _fwd_update(spec: AttentionSpec, plan: Plan, kmask_tail: str) -> list[str]:
    """The activation's block update: the online softmax, or sigmoid's plain sum."""
    return spec.act.update_lines(plan.fold_log2e, _prec(spec), kmask_tail, plan.scale_in_exp)


def _fwd_init(spec: AttentionSpec, plan: Plan) -> list[str]:
    init = ["acc = tl.full([BLOCK_M, BLOCK_DV], 0, dtype=tl.float32)"]
    return _state_init(spec, plan, "m_i", "l_i") + init


def _fwd_epilogue(spec: AttentionSpec, plan: Plan) -> list[str]:
    return spec.act.epilogue_lines(plan.fold_log2e, spec.fully_masked == "zero", plan.lse64)


def _store_lse(plan: Plan) -> list[str]:
    row = "pid_bh.to(tl.int64) * N_Q + offs_m"
    if not plan.lse64:
        return [f"tl.store(Lse + {row}, lse, mask=offs_m < N_Q)"]
    return [
        "# -- the float64 lse as a float32 (value, remainder) pair (layout.split_lse)",
        "lse_hi = lse.to(tl.float32)",
        'lse_lo = tl.where(tl.abs(lse_hi) < float("inf"), (lse - lse_hi.to(tl.float64)).to(tl.float32), 0.0)',
        f"tl.store(Lse + ({row}) * 2, lse_hi, mask=offs_m < N_Q)",
        f"tl.store(Lse + ({row}) * 2 + 1, lse_lo, mask=offs_m < N_Q)",
    ]


def _fwd_inner_args(spec: AttentionSpec, plan: Plan, sched) -> Signature:
    state = ["acc", *spec.act.state]
    return Signature(
        "_attn_fwd_inner",
        (
            *_values(*state, "q", "K_blk", "V_blk"),
            *_inner_aux_ptrs(plan),
            *_values("stride_kn", "stride_kd", "stride_vn", "stride_vd"),
            *_inner_aux_strides(plan),
            *_values("offs_m", "offs_d", "offs_dv", "N_Q", "N_K"),
            *sched.inner_params(True),
            *_consts(
                plan, "BLOCK_N", "HEAD_DIM", "HEAD_DIM_V", "APPLY_MASK", "USE_TMA", "WARP_SPEC"
            ),
        ),
    )


def forward_source(spec: AttentionSpec) -> str:
    plan = make_plan(spec)
    dims = _Dims(spec, plan)
    sched = _schedule(plan)
    inner = _fwd_inner_args(spec, plan, sched)
    state = ", ".join(p.name for p in inner.params[: 1 + len(spec.act.state)])
    kmask_tail = "(offs_n[None, :] < N_K)"
    vmask_tail = "(offs_n[:, None] < N_K)"
    kptr = "K_blk + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd"
    vptr = "V_blk + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd"
    load_kv = [
        "if USE_TMA:  # tensor descriptors (TMA): out-of-bounds rows and columns read as 0",
        "    kT = tl.trans(K_blk.load([start_n, 0]))",
        "    v = V_blk.load([start_n, 0])",
        "elif APPLY_MASK:",
        f"    kT = {_load(kptr, _mask(kmask_tail, dims.d('row')))}",
        f"    v = {_load(vptr, _mask(vmask_tail, dims.dv('col')))}",
        "else:",
        f"    kT = {_load(kptr, _mask(dims.d('row')))}",
        f"    v = {_load(vptr, _mask(dims.dv('col')))}",
    ]
    inner_src = templates.fill(
        templates.FWD_INNER,
        params=inner.declaration(),
        key_loop=sched.loop(True, "start_n", "BLOCK_N", tl_range=True),
        load_kv=load_kv,
        prec=_prec(spec),
        score_program=score_program(spec, plan, orient="mn", s="s", defer_scale=True),
        # (the tail on the scores: 32-bit, relative to the tile -- see _Tile)
        update=_fwd_update(spec, plan, "(tl.arange(0, BLOCK_N)[None, :] < N_K - start_n)"),
        state=state,
    )
    qptr = "Q_blk + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd"
    kernel_src = templates.fill(
        templates.FWD,
        params=KERNEL_ARGS["fwd"](spec, plan).declaration(),
        pid_m=_pid_m(spec, plan, "fwd"),
        aux_bases=_aux_bases(plan, "off_h"),
        load_q=_load(qptr, _mask("(offs_m[:, None] < N_Q)", dims.d("col"))),
        init=_fwd_init(spec, plan),
        schedule=plan.schedule.describe(),
        visit=sched.setup(True) + _visit(sched, True, inner, state),
        epilogue=_fwd_epilogue(spec, plan),
        store_lse=_store_lse(plan),
        omask=_mask("(offs_m[:, None] < N_Q)", dims.dv("col")),
    )
    return _header(spec, plan) + "\n\n" + inner_src + "\n\n" + kernel_src


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


def _pre_row_stats(spec: AttentionSpec, plan: Plan, dims: _Dims) -> list[str]:
    """Preprocess: delta = rowsum(dO * O) and the row statistic the other kernels use."""
    act = spec.act
    pre_lines = act.preprocess_lines(
        _load('O_blk + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od', _mask('(offs_m[:, None] < N_Q)', dims.dv('col'))),
        _load('DO_blk + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod', _mask('(offs_m[:, None] < N_Q)', dims.dv('col'))),
        plan.fold_log2e,
        plan.lse64,
    )  # fmt: skip
    if plan.row_norm:
        pre_lines += _row_norm_lines(spec, plan, dims)
    if spec.fully_masked == "zero":
        pre_lines += act.zero_rows_lines()
    return pre_lines


def _dkdv_activation(spec: AttentionSpec, plan: Plan, gate: bool) -> tuple[list[str], list[str]]:
    """dK/dV: (probabilities pT, dS^T) of the activation, on the transposed tile."""
    act = spec.act
    p_lines = act.p_lines("pT", "sT", "[None, :]", plan.fold_log2e, plan.uses_lg)
    masked = keep_in_masked_tiles_only(spec, plan)
    ds_lines = _gated("dsT", act.ds_expr("pT", "dpT", "fT", "[None, :]"), "keepT", gate, masked)
    if act.normalized:
        p_lines.insert(
            0, "# -- probabilities from the saved log-sum-exp (NaN for all -inf rows, like eager)"
        )
    return p_lines, ds_lines


def _dq_activation(spec: AttentionSpec, plan: Plan, gate: bool) -> tuple[list[str], list[str]]:
    """dQ: (probabilities p, dS) of the activation."""
    act = spec.act
    dq_p = act.p_lines("p", "s", "[:, None]", plan.fold_log2e, plan.uses_lg)
    masked = keep_in_masked_tiles_only(spec, plan)
    dq_ds = _gated("ds", act.ds_expr("p", "dp", "f", "[:, None]"), "keep", gate, masked)
    return dq_p, dq_ds


def _preprocess_source(spec: AttentionSpec, plan: Plan, dims: _Dims) -> str:
    return templates.fill(
        templates.BWD_PRE,
        params=KERNEL_ARGS["bwd_pre"](spec, plan).declaration(),
        aux_bases=[
            f"A{i} = A{i} + off_b * stride_a{i}b + off_h * stride_a{i}h" for i in plan.aux_used
        ],
        row_stats=_pre_row_stats(spec, plan, dims),
        store_lg=(
            ["tl.store(Lg + row_off + offs_m, lg_row, mask=offs_m < N_Q)"] if plan.uses_lg else []
        ),
    )


def _dkdv_loads(spec: AttentionSpec, plan: Plan, dims: _Dims, tail: bool) -> dict:
    """dK/dV's loads of the query tile: ``rows`` Q^T and dO, ``stats`` the saved row max
    (and log row sum with row_norm), ``delta`` (normalized activations); with the tail
    mask (``offs_m < N_Q``) when ``tail``."""
    row = "offs_m < N_Q" if tail else None
    qptr = "Q_blk + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd"
    doptr = "DO_blk + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod"
    qmask = _mask("(offs_m[None, :] < N_Q)" if tail else None, dims.d("row"))
    domask = _mask("(offs_m[:, None] < N_Q)" if tail else None, dims.dv("col"))
    stats = [f"m_row = {_load('M_blk + offs_m', row, spec.act.m_other)}"]
    if plan.uses_lg:
        stats.append(f"lg_row = {_load('L_blk + offs_m', row)}")
    return dict(
        rows=[f"qT = {_load(qptr, qmask)}", f"do = {_load(doptr, domask)}.to(qT.dtype)"],
        stats=stats,
        delta=[f"delta = {_load('D_blk + offs_m', row)}"] if spec.act.normalized else [],
    )


def _by_tail(masked: list[str], full: list[str]) -> list[str]:
    """``masked`` in tiles walked with APPLY_MASK, ``full`` in the others.  Only masked
    tiles can run past the end of the walked axis (keys for the forward and dQ, queries
    for dK/dV): a full tile lies inside it (``_block_range``, ``tiles.tile_map``) and
    loads with no compare and select per element."""
    if not masked or masked == full:
        return masked
    return [
        "if APPLY_MASK:  # the tile may run past the end",
        *("    " + ln for ln in masked),
        "else:",
        *("    " + ln for ln in full),
    ]


def _dkdv_inner_args(spec: AttentionSpec, plan: Plan, sched) -> Signature:
    return Signature(
        "_attn_bwd_dkdv_inner",
        (
            *_values("dk", "dv", "k", "v", "Q_blk", "DO_blk", "M_blk", "D_blk"),
            *(_values("L_blk") if plan.uses_lg else []),
            *_inner_aux_ptrs(plan),
            *_values("stride_qm", "stride_qd", "stride_dom", "stride_dod"),
            *_inner_aux_strides(plan),
            *_values("offs_n", "offs_d", "offs_dv", "N_Q", "N_K"),
            *sched.inner_params(False),
            *_consts(plan, "BLOCK_M", "HEAD_DIM", "HEAD_DIM_V", "APPLY_MASK"),
        ),
    )


def _dkdv_source(spec: AttentionSpec, plan: Plan, dims: _Dims, sched) -> str:
    gate = plan.has_fill
    rn = plan.uses_lg
    prec = _prec(spec)
    inner = _dkdv_inner_args(spec, plan, sched)
    p_lines, ds_lines = _dkdv_activation(spec, plan, gate)
    loads, full = _dkdv_loads(spec, plan, dims, True), _dkdv_loads(spec, plan, dims, False)
    inner_src = templates.fill(
        templates.DKDV_INNER,
        params=inner.declaration(),
        query_loop=sched.loop(False, "start_m", "BLOCK_M", tl_range=False),
        load_rows=_by_tail(loads["rows"], full["rows"]),
        prec=prec,
        score_program=score_program(
            spec, plan, orient="nm", s="sT", grad="fT", keep="keepT" if gate else None
        ),
        load_stats=_by_tail(loads["stats"], full["stats"]),
        probabilities=p_lines,
        ds=_by_tail(loads["delta"], full["delta"]) + ds_lines,
    )
    dead = dead_rows_fix(spec, plan)
    dead_rows = [
        "# -- a query row with no finite score (lse = -inf) makes eager softmax NaN on",
        "#    the whole row, hence NaN in every dV of its head (dK gets zeros: its",
        "#    scores are all filled): keep that even for the query tiles skipped above",
        "n_dead += tl.load(Dead + off_b * H_Q + off_h)",
    ]
    kernel_src = templates.fill(
        templates.DKDV,
        params=KERNEL_ARGS["bwd_dkdv"](spec, plan).declaration(),
        load_k=_load(
            "K_blk + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd",
            _mask("(offs_n[:, None] < N_K)", dims.d("col")),
        ),
        load_v=_load(
            "V_blk + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd",
            _mask("(offs_n[:, None] < N_K)", dims.dv("col")),
        ),
        schedule=plan.schedule.describe(),
        visit_setup=sched.setup(False),
        lg_base=["L_blk = Lg + (off_b * H_Q + off_h) * N_Q"] if rn else [],
        aux_bases=_aux_bases(plan, "off_h"),
        visit=_visit(sched, False, inner, "dk, dv"),
        dead_rows=dead_rows if dead else [],
        dead_fix=['dv = tl.where(n_dead > 0, float("nan"), dv)'] if dead else [],
        kmask=_mask("(offs_n[:, None] < N_K)", dims.d("col")),
        vmask=_mask("(offs_n[:, None] < N_K)", dims.dv("col")),
    )
    return inner_src + "\n\n" + kernel_src


def _dq_inner_args(spec: AttentionSpec, plan: Plan, sched) -> Signature:
    return Signature(
        "_attn_bwd_dq_inner",
        (
            *_values("dq", "q", "do", "m_row", "delta", "K_blk", "V_blk"),
            *(_values("lg_row") if plan.uses_lg else []),
            *_inner_aux_ptrs(plan),
            *[Param(f"DT{i}", arg=f"DT{i}_blk") for i in plan.table_grads],
            *_values("stride_kn", "stride_kd", "stride_vn", "stride_vd"),
            *_inner_aux_strides(plan),
            *_values("offs_m", "offs_d", "offs_dv", "N_Q", "N_K"),
            *sched.inner_params(True),
            *_consts(
                plan,
                "BLOCK_N",
                "HEAD_DIM",
                "HEAD_DIM_V",
                "APPLY_MASK",
                *(("TABLE_GRAD",) if plan.table_grads else ()),
            ),  # fmt: skip
        ),
    )


def _table_grad_lines(spec: AttentionSpec, plan: Plan, gate: bool) -> list[str]:
    """dQ with TABLE_GRAD: each bias table's gradient, dS of the final scores (the
    tables of ``Plan.table_grads`` are followed by additions and fills only), added into
    the entry each pair reads (float64 atomics: the order of the sum is not fixed, as in
    eager's ``index_add_`` on CUDA, and in float32 that order alone could cost 3x eager's
    error; the launcher rounds once, to the table's dtype)."""
    if not plan.table_grads:
        return []
    t = _Tile("mn")
    dsf = spec.act.ds_expr("p", "dp", "1.0", "[:, None]")
    lines = [
        "if TABLE_GRAD:  # the bias tables' gradients: dS of the final scores per entry",
        *(
            f"    {ln}"
            for ln in _gated("dsf", dsf, "keep", gate, keep_in_masked_tiles_only(spec, plan))
        ),
        "    inside = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)",
    ]
    for i in plan.table_grads:
        (op,) = [op for op in spec.score_ops if op.aux == i]
        lines.append(
            f"    tl.atomic_add(DT{i} + ({t.index(op.sym)}).to(tl.int64), dsf.to(tl.float64), mask=inside, "
            f'sem="relaxed")  # aux{i}[{op.sym}]'
        )
    return lines


def _dq_source(spec: AttentionSpec, plan: Plan, dims: _Dims, sched) -> str:
    gate = plan.has_fill
    inner = _dq_inner_args(spec, plan, sched)
    dq_p, dq_ds = _dq_activation(spec, plan, gate)
    kptr = "K_blk + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd"
    vptr = "V_blk + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd"
    ntail = "(offs_n[None, :] < N_K)"
    inner_src = templates.fill(
        templates.DQ_INNER,
        params=inner.declaration(),
        key_loop=sched.loop(True, "start_n", "BLOCK_N", tl_range=False),
        load_kv=[
            "if APPLY_MASK:",
            f"    kT = {_load(kptr, _mask(ntail, dims.d('row')))}",
            f"    vT = {_load(vptr, _mask(ntail, dims.dv('row')))}",
            "else:",
            f"    kT = {_load(kptr, _mask(dims.d('row')))}",
            f"    vT = {_load(vptr, _mask(dims.dv('row')))}",
        ],
        prec=_prec(spec),
        score_program=score_program(
            spec, plan, orient="mn", s="s", grad="f", keep="keep" if gate else None
        ),
        probabilities=dq_p,
        ds=dq_ds,
        table_grad=_table_grad_lines(spec, plan, gate),
    )
    rows = "(offs_m[:, None] < N_Q)"
    kernel_src = templates.fill(
        templates.DQ,
        params=KERNEL_ARGS["bwd_dq"](spec, plan).declaration(),
        pid_m=_pid_m(spec, plan, "bwd_dq"),
        aux_bases=_aux_bases(plan, "off_h"),
        table_grad_bases=[
            f"DT{i}_blk = DT{i} + off_b * stride_dt{i}b + off_h * stride_dt{i}h"
            for i in plan.table_grads
        ],
        load_q=_load(
            "Q_blk + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd",
            _mask(rows, dims.d("col")),
        ),
        load_do=_load(
            "DO_blk + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod",
            _mask(rows, dims.dv("col")),
        ),
        load_lg=(
            ["lg_row = tl.load(Lg + row_off + offs_m, mask=offs_m < N_Q, other=0.0)"]
            if plan.uses_lg
            else []
        ),
        schedule=plan.schedule.describe(),
        visit=sched.setup(True) + _visit(sched, True, inner, "dq"),
        qmask=_mask(rows, dims.d("col")),
    )
    return inner_src + "\n\n" + kernel_src


def backward_source(spec: AttentionSpec) -> str:
    plan = make_plan(spec)
    dims = _Dims(spec, plan)
    sched = _schedule(plan)
    return "\n\n".join(
        [
            _header(spec, plan),
            _preprocess_source(spec, plan, dims),
            _dkdv_source(spec, plan, dims, sched),
            _dq_source(spec, plan, dims, sched),
        ]
    )


def source(spec: AttentionSpec, part: str) -> str:
    if spec.routing is not None:  # the gather schedule: clusters of indexed rows
        from attnfx.codegen import routed_source

        return routed_source.source(spec, part)
    if part == "fwd":
        return forward_source(spec)
    if part == "bwd":
        return backward_source(spec)
    raise ValueError(part)
