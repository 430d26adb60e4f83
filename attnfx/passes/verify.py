"""Verify: prove, numerically, that a rewrite computes what the site computed.

For each site the original subgraph (the region the rewrite replaces) and the candidate
(the same operands into the attnfx op, built by ``rewrite.emit_call``) are run on

* the site's real inputs, captured by running as much of the model graph as they need
  with an FX interpreter on the compile's example inputs, and
* ``random_trials`` sets of fresh random q, k, v (masks and biases keep their real
  values),

against the float64 gold of the original subgraph, under ``attnfx.testing``'s rule
(attnfx/testing.py): the output, and the gradient of every input of the region that requires
grad (q, k, v, a bias, a temperature, ...; one the candidate drops counts as zero).

Bounded work: the original subgraph is not run at full size.

* (batch, head) slices: the first and last batch, the first and last kv head with all
  the query heads of their group;
* query rows: the first, the last and random ones (``ROWS`` in all), against all keys;
* random trials at ``RANDOM_LENGTH`` (prefixes of the sequence) where the spec does not
  depend on the lengths.

``_Slicer`` rewrites a copy of the region: q (and k, v, masks, biases, whose layout the
op call fixes) enter sliced; each op on a sliced value must be one whose slice is the op
on the slices (elementwise with broadcasting, matmul, softmax over an unsliced dim,
transposes, views that keep each sliced dim whole); a full-size value meeting a sliced
one (a causal mask built inside the region from ``arange``/``tril``, a buffer) is
indexed the same way at that point.  The rewritten region runs under fake tensors
first, and every node must have exactly its full shape with the sliced dims shrunk.
Any other op, a size read of a sliced dim, or a shape that does not match falls back to
a less sliced check, down to the full-size one (correct, only expensive).

The candidate runs on the same (batch, head) slices with all query rows: a kernel knows
a row's position only by its index, so rows cannot be dropped from its input; the rows
the original ran are compared, and the gradients are driven by a cotangent that is zero
on the other rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attnfx.passes import graph as G
from attnfx.passes import rewrite
from attnfx.passes.match import Site
from attnfx.testing import _stride_order, compare

log = logging.getLogger("attnfx")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# Bounds of the check; module constants so that tests can make them bite at small sizes.
ROWS = 128  # query rows the original runs when there are more
EDGE_ROWS = 16  # of those, the first and the last ones (the rest are random)
RANDOM_LENGTH = 300  # q / kv length of the random trials (not a multiple of a tile)


@dataclasses.dataclass
class Verdict:
    ok: bool
    max_rel_err: float = 0.0
    message: str = ""
    checked: str = ""  # what was compared: the slices, rows and lengths of each trial


class _Float64(TorchFunctionMode):
    """Runs a subgraph in float64: floating dtype arguments and the ``.half()`` /
    ``.float()`` / ``.bfloat16()`` casts become float64 (the gold of the equivalence rule)."""

    _CASTS = {torch.Tensor.half, torch.Tensor.float, torch.Tensor.bfloat16}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._CASTS:
            func = torch.Tensor.double
        args = tuple(torch.float64 if a in _FLOATS else a for a in args)
        for key, val in kwargs.items():
            if val in _FLOATS:
                kwargs[key] = torch.float64
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------


class _Done(Exception):
    pass


def capture_inputs(
    gm: fx.GraphModule, example_inputs, wanted: set[fx.Node]
) -> dict[fx.Node, object]:
    """Run ``gm`` on the example inputs and keep the values of the ``wanted`` nodes.

    Only the wanted nodes' ancestors run, and nothing after the last of them: the
    attention itself (the N² scores) is never computed here.  A graph with in-place ops
    runs whole, as before, so that every mutation a value sees before its use is applied.
    """
    values: dict[fx.Node, object] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    wanted = {n for n in wanted if n in order}
    mutates = _mutates(gm)
    needed: set[fx.Node] = set()
    stack = list(wanted)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    remaining = set(wanted)

    class _Capture(fx.Interpreter):
        def run_node(self, n):
            if not mutates and n.op != "placeholder" and n not in needed:
                return None
            out = super().run_node(n)
            if n in remaining:
                # detach() shares storage: a later in-place update shows in the value.
                values[n] = out.detach() if isinstance(out, torch.Tensor) else out
                remaining.discard(n)
                if not remaining and not mutates:
                    raise _Done
            return out

    inputs = [G.sym_hint(x) if isinstance(x, torch.SymInt) else x for x in example_inputs]
    if mutates:
        # Running the graph must not change the model's state (running stats, caches).
        inputs = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    if remaining:
        try:
            with torch.no_grad():
                _Capture(gm).run(*inputs)
        except _Done:
            pass
    return values


def concrete_inputs(example_inputs) -> list:
    """The example inputs verification runs on: the compile's own, unless they are fake
    or DTensors.

    A compiler is normally given real inputs; DDP's graph splitting (``DDPOptimizer``)
    gives each piece fake ones (nothing real exists when it compiles).  And a graph on
    DTensors (tensor parallelism) runs collectives: running it at compile time is safe
    only if every rank runs the same ones, so every decision the checks make must be the
    same on every rank, which per-rank data does not guarantee.  In both cases every
    tensor input is drawn from its metadata instead (shape, strides, dtype, device; a
    DTensor's local shard, with its mesh and placements), deterministically (seed 0), so
    that all ranks verify on the same values: floating tensors standard normal, scaled
    by 1/sqrt(last dim) when 2-D or more (a weight then keeps a projection's output at
    unit scale, as initialization does); bool tensors random; integer tensors 0 (always
    a valid index)."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    from attnfx.distributed import is_dtensor

    if not any(isinstance(x, FakeTensor) or is_dtensor(x) for x in example_inputs):
        return list(example_inputs)
    gen = torch.Generator().manual_seed(0)
    out = []
    with unset_fake_temporarily():
        for x in example_inputs:
            if is_dtensor(x):
                from torch.distributed.tensor import DTensor

                local = _drawn(x._local_tensor, gen)
                out.append(
                    DTensor.from_local(
                        local,
                        x.device_mesh,
                        x.placements,
                        run_check=False,
                        shape=x.shape,
                        stride=x.stride(),
                    )
                )
            elif isinstance(x, torch.Tensor):
                out.append(_drawn(x, gen))
            else:
                out.append(x)
    return out


def _drawn(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A real tensor with ``x``'s metadata and drawn values (``concrete_inputs``)."""
    shape = [G.sym_hint(s) for s in x.shape]
    stride = [G.sym_hint(s) for s in x.stride()]
    if x.is_floating_point():
        r = torch.randn(shape, generator=gen, dtype=torch.float32)
        if len(shape) >= 2 and shape[-1] > 0:
            r = r / math.sqrt(shape[-1])
    elif x.dtype == torch.bool:
        r = torch.rand(shape, generator=gen) < 0.5
    else:
        r = torch.zeros(shape, dtype=torch.long)
    real = torch.empty_strided(shape, stride, dtype=x.dtype, device=x.device)
    try:
        real.copy_(r)
    except RuntimeError:  # an overlapping (expanded) layout cannot be written
        real = r.to(dtype=x.dtype, device=x.device)
    return real


def _mutates(gm: fx.GraphModule) -> bool:
    """Whether any node may write into a tensor: ``x.add_``, ``x[i] = y``, ``x += y``,
    ``out=`` arguments."""
    # (``operator.and_`` of two masks is no write: it made the capture of every
    # neighborhood site run its whole graph, the N² scores included)
    return any(_writes(n) for n in gm.graph.nodes)


def _writes(n: fx.Node) -> bool:
    """Whether ``n`` may write into a tensor (a random op or a dropout does not)."""
    return (
        n.op in ("call_method", "call_function")
        and G.has_side_effects(n)
        and G.written_tensor(n) is not False
    )


# ---------------------------------------------------------------------------------------
# The two graphs
# ---------------------------------------------------------------------------------------


def _region_module(gm, nodes, ext, site) -> tuple[fx.GraphModule, dict]:
    orig, env = fx.Graph(), {}
    for i, e in enumerate(ext):
        env[e] = orig.placeholder(f"in{i}")
    for n in gm.graph.nodes:
        if n in nodes:
            env[n] = orig.node_copy(n, lambda x: env[x])
    orig.output(env[site.output])
    return fx.GraphModule(gm, orig), env


def _candidate_module(gm, ext, site) -> fx.GraphModule:
    cand, env = fx.Graph(), {}
    for i, e in enumerate(ext):
        env[e] = cand.placeholder(f"in{i}")
    cand.output(rewrite.emit_call(cand, site, lambda x: env[x]))
    return fx.GraphModule(gm, cand)


def original_module(gm: fx.GraphModule, gnx: nx.DiGraph, site: Site):
    """(the site's original subgraph as a module, its inputs' nodes in placeholder order)."""
    nodes, ext = rewrite.site_inputs(gnx, site)
    return _region_module(gm, nodes, ext, site)[0], ext


def build_graphs(gm: fx.GraphModule, gnx: nx.DiGraph, site: Site):
    """The site's original subgraph and its candidate, as modules with the same inputs."""
    nodes, ext = rewrite.site_inputs(gnx, site)
    return _region_module(gm, nodes, ext, site)[0], _candidate_module(gm, ext, site), ext


# ---------------------------------------------------------------------------------------
# Slicing
# ---------------------------------------------------------------------------------------
#
# Labels name the dims that may be sliced: "B" batch, "H" query heads (kv heads too when
# there is no GQA; the flattened batch·heads of 3-D sites), "Hk" kv heads under GQA,
# "Q" query rows, "K" keys (sliced only to a prefix, in reduced-length trials).  A set
# maps each label to the indices kept, or None (the dim is whole).


class _Unsliceable(Exception):
    """The region cannot be sliced this way: fall back to a less sliced check."""


def _ext_labels(site: Site, ext: list, shapes: dict) -> list[list[frozenset] | None]:
    """For each input of the region that is an operand of the op call, the labels of
    its dims (a set per dim: a node may play several roles); None for other inputs.
    The op call fixes these: q, k, v through their permute to (B, H, N, D), aux tensors
    broadcast (from the right) to the scores, q multipliers to q."""
    hk = "H" if site.spec.gqa_group == 1 else "Hk"
    if site.rank3:
        qr, kr, score, qrow = ("H", "Q", None), (hk, "K", None), ("H", "Q", "K"), ("H", "Q", None)
    else:
        qr, kr = ("B", "H", "Q", None), ("B", hk, "K", None)
        score, qrow = ("B", "H", "Q", "K"), ("B", "H", "Q", None)
    roles: dict[fx.Node, list[list]] = {}
    unknown: set[fx.Node] = set()

    def add(node, labels):
        shp = shapes.get(node)
        if shp is None or labels is None or len(labels) != len(shp):
            unknown.add(node)
            return
        roles.setdefault(node, []).append([lab if s != 1 else None for lab, s in zip(labels, shp)])

    for o, r in ((site.q, qr), (site.k, kr), (site.v, kr)):
        shp = shapes.get(o.node)
        if shp is None or len(shp) != len(r) or o.view is not None:
            # (a reshaped operand, an image's channels split into heads: its dims are not
            # the op's, so nothing is sliced along them)
            unknown.add(o.node)
            continue
        lab = [None] * len(r)
        for j, p in enumerate(o.permute or range(len(r))):
            lab[p] = r[j]
        add(o.node, lab)
    tables = {"table": {1: (None,), 2: ("H", None)}, "table_t": {2: (None, "H")}}
    for group, frame in ((site.aux, score), (site.q_mul, qrow)):
        for a in group:
            if a.transform in tables:  # a bias table: its head dim, if any, is H
                add(a.node, tables[a.transform].get(len(shapes.get(a.node) or ())))
                continue
            shp = shapes.get(a.node)
            ok = shp is not None and len(shp) <= len(frame)
            add(a.node, list(frame[len(frame) - len(shp) :]) if ok else None)
    out = []
    for e in ext:
        if e in unknown:
            out.append([])  # an operand whose layout is not understood: slice nothing
        elif e in roles:
            per_dim = zip(*roles[e])
            out.append([frozenset(x for x in labs if x is not None) for labs in per_dim])
        else:
            out.append(None)
    return out


def _resolve(raw, sets) -> list[str | None] | None:
    """One label per dim under ``sets``, or raise when a dim must be sliced two ways."""
    if raw is None:
        return None
    if raw == []:
        if any(v is not None for v in sets.values()):
            raise _Unsliceable("an operand's layout is not understood")
        return None
    out = []
    for labs in raw:
        live = [lab for lab in labs if sets.get(lab) is not None]
        if len(live) > 1 or (live and len(labs) > 1):
            raise _Unsliceable(f"one input dim plays {sorted(labs)}")
        out.append(live[0] if live else None)
    return out


def _index_dim(t: torch.Tensor, d: int, idx: list[int]) -> torch.Tensor:
    """``t.index_select(d, idx)`` keeping ``t``'s memory order (and stride-0 dims)."""
    if t.stride(d) == 0:
        shape = list(t.shape)
        shape[d] = len(idx)
        return t.narrow(d, 0, 1).expand(shape)
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))
    ix = torch.tensor(idx, dtype=torch.long, device=t.device)
    r = t.permute(order).index_select(order.index(d), ix)
    return r.permute([order.index(i) for i in range(t.dim())])


def _index(t, labels, sets):
    if not isinstance(t, torch.Tensor) or labels is None:
        return t
    for d, lab in enumerate(labels):
        if lab is not None and sets.get(lab) is not None:
            t = _index_dim(t, d, sets[lab])
    return t


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


_ELEMENTWISE_FN = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.invert,
    operator.and_,
    operator.or_,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.true_divide,
    torch.neg,
    torch.exp,
    torch.tanh,
    torch.sigmoid,
    torch.reciprocal,
    torch.abs,
    torch.masked_fill,
    torch.where,
    torch.clamp,
    torch.maximum,
    torch.minimum,
    torch.logical_not,
    torch.logical_and,
    torch.logical_or,
    torch.bitwise_not,
    torch.bitwise_and,
    torch.bitwise_or,
    torch.eq,
    torch.ne,
    torch.lt,
    torch.le,
    torch.gt,
    torch.ge,
    F.tanh,
    F.sigmoid,
    F.dropout,
    torch.dropout,
}
_ELEMENTWISE_METHOD = {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "exp",
    "tanh",
    "sigmoid",
    "reciprocal",
    "abs",
    "masked_fill",
    "clamp",
    "float",
    "half",
    "bfloat16",
    "double",
    "bool",
    "int",
    "long",
    "to",
    "type",
    "type_as",
    "contiguous",
    "clone",
    "detach",
    "logical_not",
    "bitwise_not",
    "__and__",
    "__or__",
    "__invert__",
}
_LIKE = {torch.ones_like, torch.zeros_like, torch.full_like, torch.empty_like}
_SOFTMAX = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax}
_REDUCE_METHOD = {"sum", "amax", "mean", "logsumexp", "softmax", "log_softmax"}
_REDUCE_FN = {torch.sum, torch.amax, torch.mean, torch.logsumexp}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm}


class _Slicer:
    """Rewrites the region (``nodes`` of ``gm``, inputs ``ext``) to run on slices.

    ``labels[i]``: the labels of input i's dims, or None; ``entry[i]``: whether input i
    arrives sliced (else whole, and it is indexed where it meets a sliced value);
    ``shapes``: the full shape of every region value (from a fake run).
    """

    def __init__(self, gm, nodes, ext, output, labels, entry, sets, full, shapes):
        self.gm, self.sets, self.full, self.shapes = gm, sets, full, shapes
        self.g = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.state: dict[fx.Node, tuple] = {}  # new node -> label per dim (None: whole)
        self.cur: dict[fx.Node, tuple] = {}  # new node -> expected shape
        self.sizes: dict[fx.Node, tuple] = {}  # new node holding a tensor's .size()
        self.cache: dict = {}
        for i, e in enumerate(ext):
            p = self.g.placeholder(f"in{i}")
            self.env[e] = p
            shp = shapes.get(e)
            if shp is None:
                continue
            lab = labels[i] if labels[i] is not None and entry[i] else [None] * len(shp)
            self._set(p, [x if x is not None and sets.get(x) is not None else None for x in lab])
            self.cur[p] = self._shrunk(shp, self.state[p])
        self.idx = {}
        self.idx_labels = [lab for lab in ("B", "H", "Hk", "Q", "K") if sets.get(lab) is not None]
        for lab in self.idx_labels:
            self.idx[lab] = self.g.placeholder(f"idx_{lab}")
        for n in gm.graph.nodes:
            if n in nodes:
                self._node(n)
        self.out = self.env[output]
        self.g.output(self.out)
        self.out_state = self.state.get(self.out)
        if self.out_state is None:
            raise _Unsliceable("the output is not a tensor")
        self.module = fx.GraphModule(gm, self.g)

    # -- bookkeeping ---------------------------------------------------------------------
    def _set(self, node, state):
        self.state[node] = tuple(state)

    def _size(self, lab):
        return len(self.sets[lab])

    def _shrunk(self, shape, state):
        return tuple(self._size(s) if s is not None else int(n) for n, s in zip(shape, state))

    def _sliced(self, x) -> bool:
        return any(self.state.get(x, ())) or x in self.sizes

    def _finish(self, n, new, state):
        """Record ``new`` (the copy of ``n``) with ``state``; its shape must be ``n``'s
        full shape with each sliced dim holding its label's full size."""
        shp = self.shapes.get(n)
        if shp is None or len(shp) != len(state):
            raise _Unsliceable(f"no shape for {n}")
        for s, lab in zip(shp, state):
            if lab is not None and int(s) != self.full[lab]:
                raise _Unsliceable(f"{n}: dim of size {s} carries {lab}")
        self.env[n] = new
        self._set(new, state)
        self.cur[new] = self._shrunk(shp, state)
        return new

    def _indexed(self, x, d, lab):
        key = (x, d, lab)
        if key not in self.cache:
            y = self.g.call_function(torch.index_select, (x, d, self.idx[lab]))
            st = list(self.state[x])
            st[d] = lab
            cur = list(self.cur[x])
            cur[d] = self._size(lab)
            self._set(y, st)
            self.cur[y] = tuple(cur)
            self.cache[key] = y
        return self.cache[key]

    def _join(self, frames, width, skip=()):
        """Broadcast ``frames`` (old input node, the frame dim each of its dims maps to)
        into a frame of ``width`` dims.  Returns the label of each frame dim and each
        input conformed: a whole dim facing a sliced one is indexed the same way (a
        size-1 dim broadcasts and stays).  ``skip``: (node, dim) pairs checked by the
        caller."""
        out = [None] * width
        for node, dims in frames:
            st = self.state[self.env[node]]
            for d, o in enumerate(dims):
                if st[d] is None or (node, d) in skip:
                    continue
                if o is None or (out[o] is not None and out[o] != st[d]):
                    raise _Unsliceable(f"sliced dim of {node} meets another slicing")
                out[o] = st[d]
        conf = {}
        for node, dims in frames:
            x = self.env[node]
            if node in conf and conf[node][1] != dims:
                raise _Unsliceable(f"{node} enters one op twice, aligned differently")
            for d, o in enumerate(dims):
                lab = out[o] if o is not None else None
                st = self.state[x][d]
                if lab is None or st == lab or (node, d) in skip:
                    continue
                size = self.cur[x][d]
                if size == 1:
                    continue
                if size != self.full[lab]:
                    raise _Unsliceable(f"{node}: dim of size {size} facing {lab}")
                x = self._indexed(x, d, lab)
            conf[node] = (x, dims)
        return out, {k: v[0] for k, v in conf.items()}

    def _emit(self, n, conf, args=None, kwargs=None):
        def sub(x):
            return conf[x] if x in conf else self.env[x]

        args = n.args if args is None else args
        kwargs = n.kwargs if kwargs is None else kwargs
        return self.g.create_node(
            n.op,
            n.target,
            fx.node.map_arg(args, sub),
            fx.node.map_arg(kwargs, sub),
            name=n.name,
        )

    def _rank(self, x):
        return len(self.shapes[x])

    def _dim(self, d, rank):
        d = G.resolve_dim(d, rank)
        if d is None or not 0 <= d < rank:
            raise _Unsliceable(f"dim {d} not understood")
        return d

    # -- one node ------------------------------------------------------------------------
    def _node(self, n: fx.Node):
        ins = n.all_input_nodes
        if not any(self._sliced(self.env[i]) for i in ins):
            new = self.g.node_copy(n, lambda x: self.env[x])
            self.env[n] = new
            shp = self.shapes.get(n)
            if shp is not None:
                self._set(new, [None] * len(shp))
                self.cur[new] = tuple(int(s) for s in shp)
            return
        t = n.target
        if not G.hashable(t):
            raise _Unsliceable("unhashable op")
        reads_size = any(self.env[i] in self.sizes for i in ins)
        if reads_size and not (
            (n.op == "call_function" and t is operator.getitem)
            or (n.op == "call_method" and t in ("view", "reshape"))
        ):
            raise _Unsliceable("sizes of a sliced value used")
        if (
            n.op == "call_function"
            and t in _MATMUL
            or n.op == "call_method"
            and t
            in (
                "matmul",
                "bmm",
            )
        ):
            return self._matmul(n)
        if n.op == "call_function" and t is F.scaled_dot_product_attention:
            return self._sdpa(n)
        if (n.op == "call_function" and t in _SOFTMAX | _REDUCE_FN) or (
            n.op == "call_method" and t in _REDUCE_METHOD
        ):
            return self._reduce(n)
        if (n.op == "call_function" and t in _ELEMENTWISE_FN) or (
            n.op == "call_method" and t in _ELEMENTWISE_METHOD
        ):
            return self._elementwise(n)
        if n.op == "call_function" and t in _LIKE:
            x = self.env[n.args[0]]
            return self._finish(n, self._emit(n, {}), self.state[x])
        if (n.op == "call_function" and t in (torch.transpose, torch.permute)) or (
            n.op == "call_method" and t in ("transpose", "permute")
        ):
            return self._permute(n)
        if (
            n.op == "call_method"
            and t in ("view", "reshape")
            or (n.op == "call_function" and t is torch.reshape)
        ):
            return self._reshape(n)
        if n.op == "call_method" and t == "expand":
            return self._expand(n)
        if (n.op == "call_method" and t in ("unsqueeze", "squeeze")) or (
            n.op == "call_function" and t in (torch.unsqueeze, torch.squeeze)
        ):
            return self._squeeze(n)
        if n.op == "call_function" and t is operator.getitem:
            return self._getitem(n)
        if self._size_query(n):
            return
        raise _Unsliceable(f"op {getattr(t, '__name__', t)} on a sliced value")

    def _elementwise(self, n):
        t = n.target
        data = list(n.args) + list(n.kwargs.values())
        if t == "type_as" or t == "to":
            data = data[:1]  # the others only name a dtype / device
        if t is torch.where and len(n.args) != 3:
            raise _Unsliceable("where() with one argument")
        tensors = [a for a in data if isinstance(a, fx.Node) and self.shapes.get(a) is not None]
        if any(isinstance(a, (list, tuple)) for a in data):
            raise _Unsliceable("elementwise op over a list")
        width = self._rank(n)
        frames = []
        for a in tensors:
            r = self._rank(a)
            frames.append((a, list(range(width - r, width))))
        out, conf = self._join(frames, width)
        return self._finish(n, self._emit(n, conf), out)

    def _matmul(self, n):
        a, b = n.args[0], n.args[1]
        if n.kwargs or not all(isinstance(x, fx.Node) for x in (a, b)):
            raise _Unsliceable("matmul form")
        ra, rb, width = self._rank(a), self._rank(b), self._rank(n)
        if ra < 2 or rb < 2 or width != max(ra, rb):
            raise _Unsliceable("matmul of vectors")
        c = width  # a virtual frame dim for the contraction
        fa = list(range(width - ra, width - 2)) + [width - 2, c]
        fb = list(range(width - rb, width - 2)) + [c, width - 1]
        out, conf = self._join([(a, fa), (b, fb)], width + 1)
        if out[c] not in (None, "K"):  # a sum over part of B, H or Q is another sum
            raise _Unsliceable("matmul contracts a sliced dim")
        return self._finish(n, self._emit(n, conf), out[:width])

    def _reduce(self, n):
        x = n.args[0]
        st = self.state[self.env[x]]
        rank = len(st)
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dim is None:
            raise _Unsliceable("reduction over every dim")
        dims = [self._dim(d, rank) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        for d in dims:
            if st[d] not in (None, "K"):  # over a key prefix: the trial's length
                raise _Unsliceable("reduction over a sliced dim")
        name = n.target if isinstance(n.target, str) else n.target.__name__
        keep = name in ("softmax", "log_softmax") or bool(
            n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
        )
        out = list(st) if keep else [s for i, s in enumerate(st) if i not in dims]
        return self._finish(n, self._emit(n, {}), out)

    def _permute(self, n):
        x = n.args[0]
        st = self.state[self.env[x]]
        rank = len(st)
        if n.target in (torch.transpose, "transpose"):
            d0, d1 = (self._dim(d, rank) for d in n.args[1:3])
            perm = list(range(rank))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        else:
            dims = (
                n.args[1]
                if len(n.args) == 2 and isinstance(n.args[1], (list, tuple))
                else n.args[1:]
            )
            perm = [self._dim(d, rank) for d in dims]
        return self._finish(n, self._emit(n, {}), [st[p] for p in perm])

    def _sizes_arg(self, n):
        args = n.args[1:]
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            args = args[0]
        return list(args)

    def _reshape(self, n):
        x = n.args[0]
        if n.kwargs:
            raise _Unsliceable("reshape keyword")
        st = self.state[self.env[x]]
        if self.shapes.get(n) is None:
            raise _Unsliceable("reshape without a shape")
        a, b = [int(s) for s in self.shapes[x]], [int(s) for s in self.shapes[n]]
        out = [None] * len(b)
        for d, lab in enumerate(st):
            if lab is None:
                continue
            # The dim survives whole iff an output dim of its size starts at the same
            # offset: the elements before it and within it are then the same ones.
            pre = _prod(a[:d])
            hits = [e for e in range(len(b)) if b[e] == a[d] and _prod(b[:e]) == pre]
            if len(hits) != 1 or out[hits[0]] is not None:
                raise _Unsliceable("reshape merges or splits a sliced dim")
            out[hits[0]] = lab
        sizes = [self._size(lab) if lab else s for s, lab in zip(b, out)]
        new = self.g.create_node(n.op, n.target, (self.env[x], tuple(sizes)), {}, name=n.name)
        return self._finish(n, new, out)

    def _expand(self, n):
        x = n.args[0]
        st = self.state[self.env[x]]
        sizes = self._sizes_arg(n)
        width = len(sizes)
        out = [None] * (width - len(st)) + list(st)
        new_sizes = [self._size(lab) if lab else s for s, lab in zip(sizes, out)]
        new = self.g.create_node(
            n.op,
            n.target,
            (self.env[x], *fx.node.map_arg(tuple(new_sizes), lambda y: self.env[y])),
            {},
            name=n.name,
        )
        return self._finish(n, new, out)

    def _squeeze(self, n):
        x = n.args[0]
        st = list(self.state[self.env[x]])
        shp = [int(s) for s in self.shapes[x]]
        name = n.target if isinstance(n.target, str) else n.target.__name__
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if name == "unsqueeze":
            d = self._dim(dim, len(st) + 1)
            st.insert(d, None)
        elif dim is None:
            st = [s for s, size in zip(st, shp) if size != 1]
        else:
            d = self._dim(dim, len(st))
            if shp[d] == 1:
                st.pop(d)
        return self._finish(n, self._emit(n, {}), st)

    def _getitem(self, n):
        x, idx = n.args
        if self.env[x] in self.sizes:
            return self._size_item(n)
        st = self.state[self.env[x]]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
        out, d = [], 0
        for it in items:
            if it is Ellipsis:
                for _ in range(len(st) - consuming):
                    out.append(st[d])
                    d += 1
            elif it is None:
                out.append(None)
            elif isinstance(it, slice):
                if st[d] is not None and it != slice(None):
                    raise _Unsliceable("slice of a sliced dim")
                out.append(st[d] if it == slice(None) else None)
                d += 1
            elif isinstance(it, int) and not isinstance(it, bool):
                if st[d] is not None:
                    raise _Unsliceable("index into a sliced dim")
                d += 1
            else:
                raise _Unsliceable("advanced indexing of a sliced value")
        out.extend(st[d:])
        return self._finish(n, self._emit(n, {}), out)

    def _size_query(self, n) -> bool:
        """``x.size(d)`` / ``x.shape`` / ``x.size()`` / ``x.dim()`` / dtype and device: the
        same value as on the full tensor unless it reads a sliced dim."""
        x = n.args[0] if n.args else None
        if not isinstance(x, fx.Node) or x not in self.env:
            return False
        st = self.state.get(self.env[x])
        if st is None:
            return False
        t = n.target
        if n.op == "call_function" and t is getattr and n.args[1] in ("dtype", "device", "ndim"):
            pass
        elif n.op == "call_method" and t == "dim":
            pass
        elif (n.op == "call_method" and t == "size" and len(n.args) == 1 and not n.kwargs) or (
            n.op == "call_function" and t is getattr and n.args[1] == "shape"
        ):
            new = self.g.node_copy(n, lambda y: self.env[y])
            self.env[n] = new
            self.sizes[new] = st
            return True
        elif (n.op == "call_method" and t == "size") or (
            n.op == "call_function" and t is torch.ops.aten.sym_size.int
        ):
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            if st[self._dim(dim, len(st))] is not None:
                raise _Unsliceable("size of a sliced dim read")
        else:
            return False
        self.env[n] = self.g.node_copy(n, lambda y: self.env[y])
        return True

    def _size_item(self, n):
        x, i = n.args
        st = self.sizes[self.env[x]]
        if isinstance(i, int):
            if st[self._dim(i, len(st))] is not None:
                raise _Unsliceable("size of a sliced dim read")
        elif any(st[j] is not None for j in range(len(st))[i]):
            raise _Unsliceable("sizes of sliced dims read")
        self.env[n] = self.g.node_copy(n, lambda y: self.env[y])

    def _sdpa(self, n):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        args = dict(zip(names, n.args))
        args.update(n.kwargs)
        q, k, v = args["query"], args["key"], args["value"]
        mask = args.get("attn_mask")
        width = self._rank(q)
        if width < 3 or self._rank(k) != width or self._rank(v) != width:
            raise _Unsliceable("sdpa operands of different ranks")
        e, s = width, width + 1  # virtual frame dims: head dim of q/k, keys
        batch = list(range(width - 2))
        frames = [
            (q, batch + [width - 2, e]),
            (k, batch + [s, e]),
            (v, batch + [s, width - 1]),
        ]
        skip = set()
        if args.get("enable_gqa"):
            # k, v hold kv heads: they must enter sliced by kv head, as q by its groups.
            hd = width - 3
            qh = self.state[self.env[q]][hd]
            for x in (k, v):
                xh = self.state[self.env[x]][hd]
                if not (qh == xh or (qh == "H" and xh == "Hk")):
                    raise _Unsliceable("sdpa gqa heads sliced apart")
                skip.add((x, hd))
        if isinstance(mask, fx.Node):
            frame = batch + [width - 2, s]
            frames.append((mask, frame[len(frame) - self._rank(mask) :]))
        out, conf = self._join(frames, width + 2, skip)
        if out[e] is not None or out[s] not in (None, "K"):
            raise _Unsliceable("sdpa over a sliced head dim")
        if args.get("is_causal") and out[width - 2] is not None:
            rows = self.sets["Q"]
            if rows != list(range(len(rows))):  # top-left causal needs the row positions
                raise _Unsliceable("is_causal with a subset of query rows")
        return self._finish(n, self._emit(n, conf), out[:width])


# ---------------------------------------------------------------------------------------
# Plans: how each trial is sliced
# ---------------------------------------------------------------------------------------


class _ShapeRun(fx.Interpreter):
    """A fake-tensor run recording (or checking) the shape of every node."""

    def __init__(self, module, expect=None):
        super().__init__(module)
        self.shapes: dict[fx.Node, tuple | None] = {}
        self.expect = expect or {}

    def run_node(self, n):
        out = super().run_node(n)
        shp = tuple(int(s) for s in out.shape) if isinstance(out, torch.Tensor) else None
        self.shapes[n] = shp
        want = self.expect.get(n)
        if want is not None and shp != want:
            raise _Unsliceable(f"{n} has shape {shp} sliced, expected {want}")
        return out


def _fake_run(module, inputs, expect=None):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    run = _ShapeRun(module, expect)
    with mode:
        out = run.run(*fake)
    return run.shapes, out


@dataclasses.dataclass
class _Plan:
    region: fx.GraphModule
    cand: fx.GraphModule
    labels: list  # per input: label per dim (None: not sliced anywhere)
    entry: list[bool]  # per input: enters the region sliced
    sets: dict  # label -> indices, for the region (Q: its rows)
    cand_q: list[int] | None  # the candidate's query rows (a prefix, or None: all)
    idx_labels: list[str]
    out_q: int | None  # the dim of the output that holds query rows
    cand_out_shape: tuple
    what: str
    n_q: int = 0  # the real number of query rows

    def draw(self, gen: torch.Generator) -> dict:
        """The sets for one trial: the same sizes, fresh random rows."""
        sets = dict(self.sets)
        rows = sets.get("Q")
        if rows is not None and rows != self.cand_q:
            n = len(self.cand_q) if self.cand_q is not None else self.n_q
            sets["Q"] = _rows(n, len(rows), gen)
        return sets


def _rows(n: int, count: int, gen: torch.Generator) -> list[int]:
    """``count`` of ``n`` query rows: the first and last ``EDGE_ROWS``, the rest random."""
    edge = min(EDGE_ROWS, count // 4)
    fixed = set(range(edge)) | set(range(n - edge, n))
    middle = torch.randperm(n - 2 * edge, generator=gen)[: count - len(fixed)] + edge
    return sorted(fixed | set(middle.tolist()))


def _length_generic(site: Site) -> bool:
    """Whether the spec computes the same thing on a prefix of the sequence: no score op
    or mask that reads the lengths, and no routing (its indices are of the real length)."""
    if site.spec.routing is not None:
        return False
    return not any(op.entry.reads_lengths(op) for op in site.spec.score_ops)


class _Planner:
    def __init__(self, gm, nodes, ext, site, real, region, env, cand):
        self.gm, self.nodes, self.ext, self.site = gm, nodes, ext, site
        self.real, self.region, self.cand = real, region, cand
        self.plans: dict = {}
        self.why: list[str] = []
        self.shapes = None
        if site.spec.routing is not None:
            # rows reach a routed region through gathers, which the slicer does not follow:
            # the full-size check (the region's work is the clusters', not N²)
            self.why.append("routed site: full size")
            return
        try:
            rec, _ = _fake_run(region, real)
            inv = {v: k for k, v in env.items()}
            self.shapes = {inv[n]: s for n, s in rec.items() if n in inv}
            for e, x in zip(ext, real):
                self.shapes[e] = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        except Exception as e:  # noqa: BLE001 - an op fake tensors cannot run: no slicing
            self.why.append(f"no fake run: {type(e).__name__}: {e}")
            return
        self.raw = _ext_labels(site, ext, self.shapes)
        g = site.spec.gqa_group
        qs = site.q.op_shape(self.shapes[site.q.node])
        ks = site.k.op_shape(self.shapes[site.k.node])
        if site.rank3:
            self.full = {"H": qs[0], "Q": qs[1], "K": ks[1]}
        else:
            self.full = {"B": qs[0], "H": qs[1], "Hk": ks[1], "Q": qs[2], "K": ks[2]}
        self.group = g

    def full_plan(self) -> _Plan:
        out = self.cand_shape_full()
        return _Plan(
            self.region,
            self.cand,
            [None] * len(self.ext),
            [False] * len(self.ext),
            {},
            None,
            [],
            None,
            out,
            "full size",
        )

    def cand_shape_full(self):
        ev = G.example_value(self.site.output)
        return tuple(G.sym_hint(s) for s in ev.shape) if isinstance(ev, torch.Tensor) else ()

    def _sets(self, bh: bool, rows: bool, length: int | None, gen) -> tuple[dict, list | None]:
        full, g, sets = self.full, self.group, {}
        if bh:
            if "B" in full:
                sets["B"] = [0, full["B"] - 1] if full["B"] > 2 else None
            hk = full["H"] // g
            kv = [0, hk - 1] if hk > 2 else None
            if self.site.rank3 and g > 1:
                kv = None
            if g == 1:
                sets["H"] = kv
            else:
                sets["Hk"] = kv
                sets["H"] = [j * g + r for j in kv for r in range(g)] if kv else None
        nq, nk = full["Q"], full["K"]
        if length is not None:
            nq, nk = min(nq, length), min(nk, length)
        cand_q = list(range(nq)) if nq < full["Q"] else None
        sets["K"] = list(range(nk)) if nk < full["K"] else None
        sets["Q"] = _rows(nq, ROWS, gen) if rows and nq > ROWS else cand_q
        return sets, cand_q

    def plan(self, length: int | None, gen) -> _Plan:
        """The most sliced check that validates: (batch, head) slices and rows, then each
        alone, with k, v, masks entering sliced or sliced in place; at ``length`` first
        (random trials), then at the real lengths; else the full-size check."""
        if length is not None and not _length_generic(self.site):
            length = None
        if length in self.plans:
            return self.plans[length]
        plan = None
        lengths = [length, None] if length is not None else [None]
        configs = [
            (n, bh, rows, entry)
            for n in lengths
            for bh, rows in ((True, True), (True, False), (False, True))
            for entry in (True, False)
        ]
        for n, bh, rows, entry in configs if self.shapes is not None else ():
            sets, cand_q = self._sets(bh, rows, n, gen)
            if not entry:
                sets["K"] = None  # keys are cut where k and v enter, or not at all
            if all(v is None for v in sets.values()):
                continue
            try:
                plan = self._build(sets, cand_q, entry)
                break
            except Exception as e:  # noqa: BLE001 - any failure: a less sliced check
                self.why.append(f"{self._what(sets, cand_q)}: {type(e).__name__}: {e}")
        if plan is None:
            plan = self.full_plan()
        self.plans[length] = plan
        return plan

    def _what(self, sets, cand_q) -> str:
        parts = []
        for lab in ("B", "H", "Hk", "Q", "K"):
            if sets.get(lab) is not None:
                parts.append(f"{lab} {len(sets[lab])}/{self.full[lab]}")
        if cand_q is not None:
            parts.append(f"length {len(cand_q)}")
        return ", ".join(parts)

    def _build(self, sets, cand_q, entry_all) -> _Plan:
        site, ext = self.site, self.ext
        labels = [_resolve(r, sets) for r in self.raw]
        qnode = site.q.node
        entry = [lab is not None and (entry_all or e is qnode) for e, lab in zip(ext, labels)]
        # The region slices a dim only where a sliced input brings it in; a label no such
        # input carries would cut the candidate's inputs and not the region's (keys cut
        # to a prefix in k while k enters whole).  The kv-head set follows from q's heads.
        carried = {x for lab, en in zip(labels, entry) if en for x in lab if x is not None}
        if "H" in carried:
            carried.add("Hk")
        for lab in labels:
            for x in lab or ():
                if x is not None and sets.get(x) is not None and x not in carried:
                    raise _Unsliceable(f"no input brings {x} into the region sliced")
        slicer = _Slicer(
            self.gm, self.nodes, ext, site.output, labels, entry, sets, self.full, self.shapes
        )
        csets = dict(sets, Q=cand_q)
        r_in = [_index(x, lab, sets) if en else x for x, lab, en in zip(self.real, labels, entry)]
        c_in = [_index(x, lab, csets) for x, lab in zip(self.real, labels)]
        idx = _idx_tensors(slicer.idx_labels, sets, self.real)
        _fake_run(slicer.module, r_in + idx, slicer.cur)
        out_state = slicer.out_state
        out_q = out_state.index("Q") if "Q" in out_state else None
        want = list(slicer.cur[slicer.out])
        if out_q is not None:
            want[out_q] = len(cand_q) if cand_q is not None else self.full["Q"]
        _, cout = _fake_run(self.cand, c_in)
        if tuple(cout.shape) != tuple(want):
            raise _Unsliceable(f"candidate gives {tuple(cout.shape)} on the slices, not {want}")
        if out_q is None and sets.get("Q") is not None and sets["Q"] != cand_q:
            raise _Unsliceable("query rows sliced but not in the output")
        plan = _Plan(
            slicer.module,
            self.cand,
            labels,
            entry,
            sets,
            cand_q,
            slicer.idx_labels,
            out_q if sets.get("Q") != cand_q else None,
            tuple(want),
            self._what(sets, cand_q) + ("" if entry_all else " (k, v, aux sliced in place)"),
            n_q=self.full["Q"],
        )
        return plan


def _idx_tensors(labels, sets, values):
    dev = _device(values)
    return [torch.tensor(sets[lab], dtype=torch.long, device=dev) for lab in labels]


# ---------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------


def verify_site(
    gm, gnx, site: Site, captured: dict, *, seed: int = 0, random_trials: int = 1
) -> Verdict:
    nodes, ext = rewrite.site_inputs(gnx, site)
    nodes, ext, consts = _hoist_constants(nodes, ext)
    region, env = _region_module(gm, nodes, ext, site)
    cand = _candidate_module(gm, ext, site)
    # DTensors (tensor parallelism): the site on this rank's shards, as the op's sharding
    # rules run it (attnfx.distributed); the region and the candidate run locally, with
    # no collective
    real = [consts[e] if e in consts else _local(captured[e]) for e in ext]
    qkv = {site.q.node, site.k.node, site.v.node}
    # Every input of the region that requires grad: a bias, a temperature, a mask too.
    grad_idx = [
        i
        for i, e in enumerate(ext)
        if G.requires_grad(e) and isinstance(real[i], torch.Tensor) and real[i].is_floating_point()
    ]
    names = [e.name for e in ext]
    planner = _Planner(gm, nodes, ext, site, real, region, env, cand)
    gen = torch.Generator().manual_seed(seed)
    rows_gen = torch.Generator().manual_seed(seed + 1)
    trials = [("real inputs", None, False)]
    trials += [(f"random inputs #{t}", RANDOM_LENGTH, True) for t in range(random_trials)]
    worst, checked = 0.0, []
    for label, length, rnd in trials:
        plan = planner.plan(length, rows_gen)
        sets = plan.draw(rows_gen)
        r_in, c_in = _trial_inputs(plan, sets, real, ext, qkv if rnd else set(), gen)
        res = _check(plan, sets, r_in, c_in, grad_idx, site, f"{label} ({plan.what})", names)
        checked.append(f"{label}: {plan.what}")
        if not res.ok:
            res.checked = "; ".join(checked)
            return res
        worst = max(worst, res.max_rel_err)
    if planner.why:
        log.debug("attnfx verify %s: slicing fallbacks: %s", site.where, planner.why)
    return Verdict(True, worst, checked="; ".join(checked))


# Constant parts of a region (a mask built from ``arange`` and sizes) are computed once
# and enter the region as inputs, when they are this large: else each trial rebuilt them
# (a 128x128-grid neighborhood mask is 2^28 pairs, seconds a run).
_HOIST_ELEMENTS = 1 << 20


def _hoist_constants(nodes: set, ext: list) -> tuple[set, list, dict]:
    """(region nodes, region inputs, hoisted values): the region's integer and boolean
    nodes that depend on no input (factory ops and what they feed, no random or in-place
    op) whose values the
    rest of the region reads, computed once here, become inputs; a whole full-size input
    meeting sliced values is indexed where they meet (``_Slicer``), as the in-region
    value was."""
    from attnfx.passes import masks

    if not nodes or any(_writes(n) for n in nodes):
        return nodes, ext, {}  # (a value written in place in the region: run it in place)
    order = {n: i for i, n in enumerate(next(iter(nodes)).graph.nodes)}
    const: set[fx.Node] = set()
    for n in sorted(nodes, key=order.__getitem__):
        if (
            n.op in ("call_function", "call_method")
            and not G.has_side_effects(n)
            and isinstance(G.example_value(n), torch.Tensor)
            # (not floating: the float64 gold computes float constants in float64)
            and not G.example_value(n).is_floating_point()
            and all(a in const for a in n.all_input_nodes)
        ):
            const.add(n)
    frontier = [
        n for n in sorted(const, key=order.__getitem__) if any(u not in const for u in n.users)
    ]
    frontier = [n for n in frontier if all(isinstance(s, int) for s in G.shape(n) or (None,))]
    if not frontier or sum(math.prod(G.shape(n)) for n in frontier) < _HOIST_ELEMENTS:
        return nodes, ext, {}
    # values the mask pass already ran whole (its predicate check) are not run again
    known = {n: v for n in const if (v := masks.ran_value(n)) is not None}
    needed: set[fx.Node] = set()
    stack = list(frontier)
    while stack:
        n = stack.pop()
        if n not in needed and n not in known:
            needed.add(n)
            stack.extend(a for a in n.all_input_nodes if a in const)
    cone = sorted(needed, key=order.__getitem__)
    try:
        env = masks.run_constant_nodes(cone, known)
    except Exception as e:  # noqa: BLE001 - a form the CPU run cannot take: run it in place
        log.debug("attnfx verify: constants not hoisted: %s", e)
        return nodes, ext, {}
    # (run on the CPU: each value goes back to its node's device, where the region runs)
    values = {n: _on_device(env[n], n) for n in frontier}
    # the constant nodes nothing outside them reads go; the frontier enters as inputs
    ext = sorted([*ext, *frontier], key=order.__getitem__)
    return nodes - const, ext, values


def _on_device(value, node: fx.Node):
    ev = G.example_value(node)
    if isinstance(value, torch.Tensor) and isinstance(ev, torch.Tensor):
        return value.to(ev.device)
    return value


def _local(x):
    from attnfx.distributed import is_dtensor

    return x.to_local() if is_dtensor(x) else x


def _trial_inputs(plan: _Plan, sets, real, ext, randomize, gen):
    """The region's and the candidate's inputs: the candidate's are sliced by (batch,
    head) and length; the region's also by query row, or whole where it slices them
    itself."""
    csets = dict(sets, Q=plan.cand_q)
    qpos = {"Q": sets["Q"]} if plan.out_q is not None else {}
    r_in, c_in = [], []
    for i, e in enumerate(ext):
        x, lab, entry = real[i], plan.labels[i], plan.entry[i]
        rnd = e in randomize and isinstance(x, torch.Tensor) and x.dtype in _FLOATS
        if rnd and not entry:
            x = _random_like(x, gen)
        c = _index(x, lab, csets)
        if rnd and entry:
            c = _random_like(c, gen)
        c_in.append(c)
        if not entry:
            r_in.append(x)
        elif rnd or lab is None:
            r_in.append(_index(c, lab, qpos))
        else:
            r_in.append(_index(x, lab, sets))
    return r_in, c_in


def _random_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Standard-normal values with the shape, dtype and (where possible) strides of ``x``."""
    r = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype).to(x.device)
    try:
        out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        out.copy_(r)
        return out
    except RuntimeError:  # overlapping (expanded) layouts cannot be written
        return r


def _run(mod, inputs, grad_idx, cot, f64: bool):
    ins = []
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if f64 and x.dtype in _FLOATS:
                x = x.double()
            if i in grad_idx:
                x = x.clone().requires_grad_(True)
        ins.append(x)
    ctx = _Float64() if f64 else torch.no_grad() if not grad_idx else _Null()
    with ctx:
        out = mod(*ins)
    grads = []
    if grad_idx and not out.requires_grad:
        grads = [None] * len(grad_idx)  # no input reaches the output: zero gradients
    elif grad_idx:
        c = cot.to(out.dtype)
        leaves = [ins[i] for i in grad_idx]
        grads = list(torch.autograd.grad(out, leaves, c, allow_unused=True))
    return out.detach(), grads


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _check(plan: _Plan, sets, r_in, c_in, grad_idx, site, label, names) -> Verdict:
    transcendental = site.spec.act.transcendental
    r_full = r_in + _idx_tensors(plan.idx_labels, sets, r_in)
    q_dim = plan.out_q
    pos = None
    if q_dim is not None:
        pos = torch.tensor(sets["Q"], dtype=torch.long, device=_device(r_in))
    try:
        if grad_idx:
            probe, _ = _run(plan.region, r_full, [], None, False)
            # Rounded to the working dtype first, so that gold sees the very same cotangent.
            cot = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1))
            cot = cot.to(probe.dtype).to(probe.device)
            base, gbase = _run(plan.region, r_full, grad_idx, cot, False)
            ccot = cot
            if q_dim is not None:  # zero on the rows the original did not run
                ccot = torch.zeros(plan.cand_out_shape, dtype=cot.dtype, device=cot.device)
                ccot.index_copy_(q_dim, pos, cot)
        else:
            base, gbase = _run(plan.region, r_full, [], None, False)
            cot = ccot = None
        gold, ggold = _run(plan.region, r_full, grad_idx, cot, True)
        out, gcand = _run(plan.cand, c_in, grad_idx, ccot, False)
    except Exception as e:  # noqa: BLE001 - a candidate that fails to run is a rejection
        return Verdict(False, message=f"{label}: {type(e).__name__}: {e}")
    strides = True
    if q_dim is not None:
        if _stride_order(out) != _stride_order(base):
            return Verdict(
                False, message=f"output on {label}: stride order {out.stride()} != {base.stride()}"
            )
        out, strides = out.index_select(q_dim, pos), False
    res = compare(
        out,
        base,
        gold,
        transcendental=transcendental,
        check_strides=strides,
        context=f"output on {label}",
    )
    if not res.ok:
        return Verdict(False, message=res.message)
    worst = res.max_rel_err
    qpos = {"Q": sets["Q"]} if q_dim is not None else {}
    for i, gb, gg, gc in zip(grad_idx, gbase, ggold, gcand):
        lab = plan.labels[i]
        if not plan.entry[i]:  # the region took it whole: compare on the slices
            gb, gg = _index(gb, lab, sets), _index(gg, lab, sets)
        gc = _index(gc, lab, qpos)
        like = r_in[i] if plan.entry[i] else _index(r_in[i], lab, sets)
        # A gradient the graph does not produce is zero: a candidate that drops one
        # (an op that returns None for a bias) fails wherever the original has one.
        gb, gg, gc = (torch.zeros_like(like) if t is None else t for t in (gb, gg, gc))
        r = compare(
            gc,
            gb,
            gg,
            grad=True,
            transcendental=transcendental,
            check_strides=False,
            context=f"gradient of {names[i]} on {label}",
        )
        if not r.ok:
            return Verdict(False, message=r.message)
        worst = max(worst, r.max_rel_err)
    return Verdict(True, worst)


def _device(values):
    return next((x.device for x in values if isinstance(x, torch.Tensor)), torch.device("cpu"))
