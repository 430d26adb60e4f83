"""Bucketed local attention: a neighborhood written with padding and look-around.

Local attention is often written on buckets rather than on tokens (Parmar et al., "Image
Transformer", ICML 2018; Vaswani et al., "Scaling Local Self-Attention for Parameter
Efficient Visual Backbones" (HaloNet), CVPR 2021): q is reshaped into buckets of ``w``
queries, k and v into the same buckets and then each bucket is joined by its neighbours
(``F.pad`` on the bucket axis, then ``cat`` of shifted slices, or ``unfold``), the
scores are a batched ``(w, (b+f+1)·w)`` product per bucket, a mask built from the token
positions (padded the same way, with a sentinel) fills the padded slots and, for causal
models, the future, and the output is reshaped back.  HaloNet's 2-D form does the same on
an image (B, C, H, W) or (B, H, W, C), C = heads·D: q cut into b×b blocks, k and v into
(b + 2·halo)² windows with stride b over the image padded by ``halo`` (``F.pad`` +
``Tensor.unfold`` per spatial axis, or ``F.unfold``: im2col), a mask cut the same way
from a ones image (0 on the padding).  The softmax recognizer matches such a site as
dense attention over the buckets (the buckets as heads, a tensor mask); this module reads
it back as attention over the tokens, so the kernels run a band (or a 2-D window) over
the unbucketed q, k, v, with no copies of k and v and no N-sized mask tensor.

How a site is read back (``unbucket``), everything at the site's static sizes:

1. Each of q, k, v is followed back through data movement only (views, permutes,
   ``pad``, slicing, ``cat``, ``stack``, ``unfold``, ``F.unfold``...) to a candidate
   source, the farthest first.  The movement is replayed on the source's element ids (a
   padded slot gets id -1; im2col runs on ids + 1 with its zero padding, less 1): that
   gives, for every row of the bucketed operand, the token row it holds.  A source holds
   tokens as (..., N, D) with the feature dim moved as it is (a sequence), or as an
   image whose channels split into (heads, D), channels first or last: the op then reads
   it reshaped and permuted to (B, heads, H·W, D) (``Operand.view``, ``.permute``), over
   a row-major H×W token grid.
2. The site's fills (tensor masks from positions and constants, index predicates over
   the bucket grid) are evaluated at their sizes: the bucket grid's keep-mask.
3. Accepted only when: every query token is one bucketed query row (a bijection), every
   padded key slot is masked, a kept key has the query's batch and head, no key is kept
   twice in a row, each query's kept keys are an interval of tokens (on an image: a box,
   an interval per axis), the same for every batch and head, v moves as k does (the pad
   of v finite: a masked slot's probability is exactly 0), q's blocks (on an image) are
   boxes that tile the grid, and the output is moved back to the tokens' order
   (``view(B, N, D)``) or, once permuted, to the image's layout (``Site.out_permute``).
   Where one reading of the sources fails, the next is tried; each is exact.
4. Per axis (the token on a sequence; ``Q // W`` and ``Q % W`` on an H×W grid) the
   intervals' ends are written as ``max(0, w·(q // w) + a, q + c)`` and
   ``min(n - 1, ...)`` forms (a block-aligned bound, a band bound, or both; ``w`` the
   block's side on that axis) and checked equal on every query: their AND then keeps
   exactly the pairs the buckets keep, and the site becomes softmax attention over the
   tokens with it (``neighborhood.label`` names the window: 1-D, or 2-D on the grid).

Edge semantics: the program's — a truncated window at the first buckets (the padding is
masked), causal by token when the program masks by position; on an image each axis's
window is cut at the border (a border block keeps fewer keys, it does not shift inward as
NATTEN's does); a query with no kept key is refused (not read back).  Padding that is not
masked (k and v padded with zeros and no mask, as timm's ``HaloAttn``) is a softmax over
the pads too: not read back.  One difference on non-finite values: the bucketed program
never reads a v row outside a query's buckets, while the op multiplies a masked key's
zero probability by its v row wherever a tile holds both, so an infinite or NaN v
outside the window turns nearby rows NaN (the verifier keeps a site whose example inputs
show it).  On CPU the op's path runs a token mask densely (N² work) where the bucketed
form does N·(b+f+1)·w, so with ``cpu="auto"`` a CPU site stays bucketed (``Site.bucketed``
keeps that form; ``backend.rewrite_graph`` picks it).
"""

from __future__ import annotations

import dataclasses
import itertools
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
    torch.unbind, F.pad, torch._C._nn.pad, F.unfold, torch._C._nn.im2col,
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
    F.unfold,
    torch._C._nn.im2col,
}
_PADS = (F.pad, torch._C._nn.pad)
# im2col: sliding windows over an image padded with zeros (pure movement)
_IM2COL = (F.unfold, torch._C._nn.im2col)
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
            if n.op == "call_function" and n.target in _IM2COL:
                # (no integer im2col: ids + 1 in float64, exact below 2^53, so that its
                # zero padding reads back as the pad id -1)
                x = (args[0] + 1).double()
                out = n.target(x, *args[1:], **kwargs).round().long() - 1
            elif n.op == "call_method":
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
    rows: torch.Tensor  # (G, R): the token row each grid row holds, -1 for a pad
    pads: list  # the pad nodes on the way (their values)
    lead: tuple  # the token view's dims before (N, D)
    n: int
    grid: tuple  # the token axis as a row-major grid: (N,), or (H, W) for an image
    view: tuple | None = None  # the op's operand: the node reshaped to ``view``...
    permute: tuple | None = None  # ... and permuted (an image's features last)

    @property
    def key(self) -> tuple:
        """What the sources of q, k and v share: the batch and head dims and the grid."""
        return (self.lead, self.n, self.grid)


def _token_views(shape: tuple, d: int):
    """The ways a tensor of ``shape`` may hold tokens of ``d`` features, as the op's
    (..., N, D): (view, permute, lead, N, grid).  Features last as they are (a sequence);
    or an image with its channels split as (heads, D), channels first (B, C, H, W) or
    last (B, H, W, C), reshaped and permuted to (B, heads, H·W, D) over an (H, W) grid."""
    if len(shape) in (3, 4) and shape[-1] == d:
        yield None, None, tuple(shape[:-2]), shape[-2], (shape[-2],)
    if len(shape) == 4:
        # (an image with a side of 1 is a sequence: read as one, its reading starts
        # nearer the site, e.g. after a copy written in place)
        b, c, h, w = shape
        if c % d == 0 and h > 1 and w > 1:
            yield (b, c // d, d, h * w), (0, 1, 3, 2), (b, c // d), h * w, (h, w)
        b, h, w, c = shape
        if c % d == 0 and h > 1 and w > 1:
            yield (b, h * w, c // d, d), (0, 2, 1, 3), (b, c // d), h * w, (h, w)


def _rows_of(got: torch.Tensor, toks: torch.Tensor) -> torch.Tensor | None:
    """For each row of ``got`` (replayed ids, D features last), the row of ``toks`` (the
    source's ids as (..., N, D) tokens) it holds whole, feature by feature, or -1 for a
    row of pads; None when some row is neither."""
    d = toks.shape[-1]
    flat = toks.reshape(-1, d)
    row_of = torch.empty(flat.numel(), dtype=torch.long)  # (the ids are 0..numel-1)
    row_of[flat.reshape(-1)] = torch.arange(flat.shape[0]).repeat_interleave(d)
    first = got[..., 0]
    pad = first == _PAD_ID
    r = torch.where(pad, 0, row_of[first.clamp_min(0)])
    ok = torch.where(pad[..., None], got == _PAD_ID, got == flat[r])
    if not bool(ok.all()):
        return None
    return torch.where(pad, _PAD_ID, r)


def _read(operand: Operand, want: tuple | None = None) -> _Source:
    """The farthest source ``operand`` (the op's q, k or v as the site reads it) moves,
    whose token rows it holds whole (``_token_views``)."""
    for src in _reads(operand, want):
        return src
    raise _No(f"no token source for {operand.node.name}")


def _reads(operand: Operand, want: tuple | None = None):
    """Each source ``operand`` may be read from (see ``_read``), the farthest first;
    ``want``: a ``_Source.key`` it must have."""
    start = operand.node
    d = operand.op_shape(G.shape(start))[-1]
    written = _written_bases(start.graph)
    for src in reversed(_chain(start)[1:]):
        shape = G.shape(src)
        if (
            shape is None
            or not all(isinstance(s, int) for s in shape)
            or not isinstance(G.example_value(src), torch.Tensor)
        ):
            continue
        views = [t for t in _token_views(tuple(shape), d) if want is None or t[2:] == want]
        if not views:
            continue
        try:
            nodes = _between(src, start)
            # a copy on the way (``v.clone()``) written in place (``v.mul_(0.5)``) holds
            # other values than ``src``: read from there, not from before it (writes into
            # ``src``'s own storage reach the op's read too; ``rewrite.write_inside``
            # keeps sites whose reads a write in between would change)
            own = G.view_base(src)
            if any(G.view_base(n) in written - {own} for n in nodes):
                raise _No("a copy on the way is written in place")
            ids = _ids(src)
            env = _replay(nodes, {src: ids})
        except _No as e:
            debug("bucketed: %s is not read from %s: %s", start, src, e)
            continue
        got = env[start]
        if operand.permute is not None:
            got = got.permute(operand.permute)
        if got.shape[-1] != d:
            continue
        pads = [n for n in nodes if n.op == "call_function" and n.target in _PADS]
        for view, perm, lead, n, grid in views:
            toks = ids if view is None else ids.view(view).permute(perm)
            rows = _rows_of(got, toks)
            if rows is None:
                continue  # a row is not one token row, feature by feature
            rows = rows.reshape(-1, rows.shape[-1])  # (G, R): a bucket (joined) per group
            if not _one_lead(rows, n) or (want is None and not _each_once(rows, lead, n)):
                continue  # (the token axis is another one: heads before tokens, say)
            yield _Source(src, rows, pads, lead, n, grid, view, perm)


def _written_bases(graph: fx.Graph) -> set:
    """The storages (view bases) some node of ``graph`` writes in place; every node's
    base where a write cannot be placed."""
    out = set()
    for n in graph.nodes:
        if n.op not in ("call_method", "call_function") or not G.has_side_effects(n):
            continue
        target = G.written_tensor(n)
        if target is None:
            return {G.view_base(m) for m in graph.nodes}  # (assume the worst)
        if target is not False:
            out.add(G.view_base(target))
    return out


def _one_lead(rows: torch.Tensor, n: int) -> bool:
    """Whether each group's rows (pads aside) are tokens of one batch and head."""
    lead = torch.where(rows >= 0, rows // n, -1)
    top = lead.max(-1, keepdim=True).values
    return bool(((lead == top) | (lead < 0)).all())


def _each_once(rows: torch.Tensor, lead: tuple, n: int) -> bool:
    """Whether the query rows hold every token row once, in buckets smaller than N."""
    total = math.prod(lead) * n
    flat = rows.reshape(-1)
    return (
        flat.numel() == total
        and n > rows.shape[-1]
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


def _fit(
    ends: torch.Tensor, q: torch.Tensor, w: int, n: int, lower: bool, qx=Q, kx=K
) -> list | None:
    """The bound terms that give ``ends`` (each query's first / last kept key on an axis
    of length ``n``; ``q``: the queries' coordinates there, ``qx`` and ``kx`` their
    expressions) exactly: ``max(0, w·(q//w) + a, q + c)`` (``min(n-1, ...)`` for the
    last), some terms left out; None when no such form fits."""
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
                term = (w * sympy.floor(qx / w) if name == "bucket" else qx) + c
                # (the constructors: ``floor(K/W) >= n`` by the operator becomes
                # ``K/W >= n``, a rational the kernels would round)
                out.append(sympy.Ge(kx, term) if lower else sympy.Le(kx, term))
            return out
    return None


def _axes(grid: tuple) -> list[tuple[int, int, object, object]]:
    """Per axis of a row-major token grid, outermost first: (length, stride, the query's
    coordinate, the key's) — ``Q // W`` and ``Q % W`` on an (H, W) grid, ``Q`` on (N,)."""
    out = []
    for a, length in enumerate(grid):
        stride = math.prod(grid[a + 1 :])
        qx, kx = (i if stride == 1 else sympy.floor(i / stride) for i in (Q, K))
        if a > 0:
            qx, kx = sympy.Mod(qx, length), sympy.Mod(kx, length)
        out.append((length, stride, qx, kx))
    return out


def _blocks(qtok: torch.Tensor, axes: list) -> list[int]:
    """The query block's size per grid axis: each group's query tokens (``qtok``, (G, R))
    must be one box of that size, aligned to it, and the boxes tile the grid."""
    if len(axes) == 1:
        return [qtok.shape[-1]]  # (a sequence: the bucket's queries)
    sizes = []
    for length, stride, _, _ in axes:
        c = (qtok // stride) % length
        lo, hi = c.min(-1).values, c.max(-1).values
        size = int(hi[0] - lo[0] + 1)
        if not bool((hi - lo + 1 == size).all()) or bool((lo % size != 0).any()) or length % size:
            raise _No("the query blocks are not boxes that tile the image")
        sizes.append(size)
    if math.prod(sizes) != qtok.shape[-1]:
        raise _No("the query blocks are not boxes that tile the image")
    return sizes


def _output(site: Site, q: _Source, dv: int) -> tuple[fx.Node, tuple | None]:
    """The node after the output's movement where the (..., N, Dv) tokens-order output
    (whose element for token row r is the bucketed output row holding r) is back: in
    some shape, flattened the same elements in the same order, or in that order once
    permuted (an image's layout: features before the tokens, or heads inside them).
    The nearest such node whose strides the op's output, so moved, has too (the verifier
    holds the rewrite to the program's strides), else the nearest.  Returns the node and
    the permute (None: the same order)."""
    pv = site.output
    want = (*q.lead, q.n, dv)
    cur, path, found = pv, [], None
    ids = _ids(pv)
    grid = ids.reshape(-1, ids.shape[-2], dv)  # (G, R, Dv): grid element ids
    expected = torch.empty((math.prod(want[:-1]), dv), dtype=torch.long)
    expected[q.rows.reshape(-1)] = grid.reshape(-1, dv)
    expected = expected.view(want)
    identity = tuple(range(len(want)))
    # (the same order first: a 1-D site's output is only reshaped)
    perms = [identity, *(p for p in itertools.permutations(identity) if p != identity)]
    while True:
        users = G.live_users(cur)
        if len(users) != 1 or not _is_move(users[0]) or len(_inputs(users[0])) != 1:
            break
        cur = users[0]
        path.append(cur)
        shape = G.shape(cur)
        if shape is None or math.prod(shape) != expected.numel():
            continue
        got = _replay(path, {pv: ids})[cur].reshape(-1)
        p = next((p for p in perms if torch.equal(expected.permute(p).reshape(-1), got)), None)
        if p is None:
            continue
        p = None if p == identity else p
        if _same_strides(cur, want, p):
            return cur, p
        found = found or (cur, p)
    if found is None:
        raise _No("the output is not moved back to the tokens' order")
    return found


def _out_layout(rank3: bool, moved: bool, perm: tuple | None) -> str | None:
    """The op's output storage for an output permuted by ``perm`` (``moved``: reshaped
    or permuted at all); None: the program node's own (``softmax._layout``)."""
    if perm == (0, 2, 1, 3) and not rank3:
        return "bnhd"  # (B, N, H, Dv) storage: the permute back is then free
    if rank3 or moved:
        return "bhnd"  # (a reshaped output is the op's (B, H, N, Dv) result viewed)
    return None


def _same_strides(node: fx.Node, want: tuple, perm: tuple | None) -> bool:
    """Whether the op's (``want``-shaped) output, moved to ``node``'s shape as
    ``emit_call`` does (reshaped; or permuted, reshaped and made contiguous), has
    ``node``'s stride order."""
    from attnfx.testing import _stride_order

    ev = G.example_value(node)
    if not isinstance(ev, torch.Tensor):
        return False
    if perm is not None:
        return ev.is_contiguous()
    out = torch.empty(want, device="meta").reshape(ev.shape)
    return _stride_order(out) == _stride_order(ev)


def read_back(site: Site) -> Site:
    """The site as attention over the tokens (see the module docstring); raises _No."""
    spec = site.spec
    if spec.activation != "softmax" or spec.sink is not None or site.q_mul or spec.gqa_group != 1:
        raise _No("not plain softmax attention")
    if site.layout is not None:
        raise _No("already in a token order")
    if not _looks_around(site.k.node):
        raise _No("k is not padded, joined or unfolded")
    qs, vs = site.q.op_shape(G.shape(site.q.node)), site.v.op_shape(G.shape(site.v.node))
    if qs is None or vs is None or not all(isinstance(s, int) for s in (*qs, *vs)):
        raise _No("not static sizes")
    # q: every token once, in buckets of one batch and head; k and v: from sources of
    # the same tokens (a q source whose k has none is the wrong token axis: the next one,
    # as is one whose reading below fails — each reading's checks are exact)
    first = None
    for q in _reads(site.q):
        try:
            k = _read(site.k, want=q.key)
            v = _read(site.v, want=q.key)
            return _over_tokens(site, q, k, v, qs, vs)
        except _No as e:
            debug("bucketed: %s read over %s of %s: %s", site.anchor, q.grid, q.node, e)
            first = first or e
    raise first or _No("no token sources for q, k and v")


def _over_tokens(site: Site, q: _Source, k: _Source, v: _Source, qs, vs) -> Site:
    """The site over the tokens of these sources of q, k and v, or _No."""
    spec = site.spec
    nq_grid = q.rows.shape[-1]
    n = q.n
    total = math.prod(q.lead) * n
    if not torch.equal(k.rows, v.rows):
        raise _No("v is not moved as k is")
    for p in v.pads:
        value = p.args[3] if len(p.args) > 3 else p.kwargs.get("value", 0.0)
        if value is None:
            value = 0.0
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _No("v padded with a value that is not a finite constant")
    ks = site.k.op_shape(G.shape(site.k.node))
    keep, value = _grid_keep(site, (*qs[:-1], ks[-2]))
    keep = keep.reshape(-1, nq_grid, ks[-2])  # (G, R, J)
    krows = k.rows[:, None, :].expand_as(keep)
    if bool((keep & (krows == _PAD_ID)).any()):
        raise _No("a padded key slot is not masked")
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
    # per grid axis, each query's kept keys span [lo, hi]: distinct keys as many as the
    # box holds are the whole box (on a sequence: an interval)
    axes = _axes(q.grid)
    spans, box = [], torch.ones_like(count)
    for length, stride, _, _ in axes:
        c = (krows % n // stride) % length
        lo = torch.where(keep, c, length).min(-1).values
        hi = torch.where(keep, c, -1).max(-1).values
        spans.append((lo, hi))
        box = box * (hi - lo + 1)
    if not bool((box == count).all()):
        if len(axes) == 1:
            raise _No("a query's kept keys are not an interval of tokens")
        raise _No("a query's kept keys are not a box on the token grid")
    blocks = _blocks(q.rows % n, axes)
    qtok = torch.arange(n)
    terms = []
    for (length, stride, qx, kx), (lo, hi), w in zip(axes, spans, blocks):
        ends = []
        for e in (lo, hi):
            per = torch.empty(total, dtype=torch.long)
            per[q.rows.reshape(-1)] = e.reshape(-1)
            per = per.view(-1, n)
            if not bool((per == per[:1]).all()):
                raise _No("the window differs between batches or heads")
            ends.append(per[0])
        coord = (qtok // stride) % length
        lower = _fit(ends[0], coord, w, length, True, qx, kx)
        upper = _fit(ends[1], coord, w, length, False, qx, kx)
        if lower is None or upper is None:
            raise _No("the window's ends are not of a bucket or band form")
        terms += [*lower, *upper]
    out, out_perm = _output(site, q, vs[-1])
    ops = [op for op in spec.score_ops if op.entry.form == "mul"]
    if terms:
        pred = MaskPredicate(sympy.And(*terms))
        ops.append(ScoreOp("fill_pred", value=value, pred=pred.to_key()))
    from attnfx.passes.recognize.softmax import _layout

    rank3 = len(q.lead) == 1
    want = (*q.lead, n, vs[-1])
    moved = want if out_perm is None else tuple(want[i] for i in out_perm)
    out_shape = tuple(G.shape(out)) if tuple(G.shape(out)) != moved else None
    layout = _out_layout(rank3, out_shape is not None or out_perm is not None, out_perm)
    new = dataclasses.replace(
        spec,
        score_ops=tuple(ops),
        aux_dtypes=(),
        aux_bcast=(),
        out_layout=layout or _layout(out),
    )
    return dataclasses.replace(
        site,
        output=out,
        out_shape=out_shape,
        out_permute=out_perm,
        q=Operand(q.node, q.permute, q.view),
        k=Operand(k.node, k.permute, k.view),
        v=Operand(v.node, v.permute, v.view),
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
