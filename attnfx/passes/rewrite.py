"""Rewrite: replace a site's nodes by one call of the attnfx op carrying its spec.

``emit_call`` builds the call (operand views, aux transforms, the op, the reshape back
for 3-D sites or an image's layout) into any graph, so the verify pass builds the
candidate from the very same code that rewrites the model graph.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import networkx as nx
import torch
import torch.fx as fx

from attnfx import ops
from attnfx.passes import graph as G
from attnfx.passes.match import Site


def emit_call(graph: fx.Graph, site: Site, lookup: Callable[[fx.Node], fx.Node]) -> fx.Node:
    """Insert the op call for ``site`` at the graph's insertion point; ``lookup`` maps the
    site's operand nodes to nodes of ``graph``."""

    def operand(o):
        n = lookup(o.node)
        if o.view is not None:  # an image's channels split into (heads, D)
            n = graph.call_method("reshape", (n, o.view))
        if o.permute is not None:
            n = graph.call_function(torch.permute, (n, o.permute))
        if site.rank3:
            n = graph.call_method("unsqueeze", (n, 1))
        return n

    q, k, v = operand(site.q), operand(site.k), operand(site.v)
    for m in site.q_mul:
        t = lookup(m.node)
        if site.rank3 and len(G.shape(m.node) or ()) == 3:
            t = graph.call_method("unsqueeze", (t, 1))
        q = graph.call_function(
            operator.truediv if m.transform == "reciprocal" else operator.mul, (q, t)
        )
    lay = site.layout
    if lay is not None:  # multi-dimensional tiles: q, k, v in tiled token order
        q, k, v = (_tiled(graph, x, 2, 4, lay) for x in (q, k, v))
    aux = []
    for i, a in enumerate(site.aux):
        n = lookup(a.node)
        if a.transform in ("table", "table_t"):  # a bias table: (H, 1, T) or (1, T)
            if a.transform == "table_t":
                n = graph.call_method("transpose", (n, 0, 1))
            aux.append(graph.call_method("unsqueeze", (n, -2)))
            continue
        if a.transform == "neg":
            n = graph.call_function(operator.neg, (n,))
        elif a.transform == "reciprocal":
            n = graph.call_function(torch.reciprocal, (n,))
        shape = list(G.shape(a.node) or ())
        if site.rank3 and len(shape) == 3:
            n = graph.call_method("unsqueeze", (n, 1))
            shape.insert(1, 1)
        if lay is not None and i != site.spec.sink:
            # an operand over the scores (a bias, a per-query or per-key term) in the
            # same order: its query (-2) and key (-1) dims, where not broadcast
            for dim in (len(shape) - 2, len(shape) - 1):
                if dim >= 0 and shape[dim] == math.prod(lay.lengths):
                    n = _tiled(graph, n, dim, len(shape), lay)
        aux.append(n)
    out = graph.call_function(ops.site_attention, (q, k, v, aux, site.spec.key))
    if lay is not None:  # ... and the output back in the program's order
        out = _tiled(graph, out, 2, 4, lay, back=True)
    if site.rank3:
        out = graph.call_method("squeeze", (out, 1))
    if site.out_permute is not None:  # (an image's layout: features before the tokens)
        out = graph.call_function(torch.permute, (out, site.out_permute))
    if site.out_shape is not None:
        out = graph.call_method("reshape", (out, site.out_shape))
    if site.out_permute is not None:  # (the reshape of a permute may be a strided view)
        out = graph.call_method("contiguous", (out,))
    return out


def _tiled(graph: fx.Graph, x: fx.Node, dim: int, rank: int, lay, back: bool = False):
    """Dim ``dim`` (of ``rank``) of ``x`` in the layout's tiled token order (``back``:
    from it to row-major): unflatten into (blocks, tile) pairs per grid axis, permute,
    flatten."""
    sizes, perm = lay.to_row_major() if back else lay.to_tiled()
    g = len(sizes)
    group = [p - 2 for p in perm[2 : 2 + g]]  # the permutation within the unflattened dims
    order = [*range(dim), *(dim + p for p in group), *range(dim + g, rank + g - 1)]
    x = graph.call_method("unflatten", (x, dim, sizes))
    x = graph.call_method("permute", (x, *order))
    return graph.call_method("flatten", (x, dim, dim + g - 1))


def region(gm_nx: nx.DiGraph, site: Site) -> set[fx.Node]:
    """The nodes the site's output depends on that are not (or not upstream of) an operand:
    what the op call replaces."""
    keep: set[fx.Node] = set()
    for o in site.operand_nodes:
        keep.add(o)
        keep |= nx.ancestors(gm_nx, o)
    nodes = (nx.ancestors(gm_nx, site.output) | {site.output}) - keep
    return {n for n in nodes if n.op not in ("placeholder", "get_attr", "output")}


def externals(nodes: set[fx.Node]) -> list[fx.Node]:
    """Inputs of the region that come from outside it, in graph order."""
    ext = {i for n in nodes for i in n.all_input_nodes if i not in nodes}
    order = {n: i for i, n in enumerate(next(iter(nodes)).graph.nodes)} if nodes else {}
    return sorted(ext, key=order.__getitem__)


def write_inside(gm_nx: nx.DiGraph, site: Site) -> fx.Node | None:
    """An in-place write between the site's first node and its output that may change
    what the site reads, if any.

    The op call is inserted at the output, so it reads its operands *there*; the eager
    region read them where it started.  An in-place write in between (``q.mul_(2)``
    after the scores) would make the two differ — and neither verification (whose
    captured values share storage with the written tensor) nor the whole-graph check
    (which takes the op's output as given) would see it.  Such sites are kept.  A write
    into storage the site never reads (an MoE layer's ``out.index_add_`` between a mask
    built early and a later layer's attention) is harmless."""
    nodes = region(gm_nx, site)
    if not nodes:
        return None
    order = {n: i for i, n in enumerate(site.output.graph.nodes)}
    first = min(order[n] for n in nodes)
    last = order[site.output]
    read = set(nodes) | set(externals(nodes)) | set(site.operand_nodes)
    bases = {G.view_base(n) for n in read}
    inputs_read = any(b is not None and b.op in ("placeholder", "get_attr") for b in bases)
    for n in site.output.graph.nodes:
        if not (first < order[n] < last) or n in nodes or not G.has_side_effects(n):
            continue
        target = G.written_tensor(n)
        if target is None:
            return n  # effects we cannot place (a module call): assume the worst
        if target is False:
            continue  # no tensor written (a random op)
        b = G.view_base(target)
        # graph inputs may alias each other: a write into one may reach another
        if b in bases or (inputs_read and b is not None and b.op in ("placeholder", "get_attr")):
            return n
    return None


def site_inputs(gm_nx: nx.DiGraph, site: Site) -> tuple[set[fx.Node], list[fx.Node]]:
    """The region and every value the original region or the op call reads from outside
    it, in graph order.  (An operand can sit upstream of a node the region reads, when a
    shared mask is computed before an earlier layer's output feeds this site's q.)"""
    nodes = region(gm_nx, site)
    ext = set(externals(nodes)) if nodes else set()
    ext |= set(site.operand_nodes)
    order = {n: i for i, n in enumerate(site.output.graph.nodes)}
    return nodes, sorted(ext, key=order.__getitem__)


def apply(gm: fx.GraphModule, site: Site) -> fx.Node:
    """Rewrite ``site`` in ``gm``: the op call replaces its output; dead nodes go."""
    graph = gm.graph
    with graph.inserting_before(site.output):
        out = emit_call(graph, site, lambda n: n)
    out.meta.update(
        {
            k: v
            for k, v in site.output.meta.items()
            if k in ("example_value", "val", "nn_module_stack", "stack_trace")
        }
    )
    if written_in_place(site.output):
        # The op saves its output for the backward (and an SDPA-layout output is a view):
        # a later in-place write (``o.mul_(2)``) must land on a copy, as it landed on
        # ``p @ v``'s fresh result in eager.
        with graph.inserting_after(out):
            copy = graph.call_method("clone", (out,))
        copy.meta.update(out.meta)
        out = copy
    site.output.replace_all_uses_with(out)
    return out


def written_in_place(node: fx.Node) -> bool:
    """Whether a node with side effects may write into ``node``'s value (through views;
    ``node`` itself may be a view, as a bucketed site's reshaped output is)."""
    for n in node.graph.nodes:
        if n.op in ("call_method", "call_function") and G.has_side_effects(n) and n.args:
            x = n.args[0]
            while isinstance(x, fx.Node) and x is not node:
                x = G.view_parent(x)
            if x is node:
                return True
    return False


def remove_replaced(gm: fx.GraphModule, nodes: set[fx.Node]) -> int:
    """Erase the nodes among ``nodes`` (the replaced regions) that nothing reads any
    more, users first; a node with side effects is never erased, nor is anything outside
    ``nodes``.  Returns how many were erased."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    erased = 0
    for n in sorted((n for n in nodes if n in order), key=order.__getitem__, reverse=True):
        if not n.users and not G.has_side_effects(n):
            gm.graph.erase_node(n)
            erased += 1
    return erased


def finish(gm: fx.GraphModule, replaced: set[fx.Node]) -> None:
    """Remove what the rewrites replaced (and only that), check and recompile."""
    remove_replaced(gm, replaced)
    gm.graph.lint()
    gm.recompile()
