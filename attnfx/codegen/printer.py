"""Index expressions as Triton source: mask predicates and position terms over a tile.

The mask analysis builds sympy expressions over ``Q``, ``K``, ``NQ`` and ``NK``
(``attnfx.predicate``); the kernels evaluate them on a tile's index vectors.  Python's
floored division and modulo are printed as such (Triton's truncate like C); of terms
that are never negative (indices), as Triton's own, shifts and masks by powers of two.
"""

from __future__ import annotations

import functools

import sympy

from attnfx.predicate import NK, NQ, K, Q, floor_fraction


def index_expr(
    expr,
    q: str = "offs_m",
    k: str = "offs_n",
    nq: str = "N_Q",
    nk: str = "N_K",
    *,
    transposed: bool = False,
    nonneg=(Q, K, NQ, NK),
) -> str:
    """``expr`` (a predicate or an index expression) as a Triton expression over
    broadcastable index vectors.

    The tile is (queries, keys) -- ``q[:, None]``, ``k[None, :]`` -- or, with
    ``transposed=True``, (keys, queries) -- ``q[None, :]``, ``k[:, None]`` -- as in a
    backward kernel that holds a key block and walks query blocks.  ``nonneg``: the
    symbols whose vectors hold no negative value (indices and lengths do; a coordinate
    relative to the tile, ``shift_invariant``, may not)."""
    qi, ki = ("[None, :]", "[:, None]") if transposed else ("[:, None]", "[None, :]")
    return _Printer({Q: q + qi, K: k + ki, NQ: nq, NK: nk}, frozenset(nonneg)).doprint(expr)


_D = sympy.Dummy("D", integer=True)


@functools.lru_cache(maxsize=256)
def shift_invariant(expr) -> bool:
    """Whether ``expr`` depends on Q and K only through K - Q (causal, bands, sliding
    windows, ALiBi's distance): then it has the same value on coordinates shifted by a
    common offset -- a kernel may evaluate it on small tile-relative 32-bit vectors
    instead of the absolute indices.  Each relation is brought to ``lhs - rhs ~ 0`` and K
    replaced by Q + D: invariant when no Q is left (a sufficient test, not a complete
    one: ``K % 3 == Q % 3`` is invariant and reported as not)."""
    if not isinstance(expr, sympy.Basic):
        return True  # a constant
    canon = expr.replace(
        lambda x: isinstance(x, sympy.core.relational.Relational),
        lambda r: r.func(sympy.expand(r.lhs - r.rhs), 0),
    )
    return Q not in canon.subs(K, Q + _D).free_symbols


class _Printer:
    """Prints the small sympy subset the mask analysis produces as Triton source."""

    def __init__(self, names, nonneg=frozenset((Q, K, NQ, NK))):
        self.names = names
        self.nonneg = nonneg

    def doprint(self, e) -> str:
        p = self.doprint
        if e in self.names:
            return self.names[e]
        if e is sympy.true:
            return "True"
        if e is sympy.false:
            return "False"
        if isinstance(e, sympy.Integer):
            return str(int(e))
        if isinstance(e, sympy.Rational):
            return f"({e.p} / {e.q})"
        if isinstance(e, sympy.And):
            return "(" + " & ".join(p(a) for a in e.args) + ")"
        if isinstance(e, sympy.Or):
            return "(" + " | ".join(p(a) for a in e.args) + ")"
        if isinstance(e, sympy.Not):
            return f"(~{p(e.args[0])})"
        if isinstance(e, sympy.Rel):
            return f"({p(e.lhs)} {e.rel_op} {p(e.rhs)})"
        if isinstance(e, sympy.Add):
            return "(" + " + ".join(p(a) for a in e.args) + ")"
        if isinstance(e, sympy.Mul):
            return "(" + " * ".join(p(a) for a in e.args) + ")"
        if isinstance(e, sympy.Abs):
            return f"tl.abs({p(e.args[0])})"
        if isinstance(e, sympy.Mod):
            x, m = e.args
            if _positive_const(m) and _nonneg(x, self.nonneg):  # floored = truncated: one op
                c = int(m)
                return f"({p(x)} & {c - 1})" if c & (c - 1) == 0 else f"({p(x)} % {c})"
            # Python/sympy modulo is floored; Triton's % truncates like C.
            a, b = p(x), p(m)
            return f"((({a}) % ({b}) + ({b})) % ({b}))"
        if isinstance(e, sympy.floor):
            # floor(x / c) from floor division of integers
            num, den = floor_fraction(e)
            if _positive_const(den) and _nonneg(num, self.nonneg):
                c = int(den)
                if c & (c - 1) == 0:
                    return f"({p(num)} >> {c.bit_length() - 1})"
                return f"({p(num)} // {c})"
            return f"_floordiv({p(num)}, {p(den)})"
        if isinstance(e, sympy.Min):
            return _fold("tl.minimum", [p(a) for a in e.args])
        if isinstance(e, sympy.Max):
            return _fold("tl.maximum", [p(a) for a in e.args])
        raise ValueError(f"cannot print {type(e).__name__} in a Triton mask: {e}")


def _positive_const(x) -> bool:
    return isinstance(x, sympy.Integer) and x > 0


def _nonneg(e, nonneg=frozenset((Q, K, NQ, NK))) -> bool:
    """Whether ``e`` is >= 0 at every index a tile holds: indices and lengths are (tile
    tails run past the length, never below 0), as are sums, products, floored quotients
    by positive constants and remainders of such terms (where truncating ``//`` and
    ``%`` are the floored ones, and powers of two are shifts and masks)."""
    if e in (Q, K, NQ, NK):
        return e in nonneg
    if isinstance(e, sympy.Integer):
        return e >= 0
    if isinstance(e, (sympy.Add, sympy.Mul, sympy.Min, sympy.Max)):
        return all(_nonneg(a, nonneg) for a in e.args)
    if isinstance(e, sympy.Mod):
        return _positive_const(e.args[1])
    if isinstance(e, sympy.floor):
        num, den = floor_fraction(e)
        return _positive_const(den) and _nonneg(num, nonneg)
    if isinstance(e, sympy.Abs):
        return True
    return False


def _fold(fn, items):
    out = items[0]
    for x in items[1:]:
        out = f"{fn}({out}, {x})"
    return out
