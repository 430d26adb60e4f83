"""What attnfx did, per site: the ``explain`` report and the rewrite/refusal counters."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import json
import threading

from attnfx.spec import AttentionSpec

# "rewritten.<kind>" and "kept.<reason>" -> count of the sites of the graphs that run,
# over the whole process (``explain``'s own compiles are not counted: its compiled model
# is thrown away).
counters: collections.Counter = collections.Counter()
_counters_lock = threading.Lock()

# The open ``collecting`` blocks of this thread / task, innermost last: (records, count).
# Context-local, so that two threads compiling at once never see each other's sites; a
# tuple, replaced rather than mutated.
_collectors: contextvars.ContextVar[tuple[tuple[list, bool], ...]] = contextvars.ContextVar(
    "attnfx_collectors", default=()
)


@dataclasses.dataclass
class SiteRecord:
    kind: str
    status: str  # "rewritten" | "kept"
    reason: str | None
    where: str
    spec: AttentionSpec | None = None
    max_rel_err: float | None = None
    graph: int = 0  # which compiled graph (in compile order)
    # the fraction of (query tile, key tile) pairs the generated forward kernel visits at
    # the compiled lengths (its default tiles): 1 without a mask, ~0.5+ causal, ~C/N for
    # chunks of C keys; None where unknown (a kept site, no lengths)
    density: float | None = None
    # the mask as the report shows it, where the site knows more than its spec (a
    # neighborhood's grid and window); None: the spec's mask class
    mask: str | None = None

    @property
    def mask_text(self) -> str | None:
        if self.mask is not None:
            return self.mask
        return self.spec.mask_class.describe() if self.spec is not None else None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "status": self.status,
            "reason": self.reason,
            "where": self.where,
            "max_rel_err": self.max_rel_err,
            "density": self.density,
            "mask": self.mask_text,
            "graph": self.graph,
            "spec": self.spec.to_dict() if self.spec is not None else None,
        }


def site_density(spec: AttentionSpec, nq: int, nk: int, d: int, dv: int) -> float | None:
    """``SiteRecord.density`` of a site at lengths (nq, nk) and head dims (d, dv); None
    when the kernels cannot say (e.g. a float64 site, which keeps no kernel)."""
    from attnfx.codegen import tiles

    if spec.routing is not None:  # clusters: w·wk of NQ·NK pairs per cluster
        return None
    try:
        return tiles.density(spec.resolved(d, dv), nq, nk)
    except (TypeError, ValueError):
        return None


def record(rec: SiteRecord) -> None:
    open_blocks = _collectors.get()
    if all(count for _, count in open_blocks):
        key = f"rewritten.{rec.kind}" if rec.status == "rewritten" else f"kept.{rec.reason}"
        with _counters_lock:
            counters[key] += 1
    for out, _ in open_blocks:
        out.append(rec)


def reset_counters() -> None:
    with _counters_lock:
        counters.clear()


@contextlib.contextmanager
def collecting(count: bool = True):
    """Collect the SiteRecords of every compile this thread runs inside the block; with
    ``count=False`` they are not added to ``counters`` (``explain``)."""
    out: list[SiteRecord] = []
    token = _collectors.set(_collectors.get() + ((out, count),))
    try:
        yield out
    finally:
        _collectors.reset(token)


@dataclasses.dataclass
class Report:
    sites: list[SiteRecord]

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def kept(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "kept"]

    def count(self, kind: str | None = None, status: str = "rewritten") -> int:
        return sum(1 for s in self.sites if s.status == status and (kind is None or s.kind == kind))

    def to_dict(self) -> dict:
        return {
            "sites": [s.to_dict() for s in self.sites],
            "rewritten": len(self.rewritten),
            "kept": len(self.kept),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        head = ("#", "kind", "status", "where", "mask", "density", "max rel err", "detail")
        rows = []
        for i, s in enumerate(self.sites):
            mask = s.mask_text or "-"
            dens = f"{s.density:.3f}" if s.density is not None else "-"
            err = f"{s.max_rel_err:.2e}" if s.max_rel_err is not None else "-"
            detail = s.reason or (s.spec.describe() if s.spec else "")
            rows.append((str(i), s.kind, s.status, s.where or "-", mask, dens, err, detail))
        widths = [max(len(r[c]) for r in rows + [head]) for c in range(len(head) - 1)]
        lines = [
            "  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[-1],
        ]
        lines.append("-" * len(lines[0]))
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        n_rw, n_kept = len(self.rewritten), len(self.kept)
        lines.append(f"{len(self.sites)} attention site(s): {n_rw} rewritten, {n_kept} kept")
        return "\n".join(lines)
