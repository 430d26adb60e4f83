"""Small graph helpers shared by the passes: example values, constants, casts, the
networkx view of an FX graph, and module paths."""

from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._guards import detect_fake_mode


def example_value(node):
    """The FakeTensor (or SymInt) Dynamo recorded for ``node``, or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def set_example_value(node: fx.Node) -> None:
    """Record an example value for a node the passes inserted, by running its target on
    the example values of its inputs under the graph's fake mode."""

    def ev(a):
        return example_value(a) if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, ev)
    kwargs = fx.node.map_aggregate(node.kwargs, ev)
    leaves = []
    fx.node.map_aggregate(
        (args, kwargs), lambda a: leaves.append(a) if isinstance(a, torch.Tensor) else None
    )
    # The mode the example values were made in (not the compile's ambient one).
    fake_mode = next(
        (t.fake_mode for t in leaves if hasattr(t, "fake_mode")), None
    ) or detect_fake_mode(leaves)
    try:
        if node.op == "call_method":
            fn = getattr(args[0], node.target)
            run = lambda: fn(*args[1:], **kwargs)
        else:
            run = lambda: node.target(*args, **kwargs)
        if fake_mode is not None:
            with fake_mode:
                node.meta["example_value"] = run()
        else:
            node.meta["example_value"] = run()
    except Exception:  # noqa: BLE001 - metadata is best effort; matching checks for None
        node.meta.pop("example_value", None)


def shape(node) -> tuple | None:
    ev = example_value(node)
    return tuple(ev.shape) if isinstance(ev, torch.Tensor) else None


def dtype(node):
    ev = example_value(node)
    return ev.dtype if isinstance(ev, torch.Tensor) else None


def requires_grad(node) -> bool:
    ev = example_value(node)
    return bool(isinstance(ev, torch.Tensor) and ev.requires_grad)


def is_tensor(node) -> bool:
    return isinstance(example_value(node), torch.Tensor)


def hashable(t) -> bool:
    """Whether a node target can be looked up in a set (some Dynamo targets cannot)."""
    try:
        hash(t)
        return True
    except TypeError:
        return False


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def constant_value(x):
    """A Python number for ``x`` if it is one, or a node that builds a 0-d constant tensor
    from constants only (``torch.tensor(c)``, ``torch.full([], c)``, ``scalar_tensor``);
    else None."""
    if is_number(x):
        return float(x)
    if not isinstance(x, fx.Node) or x.op != "call_function":
        return None
    if (
        x.target in (torch.tensor, torch.scalar_tensor, torch.as_tensor)
        and x.args
        and is_number(x.args[0])
    ):
        val = float(x.args[0])
    elif (
        x.target is torch.full
        and len(x.args) >= 2
        and tuple(x.args[0]) == ()
        and is_number(x.args[1])
    ):
        val = float(x.args[1])
    elif (
        x.target in (torch.zeros, torch.ones)
        and len(x.args) == 1
        and isinstance(x.args[0], (tuple, list))
        and tuple(x.args[0]) == ()
    ):
        val = 0.0 if x.target is torch.zeros else 1.0
    else:
        return None
    dt = x.kwargs.get("dtype")
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        val = torch.tensor(val, dtype=dt).item()  # the value the tensor really holds
    return val


_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type_as", "type", "contiguous"}


def is_cast(node: fx.Node) -> bool:
    """An elementwise dtype conversion (or a no-op copy) that keeps the shape."""
    if node.op == "call_method" and node.target in _CAST_METHODS:
        extra = node.args[1:]
        if node.target == "to" and not all(isinstance(a, torch.dtype) for a in extra):
            if any(not isinstance(a, (torch.dtype, torch.device, str)) for a in extra):
                return False
        if node.kwargs and set(node.kwargs) - {"dtype", "memory_format"}:
            return False
        return shape(node) == shape(node.args[0]) and shape(node) is not None
    return False


def dropout_identity(node: fx.Node) -> tuple[bool, str | None]:
    """(is a dropout, reason it is not an identity or None)."""
    if node.op == "call_function" and node.target in (
        F.dropout,
        torch.dropout,
        torch.nn.functional.dropout,
    ):
        args = list(node.args)
        p = args[1] if len(args) > 1 else node.kwargs.get("p", 0.5)
        if node.target is torch.dropout:
            training = args[2] if len(args) > 2 else node.kwargs.get("train", True)
        else:
            training = args[2] if len(args) > 2 else node.kwargs.get("training", True)
        if training is False or p == 0:
            return True, None
        return True, "dropout on the probabilities in training mode"
    return False, None


INPLACE_OPERATORS = {
    operator.setitem,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
}


# Ops whose result may share storage with their first argument: an in-place op on the
# result mutates the argument too.
VIEW_METHODS = {
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "transpose",
    "permute",
    "expand",
    "expand_as",
    "unsqueeze",
    "squeeze",
    "flatten",
    "unflatten",
    "narrow",
    "select",
    "as_strided",
    "t",
    "T",
    "mT",
    "contiguous",
    "detach",
    "unfold",
    "split",
    "chunk",
    "diagonal",
    "movedim",
    "swapaxes",
    "to",
    "type_as",
}
VIEW_FUNCTIONS = {
    operator.getitem,
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.unsqueeze,
    torch.squeeze,
    torch.flatten,
    torch.narrow,
    torch.select,
    torch.as_strided,
    torch.t,
    torch.split,
    torch.chunk,
    torch.diagonal,
    torch.movedim,
    torch.swapaxes,
    torch.detach,
}


def view_parent(x: fx.Node):
    """What the view-like op ``x`` views (its first argument), or None if ``x`` is not one."""
    if x.op == "call_method" and x.target in VIEW_METHODS and x.args:
        return x.args[0]
    if x.op == "call_function" and hashable(x.target) and x.target in VIEW_FUNCTIONS and x.args:
        return x.args[0]
    return None


def view_base(x) -> fx.Node | None:
    """The node whose storage ``x`` may view (through view-like ops)."""
    while isinstance(x, fx.Node):
        parent = view_parent(x)
        if parent is None:
            return x
        x = parent
    return None


def written_tensor(node: fx.Node):
    """What a node with side effects writes: the tensor node (``x`` of ``x.add_(y)``,
    ``x[i] = y``, ``out=x``), False when it writes no tensor (a random op), or None when
    it cannot be told (a module call, an unknown mutable op)."""
    if node.op in ("call_module", "placeholder", "output"):
        return None
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    target = node.target
    name = str(target) if node.op == "call_method" else getattr(target, "__name__", "") or ""
    pure_operator = node.op == "call_function" and getattr(target, "__module__", None) in (
        "_operator",
        "operator",
    )  # operator.and_ / or_ / not_: pure, despite the trailing underscore
    inplace = (
        (hashable(target) and target in INPLACE_OPERATORS)
        or (name.endswith("_") and not name.endswith("__") and not pure_operator)
        or (node.op == "call_method" and name.startswith("__i"))
        or name == "__setitem__"
    )
    if inplace:
        first = node.args[0] if node.args else None
        return first if isinstance(first, fx.Node) else None
    schema = getattr(target, "_schema", None)
    if schema is not None and getattr(schema, "is_mutable", False):
        return None
    return False


def has_side_effects(node: fx.Node) -> bool:
    """Whether removing ``node`` could change what the program does even when nothing
    reads its value: in-place tensor ops (``x.add_(y)``, ``buf.copy_(v)``, ``index_add_``,
    ``x[i] = y``, ``x += y``), ``out=`` calls, module calls, random ops and anything
    ``torch.fx`` already calls impure.  Conservative: when in doubt, it has effects.

    ``Graph.eliminate_dead_code`` is not enough: it treats every ``call_method`` as pure,
    so it deletes ``x.add_(y)`` whose return value is unused."""
    if node.op in ("placeholder", "output", "call_module"):
        return True
    if node.op == "get_attr":
        return False
    if "out" in node.kwargs:
        return True
    target = node.target
    if node.op == "call_method":
        name = str(target)
        if name.startswith("__") and name.endswith("__"):
            return name == "__setitem__" or name.startswith("__i")
        return name.endswith("_") or name in ("backward", "record_stream", "register_hook")
    if hashable(target) and target in INPLACE_OPERATORS:
        return True
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return False  # operator.and_ / or_ / not_: pure, despite the trailing underscore
    name = getattr(target, "__name__", "") or ""
    if name.endswith("_") and not name.endswith("__"):
        return True  # torch.relu_, torch.Tensor.add_ called as a function, aten in-place
    schema = getattr(target, "_schema", None)
    if schema is not None and getattr(schema, "is_mutable", False):
        return True
    try:
        return node.is_impure()
    except Exception:  # noqa: BLE001 - unknown purity: keep the node
        return True


def is_dead(node: fx.Node) -> bool:
    """Whether ``node``'s value never reaches an output or a side effect: no effects of
    its own and only dead users (a ``sim.clone()`` kept for debugging that nothing
    reads)."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "output" or has_side_effects(n):
            return False
        stack.extend(n.users)
    return True


def live_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that are not dead."""
    return [u for u in node.users if not is_dead(u)]


def dead_users(nodes: set[fx.Node]) -> set[fx.Node]:
    """The dead users of ``nodes`` outside them, and everything downstream of those (all
    dead too): what must go with ``nodes`` when they are replaced."""
    out: set[fx.Node] = set()
    stack = [u for n in nodes for u in n.users if u not in nodes and is_dead(u)]
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(n.users)
    return out


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with a fresh graph (same submodules and attributes), for passes
    that must not change the graph Dynamo gave."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The data-flow graph: an edge from each input node to each user."""
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for inp in n.all_input_nodes:
            g.add_edge(inp, n)
    return g


def module_path(node: fx.Node) -> str:
    """The module the node was traced from, as a dotted path (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    path = path.replace("L['self']", "").replace("L['fn']", "")
    # a module reached through its __dict__ (checkpoint_wrapper's wrapped module)
    path = path.replace(".__dict__['_modules']['", "._modules['")
    for old, new in (("._modules['", "."), ("']", ""), ("['", "."), ("[", "."), ("]", "")):
        path = path.replace(old, new)
    return path.strip(".") or "<root>"


def resolve_dim(dim, ndim: int) -> int | None:
    if not isinstance(dim, int):
        return None
    return dim + ndim if dim < 0 else dim


def sym_hint(x):
    """A concrete int for an int or SymInt (its hint)."""
    if isinstance(x, torch.SymInt):
        return (
            x.node.hint if x.node.hint is not None else int(x.node.shape_env.size_hint(x.node.expr))
        )
    return x


def int_hint(x) -> int | None:
    """An int, or a SymInt's recorded hint; None when there is none (an unbacked size)."""
    if isinstance(x, int):
        return x
    hint = getattr(getattr(x, "node", None), "hint", None)
    return int(hint) if hint is not None else None
