"""Bucketed local attention: a neighborhood written with padding and look-around.

Local attention is often written on buckets rather than on tokens (Parmar et al., "Image
Transformer", ICML 2018; Vaswani et al., "Scaling Local Self-Attention for Parameter
Efficient Visual Backbones" (HaloNet), CVPR 2021): q is reshaped into buckets of ``w``
queries, k and v into the same buckets and then each bucket is joined by its neighbours
(``F.pad`` on the bucket axis, then ``cat`` of shifted slices, or ``unfold``), the
scores are a batched ``(w, (b+f+1)·w)`` product per bucket, a mask built from the token
positions (padded the same way, with a sentinel) fills the padded slots and, for causal
models, the future, and the output is reshaped back.  The softmax recognizer matches such
a site as dense attention over the buckets (the buckets as heads, a tensor mask); this
module reads it back as attention over the tokens, so the kernels run a band over the
unbucketed q, k, v, with no copies of k and v and no N-sized mask tensor.

How a site is read back (``unbucket``), everything at the site's static sizes:

1. Each of q, k, v is followed back through data movement only (views, permutes,
   ``pad``, slicing, ``cat``, ``stack``, ``unfold``...) to a candidate source, the
   farthest first.  The movement is replayed on the source's element ids (a padded slot
   gets id -1): that gives, for every row of the bucketed operand, the source row it
   holds.  A source is (..., N, D) with the feature dim moved as it is.
2. The site's fills (tensor masks from positions and constants, index predicates over
   the bucket grid) are evaluated at their sizes: the bucket grid's keep-mask.
3. Accepted only when: every query token is one bucketed query row (a bijection), every
   padded key slot is masked, a kept key has the query's batch and head, no key is kept
   twice in a row, each query's kept keys are an interval of tokens, the same for every
   batch and head, v moves as k does (the pad of v finite: a masked slot's probability
   is exactly 0), and the output is moved back to the tokens' order (``view(B, N, D)``).
4. The intervals' ends are written as ``max(0, w·(Q // w) + a, Q + c)`` and ``min(...)``
   forms (a bucket-aligned bound, a band bound, or both) and checked equal on every
   query: that predicate then keeps exactly the pairs the buckets keep, and the site
   becomes softmax attention over the tokens with it (``neighborhood.label`` names the
   window).

Edge semantics: the program's — a truncated window at the first buckets (the padding is
masked), causal by token when the program masks by position; a query with no kept key is
refused (not read back).  One difference on non-finite values: the bucketed program never
reads a v row outside a query's buckets, while the op multiplies a masked key's zero
probability by its v row wherever a tile holds both, so an infinite or NaN v outside the
window turns nearby rows NaN (the verifier keeps a site whose example inputs show it).  On CPU the op's path runs a token mask densely (N² work) where
the bucketed form does N·(b+f+1)·w, so with ``cpu="auto"`` a CPU site stays bucketed
(``Site.bucketed`` keeps that form; ``backend.rewrite_graph`` picks it).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from attnfx.passes import graph as G
from attnfx.passes.match import Operand, Site, debug
from attnfx.predicate import K, MaskPredicate, Q
from attnfx.spec import ScoreOp

# Data movement: each output element is one input element (or a pad) — replayed on ids.
_MOVE_METHODS = {
    "view", "reshape", "permute", "transpose", "contiguous", "unfold", "expand",
    "unsqueeze", "squeeze", "flatten", "unflatten", "narrow", "select", "movedim",
    "swapaxes", "t", "clone", "roll", "flip", "split", "chunk", "unbind", "repeat",
}  # fmt: skip
_MOVE_FUNCTIONS = {
    operator.getitem, torch.reshape, torch.permute, torch.transpose, torch.unsqueeze,
    torch.squeeze, torch.flatten, torch.unflatten, torch.narrow, torch.select,
    torch.movedim, torch.swapaxes, torch.cat, torch.concat, torch.concatenate,
    torch.stack, torch.roll, torch.flip, torch.clone, torch.split, torch.chunk,
    torch.unbind, F.pad, torch._C._nn.pad,
}  # fmt: skip
# What makes a key operand look around its bucket: padding, joins, sliding windows.
_LOOK_AROUND_METHODS = {"unfold"}
_LOOK_AROUND_FUNCTIONS = {
    torch.cat,
    torch.concat,
    torch.concatenate,
    torch.stack,
    F.pad,
    torch._C._nn.pad,
}
_PADS = (F.pad, torch._C._nn.pad)
_PAD_ID = -1
# Replays hold int64 ids of every element of the operands: past this many, not read back.
_MAX_ELEMENTS = 1 << 27


class _No(Exception):
    """The site is not read back (the reason goes to the debug log)."""


def _is_move(n) -> bool:
    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_method":
        return n.target in _MOVE_METHODS
    return n.op == "call_function" and n.target in _MOVE_FUNCTIONS


def _inputs(n: fx.Node) -> list[fx.Node]:
    """The tensor inputs a movement node moves (a ``cat``'s list included)."""
    return [a for a in n.all_input_nodes if isinstance(G.example_value(a), (torch.Tensor, tuple))]


def _looks_around(node: fx.Node) -> bool:
    """Whether ``node`` is moved from its source through a pad, a join or ``unfold``:
    the cheap test before any replay (plain attention's k is a view of a projection)."""
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        if not _is_move(n):
            continue
        if n.target in (_LOOK_AROUND_METHODS if n.op == "call_method" else _LOOK_AROUND_FUNCTIONS):
            return True
        for a in _inputs(n):
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


def _chain(node: fx.Node) -> list[fx.Node]:
    """The nodes every movement path from ``node`` back passes through, nearest first,
    ending at the first node that is not data movement: the candidate sources."""
    out = [node]
    cur = node
    while _is_move(cur):
        ins = _inputs(cur)
        if not ins:
            break
        if len(ins) == 1:
            cur = ins[0]
        else:  # a cat / stack: where the paths of all its inputs meet
            chains = [_chain(i) for i in ins]
            common = [x for x in chains[0] if all(x in c for c in chains[1:])]
            if not common:
                break
            cur = common[0]
        out.append(cur)
    return out


def _between(src: fx.Node, dst: fx.Node) -> list[fx.Node]:
    """The movement nodes on the paths from ``src`` to ``dst``, in graph order."""
    seen, stack, nodes = {dst}, [dst], []
    while stack:
        n = stack.pop()
        if n is src:
            continue
        if not _is_move(n):
            raise _No(f"{n.name} is not data movement")
        nodes.append(n)
        for a in _inputs(n):
            if a not in seen:
                seen.add(a)
                stack.append(a)
    order = {n: i for i, n in enumerate(dst.graph.nodes)}
    return sorted(nodes, key=order.__getitem__)


def _replay(nodes: list[fx.Node], env: dict) -> dict:
    """Run the movement ``nodes`` on the id tensors of ``env`` (pads filled with -1)."""
    env = dict(env)

    def arg(a):
        if a not in env:
            raise _No(f"{a.name} is not a static size or a moved tensor")
        return env[a]

    for n in nodes:
        args = fx.node.map_arg(n.args, arg)
        kwargs = dict(fx.node.map_arg(n.kwargs, arg))
        if n.op == "call_function" and n.target in _PADS:
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            if mode != "constant":
                raise _No(f"{mode} padding")
            args, kwargs = (args[0], args[1]), {"value": _PAD_ID}
        elif n.op == "call_function" and n.target is operator.getitem:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if isinstance(args[0], torch.Tensor) and any(
                not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in idx
            ):
                raise _No("an indexing that is not slices")
        try:
            if n.op == "call_method":
                out = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                out = n.target(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a form the replay cannot run: not read back
            raise _No(f"replaying {n.name}: {type(e).__name__}: {e}") from e
        env[n] = out
    return env


def _ids(node: fx.Node) -> torch.Tensor:
    shape = G.shape(node)
    if shape is None or not all(isinstance(s, int) for s in shape):
        raise _No(f"{node.name} has no static shape")
    if math.prod(shape) > _MAX_ELEMENTS:
        raise _No("operands too large to replay")
    return torch.arange(math.prod(shape)).view(shape)


@dataclasses.dataclass
class _Source:
    node: fx.Node
    rows: torch.Tensor  # (G, R): the source row each grid row holds, -1 for a pad
    pads: list  # the pad nodes on the way (their values)
    lead: tuple  # the source's dims before (N, D)
    n: int


def _read(operand: Operand, want: tuple | None = None) -> _Source:
    """The farthest source ``operand`` (the op's q, k or v as the site reads it) moves,
    whose rows it holds whole: (..., N, D) with the feature dim unchanged."""
    for src in _reads(operand, want):
        return src
    raise _No(f"no token source for {operand.node.name}")


def _reads(operand: Operand, want: tuple | None = None):
    """Each source ``operand`` may be read from (see ``_read``), the farthest first."""
    start = operand.node
    for src in reversed(_chain(start)[1:]):
        shape = G.shape(src)
        if (
            shape is None
            or len(shape) not in (3, 4)
            or not isinstance(G.example_value(src), torch.Tensor)
        ):
            continue
        if want is not None and tuple(shape[:-1]) != want:
            continue
        try:
            nodes = _between(src, start)
            env = _replay(nodes, {src: _ids(src)})
        except _No as e:
            debug("bucketed: %s is not read from %s: %s", start, src, e)
            continue
        got = env[start]
        if operand.permute is not None:
            got = got.permute(operand.permute)
        d = shape[-1]
        if got.shape[-1] != d:
            continue
        first = got[..., :1]
        pad = first == _PAD_ID
        feat = torch.arange(d)
        ok = torch.where(
            pad, (got == _PAD_ID).all(-1, keepdim=True), (got - first == feat).all(-1, keepdim=True)
        )
        if not bool(ok.all()) or bool((((first % d) != 0) & ~pad).any()):
            continue  # a row is not one source row, feature by feature
        rows = torch.where(pad, torch.full_like(first, _PAD_ID), first // d).squeeze(-1)
        rows = rows.reshape(-1, rows.shape[-1])  # (G, R): a bucket (joined) per group
        if not _one_lead(rows, shape[-2]) or (want is None and not _each_once(rows, shape)):
            continue  # (the token axis is another one: heads before tokens, say)
        pads = [n for n in nodes if n.op == "call_function" and n.target in _PADS]
        yield _Source(src, rows, pads, tuple(shape[:-2]), shape[-2])


def _one_lead(rows: torch.Tensor, n: int) -> bool:
    """Whether each group's rows (pads aside) are tokens of one batch and head."""
    lead = torch.where(rows >= 0, rows // n, -1)
    top = lead.max(-1, keepdim=True).values
    return bool(((lead == top) | (lead < 0)).all())


def _each_once(rows: torch.Tensor, shape) -> bool:
    """Whether the query rows hold every source row once, in buckets smaller than N."""
    total = math.prod(shape[:-1])
    flat = rows.reshape(-1)
    return (
        flat.numel() == total
        and shape[-2] > rows.shape[-1]
        and torch.equal(flat.sort().values, torch.arange(total))
    )


def _grid_keep(site: Site, shape: tuple) -> tuple[torch.Tensor, float]:
    """The bucket grid's keep-mask (scores shape) from the site's fills, and their value."""
    from attnfx.passes import masks

    *lead, nq, nk = shape
    keep = torch.ones(shape, dtype=torch.bool)
    value = None
    for op in site.spec.score_ops:
        form, operand = op.entry.form, op.entry.operand
        if form == "mul" and operand == "const" and 0 < op.value < math.inf:
            continue
        if form != "fill" or operand not in ("aux", "pred"):
            raise _No(f"score op {op.entry.name}")
        if value is not None and op.value != value:
            raise _No("fills of different values")
        value = op.value
        if operand == "pred":
            q = torch.arange(nq).view(nq, 1)
            k = torch.arange(nk).view(1, nk)
            hit = ~torch.as_tensor(op.predicate.evaluate(q, k, nq, nk), dtype=torch.bool)
        else:
            a = site.aux[op.aux]
            if a.transform is not None:
                raise _No("a transformed mask")
            t = masks.constant_tensor(a.node)
            if t is None:
                raise _No("a mask that depends on the inputs")
            hit = (t != 0) if op.fill_where else (t == 0)
        keep &= ~hit.expand(shape)
    if value is None:
        raise _No("no fill: nothing bucketed is masked")
    if not (value == -math.inf or value <= -1e30):
        raise _No(f"fill value {value:g} keeps masked slots in the normalizer")
    return keep, value


def _fit(ends: torch.Tensor, w: int, n: int, lower: bool) -> list | None:
    """The bound terms that give ``ends`` (each query's first / last kept key) exactly:
    ``max(0, w·(Q//w) + a, Q + c)`` (``min(n-1, ...)`` for the last), some terms left
    out; None when no such form fits."""
    q = torch.arange(n)
    base = {"bucket": w * (q // w), "band": q}
    clamp = torch.zeros_like(q) if lower else torch.full_like(q, n - 1)
    for names in ((), ("bucket",), ("band",), ("bucket", "band")):
        fit = clamp
        consts = {}
        for name in names:
            gap = ends - base[name]
            c = int(gap.min() if lower else gap.max())
            consts[name] = c
            fit = (
                torch.maximum(fit, base[name] + c) if lower else torch.minimum(fit, base[name] + c)
            )
        if torch.equal(fit, ends):
            out = []
            for name, c in consts.items():
                term = (w * sympy.floor(Q / w) if name == "bucket" else Q) + c
                out.append(K >= term if lower else K <= term)
            return out
    return None


def _output(site: Site, src_shape: tuple, qrows: torch.Tensor, dv: int) -> fx.Node:
    """The node after the output's movement where it is back in the tokens' order: the
    (..., N, Dv) output, whose element for token row r is the bucketed output row holding
    r, in some shape (flattened, the same elements in the same order)."""
    pv = site.output
    want = (*src_shape[:-1], dv)
    cur, path = pv, []
    ids = _ids(pv)
    grid = ids.reshape(-1, ids.shape[-2], dv)  # (G, R, Dv): grid element ids
    expected = torch.empty((math.prod(want[:-1]), dv), dtype=torch.long)
    expected[qrows.reshape(-1)] = grid.reshape(-1, dv)
    expected = expected.view(want)
    while True:
        users = G.live_users(cur)
        if len(users) != 1 or not _is_move(users[0]) or len(_inputs(users[0])) != 1:
            break
        cur = users[0]
        path.append(cur)
        shape = G.shape(cur)
        if shape is None or math.prod(shape) != expected.numel():
            continue
        env = _replay(path, {pv: ids})
        if torch.equal(env[cur].reshape(-1), expected.reshape(-1)):
            return cur  # (a reshape of the tokens-order output: heads split or merged)
    raise _No("the output is not moved back to the tokens' order")


def read_back(site: Site) -> Site:
    """The site as attention over the tokens (see the module docstring); raises _No."""
    spec = site.spec
    if spec.activation != "softmax" or spec.sink is not None or site.q_mul or spec.gqa_group != 1:
        raise _No("not plain softmax attention")
    if site.layout is not None:
        raise _No("already in a token order")
    if not _looks_around(site.k.node):
        raise _No("k is not padded, joined or unfolded")
    qs, vs = G.shape(site.q.node), G.shape(site.v.node)
    if qs is None or vs is None or not all(isinstance(s, int) for s in (*qs, *vs)):
        raise _No("not static sizes")
    # q: every token once, in buckets of one batch and head; k and v: from sources of
    # the same shape (a q source whose k has none is the wrong token axis: the next one)
    for q in _reads(site.q):
        try:
            k = _read(site.k, want=(*q.lead, q.n))
            v = _read(site.v, want=(*q.lead, q.n))
            break
        except _No:
            continue
    else:
        raise _No("no token sources for q, k and v")
    nq_grid = q.rows.shape[-1]
    total = math.prod(q.lead) * q.n
    if not torch.equal(k.rows, v.rows):
        raise _No("v is not moved as k is")
    for p in v.pads:
        value = p.args[3] if len(p.args) > 3 else p.kwargs.get("value", 0.0)
        if value is None:
            value = 0.0
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _No("v padded with a value that is not a finite constant")
    ks = list(G.shape(site.k.node))
    if site.k.permute is not None:
        ks = [ks[i] for i in site.k.permute]
    keep, value = _grid_keep(site, (*qs[:-1], ks[-2]))
    keep = keep.reshape(-1, nq_grid, ks[-2])  # (G, R, J)
    krows = k.rows[:, None, :].expand_as(keep)
    if bool((keep & (krows == _PAD_ID)).any()):
        raise _No("a padded key slot is not masked")
    n = q.n
    qrow = q.rows[:, :, None].expand_as(keep)
    if bool((keep & (krows // n != qrow // n)).any()):
        raise _No("a kept key of another batch or head")
    tok = torch.where(keep, krows % n, n)
    srt = tok.sort(-1).values
    if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] < n)).any()):
        raise _No("a key kept twice in a query's row")
    count = keep.sum(-1)
    if bool((count == 0).any()):
        raise _No("a query with no kept key")
    lo = tok.min(-1).values
    hi = torch.where(keep, krows % n, -1).max(-1).values
    if not bool((hi - lo + 1 == count).all()):
        raise _No("a query's kept keys are not an interval of tokens")
    lo_tok = torch.empty(total, dtype=torch.long)
    hi_tok = torch.empty(total, dtype=torch.long)
    lo_tok[q.rows.reshape(-1)] = lo.reshape(-1)
    hi_tok[q.rows.reshape(-1)] = hi.reshape(-1)
    lo_tok, hi_tok = lo_tok.view(-1, n), hi_tok.view(-1, n)
    if not (bool((lo_tok == lo_tok[:1]).all()) and bool((hi_tok == hi_tok[:1]).all())):
        raise _No("the window differs between batches or heads")
    lower = _fit(lo_tok[0], nq_grid, n, lower=True)
    upper = _fit(hi_tok[0], nq_grid, n, lower=False)
    if lower is None or upper is None:
        raise _No("the window's ends are not of a bucket or band form")
    out = _output(site, G.shape(q.node), q.rows, vs[-1])
    ops = [op for op in spec.score_ops if op.entry.form == "mul"]
    if lower or upper:
        pred = MaskPredicate(sympy.And(*lower, *upper))
        ops.append(ScoreOp("fill_pred", value=value, pred=pred.to_key()))
    from attnfx.passes.recognize.softmax import _layout

    rank3 = len(G.shape(q.node)) == 3
    want = (*G.shape(q.node)[:-1], vs[-1])
    out_shape = tuple(G.shape(out)) if tuple(G.shape(out)) != want else None
    new = dataclasses.replace(
        spec,
        score_ops=tuple(ops),
        aux_dtypes=(),
        aux_bcast=(),
        # (a reshaped output is the op's (B, H, N, Dv) result viewed: its own order)
        out_layout="bhnd" if rank3 or out_shape is not None else _layout(out),
    )
    return dataclasses.replace(
        site,
        output=out,
        out_shape=out_shape,
        q=Operand(q.node),
        k=Operand(k.node),
        v=Operand(v.node),
        aux=[],
        spec=new,
        rank3=rank3,
        mask_nodes=set(),
        bucketed=site,
    )


def unbucket(sites: list[Site]) -> None:
    """Replace each bucketed local-attention site of ``sites`` by its reading over the
    tokens, in place (the bucketed reading stays in ``Site.bucketed``)."""
    for i, s in enumerate(sites):
        if s.spec is None or s.kind != "softmax":
            continue
        try:
            sites[i] = read_back(s)
        except _No as e:
            debug("softmax at %s is not bucketed local attention: %s", s.anchor, e)


__all__ = ["read_back", "unbucket"]
