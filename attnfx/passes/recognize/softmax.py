"""Softmax attention (Vaswani et al. 2017, "Attention Is All You Need").

``softmax(s·q·kᵀ + bias, masked) · v`` in any eager spelling, and
``F.scaled_dot_product_attention``.

Learned attention sinks (gpt-oss; Xiao et al. 2023, "Efficient Streaming Language Models
with Attention Sinks"): ``softmax(cat(s, sink))[..., :-1]`` with one logit per head (or
per query row) that joins the normalizer and is dropped; a row-max subtraction before the
softmax (``c - c.max(-1, keepdim=True).values``, which changes nothing but rounding) is
looked through.

Edge semantics kept exactly: a query row whose keys are all filled with ``-inf`` yields
NaN, as eager softmax does (SDPA's math path yields 0, and an SDPA site keeps that);
a row filled with a finite value (``finfo.min``) yields the uniform average of the
values; with a finite sink no row is empty (a row with every key masked attends to the
sink only and yields 0); the scale, biases and masks apply in the order the model wrote
them.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from attnfx.passes import graph as G
from attnfx.passes.match import (
    AuxOperand,
    NoMatch,
    Operand,
    Refusal,
    Site,
    check_dtypes,
    check_head_dims,
    default_scale,
    depends_on,
    dtype_name,
    key_operand,
    only_prob_user,
    static_dim,
    strip_repeat_kv,
    strip_scalar_scale,
    walk_probs,
    walk_scores,
)
from attnfx.passes.recognize import temperature
from attnfx.predicate import K, MaskPredicate, Q
from attnfx.spec import HEAD_DIM, AttentionSpec, ScoreOp

KIND = "softmax"


def anchors(node: fx.Node) -> list:
    """The match functions for ``node`` (see ``attnfx.passes.recognize``): the softmax
    form, or an SDPA call."""
    if is_anchor(node):
        return [match]
    return [match_sdpa] if is_sdpa(node) else []


def is_anchor(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.softmax


def match(node: fx.Node, activation: str = "softmax", kind: str = KIND) -> Site:
    """Describe the site anchored at ``node``; raise Refusal or NoMatch."""
    x = node.args[0]
    shp = G.shape(x)
    if shp is None or len(shp) not in (3, 4):
        raise NoMatch("scores are not 3-D or 4-D")
    if activation == "softmax":
        dim = G.resolve_dim(node.args[1], len(shp))
        if dim != len(shp) - 1:
            raise Refusal("softmax over a non-key axis", node)
    x, max_users = strip_row_max(x) if activation == "softmax" else (x, ())
    sink = None
    if activation == "softmax" and _is_cat(x):
        x, sink, max_users = _split_sink(x, max_users, node)
        shp = G.shape(x)
    chain = walk_scores(x, shp, site_users=max_users)
    if sink is not None and depends_on(sink.operand.node, chain.matmul):
        raise Refusal("the sink logit depends on the scores", node)
    if sink is not None:
        pv, prob_nodes = walk_probs(_sink_dropped(node, shp[-1], sink))
    else:
        pv, prob_nodes = walk_probs(node)
    return build_site(node, pv, chain, kind=kind, activation=activation, sink=sink)


# ---------------------------------------------------------------------------------------
# Row max and sinks
# ---------------------------------------------------------------------------------------


def _row_max_of(m: fx.Node, x: fx.Node) -> bool:
    """Whether ``m`` is ``x``'s max over the last axis, kept as a (..., 1) column:
    ``x.max(-1, keepdim=True).values`` (a getitem of the pair), ``x.amax(-1, True)``,
    optionally detached."""
    if m.op == "call_method" and m.target == "detach" and len(m.args) == 1:
        m = m.args[0]
    inner = m
    if m.op == "call_function" and m.target is operator.getitem and m.args[1] == 0:
        inner = m.args[0]
        is_max = (inner.op == "call_method" and inner.target == "max") or (
            inner.op == "call_function" and inner.target is torch.max
        )
    else:
        is_max = (m.op == "call_method" and m.target == "amax") or (
            m.op == "call_function" and m.target is torch.amax
        )
    if not is_max or not inner.args or inner.args[0] is not x:
        return False
    shp, mshp = G.shape(x), G.shape(m)
    if shp is None or mshp is None or len(mshp) != len(shp) or mshp[-1] != 1:
        return False
    return tuple(mshp[:-1]) == tuple(shp[:-1])


def strip_row_max(x: fx.Node) -> tuple[fx.Node, tuple]:
    """Look through ``c - rowmax(c)`` before a softmax (softmax does not change under a
    per-row shift: only rounding moves, and a row of -inf is NaN either way).  Returns
    (c, the nodes of the max, which are c's users inside the site)."""
    if x.op == "call_function" and x.target is operator.sub and len(x.args) == 2:
        c, m = x.args
        if isinstance(c, fx.Node) and isinstance(m, fx.Node) and _row_max_of(m, c):
            nodes = [m]
            while nodes[-1] not in c.users:
                nodes.append(nodes[-1].args[0])
            if len(G.live_users(m)) == 1 and all(len(G.live_users(n)) == 1 for n in nodes[1:]):
                return c, (nodes[-1],)
    return x, ()


def _is_cat(x) -> bool:
    return isinstance(x, fx.Node) and x.op == "call_function" and x.target is torch.cat


def _split_sink(cat: fx.Node, max_users: tuple, anchor: fx.Node):
    """``cat([s, sink], -1)`` (or ``[sink, s]``): (s, the sink operand, s's users in the
    site).  The sink is one column, computed without the scores."""
    tensors = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    shp = G.shape(cat)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or shp is None:
        raise NoMatch("softmax over a concatenation that is not scores and one column")
    if G.resolve_dim(dim, len(shp)) != len(shp) - 1:
        raise NoMatch("scores concatenated along a non-key axis")
    from attnfx.passes.match import reaches_matmul

    first, second = tensors
    if reaches_matmul(first) and not reaches_matmul(second):
        s, col, sink_first = first, second, False
    elif reaches_matmul(second) and not reaches_matmul(first):
        s, col, sink_first = second, first, True
    else:
        raise NoMatch("softmax over a concatenation without one score tensor")
    cshp = G.shape(col)
    if cshp is None or cshp[-1] != 1:
        raise Refusal("scores concatenated with more than one extra column", anchor)
    if G.dtype(col) not in (torch.float16, torch.bfloat16, torch.float32):
        raise Refusal(f"sink logits of dtype {G.dtype(col)}", anchor)
    if depends_on(col, s):
        raise Refusal("the sink logit depends on the scores", anchor)
    others = [u for u in G.live_users(cat) if u not in max_users]
    if len(others) != 1:
        raise Refusal("scores have other users (e.g. returned or logged)", cat)
    return s, _Sink(AuxOperand(col), sink_first), ()


class _Sink:
    def __init__(self, operand, first: bool):
        self.operand, self.first = operand, first


def _drops_sink(idx, ndim: int, nk, first: bool) -> bool:
    """Whether getitem index ``idx`` keeps every key column and drops the sink's."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    *lead, last = idx
    if len(lead) == 1 and lead[0] is Ellipsis:
        pass
    elif len(lead) != ndim - 1 or any(x != slice(None) for x in lead):
        return False
    if not isinstance(last, slice) or last.step not in (None, 1):
        return False
    if first:
        return last.start in (1, -nk) and last.stop in (None, nk + 1)
    return last.start in (None, 0) and last.stop in (-1, nk)


def _sink_dropped(anchor: fx.Node, nk, sink) -> fx.Node:
    """The node that drops the sink's probability column (through casts)."""
    cur = anchor
    while True:
        u = only_prob_user(cur)
        if G.is_cast(u):
            cur = u
            continue
        if (
            u.op == "call_function"
            and u.target is operator.getitem
            and u.args[0] is cur
            and _drops_sink(u.args[1], len(G.shape(cur)), nk, sink.first)
        ):
            return u
        raise Refusal("the sink column's probability is not dropped after the softmax", u)


def build_site(anchor, pv, chain, *, kind, activation, extra_ops=(), sink=None) -> Site:
    mm = chain.matmul
    if len(G.live_users(mm)) != 1:
        raise Refusal("scores have other users (e.g. returned or logged)", mm)
    # A constant scale the program applies to q or k before the product stays there,
    # outside the op (the op's q is ``q * c`` as eager computes it): moved after the
    # product, the op's float32 q·kᵀ would overflow where the program's (q·c)·kᵀ does not
    # (|q|, |k| ~ 1e19), and the op would return a masked row where eager returns v.
    qn, b = mm.args
    rank = len(G.shape(qn) or ())
    if rank not in (3, 4) or len(G.shape(b) or ()) != rank:
        raise NoMatch("q/k are not 3-D or 4-D")
    bn, kscales = strip_scalar_scale(b)
    if kscales:  # q @ (kᵀ · c): the op reads kᵀ · c transposed back
        key_operand(bn)  # ... when kᵀ is a transposed view, as for an unscaled key
        k = Operand(b, tuple(range(rank - 2)) + (rank - 1, rank - 2))
    else:
        k = key_operand(bn)
    vnode = pv.args[1]
    if len(G.shape(vnode) or ()) != rank:
        raise NoMatch("v rank differs")
    group = 1
    if rank == 4 and k.permute is None:
        kbase, gk = strip_repeat_kv(k.node)
        vbase, gv = strip_repeat_kv(vnode)
        if gk == gv and gk > 1:
            k, vnode, group = Operand(kbase), vbase, gk
    dt = check_dtypes(qn, k.node, vnode, anchor)
    d, dv = G.shape(qn)[-1], G.shape(vnode)[-1]
    check_head_dims(d, dv, anchor)
    ops = list(extra_ops) + chain.ops
    ops, aux, q_mul = temperature.move_row_multipliers(ops, chain.aux, anchor, dtype=dt)
    for x in aux + q_mul:
        if depends_on(x.node, mm):
            raise Refusal("a score multiplier or bias depends on the scores themselves", anchor)
    if activation == "softmax" and temperature.has_temperature(ops, q_mul, qn):
        kind = temperature.KIND
    sink_index = None
    if sink is not None:
        aux = aux + [sink.operand]
        sink_index = len(aux) - 1
    spec = AttentionSpec(
        kind=kind,
        activation=activation,
        score_ops=tuple(ops),
        aux_dtypes=tuple(dtype_name(G.dtype(a.node)) for a in aux),
        head_dim=static_dim(d),
        head_dim_v=static_dim(dv),
        gqa_group=group,
        dtype=dtype_name(dt),
        out_dtype=dtype_name(G.dtype(pv)),
        out_layout=_layout(pv) if rank == 4 else "bhnd",
        sink=sink_index,
    )
    return Site(
        kind=kind,
        anchor=anchor,
        output=pv,
        q=Operand(qn),
        k=k,
        v=Operand(vnode),
        aux=aux,
        q_mul=q_mul,
        spec=spec,
        rank3=rank == 3,
        where=G.module_path(anchor),
        mask_nodes=chain.mask_nodes,
    )


# ---------------------------------------------------------------------------------------
# F.scaled_dot_product_attention
# ---------------------------------------------------------------------------------------


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        F.scaled_dot_product_attention,
        torch._C._nn.scaled_dot_product_attention,
    )


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def match_sdpa(node: fx.Node) -> Site:
    from attnfx.passes.match import AuxOperand, analyze_mask_operand, conjunct_fills

    a = dict(zip(_SDPA_ARGS, node.args))
    a.update(node.kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    mask, p, causal = a.get("attn_mask"), a.get("dropout_p", 0.0), a.get("is_causal", False)
    scale, gqa = a.get("scale"), a.get("enable_gqa", False)
    if not isinstance(p, (int, float)) or p != 0:
        raise Refusal("sdpa with dropout_p > 0 (training-mode dropout)", node)
    if not isinstance(causal, bool):
        raise Refusal("sdpa is_causal is not a constant", node)
    qs, ks, vs = G.shape(q), G.shape(k), G.shape(v)
    if qs is None or ks is None or vs is None or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise Refusal("sdpa on operands that are not 4-D (B, H, N, D)", node)
    dt = check_dtypes(q, k, v, node)
    d, dv = qs[-1], vs[-1]
    check_head_dims(d, dv, node)
    group = 1
    if qs[1] == ks[1] and not gqa:
        # HF repeats kv heads (repeat_kv) before calling SDPA: read the repeat back.
        kb, gk = strip_repeat_kv(k)
        vb, gv = strip_repeat_kv(v)
        if gk == gv and gk > 1:
            k, v, group = kb, vb, gk
            ks, vs = G.shape(k), G.shape(v)
    elif qs[1] != ks[1]:
        if not gqa or not isinstance(qs[1], int) or not isinstance(ks[1], int) or qs[1] % ks[1]:
            raise Refusal("sdpa with different q and kv head counts", node)
        group = qs[1] // ks[1]
    ops = [_sdpa_scale(scale, d, qs, ks, node)]
    aux, mask_nodes = [], set()
    if causal:
        ops.append(ScoreOp("fill_pred", value=float("-inf"), pred=MaskPredicate(K <= Q).to_key()))
    if isinstance(mask, fx.Node):
        if G.dtype(mask) == torch.bool:
            pred = analyze_mask_operand(mask, qs[2], ks[2])
            if pred is not None:
                mask_nodes |= pred[1]
                ops.append(
                    ScoreOp("fill_pred", value=float("-inf"), pred=MaskPredicate(pred[0]).to_key())
                )
            else:
                shape = (qs[0], qs[1], qs[2], ks[2])
                split = conjunct_fills(mask, float("-inf"), aux, shape, node)
                if split is not None:
                    ops.extend(split)  # causal & padding: the causal part skips blocks
                else:
                    aux.append(AuxOperand(mask))
                    ops.append(
                        ScoreOp("fill_aux", value=float("-inf"), aux=len(aux) - 1, fill_where=False)
                    )
        else:
            aux.append(AuxOperand(mask))  # a float mask that requires grad gets its gradient
            ops.append(ScoreOp("add_aux", aux=len(aux) - 1))
    elif mask is not None:
        raise Refusal("sdpa attn_mask is not a tensor", node)
    spec = AttentionSpec(
        kind=KIND,
        score_ops=tuple(ops),
        aux_dtypes=tuple(dtype_name(G.dtype(x.node)) for x in aux),
        head_dim=static_dim(d),
        head_dim_v=static_dim(dv),
        gqa_group=group,
        dtype=dtype_name(dt),
        out_dtype=dtype_name(G.dtype(node)),
        # SDPA's math path returns 0 for a query row with every key masked out.
        fully_masked="zero",
        out_layout=_layout(node),
    )
    return Site(
        kind=KIND,
        anchor=node,
        output=node,
        q=Operand(q),
        k=Operand(k),
        v=Operand(v),
        aux=aux,
        spec=spec,
        where=G.module_path(node),
        mask_nodes=mask_nodes,
    )


def _sdpa_scale(scale, d, qs, ks, node) -> ScoreOp:
    """SDPA's scale: a constant, or (dynamic=True) an expression in the head dim D and the
    lengths, resolved when the op runs; the default is 1/sqrt(D)."""
    from attnfx.passes.scalars import as_float, scalar_expr

    if scale is None:
        if isinstance(d, int):
            return ScoreOp("mul", default_scale(d))
        expr = 1 / sympy.sqrt(HEAD_DIM)
    else:
        expr = scalar_expr(scale, qs[2], ks[2], d=d)
        if expr is None:
            raise Refusal("sdpa scale is not a constant", node)
    val = as_float(expr)
    if val is not None:
        return ScoreOp("mul", val)
    return ScoreOp("mul_sym", expr=sympy.srepr(expr))


def _layout(node: fx.Node) -> str:
    """Memory order of a 4-D output: "bnhd" when heads are inside tokens."""
    ev = G.example_value(node)
    if isinstance(ev, torch.Tensor) and ev.dim() == 4 and ev.shape[1] > 1 and ev.shape[2] > 1:
        st = ev.stride()
        if st[2] > st[1]:
            return "bnhd"
    return "bhnd"


__all__ = ["KIND", "anchors", "build_site", "is_anchor", "is_sdpa", "match", "match_sdpa"]
