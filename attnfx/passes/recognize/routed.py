"""Routed sparse attention (Routing Transformer, Roy et al. 2021; ``attnfx.nn.RoutedAttention``):
attention inside clusters of rows gathered through index tensors, the outputs scattered
back onto the tokens and averaged.

The sequence as code writes it, anchored on the softmax::

    qg = q.gather(T, qi_exp).reshape(..., C, w, D)          (rows of q at the slots' tokens;
    kg, vg likewise through ki_exp                          T: the token dim, 2 or 1 for
    s  = qg @ kgᵀ  (· scale)                                (B·H, N, D) operands)
    s  = masked_fill(s, pos_q REL pos_k, value) ...         (positions: the same indices)
    o  = softmax(s) @ vg
    num = zeros.scatter_add(T, qi_exp', o.reshape(..., C·w, Dv))
    den = zeros.scatter_add(T, qi', ones)                   (the count of each token)
    out = num / den.clamp(min=1)   or   num / (den + eps)

Everything before the gathers (the k-means similarities, ``topk``, the sort of the
members) stays in the graph: the op reads q, k, v and the gather indices and replaces the
gathers, the per-cluster attention and the scatter-back (``spec.Routing``).  The indices
of the masks, of the scatters and of the gathers must be views of the same index tensors;
everything else about them (that they index the same slots) the verifier checks
numerically, like every rewrite.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attnfx.passes import graph as G
from attnfx.passes.match import (
    AuxOperand,
    NoMatch,
    Operand,
    Refusal,
    Site,
    check_dtypes,
    check_head_dims,
    dtype_name,
    static_dim,
)
from attnfx.passes.scalars import as_float, scalar_expr
from attnfx.spec import AttentionSpec, Routing, ScoreOp

KIND = "routed"

_VIEW_METHODS = {
    "reshape",
    "view",
    "expand",
    "expand_as",
    "unsqueeze",
    "squeeze",
    "flatten",
    "unflatten",
    "contiguous",
    "transpose",
    "permute",
    "long",
}
_VIEW_FNS = {torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.transpose}
_VIEW_FNS |= {torch.permute}
_RELATIONS = {
    operator.lt: "lt",
    torch.lt: "lt",
    operator.le: "le",
    torch.le: "le",
    operator.eq: "eq",
    torch.eq: "eq",
    operator.ne: "ne",
    torch.ne: "ne",
    operator.ge: "ge",
    torch.ge: "ge",
    operator.gt: "gt",
    torch.gt: "gt",
}
_METHOD_RELATIONS = {"lt": "lt", "le": "le", "eq": "eq", "ne": "ne", "ge": "ge", "gt": "gt"}
_SWAPPED = {"lt": "gt", "le": "ge", "eq": "eq", "ne": "ne", "ge": "le", "gt": "lt"}


def _call(node, fns=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in fns:
        return True
    return node.op == "call_method" and node.target in methods


def _plain_index(idx) -> bool:
    """``x[:, :, None]``-style indexing: only full slices, None and Ellipsis."""
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(
        i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items
    )


def _is_view(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target in _VIEW_METHODS:
        return True
    if node.op == "call_method" and node.target == "to" and G.dtype(node) in (torch.int64,):
        return True
    if node.op == "call_function" and node.target in _VIEW_FNS:
        return True
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and _plain_index(node.args[1])
    )


def strip_views(x):
    """The tensor ``x`` is a view (or reshape, expand, int cast) of."""
    while _is_view(x):
        x = x.args[0]
    return x


def _gather(x: fx.Node):
    """(source, token dim, index node) when ``x`` is a reshape of ``source.gather(dim,
    index)`` that splits the gathered rows into (C, w); else None."""
    g = x
    while _call(g, (torch.reshape,), ("reshape", "view", "unflatten", "contiguous")):
        g = g.args[0]
    if not _call(g, (torch.gather,), ("gather",)):
        return None
    src = g.args[0]
    dim = g.args[1] if len(g.args) > 1 else g.kwargs.get("dim")
    index = g.args[2] if len(g.args) > 2 else g.kwargs.get("index")
    shp, gshp = G.shape(src), G.shape(g)
    if shp is None or gshp is None or not isinstance(dim, int) or len(shp) not in (3, 4):
        return None
    dim = G.resolve_dim(dim, len(shp))
    if dim != len(shp) - 2 or not isinstance(index, fx.Node) or gshp[-1] != shp[-1]:
        return None  # not whole rows of the tokens
    return src, dim, index, g


def is_anchor(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.softmax


def anchors(node: fx.Node) -> list:
    """The match functions for ``node`` (see ``attnfx.passes.recognize``)."""
    return [match] if is_anchor(node) else []


_METADATA_USES = {
    "new_zeros",
    "new_ones",
    "new_full",
    "new_empty",
    "size",
    "dim",
}
_METADATA_FNS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}


def _value_users(x: fx.Node) -> list[fx.Node]:
    """Live users of ``x`` that read its values (not only its shape, dtype or device, as
    ``x.new_zeros(...)`` or ``torch.ones_like(x)`` do)."""
    return [
        u
        for u in G.live_users(x)
        if not (
            (u.op == "call_method" and u.target in _METADATA_USES and u.args[0] is x)
            or (u.op == "call_function" and u.target in _METADATA_FNS and u.args[0] is x)
        )
    ]


def _one_user(x: fx.Node, what: str, anchor) -> fx.Node:
    users = G.live_users(x)
    if len(users) != 1:
        raise Refusal(f"{what} have other users (e.g. returned or logged)", anchor)
    return users[0]


def _value(x) -> float | None:
    """A constant: a number, a 0-d constant tensor, or a float Dynamo made a graph input
    under ``dynamic=True`` (reading it guards the graph on its value: ``scalars``)."""
    v = G.constant_value(x)
    if v is None and isinstance(x, fx.Node):
        v = as_float(scalar_expr(x, None, None))
    return v


def _fill(cur: fx.Node):
    """(scores, mask, value) of a ``masked_fill(s, m, v)`` / ``where(m, v, s)``."""
    if cur.op == "call_function" and cur.target is torch.masked_fill:
        return cur.args[0], cur.args[1], _value(cur.args[2])
    if cur.op == "call_function" and cur.target is torch.where and len(cur.args) == 3:
        return cur.args[2], cur.args[0], _value(cur.args[1])
    return None


def _relation(mask, qbase, kbase, w, wk, anchor) -> str:
    """``pos_q REL pos_k`` for a comparison of the query and key slot positions."""
    rel = None
    if _call(mask, tuple(_RELATIONS)):
        rel = _RELATIONS[mask.target]
    elif mask.op == "call_method" and mask.target in _METHOD_RELATIONS:
        rel = mask.target
    if rel is None or len(mask.args) != 2:
        raise Refusal("a routed mask that is not a comparison of the members' positions", anchor)
    a, b = mask.args
    sa, sb = G.shape(a), G.shape(b)
    ba, bb = strip_views(a), strip_views(b)
    if ba is kbase and bb is qbase and ba is not bb:
        a, b, sa, sb, ba, bb, rel = b, a, sb, sa, bb, ba, _SWAPPED[rel]
    if ba is not qbase or bb is not kbase or sa is None or sb is None:
        raise Refusal("a routed mask on other positions than the members'", anchor)
    if tuple(sa[-2:]) != (w, 1) or tuple(sb[-2:]) != (1, wk):
        raise Refusal("a routed mask that does not compare query with key slots", anchor)
    return rel


def _scale(cur: fx.Node):
    """(scores, factor) for ``s * c`` / ``c * s`` / ``s / c`` with a constant c."""
    if cur.op != "call_function" or cur.target not in (operator.mul, operator.truediv):
        return None
    a, b = cur.args[:2]
    ca = _value(a) if not _reaches_scores(a) else None
    cb = _value(b) if not _reaches_scores(b) else None
    if cur.target is operator.mul and cb is not None and isinstance(a, fx.Node):
        return a, cb
    if cur.target is operator.mul and ca is not None and isinstance(b, fx.Node):
        return b, ca
    if cur.target is operator.truediv and cb is not None and isinstance(a, fx.Node) and cb != 0:
        return a, 1.0 / cb
    return None


def _reaches_scores(x) -> bool:
    return isinstance(x, fx.Node) and (G.shape(x) or ()) != ()


def _zeros(x) -> bool:
    if _call(x, (torch.zeros, torch.zeros_like), ("new_zeros", "zero_")):
        return True
    return _call(x, (torch.full, torch.full_like)) and G.constant_value(x.args[1]) == 0.0


def _ones(x) -> bool:
    x = strip_views(x)
    if _call(x, (torch.ones, torch.ones_like), ("new_ones",)):
        return True
    return _call(x, (torch.full, torch.full_like)) and G.constant_value(x.args[1]) == 1.0


def _scatter_add(x):
    """(zeros, dim, index, src) of ``zeros.scatter_add(dim, index, src)``."""
    if not _call(x, (torch.scatter_add,), ("scatter_add",)) or len(x.args) < 4:
        return None
    return x.args[0], x.args[1], x.args[2], x.args[3]


def _denominator(den, qbase, n, anchor):
    """(eps or None) when ``den`` is the count of each token's slots, plus eps or
    clamped to at least 1."""
    den = strip_views(den)
    eps = None
    if _call(den, (torch.clamp, torch.clamp_min), ("clamp", "clamp_min")):
        lo = den.kwargs.get("min", den.args[1] if len(den.args) > 1 else None)
        hi = den.kwargs.get("max", den.args[2] if len(den.args) > 2 else None)
        if G.constant_value(lo) != 1.0 or hi is not None:
            raise Refusal("a routed count clamped otherwise than to at least 1", anchor)
        count = den.args[0]
    elif _call(den, (operator.add,)):
        a, b = den.args[:2]
        count, eps = (
            (a, G.constant_value(b)) if isinstance(a, fx.Node) else (b, G.constant_value(a))
        )
        if eps is None or not eps > 0:
            raise Refusal("a routed count plus something other than a positive constant", anchor)
    else:
        raise Refusal("routed outputs divided by something other than their count", anchor)
    sc = _scatter_add(strip_views(count))
    if sc is None:
        raise Refusal("routed outputs divided by something other than their count", anchor)
    zeros, _, index, src = sc
    shp = G.shape(zeros)
    if not _zeros(zeros) or not _ones(src) or shp is None or n not in tuple(shp[-2:]):
        raise Refusal("routed outputs divided by something other than their count", anchor)
    if strip_views(index) is not qbase:
        raise Refusal("the routed count is of other indices than the query slots'", anchor)
    return eps


def match(node: fx.Node) -> Site:
    anchor = node
    x = node.args[0]
    sshape = G.shape(x)
    if sshape is None or len(sshape) not in (4, 5):
        raise NoMatch("scores are not per-cluster (4-D or 5-D)")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not isinstance(dim, int) or G.resolve_dim(dim, len(sshape)) != len(sshape) - 1:
        raise NoMatch("softmax not over the last dim")

    # -- back from the softmax: fills, then the scale, then q·kᵀ of gathered rows ------
    cur, fills, scale, scores_chain = x, [], 1.0, []
    while True:
        if not isinstance(cur, fx.Node):
            raise NoMatch("scores reach a constant")
        if cur.op == "call_function" and cur.target is torch.matmul:
            break
        if G.is_cast(cur):
            scores_chain.append(cur)
            cur = cur.args[0]
            continue
        f = _fill(cur)
        if f is not None:
            if scale != 1.0:
                raise NoMatch("a fill before the scale")
            fills.append((cur, f))
            scores_chain.append(cur)
            cur = f[0]
            continue
        sc = _scale(cur)
        if sc is not None:
            scale *= sc[1]
            scores_chain.append(cur)
            cur = sc[0]
            continue
        raise NoMatch(f"score op {cur.target} not part of a routed program")
    mm = cur
    a, b = mm.args[:2]
    if not _call(b, (torch.transpose,)) or {G.resolve_dim(d, len(sshape)) for d in b.args[1:3]} != {
        len(sshape) - 1,
        len(sshape) - 2,
    }:
        raise NoMatch("keys not transposed in the product")
    gq, gk = _gather(a), _gather(b.args[0])
    if gq is None or gk is None:
        raise NoMatch("scores not of gathered rows")
    # -- forward from the softmax: casts, @ vg, the scatter-back ------------------------
    p = node
    while True:
        u = G.live_users(p)
        if len(u) == 1 and G.is_cast(u[0]):
            p = u[0]
            continue
        break
    pvs = [u for u in G.live_users(p) if _call(u, (torch.matmul,)) and u.args[0] is p]
    if len(pvs) != 1:
        raise NoMatch("probabilities not multiplied by values")
    pv = pvs[0]
    gv = _gather(pv.args[1])
    if gv is None:
        raise NoMatch("values not gathered")
    o = pv
    while len(_value_users(o)) == 1 and _is_view(_value_users(o)[0]):
        o = _value_users(o)[0]
    users = _value_users(o)
    sc = _scatter_add(users[0]) if len(users) == 1 else None
    if sc is None or sc[3] is not o:
        raise NoMatch("outputs not scattered back")
    scatter = users[0]
    # -- from here on, it is routed attention: refusals carry a reason -------------------
    for n, what in ((mm, "scores"), (node, "probabilities"), (pv, "cluster outputs")):
        _one_user(n, what, anchor)
    if p is not node:
        _one_user(p, "probabilities", anchor)
    for n in scores_chain:
        _one_user(n, "scores", anchor)
    (q, _, qidx, _), (k, _, kidx, _), (v, _, vidx, _) = gq, gk, gv
    qbase, kbase = strip_views(qidx), strip_views(kidx)
    if strip_views(vidx) is not kbase or (
        vidx is not kidx and G.shape(vidx)[:-1] != G.shape(kidx)[:-1]
    ):
        raise Refusal("values gathered through other indices than the keys", anchor)
    rank = len(G.shape(q))
    if len(G.shape(k)) != rank or len(G.shape(v)) != rank:
        raise Refusal("q, k, v of different ranks", anchor)
    if G.shape(q)[:-2] != G.shape(k)[:-2] or G.shape(k)[:-2] != G.shape(v)[:-2]:
        raise Refusal("routed attention with different q and k/v heads", anchor)
    w, wk = sshape[-2], sshape[-1]
    if not isinstance(w, int) or not isinstance(wk, int):
        raise Refusal("routed cluster windows are symbolic", anchor)
    zeros, sdim, sidx, _ = sc
    n = G.shape(q)[-2]
    zshape = G.shape(zeros)
    if not _zeros(zeros) or zshape is None or len(zshape) != rank or zshape[-2] != n:
        raise Refusal("routed outputs scattered into something other than zeros", anchor)
    if not isinstance(sdim, int) or G.resolve_dim(sdim, rank) != rank - 2:
        raise Refusal("routed outputs scattered along another dim than the tokens", anchor)
    if strip_views(sidx) is not qbase:
        raise Refusal("routed outputs scattered through other indices than the queries'", anchor)
    users = G.live_users(scatter)
    while len(users) == 1 and G.is_cast(users[0]):
        users = G.live_users(users[0])
    div = users[0] if len(users) == 1 else None
    if not _call(div, (operator.truediv,)) or strip_views(div.args[0]) is not scatter:
        raise Refusal("routed outputs not divided by their count", anchor)
    eps = _denominator(div.args[1], qbase, n, anchor)
    rels = tuple(
        (_relation(m, qbase, kbase, w, wk, anchor), value) for _, (_, m, value) in reversed(fills)
    )
    for fnode, (_, _, value) in fills:
        if value is None:
            raise Refusal("a routed mask filled with a tensor", fnode)
    dt = check_dtypes(q, k, v, anchor)
    if G.dtype(div) != G.dtype(v):
        raise Refusal("routed output of another dtype than v (a count of another dtype)", anchor)
    d, dv = G.shape(q)[-1], G.shape(v)[-1]
    check_head_dims(d, dv, anchor)
    spec = AttentionSpec(
        kind=KIND,
        activation="softmax",
        score_ops=(ScoreOp("mul", value=scale),) if scale != 1.0 else (),
        aux_dtypes=("int64", "int64"),
        head_dim=static_dim(d),
        head_dim_v=static_dim(dv),
        dtype=dtype_name(dt),
        out_dtype=dtype_name(G.dtype(div)),
        routing=Routing(window=w, key_window=wk, fills=rels, eps=eps),
    )
    if G.dtype(qidx) != torch.int64 or G.dtype(kidx) != torch.int64:
        raise Refusal("routed indices are not int64", anchor)
    return Site(
        kind=KIND,
        anchor=anchor,
        output=div,
        q=Operand(q),
        k=Operand(k),
        v=Operand(v),
        aux=[AuxOperand(qidx), AuxOperand(kidx)],
        spec=spec,
        rank3=rank == 3,
        where=G.module_path(anchor),
    )
