"""The ``torch.compile`` backend: capture → canonicalize → match → masks → verify →
rewrite → inner compiler.

``torch.compile(model, backend="attnfx", options={...})`` reaches ``attnfx_backend``
through the ``torch_dynamo_backends`` entry point, with no import needed.

Options:
    verify        "first" (default: each site once per process) | "always" | "off"
    on_mismatch   "fallback" (default: keep the site) | "raise"
    inner         "inductor" (default) | "eager"
    random_trials random input sets per verified site besides its real inputs (default 1)
    mode          inductor's mode for the rewritten graph (also ``torch.compile(mode=...)``)

Nothing raises out of the backend except invalid options; a verifier rejection with
``on_mismatch="raise"`` raises ``VerificationError`` when the compiled graph is called
(an exception raised inside the backend reaches the caller wrapped in Dynamo's
``BackendCompilerFailed``).  Any other failure inside attnfx keeps the graph as Dynamo
gave it, counted under ``kept.internal error``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import os
import threading

import torch
import torch.fx as fx

from attnfx import report
from attnfx.passes import graph as G
from attnfx.passes.canonicalize import canonicalize
from attnfx.passes.recognize import find_sites

log = logging.getLogger("attnfx")
_graph_ids = itertools.count()
_verified: set[tuple[str, str]] = set()
_lock = threading.Lock()


class VerificationError(RuntimeError):
    """A rewrite failed numerical verification and ``on_mismatch="raise"`` was asked."""


@dataclasses.dataclass(frozen=True)
class Options:
    verify: str = "first"
    on_mismatch: str = "fallback"
    inner: str = "inductor"
    random_trials: int = 1
    mode: str | None = None
    # CPU sites: "auto" rewrites only those whose op path beats inductor there
    # (``cpu.profitable``); "always" rewrites every verified site (the test suite does,
    # through ATTNFX_CPU_REWRITE=always, to check the rewrites on CPU)
    cpu: str = dataclasses.field(
        default_factory=lambda: os.environ.get("ATTNFX_CPU_REWRITE") or "auto"
    )

    @staticmethod
    def from_dict(d: dict | None, mode: str | None = None) -> Options:
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(Options)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown attnfx option(s) {sorted(unknown)}; known: {sorted(names)}")
        if mode is not None and d.get("mode") not in (None, mode):
            raise ValueError(
                f"attnfx: mode={mode!r} and options['mode']={d['mode']!r} disagree; give one"
            )
        if mode is not None:
            d["mode"] = mode
        o = Options(**d)
        for name, allowed in (
            ("verify", ("first", "always", "off")),
            ("on_mismatch", ("fallback", "raise")),
            ("inner", ("inductor", "eager")),
            ("cpu", ("auto", "always")),
        ):
            if getattr(o, name) not in allowed:
                raise ValueError(
                    f"attnfx option {name}={getattr(o, name)!r}; expected one of {allowed}"
                )
        t = o.random_trials
        # bool is an int to Python, but random_trials=True is a mistake, not 1 trial
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(
                f"attnfx option random_trials={t!r}; expected an int >= 0 "
                "(random input sets per verified site, besides its real inputs)"
            )
        if o.mode is not None:
            modes = _inductor_modes()
            if o.mode not in modes:
                raise ValueError(f"attnfx: mode={o.mode!r}; expected one of {modes}")
            if o.inner != "inductor" and o.mode != "default":
                raise ValueError(
                    f"attnfx: mode={o.mode!r} is an inductor mode, but inner={o.inner!r}; "
                    "use inner='inductor' or drop the mode"
                )
        return o


def _inductor_modes() -> tuple[str, ...]:
    from torch._inductor import list_mode_options

    return tuple(list_mode_options())


def rewrite_graph(
    gm: fx.GraphModule, example_inputs, options: Options
) -> tuple[fx.GraphModule, list]:
    """Run the attnfx passes on a copy of ``gm``; return it and the site records."""
    from attnfx.passes import masks, rewrite, subgraphs, verify

    gid = next(_graph_ids)
    # DDP's graph splitting compiles each piece on fake inputs: verify on drawn ones
    example_inputs = verify.concrete_inputs(example_inputs)
    # Sites inside higher-order ops' subgraphs (checkpointed blocks, cond branches) first:
    # ``base`` is ``gm`` with those subgraphs rewritten.
    base, sub_records = subgraphs.rewrite_subgraphs(
        gm, example_inputs, options, rewrite_graph, reraise=(VerificationError,)
    )
    new = G.copy_module(base)
    canonicalize(new)
    # On CPU (cpu="auto") many sites are kept for speed: their analyses' checks against
    # the materialized masks and indices (N² work) wait until a site is to be rewritten.
    defer = options.cpu == "auto" and _cpu_graph(example_inputs)
    sites = find_sites(new, defer_proofs=defer)
    if options.cpu == "auto":
        # bucketed local attention on CPU: the op's path would run the token mask densely
        # (N² work) where the bucketed form does N·(buckets looked at)·w
        sites = [s.bucketed if s.bucketed is not None and _on_cpu(s) else s for s in sites]
    records: list[report.SiteRecord] = list(sub_records)
    matched = [s for s in sites if s.spec is not None]
    gnx = G.to_networkx(new.graph) if matched else None
    for s in matched:
        w = rewrite.write_inside(gnx, s)
        if w is not None:
            s.spec, s.reason = None, "an in-place write lies inside the site"
            log.debug("attnfx: %s at %s: %s writes in place", s.kind, s.where, w.name)
    if options.cpu == "auto":
        for s in matched:
            why = _cpu_refusal(s, new, gnx) if s.spec is not None else None
            if why is not None:
                s.spec, s.reason = None, why
    for s in matched:
        why = masks.run_proofs(s.proofs) if s.spec is not None else None
        if why is not None:
            log.debug("attnfx: %s at %s kept: %s", s.kind, s.where, why)
            s.spec, s.reason = None, why
    matched = [s for s in sites if s.spec is not None]

    verdicts: dict[int, verify.Verdict] = {}
    replaced: set[fx.Node] = set()  # nodes of the rewritten regions: the only ones removed
    sites_out: dict[str, fx.Node] = {}  # site output name -> the node that replaced it
    todo = []
    for i, s in enumerate(matched):
        key = (s.spec.key, s.where)
        if options.verify == "off" or (options.verify == "first" and key in _verified):
            verdicts[i] = verify.Verdict(True, None)
        else:
            todo.append(i)
    if todo:
        wanted = set()
        for i in todo:
            wanted |= set(rewrite.site_inputs(gnx, matched[i])[1])
        captured = verify.capture_inputs(new, example_inputs, wanted)
        for i in todo:
            verdicts[i] = verify.verify_site(
                new, gnx, matched[i], captured, random_trials=options.random_trials
            )
    masks.forget_values(new.graph)  # (the masks the predicate checks ran whole)

    for s in sites:
        if s.spec is None:
            records.append(report.SiteRecord(s.kind, "kept", s.reason, s.where, graph=gid))
    for i, s in enumerate(matched):
        v = verdicts[i]
        if not v.ok:
            cache_problem = _cache_problem(v.message)
            if cache_problem is None:
                msg = f"verifier rejected the rewrite: {v.message}"
                if options.on_mismatch == "raise":
                    raise VerificationError(f"attnfx site {s.where or s.anchor}: {msg}")
            reason = cache_problem or "verifier rejected the rewrite"
            records.append(report.SiteRecord(s.kind, "kept", reason, s.where, s.spec, graph=gid))
            log.warning("attnfx: kept %s at %s: %s", s.kind, s.where, v.message)
            continue
        with _lock:
            _verified.add((s.spec.key, s.where))
        nodes = rewrite.region(gnx, s)
        replaced |= nodes | G.dead_users(nodes)
        sites_out[s.output.name] = rewrite.apply(new, s)
        records.append(
            report.SiteRecord(
                s.kind,
                "rewritten",
                None,
                s.where,
                s.spec,
                v.max_rel_err,
                graph=gid,
                density=_density(s),
                mask=s.neighborhood.describe() if s.neighborhood is not None else None,
            )
        )
    if not any(r.status == "rewritten" for r in records[len(sub_records) :]):
        # Nothing rewritten here: hand on the graph exactly as Dynamo gave it (with its
        # rewritten subgraphs, each checked on its own), so that a model attnfx leaves
        # alone compiles exactly as it would without attnfx (canonical forms are equal
        # in value, not always in rounding).
        return base, records
    rewrite.finish(new, replaced)
    return _check_whole_graph(gm, new, example_inputs, sites_out, records, options)


def _density(site) -> float | None:
    """The report's density of a site at its example lengths (size hints if symbolic)."""
    shapes = []
    for o in (site.q, site.k, site.v):
        shape = o.op_shape(G.shape(o.node))
        if shape is None or len(shape) < 2:
            return None
        shapes.append([G.int_hint(x) for x in shape[-2:]])
    (nq, d), (nk, _), (_, dv) = shapes
    if None in (nq, nk, d, dv):
        return None
    return report.site_density(site.spec, nq, nk, d, dv)


def _cpu_graph(example_inputs) -> bool:
    """Whether the graph's tensors are all on the CPU, where the op runs the CPU path
    (not the kernels under ATTNFX_INTERPRET)."""
    from attnfx import ops

    devices = {x.device for x in example_inputs if isinstance(x, torch.Tensor)}
    return bool(devices) and all(d.type == "cpu" and not ops.use_triton(d) for d in devices)


def _on_cpu(site) -> bool:
    """Whether the site's op runs the CPU path (CPU tensors, kernels not forced by
    ATTNFX_INTERPRET)."""
    from attnfx import ops

    ev = G.example_value(site.q.node)
    return (
        isinstance(ev, torch.Tensor) and ev.device.type == "cpu" and not ops.use_triton(ev.device)
    )


SLOWER_ON_CPU = "on CPU, inductor is faster for this form"
SDPA_ON_CPU = "on CPU, the program's SDPA call already runs the fused kernel"
INDUCTOR_SDPA_ON_CPU = "on CPU, inductor's own SDPA pattern fuses this form"


def _cpu_refusal(site, gm=None, gnx=None) -> str | None:
    """Why a site on CPU tensors (kernels not forced by ATTNFX_INTERPRET) is kept: an
    SDPA call (the op's CPU path would run the same fused kernel, plus its checks: the
    CPU benchmark's gpt2-sdpa measured 0.79-0.93x inductor), an eager form inductor's
    SDPA patterns fuse into that kernel themselves (``passes/inductor_probe.py``), or an
    op path slower than what inductor makes of the eager form; None: rewrite it."""
    from attnfx import cpu
    from attnfx.passes.recognize import softmax

    if not _on_cpu(site):
        return None
    if softmax.is_sdpa(site.anchor):
        return SDPA_ON_CPU
    if any(G.requires_grad(a.node) for a in site.aux):
        return SLOWER_ON_CPU  # learnable biases' gradients: the blocked path
    needs_grad = any(G.requires_grad(n) for n in site.operand_nodes)
    if not cpu.profitable(site.spec, needs_grad):
        return SLOWER_ON_CPU
    if not needs_grad and gm is not None and _inductor_fuses(gm, gnx, site):
        return INDUCTOR_SDPA_ON_CPU
    return None


def _inductor_fuses(gm, gnx, site) -> bool:
    from attnfx.passes import inductor_probe, verify

    return inductor_probe.fuses_to_sdpa(*verify.original_module(gm, gnx, site))


def _cache_problem(message: str | None) -> str | None:
    """The reason for a site the op could not run on because the kernel cache failed
    (``codegen.cache.CacheError``): not a verifier rejection, whatever ``on_mismatch``."""
    tag = "kernel cache unusable:"
    if message and tag in message:
        return message[message.index(tag) :]
    return None


def _check_whole_graph(gm, new, example_inputs, sites_out, records, options: Options):
    """The rewritten graph against Dynamo's (passes/graph_check.py); on a mismatch the
    original graph is compiled and every rewritten site is counted as kept."""
    from attnfx.passes.graph_check import check_graph

    if options.verify == "off":
        return new, records
    key = ("whole graph", hashlib.sha256(new.code.encode()).hexdigest())
    if options.verify == "first" and key in _verified:
        return new, records
    try:
        verdict = check_graph(gm, new, example_inputs, sites_out)
    except Exception as e:  # noqa: BLE001 - a rewritten graph that cannot run is a mismatch
        from attnfx.passes.graph_check import GraphVerdict

        verdict = GraphVerdict(False, f"{type(e).__name__}: {e}")
    if verdict.ok:
        with _lock:
            _verified.add(key)
        return new, records
    msg = f"whole-graph check failed: {verdict.message}"
    if options.on_mismatch == "raise":
        raise VerificationError(f"attnfx graph {records[0].graph if records else '?'}: {msg}")
    log.warning("attnfx: %s; compiling the graph as Dynamo gave it", msg)
    kept = [
        dataclasses.replace(r, status="kept", reason="whole-graph check failed")
        if r.status == "rewritten"
        else r
        for r in records
    ]
    return gm, kept


def _inner(gm: fx.GraphModule, example_inputs, options: Options):
    if options.inner == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from attnfx.passes.inner_guard import guard_for_inductor

    # the inductor config of torch.compile(mode=...), as inductor's own backend applies it
    patches = dict(list_mode_options(options.mode)) if options.mode else {}
    patches.update(_op_contract_patch(patches))
    return compile_fx(guard_for_inductor(gm), example_inputs, config_patches=patches)


@functools.cache
def op_contract() -> str:
    """A hash of what inductor cannot see of the attnfx ops: their schemas, fake impls
    and output layouts (``ops.py``, ``layout.py``).  Inductor's FX graph cache keys on the
    graph's code, not on a custom op's fake impl: after a change of the op's outputs (the
    float32 lse became a (value, remainder) pair), a graph cached against the old one
    was served and failed (or, for a dtype change, read its buffers wrongly)."""
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        h = hashlib.sha256(version("attnfx").encode())
    except PackageNotFoundError:
        h = hashlib.sha256()
    for name in ("ops.py", "layout.py"):
        try:
            h.update((Path(__file__).parent / name).read_bytes())
        except OSError:  # sources not on disk (a zipped install): the version alone
            pass
    return h.hexdigest()[:16]


def _op_contract_patch(patches: dict) -> dict:
    """``post_grad_custom_post_pass``: the pass already configured (or none), wrapped so
    that inductor's cache key carries ``op_contract``."""
    import torch._inductor.config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    inner = patches.get("post_grad_custom_post_pass", inductor_config.post_grad_custom_post_pass)

    class _OpContract(CustomGraphPass):
        def __call__(self, graph):
            if inner is not None:
                inner(graph)

        def uuid(self):
            if inner is None:
                return f"attnfx-op-contract-{op_contract()}"
            if isinstance(inner, CustomGraphPass) and inner.uuid() is not None:
                return (f"attnfx-op-contract-{op_contract()}", inner.uuid())
            return None  # a pass inductor cannot key on: no caching, as without attnfx

    return {"post_grad_custom_post_pass": _OpContract()}


def _raising(error: Exception):
    """A compiled graph that raises ``error`` when called: Dynamo wraps an exception raised
    by a backend in ``BackendCompilerFailed``, one raised by the compiled code reaches the
    caller as it is, so that ``except attnfx.VerificationError`` catches it."""

    def compiled(*args, **kwargs):
        raise error

    return compiled


def attnfx_backend(
    gm: fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None
):
    """The ``torch.compile`` backend."""
    opts = Options.from_dict(options, mode=mode)
    try:
        new, records = rewrite_graph(gm, example_inputs, opts)
    except VerificationError as e:
        return _raising(e)
    except Exception as e:  # noqa: BLE001 - never crash inside torch.compile
        log.warning(
            "attnfx: internal error, graph kept as Dynamo gave it: %s: %s", type(e).__name__, e
        )
        if os.environ.get("ATTNFX_DEBUG", "0") not in ("", "0"):
            log.exception("attnfx internal error")
        new, records = (
            gm,
            [report.SiteRecord("?", "kept", "internal error", f"{type(e).__name__}: {e}")],
        )
    if new is gm:
        compiled = _inner(gm, example_inputs, opts)
    else:
        try:
            compiled = _inner(new, example_inputs, opts)
        except torch._dynamo.exc.RestartAnalysis:
            # Dynamo's own retrace (dynamic=True: a float it cannot keep symbolic, such as
            # a scale attribute, is specialized), not a failure on the rewritten graph.
            raise
        except Exception as e:  # noqa: BLE001 - fall back to the graph as Dynamo gave it
            log.warning(
                "attnfx: inner compiler failed on the rewritten graph (%s); compiling the original",
                e,
            )
            records = [
                dataclasses.replace(
                    r, status="kept", reason="inner compiler failed on rewritten graph"
                )
                if r.status == "rewritten"
                else r
                for r in records
            ]
            compiled = _inner(gm, example_inputs, opts)
    # Counted once the graph that runs is settled, so the counters say what runs.
    for r in records:
        report.record(r)
    return compiled


_explain_lock = threading.RLock()


def ensure_registered() -> None:
    """Make ``backend="attnfx"`` known to Dynamo where the package's entry point is not
    installed (a checkout on ``PYTHONPATH``, as on a machine with no ``pip install``)."""
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    try:
        lookup_backend("attnfx")
    except Exception:  # noqa: BLE001 - InvalidBackend: not installed
        register_backend(compiler_fn=attnfx_backend, name="attnfx")


def explain(model, *args, options: dict | None = None, **kwargs) -> report.Report:
    """Compile ``model`` with attnfx, run it once on ``args``/``kwargs`` and report every
    attention site: found, verified, rewritten or kept (and why).

    The compile is explain's own and afresh: a backend no other compile shares (nothing
    compiled before is reused), its recompiles isolated from other compiles of the same
    code, no shape history (automatic dynamic shapes) read or left behind, and its cache
    entries dropped afterwards.  Other compiled models, this one's included, keep their
    compiled code.  Its sites are in the report, not in ``attnfx.counters``.  On a torch
    whose ``torch.compile`` has no ``isolate_recompiles``, Dynamo's caches are reset
    instead, before and after.
    """
    import functools

    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    opts = dict(options or {})
    opts.setdefault("verify", "always")
    # a fresh callable: Dynamo's backend guard then never matches another compile's code
    backend = functools.partial(attnfx_backend, options=opts)
    isolate = _has_isolate_recompiles()
    # One explain at a time: each swaps the process-wide shape history (below).
    with _explain_lock:
        if not isolate:
            torch._dynamo.reset()
        shapes = _swap_shape_history(None) if isolate else None
        try:
            compile_kw = {"isolate_recompiles": True} if isolate else {}
            compiled = torch.compile(model, backend=backend, **compile_kw)
            with report.collecting(count=False) as records:
                compiled(*args, **kwargs)
        finally:
            if isolate:
                _drop_cache_entries(backend)
                if shapes is not None:
                    _swap_shape_history(shapes)
            else:
                torch._dynamo.reset()
    return report.Report(list(records))


def _swap_shape_history(saved: dict | None) -> dict | None:
    """Dynamo's per-code shape history (``torch._dynamo.pgo``: what automatic dynamic
    shapes reads) emptied, returning what it held; or, given that, put back.  Without
    it, explain on one shape would make the next compile of the same code dynamic.  (A
    compile in another thread meanwhile loses the history it adds: at worst, one more
    recompile later.)"""
    try:
        from torch._dynamo import pgo

        state = pgo.get_code_state()
        held = dict(state)
        state.clear()
        if saved is not None:
            state.update(saved)
        return held
    except Exception as e:  # noqa: BLE001 - private Dynamo API: never fail explain over it
        log.debug("attnfx: explain kept Dynamo's shape history: %s: %s", type(e).__name__, e)
        return None


def _has_isolate_recompiles() -> bool:
    import inspect

    return "isolate_recompiles" in inspect.signature(torch.compile).parameters


def _drop_cache_entries(backend) -> None:
    """Invalidate the Dynamo cache entries compiled with ``backend`` (best effort: the
    entries are in an isolated region and never match another compile anyway; dropping
    them frees their compiled code)."""
    try:
        from torch._dynamo import convert_frame
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        from torch._dynamo.guards import DeletedGuardManagerWrapper

        for ref in list(convert_frame.input_codes.seen):
            code = ref()
            if code is None:
                continue
            for entry in _debug_get_cache_entry_list(code):
                if getattr(entry.backend, "compiler_fn", None) is not backend:
                    continue
                gm = entry.guard_manager
                if isinstance(gm, DeletedGuardManagerWrapper) or gm.extra_state is None:
                    continue
                gm.extra_state.invalidate(gm.cache_entry, DeletedGuardManagerWrapper("explain"))
    except Exception as e:  # noqa: BLE001 - private Dynamo API: never fail explain over it
        log.debug("attnfx: explain's cache entries left in place: %s: %s", type(e).__name__, e)
