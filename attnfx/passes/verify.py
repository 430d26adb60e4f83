"""Verify: prove, numerically, that a rewrite computes what the site computed.

For each site the original subgraph (the region the rewrite replaces) and the candidate
(the same operands into the attnfx op, built by ``rewrite.emit_call``) are run on

* the site's real inputs, captured by running the model graph once with an FX
  interpreter on the compile's example inputs, and
* fresh random q, k, v of the same shapes (masks and biases keep their real values),

against the float64 gold of the original subgraph, under ``attnfx.testing``'s rule
(DESIGN §5), outputs and — when q, k or v require grad — gradients.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode

from attnfx.passes import graph as G
from attnfx.passes import rewrite
from attnfx.passes.match import Site
from attnfx.testing import compare

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass
class Verdict:
    ok: bool
    max_rel_err: float = 0.0
    message: str = ""


class _Float64(TorchFunctionMode):
    """Runs a subgraph in float64: floating dtype arguments and the ``.half()`` /
    ``.float()`` / ``.bfloat16()`` casts become float64 (the gold of DESIGN §5)."""

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


def capture_inputs(
    gm: fx.GraphModule, example_inputs, wanted: set[fx.Node]
) -> dict[fx.Node, object]:
    """Run ``gm`` on the example inputs and keep the values of the ``wanted`` nodes."""
    values: dict[fx.Node, object] = {}

    class _Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                values[n] = out.detach() if isinstance(out, torch.Tensor) else out
            return out

    inputs = [G.sym_hint(x) if isinstance(x, torch.SymInt) else x for x in example_inputs]
    if _mutates(gm):
        # Running the graph must not change the model's state (running stats, caches).
        inputs = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    with torch.no_grad():
        _Capture(gm).run(*inputs)
    return values


def _mutates(gm: fx.GraphModule) -> bool:
    for n in gm.graph.nodes:
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if (
            n.op in ("call_method", "call_function")
            and name.endswith("_")
            and not name.endswith("__")
        ):
            return True
    return False


def build_graphs(gm: fx.GraphModule, gnx: nx.DiGraph, site: Site):
    """The site's original subgraph and its candidate, as modules with the same inputs."""
    nodes, ext = rewrite.site_inputs(gnx, site)
    orig, cand = fx.Graph(), fx.Graph()
    env_o, env_c = {}, {}
    for i, e in enumerate(ext):
        env_o[e] = orig.placeholder(f"in{i}")
        env_c[e] = cand.placeholder(f"in{i}")
    for n in gm.graph.nodes:
        if n in nodes:
            env_o[n] = orig.node_copy(n, lambda x: env_o[x])
    orig.output(env_o[site.output])
    cand.output(rewrite.emit_call(cand, site, lambda x: env_c[x]))
    return fx.GraphModule(gm, orig), fx.GraphModule(gm, cand), ext


def verify_site(
    gm, gnx, site: Site, captured: dict, *, seed: int = 0, random_trials: int = 1
) -> Verdict:
    orig, cand, ext = build_graphs(gm, gnx, site)
    real = [captured[e] for e in ext]
    qkv = {site.q.node, site.k.node, site.v.node}
    grad_idx = [i for i, e in enumerate(ext) if e in qkv and G.requires_grad(e)]
    trials = [("real inputs", real)]
    gen = torch.Generator().manual_seed(seed)
    for t in range(random_trials):
        rnd = list(real)
        for i, e in enumerate(ext):
            x = real[i]
            if e in qkv and isinstance(x, torch.Tensor) and x.dtype in _FLOATS:
                rnd[i] = _random_like(x, gen)
        trials.append((f"random inputs #{t}", rnd))
    worst = 0.0
    for label, inputs in trials:
        res = _check(orig, cand, inputs, grad_idx, site, label)
        if not res.ok:
            return res
        worst = max(worst, res.max_rel_err)
    return Verdict(True, worst)


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
    if grad_idx:
        c = cot.to(out.dtype)
        grads = list(torch.autograd.grad(out, [ins[i] for i in grad_idx], c, allow_unused=True))
    return out.detach(), grads


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _check(orig, cand, inputs, grad_idx, site, label) -> Verdict:
    transcendental = site.spec.activation == "sigmoid"
    try:
        base, gbase = _run(orig, inputs, grad_idx, None, False) if not grad_idx else (None, None)
        if grad_idx:
            probe, _ = _run(orig, inputs, [], None, False)
            # Rounded to the working dtype first, so that gold sees the very same cotangent.
            cot = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1))
            cot = cot.to(probe.dtype).to(probe.device)
            base, gbase = _run(orig, inputs, grad_idx, cot, False)
        else:
            cot = None
        gold, ggold = _run(orig, inputs, grad_idx, cot, True)
        out, gcand = _run(cand, inputs, grad_idx, cot, False)
    except Exception as e:  # noqa: BLE001 - a candidate that fails to run is a rejection
        return Verdict(False, message=f"{label}: {type(e).__name__}: {e}")
    res = compare(out, base, gold, transcendental=transcendental, context=f"output on {label}")
    if not res.ok:
        return Verdict(False, message=res.message)
    worst = res.max_rel_err
    for i, (gc, gb, gg) in enumerate(zip(gcand, gbase, ggold)):
        if gb is None or gg is None or gc is None:
            continue
        r = compare(
            gc,
            gb,
            gg,
            grad=True,
            transcendental=transcendental,
            check_strides=False,
            context=f"gradient {i} on {label}",
        )
        if not r.ok:
            return Verdict(False, message=r.message)
        worst = max(worst, r.max_rel_err)
    return Verdict(True, worst)
