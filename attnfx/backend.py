"""The ``torch.compile`` backend: capture → canonicalize → match → masks → verify →
rewrite → inner compiler.

``torch.compile(model, backend="attnfx", options={...})`` reaches ``attnfx_backend``
through the ``torch_dynamo_backends`` entry point, with no import needed.

Options:
    verify        "first" (default: each site once per process) | "always" | "off"
    on_mismatch   "fallback" (default: keep the site) | "raise"
    inner         "inductor" (default) | "eager"
    random_trials random input sets per verified site besides its real inputs (default 1)

Nothing raises out of the backend except a verifier rejection with
``on_mismatch="raise"`` and invalid options: any other failure inside attnfx keeps the
graph as Dynamo gave it, counted under ``kept.internal error``.
"""

from __future__ import annotations

import dataclasses
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
from attnfx.passes.match import find_sites

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

    @staticmethod
    def from_dict(d: dict | None) -> Options:
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(Options)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown attnfx option(s) {sorted(unknown)}; known: {sorted(names)}")
        o = Options(**d)
        for name, allowed in (
            ("verify", ("first", "always", "off")),
            ("on_mismatch", ("fallback", "raise")),
            ("inner", ("inductor", "eager")),
        ):
            if getattr(o, name) not in allowed:
                raise ValueError(
                    f"attnfx option {name}={getattr(o, name)!r}; expected one of {allowed}"
                )
        return o


def rewrite_graph(
    gm: fx.GraphModule, example_inputs, options: Options
) -> tuple[fx.GraphModule, list]:
    """Run the attnfx passes on a copy of ``gm``; return it and the site records."""
    from attnfx.passes import rewrite, verify

    gid = next(_graph_ids)
    new = G.copy_module(gm)
    canonicalize(new)
    sites = find_sites(new)
    records: list[report.SiteRecord] = []
    matched = [s for s in sites if s.spec is not None]
    gnx = G.to_networkx(new.graph) if matched else None
    for s in matched:
        w = rewrite.write_inside(gnx, s)
        if w is not None:
            s.spec, s.reason = None, "an in-place write lies inside the site"
            log.debug("attnfx: %s at %s: %s writes in place", s.kind, s.where, w.name)
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

    for s in sites:
        if s.spec is None:
            records.append(report.SiteRecord(s.kind, "kept", s.reason, s.where, graph=gid))
    for i, s in enumerate(matched):
        v = verdicts[i]
        if not v.ok:
            msg = f"verifier rejected the rewrite: {v.message}"
            if options.on_mismatch == "raise":
                raise VerificationError(f"attnfx site {s.where or s.anchor}: {msg}")
            records.append(
                report.SiteRecord(
                    s.kind, "kept", "verifier rejected the rewrite", s.where, s.spec, graph=gid
                )
            )
            log.warning("attnfx: kept %s at %s: %s", s.kind, s.where, v.message)
            continue
        with _lock:
            _verified.add((s.spec.key, s.where))
        nodes = rewrite.region(gnx, s)
        replaced |= nodes | G.dead_users(nodes)
        sites_out[s.output.name] = rewrite.apply(new, s)
        records.append(
            report.SiteRecord(s.kind, "rewritten", None, s.where, s.spec, v.max_rel_err, graph=gid)
        )
    if not any(r.status == "rewritten" for r in records):
        # Nothing rewritten: hand on the graph exactly as Dynamo gave it, so that a model
        # attnfx leaves alone compiles exactly as it would without attnfx (canonical
        # forms are equal in value, not always in rounding).
        return gm, records
    rewrite.finish(new, replaced)
    return _check_whole_graph(gm, new, example_inputs, sites_out, records, options)


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
    from torch._inductor.compile_fx import compile_fx

    from attnfx.passes.inner_guard import guard_for_inductor

    return compile_fx(guard_for_inductor(gm), example_inputs)


def attnfx_backend(
    gm: fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None
):
    """The ``torch.compile`` backend."""
    opts = Options.from_dict(options)
    try:
        new, records = rewrite_graph(gm, example_inputs, opts)
    except VerificationError:
        raise
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


def explain(model, *args, options: dict | None = None, **kwargs) -> report.Report:
    """Compile ``model`` with attnfx, run it once on ``args``/``kwargs`` and report every
    attention site: found, verified, rewritten or kept (and why).

    Resets Dynamo's caches before and after, so that every graph is compiled afresh.
    """
    import functools

    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    torch._dynamo.reset()
    opts = dict(options or {})
    opts.setdefault("verify", "always")
    backend = functools.partial(attnfx_backend, options=opts)
    try:
        with report.collecting() as records:
            torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return report.Report(list(records))
