"""Neighborhood attention: sites whose mask keeps, per axis of a token grid, an interval
of keys around each query (Hassani et al., "Neighborhood Attention Transformer", CVPR
2023; dilation: "Dilated Neighborhood Attention Transformer", arXiv 2209.15001; stride:
"Generalized Neighborhood Attention", arXiv 2504.16922; ``attnfx.nn.neighborhood`` has
the reference modules and NATTEN's window rule).

The class is wider than NA: 1-D sliding windows (Mistral, Gemma-2 local layers,
ModernBERT's local layers), chunked attention (``Q // c == K // c``) and blocked windows
read the same way — one axis, or a grid whose axes are found from the divisions in the
predicate.  These sites share the softmax anchor: the softmax recognizer builds them and
this module relabels the ones whose (-inf filled) predicate is a neighborhood, with the
per-axis shape for the report (``Neighborhood.describe``).

How a predicate is read.  Write the flattened index as coordinates on a grid whose strides
are the divisors ``s`` of ``floor(Q / s)`` (and ``floor(K / s)``) in the predicate (the
outermost axis may be ragged: chunks of ``c`` over N not a multiple of ``c`` end with a
shorter chunk); at the site's lengths (self-attention, NQ = NK = N) the predicate
is a neighborhood when it is the AND of per-axis masks ``M_a[q_a, k_a]`` — checked on
every query row for N ≤ 1024, on 512 rows (the borders and a random draw) beyond — and
each query's kept keys on each axis are an arithmetic run (an interval of its dilation
group).  This is a label: it changes what the report says and which tiles suit the site,
never what the kernels compute (their tile maps come from the predicate itself).

Edge semantics are the program's (the predicate is evaluated as written): NATTEN's
windows shift inward at the borders, lucid-style bucketed windows truncate, causal
windows end at the query; a row with no kept key is computed as eager computes it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import sympy
import torch

from attnfx.predicate import K, MaskPredicate, Q, floor_fraction, within_lengths

KIND = "neighborhood"
_EXHAUSTIVE = 1024  # up to this length every query row is checked
_SAMPLED_ROWS = 512


@dataclasses.dataclass(frozen=True)
class Axis:
    length: int
    kernel: int  # most keys a query keeps on this axis (the window size)
    dilation: int
    causal: bool


@dataclasses.dataclass(frozen=True)
class Neighborhood:
    axes: tuple[Axis, ...]  # outermost first (row-major flattening)

    def describe(self) -> str:
        grid = "x".join(str(a.length) for a in self.axes)
        out = f"neighborhood {len(self.axes)}-D {grid} k=({','.join(str(a.kernel) for a in self.axes)})"
        if any(a.dilation > 1 for a in self.axes):
            out += f" d=({','.join(str(a.dilation) for a in self.axes)})"
        if any(a.causal for a in self.axes):
            out += f" causal=({','.join('1' if a.causal else '0' for a in self.axes)})"
        return out


def _strides(expr) -> list[int]:
    """Divisors ``s > 1`` of ``floor(Q / s)`` / ``floor(K / s)`` in ``expr``."""
    out = set()
    for f in expr.atoms(sympy.floor):
        num, den = floor_fraction(f)
        if num in (Q, K) and isinstance(den, sympy.Integer) and den > 1:
            out.add(int(den))
    return sorted(out)


def _grid(strides: list[int], n: int) -> tuple[list[int], list[int]] | None:
    """(lengths, strides) of the axes, outermost first (strides that do not nest, each a
    multiple of the previous, are left out).  The outermost axis may be ragged: chunks of
    ``c`` over a length that is no multiple of ``c`` end with a shorter chunk."""
    chain = [1]
    for s in strides:
        if s % chain[-1] == 0 and s < n:
            chain.append(s)
    lengths = [chain[i + 1] // chain[i] for i in range(len(chain) - 1)] + [-(-n // chain[-1])]
    if any(ln < 1 for ln in lengths):
        return None
    return lengths[::-1], chain[::-1]


def _axis(m: torch.Tensor) -> Axis | None:
    """One axis's parameters from its (L, L) keep-mask, or None when some query's kept
    keys are not an arithmetic run (an interval of its dilation group)."""
    length = m.shape[0]
    qi, kj = m.nonzero(as_tuple=True)
    if qi.numel() == 0:
        return None
    diff = (kj - qi).abs()
    d = functools.reduce(math.gcd, diff.unique().tolist(), 0) or 1
    counts = m.sum(1)
    for i in range(length):
        ks = m[i].nonzero().flatten()
        if ks.numel() == 0:
            return None
        if ks.numel() > 1 and not bool(((ks[1:] - ks[:-1]) == d).all()):
            return None
    # causal: no key after the query, and some before it (a one-key axis is not causal)
    causal = bool((kj <= qi).all()) and bool((kj < qi).any())
    return Axis(length, int(counts.max()), d, causal)


def classify(pred_key: str, n: int) -> Neighborhood | None:
    """The neighborhood a predicate (``MaskPredicate`` key) keeps at length ``n`` (NQ = NK),
    or None."""
    return _classify(pred_key, int(n))


@functools.lru_cache(maxsize=64)
def _classify(pred_key: str, n: int) -> Neighborhood | None:
    pred = MaskPredicate.from_key(pred_key)
    mc = pred.mask_class
    if mc.kind == "window" and mc.prefix is None and mc.left is not None and mc.right is not None:
        left, right = (sympy.sympify(x).subs({"NQ": n, "NK": n}) for x in (mc.left, mc.right))
        if not (left.is_Integer and right.is_Integer):
            return None
        lo, hi = min(int(left), n - 1), min(int(right), n - 1)
        # a band as wide as the sequence on the left keeps every pair (or, ending at the
        # query, the whole past: causal); narrower, it is a window even when 2w+1 >= n (a
        # truncated band still cuts the border rows)
        if lo == n - 1 and hi in (0, n - 1):
            return None
        return Neighborhood((Axis(n, min(lo + hi + 1, n), 1, hi <= 0),))
    if mc.kind != "predicate" or n < 2:
        return None
    return _on_grid(pred, n) or _one_axis(pred, n)


def _rows(n: int) -> torch.Tensor:
    """The query rows a reading checks: all up to ``_EXHAUSTIVE``, else the borders and a
    seeded draw."""
    if n <= _EXHAUSTIVE:
        return torch.arange(n)
    g = torch.Generator().manual_seed(0)
    edge = torch.cat([torch.arange(64), torch.arange(n - 64, n)])
    return torch.cat([edge, torch.randint(0, n, (_SAMPLED_ROWS - edge.numel(),), generator=g)])


def _one_axis(pred: MaskPredicate, n: int) -> Neighborhood | None:
    """The predicate as one axis (a window that no grid separates: a bucketed window cut
    at the query, chunked causal attention): each query's kept keys one interval with a
    left bound somewhere (not the whole past: causal, not a window)."""
    keys = torch.arange(n)
    width, causal, strict, bounded = 0, True, False, False
    for chunk in _rows(n).split(256):
        keep = torch.as_tensor(pred.evaluate(chunk[:, None], keys[None, :], n, n)).expand(
            len(chunk), n
        )
        count = keep.sum(1)
        if bool((count == 0).any()):
            return None
        first = torch.where(keep, keys, n).min(1).values
        last = torch.where(keep, keys, -1).max(1).values
        if not bool((last - first + 1 == count).all()):
            return None
        width = max(width, int(count.max()))
        causal &= bool((last <= chunk).all())
        strict |= bool((first < chunk).any())
        bounded |= bool((first > 0).any())
    if not bounded:  # every row starts at key 0: causal, a prefix, or every pair
        return None
    return Neighborhood((Axis(n, width, 1, causal and strict),))


def _on_grid(pred: MaskPredicate, n: int) -> Neighborhood | None:
    """The predicate as per-axis windows on the grid its divisions describe, or None."""
    grid = _grid(_strides(pred.expr), n)
    if grid is None:
        return None
    lengths, strides = grid
    # per-axis masks: the other coordinates at 0 for both the query and the key
    axes_masks = []
    for ln, st in zip(lengths, strides):
        c = torch.arange(ln) * st
        m = torch.as_tensor(pred.evaluate(c[:, None], c[None, :], n, n)).expand(ln, ln)
        axes_masks.append(m.to(torch.bool))
    axes = [_axis(m) for m in axes_masks]
    if any(a is None for a in axes) or all(bool(m.all()) for m in axes_masks):
        return None  # not a window per axis, or every pair kept
    if len(axes_masks) == 1 and torch.equal(
        axes_masks[0], torch.ones(n, n, dtype=torch.bool).tril()
    ):
        return None  # the whole past: causal, not a window
    # the predicate must be the AND of the per-axis masks: check query rows
    keys = torch.arange(n)
    for chunk in _rows(n).split(256):
        want = torch.as_tensor(pred.evaluate(chunk[:, None], keys[None, :], n, n))
        got = torch.ones((), dtype=torch.bool)
        for m, ln, st in zip(axes_masks, lengths, strides):
            got = got & m[(chunk[:, None] // st) % ln, (keys[None, :] // st) % ln]
        if not bool((want.expand_as(got) == got).all()):
            return None
    return Neighborhood(tuple(axes))


def of_site(site) -> Neighborhood | None:
    """The neighborhood of a matched softmax site, or None: its dropping (-inf, or
    ≤ -1e30) filled predicate at its example lengths."""
    from attnfx.passes import graph as G

    spec = site.spec
    if spec is None or spec.activation != "softmax":
        return None
    preds = [
        op.pred
        for op in spec.score_ops
        # -inf, or a finite fill so negative that exp drops it beside any kept key
        if op.pred is not None and op.entry.form == "fill" and op.value <= -1e30
    ]
    if len(preds) != 1:
        return None
    shapes = [o.op_shape(G.shape(o.node)) for o in (site.q, site.k)]
    if any(s is None or len(s) < 2 for s in shapes):
        return None
    (qs, ks) = shapes
    nq, nk = (G.int_hint(s[-2]) for s in (qs, ks))
    if nq is None or nq != nk:
        return None
    try:
        return classify(preds[0], nq)
    except Exception:  # noqa: BLE001 - a predicate this reading cannot evaluate: no label
        return None


def label(sites) -> None:
    """Relabel matched softmax / temperature sites whose mask is a neighborhood, and give
    2-D/3-D ones the tiled token order where it visits fewer tiles."""
    for s in sites:
        nb = of_site(s)
        if nb is None:
            continue
        s.kind = KIND
        s.spec = dataclasses.replace(s.spec, kind=KIND)
        s.neighborhood = nb
        _choose_layout(s, nb)


# ---------------------------------------------------------------------------------------
# Token order: multi-dimensional tiles as a layout of the flattened index
# ---------------------------------------------------------------------------------------

# Tile shape (tokens per axis, outermost first) of the tiled token order, per grid rank:
# 64 tokens, a kernel tile (or half of a 128-query one), as NATTEN's Hopper configs for
# D <= 64 take (8x8 in 2-D; 4x4x4 in 3-D).
TILE = {2: (8, 8), 3: (4, 4, 4)}


@dataclasses.dataclass(frozen=True)
class Layout:
    """The tiled token order of a grid: tokens reordered so that each run of
    ``prod(tile)`` consecutive positions is one ``tile``-shaped block of the grid (blocks in
    row-major order).  The op runs on q, k, v in this order with the predicate rewritten
    for it (``permuted``), and its output is put back in row-major order: the kernel's
    1-D tiles are then multi-dimensional tiles of the grid."""

    lengths: tuple[int, ...]
    tile: tuple[int, ...]

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(ln // t for ln, t in zip(self.lengths, self.tile))

    def to_tiled(self) -> tuple[tuple[int, ...], list[int]]:
        """(unflatten sizes, permutation) taking a (B, H, N, D) row-major tensor to tiled
        order: ``x.unflatten(2, sizes).permute(perm).flatten(2, 2 + 2r - 1)``."""
        r = len(self.lengths)
        sizes = tuple(x for nb, t in zip(self.blocks, self.tile) for x in (nb, t))
        perm = [0, 1, *(2 + 2 * a for a in range(r)), *(3 + 2 * a for a in range(r)), 2 + 2 * r]
        return sizes, perm

    def to_row_major(self) -> tuple[tuple[int, ...], list[int]]:
        """(unflatten sizes, permutation) taking a tiled-order tensor back."""
        sizes, perm = self.to_tiled()
        tiled_sizes = tuple(sizes[p - 2] for p in perm[2:-1])
        inverse = [perm.index(i) for i in range(len(perm))]
        return tiled_sizes, inverse

    def index(self, i):
        """The row-major index of tiled position ``i`` (a sympy expression or an integer
        tensor)."""
        floor = (lambda a, b: sympy.floor(a / b)) if isinstance(i, sympy.Basic) else (
            lambda a, b: a // b
        )  # fmt: skip
        per_tile = math.prod(self.tile)
        within, block = i % per_tile, floor(i, per_tile)
        out = 0
        for a, (t, nb) in enumerate(zip(self.tile, self.blocks)):
            inner = math.prod(self.tile[a + 1 :])
            outer = math.prod(self.blocks[a + 1 :])
            coord = (floor(block, outer) % nb) * t + floor(within, inner) % t
            out = out + coord * math.prod(self.lengths[a + 1 :])
        return out

    def permuted(self, pred_key: str) -> str:
        """The predicate on tiled positions: ``P(index(Q), index(K))``, with what the
        grid's ranges decide taken out (``within_lengths``): each coordinate comes out as
        a ``//`` and ``%`` of the position, which the tile map bounds per tile (full tiles
        are found) and the kernel computes in a few integer ops."""
        expr = MaskPredicate.from_key(pred_key).expr
        n = math.prod(self.lengths)
        expr = within_lengths(expr.xreplace({Q: self.index(Q), K: self.index(K)}), n, n)
        return MaskPredicate(expr).to_key()


def _layout_spec(spec, layout: Layout):
    """The spec on tiled positions: its predicates and its position expressions
    (``add_pos_aux``'s ``K - Q``) rewritten on the permuted indices."""

    def on_tiles(op):
        if op.pred is not None:
            op = dataclasses.replace(op, pred=layout.permuted(op.pred))
        if op.expr is not None and MaskPredicate.from_key(op.expr).expr.has(Q, K):
            op = dataclasses.replace(op, expr=layout.permuted(op.expr))
        return op

    return dataclasses.replace(spec, score_ops=tuple(on_tiles(op) for op in spec.score_ops))


def shaped_tile(nb: Neighborhood) -> tuple[int, ...] | None:
    """A block of ``prod(TILE)`` tokens shaped like the window: per axis a power of two
    proportional to the window's span (kernel × dilation, at most the axis), so that a
    query block's keys fill few key blocks (a (3, 31) window: 2x32 rather than 8x8).
    None where no such block divides the grid or it is ``TILE`` itself."""
    base = TILE.get(len(nb.axes))
    if base is None:
        return None
    total = math.log2(math.prod(base))
    spans = [math.log2(max(1, min(a.kernel * a.dilation, a.length))) for a in nb.axes]
    shift = (total - sum(spans)) / len(spans)
    want = [x + shift for x in spans]
    exps = [math.floor(w) for w in want]
    # the exponents sum to log2 of the block: the largest fractional parts round up
    for i in sorted(range(len(want)), key=lambda i: exps[i] - want[i])[: int(total) - sum(exps)]:
        exps[i] += 1
    tile = tuple(2 ** max(0, e) for e in exps)
    if math.prod(tile) != math.prod(base) or tile == base:
        return None
    if any(a.length % t for a, t in zip(nb.axes, tile)):
        return None
    return tile


def _choose_layout(site, nb: Neighborhood) -> None:
    """Use the tiled token order when the op runs the generated kernels, the grid divides
    into blocks (``TILE``, or a block shaped like the window: ``shaped_tile``, whichever
    visits fewer tile pairs) and the forward kernel then visits at least 10% fewer (query
    tile, key tile) pairs than in row-major order.  Aux tensors over the scores (a full
    bias, per-query or per-key terms) are put in the same order."""
    from attnfx.passes import graph as G
    from attnfx.report import site_density

    tile = TILE.get(len(nb.axes))
    lengths = tuple(a.length for a in nb.axes)
    if tile is None or site.rank3:
        return
    ev = G.example_value(site.q.node)
    if not isinstance(ev, torch.Tensor) or not _runs_kernels(ev.device):
        return  # the CPU paths evaluate the predicate on every pair: tiles buy them nothing
    n = math.prod(lengths)
    length = site.q.op_shape(G.shape(site.q.node))[-2]
    if not isinstance(length, int):
        return  # a symbolic length: the grid, and the token order, hold at one length only
    if n != length:
        return  # a ragged grid (a shorter last chunk): no whole tiles
    d, dv = (G.int_hint(o.op_shape(G.shape(o.node))[-1]) for o in (site.q, site.v))
    if d is None or dv is None:
        return
    tiles = [t for t in (tile, shaped_tile(nb)) if t is not None]
    tiles = [
        t
        for t in tiles
        if not any(ln % b for ln, b in zip(lengths, t))
        and any(ln != b for ln, b in zip(lengths, t))
    ]
    try:
        before = site_density(site.spec, n, n, d, dv)
        best = None
        for t in tiles:
            layout = Layout(lengths, t)
            tiled = _layout_spec(site.spec, layout)
            after = site_density(tiled, n, n, d, dv)  # the tile map the kernels will walk
            if after is not None and (best is None or after < best[0]):
                best = (after, tiled, layout)
    except Exception:  # noqa: BLE001 - no density: keep the row-major order
        return
    if before is None or best is None or best[0] > 0.9 * before:
        return
    _, site.spec, site.layout = best


def _runs_kernels(device) -> bool:
    from attnfx import ops

    return ops.use_triton(device)
