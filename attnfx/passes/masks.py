"""Read masks built from index arithmetic back as a predicate over ``(Q, K)``.

``analyze_mask(node, nq, nk)`` takes the node that produces a mask in a Dynamo FX graph
(the ``mask`` of ``scores.masked_fill(mask, v)`` / ``torch.where(mask, ...)``) and, when
the mask is a pure function of the indices and the graph's sizes, returns the sympy
predicate that is True exactly where the mask is True (bool) or nonzero (numeric).

How: a small symbolic evaluator runs over the mask's subgraph.  Each tensor is one sympy
expression over *dimension variables* ``_d0`` (last dim), ``_d1`` (second to last), ...
(numbered from the right, so that broadcasting needs no bookkeeping), and its shape comes
from ``node.meta["example_value"]``.  At the end ``_d0`` is the key index ``K``, ``_d1``
the query index ``Q``; size symbols (``s0`` ...) are rewritten to ``NQ`` / ``NK``.  The
result is then checked by running the subgraph eagerly on concrete sizes and comparing it,
element by element, with ``MaskPredicate.materialize``.

Recognized (``torch.*`` functions, ``Tensor`` methods and ``operator`` forms alike):

- sources: ``arange(end)``, ``arange(start, end[, step])``; ``ones``, ``zeros``, ``full``,
  ``*_like``, ``new_*``, ``eye``, ``scalar_tensor``; SymInt sizes and Python constants
- arithmetic: ``+ - * / // %``, ``neg``, ``abs``, ``clamp``, ``minimum``/``maximum``,
  ``div(rounding_mode="floor")``, ``floor_divide``, ``remainder``
- comparisons ``< <= > >= == !=``; logic ``& | ^ ~`` and ``logical_*`` / ``bitwise_*``
  on booleans
- ``tril`` / ``triu`` (any diagonal), ``where``, ``masked_fill``
- shapes: indexing with ``None`` / ``:`` / slices / ints / ``...``, ``unsqueeze``,
  ``squeeze``, ``view`` / ``reshape`` that only add or drop size-1 dims, ``expand``,
  ``expand_as``, ``broadcast_to``, ``permute``, ``transpose``, ``t``
- dtype and device moves: ``to``, ``type``, ``bool``, ``int``, ``long``, ``float``...,
  ``contiguous``, ``clone``, ``detach``
- in-place forms (``tril_``, ...) when nothing else sees the tensor they overwrite

Numeric masks (0/1 floats, additive 0/-inf masks) are read when they take only two
values, ``0`` and one constant (``MaskAnalysis.value``); the predicate is then True where
the mask holds that constant.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import dataclasses
import math
import operator
import weakref

import sympy
import torch
from sympy.logic.boolalg import BooleanAtom, BooleanFunction, to_nnf
from torch import fx

from attnfx.predicate import NK, NQ, K, MaskPredicate, Q

__all__ = ["MaskAnalysis", "analyze_mask"]

# Masks larger than this (elements, per tensor of the subgraph) are verified on smaller
# sizes when the sizes are symbolic, and refused when they are not.
_VERIFY_MAX_NUMEL = 1 << 24


@dataclasses.dataclass(frozen=True)
class MaskAnalysis:
    """``predicate``: True where the mask is True / nonzero, or None with ``reason``.
    ``nodes``: the nodes that become dead once the mask is replaced by the predicate.
    ``value``: for a numeric mask, the one nonzero value it takes (``1.0``, ``-inf``...);
    None for a boolean mask."""

    predicate: MaskPredicate | None
    reason: str = ""
    nodes: frozenset[fx.Node] = frozenset()
    value: float | None = None


class _Refuse(Exception):
    """The mask cannot be read as a predicate; the message says why."""


# Dimension variables, numbered from the right: _D[0] indexes the last dim.
_D = tuple(sympy.Symbol(f"_d{j}", integer=True, nonnegative=True) for j in range(16))


@dataclasses.dataclass(frozen=True)
class _V:
    """A symbolic tensor (or scalar, with ``shape == ()``)."""

    expr: sympy.Basic  # Boolean if is_bool, else a number-valued Expr (maybe Piecewise)
    shape: tuple[sympy.Expr, ...]  # sizes as raw sympy expressions of the graph's SymInts
    is_bool: bool


# ---------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# proofs: each analysis derives its expression symbolically, then checks it against the
# materialized tensor (every pair, in row blocks when large).  Inside ``deferring_proofs``
# the checks are collected instead, for the caller to run once it knows the site will be
# rewritten: a CPU site the backend keeps anyway (``cpu="auto"``) then never pays for
# them (NeighborhoodAttention2D 96x96 with its bias: 6 s of checks on 85M pairs).
# ---------------------------------------------------------------------------------------

_DEFERRED: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "attnfx_deferred_proofs", default=None
)


@contextlib.contextmanager
def deferring_proofs(into: list):
    """Collect the checks of the analyses run inside into ``into`` (pairs (what, check));
    ``run_proofs`` runs them.  A result used before its proof ran must not reach a
    rewrite: the backend runs a site's proofs before verifying and rewriting it."""
    token = _DEFERRED.set(into)
    try:
        yield into
    finally:
        _DEFERRED.reset(token)


def _prove(what: str, check) -> None:
    """Run ``check`` (raises ``_Refuse`` on a disagreement) now, or collect it."""
    sink = _DEFERRED.get()
    if sink is None:
        check()
    else:
        sink.append((what, check))


def run_proofs(proofs) -> str | None:
    """Run collected checks; the first failure's reason, or None when all hold."""
    for what, check in proofs:
        try:
            check()
        except _Refuse as e:
            return f"{what} disagrees with its expression: {e}"
        except Exception as e:  # noqa: BLE001 - a check that cannot run proves nothing
            return f"{what} could not be checked: {type(e).__name__}: {e}"
    return None


def analyze_mask(node: fx.Node, nq, nk) -> MaskAnalysis:
    """Read the mask produced by ``node`` as a predicate over ``Q``, ``K``, ``NQ``, ``NK``.

    ``nq`` / ``nk``: query and key lengths of the scores the mask broadcasts against
    (int, ``torch.SymInt`` or sympy expression)."""
    try:
        return _analyze(node, _raw(nq), _raw(nk))
    except _Refuse as e:
        return MaskAnalysis(None, str(e))
    except Exception as e:  # a form we did not anticipate: never guess
        return MaskAnalysis(None, f"analysis failed: {type(e).__name__}: {e}")


def _analyze(root: fx.Node, nq, nk) -> MaskAnalysis:
    cone = _cone(root)
    _check_sources(cone)
    env: dict[fx.Node, _V] = {}
    for n in cone:  # cone is in graph (topological) order
        env[n] = _eval_node(n, env)
    v = env[root]

    rank = len(v.shape)
    for j in range(2, rank):
        if v.expr.has(_D[j]):
            raise _Refuse(f"depends on batch/head index (dim {rank - 1 - j} of {root.name})")
    if rank >= 1 and v.shape[-1] != 1 and not _same(v.shape[-1], nk):
        raise _Refuse(f"last dim {v.shape[-1]} of the mask is not the key length {nk}")
    if rank >= 2 and v.shape[-2] != 1 and not _same(v.shape[-2], nq):
        raise _Refuse(f"dim -2 {v.shape[-2]} of the mask is not the query length {nq}")

    value = None
    expr = v.expr
    if not v.is_bool:
        values = {val for val, _ in _branches(expr)}
        if any(val.free_symbols for val in values) or len(values - {sympy.S.Zero}) > 1:
            raise _Refuse("numeric mask takes values other than 0 and one constant")
        nonzero = values - {sympy.S.Zero}
        value = float(nonzero.pop()) if nonzero else None
        expr = _nonzero(expr)

    sizes = _size_map(nq, nk)
    expr = expr.xreplace({_D[0]: K, _D[1]: Q}).xreplace(sizes)
    expr = _canonical(expr)
    foreign = expr.free_symbols - {Q, K, NQ, NK}
    if foreign:
        names = ", ".join(sorted(map(str, foreign)))
        raise _Refuse(f"size symbol(s) {names} are neither the query nor the key length")

    pred = MaskPredicate(expr)
    _prove("mask", lambda: _verify(pred, root, cone, nq, nk))
    return MaskAnalysis(pred, "", _dead_nodes(root, cone), value)


def constant_tensor(node: fx.Node, limit: int = 1 << 26) -> torch.Tensor | None:
    """``node``'s value when it depends on no input, parameter or buffer (a mask built from
    ``arange`` and constants), computed on the CPU at its static sizes; else None."""
    ev = node.meta.get("example_value")
    if not isinstance(ev, torch.Tensor) or not all(isinstance(s, int) for s in ev.shape):
        return None
    if ev.numel() > limit:
        return None
    cone = _cone(node)
    try:
        _check_sources(cone)
        return run_constant_nodes(cone)[node]
    except _Refuse:
        return None


def run_constant_nodes(nodes: list[fx.Node], known: dict | None = None) -> dict:
    """Run ``nodes`` (graph order; each reads only the others, the ``known`` values and
    Python constants) on the CPU at their static sizes: node -> value.  Raises on a form
    it cannot run."""
    return _run_nodes(nodes, dict(known or {}), {}, None, 0)


# Boolean masks this pass ran whole (every row, in blocks) to check a predicate, kept for
# verification, which hoists the same values out of the region (``verify._hoist_constants``)
# instead of building them again; dropped once the graph's sites are verified.
_RAN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ran_value(node: fx.Node) -> torch.Tensor | None:
    """``node``'s whole value if a predicate check computed it, else None."""
    return _RAN.get(node)


def forget_values(graph: fx.Graph) -> None:
    """Drop the kept values of ``graph``'s nodes."""
    for n in [n for n in list(_RAN.keys()) if n.graph is graph]:
        _RAN.pop(n, None)


def analyze_position(node: fx.Node, nq, nk):
    """Read a numeric tensor built from index arithmetic (``k_pos - q_pos``,
    ``-(k - q).abs()``, bucketed forms with ``//`` and ``clamp``) as an integer-valued
    expression over ``Q``, ``K``, ``NQ``, ``NK``; None when it is not one.  Checked
    against the materialized tensor, like predicates."""
    from attnfx.predicate import evaluate_expr

    try:
        nq, nk = _raw(nq), _raw(nk)
        cone = _cone(node)
        _check_sources(cone)
        env: dict[fx.Node, _V] = {}
        for n in cone:
            env[n] = _eval_node(n, env)
        v = env[node]
        if v.is_bool or isinstance(v.expr, sympy.Piecewise) or v.expr.has(sympy.Piecewise):
            return None
        rank = len(v.shape)
        if any(v.expr.has(_D[j]) for j in range(2, rank)):
            return None
        if rank < 2 or not (_same(v.shape[-1], nk) and _same(v.shape[-2], nq)):
            return None  # a per-key or per-query term alone is not a position bias here
        expr = _canonical(v.expr.xreplace({_D[0]: K, _D[1]: Q}).xreplace(_size_map(nq, nk)))
        if expr.free_symbols - {Q, K, NQ, NK} or not expr.has(Q) or not expr.has(K):
            return None
        hints = _hints(cone)
        nq_v, nk_v = int(_raw(nq).xreplace(hints)), int(_raw(nk).xreplace(hints))

        def compare(got, rows):
            got = got.reshape((1,) * max(0, 2 - got.dim()) + tuple(got.shape))
            if got.shape[-1] not in (1, nk_v) or got.shape[-2] not in (1, len(rows)):
                raise _Refuse("position shape")
            got = got.expand(*got.shape[:-2], len(rows), nk_v)
            want = evaluate_expr(expr, rows[:, None], torch.arange(nk_v)[None, :], nq_v, nk_v)
            if got.is_floating_point() or want.is_floating_point():
                got, want = got.to(torch.float64), want.to(torch.float64)
            if not torch.equal(got, want.to(got.dtype).expand_as(got)):
                raise _Refuse("position disagrees with its expression")

        def check():
            if _numel_at(cone, hints) > _VERIFY_MAX_NUMEL:
                # a block of query rows at a time: no (NQ, NK) int64 temporaries
                _check_rows(node, cone, hints, nq_v, nk_v, compare)
            else:
                compare(_run_subgraph(node, cone, hints), torch.arange(nq_v))

        _prove("position index", check)
        return expr
    except Exception:  # noqa: BLE001 - not a form we read: the bias stays a tensor
        return None


def _numel_at(cone, assign) -> int:
    """The largest tensor of the cone, in elements, at the sizes ``assign``."""
    return max(
        (
            math.prod(int(_raw(d).xreplace(assign)) for d in n.meta["example_value"].shape)
            for n in cone
            if _is_tensor_node(n)
        ),
        default=1,
    )


def _hints(cone) -> dict:
    senv = _shape_env(cone)
    if senv is None:
        return {}
    return {s: int(v) for s, v in senv.backed_var_to_val.items()}


# ---------------------------------------------------------------------------------------
# the subgraph: what it reads, what dies with it
# ---------------------------------------------------------------------------------------


def _cone(root: fx.Node) -> list[fx.Node]:
    """Nodes the mask depends on, in graph order.  Scalars (SymInt sizes) are leaves:
    their value is read from ``example_value``, not recomputed."""
    seen, stack = {root}, [root]
    while stack:
        n = stack.pop()
        if not _is_tensor_node(n):
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _is_tensor_node(n: fx.Node) -> bool:
    return isinstance(n.meta.get("example_value"), torch.Tensor)


def _check_sources(cone: list[fx.Node]) -> None:
    for n in cone:
        if n.op == "placeholder" and _is_tensor_node(n):
            raise _Refuse(f"depends on tensor input {n.target}")
        if n.op == "get_attr":
            raise _Refuse(f"depends on parameter/buffer {n.target}")
        if n.op == "call_module":
            raise _Refuse(f"depends on module call {n.target}")
        if _is_tensor_node(n):
            # A tensor that something overwrites in place is seen, by its other users,
            # with the new contents: the graph's data flow no longer says what it holds.
            mutators = [u for u in n.users if _inplace(u) and u.args and u.args[0] is n]
            if mutators and len(n.users) > 1:
                raise _Refuse(f"{n.name} is mutated in place by {mutators[0].name}")


def _dead_nodes(root: fx.Node, cone: list[fx.Node]) -> frozenset[fx.Node]:
    """The root, and every node of the cone all of whose users are dead."""
    dead = {root}
    for n in reversed(cone):
        if n is root or n.op not in ("call_function", "call_method"):
            continue
        if n.users and all(u in dead for u in n.users):
            dead.add(n)
    return frozenset(dead)


# ---------------------------------------------------------------------------------------
# sympy helpers
# ---------------------------------------------------------------------------------------


def _is_boolean(e) -> bool:
    # not sympy's Boolean: a Symbol is one too
    return isinstance(e, (BooleanFunction, BooleanAtom, sympy.core.relational.Relational))


def _raw(x):
    """A size / scalar as a sympy expression over the graph's own size symbols."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _plain_sympy(x.node.expr)
    if isinstance(x, bool):
        return sympy.true if x else sympy.false
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, float):
        return _float(x)
    return sympy.sympify(x)


def _plain_sympy(e):
    """Torch's own sympy functions (``FloorDiv``, ``PythonMod``...) as plain sympy, which
    the predicate's printers and evaluator know."""
    from torch.utils._sympy import functions as tf

    rules = {
        tf.FloorDiv: lambda a, b: sympy.floor(a / b),
        tf.PythonMod: sympy.Mod,
        tf.Mod: sympy.Mod,
        tf.CeilDiv: lambda a, b: -sympy.floor(-a / b),
        tf.CleanDiv: lambda a, b: a / b,
        tf.Max: sympy.Max,
        tf.Min: sympy.Min,
        tf.Identity: lambda a: a,
    }
    for cls, fn in rules.items():
        e = e.replace(lambda x, cls=cls: isinstance(x, cls), lambda x, fn=fn: fn(*x.args))
    return e


def _float(x: float):
    if math.isnan(x):
        raise _Refuse("NaN constant in mask")
    if math.isinf(x):
        return sympy.oo if x > 0 else -sympy.oo
    if x == int(x):
        return sympy.Integer(int(x))
    return sympy.Rational(x)  # exact: the binary value of the double


def _same(a, b) -> bool:
    return a == b or sympy.simplify(a - b) == 0


def _branches(e) -> list[tuple[sympy.Expr, sympy.Basic]]:
    """``e`` as mutually exclusive ``(value, condition)`` pairs (Piecewise pulled out)."""
    e = sympy.piecewise_fold(e)
    if not isinstance(e, sympy.Piecewise):
        return [(e, sympy.true)]
    out, before = [], sympy.false
    for val, cond in e.args:
        here = sympy.And(cond, sympy.Not(before))
        out += [(v, sympy.And(here, c)) for v, c in _branches(val)]
        before = sympy.Or(before, cond)
    return out


def _rel(op, a, b):
    """``op(a, b)`` for number-valued expressions that may hold Piecewise values."""
    terms = []
    for va, ca in _branches(a):
        for vb, cb in _branches(b):
            terms.append(sympy.And(ca, cb, op(va, vb)))
    return sympy.Or(*terms)


def _nonzero(e):
    return _rel(sympy.Ne, e, 0)


def _indicator(b):
    return sympy.Piecewise((1, b), (0, True))


def _num(a):
    """Any operand as a number-valued expression (booleans become 0/1)."""
    if isinstance(a, _V):
        return _indicator(a.expr) if a.is_bool else a.expr
    if isinstance(a, (bool, int, float)):
        return _raw(int(a) if isinstance(a, bool) else a)
    raise _Refuse(f"operand {a!r} is not a number")


def _bool(a):
    """Any operand as a boolean expression (numbers: nonzero)."""
    if isinstance(a, _V):
        return a.expr if a.is_bool else _nonzero(a.expr)
    if isinstance(a, (bool, int, float)):
        return sympy.true if a else sympy.false
    raise _Refuse(f"operand {a!r} is not a boolean")


def _int(a):
    """A scalar argument (dim, diagonal, size) as a sympy integer expression."""
    e = _num(a)
    if not e.is_integer:
        raise _Refuse(f"expected an integer, got {e}")
    return e


def _canonical(e):
    """Negations pushed into relations, and ``|x| <= c`` split into ``-c <= x <= c``, so
    that ``classify`` sees windows as the conjunction of two bounds."""
    e = to_nnf(e, simplify=False) if _is_boolean(e) else e

    def split(r):
        if isinstance(r.rhs, sympy.Abs) and not isinstance(r.lhs, sympy.Abs):
            r = r.reversed
        x, c = r.lhs.args[0], r.rhs
        if c.has(Q) or c.has(K):
            return r
        if isinstance(r, sympy.LessThan):
            return sympy.And(x <= c, x >= -c)
        if isinstance(r, sympy.StrictLessThan):
            return sympy.And(x < c, x > -c)
        if isinstance(r, sympy.GreaterThan):
            return sympy.Or(x >= c, x <= -c)
        if isinstance(r, sympy.StrictGreaterThan):
            return sympy.Or(x > c, x < -c)
        return r

    def is_abs_rel(r):
        return isinstance(
            r, (sympy.LessThan, sympy.StrictLessThan, sympy.GreaterThan, sympy.StrictGreaterThan)
        ) and (isinstance(r.lhs, sympy.Abs) or isinstance(r.rhs, sympy.Abs))

    return e.replace(is_abs_rel, split)


def _size_map(nq, nk) -> dict:
    """Size symbols of the graph -> expressions in NQ / NK.

    ``nq`` / ``nk`` may be compound (``s0 + s1`` for keys with a cache): one symbol of each
    is solved for.  When both are the same symbol (self-attention) it becomes ``NK``; the
    two are equal wherever this graph runs, so either is right."""
    out: dict = {}
    for n, name in ((nk, NK), (nq, NQ)):
        n = n.xreplace(out)
        free = sorted(n.free_symbols - {NQ, NK}, key=str)
        if not free:
            continue
        sol = sympy.solve(sympy.Eq(n, name), free[0], dict=True)
        if len(sol) == 1:
            out[free[0]] = sol[0][free[0]]
            out = {s: v.xreplace(out) for s, v in out.items()}
    return out


# ---------------------------------------------------------------------------------------
# the symbolic evaluator
# ---------------------------------------------------------------------------------------

_INPLACE_OPERATORS = {
    operator.iadd: "add",
    operator.isub: "sub",
    operator.imul: "mul",
    operator.ifloordiv: "floordiv",
    operator.imod: "mod",
    operator.itruediv: "truediv",
    operator.iand: "and",
    operator.ior: "or",
    operator.ixor: "xor",
}
_REVERSIBLE = {"add", "sub", "mul", "floordiv", "mod", "truediv", "and", "or", "xor"}
_ALIASES = {
    "greater": "gt",
    "greater_equal": "ge",
    "less": "lt",
    "less_equal": "le",
    "not_equal": "ne",
    "absolute": "abs",
    "negative": "neg",
    "clip": "clamp",
    "divide": "div",
    "true_divide": "truediv",
    "multiply": "mul",
    "subtract": "sub",
    "remainder": "mod",
    "floor_divide": "floordiv",
    "not": "invert",
    "bitwise_not": "invert",
    "logical_not": "invert",
    "bitwise_and": "and",
    "logical_and": "and",
    "bitwise_or": "or",
    "logical_or": "or",
    "bitwise_xor": "xor",
    "logical_xor": "xor",
    "reshape": "view",
    "squeeze": "view",
    "unsqueeze": "view",
    "broadcast_to": "expand",
    "expand_as": "expand",
}


def _inplace(n: fx.Node) -> bool:
    if n.op == "call_method":
        return (
            n.target.endswith("_")
            and not n.target.startswith("__")
            and n.target != "requires_grad_"
        )
    if n.op == "call_function":
        if n.target in _INPLACE_OPERATORS or n.target is operator.setitem:
            return True
        name = getattr(n.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_") and _torch_fn(n.target, name)
    return False


def _torch_fn(t, name) -> bool:
    return getattr(torch, name, None) is t or getattr(torch.Tensor, name, None) is t


def _op(n: fx.Node) -> tuple[str, bool]:
    """The op's normalized name, and whether its first two arguments are swapped
    (reflected dunders like ``__rsub__``)."""
    t = n.target
    if n.op == "call_method":
        name = t
    elif n.target in _INPLACE_OPERATORS:
        return _INPLACE_OPERATORS[n.target], False
    else:
        name = getattr(t, "__name__", None)
        known = name and (
            getattr(operator, name, None) is t
            or _torch_fn(t, name)
            or getattr(builtins, name, None) is t
        )
        if not known:
            raise _Refuse(f"op {getattr(t, '__module__', '')}.{name or t} not understood")
    swapped = False
    if name.startswith("__r") and name.endswith("__") and name[3:-2] in _REVERSIBLE:
        name, swapped = name[3:-2], True
    name = name.strip("_")
    if name == "rsub":
        name, swapped = "sub", True
    return _ALIASES.get(name, name), swapped


def _eval_node(n: fx.Node, env: dict[fx.Node, _V]) -> _V:
    ev = n.meta.get("example_value")
    if not isinstance(ev, torch.Tensor):
        if isinstance(ev, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
            return _V(_raw(ev), (), isinstance(ev, (bool, torch.SymBool)))
        raise _Refuse(f"{n.name} has no tensor or scalar example_value ({type(ev).__name__})")
    if n.op not in ("call_function", "call_method"):
        raise _Refuse(f"unexpected {n.op} node {n.name}")
    name, swapped = _op(n)
    args = fx.node.map_arg(n.args, env.__getitem__)
    kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
    if swapped:
        args = (args[1], args[0], *args[2:])
    handler = _HANDLERS.get(name)
    if handler is None:
        raise _Refuse(f"op {name} ({n.format_node()}) not understood")
    shape = tuple(_raw(s) for s in ev.shape)
    expr = handler(name, args, kwargs, shape, ev.dtype)
    return _finish(expr, shape, ev.dtype)


def _finish(expr, shape, dtype) -> _V:
    """Bring the handler's result to the node's dtype; size-1 dims read index 0."""
    is_bool = dtype == torch.bool
    if isinstance(expr, _V):
        expr = expr.expr if expr.is_bool == is_bool else (_bool(expr) if is_bool else _num(expr))
    elif _is_boolean(expr) and not is_bool:
        expr = _indicator(expr)
    elif is_bool and not _is_boolean(expr):
        expr = _nonzero(expr)
    if not is_bool:
        expr = sympy.piecewise_fold(expr)
        if not dtype.is_floating_point and any(
            not (val.is_integer or val in (sympy.oo, -sympy.oo)) for val, _ in _branches(expr)
        ):
            raise _Refuse(f"non-integer values {expr} in an integer tensor")
    rank = len(shape)
    ones = {_D[rank - 1 - p]: sympy.S.Zero for p, s in enumerate(shape) if s == 1}
    extra = {d for d in expr.free_symbols if d in _D and _D.index(d) >= rank}
    if extra:
        raise _Refuse(f"internal: index variables {extra} beyond rank {rank}")
    return _V(expr.xreplace(ones) if ones else expr, shape, is_bool)


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


# -- sources ---------------------------------------------------------------------------


def _h_arange(name, args, kwargs, shape, dtype):
    pos = [a for a in args]
    if len(pos) == 1:
        start, end, step = kwargs.get("start", 0), pos[0], kwargs.get("step", 1)
    elif len(pos) >= 2:
        start, end = pos[0], pos[1]
        step = pos[2] if len(pos) > 2 else kwargs.get("step", 1)
    else:
        start, step = kwargs.get("start", 0), kwargs.get("step", 1)
    del end  # the length is in the node's shape
    return _num(start) + _num(step) * _D[0]


def _h_fill(name, args, kwargs, shape, dtype):
    if name in ("ones", "ones_like", "new_ones"):
        return sympy.Integer(1)
    if name in ("zeros", "zeros_like", "new_zeros"):
        return sympy.Integer(0)
    if name == "full":
        return _num(_arg(args, kwargs, 1, "fill_value"))
    if name in ("full_like", "new_full"):
        return _num(_arg(args, kwargs, 1, "fill_value"))
    if name == "scalar_tensor":
        return _num(args[0])
    if name == "tensor":
        if isinstance(args[0], (bool, int, float, _V)):
            return _num(args[0])
        raise _Refuse("torch.tensor of non-scalar data")
    raise AssertionError(name)


def _h_eye(name, args, kwargs, shape, dtype):
    return sympy.Eq(_D[0], _D[1])


# -- arithmetic --------------------------------------------------------------------------


def _floordiv(x, y):
    if y == 0:
        raise _Refuse("floor division by zero")
    return sympy.floor(x / y)


def _h_binary(name, args, kwargs, shape, dtype):
    x, y = _num(args[0]), _num(_arg(args, kwargs, 1, "other"))
    if name == "add":
        return x + y * _num(kwargs.get("alpha", 1))
    if name == "sub":
        return x - y * _num(kwargs.get("alpha", 1))
    if name == "mul":
        return x * y
    if name == "floordiv":
        return _floordiv(x, y)
    if name == "mod":
        if y == 0:
            raise _Refuse("modulo by zero")
        return sympy.Mod(x, y)  # floored, like torch.remainder and Python
    if name in ("truediv", "div"):
        mode = kwargs.get("rounding_mode")
        if mode == "floor":
            return _floordiv(x, y)
        if mode is not None:
            raise _Refuse(f"division with rounding_mode={mode!r}")
        return x / y
    if name == "minimum":
        return sympy.Min(x, y)
    if name == "maximum":
        return sympy.Max(x, y)
    raise AssertionError(name)


def _h_unary(name, args, kwargs, shape, dtype):
    x = _num(args[0])
    if name == "neg":
        return -x
    if name == "pos":
        return x
    return sympy.Abs(x)


def _h_clamp(name, args, kwargs, shape, dtype):
    x = _num(args[0])
    lo = _arg(args, kwargs, 1, "min") if name != "clamp_max" else None
    hi = _arg(args, kwargs, 2, "max") if name == "clamp" else None
    if name == "clamp_max":
        hi = _arg(args, kwargs, 1, "max")
    if lo is not None:
        x = sympy.Max(x, _num(lo))
    if hi is not None:
        x = sympy.Min(x, _num(hi))
    return x


# -- comparisons and logic ---------------------------------------------------------------

_RELS = {
    "lt": sympy.Lt,
    "le": sympy.Le,
    "gt": sympy.Gt,
    "ge": sympy.Ge,
    "eq": sympy.Eq,
    "ne": sympy.Ne,
}


def _h_compare(name, args, kwargs, shape, dtype):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if all(isinstance(x, _V) and x.is_bool for x in (a, b)) and name in ("eq", "ne"):
        eq = sympy.Equivalent(a.expr, b.expr)
        return eq if name == "eq" else sympy.Not(eq)
    return _rel(_RELS[name], _num(a), _num(b))


def _h_logic(name, args, kwargs, shape, dtype):
    vals = list(args[:2]) if name != "invert" else [args[0]]
    if dtype != torch.bool:
        # bitwise ops on integers are not logic ops (logical_* on numbers give bool)
        raise _Refuse(f"bitwise {name} on {dtype} tensors")
    bs = [_bool(v) for v in vals]
    if name == "invert":
        return sympy.Not(bs[0])
    if name == "and":
        return sympy.And(*bs)
    if name == "or":
        return sympy.Or(*bs)
    return sympy.Xor(*bs)


# -- selection ---------------------------------------------------------------------------


def _h_tri(name, args, kwargs, shape, dtype):
    x = args[0]
    k = _int(_arg(args, kwargs, 1, "diagonal", 0))
    col, row = _D[0], _D[1]
    keep = col - row <= k if name == "tril" else col - row >= k
    if x.is_bool:
        return sympy.And(x.expr, keep)
    return sympy.Piecewise((x.expr, keep), (0, True))


def _select(cond, a, b, dtype):
    if dtype == torch.bool:
        c = _bool(cond)
        return sympy.Or(sympy.And(c, _bool(a)), sympy.And(sympy.Not(c), _bool(b)))
    return sympy.Piecewise((_num(a), _bool(cond)), (_num(b), True))


def _h_where(name, args, kwargs, shape, dtype):
    if len(args) + len(kwargs) < 3:
        raise _Refuse("torch.where with one argument (indices)")
    return _select(args[0], _arg(args, kwargs, 1, "input"), _arg(args, kwargs, 2, "other"), dtype)


def _h_masked_fill(name, args, kwargs, shape, dtype):
    x, mask, value = args[0], _arg(args, kwargs, 1, "mask"), _arg(args, kwargs, 2, "value")
    return _select(mask, value, x, dtype)


# -- shapes ------------------------------------------------------------------------------


def _rename(v: _V, mapping: dict) -> sympy.Basic:
    return v.expr.xreplace(mapping)


def _h_view(name, args, kwargs, shape, dtype):
    """Reshapes that only insert or drop size-1 dims: pair the other dims in order."""
    x = args[0]
    src = [(len(x.shape) - 1 - p, s) for p, s in enumerate(x.shape) if s != 1]
    dst = [(len(shape) - 1 - p, s) for p, s in enumerate(shape) if s != 1]
    if len(src) != len(dst) or not all(_same(a[1], b[1]) for a, b in zip(src, dst, strict=True)):
        raise _Refuse(f"{name} from {list(x.shape)} to {list(shape)} merges or splits dims")
    return _rename(x, {_D[a[0]]: _D[b[0]] for a, b in zip(src, dst, strict=True)})


def _h_expand(name, args, kwargs, shape, dtype):
    # Only size-1 dims grow, and size-1 dims carry no index variable: nothing to rename.
    return args[0].expr


def _h_permute(name, args, kwargs, shape, dtype):
    x = args[0]
    r = len(x.shape)
    if name == "permute":
        dims = (
            args[1:]
            if not isinstance(_arg(args, kwargs, 1, "dims"), (tuple, list))
            else _arg(args, kwargs, 1, "dims")
        )
        perm = [int(_int(d)) % r for d in dims]
    else:
        perm = list(range(r))
        if name == "t" and r < 2:
            return x.expr
        a, b = (
            (-2, -1)
            if name == "t"
            else (_arg(args, kwargs, 1, "dim0"), _arg(args, kwargs, 2, "dim1"))
        )
        a, b = int(_int(a)) % r, int(_int(b)) % r
        perm[a], perm[b] = perm[b], perm[a]
    return _rename(x, {_D[r - 1 - perm[p]]: _D[r - 1 - p] for p in range(r)})


def _h_getattr(name, args, kwargs, shape, dtype):
    """``x.T`` (all dims reversed) and ``x.mT`` (last two swapped)."""
    x, attr = args[0], args[1]
    r = len(x.shape)
    if attr == "T":
        return _rename(x, {_D[j]: _D[r - 1 - j] for j in range(r)})
    if attr == "mT" and r >= 2:
        return _rename(x, {_D[0]: _D[1], _D[1]: _D[0]})
    raise _Refuse(f"attribute .{attr} not understood")


def _h_getitem(name, args, kwargs, shape, dtype):
    x, idx = args[0], args[1]
    if not isinstance(x, _V) or not x.shape:
        raise _Refuse("indexing a non-tensor")
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, _V) and i.shape for i in idx):
        raise _Refuse("advanced indexing with a tensor")
    n_used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    r = len(x.shape)
    if n_used > r:
        raise _Refuse("too many indices")
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (r - n_used) + idx[e + 1 :]
    else:
        idx = idx + (slice(None),) * (r - n_used)
    in_pos = out_pos = 0
    mapping_pos = {}  # input position -> expression in output positions
    for i in idx:
        if i is None:
            out_pos += 1
        elif isinstance(i, slice):
            size = x.shape[in_pos]
            step = _int(i.step) if i.step is not None else sympy.Integer(1)
            if not step.is_positive:
                raise _Refuse("slice with a non-positive step")
            start = _int(i.start) if i.start is not None else sympy.Integer(0)
            if start.is_negative:
                start = sympy.Max(start + size, 0)
            mapping_pos[in_pos] = ("out", out_pos, start, step)
            in_pos += 1
            out_pos += 1
        else:
            k = _int(i)
            if k.is_negative:
                k = k + x.shape[in_pos]
            mapping_pos[in_pos] = ("const", k)
            in_pos += 1
    ro = len(shape)
    if out_pos != ro:
        raise _Refuse(f"internal: getitem rank {out_pos} != {ro}")
    sub = {}
    for p, m in mapping_pos.items():
        var = _D[r - 1 - p]
        if m[0] == "const":
            sub[var] = m[1]
        else:
            _, q, start, step = m
            sub[var] = start + step * _D[ro - 1 - q]
    return _rename(x, sub)


def _h_identity(name, args, kwargs, shape, dtype):
    return args[0]  # dtype conversion happens in _finish


_HANDLERS = {
    "arange": _h_arange,
    **dict.fromkeys(
        [
            "ones",
            "zeros",
            "full",
            "ones_like",
            "zeros_like",
            "full_like",
            "new_ones",
            "new_zeros",
            "new_full",
            "scalar_tensor",
            "tensor",
        ],
        _h_fill,
    ),
    "eye": _h_eye,
    **dict.fromkeys(
        ["add", "sub", "mul", "floordiv", "mod", "truediv", "div", "minimum", "maximum"], _h_binary
    ),
    **dict.fromkeys(["neg", "pos", "abs"], _h_unary),
    **dict.fromkeys(["clamp", "clamp_min", "clamp_max"], _h_clamp),
    **dict.fromkeys(_RELS, _h_compare),
    **dict.fromkeys(["and", "or", "xor", "invert"], _h_logic),
    **dict.fromkeys(["tril", "triu"], _h_tri),
    "where": _h_where,
    "masked_fill": _h_masked_fill,
    "view": _h_view,
    "flatten": _h_view,
    "expand": _h_expand,
    **dict.fromkeys(["permute", "transpose", "t", "swapaxes", "swapdims"], _h_permute),
    "getitem": _h_getitem,
    "getattr": _h_getattr,
    **dict.fromkeys(
        [
            "to",
            "type",
            "type_as",
            "bool",
            "int",
            "long",
            "short",
            "byte",
            "char",
            "float",
            "double",
            "half",
            "bfloat16",
            "contiguous",
            "clone",
            "detach",
            "cpu",
            "cuda",
            "requires_grad",
            "alias",
        ],
        _h_identity,
    ),
}


# ---------------------------------------------------------------------------------------
# verification: run the subgraph eagerly and compare with the predicate
# ---------------------------------------------------------------------------------------


def _shape_env(cone):
    for n in cone:
        ev = n.meta.get("example_value")
        vals = list(ev.shape) if isinstance(ev, torch.Tensor) else [ev]
        for s in vals:
            if isinstance(s, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                return s.node.shape_env
    return None


def _verify(pred: MaskPredicate, root: fx.Node, cone: list[fx.Node], nq, nk) -> None:
    syms = set(nq.free_symbols) | set(nk.free_symbols)
    for n in cone:
        ev = n.meta["example_value"]
        for s in list(ev.shape) if isinstance(ev, torch.Tensor) else [ev]:
            syms |= _raw(s).free_symbols if not isinstance(s, torch.Tensor) else set()
    senv = _shape_env(cone)
    hints = {}
    for s in syms:
        h = senv.backed_var_to_val.get(s) if senv is not None else None
        if h is None:
            return  # no hint: nothing concrete to check against
        hints[s] = int(h)

    def biggest(assign):
        sizes = [
            math.prod(int(_raw(d).xreplace(assign)) for d in n.meta["example_value"].shape)
            for n in cone
            if _is_tensor_node(n)
        ]
        return max(sizes, default=1)

    assign = hints
    if biggest(assign) > _VERIFY_MAX_NUMEL:
        # Symbolic sizes: the subgraph computes the same function at any sizes, so check
        # it at small ones.  Static sizes that large run a block of rows at a time.
        small = {
            s: v for s, v in zip(sorted(syms, key=str), (13, 17, 19, 23, 29, 31, 37), strict=False)
        }
        if len(small) == len(syms) and biggest(small) <= _VERIFY_MAX_NUMEL:
            assign = small
        else:
            # Static sizes: run the subgraph at them, a block of query rows at a time.
            _verify_rows(pred, root, cone, hints, int(nq.xreplace(hints)), int(nk.xreplace(hints)))
            return
    try:
        out = _run_subgraph(root, cone, assign)
        nq_v, nk_v = int(nq.xreplace(assign)), int(nk.xreplace(assign))
        expected = pred.materialize(nq_v, nk_v)
        got = out if out.dtype == torch.bool else out != 0
        target = torch.broadcast_shapes(got.shape, expected.shape)
        ok = target[-2:] == (nq_v, nk_v) and torch.equal(
            got.expand(target), expected.expand(target)
        )
    except _Refuse:
        raise
    except Exception as e:
        raise _Refuse(f"could not verify the predicate: {type(e).__name__}: {e}") from e
    if not ok:
        raise _Refuse("predicate disagrees with materialized mask")
    if assign is hints and out.dtype == torch.bool:
        _RAN[root] = out  # (the value at the graph's own sizes)


def _scalar_at(ev, assign):
    """A scalar node's value (a SymInt size, a Python constant) at the sizes ``assign``."""
    e = _raw(ev).xreplace(assign)
    if isinstance(ev, (bool, torch.SymBool)):
        return bool(e)
    return int(e) if sympy.sympify(e).is_integer else float(e)


def _run_subgraph(root: fx.Node, cone: list[fx.Node], assign: dict) -> torch.Tensor:
    """Copy the cone into a graph of its own, sizes replaced by concrete values and
    devices by the CPU, and run it."""
    g = fx.Graph()
    env: dict = {}
    cpu = torch.device("cpu")

    def concrete(x):
        if isinstance(x, torch.device):
            return cpu
        return x

    for n in cone:
        ev = n.meta["example_value"]
        if not isinstance(ev, torch.Tensor):
            env[n] = _scalar_at(ev, assign)
            continue
        new = g.node_copy(n, lambda a: env[a])
        new.args = fx.node.map_aggregate(new.args, concrete)
        new.kwargs = fx.node.map_aggregate(new.kwargs, concrete)
        if n.op == "call_method" and n.target == "cuda":
            new.target = "cpu"
        env[n] = new
    g.output(env[root])
    with torch.no_grad():
        return fx.GraphModule(torch.nn.Module(), g)()


# Row-blocked verification of masks too large to run whole (static sizes).  Every query
# row is checked up to this many (query, key) pairs; beyond, the first and last rows and
# a seeded draw of the others.
_VERIFY_ALL_ROWS_PAIRS = 1 << 28
_VERIFY_SAMPLED_ROWS = 8192
# Elements of a large tensor computed per block of rows (32 MB of int64 temporaries each).
_ROWS_BLOCK_NUMEL = 1 << 22
_VERIFY_EDGE_ROWS = 512
# Ops a too-large tensor of the cone may come from: elementwise (each output row reads
# the same rows of its broadcast inputs), fills, tril/triu, casts, expands and views that
# only add or drop leading size-1 dims.
_ROW_ELEMENTWISE = {"add", "sub", "mul", "floordiv", "mod", "truediv", "div", "minimum",
                    "maximum", "neg", "pos", "abs", "clamp", "clamp_min", "clamp_max",
                    "and", "or", "xor", "invert", "where", "masked_fill", *_RELS}  # fmt: skip
_ROW_FILLS = {"ones", "zeros", "full", "new_ones", "new_zeros", "new_full"}
_ROW_LIKE = {"ones_like", "zeros_like", "full_like"}
_ROW_VIEWS = {"view", "flatten", "getitem"}


def _verify_rows(pred: MaskPredicate, root: fx.Node, cone: list[fx.Node], assign, nq, nk):
    """Check the subgraph against ``pred`` at its own (static) sizes without holding a
    (NQ, NK) tensor (``_check_rows``)."""
    _check_rows(
        root, cone, assign, nq, nk, lambda got, rows: _compare_rows(pred, got, rows, nq, nk)
    )


def _check_rows(root: fx.Node, cone: list[fx.Node], assign, nq, nk, compare) -> None:
    """Run the subgraph at its own (static) sizes without holding a (NQ, NK) tensor:
    tensors of the cone up to the size limit are computed whole, the larger ones (which
    must be row-wise: ``_ROW_*``, with the query axis at dim -2) a block of query rows
    at a time, each block handed to ``compare(value, rows)`` (which raises ``_Refuse``)."""
    shapes = {
        n: tuple(int(_raw(d).xreplace(assign)) for d in n.meta["example_value"].shape)
        for n in cone
        if _is_tensor_node(n)
    }
    big = [n for n in cone if n in shapes and math.prod(shapes[n]) > _VERIFY_MAX_NUMEL]
    big_set = set(big)
    for n in cone:
        if n in big_set:
            name = _op(n)[0]
            sh = shapes[n]
            if (
                len(sh) < 2
                or sh[-2] != nq
                or not (
                    name in _ROW_ELEMENTWISE
                    or name in _ROW_FILLS | _ROW_LIKE | {"tril", "triu", "expand"}
                    or _HANDLERS.get(name) is _h_identity
                    or (name in _ROW_VIEWS and _leading_ones_only(shapes, n))
                )
            ):
                raise _Refuse("mask too large to verify")
        elif any(a in big_set for a in n.all_input_nodes):
            raise _Refuse("mask too large to verify")  # a reduction of a large tensor
    small = [n for n in cone if n not in big_set]
    env = _run_nodes(small, {}, assign, None, nq)
    if root not in big_set:  # small enough after all (a broadcast mask): check it whole
        compare(env[root], torch.arange(nq))
        return
    batch = max(1, math.prod(shapes[root]) // nq)
    per = max(1, min(_ROWS_BLOCK_NUMEL, _VERIFY_MAX_NUMEL) // batch)
    if nq * nk <= _VERIFY_ALL_ROWS_PAIRS:
        rows = torch.arange(nq)
    else:
        g = torch.Generator().manual_seed(0)
        e = min(nq, _VERIFY_EDGE_ROWS)
        edge = torch.cat([torch.arange(e), torch.arange(nq - e, nq)])
        draw = torch.randint(0, nq, (_VERIFY_SAMPLED_ROWS,), generator=g)
        rows = torch.unique(torch.cat([edge, draw]))
    whole = nq * nk <= _VERIFY_ALL_ROWS_PAIRS and root.meta["example_value"].dtype == torch.bool
    blocks = []
    for block in rows.split(per):
        got = _run_nodes(big, env, assign, block, nq, keep=(root,))[root]
        compare(got, block)
        if whole:
            blocks.append(got)
    if whole and blocks:
        value = torch.cat(blocks, dim=-2)
        if tuple(value.shape) == shapes[root]:
            _RAN[root] = value


def _leading_ones_only(shapes, n: fx.Node) -> bool:
    """A view of a large tensor that keeps its last two dims and only adds or drops
    size-1 dims before them."""
    (src,) = [a for a in n.all_input_nodes if a in shapes][:1] or [None]
    if src is None:
        return False
    a, b = shapes[src], shapes[n]
    return a[-2:] == b[-2:] and all(d == 1 for d in a[:-2] + b[:-2])


def _compare_rows(pred: MaskPredicate, got: torch.Tensor, rows, nq: int, nk: int) -> None:
    got = got if got.dtype == torch.bool else got != 0
    got = got.reshape((1,) * max(0, 2 - got.dim()) + tuple(got.shape))
    if got.shape[-1] not in (1, nk) or got.shape[-2] not in (1, len(rows)):
        raise _Refuse("could not verify the predicate: mask shape")
    got = got.expand(*got.shape[:-2], len(rows), nk)
    want = torch.as_tensor(pred.evaluate(rows[:, None], torch.arange(nk)[None, :], nq, nk))
    if not torch.equal(got, want.to(torch.bool).expand_as(got)):
        raise _Refuse("predicate disagrees with materialized mask")


def _run_nodes(nodes, env: dict, assign, rows, nq: int, keep=None) -> dict:
    """Run ``nodes`` (in graph order) eagerly on the CPU at sizes ``assign``.  With
    ``rows``, each node computes only those query rows (dim -2): its tensor inputs that
    span the query axis at dim -2 are cut to them, and sizes it creates at dim -2 are
    ``len(rows)``.  With ``keep``: only those nodes' values are returned (of ``nodes``),
    each other value dropped after its last use (a block's temporaries do not pile up)."""
    env = dict(env)
    cpu = torch.device("cpu")
    cut = {}  # nodes already holding only ``rows``
    last: dict = {}
    if keep is not None:
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last[a] = i
        done_at: dict = {}
        for a, i in last.items():
            if a not in keep:
                done_at.setdefault(i, []).append(a)
        own = set(nodes)

    def value(a):
        if isinstance(a, torch.device):
            return cpu
        return a

    def restrict(x, node):
        if rows is None or not isinstance(x, torch.Tensor) or node in cut:
            return x
        if x.dim() >= 2 and x.shape[-2] == nq and nq != 1:
            return x.index_select(-2, rows)
        return x

    def resize(sizes):
        sizes = (
            list(sizes[0])
            if len(sizes) == 1 and isinstance(sizes[0], (list, tuple))
            else list(sizes)
        )
        if len(sizes) >= 2 and int(sizes[-2]) in (nq, -1):
            sizes[-2] = len(rows)
        return sizes

    try:
        for i, n in enumerate(nodes):
            if keep is not None:  # values whose last use was the node before
                for a in done_at.get(i - 1, ()):
                    if a in own:
                        env.pop(a, None)
            ev = n.meta["example_value"]
            if not isinstance(ev, torch.Tensor):
                env[n] = _scalar_at(ev, assign)
                continue
            if n.op not in ("call_function", "call_method"):
                raise _Refuse(f"unexpected {n.op} node {n.name}")
            args = fx.node.map_aggregate(
                fx.node.map_arg(n.args, lambda a: restrict(env[a], a)), value
            )
            kwargs = fx.node.map_aggregate(
                fx.node.map_arg(n.kwargs, lambda a: restrict(env[a], a)), value
            )
            name = _op(n)[0] if rows is not None else None
            target = "cpu" if n.op == "call_method" and n.target == "cuda" else n.target
            if rows is not None and name in _ROW_FILLS:
                lead = 1 if name.startswith("new_") else 0
                size_args = (
                    args[lead:]
                    if name in ("ones", "zeros", "new_ones", "new_zeros")
                    else (args[lead],)
                )
                if "size" in kwargs:
                    kwargs["size"] = resize((kwargs["size"],))
                else:
                    rest = (
                        ()
                        if name in ("ones", "zeros", "new_ones", "new_zeros")
                        else args[lead + 1 :]
                    )
                    args = (*args[:lead], resize(size_args), *rest)
            elif rows is not None and name == "expand":
                if not (args[1:] and isinstance(args[1], torch.Tensor)):  # expand_as: cut
                    args = (args[0], resize(args[1:]))
            elif rows is not None and name in ("tril", "triu"):
                x = args[0]
                d = int(_arg(args, kwargs, 1, "diagonal", 0))
                off = torch.arange(x.shape[-1])[None, :] - rows[:, None]
                keep = off <= d if name == "tril" else off >= d
                env[n] = torch.where(keep, x, torch.zeros((), dtype=x.dtype))
                cut[n] = True
                continue
            elif rows is not None and name in _ROW_VIEWS:
                x = args[0]
                env[n] = x.reshape(*(1,) * (len(ev.shape) - 2), x.shape[-2], x.shape[-1])
                cut[n] = True
                continue
            with torch.no_grad():
                if n.op == "call_method":
                    out = getattr(args[0], target)(*args[1:], **kwargs)
                else:
                    out = target(*args, **kwargs)
            env[n] = out
            if rows is not None:
                cut[n] = True

    except _Refuse:
        raise
    except Exception as e:
        raise _Refuse(f"could not verify the predicate: {type(e).__name__}: {e}") from e
    return env
