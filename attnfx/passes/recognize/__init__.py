"""One recognizer per attention variant, and the driver that tries them on every node.

A recognizer is the module a variant's record names (``attnfx.variants``); it exposes
``KIND`` and ``anchors(node)``: the match functions that apply to ``node`` (each
returns a ``Site`` or raises ``Refusal`` / ``NoMatch``), in the order to try them.
"""

from __future__ import annotations

import contextlib
import functools

import torch.fx as fx

from attnfx.passes import graph as G
from attnfx.passes import masks
from attnfx.passes.match import NoMatch, Refusal, Site, debug
from attnfx.passes.recognize import bucketed, neighborhood
from attnfx.variants import VARIANTS


@functools.cache
def recognizers() -> tuple:
    """The recognizer modules, in registry order."""
    return tuple(r for r in (v.load("recognizer") for v in VARIANTS) if r is not None)


def find_sites(gm: fx.GraphModule, defer_proofs: bool = False) -> list[Site]:
    """Every attention site of ``gm``: matched sites (``spec`` set) and refusals
    (``reason`` set), in graph order.  ``defer_proofs``: the mask and index analyses'
    checks against the materialized tensors are left in each site's ``proofs``, for the
    caller to run (``masks.run_proofs``) on the sites it will rewrite."""
    sites: list[Site] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        attempts = [(r.KIND, fn) for r in recognizers() for fn in r.anchors(node)]
        for kind, fn in attempts:
            proofs: list = []
            try:
                with masks.deferring_proofs(proofs) if defer_proofs else contextlib.nullcontext():
                    site = fn(node)
                site.proofs = proofs  # (unbucket's token-level site shares them)
                sites.append(site)
                break
            except Refusal as r:
                debug("kept %s at %s: %s", kind, node, r.reason)
                sites.append(
                    Site(
                        kind=kind,
                        anchor=node,
                        output=node,
                        reason=r.reason,
                        where=G.module_path(node),
                    )
                )
                break
            except NoMatch as e:
                debug("%s at %s is not a %s site: %s", node.target, node, kind, e)
    bucketed.unbucket(sites)  # bucketed local attention, read back over the tokens
    neighborhood.label(sites)  # neighborhood sites share the softmax anchor
    return sites


__all__ = ["find_sites", "recognizers"]
