"""Match: find attention sites in a canonical graph and describe each as an AttentionSpec.

A site is anchored on its activation node (``torch.softmax``, ``torch.sigmoid``, an SDPA
call); one recognizer per variant in ``attnfx/passes/recognize/``, driven by
``recognize.find_sites``, builds it with the walks and checks of this module.  From the
anchor the matcher walks

* backwards through the *score chain* (scale, bias, masks, casts) to the ``q @ kᵀ``
  product, turning each step into a ``ScoreOp``;
* forwards through casts and identity dropout to the ``p @ v`` product.

Every intermediate value (scores, probabilities) must have exactly one live user: the
rewrite deletes them, with their dead users (a ``sim.clone()`` nothing reads).  A candidate that looks like attention but breaks a condition becomes a
*refusal*: kept as it is, with the reason counted and reported.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import os

import sympy
import torch
import torch.fx as fx

from attnfx.passes import graph as G
from attnfx.passes.scalars import as_float, scalar_expr
from attnfx.predicate import MaskPredicate
from attnfx.spec import AttentionSpec, ScoreOp

log = logging.getLogger("attnfx")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
_HUGE_NEGATIVE = -1e30


def debug(msg: str, *args) -> None:
    """``ATTNFX_DEBUG=1`` says why a candidate did not match."""
    if os.environ.get("ATTNFX_DEBUG", "0") not in ("", "0"):
        log.warning("attnfx: " + msg, *args)


class Refusal(Exception):
    """A candidate that is attention-shaped but cannot be rewritten; ``reason`` is counted."""

    def __init__(self, reason: str, node: fx.Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


class NoMatch(Exception):
    """Not attention at all: nothing to report."""


@dataclasses.dataclass
class Operand:
    """An input of the op: ``node``, then an optional reshape ``view`` (an image's
    (B, C, H, W) seen as (B, heads, D, H·W): ``recognize.bucketed``), then an optional
    permute (to undo a transposed key, or to put an image's features last)."""

    node: fx.Node
    permute: tuple[int, ...] | None = None
    view: tuple[int, ...] | None = None

    def op_shape(self, shape):
        """The shape the op sees, given the node's ``shape`` (None stays None)."""
        if shape is None:
            return None
        if self.view is not None:
            shape = self.view
        if self.permute is not None:
            shape = tuple(shape[i] for i in self.permute)
        return tuple(shape)


@dataclasses.dataclass
class AuxOperand:
    """An aux tensor of the op: ``node`` after an optional elementwise ``transform``
    (``"neg"`` for ``s - bias``, ``"reciprocal"`` for ``s / t``), or a bias table read by
    an ``add_table_aux`` op: ``"table"`` for an (H, T) or (T,) table, ``"table_t"`` for a
    (T, H) one (the op call passes it as (H, 1, T))."""

    node: fx.Node
    transform: str | None = None


@dataclasses.dataclass
class Site:
    kind: str
    anchor: fx.Node  # the activation node (or the sdpa call)
    output: fx.Node  # the node whose value the op call replaces
    q: Operand | None = None
    k: Operand | None = None
    v: Operand | None = None
    aux: list[AuxOperand] = dataclasses.field(default_factory=list)
    # Per-query / per-head score multipliers (temperatures) moved onto q: the op's q is
    # ``q * m`` for each, so their gradients flow through autograd outside the kernel.
    q_mul: list[AuxOperand] = dataclasses.field(default_factory=list)
    spec: AttentionSpec | None = None
    rank3: bool = False  # (B·H, N, D) operands: unsqueezed to 4-D around the op
    where: str = ""
    reason: str | None = None  # set for refusals
    mask_nodes: set = dataclasses.field(default_factory=set)  # read back as predicates
    # the per-axis window of a neighborhood site (``recognize.neighborhood``), for the report
    neighborhood: object = None
    # a token order the op runs in (``recognize.neighborhood.Layout``): q, k, v are put in
    # it before the op and the output back after; None: the program's order
    layout: object = None
    # bucketed local attention read back over the tokens (``recognize.bucketed``): the
    # site as the program bucketed it (dense attention per bucket), which CPU runs keep
    bucketed: Site | None = None
    # a shape the op's output is reshaped to (the program's output node: heads merged or
    # split from the (..., N, Dv) result); None: the op's own
    out_shape: tuple | None = None
    # a permute of the op's output before that reshape, the result made contiguous (a
    # bucketed image's output back in the image's layout: (B, heads, N, Dv) -> (B, heads,
    # Dv, N) for channels first)
    out_permute: tuple | None = None
    # checks of the mask and index analyses not yet run (``masks.deferring_proofs``): the
    # backend runs them before verifying and rewriting the site
    proofs: list = dataclasses.field(default_factory=list)

    @property
    def operand_nodes(self) -> list[fx.Node]:
        return [o.node for o in (self.q, self.k, self.v)] + [a.node for a in self.aux + self.q_mul]


# ---------------------------------------------------------------------------------------
# The score chain
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class ScoreChain:
    matmul: fx.Node
    ops: list[ScoreOp]
    aux: list[AuxOperand]
    nodes: list[fx.Node]  # chain nodes from the anchor's input back to (excluding) the matmul
    mask_nodes: set


def _is_tanh(x: fx.Node) -> bool:
    return (x.op == "call_function" and x.target in (torch.tanh, torch.nn.functional.tanh)) or (
        x.op == "call_method" and x.target == "tanh"
    )


def reaches_matmul(x, depth: int = 0) -> bool:
    """Whether ``x`` comes, through score-chain ops only, from a matmul."""
    return _score_matmul(x, depth) is not None


def _score_matmul(x, depth: int = 0) -> fx.Node | None:
    """The matmul ``x`` comes from through score-chain ops only, or None."""
    if not isinstance(x, fx.Node) or depth > 32:
        return None
    if x.op == "call_function" and x.target is torch.matmul:
        return x
    if G.is_cast(x) or _is_tanh(x):
        return _score_matmul(x.args[0], depth + 1)
    if x.op == "call_function" and x.target in (
        operator.mul,
        operator.truediv,
        operator.add,
        operator.sub,
    ):
        found = (_score_matmul(a, depth + 1) for a in x.args[:2])
        return next((m for m in found if m is not None), None)
    if x.op == "call_function" and x.target is torch.masked_fill:
        return _score_matmul(x.args[0], depth + 1)
    if x.op == "call_function" and x.target is torch.where and len(x.args) == 3:
        return _score_matmul(x.args[1], depth + 1) or _score_matmul(x.args[2], depth + 1)
    return None


def _head_dim(chain) -> object:
    """q's head dim (an int or a SymInt) of the matmul the scores come from: a scale
    computed from it (``q.size(-1) ** -0.5``) is read over ``spec.HEAD_DIM``."""
    mm = _score_matmul(chain)
    shp = G.shape(mm.args[0]) if mm is not None and isinstance(mm.args[0], fx.Node) else None
    return shp[-1] if shp else None


def walk_scores(start: fx.Node, score_shape: tuple, site_users: tuple = ()) -> ScoreChain:
    """Walk back from the activation's input to the ``q @ kᵀ`` matmul; ``site_users``:
    users of ``start`` that belong to the site (a row max subtracted before the softmax)."""
    ops: list[ScoreOp] = []  # collected anchor-first, reversed at the end
    aux: list[AuxOperand] = []
    nodes: list[fx.Node] = []
    mask_nodes: set = set()
    nq, nk = score_shape[-2], score_shape[-1]
    cur = start
    while True:
        if not isinstance(cur, fx.Node):
            raise NoMatch("score chain reaches a constant")
        if cur.op == "call_function" and cur.target is torch.matmul:
            break
        others = [u for u in G.live_users(cur) if not (cur is start and u in site_users)]
        if len(others) != 1:
            raise Refusal("scores have other users (e.g. returned or logged)", cur)
        nodes.append(cur)
        if G.is_cast(cur):
            cur = cur.args[0]
            continue
        if _is_tanh(cur) and len(cur.args) == 1:
            ops.append(ScoreOp("tanh"))  # soft-capping: c·tanh(s / c)
            cur = cur.args[0]
            continue
        if cur.op != "call_function":
            raise NoMatch(f"score chain op {cur.target} not understood")
        t, args = cur.target, cur.args

        if t in (operator.mul, operator.add, operator.truediv, operator.sub):
            a, b = args[0], args[1]
            if reaches_matmul(a):
                chain, other, chain_first = a, b, True
            elif reaches_matmul(b):
                chain, other, chain_first = b, a, False
            else:
                raise NoMatch("arithmetic not on the scores")
            if t in (operator.truediv, operator.sub) and not chain_first:
                raise NoMatch(f"{t.__name__} with the scores on the right")
            op = _arith_op(t, other, aux, score_shape, cur, _head_dim(chain))
            ops.extend(op if isinstance(op, list) else [op])
            cur = chain
            continue

        if t is torch.masked_fill:
            x, mask, value = args
            val = G.constant_value(value)
            if val is None:
                raise Refusal("masked_fill with a non-constant fill value", cur)
            op = _fill_op(mask, val, True, aux, mask_nodes, nq, nk, score_shape, cur)
            ops.extend(op if isinstance(op, list) else [op])
            cur = x
            continue

        if t is torch.where and len(args) == 3:
            cond, a, b = args
            if reaches_matmul(a):
                chain, other, fill_where = a, b, False
            elif reaches_matmul(b):
                chain, other, fill_where = b, a, True
            else:
                raise NoMatch("where not on the scores")
            val = G.constant_value(other)
            if val is None:
                raise Refusal("where() with a non-constant fill value", cur)
            op = _fill_op(cond, val, fill_where, aux, mask_nodes, nq, nk, score_shape, cur)
            ops.extend(op if isinstance(op, list) else [op])
            cur = chain
            continue
        raise NoMatch(f"score chain op {getattr(t, '__name__', t)} not understood")
    return ScoreChain(cur, list(reversed(ops)), aux, nodes, mask_nodes)


def _check_broadcast(other: fx.Node, score_shape: tuple, node: fx.Node) -> tuple:
    shp = G.shape(other)
    if shp is None:
        raise Refusal("operand of the scores has no shape information", node)
    if len(shp) > len(score_shape):
        raise Refusal("operand broadcasts the scores to a larger shape", node)
    for d_o, d_s in zip(reversed(shp), reversed(score_shape)):
        if not (d_o == 1 or d_o == d_s):
            raise Refusal(
                f"operand of shape {shp} does not broadcast to scores {score_shape}", node
            )
    return shp


def _arith_op(t, other, aux, score_shape, node, d=None) -> ScoreOp | list[ScoreOp]:
    nq, nk = score_shape[-2], score_shape[-1]
    expr = scalar_expr(other, nq, nk, d=d)
    if expr is not None:
        if t is operator.truediv:
            expr = 1 / expr
        elif t is operator.sub:
            expr = -expr
        val = as_float(expr)
        mul = t in (operator.mul, operator.truediv)
        if val is not None:
            return ScoreOp("mul" if mul else "add", val)
        return ScoreOp("mul_sym" if mul else "add_sym", expr=sympy.srepr(expr))
    if not isinstance(other, fx.Node) or not G.is_tensor(other):
        raise Refusal(f"score {t.__name__} by a symbolic or unknown value", node)
    shp = _check_broadcast(other, score_shape, node)
    if t in (operator.mul, operator.truediv):
        if len(shp) >= 1 and shp[-1] != 1 and score_shape[-1] != 1:
            raise Refusal("scale varies along the key axis", node)
        aux.append(AuxOperand(other, "reciprocal" if t is operator.truediv else None))
        return ScoreOp("mul_aux", aux=len(aux) - 1)
    if t is operator.add and G.dtype(other) is not None and G.dtype(other).is_floating_point:
        # An additive 0/-inf mask built from indices is a predicate fill.
        res = analyze_mask_operand(other, nq, nk, want_value=True)
        if res is not None and res[2] is not None and res[2] <= _HUGE_NEGATIVE:
            keep = MaskPredicate(sympy.Not(res[0]))
            if _rows_never_empty(keep):
                # s + v == v exactly (float32, bfloat16) for a v this large and finite
                # |s| < 1e29, so the values are a fill's.  The gradients are too only
                # where no row is fully masked (eager's gradient flows through the add;
                # a fill's is 0): a causal mask always keeps key 0.  (fp16's finfo.min,
                # -65504, is not large enough: it stays a tensor.)
                return ScoreOp("fill_pred", value=res[2], pred=keep.to_key())
    table = _table_bias(other, nq, nk, score_shape) if t is operator.add else None
    if table is not None:  # table[f(Q, K)]: no N×N tensor (NAT's relative position bias)
        node, form, expr = table
        aux.append(AuxOperand(node, form))
        return ScoreOp("add_table_aux", aux=len(aux) - 1, expr=sympy.srepr(expr))
    pos = _position_bias(other, nq, nk, score_shape)
    if pos is not None:  # slope × f(Q, K): no N×N tensor (ALiBi)
        slope, expr = pos
        aux.append(AuxOperand(slope, "neg" if t is operator.sub else None))
        return ScoreOp("add_pos_aux", aux=len(aux) - 1, expr=sympy.srepr(expr))
    # A bias that requires grad (a learnable relative position bias) gets its gradient from
    # the op's backward (ops.attention_aux_backward_op).
    aux.append(AuxOperand(other, "neg" if t is operator.sub else None))
    return ScoreOp("add_aux", aux=len(aux) - 1)


def _position_bias(other, nq, nk, score_shape):
    """``slope * f(arange…)`` (either order, through dtype moves): a tensor constant along
    queries and keys (per head, per batch) times an index expression of (Q, K).  Returns
    (slope node, expression) or None."""
    from attnfx.passes.masks import analyze_position

    x = _unwrap_views(other)
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target is operator.mul):
        return None
    for slope, term in ((x.args[0], x.args[1]), (x.args[1], x.args[0])):
        shp = G.shape(slope) if isinstance(slope, fx.Node) else None
        if shp is None or not G.dtype(slope).is_floating_point:
            continue
        if len(shp) >= 1 and shp[-1] != 1 or len(shp) >= 2 and shp[-2] != 1:
            continue  # the slope must not vary along queries or keys
        if G.shape(other) != G.shape(x) and len(shp) > len(score_shape):
            continue
        expr = analyze_position(term, nq, nk) if isinstance(term, fx.Node) else None
        if expr is not None:
            return slope, expr
    return None


def _table_bias(other, nq, nk, score_shape):
    """A small table read at an index tensor built from positions — ``table[:, idx]`` of an
    (H, T) table, ``table[idx]`` of a (T,) one, or ``table[idx].permute(2, 0, 1)`` of a
    (T, H) one (Swin's spelling), through views that add leading size-1 dims — with
    ``idx`` an index expression of (Q, K) (``masks.analyze_position``, checked on the
    materialized tensor).  Returns (table node, ``AuxOperand`` transform, expression) or
    None: the bias then stays an N×N tensor."""
    from attnfx.passes.masks import analyze_position

    if len(score_shape) != 4:
        return None  # (H, N, D) operands: the op's table view needs the head dim
    x, perm = other, None
    while isinstance(x, fx.Node) and x.op in ("call_function", "call_method"):
        src = x.args[0] if x.args else None
        if not isinstance(src, fx.Node):
            return None
        name = x.target if isinstance(x.target, str) else getattr(x.target, "__name__", "")
        if name in ("unsqueeze", "view", "reshape", "contiguous") and _strip_ones(
            G.shape(x)
        ) == _strip_ones(G.shape(src)):
            x = src  # leading size-1 dims only (same values, same order)
        elif name == "permute" and perm is None and _perm_args(x) == (2, 0, 1):
            perm, x = (2, 0, 1), src
        else:
            break
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target is operator.getitem):
        return None
    table, index = x.args
    tshape, dtype = G.shape(table), G.dtype(table)
    if tshape is None or dtype is None or not dtype.is_floating_point:
        return None
    if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None):
        idx, form = index[1], "table" if len(tshape) == 2 and perm is None else None
    elif isinstance(index, fx.Node):
        idx = index
        form = "table_t" if len(tshape) == 2 and perm else "table" if len(tshape) == 1 else None
        form = None if perm and len(tshape) != 2 else form
    else:
        return None
    if form is None or not isinstance(idx, fx.Node):
        return None
    idt = G.dtype(idx)
    if idt is None or idt.is_floating_point or idt == torch.bool:
        return None
    ishape = G.shape(idx)
    if ishape is None or len(ishape) != 2:
        return None
    heads = 1 if len(tshape) == 1 else tshape[1 if form == "table_t" else 0]
    if heads not in (1, score_shape[-3]):
        return None
    expr = analyze_position(idx, nq, nk)
    return None if expr is None else (table, form, expr)


def _strip_ones(shape):
    if shape is None:
        return None
    shape = list(shape)
    while shape and shape[0] == 1:
        shape.pop(0)
    return tuple(shape)


def _perm_args(n: fx.Node):
    dims = n.args[1:] if len(n.args) > 2 else n.args[1] if len(n.args) == 2 else None
    try:
        return tuple(int(d) for d in dims)
    except (TypeError, ValueError):
        return None


_AND = {
    operator.and_,
    torch.logical_and,
    torch.bitwise_and,
    "__and__",
    "logical_and",
    "bitwise_and",
}
_PASS_THROUGH = {"to", "expand", "bool", "contiguous"}


def _conjuncts(x: fx.Node, out: list) -> list:
    """The operands of a tree of ``&`` (through dtype/device moves and expands)."""
    x = _unwrap_views(x)
    t = x.target if isinstance(x, fx.Node) and x.op in ("call_function", "call_method") else None
    if t is not None and G.hashable(t) and t in _AND and len(x.args) == 2:
        for a in x.args:
            _conjuncts(a, out)
    else:
        out.append(x)
    return out


def _unwrap_views(x):
    """Through no-op slices (``mask[:, :, :, :n]`` where n is the full length) and
    dtype/device moves: the tensor the values come from."""
    while isinstance(x, fx.Node):
        if (
            x.op == "call_function"
            and x.target is operator.getitem
            and G.shape(x) == G.shape(x.args[0])
        ):
            x = x.args[0]
        elif (
            x.op == "call_method" and x.target in _PASS_THROUGH and G.shape(x) == G.shape(x.args[0])
        ):
            x = x.args[0]
        else:
            break
    return x


def _rows_never_empty(keep: MaskPredicate) -> bool:
    """Whether every query row keeps at least one key, for all lengths: causal with a
    constant offset >= 0 keeps key 0 in every row."""
    c = keep.mask_class
    return c.kind == "causal" and c.right is not None and c.right.is_number and c.right >= 0


def conjunct_fills(cond, v, aux, score_shape, node) -> list[ScoreOp] | None:
    """Fill with ``v`` where ``a & b & ...`` is False, as one fill per conjunct: an index
    predicate where one can be read (so the kernel skips blocks), the tensor otherwise.
    Filling with ``v`` where any conjunct is False is filling where their conjunction is.
    None when no conjunct is a predicate (nothing gained over one tensor mask)."""
    if G.shape(cond) is None:
        return None
    parts = _conjuncts(_unwrap_views(cond), [])
    if len(parts) < 2:
        return None
    nq, nk = score_shape[-2], score_shape[-1]
    for p in parts:
        if not isinstance(p, fx.Node) or G.dtype(p) is not torch.bool:
            return None
        _check_broadcast(p, score_shape, node)
    ops, new_aux = [], []
    for p in parts:
        pred = analyze_mask_operand(p, nq, nk)
        if pred is not None and pred[0] is sympy.true:
            continue  # an all-True conjunct (HF starts its mask from ones)
        if pred is not None:
            ops.append(ScoreOp("fill_pred", value=v, pred=MaskPredicate(pred[0]).to_key()))
        else:
            new_aux.append(AuxOperand(p))
            ops.append(
                ScoreOp("fill_aux", value=v, aux=len(aux) + len(new_aux) - 1, fill_where=False)
            )
    if not any(op.pred is not None for op in ops):  # no conjunct became a predicate
        return None
    aux.extend(new_aux)
    return ops


def _fill_op(
    mask, val, fill_where, aux, mask_nodes, nq, nk, score_shape, node
) -> ScoreOp | list[ScoreOp]:
    if not isinstance(mask, fx.Node) or not G.is_tensor(mask):
        raise Refusal("mask is not a tensor", node)
    _check_broadcast(mask, score_shape, node)
    pred = analyze_mask_operand(mask, nq, nk)
    if pred is not None:
        expr, nodes = pred
        keep = sympy.Not(expr) if fill_where else expr
        mask_nodes |= nodes
        return ScoreOp("fill_pred", value=val, pred=MaskPredicate(keep).to_key())
    if not fill_where:
        split = conjunct_fills(mask, val, aux, score_shape, node)
        if split is not None:
            return split
    aux.append(AuxOperand(mask))
    return ScoreOp("fill_aux", value=val, aux=len(aux) - 1, fill_where=fill_where)


def analyze_mask_operand(mask: fx.Node, nq, nk, want_value: bool = False):
    """The mask as a predicate over (Q, K), or None (then it stays a tensor).  With
    ``want_value``, a numeric mask's one nonzero value is returned too."""
    from attnfx.passes.masks import analyze_mask

    try:
        res = analyze_mask(mask, nq, nk)
    except Exception as e:  # noqa: BLE001 - analysis failure means "keep the tensor"
        debug("mask analysis of %s failed: %s", mask, e)
        return None
    if res.predicate is None:
        debug("mask %s stays a tensor: %s", mask, res.reason)
        return None
    if want_value:
        return res.predicate.expr, set(res.nodes), res.value
    if res.value is not None:  # numeric masks are only read as additive -inf masks
        return None
    return res.predicate.expr, set(res.nodes)


# ---------------------------------------------------------------------------------------
# Operands
# ---------------------------------------------------------------------------------------


def strip_scalar_scale(x: fx.Node) -> tuple[fx.Node, list[float]]:
    """Fold ``x * c`` / ``x / c`` (constants, x feeding only the product) into the scale."""
    scales = []
    while (
        isinstance(x, fx.Node)
        and x.op == "call_function"
        and x.target in (operator.mul, operator.truediv)
        and len(G.live_users(x)) == 1
    ):
        a, b = x.args[0], x.args[1]
        ca, cb = G.constant_value(a), G.constant_value(b)
        if cb is not None and isinstance(a, fx.Node):
            scales.append(cb if x.target is operator.mul else 1.0 / cb)
            x = a
        elif ca is not None and x.target is operator.mul and isinstance(b, fx.Node):
            scales.append(ca)
            x = b
        else:
            break
    return x, scales


def _as_permutation(node: fx.Node) -> tuple[fx.Node, list[int]] | None:
    rank = len(G.shape(node) or ())
    if node.op != "call_function":
        return None
    if node.target is torch.transpose:
        src, d0, d1 = node.args
        d0, d1 = G.resolve_dim(d0, rank), G.resolve_dim(d1, rank)
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return src, perm
    if node.target is torch.permute:
        src, dims = node.args
        return src, [G.resolve_dim(d, rank) for d in dims]
    return None


def key_operand(b: fx.Node) -> Operand:
    """``b`` is kᵀ: find k.  ``b`` must be a transposed or permuted view whose last two dims
    are swapped relative to a layout with the head dim last, so that k is a view again."""
    p = _as_permutation(b)
    if p is None:
        raise Refusal("key operand is not a transposed view (k is not transposed)", b)
    src, perm = p
    kperm = perm[:-2] + [perm[-1], perm[-2]]
    if kperm == list(range(len(perm))):
        return Operand(src)
    return Operand(src, tuple(kperm))


def strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """Undo a materialized GQA head repeat: ``x[:, :, None].expand(B, Hk, g, N, D)
    .reshape(B, Hk·g, N, D)`` or ``x.repeat_interleave(g, dim=1)``; returns (x, g)."""
    n = node
    if (
        n.op == "call_function"
        and n.target is torch.repeat_interleave
        or (n.op == "call_method" and n.target == "repeat_interleave")
    ):
        x = n.args[0]
        reps = n.args[1] if len(n.args) > 1 else n.kwargs.get("repeats")
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
        shp = G.shape(x)
        if (
            isinstance(reps, int)
            and shp is not None
            and len(shp) == 4
            and G.resolve_dim(dim, 4) == 1
        ):
            return x, reps
        return node, 1
    if (
        n.op == "call_method"
        and n.target in ("reshape", "view")
        or (n.op == "call_function" and n.target is torch.reshape)
    ):
        e = n.args[0]
        if not isinstance(e, fx.Node) or not (e.op == "call_method" and e.target == "expand"):
            return node, 1
        u = e.args[0]
        eshape, ushape, oshape = G.shape(e), G.shape(u), G.shape(n)
        if (
            eshape is None
            or ushape is None
            or oshape is None
            or len(eshape) != 5
            or len(oshape) != 4
        ):
            return node, 1
        # u must be x with a new unit axis at 2: x[:, :, None] or x.unsqueeze(2)
        x = None
        if (
            u.op == "call_function"
            and u.target is operator.getitem
            and isinstance(u.args[1], tuple)
        ):
            idx = u.args[1]
            full = slice(None, None, None)
            if (
                len(idx) >= 3
                and idx[0] == full
                and idx[1] == full
                and idx[2] is None
                and all(i == full for i in idx[3:])
            ):
                x = u.args[0]
        elif u.op == "call_method" and u.target == "unsqueeze" and G.resolve_dim(u.args[1], 5) == 2:
            x = u.args[0]
        if x is None or ushape[2] != 1:
            return node, 1
        b, hk, g, nn, d = eshape
        if (
            oshape[0] == b
            and oshape[1] == hk * g
            and oshape[2] == nn
            and oshape[3] == d
            and isinstance(g, int)
        ):
            return x, g
    return node, 1


def only_prob_user(cur: fx.Node) -> fx.Node:
    """The one live user of the probabilities ``cur``; a Refusal when they have others."""
    live = G.live_users(cur)
    if len(live) != 1:
        raise Refusal("attention probabilities have other users (e.g. output_attentions=True)", cur)
    return live[0]


def walk_probs(anchor: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Forward from the activation through casts and identity dropout to ``p @ v``."""
    cur, nodes = anchor, []
    while True:
        u = only_prob_user(cur)
        if G.is_cast(u):
            cur = u
            nodes.append(u)
            continue
        is_dropout, why = G.dropout_identity(u)
        if is_dropout:
            if why:
                raise Refusal(why, u)
            cur = u
            nodes.append(u)
            continue
        if (
            u.op == "call_function"
            and u.target is torch.matmul
            and u.args[0] is cur
            and u.args[1] is not cur
        ):
            return u, nodes
        raise NoMatch("probabilities are not multiplied by values")


def depends_on(x: fx.Node, target: fx.Node, limit: int = 2000) -> bool:
    """Whether ``target`` is upstream of ``x``."""
    seen, stack = set(), [x]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def check_head_dims(d, dv, node):
    for name, x in (("qk", d), ("v", dv)):
        if isinstance(x, torch.SymInt):
            # dynamic=True: the op reads the head dim from q and v when it runs.  The
            # comparisons guard the graph on the kernels' range, so a head dim outside it
            # recompiles (and is kept there) instead of reaching the op.
            if MIN_HEAD_DIM <= x and x <= MAX_HEAD_DIM:
                continue
            x = x.node.hint if isinstance(x.node.hint, int) else x
        if not isinstance(x, int):
            raise Refusal(f"symbolic head dim ({name})", node)
        if not MIN_HEAD_DIM <= x <= MAX_HEAD_DIM:
            raise Refusal(
                f"head dim {x} ({name}) unsupported: the kernel takes {MIN_HEAD_DIM}..{MAX_HEAD_DIM}",
                node,
            )


def check_dtypes(q, k, v, node) -> torch.dtype:
    dts = {G.dtype(q), G.dtype(k), G.dtype(v)}
    if len(dts) != 1:
        raise Refusal(f"mixed q/k/v dtypes {sorted(str(d) for d in dts)}", node)
    (dt,) = dts
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise Refusal(f"dtype {dt} unsupported", node)
    return dt


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def static_dim(x) -> int | None:
    """A head dim for the spec: the int, or None for a symbolic one (read at run time)."""
    return x if isinstance(x, int) else None
