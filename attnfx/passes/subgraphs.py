"""Subgraphs: the attention sites inside higher-order ops.

Dynamo puts some regions of a model in a subgraph of their own: a checkpointed block
(``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, ``checkpoint_wrapper``)
becomes ``tag_activation_checkpoint(body, *operands)``, ``torch.cond`` has a graph per
branch, ``nested_compile_region`` an ``invoke_subgraph``.  The subgraph is a
``GraphModule`` attribute of the graph, read by a ``get_attr`` node; its placeholders take
the operands of the op call, in order.

Each such subgraph is run through the same passes as a top-level graph (``rewrite_graph``,
recursively, so nested ones too), with the operands' real values as its example inputs:
captured by running the enclosing graph up to the op call, as verification captures a
site's inputs.  A rewritten subgraph replaces the original one in a copy of the enclosing
module only; the graph Dynamo gave is never changed.

Higher-order ops whose operands this module does not know how to map to the subgraph's
placeholders (``flex_attention``'s score and mask programs, ``map``, ``scan``, ...) are not
rewritten, but any attention site found in their subgraphs is reported and counted as
kept, with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from attnfx import report
from attnfx.passes import graph as G

log = logging.getLogger("attnfx")


def _hop_name(node: fx.Node) -> str | None:
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        return node.target.name()
    return None


def _after_body(body_at: int):
    """Layout ``hop(..., body, *operands)``: the body at ``body_at``, its operands after."""

    def layout(node: fx.Node) -> list[tuple[fx.Node, list]]:
        return [(node.args[body_at], list(node.args[body_at + 1 :]))]

    return layout


def _cond(node: fx.Node) -> list[tuple[fx.Node, list]]:
    # cond(pred, true_fn, false_fn, operands): both branches take all the operands
    _, true_fn, false_fn, operands = node.args[:4]
    return [(true_fn, list(operands)), (false_fn, list(operands))]


def _invoke_subgraph(node: fx.Node) -> list[tuple[fx.Node, list]]:
    # invoke_subgraph(subgraph, identifier, *operands)
    return [(node.args[0], list(node.args[2:]))]


# The higher-order ops whose subgraphs are rewritten: name -> (node -> [(the get_attr of a
# subgraph, the values its placeholders take)]).
LAYOUTS: dict[str, Callable[[fx.Node], list[tuple[fx.Node, list]]]] = {
    "tag_activation_checkpoint": _after_body(0),
    "wrap": _after_body(0),
    "wrap_with_set_grad_enabled": _after_body(1),
    "wrap_with_autocast": _after_body(4),
    "cond": _cond,
    "invoke_subgraph": _invoke_subgraph,
}


@dataclasses.dataclass
class _Call:
    """One subgraph of one higher-order op call."""

    hop: str
    attr: str  # the subgraph's attribute name on the enclosing module
    module: fx.GraphModule
    operands: list | None  # the values its placeholders take; None: not mapped


def _subgraph_module(gm: fx.GraphModule, a) -> tuple[str, fx.GraphModule] | None:
    if not (isinstance(a, fx.Node) and a.op == "get_attr" and isinstance(a.target, str)):
        return None
    try:
        mod = gm.get_submodule(a.target)
    except AttributeError:
        return None
    return (a.target, mod) if isinstance(mod, fx.GraphModule) else None


def calls(gm: fx.GraphModule) -> list[_Call]:
    """Every subgraph of a higher-order op call in ``gm``, in graph order; a subgraph
    called more than once (``invoke_subgraph``) is listed at its first call."""
    out: list[_Call] = []
    seen: set[str] = set()
    for n in gm.graph.nodes:
        name = _hop_name(n)
        if name is None:
            continue
        layout = LAYOUTS.get(name)
        pairs = None
        if layout is not None:
            try:
                pairs = layout(n)
            except (IndexError, TypeError, ValueError):
                pairs = None
        if pairs is None:
            # unknown layout: every subgraph argument, without operands
            flat = pytree.tree_leaves((n.args, n.kwargs))
            pairs = [(a, None) for a in flat]
        for a, operands in pairs:
            sub = _subgraph_module(gm, a)
            if sub is None or sub[0] in seen:
                continue
            seen.add(sub[0])
            attr, mod = sub
            placeholders = [p for p in mod.graph.nodes if p.op == "placeholder"]
            if operands is not None and len(operands) != len(placeholders):
                operands = None  # a layout this torch changed: do not guess
            out.append(_Call(name, attr, mod, operands))
    return out


def _capture(gm: fx.GraphModule, example_inputs, todo: list[_Call]) -> dict:
    """The real values of the operands of the ``todo`` calls (nodes run with an FX
    interpreter on the example inputs, as verification captures a site's inputs)."""
    from attnfx.passes import verify

    wanted = {x for c in todo for x in c.operands if isinstance(x, fx.Node)}
    return verify.capture_inputs(gm, example_inputs, wanted) if wanted else {}


def rewrite_subgraphs(
    gm: fx.GraphModule, example_inputs, options, rewrite_graph, reraise: tuple = ()
) -> tuple[fx.GraphModule, list[report.SiteRecord]]:
    """Run ``rewrite_graph`` on every subgraph of a higher-order op call of ``gm``; an
    exception of a ``reraise`` type leaves (``VerificationError`` under
    ``on_mismatch="raise"``), any other keeps that subgraph, counted as an internal error.

    Returns ``gm`` itself when no subgraph changed, else a copy of ``gm`` (the same
    nodes) whose subgraph attributes are the rewritten ones; and the site records of all the
    subgraphs (kept sites included)."""
    found = calls(gm)
    if not found:
        return gm, []
    records: list[report.SiteRecord] = []
    mapped = [c for c in found if c.operands is not None]
    for c in found:
        if c.operands is None:
            records += _unvisited(c)
    if not mapped:
        return gm, records
    captured: dict = {}
    if options.verify != "off":
        try:
            captured = _capture(gm, example_inputs, mapped)
        except Exception as e:  # noqa: BLE001 - the enclosing graph could not run
            log.warning(
                "attnfx: subgraph inputs not captured (%s: %s); their sites are kept",
                type(e).__name__,
                e,
            )
            for c in mapped:
                records += _unvisited(c, "the inputs of this subgraph could not be computed")
            return gm, records
    replaced: dict[str, fx.GraphModule] = {}
    for c in mapped:
        inputs = [_value(x, captured) for x in c.operands]
        try:
            new, recs = rewrite_graph(c.module, inputs, options)
        except reraise:
            raise
        except Exception as e:  # noqa: BLE001 - one subgraph's failure keeps that one only
            log.warning(
                "attnfx: internal error in the %s subgraph %s, kept as Dynamo gave it: %s: %s",
                c.hop,
                c.attr,
                type(e).__name__,
                e,
            )
            recs = [report.SiteRecord("?", "kept", "internal error", f"{type(e).__name__}: {e}")]
            new = c.module
        records += recs
        if new is not c.module:
            replaced[c.attr] = new
    return with_submodules(gm, replaced), records


def with_submodules(gm: fx.GraphModule, replaced: dict[str, fx.GraphModule]) -> fx.GraphModule:
    """``gm`` itself when ``replaced`` is empty, else a copy of it (the same nodes,
    attributes shared) whose attributes named in ``replaced`` are the given modules."""
    if not replaced:
        return gm
    out = G.copy_module(gm)
    for attr, new in replaced.items():
        _set_submodule(out, attr, new)
    return out


def _value(x, captured: dict):
    """What a placeholder of the subgraph receives for operand ``x``: its captured value,
    a constant, or (verification off: nothing was captured) the example value Dynamo
    recorded, which only the passes that need no real input read."""
    if isinstance(x, fx.Node):
        if x in captured:
            return captured[x]
        return G.example_value(x)
    return x


def _set_submodule(root: torch.nn.Module, path: str, mod: torch.nn.Module) -> None:
    *parents, leaf = path.split(".")
    owner = root
    for p in parents:
        owner = getattr(owner, p)
    setattr(owner, leaf, mod)


def _unvisited(c: _Call, reason: str | None = None) -> list[report.SiteRecord]:
    """The attention sites of a subgraph that is not rewritten, as kept records."""
    from attnfx.passes.canonicalize import canonicalize
    from attnfx.passes.recognize import find_sites

    reason = reason or f"inside a {c.hop} subgraph, which attnfx does not rewrite"
    try:
        copy = G.copy_module(c.module)
        canonicalize(copy)
        sites = find_sites(copy)
    except Exception as e:  # noqa: BLE001 - reporting only: never fail the compile over it
        log.debug("attnfx: sites of the %s subgraph not listed: %s", c.hop, e)
        return []
    return [report.SiteRecord(s.kind, "kept", reason, s.where) for s in sites]
