"""The variant registry: one record per attention variant attnfx compiles.

A variant is what the report calls a site's *kind*.  Its record names, by module path,
the files that make it up — the recognizer (``attnfx/passes/recognize/``), the reference
module written the plain-PyTorch way (``attnfx/nn/``), the fuzz site grammar
(``attnfx/fuzz/``) — and the benchmark variants that measure it
(``benchmarks/bench_attention.py``).  The recognizer driver, the fuzzer, ``attnfx.nn``
and the benchmarks iterate over ``VARIANTS``; adding a variant adds a record here and
its files.

The record holds names, not modules, so that this module imports nothing of attnfx: the
modules that iterate over it import what it names (``Variant.load``), and nothing named
here imports them back.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Variant:
    # the report's kind: ``Site.kind``, the counters' ``rewritten.<kind>``, ``spec.kind``
    kind: str
    activation: str  # its sites' ``AttentionSpec.activation``
    # the module with ``KIND``, ``is_anchor(node)`` and ``match(node)``, tried in registry
    # order on every node; None: the variant's sites are labelled by another variant's
    # recognizer (temperature shares the softmax anchor)
    recognizer: str | None
    # ``module:Class`` of the reference module in ``attnfx.nn``; None: none
    reference: str | None
    # the fuzz site grammar: a module with ``GRAMMAR`` (an ``attnfx.fuzz.frame.SiteGrammar``)
    grammar: str | None
    # the benchmark variants (``bench_attention.PROVIDERS``' second field) that measure it
    benchmarks: tuple[str, ...] = ()

    def load(self, field: str):
        """The module (or ``module:attribute``) a field names; None when it names none."""
        name = getattr(self, field)
        if name is None:
            return None
        module, _, attr = name.partition(":")
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod


VARIANTS: tuple[Variant, ...] = (
    # First: a routed site is anchored on the softmax of its gathered scores, and is the
    # more specific reading of it (its recognizer says NoMatch unless the scores come
    # from gathered rows and the outputs are scattered back).
    Variant(
        kind="routed",
        activation="softmax",
        recognizer="attnfx.passes.recognize.routed",
        reference="attnfx.nn.routed:RoutedAttention",
        grammar="attnfx.fuzz.routed",
        benchmarks=(),
    ),
    Variant(
        kind="softmax",
        activation="softmax",
        recognizer="attnfx.passes.recognize.softmax",
        reference=None,
        grammar="attnfx.fuzz.softmax",
        benchmarks=("softmax", "sink", "alibi", "bias"),
    ),
    Variant(
        kind="sigmoid",
        activation="sigmoid",
        recognizer="attnfx.passes.recognize.sigmoid",
        reference="attnfx.nn.sigmoid:SigmoidAttention",
        grammar="attnfx.fuzz.sigmoid",
        benchmarks=("sigmoid",),
    ),
    Variant(
        kind="temperature",
        activation="softmax",
        recognizer=None,
        reference="attnfx.nn.selective:SelectiveAttention",
        grammar="attnfx.fuzz.temperature",
        benchmarks=("temp", "softcap"),
    ),
    Variant(
        kind="neighborhood",
        activation="softmax",
        recognizer=None,  # labelled on the softmax anchor: attnfx.passes.recognize.neighborhood
        reference="attnfx.nn.neighborhood:NeighborhoodAttention1D",
        grammar="attnfx.fuzz.neighborhood",
        benchmarks=(),
    ),
)


def variant(kind: str) -> Variant:
    """The record of ``kind``."""
    for v in VARIANTS:
        if v.kind == kind:
            return v
    raise KeyError(f"no variant {kind!r}; known: {[v.kind for v in VARIANTS]}")


def of_benchmark(name: str) -> Variant:
    """The variant a benchmark variant measures."""
    for v in VARIANTS:
        if name in v.benchmarks:
            return v
    raise KeyError(f"no variant is measured by benchmark variant {name!r}")
