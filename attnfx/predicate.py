"""Mask predicates: a boolean sympy expression over the query and key index.

A predicate says which (query, key) pairs are *kept*.  It is part of the IR: the mask
analysis pass builds one from index arithmetic found in the graph, codegen prints it as
Triton (``attnfx.codegen.printer``), the reference implementation materializes it with
torch, and block skipping derives, from the same expression, which key blocks a query
block may touch.

Symbols: ``Q`` (query index), ``K`` (key index), ``NQ`` and ``NK`` (query and key lengths,
known only at run time, so that one kernel serves every sequence length).
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import sympy

Q, K, NQ, NK = sympy.symbols("Q K NQ NK", integer=True)
_SYMBOLS = {"Q": Q, "K": K, "NQ": NQ, "NK": NK}


@dataclasses.dataclass(frozen=True)
class MaskClass:
    """What a predicate is, for the report and for block skipping.

    ``kind``: ``"none"`` (always true), ``"causal"`` (``K <= Q + offset``), ``"window"``
    (``Q - left <= K <= Q + right``; either side may be unbounded, i.e. ``None``) or
    ``"predicate"`` (anything else; evaluated per element, no block skipping).
    ``left``/``right`` are sympy expressions in ``NQ``/``NK`` (e.g. ``NK - NQ`` for a
    bottom-right aligned causal mask).  ``prefix`` (a window only): the first ``prefix``
    keys are kept besides the band, up to the right bound — StreamingLLM's sink tokens
    (Xiao et al. 2023): ``K - Q <= right and (K - Q >= -left or K < prefix)``; block
    skipping then visits two key ranges.
    """

    kind: str
    left: sympy.Expr | None = None
    right: sympy.Expr | None = None
    prefix: sympy.Expr | None = None

    def describe(self) -> str:
        if self.kind == "causal":
            return "causal" if self.right == 0 else f"causal(offset={self.right})"
        if self.kind == "window":
            tail = f"+prefix({self.prefix})" if self.prefix is not None else ""
            return f"window(left={self.left}, right={self.right}){tail}"
        return self.kind


@dataclasses.dataclass(frozen=True)
class MaskPredicate:
    expr: sympy.Basic

    # -- serialization: the spec key must be a plain string ---------------------------
    def to_key(self) -> str:
        return sympy.srepr(self.expr)

    @staticmethod
    @functools.cache
    def from_key(key: str) -> MaskPredicate:
        return MaskPredicate(_rebind(sympy.sympify(key)))

    def __str__(self) -> str:
        return str(self.expr)

    # -- classification ----------------------------------------------------------------
    @functools.cached_property
    def mask_class(self) -> MaskClass:
        return classify(self.expr)

    # -- evaluation ----------------------------------------------------------------------
    def materialize(self, nq: int, nk: int, device=None):
        """A ``(nq, nk)`` bool tensor: True where the pair is kept."""
        import torch

        q = torch.arange(nq, device=device).view(nq, 1)
        k = torch.arange(nk, device=device).view(1, nk)
        out = _eval_torch(self.expr, {Q: q, K: k, NQ: nq, NK: nk})
        return torch.as_tensor(out, device=device).to(torch.bool).expand(nq, nk)

    def evaluate(self, q, k, nq: int, nk: int):
        """The predicate on broadcastable integer tensors of query and key indices: a
        bool tensor (or a Python bool, for a predicate free of Q and K)."""
        return _eval_torch(self.expr, {Q: q, K: k, NQ: nq, NK: nk})


def materialize_expr(expr, nq: int, nk: int, device=None):
    """A ``(nq, nk)`` float32 tensor of the index expression ``expr`` over Q, K, NQ, NK
    (a position bias such as ``K - Q``)."""
    import torch

    q = torch.arange(nq, device=device).view(nq, 1)
    k = torch.arange(nk, device=device).view(1, nk)
    out = _eval_torch(expr, {Q: q, K: k, NQ: nq, NK: nk})
    return torch.as_tensor(out, device=device).to(torch.float32).expand(nq, nk)


def evaluate_expr(expr, q, k, nq: int, nk: int):
    """An index expression at index tensors ``q`` and ``k`` (broadcast against each
    other) of an ``nq`` × ``nk`` call, in exact integer (or float) arithmetic."""
    import torch

    return torch.as_tensor(_eval_torch(expr, {Q: q, K: k, NQ: nq, NK: nk}))


def _rebind(expr):
    """Parsed symbols lose their assumptions; map them back onto ours."""
    return expr.xreplace({s: _SYMBOLS[s.name] for s in expr.free_symbols if s.name in _SYMBOLS})


_RELATIONS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


def _eval_torch(e, env):
    """Evaluate the predicate subset on integer tensors (floored division and modulo,
    like Python and sympy)."""
    import torch

    ev = lambda x: _eval_torch(x, env)
    if e in env:
        return env[e]
    if e is sympy.true or e is sympy.false:
        return bool(e)
    if isinstance(e, sympy.Integer):
        return int(e)
    if isinstance(e, sympy.Rational):
        return e.p / e.q
    if isinstance(e, sympy.And):
        return functools.reduce(lambda a, b: a & b, map(ev, e.args))
    if isinstance(e, sympy.Or):
        return functools.reduce(lambda a, b: a | b, map(ev, e.args))
    if isinstance(e, sympy.Not):
        return ~ev(e.args[0])
    if isinstance(e, sympy.Rel):
        return _RELATIONS[e.rel_op](ev(e.lhs), ev(e.rhs))  # (only the one comparison)
    if isinstance(e, sympy.Add):
        return functools.reduce(lambda a, b: a + b, map(ev, e.args))
    if isinstance(e, sympy.Mul):
        return functools.reduce(lambda a, b: a * b, map(ev, e.args))
    if isinstance(e, sympy.Abs):
        return abs(ev(e.args[0]))
    if isinstance(e, sympy.Mod):
        return ev(e.args[0]) % ev(e.args[1])
    if isinstance(e, sympy.floor):
        num, den = floor_fraction(e)
        return ev(num) // ev(den)
    if isinstance(e, sympy.Min):
        return functools.reduce(
            lambda a, b: torch.minimum(torch.as_tensor(a), torch.as_tensor(b)), map(ev, e.args)
        )
    if isinstance(e, sympy.Max):
        return functools.reduce(
            lambda a, b: torch.maximum(torch.as_tensor(a), torch.as_tensor(b)), map(ev, e.args)
        )
    raise ValueError(f"cannot evaluate {type(e).__name__} in a mask predicate: {e}")


def within_lengths(expr, nq: int, nk: int):
    """``expr`` rewritten for indices inside the lengths (``0 <= Q < nq``, ``0 <= K <
    nk``, ``NQ = nq``, ``NK = nk``): a ``Mod``, ``floor``, ``Min``, ``Max`` or relation
    whose result those ranges decide is replaced by it.  A coordinate written through
    layers of ``//`` and ``%`` (a predicate on a permuted token order) comes out as the
    plain coordinate, which interval arithmetic then bounds per tile, and which costs the
    kernel fewer integer ops.  Valid only at those lengths, inside them."""
    known = {Q: (0, nq - 1), K: (0, nk - 1), NQ: (nq, nq), NK: (nk, nk)}
    expr = expr.xreplace({NQ: sympy.Integer(nq), NK: sympy.Integer(nk)})
    return _bounded(expr, known)[0]


def _bounded(e, known):
    """(simplified e, (lo, hi) integer range of e or None)."""
    if e in known:
        return e, known[e]
    if isinstance(e, sympy.Integer):
        return e, (int(e), int(e))
    if not e.args or isinstance(e, sympy.Rational):
        return e, None
    if isinstance(e, sympy.floor):
        num, den = floor_fraction(e)
        num, r = _bounded(num, known)
        if isinstance(den, sympy.Integer) and den > 0 and r is not None:
            lo, hi = r[0] // int(den), r[1] // int(den)
            if lo == hi:
                return sympy.Integer(lo), (lo, lo)
            return sympy.floor(num / den), (lo, hi)
        return sympy.floor(num / den), None
    parts = [_bounded(a, known) for a in e.args]
    args = [a for a, _ in parts]
    ranges = [r for _, r in parts]
    out = e.func(*args)
    if isinstance(e, sympy.Mod) and isinstance(args[1], sympy.Integer) and args[1] > 0:
        m, r = int(args[1]), ranges[0]
        if r is not None and r[0] // m == r[1] // m:
            shift = (r[0] // m) * m
            return args[0] - shift, (r[0] - shift, r[1] - shift)
        return out, (0, m - 1)
    if any(r is None for r in ranges):
        return out, None
    if isinstance(e, sympy.Add):
        return out, (sum(r[0] for r in ranges), sum(r[1] for r in ranges))
    if isinstance(e, sympy.Mul):
        lo, hi = ranges[0]
        for a, b in ranges[1:]:
            c = (lo * a, lo * b, hi * a, hi * b)
            lo, hi = min(c), max(c)
        return out, (lo, hi)
    if isinstance(e, (sympy.Min, sympy.Max)):
        pick = min if isinstance(e, sympy.Min) else max
        lo, hi = pick(r[0] for r in ranges), pick(r[1] for r in ranges)
        for i, (a, r) in enumerate(zip(args, ranges, strict=True)):  # one decides alone
            rest = [o for j, o in enumerate(ranges) if j != i]
            if isinstance(e, sympy.Min) and all(r[1] <= o[0] for o in rest):
                return a, r
            if isinstance(e, sympy.Max) and all(r[0] >= o[1] for o in rest):
                return a, r
        return out, (lo, hi)
    if isinstance(e, sympy.Abs):
        lo, hi = ranges[0]
        return out, (0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))
    if isinstance(e, sympy.Rel):
        (llo, lhi), (rlo, rhi) = ranges
        lo, hi = llo - rhi, lhi - rlo  # lhs - rhs
        decided = {
            "<": (hi < 0, lo >= 0),
            "<=": (hi <= 0, lo > 0),
            ">": (lo > 0, hi <= 0),
            ">=": (lo >= 0, hi < 0),
        }.get(e.rel_op)
        if decided is not None and decided[0]:
            return sympy.true, None
        if decided is not None and decided[1]:
            return sympy.false, None
    return out, None


def floor_fraction(e):
    """``floor(arg)`` as ``(num, den)`` with ``floor(arg) == num // den``.

    sympy distributes the division (``floor((Q + 1)/2)`` is stored as
    ``floor(Q/2 + 1/2)``), so the fraction is rebuilt with ``together``."""
    num, den = sympy.fraction(sympy.together(e.args[0]))
    return num, den


_FLIP = {
    sympy.LessThan: sympy.GreaterThan,
    sympy.GreaterThan: sympy.LessThan,
    sympy.StrictLessThan: sympy.StrictGreaterThan,
    sympy.StrictGreaterThan: sympy.StrictLessThan,
}


def _linear_bound(rel) -> tuple[str, sympy.Expr] | None:
    """Read one relation as a bound on ``K - Q``: ``("upper", c)`` for ``K - Q <= c``,
    ``("lower", c)`` for ``K - Q >= c``, with ``c`` free of ``Q`` and ``K``."""
    if type(rel) not in _FLIP:
        return None
    diff = sympy.expand(rel.lhs - rel.rhs)  # the relation reads: diff (op) 0
    ck, cq = diff.coeff(K), diff.coeff(Q)
    if ck not in (1, -1) or cq != -ck:
        return None
    rest = sympy.expand(diff - ck * (K - Q))
    if rest.has(Q) or rest.has(K):
        return None
    op = type(rel) if ck == 1 else _FLIP[type(rel)]
    bound = sympy.expand(-rest / ck)  # K - Q (op) bound
    if op is sympy.StrictLessThan:
        return "upper", bound - 1
    if op is sympy.LessThan:
        return "upper", bound
    if op is sympy.StrictGreaterThan:
        return "lower", bound + 1
    return "lower", bound


def _prefix_bound(rel) -> sympy.Expr | None:
    """Read ``K < c`` (or ``K <= c - 1``, ``c > K``), c free of Q and K, as a prefix of c
    keys."""
    if type(rel) not in _FLIP:
        return None
    diff = sympy.expand(rel.lhs - rel.rhs)
    ck = diff.coeff(K)
    if ck not in (1, -1) or diff.has(Q):
        return None
    rest = sympy.expand(diff - ck * K)
    if rest.has(K):
        return None
    op = type(rel) if ck == 1 else _FLIP[type(rel)]
    bound = sympy.expand(-rest / ck)  # K (op) bound
    if op is sympy.StrictLessThan:
        return bound
    if op is sympy.LessThan:
        return bound + 1
    return None


def _band_or_prefix(term) -> tuple[sympy.Expr, sympy.Expr] | None:
    """``K - Q >= lower or K < prefix``: (lower, prefix)."""
    if not isinstance(term, sympy.Or) or len(term.args) != 2:
        return None
    for a, b in (term.args, term.args[::-1]):
        lb, pre = _linear_bound(a), _prefix_bound(b)
        if lb is not None and lb[0] == "lower" and pre is not None:
            return lb[1], pre
    return None


def classify(expr) -> MaskClass:
    if expr is sympy.true or expr == True:  # noqa: E712 - sympy booleans
        return MaskClass("none")
    if expr.has(sympy.Or) or isinstance(expr, sympy.Not):
        # a band or a prefix (StreamingLLM) reads as a conjunction once in CNF
        try:
            expr = sympy.logic.boolalg.to_cnf(expr, simplify=False)
        except Exception:  # noqa: BLE001 - a form sympy cannot normalize: no skipping
            return MaskClass("predicate")
    rels = list(expr.args) if isinstance(expr, sympy.And) else [expr]
    upper = lower = prefix = None
    for r in rels:
        bp = _band_or_prefix(r)
        if bp is not None:
            if lower is not None or prefix is not None:
                return MaskClass("predicate")
            lower, prefix = bp
            continue
        b = _linear_bound(r)
        if b is None:
            return MaskClass("predicate")
        side, val = b
        if side == "upper":
            if upper is not None:
                return MaskClass("predicate")
            upper = val
        else:
            if lower is not None:
                return MaskClass("predicate")
            lower = val
    if prefix is not None and upper is None:
        return MaskClass("predicate")  # a prefix without a right bound: nothing to skip
    if lower is None and upper is not None:
        return MaskClass("causal", None, upper)
    # window: lower <= K - Q <= upper  ->  left = -lower, right = upper
    left = None if lower is None else sympy.expand(-lower)
    return MaskClass("window", left, upper, prefix)
