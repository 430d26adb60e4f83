"""Softmax attention (Vaswani et al. 2017, "Attention Is All You Need").

``softmax(s·q·kᵀ + bias, masked) · v`` in any eager spelling, and
``F.scaled_dot_product_attention``.

Edge semantics kept exactly: a query row whose keys are all filled with ``-inf`` yields
NaN, as eager softmax does (SDPA's math path yields 0, and an SDPA site keeps that);
a row filled with a finite value (``finfo.min``) yields the uniform average of the
values; the scale, biases and masks apply in the order the model wrote them.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from attnfx.passes import graph as G
from attnfx.passes.match import (
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


def is_anchor(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.softmax


def match(node: fx.Node, activation: str = "softmax", kind: str = KIND) -> Site:
    """Describe the site anchored at ``node``; raise Refusal or NoMatch."""
    x = node.args[0]
    shp = G.shape(x)
    if shp is None or len(shp) not in (3, 4):
        raise NoMatch("scores are not 3-D or 4-D")
    chain = walk_scores(x, shp)
    pv, prob_nodes = walk_probs(node)
    if activation == "softmax":
        dim = G.resolve_dim(node.args[1], len(shp))
        if dim != len(shp) - 1:
            raise Refusal("softmax over a non-key axis", node)
    return build_site(node, pv, chain, kind=kind, activation=activation)


def build_site(anchor, pv, chain, *, kind, activation, extra_ops=()) -> Site:
    mm = chain.matmul
    if len(G.live_users(mm)) != 1:
        raise Refusal("scores have other users (e.g. returned or logged)", mm)
    a, b = mm.args
    qn, qscales = strip_scalar_scale(a)
    bn, kscales = strip_scalar_scale(b)
    rank = len(G.shape(qn) or ())
    if rank not in (3, 4) or len(G.shape(bn) or ()) != rank:
        raise NoMatch("q/k are not 3-D or 4-D")
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
    ops = [ScoreOp("mul", s) for s in qscales + kscales] + list(extra_ops) + chain.ops
    ops, aux, q_mul = temperature.move_row_multipliers(ops, chain.aux, anchor)
    for x in aux + q_mul:
        if depends_on(x.node, mm):
            raise Refusal("a score multiplier or bias depends on the scores themselves", anchor)
    if activation == "softmax" and temperature.has_temperature(ops, q_mul, qn):
        kind = temperature.KIND
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
    from attnfx.passes.match import AuxOperand, _analyze, conjunct_fills

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
            pred = _analyze(mask, qs[2], ks[2])
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


__all__ = ["KIND", "build_site", "is_anchor", "is_sdpa", "match", "match_sdpa"]
