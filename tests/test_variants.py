"""The variant registry (``attnfx.variants``): every record's files exist and agree with
it, and the modules that iterate over it see every variant."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import attnfx.nn
from attnfx.activation import ACTIVATIONS
from attnfx.fuzz import grammar
from attnfx.passes.recognize import recognizers
from attnfx.variants import VARIANTS, of_benchmark, variant

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
IDS = [v.kind for v in VARIANTS]


def test_kinds_are_unique_and_found():
    assert len(set(IDS)) == len(IDS)
    for v in VARIANTS:
        assert variant(v.kind) is v
    with pytest.raises(KeyError):
        variant("no such kind")


@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
def test_record_files_agree(v):
    assert v.activation in ACTIVATIONS
    rec = v.load("recognizer")
    if rec is not None:
        assert rec.KIND == v.kind and callable(rec.anchors)
        assert rec in recognizers()
    if v.grammar is not None:
        assert v.load("grammar").GRAMMAR.kind == v.kind
        assert grammar.grammars([v.kind])[0].kind == v.kind
    if v.reference is not None:
        cls = v.load("reference")
        assert getattr(attnfx.nn, cls.__name__) is cls and cls.__name__ in attnfx.nn.__all__


def test_every_benchmark_variant_measures_a_registry_variant():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_attention
    finally:
        sys.path.remove(str(BENCH))
    measured = {var for fam, var in bench_attention.PROVIDERS.values() if fam == "attnfx"}
    for name in measured:
        assert of_benchmark(name).benchmarks
    assert measured == {b for v in VARIANTS for b in v.benchmarks}
