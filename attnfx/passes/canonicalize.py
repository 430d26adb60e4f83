"""Canonicalize: bring the surface forms of the ops attention is written with to one form.

Dynamo hands over a torch-level graph in which the same computation has many spellings
(``q @ k``, ``torch.matmul``, ``torch.bmm``, ``Tensor.matmul``, ``einsum``; ``k.mT``,
``k.transpose(-2, -1)``, ``torch.transpose``; ``F.softmax``, ``Tensor.softmax`` ...).
This pass rewrites each into one canonical call, so that the recognizers are written
once.  Every rewrite is an exact identity (same values, same dtype, same strides), so it
is also safe for the parts of the graph no recognizer takes.

Canonical forms:
    torch.matmul(a, b)           matmul, bmm, @, einsum("...qd,...kd->...qk"), baddbmm (split)
    torch.transpose(x, d0, d1)   transpose, swapaxes, .mT, .T on 2-D
    torch.permute(x, dims)       permute
    torch.softmax(x, dim, dtype) softmax in all spellings
    operator.mul / truediv / add / sub   the torch.* and Tensor.* arithmetic
    torch.masked_fill(x, m, v)   masked_fill
    torch.where(c, a, b)
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
import torch.nn.functional as F

from attnfx.passes import graph as G
from attnfx.passes.graph import example_value, set_example_value

_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__"}
_SOFTMAX = {torch.softmax, F.softmax, torch.nn.functional.softmax, torch.special.softmax, "softmax"}
_TRANSPOSE = {torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes", "swapdims"}
_ARITH = {
    operator.mul: operator.mul,
    torch.mul: operator.mul,
    torch.multiply: operator.mul,
    "mul": operator.mul,
    "__mul__": operator.mul,
    operator.truediv: operator.truediv,
    torch.div: operator.truediv,
    torch.true_divide: operator.truediv,
    "div": operator.truediv,
    "true_divide": operator.truediv,
    "__truediv__": operator.truediv,
    operator.add: operator.add,
    torch.add: operator.add,
    "add": operator.add,
    "__add__": operator.add,
    operator.sub: operator.sub,
    torch.sub: operator.sub,
    "sub": operator.sub,
    "__sub__": operator.sub,
}


def _key(node: fx.Node):
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return node.target
    return None


def canonicalize(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place; return the number of nodes changed."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        try:
            changed += _canonicalize_node(gm, node)
        except _Skip:
            continue
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


class _Skip(Exception):
    pass


def _canonicalize_node(gm, node) -> int:
    t = _key(node)
    if not G.hashable(t):
        return 0
    args, kwargs = list(node.args), dict(node.kwargs)

    if t in _MATMULS and len(args) == 2 and not kwargs:
        if node.op == "call_function" and t is torch.matmul:
            return 0
        _replace_call(node, torch.matmul, tuple(args))
        return 1

    if t in _SOFTMAX:
        x = args[0] if args else kwargs.pop("input", None)
        dim = args[1] if len(args) > 1 else kwargs.pop("dim", None)
        dtype = args[2] if len(args) > 2 else kwargs.pop("dtype", None)
        kwargs.pop("_stacklevel", None)
        if x is None or dim is None or kwargs:
            return 0
        if (
            node.op == "call_function"
            and t is torch.softmax
            and node.kwargs.get("dtype") == dtype
            and len(args) == 2
        ):
            return 0
        _replace_call(node, torch.softmax, (x, dim), {"dtype": dtype})
        return 1

    if t in _TRANSPOSE and len(args) == 3 and not kwargs:
        if node.op == "call_function" and t is torch.transpose:
            return 0
        _replace_call(node, torch.transpose, tuple(args))
        return 1

    if node.op == "call_function" and _aten_name(t) == "mT" and len(args) == 1:
        _replace_call(node, torch.transpose, (args[0], -2, -1))  # newer Dynamo records aten.mT
        return 1

    if t is getattr and len(args) == 2 and args[1] in ("mT", "T"):
        ev = example_value(args[0])
        if ev is None or (args[1] == "T" and ev.dim() != 2):
            return 0
        _replace_call(node, torch.transpose, (args[0], -2, -1))
        return 1

    if t == "permute" and node.op == "call_method":
        dims = args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = list(dims[0])
        _replace_call(node, torch.permute, (args[0], tuple(dims)))
        return 1

    if t in _ARITH and len(args) == 2 and not kwargs:
        canon = _ARITH[t]
        if node.op == "call_function" and t is canon:
            return 0
        if t is torch.div and kwargs.get("rounding_mode") is not None:
            return 0
        _replace_call(node, canon, tuple(args))
        return 1

    if t == "masked_fill" and node.op == "call_method" and len(args) == 3:
        _replace_call(node, torch.masked_fill, tuple(args))
        return 1

    if t in (torch.einsum, "einsum") and node.op == "call_function":
        return _canonicalize_einsum(node)

    if t in (torch.baddbmm, "baddbmm"):
        return _canonicalize_baddbmm(node)
    return 0


def _aten_name(t) -> str | None:
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return t._opname if hasattr(t, "_opname") else t.__name__.split(".")[0]
    return None


def _replace_call(node: fx.Node, target, args, kwargs=None):
    """Turn ``node`` into ``call_function target(*args, **kwargs)``, keeping its users."""
    node.op = "call_function"
    node.target = target
    node.args = tuple(args)
    node.kwargs = dict(kwargs or {})


_EINSUM = re.compile(
    r"^\s*([a-z.]*)([a-z])([a-z])\s*,\s*([a-z.]*)([a-z])([a-z])\s*->\s*([a-z.]*)([a-z])([a-z])\s*$"
)


def _canonicalize_einsum(node: fx.Node) -> int:
    """``einsum`` forms of the two attention products, as a batched matmul.

    ``...qd,...kd->...qk`` is ``a @ bᵀ``; ``...qk,...kd->...qd`` is ``a @ b``.  Only
    equations whose batch letters are identical and in the same order are taken.
    """
    args = node.args
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        eq, operands = args[0], list(args[1])
    else:
        eq, operands = args[0], list(args[1:])
    if not isinstance(eq, str) or len(operands) != 2 or node.kwargs:
        return 0
    m = _EINSUM.match(eq.replace(" ", ""))
    if not m:
        return 0
    ba, a1, a2, bb, b1, b2, bo, o1, o2 = m.groups()
    if not (ba == bb == bo) or len(set(ba.replace(".", ""))) != len(ba.replace(".", "")):
        return 0
    a, b = operands
    graph = node.graph
    if a2 == b2 and o1 == a1 and o2 == b1 and len({a1, a2, b1}) == 3:  # ...qd,...kd->...qk
        with graph.inserting_before(node):
            bt = graph.call_function(torch.transpose, (b, -2, -1))
        set_example_value(bt)
        _replace_call(node, torch.matmul, (a, bt))
        return 1
    if a2 == b1 and o1 == a1 and o2 == b2 and len({a1, a2, b2}) == 3:  # ...qk,...kd->...qd
        _replace_call(node, torch.matmul, (a, b))
        return 1
    return 0


def _canonicalize_baddbmm(node: fx.Node) -> int:
    """``baddbmm(bias, a, b, beta=β, alpha=α)`` = ``β·bias + α·(a @ b)``, split so that the
    scale and the additive bias are seen like any other.  β = 0 drops the bias (as
    baddbmm ignores it, NaN included)."""
    args = list(node.args)
    kwargs = dict(node.kwargs)
    if len(args) != 3:
        return 0
    beta = kwargs.pop("beta", 1)
    alpha = kwargs.pop("alpha", 1)
    if kwargs or not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)):
        return 0
    bias, a, b = args
    graph = node.graph
    with graph.inserting_before(node):
        mm = graph.call_function(torch.matmul, (a, b))
        set_example_value(mm)
        cur = mm
        if alpha != 1:
            cur = graph.call_function(operator.mul, (cur, float(alpha)))
            set_example_value(cur)
        if beta != 0:
            bterm = bias
            if beta != 1:
                bterm = graph.call_function(operator.mul, (bias, float(beta)))
                set_example_value(bterm)
            # baddbmm's result has the product's shape; the bias broadcasts into it.
            _replace_call(node, operator.add, (cur, bterm))
            return 1
    node.replace_all_uses_with(cur)
    node.graph.erase_node(node)
    return 1
