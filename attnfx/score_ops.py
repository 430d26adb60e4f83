"""The score-op table: what attnfx knows about each step of a score program.

A score program (``AttentionSpec.score_ops``) is a list of ``ScoreOp`` records; the
record's ``op`` names its entry here, and every stage asks the entry instead of testing
names: the spec (operands, printing, resolving ``D``), the reference and CPU paths (the
torch reference, the derivative, the aux gradients, rebasing to a block of query rows),
the planner (does the op keep a fill, can it saturate a row, how it meets the kernels'
log2(e) scaling) and codegen (the Triton lines).  Adding a score op adds an entry and
its tests.

Each entry is described by

* ``form``: ``"mul"`` (``s · m``), ``"add"`` (``s + a``), ``"fill"`` (``s := value``
  where a condition holds) or ``"map"`` (an elementwise function of ``s``);
* ``operand``: where ``m`` / ``a`` / the condition comes from — ``"const"``
  (``op.value``), ``"aux"`` (an aux tensor), ``"sym"`` (a scalar expression of the
  lengths, ``op.expr``), ``"pos"`` (an aux tensor times an index expression of Q and K),
  ``"table"`` (an aux *table* read at an index expression of Q and K), ``"pred"`` (an
  index predicate), or None;
* ``needs``: the ``ScoreOp`` operand fields (``aux``, ``pred``, ``expr``) it cannot do
  without;
* ``log2``: how the op meets the softmax kernels' scores in log2 units (exp → exp2 with
  log2(e) folded into the program): ``"scaled"`` (its constants are scaled along),
  ``"before"`` (it does not commute with the scaling — the fold comes after it) or
  ``"natural"`` (the values it adds may overflow once scaled: the kernels stay in
  natural units);
* ``helpers``: the generated module's Triton helpers its line calls.

The torch reference of an op reads its operands through a ``TorchEnv``; its Triton line
is written through the kernel builder's score emitter (``attnfx.codegen.emit``), whose
interface the ``triton`` methods below use: ``s`` / ``grad`` / ``keep`` (names of the
score tile, of its derivative factor and of the kept-pairs tile, or None), ``idx`` (the
op's position), ``scaled`` and ``L`` (whether the scores are in log2 units, and the
factor, log2(e) or 1, by which a score-valued constant is scaled), ``line(text)``,
``lit(x)`` (a float literal), ``tile.m`` / ``tile.n`` (the tile's query and key index
vectors, broadcast), ``index(expr)`` (a sympy expression of Q, K, NQ, NK over the
tile's index vectors), ``scale_grad(x)`` (multiply the derivative by a constant),
``set_grad(expr)`` (assign the derivative) and ``need_grad()`` (the derivative as a
variable ahead of the op's lines).
"""

from __future__ import annotations

import functools
import math

import sympy
import torch
from torch import Tensor

from attnfx.predicate import NK, NQ, MaskPredicate, Q, materialize_expr

# |lse| at or above this (natural units) has lost at least 2^-14 of relative precision in
# float32 -- and all of log(n) near finfo.min: the backward recomputes such rows' max and
# normalizer instead of trusting lse.  An op that can push a row's scores there
# "saturates" (``may_saturate``).
HUGE_LSE = 1024.0


class TorchEnv:
    """What a score op's torch reference reads besides the scores: the aux tensors and the
    lengths of the (``nq`` × ``nk``) scores.  With ``inplace`` the ops overwrite the score
    tensor they are given (a caller's own temporary); otherwise they never modify it."""

    def __init__(self, aux: list[Tensor], nq: int, nk: int, device=None, inplace: bool = False):
        self.aux, self.nq, self.nk, self.device, self.inplace = aux, nq, nk, device, inplace

    # -- operands (a subclass may cache them) --------------------------------------------
    def operand(self, op, dtype: torch.dtype) -> Tensor:
        return self.aux[op.aux].to(dtype)

    def value_at(self, op) -> float:
        return op.value_at(self.nq, self.nk)

    def keep(self, op) -> Tensor:
        """The (nq, nk) bool tensor of the pairs a ``pred`` operand keeps."""
        return op.predicate.materialize(self.nq, self.nk, device=self.device)

    def position(self, op, dtype: torch.dtype) -> Tensor:
        """The (nq, nk) index expression of a ``pos`` operand."""
        return materialize_expr(op.sym, self.nq, self.nk, device=self.device).to(dtype)

    def table_index(self, op) -> Tensor:
        """The (nq, nk) int64 index expression of a ``table`` operand."""
        return materialize_expr(op.sym, self.nq, self.nk, device=self.device).to(torch.int64)

    def gathered(self, op, dtype: torch.dtype) -> Tensor:
        """A ``table`` operand read at its index expression: (…, nq, nk).  The table is
        (B, H, 1, T), stride 0 where broadcast; each distinct (batch, head) table is read
        once and the result broadcast back (no B·H·N² copy where the table is shared)."""
        a = compact(self.aux[op.aux])
        out = a[..., 0, :].to(dtype)[..., self.table_index(op)]
        return out.expand(*self.aux[op.aux].shape[:-2], *out.shape[-2:])

    # -- arithmetic on the scores ------------------------------------------------------
    def mul(self, s: Tensor, m) -> Tensor:
        return s.mul_(m) if self.inplace else s * m

    def add(self, s: Tensor, a) -> Tensor:
        return s.add_(a) if self.inplace else s + a

    def tanh(self, s: Tensor) -> Tensor:
        return s.tanh_() if self.inplace else torch.tanh(s)

    def fill(self, s: Tensor, hit: Tensor, value: float) -> Tensor:
        if self.inplace:
            return s.masked_fill_(hit, value)
        return torch.where(hit, torch.full_like(s, value), s)


class ScoreOpKind:
    """One entry of the table (see the module docstring); subclasses fill it in."""

    name: str
    form: str
    operand: str | None = None
    needs: tuple[str, ...] = ()
    log2: str = "scaled"
    helpers: tuple[str, ...] = ()
    # a mask read from a tensor (the report's "tensor" mask)
    tensor_mask: bool = False
    # for a ``sym`` operand: the op once its expression is a constant / a 0-d aux tensor
    constant_form: str | None = None
    aux_form: str | None = None

    def describe(self, op) -> str:
        raise NotImplementedError

    # -- torch -------------------------------------------------------------------------
    def apply(self, s: Tensor, op, env: TorchEnv) -> tuple[Tensor, Tensor | None]:
        """(scores after the op, bool tensor of the pairs it filled or None)."""
        raise NotImplementedError

    def derivative(self, out: Tensor, op, env: TorchEnv):
        """d(op)/d(scores) on kept pairs, from the op's output ``out``; None: 1."""
        return None

    def aux_grad(self, g: Tensor, before: Tensor, op, env: TorchEnv) -> Tensor | None:
        """The gradient the op's aux tensor receives, given the gradient ``g`` of its output
        and its input ``before``; None: the op has no differentiable operand."""
        return None

    def rows(self, op, r0: int, nq: int, nk: int):
        """The op for the query rows ``r0..`` of an ``nq`` × ``nk`` call run as a block:
        indices still global, the lengths fixed.  Ops that read neither stay as they are."""
        return op

    def reads_lengths(self, op) -> bool:
        """Whether the op's value depends on NQ or NK (not the same on a prefix)."""
        return False

    # -- planning ----------------------------------------------------------------------
    def preserves_fill(self, op, fill: float) -> bool:
        """Whether scores filled with ``fill`` before this op stay a value block skipping
        may still treat as never kept (conservative: False when unsure)."""
        return False

    def may_saturate(self, op) -> bool:
        """Whether the op can make a row's scores huge but finite (|lse| >= HUGE_LSE)."""
        v = op.value
        return v is not None and math.isfinite(v) and abs(v) >= HUGE_LSE

    # -- Triton ------------------------------------------------------------------------
    def triton(self, op, e) -> None:
        raise NotImplementedError(f"score op {self.name!r} has no Triton form")


# ---------------------------------------------------------------------------------------
# Multipliers
# ---------------------------------------------------------------------------------------


class Mul(ScoreOpKind):
    name, form, operand = "mul", "mul", "const"

    def describe(self, op):
        return f"*{op.value:.6g}"

    def apply(self, s, op, env):
        return env.mul(s, op.value), None

    def derivative(self, out, op, env):
        return op.value

    def preserves_fill(self, op, fill):
        return op.value > 0 and (fill == -math.inf or op.value >= 1)

    def triton(self, op, e):
        if e.s is not None:
            e.line(f"{e.s} = {e.s} * {e.lit(op.value)}")
        if e.grad is not None:
            e.scale_grad(op.value)


class MulAux(ScoreOpKind):
    name, form, operand, needs = "mul_aux", "mul", "aux", ("aux",)

    def describe(self, op):
        return f"*aux{op.aux}"

    def apply(self, s, op, env):
        return env.mul(s, env.operand(op, s.dtype)), None

    def derivative(self, out, op, env):
        return env.operand(op, out.dtype)

    def aux_grad(self, g, before, op, env):
        return g * before

    def may_saturate(self, op):
        return True  # an unbounded multiplier

    def triton(self, op, e):
        a = f"a{op.aux}.to(tl.float32)"
        if e.s is not None:
            e.line(f"{e.s} = {e.s} * {a}")
        if e.grad is not None:
            e.set_grad(f"{e.grad} * {a}")


class _Symbolic(ScoreOpKind):
    """A scalar expression of the lengths (and of ``D`` until resolved).  The kernels never
    see one: the op lowers it to a 0-d aux tensor (``aux_form``) per call."""

    operand, needs = "sym", ("expr",)

    def rows(self, op, r0, nq, nk):
        import dataclasses

        import sympy

        return dataclasses.replace(op, expr=sympy.srepr(op.sym.subs({NQ: nq, NK: nk})))

    def reads_lengths(self, op):
        return True


class MulSym(_Symbolic):
    name, form, constant_form, aux_form = "mul_sym", "mul", "mul", "mul_aux"

    def describe(self, op):
        return f"*({op.sym})"

    def apply(self, s, op, env):
        return env.mul(s, env.value_at(op)), None

    def derivative(self, out, op, env):
        return env.value_at(op)


# ---------------------------------------------------------------------------------------
# Additions
# ---------------------------------------------------------------------------------------


class Add(ScoreOpKind):
    name, form, operand = "add", "add", "const"

    def describe(self, op):
        return f"+{op.value:.6g}"

    def apply(self, s, op, env):
        return env.add(s, op.value), None

    def preserves_fill(self, op, fill):
        return fill == -math.inf and math.isfinite(op.value)

    def triton(self, op, e):
        if e.s is not None:
            e.line(f"{e.s} = {e.s} + {e.lit(op.value * e.L)}")


class AddAux(ScoreOpKind):
    # an additive tensor may hold finfo.min (HF masks): no log2 scaling
    name, form, operand, needs, log2 = "add_aux", "add", "aux", ("aux",), "natural"
    tensor_mask = True

    def describe(self, op):
        return f"+aux{op.aux}"

    def apply(self, s, op, env):
        return env.add(s, env.operand(op, s.dtype)), None

    def aux_grad(self, g, before, op, env):
        return g

    def may_saturate(self, op):
        return True  # HF-style additive finfo.min masks

    def triton(self, op, e):
        if e.s is not None:
            assert not e.scaled
            e.line(f"{e.s} = {e.s} + a{op.aux}.to(tl.float32)")


class AddSym(_Symbolic):
    name, form, constant_form, aux_form = "add_sym", "add", "add", "add_aux"

    def describe(self, op):
        return f"+({op.sym})"

    def apply(self, s, op, env):
        return env.add(s, env.value_at(op)), None


class AddPosAux(ScoreOpKind):
    """``s + aux · expr(Q, K, NQ, NK)``: a position bias (ALiBi's per-head slope times
    ``K − Q``) without an N×N tensor."""

    name, form, operand, needs, log2 = "add_pos_aux", "add", "pos", ("aux", "expr"), "natural"

    def describe(self, op):
        return f"+aux{op.aux}·({op.sym})"

    def apply(self, s, op, env):
        return env.add(s, env.operand(op, s.dtype) * env.position(op, s.dtype)), None

    def aux_grad(self, g, before, op, env):
        return g * env.position(op, g.dtype)

    def rows(self, op, r0, nq, nk):
        import dataclasses

        import sympy

        e = op.sym.subs({Q: Q + r0, NQ: nq, NK: nk}, simultaneous=True)
        return dataclasses.replace(op, expr=sympy.srepr(e))

    def reads_lengths(self, op):
        return bool(op.sym.free_symbols & {NQ, NK})

    def may_saturate(self, op):
        return True  # an unbounded slope

    def triton(self, op, e):
        if e.s is not None:
            assert not e.scaled
            pos = e.index(op.sym)
            e.line(f"{e.s} = {e.s} + a{op.aux}.to(tl.float32) * ({pos}).to(tl.float32)  # {op.sym}")


class AddTableAux(ScoreOpKind):
    """``s + aux[idx(Q, K)]``: a bias read from a small learnable table at an index
    expression of the positions — NAT's relative position bias (Hassani et al. 2023), a
    per-head (2k−1)^n table indexed by the key's offset from the query — with no N×N
    tensor.  The aux tensor is the table, (B, H, 1, T) (stride 0 where broadcast); its
    gradient is the scores' gradient summed into the table entries each pair reads.  An
    index outside ``[0, T)`` at a call's lengths is an error, as eager's gather raises
    (``check_index``)."""

    name, form, operand, needs, log2 = "add_table_aux", "add", "table", ("aux", "expr"), "natural"

    def describe(self, op):
        return f"+aux{op.aux}[{op.sym}]"

    def apply(self, s, op, env):
        return env.add(s, env.gathered(op, s.dtype)), None

    def aux_grad(self, g, before, op, env):
        table = env.aux[op.aux]
        idx = env.table_index(op).reshape(-1)
        lead = torch.broadcast_shapes(g.shape[:-2], table.shape[:-2])
        g = g.expand(*lead, *g.shape[-2:]).reshape(*lead, -1)
        out = g.new_zeros(*lead, table.shape[-1]).index_add_(-1, idx, g)
        return out.unsqueeze(-2)

    rows = AddPosAux.rows
    reads_lengths = AddPosAux.reads_lengths

    def may_saturate(self, op):
        return True  # learnable values, unbounded

    def check_index(self, op, nq: int, nk: int, size: int) -> None:
        """Raise where the index expression leaves the table (of ``size`` entries) for a
        pair inside the lengths: the kernels would read past it; eager's gather raises."""
        lo, hi = index_range(op.expr, nq, nk)
        if lo < 0 or hi >= size:  # (interval bounds may be loose: the exact range decides)
            lo, hi = index_range(op.expr, nq, nk, exact=True)
        if lo < 0 or hi >= size:
            raise IndexError(
                f"score op {op.describe()}: index {op.sym} spans [{lo}, {hi}] at lengths "
                f"{nq}x{nk}, outside the table's {size} entries"
            )

    def triton(self, op, e):
        if e.s is not None:
            assert not e.scaled
            i = op.aux
            idx = e.index(op.sym)
            inside = f"({e.tile.m} < N_Q) & ({e.tile.n} < N_K)"
            e.line(
                f"t{e.idx} = tl.load(A{i} + ({idx}).to(tl.int64) * stride_a{i}n, "
                f"mask={inside}, other=0)  # aux{i}[{op.sym}]"
            )
            e.line(f"{e.s} = {e.s} + t{e.idx}.to(tl.float32)")


# Pairs per block of ``index_range``'s exact evaluation.
_RANGE_BLOCK = 1 << 22


@functools.lru_cache(maxsize=256)
def index_range(expr_key: str, nq: int, nk: int, exact: bool = False) -> tuple[int, int]:
    """(min, max) of an integer index expression over the pairs inside the lengths:
    bounds by interval arithmetic when it bounds the expression (they may be loose), or
    with ``exact`` (or no bounds), the range evaluated a block of query rows at a time."""
    from attnfx.predicate import K, _bounded

    expr = MaskPredicate.from_key(expr_key).expr  # (an expression key parses the same way)
    known = {Q: (0, nq - 1), K: (0, nk - 1), NQ: (nq, nq), NK: (nk, nk)}
    _, r = _bounded(expr.xreplace({NQ: sympy.Integer(nq), NK: sympy.Integer(nk)}), known)
    if r is not None and not exact:
        return int(r[0]), int(r[1])
    lo, hi = None, None
    rows = max(1, _RANGE_BLOCK // max(1, nk))
    for r0 in range(0, nq, rows):
        block = expr.subs({Q: Q + r0}, simultaneous=True)
        t = materialize_expr(block, min(rows, nq - r0), nk).to(torch.int64)
        blo, bhi = int(t.min()), int(t.max())
        lo, hi = (blo, bhi) if lo is None else (min(lo, blo), max(hi, bhi))
    return lo, hi


def compact(t: Tensor) -> Tensor:
    """A broadcast (stride-0) view shrunk back to the size-1 dims it was expanded from,
    so that combining or gathering does not materialize B·H·N² (the CPU path's masks,
    the tables)."""
    idx = tuple(
        slice(0, 1) if st == 0 and sz > 1 else slice(None) for sz, st in zip(t.shape, t.stride())
    )
    return t[idx]


# ---------------------------------------------------------------------------------------
# Fills: the filled pairs get the value and exactly zero gradient
# ---------------------------------------------------------------------------------------


class _Fill(ScoreOpKind):
    form = "fill"

    def preserves_fill(self, op, fill):
        return op.value == fill

    def hit(self, op, env: TorchEnv) -> Tensor:
        raise NotImplementedError

    def apply(self, s, op, env):
        hit = self.hit(op, env)
        return env.fill(s, hit, op.value), hit

    def test(self, op, e) -> tuple[str, str, bool]:
        """The Triton test: (its name, its line's right-hand side, whether True means
        filled — else kept)."""
        raise NotImplementedError

    def triton(self, op, e):
        name, test, filled = self.test(op, e)
        e.line(f"{name} = {test}")
        fill = e.lit(op.value * e.L)
        if e.s is not None:
            where = f"{name}, {fill}, {e.s}" if filled else f"{name}, {e.s}, {fill}"
            e.line(f"{e.s} = tl.where({where})")
        if e.grad is not None:
            e.set_grad(
                f"tl.where({name}, 0.0, {e.grad})" if filled else f"tl.where({name}, {e.grad}, 0.0)"
            )
        if e.keep is not None:
            e.line(f"{e.keep} = {e.keep} & {'~' if filled else ''}{name}")


class FillAux(_Fill):
    """``where(aux == fill_where, value, s)``: ``masked_fill`` / ``where`` by a tensor."""

    name, operand, needs, tensor_mask = "fill_aux", "aux", ("aux",), True

    def describe(self, op):
        return f"fill({'' if op.fill_where else '~'}aux{op.aux}, {op.value:g})"

    def hit(self, op, env):
        hit = env.operand(op, torch.bool)
        return hit if op.fill_where else ~hit

    def test(self, op, e):
        cmp = "!=" if op.fill_where else "=="
        test = f"a{op.aux} {cmp} 0  # masked_fill where aux{op.aux} is {op.fill_where}"
        return f"hit{e.idx}", test, True


class FillPred(_Fill):
    """``where(pred(Q, K), s, value)``: an index predicate (True keeps the pair)."""

    name, operand, needs = "fill_pred", "pred", ("pred",)

    def describe(self, op):
        return f"keep[{op.predicate.mask_class.describe()}] else {op.value:g}"

    def hit(self, op, env):
        return ~env.keep(op)

    def rows(self, op, r0, nq, nk):
        import dataclasses

        e = op.predicate.expr.subs({Q: Q + r0, NQ: nq, NK: nk}, simultaneous=True)
        return dataclasses.replace(op, pred=MaskPredicate(e).to_key())

    def reads_lengths(self, op):
        return bool(op.predicate.expr.free_symbols & {NQ, NK})

    def test(self, op, e):
        return f"kept{e.idx}", f"{e.index(op.predicate.expr)}  # {op.predicate}", False

    def triton(self, op, e):
        if e.grad is not None:
            e.need_grad()
        super().triton(op, e)


# ---------------------------------------------------------------------------------------
# Elementwise functions
# ---------------------------------------------------------------------------------------


class Tanh(ScoreOpKind):
    """``tanh(s)``; soft-capping is ``mul 1/c, tanh, mul c``."""

    # tanh does not commute with the log2(e) scaling: the fold comes after it
    name, form, log2, helpers = "tanh", "map", "before", ("_tanh",)

    def describe(self, op):
        return "tanh"

    def apply(self, s, op, env):
        return env.tanh(s), None

    def derivative(self, out, op, env):
        return 1 - out * out  # d tanh(x)/dx = 1 - tanh(x)^2

    def triton(self, op, e):
        assert e.s is None or not e.scaled
        if e.s is not None:
            e.line(f"{e.s} = _tanh({e.s}, TANH_IMPL)")
        if e.grad is not None:
            # d tanh(x)/dx = 1 - tanh(x)^2, on the value just computed
            e.set_grad(f"{e.grad} * (1.0 - {e.s} * {e.s})")


TABLE: dict[str, ScoreOpKind] = {
    k.name: k
    for k in (
        Mul(),
        Add(),
        MulAux(),
        AddAux(),
        FillAux(),
        FillPred(),
        Tanh(),
        AddSym(),
        MulSym(),
        AddPosAux(),
        AddTableAux(),
    )
}


def run(s: Tensor, ops, env: TorchEnv, *, with_grad: bool = False):
    """The torch reference of a score program: ``ops`` applied to ``s`` in order.

    Returns the scores, the union of the pairs the fills hit (None: no fill) and, with
    ``with_grad``, the product of the ops' derivatives (1.0 when none scales; not zeroed
    on filled pairs — callers gate those by the fills)."""
    hit, d = None, 1.0
    for op in ops:
        e = TABLE[op.op]
        s, h = e.apply(s, op, env)
        if with_grad:
            f = e.derivative(s, op, env)
            d = d if f is None else d * f
        if h is not None:
            hit = h if hit is None else hit | h
    return s, hit, d
