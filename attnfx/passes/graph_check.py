"""Whole-graph check: the rewritten graph against the graph Dynamo gave.

Per-site verification proves each op call computes what its region computed.  This check
is the net for everything else: a pass that removes or changes a node outside any site
(an in-place op deleted as dead code, a buffer update lost, a wrong value wired to a
user) shows here, not there.

Both graphs run once on the compile's example inputs (SymInts at their hints), in the
working dtype, under the same RNG seed, with a private copy of every input the graph
mutates (the model's state is not touched):

1. the rewritten graph, whole, keeping the value of each op call that replaced a site;
2. the graph Dynamo gave, with each site's output node *taken from (1)* and whatever
   only fed the sites skipped.

So outside the sites both runs compute the same ops on the same values: any difference
is a node a pass changed, and no N² scores are ever materialized for the check.  (What
the op computes is the per-site verifier's question.)  Every output, and the final value
of every mutated input (buffers updated in forward), is compared with
``attnfx.testing.graph_outputs_close``: integer and bool tensors exactly (``topk`` /
``argmax`` indices), floating ones within a dtype-scaled bound (runs on a GPU may differ
by atomics' ordering), non-finite values class for class.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from attnfx.passes import graph as G
from attnfx.testing import graph_outputs_close


@dataclasses.dataclass
class GraphVerdict:
    ok: bool
    message: str = ""


def mutated_inputs(gm: fx.GraphModule) -> list[int]:
    """Positions of the placeholders an op with side effects may write (through views)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    hit = set()
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output") or not G.has_side_effects(n):
            continue
        targets = list(n.args[:1]) + [v for k, v in n.kwargs.items() if k == "out"]
        for t in targets:
            b = G.view_base(t)
            if b is not None and b.op == "placeholder":
                hit.add(b)
        if n.op == "call_module":  # a module call may write any input it is given
            hit |= {b for a in n.all_input_nodes if (b := G.view_base(a)) is not None}
    return [i for i, p in enumerate(placeholders) if p in hit]


def _needed(gm: fx.GraphModule, leaves: set[str]) -> set[fx.Node]:
    """The nodes an output or a side effect depends on, not looking past ``leaves``."""
    stack = [n for n in gm.graph.nodes if n.op == "output" or G.has_side_effects(n)]
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.name not in leaves:
            stack.extend(n.all_input_nodes)
    return seen


def _run(
    gm: fx.GraphModule,
    inputs: list,
    mutated: list[int],
    seed: int,
    *,
    record: set[fx.Node] = frozenset(),
    replace: dict[str, object] | None = None,
):
    ins = list(inputs)
    for i in mutated:
        if isinstance(ins[i], torch.Tensor):
            ins[i] = ins[i].detach().clone()
    replace = replace or {}
    needed = _needed(gm, set(replace)) if replace else None
    recorded: dict[fx.Node, object] = {}

    class _Run(fx.Interpreter):
        def run_node(self, n):
            if n.name in replace:
                return replace[n.name]
            if needed is not None and n not in needed:
                return None  # fed only the sites
            out = super().run_node(n)
            if n in record:
                # a copy: an in-place op downstream (``o.mul_(2)``) must not reach the value
                # the original run is given
                recorded[n] = out.clone() if isinstance(out, torch.Tensor) else out
            return out

    devices = sorted(
        {x.device.index or 0 for x in ins if isinstance(x, torch.Tensor) and x.is_cuda}
    )
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = _Run(gm).run(*ins)
    flat, _ = pytree.tree_flatten(out)
    return flat, [ins[i] for i in mutated], recorded


def check_graph(
    original: fx.GraphModule,
    rewritten: fx.GraphModule,
    example_inputs,
    sites: dict[str, fx.Node] | None = None,
    *,
    seed: int = 0,
) -> GraphVerdict:
    """Run both graphs on ``example_inputs`` and compare what they produce.  ``sites``
    maps the name of each replaced site output (a node of ``original``) to the node of
    ``rewritten`` that took its place."""
    sites = dict(sites or {})
    names = {n.name for n in original.graph.nodes}
    sites = {k: v for k, v in sites.items() if k in names}  # else computed, not taken
    inputs = [G.sym_hint(x) if isinstance(x, torch.SymInt) else x for x in example_inputs]
    mutated = sorted(set(mutated_inputs(original)) | set(mutated_inputs(rewritten)))
    cand, cand_state, values = _run(rewritten, inputs, mutated, seed, record=set(sites.values()))
    taken = {name: values[node] for name, node in sites.items() if node in values}
    base, base_state, _ = _run(original, inputs, mutated, seed, replace=taken)
    if len(base) != len(cand):
        return GraphVerdict(False, f"{len(cand)} outputs, the original has {len(base)}")
    pairs = [(f"output {i}", c, b) for i, (c, b) in enumerate(zip(cand, base))]
    pairs += [
        (f"input {i} (mutated in place)", c, b) for i, c, b in zip(mutated, cand_state, base_state)
    ]
    for label, c, b in pairs:
        res = graph_outputs_close(c, b)
        if not res.ok:
            return GraphVerdict(False, f"{label}: {res.message}")
    return GraphVerdict(True)
