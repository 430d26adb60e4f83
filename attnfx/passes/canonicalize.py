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
    # Then, on canonical matmuls: batched-heads products back to 4-D (scores first, so
    # that the value product's pattern never takes a score product for one).
    for split in (_split_scores, _split_values, _merge_window_mask):
        for node in list(gm.graph.nodes):
            if node.op in ("call_function", "call_method") and node.graph is gm.graph:
                changed += split(node)
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


# ---------------------------------------------------------------------------------------
# Batched-heads products: (B·H, N, D) matmuls whose scores are viewed as (B, H, N, N)
# ---------------------------------------------------------------------------------------
#
# ``torch.bmm(q.reshape(B*H, N, D), kᵀ.reshape(B*H, D, N)).view(B, H, N, N)`` (and GPT-2's
# ``baddbmm`` + ``reshape``) becomes ``q4 @ k4ᵀ`` on 4-D views of the same operands, with
# the scalar ops in between moved after it; ``bmm(p.view(B*H, N, N), v3)`` becomes
# ``(p @ v3.reshape(B, H, N, Dv)).reshape(B*H, N, Dv)``.  Each product computes the same
# dot products, element for element, so values are unchanged.

_VIEWS = {"view", "reshape", torch.reshape}


def _is_view(node: fx.Node) -> bool:
    t = _key(node)
    return G.hashable(t) and t in _VIEWS and node.op in ("call_function", "call_method")


def _sizes(node: fx.Node) -> list | None:
    """Static sizes of ``node``'s value, else None."""
    shp = G.shape(node)
    if shp is None or not all(isinstance(x, int) for x in shp):
        return None
    return list(shp)


def _scalar_operand(x) -> bool:
    if G.is_number(x):
        return True
    ev = G.example_value(x)
    if isinstance(ev, (torch.SymInt, torch.SymFloat)):
        return True
    return isinstance(ev, torch.Tensor) and ev.dim() == 0


def _split_scores(view: fx.Node) -> int:
    """``view(B, H, NQ, NK)`` of ``ops(matmul(a3, b3))`` with (B·H, NQ, NK) scores."""
    if not _is_view(view):
        return 0
    out, src = _sizes(view), _sizes(view.args[0]) if isinstance(view.args[0], fx.Node) else None
    if out is None or src is None or len(out) != 4 or len(src) != 3:
        return 0
    if out[2:] != src[1:] or out[0] * out[1] != src[0] or not _feeds_activation(view):
        return 0
    chain, cur = [], view.args[0]
    while isinstance(cur, fx.Node) and not (
        cur.op == "call_function" and cur.target is torch.matmul
    ):
        if len(cur.users) != 1:
            return 0
        if G.is_cast(cur):
            chain.append((cur, 0))
        elif (
            cur.op == "call_function"
            and cur.target in (operator.mul, operator.truediv, operator.add, operator.sub)
            and len(cur.args) == 2
        ):
            a, b = cur.args
            if isinstance(a, fx.Node) and _scalar_operand(b) and G.is_tensor(a):
                chain.append((cur, 0))
            elif isinstance(b, fx.Node) and _scalar_operand(a) and G.is_tensor(b):
                chain.append((cur, 1))
            else:
                return 0
        else:
            return 0
        cur = cur.args[chain[-1][1]]
    mm = cur
    if not isinstance(mm, fx.Node) or len(mm.users) != 1 or len(mm.args) != 2:
        return 0
    a3, b3 = mm.args
    sa, sb = _sizes(a3), _sizes(b3)
    if sa is None or sb is None or len(sa) != 3 or len(sb) != 3:
        return 0
    b, h, nq, nk = out
    d = sa[2]
    graph = view.graph
    with graph.inserting_after(mm):
        q4 = graph.call_method("reshape", (a3, b, h, nq, d))
    with graph.inserting_after(q4):
        kt = graph.call_method("reshape", (b3, b, h, d, nk))
    with graph.inserting_after(kt):
        k4 = graph.call_function(torch.transpose, (kt, -2, -1))
    with graph.inserting_after(k4):
        kt4 = graph.call_function(torch.transpose, (k4, -2, -1))
    with graph.inserting_after(kt4):
        mm4 = graph.call_function(torch.matmul, (q4, kt4))
    for n in (q4, kt, k4, kt4, mm4):
        set_example_value(n)
    prev = mm4
    for node, pos in reversed(chain):  # from the product towards the view
        args = list(node.args)
        args[pos] = prev
        node.args = tuple(args)
        set_example_value(node)
        prev = node
    view.replace_all_uses_with(prev)
    graph.erase_node(view)
    graph.erase_node(mm)
    return 1


def _is_activation(x) -> bool:
    t = _key(x)
    return G.hashable(t) and (t in _SOFTMAX or t in (torch.sigmoid, F.sigmoid, "sigmoid"))


def _feeds_activation(x: fx.Node, limit: int = 16) -> bool:
    """``x`` flows, one user at a time, into a softmax or sigmoid: it is scores."""
    for _ in range(limit):
        if len(x.users) != 1:
            return False
        (x,) = x.users
        if _is_activation(x):
            return True
    return False


def _is_probabilities(x) -> bool:
    """``x`` is a softmax or sigmoid output, through casts and dropout."""
    while isinstance(x, fx.Node):
        if G.is_cast(x) or G.dropout_identity(x)[0]:
            x = x.args[0]
            continue
        return _is_activation(x)
    return False


def _split_values(mm: fx.Node) -> int:
    """``matmul(p.view(B·H, NQ, NK), v3)`` with ``p`` of shape (B, H, NQ, NK)."""
    if not (mm.op == "call_function" and mm.target is torch.matmul and len(mm.args) == 2):
        return 0
    p3, v3 = mm.args
    if not isinstance(p3, fx.Node) or not _is_view(p3) or len(p3.users) != 1:
        return 0
    p4 = p3.args[0]
    if not _is_probabilities(p4):
        return 0
    s4, s3, sv, so = (
        _sizes(p4) if isinstance(p4, fx.Node) else None,
        _sizes(p3),
        _sizes(v3) if isinstance(v3, fx.Node) else None,
        _sizes(mm),
    )
    if None in (s4, s3, sv, so) or len(s4) != 4 or len(s3) != 3 or len(sv) != 3:
        return 0
    if s4[2:] != s3[1:] or s4[0] * s4[1] != s3[0] or sv[0] != s3[0] or sv[1] != s3[2]:
        return 0
    b, h, nk, dv = s4[0], s4[1], sv[1], sv[2]
    graph = mm.graph
    with graph.inserting_before(mm):
        v4 = graph.call_method("reshape", (v3, b, h, nk, dv))
        out4 = graph.call_function(torch.matmul, (p4, v4))
        out3 = graph.call_method("reshape", (out4, *so))
    for n in (v4, out4, out3):
        set_example_value(n)
    out3.meta.update({k: v for k, v in mm.meta.items() if k not in ("example_value", "val")})
    mm.replace_all_uses_with(out3)
    graph.erase_node(mm)
    graph.erase_node(p3)
    return 1


def _merge_window_mask(view4: fx.Node) -> int:
    """Swin's per-window mask: ``view4(view5(s) + m)`` with ``s`` of shape (B·nW, H, N, N)
    viewed as (B, nW, H, N, N) for the add becomes ``s + m4``, where ``m4`` is ``m``
    broadcast over (B, nW) and reshaped to (B·nW, ·, ·, ·): the same sum, element for
    element (``m4`` has one batch·window row per score row, its other dims as ``m``)."""
    if not _is_view(view4) or not isinstance(view4.args[0], fx.Node):
        return 0
    add = view4.args[0]
    if not (add.op == "call_function" and add.target is operator.add and len(add.users) == 1):
        return 0
    v5, m = add.args
    if not (isinstance(v5, fx.Node) and _is_view(v5)) or not isinstance(m, fx.Node):
        return 0
    s4 = v5.args[0]
    out, s4s, s5s, ms = (
        _sizes(view4),
        _sizes(s4) if isinstance(s4, fx.Node) else None,
        _sizes(v5),
        _sizes(m),
    )
    if None in (out, s4s, s5s, ms) or len(out) != 4 or len(s5s) != 5 or len(ms) > 5:
        return 0
    if out != s4s or s5s[2:] != s4s[1:] or s5s[0] * s5s[1] != s4s[0] or len(v5.users) != 1:
        return 0
    ms = [1] * (5 - len(ms)) + ms
    if any(a not in (1, b) for a, b in zip(ms, s5s)) or not _feeds_activation(view4):
        return 0
    graph = view4.graph
    with graph.inserting_before(view4):
        m5 = graph.call_method("reshape", (m, *ms)) if len(G.shape(m)) != 5 else m
        me = graph.call_method("expand", (m5, s5s[0], s5s[1], *ms[2:]))
        m4 = graph.call_method("reshape", (me, s4s[0], *ms[2:]))
        new = graph.call_function(operator.add, (s4, m4))
    for n in [x for x in (m5, me, m4, new) if x is not m]:
        set_example_value(n)
    new.meta.update({k: v for k, v in view4.meta.items() if k not in ("example_value", "val")})
    view4.replace_all_uses_with(new)
    for n in (view4, add, v5):
        graph.erase_node(n)
    return 1
