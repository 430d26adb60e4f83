"""Inner-compiler guard: hand inductor forms it compiles correctly.

The last stage before the inner compiler.  Sites attnfx keeps still reach inductor, and
a user of ``backend="attnfx"`` must get eager's numbers for them too.

Known upstream miscompile (torch 2.13/2.14, inductor's ``fuse_attention`` patterns): the
serialized SDPA patterns ignore the reduction dim of the softmax they match
(``amax(x, Ignored(), True)``), so ``softmax(s, dim=-2) @ v`` is rewritten into attention
over keys — a wrong result (max |diff| ~0.7 on unit-normal inputs).  A softmax over any
axis but the last is rewritten here as ``softmax(xᵀ, -1)ᵀ`` (same values: the same
elements are normalized together), which those patterns do not match.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from attnfx.passes import graph as G

_SOFTMAX_FUNCTIONS = (torch.softmax, F.softmax)


def _softmax_dim(node: fx.Node):
    """(input, dim, dtype) of a softmax node, or None if ``node`` is not one."""
    if node.op == "call_function" and G.hashable(node.target) and node.target in _SOFTMAX_FUNCTIONS:
        # torch.softmax(x, dim, dtype) / F.softmax(x, dim, _stacklevel, dtype)
        dtype_pos = 2 if node.target is torch.softmax else 3
    elif node.op == "call_method" and node.target == "softmax":
        dtype_pos = 2  # x.softmax(dim, dtype)
    else:
        return None
    if not node.args:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dtype = node.args[dtype_pos] if len(node.args) > dtype_pos else node.kwargs.get("dtype")
    return node.args[0], dim, dtype


def needs_guard(gm: fx.GraphModule) -> list[fx.Node]:
    """The softmax nodes over a non-last axis."""
    out = []
    for n in gm.graph.nodes:
        sd = _softmax_dim(n)
        if sd is None:
            continue
        x, dim, _ = sd
        shp = G.shape(x)
        if shp is None or not isinstance(dim, int):
            continue
        d = G.resolve_dim(dim, len(shp))
        if d is not None and d != len(shp) - 1:
            out.append(n)
    return out


def guard_for_inductor(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` itself when nothing needs changing, else a copy with every softmax over a
    non-last axis written as a transposed last-axis softmax, in the subgraphs of its
    higher-order ops too (inductor inlines a checkpointed block or a cond branch)."""
    from attnfx.passes.subgraphs import calls, with_submodules

    guarded = {c.attr: guard_for_inductor(c.module) for c in calls(gm)}
    gm = with_submodules(gm, {a: m for a, m in guarded.items() if m is not gm.get_submodule(a)})
    if not needs_guard(gm):
        return gm
    new = G.copy_module(gm)
    for n in needs_guard(new):
        x, dim, dtype = _softmax_dim(n)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        g = new.graph
        with g.inserting_before(n):
            xt = g.call_function(torch.transpose, (x, dim, -1))
            G.set_example_value(xt)
            sm = g.call_function(torch.softmax, (xt, -1), kwargs)
            G.set_example_value(sm)
            back = g.call_function(torch.transpose, (sm, dim, -1))
            G.set_example_value(back)
        back.meta.update({k: v for k, v in n.meta.items() if k not in ("example_value", "val")})
        n.replace_all_uses_with(back)
        g.erase_node(n)
    new.graph.lint()
    new.recompile()
    return new
