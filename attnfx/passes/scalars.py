"""Scalars built from constants and sequence lengths, read back as sympy expressions.

Sigmoid attention's bias ``-log(n)``, a scale ``1 / sqrt(d)`` computed from a size, a
scalar tensor ``torch.full([], d ** 0.5)``: each is a number at one shape and a function
of the sequence length in general.  ``scalar_expr`` returns it as an expression in
``NQ`` / ``NK`` (the spec keeps it symbolic, so one kernel serves every length) and, under
``dynamic=True``, the head dim ``D`` (``spec.HEAD_DIM``, resolved when the op runs), or
None when the value depends on anything else (a tensor's contents, another size).
"""

from __future__ import annotations

import math
import operator

import sympy
import torch
import torch.fx as fx

from attnfx.passes import graph as G
from attnfx.predicate import NK, NQ
from attnfx.spec import HEAD_DIM

_UNARY = {
    math.log: sympy.log,
    torch.log: sympy.log,
    "log": sympy.log,
    math.sqrt: sympy.sqrt,
    torch.sqrt: sympy.sqrt,
    "sqrt": sympy.sqrt,
    torch.rsqrt: lambda x: 1 / sympy.sqrt(x),
    "rsqrt": lambda x: 1 / sympy.sqrt(x),
    math.exp: sympy.exp,
    torch.exp: sympy.exp,
    "exp": sympy.exp,
    operator.neg: lambda x: -x,
    torch.neg: lambda x: -x,
    "neg": lambda x: -x,
    torch.reciprocal: lambda x: 1 / x,
    "reciprocal": lambda x: 1 / x,
    math.log2: lambda x: sympy.log(x, 2),
    torch.log2: lambda x: sympy.log(x, 2),
    "log2": lambda x: sympy.log(x, 2),
}
_BINARY = {
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.truediv: operator.truediv,
    operator.pow: operator.pow,
    torch.add: operator.add,
    torch.sub: operator.sub,
    torch.mul: operator.mul,
    torch.div: operator.truediv,
    torch.pow: operator.pow,
}
_PASS = {
    "to",
    "float",
    "half",
    "bfloat16",
    "double",
    "type_as",
    "item",
    "squeeze",
    "reshape",
    "view",
    "contiguous",
}


def _sym(x):
    """sympy expression of a SymInt / SymFloat, or of a Python number."""
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        return x.node.expr
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, float):
        return sympy.Float(x) if not x.is_integer() else sympy.Integer(int(x)) * sympy.Float(1.0)
    return None


def _size_sym(x):
    return (
        x.node.expr
        if isinstance(x, torch.SymInt)
        else (sympy.Integer(x) if isinstance(x, int) else None)
    )


def scalar_expr(x, nq, nk, depth: int = 0, d=None):
    """``x`` (a constant, a size node or a small scalar subgraph) as a sympy expression
    in NQ and NK (and D, when ``d``, q's head dim, is given); None if it is not one."""
    if depth > 24:
        return None
    if not isinstance(x, fx.Node):
        e = _sym(x)
        return _to_lengths(e, nq, nk, d) if e is not None else None
    ev = G.example_value(x)
    if isinstance(ev, torch.Tensor) and ev.numel() != 1:
        return None
    if isinstance(ev, torch.SymFloat) and _float_inputs_only(ev.node.expr):
        # dynamic=True makes a float attribute (a module's ``scaling``) a graph input.
        # Reading it guards the graph on its value, as SDPA's scale argument already is;
        # Dynamo then retraces with the float a constant (``RestartAnalysis``).
        return sympy.Float(float(ev))
    if isinstance(ev, (torch.SymInt, torch.SymFloat)) and x.op != "placeholder":
        return _to_lengths(ev.node.expr, nq, nk, d)
    if isinstance(ev, (torch.SymInt, torch.SymFloat)):
        return _to_lengths(ev.node.expr, nq, nk, d)
    if x.op not in ("call_function", "call_method"):
        return None
    t, args = x.target, x.args
    rec = lambda a: scalar_expr(a, nq, nk, depth + 1, d)  # noqa: E731
    if (t in (torch.tensor, torch.scalar_tensor, torch.as_tensor) or _named(t, "tensor")) and args:
        return _round(rec(args[0]), x)
    if t is torch.full and len(args) >= 2 and tuple(args[0]) in ((), (1,)):
        return _round(rec(args[1]), x)
    if isinstance(t, str) and t in _PASS:
        return rec(args[0])
    try:
        hash(t)
    except TypeError:
        return None
    if t in _UNARY and len(args) == 1:
        a = rec(args[0])
        return None if a is None else _UNARY[t](a)
    if t in _BINARY and len(args) == 2:
        a, b = rec(args[0]), rec(args[1])
        return None if a is None or b is None else _BINARY[t](a, b)
    if t == "size" and len(args) == 2:
        sh = G.shape(args[0])
        if sh is not None and isinstance(args[1], int):
            return _to_lengths(_size_sym(sh[args[1]]), nq, nk, d)
    return None


def _float_inputs_only(e) -> bool:
    """Whether ``e`` has symbols and all are floats Dynamo made inputs (not sizes)."""
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    syms = getattr(e, "free_symbols", set())
    return bool(syms) and all(symbol_is_type(s, SymT.FLOAT) for s in syms)


def _named(t, name: str) -> bool:
    """Dynamo wraps some torch factories (``torch.tensor``) in functions of the same name."""
    return (
        callable(t)
        and getattr(t, "__name__", None) == name
        and "torch" in (getattr(t, "__module__", "") or "")
    )


def _round(e, node):
    """A constant stored in a low-precision tensor holds the rounded value."""
    if e is None or e.free_symbols:
        return e
    dt = G.dtype(node)
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        return sympy.Float(torch.tensor(float(e), dtype=dt).item())
    return e


_TORCH_SYMPY = {
    "ToFloat": lambda x: x,
    "Identity": lambda x: x,
    "FloatPow": operator.pow,
    "PowByNatural": operator.pow,
    "FloatTrueDiv": operator.truediv,
    "IntTrueDiv": operator.truediv,
    "OpaqueUnaryFn_log2": lambda x: sympy.log(x, 2),
}


def _plain(e):
    """``e`` with torch's own sympy functions (Dynamo writes ``d ** -0.5`` as
    ``FloatPow(ToFloat(s0), -0.5)``, ``math.sqrt(d)`` as ``OpaqueUnaryFn_sqrt``) replaced
    by plain sympy, which a spec key round-trips; None if one has no plain counterpart."""
    if not e.args:
        return e
    args = [_plain(a) for a in e.args]
    if any(a is None for a in args):
        return None
    name = type(e).__name__
    if name in _TORCH_SYMPY:
        return _TORCH_SYMPY[name](*args)
    if name.startswith("OpaqueUnaryFn_") and hasattr(sympy, name.removeprefix("OpaqueUnaryFn_")):
        return getattr(sympy, name.removeprefix("OpaqueUnaryFn_"))(*args)
    if (type(e).__module__ or "").startswith("torch"):
        return None
    return e.func(*args)


def _to_lengths(e, nq, nk, d=None):
    """Rename size symbols to NQ / NK (and q's head dim to D); None if any other symbol
    remains.  A symbol shared by a length and the head dim (Dynamo gives equal sizes one
    symbol) stays a length: the graph is guarded on their equality either way."""
    if e is None:
        return None
    e = _plain(sympy.sympify(e))
    if e is None or not e.free_symbols:
        return e
    mapping = {}
    for n, name in ((nk, NK), (nq, NQ), (d, HEAD_DIM)):
        s = _size_sym(n) if not isinstance(n, sympy.Basic) else n
        if isinstance(s, sympy.Symbol) and s not in mapping:
            mapping[s] = name
    out = e.xreplace(mapping)
    if out.free_symbols - {NQ, NK, HEAD_DIM}:
        return None
    return out


def as_float(e) -> float | None:
    """The value of an expression free of symbols."""
    if e is None or e.free_symbols:
        return None
    try:
        return float(e)
    except TypeError:
        return None
