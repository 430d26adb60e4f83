"""Fuzz tests of the rewrites (``attnfx fuzz``): a fixed-seed budget that must find no
failure, the grammar's validity, and a planted bug that must be found and reproduced.

Budget: FUZZ_EXAMPLES (default 80, drawn from every kind: softmax, sigmoid, temperature)
keeps this file near 2–3 minutes on 2 CPU cores; the ``nightly`` hypothesis profile
(HYPOTHESIS_PROFILE=nightly) runs 8x more.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from attnfx.fuzz import grammar
from attnfx.fuzz.runner import draw_programs, fuzz, load

pytestmark = pytest.mark.fuzz

NIGHTLY = os.environ.get("HYPOTHESIS_PROFILE") == "nightly"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 640 if NIGHTLY else 80))
SEED = int(os.environ.get("FUZZ_SEED", 1))


KINDS = ("sigmoid", "softmax", "temperature")


def test_fuzz_fixed_seed_finds_no_failure():
    s = fuzz(EXAMPLES, SEED, out=None, minimize=False)
    assert len(s.results) == EXAMPLES
    assert sum(s.rewritten().values()) > EXAMPLES // 2, s.table()  # the grammar does reach rewrites
    if EXAMPLES >= 30:  # every kind is drawn and rewritten
        for kind in KINDS:
            assert s.rewritten()[kind] > 0, s.table()
    assert s.ok, s.table()


def test_grammars_registered():
    assert [g.kind for g in grammar.grammars()] == list(KINDS)  # the default: every kind
    for kind in KINDS:
        (p,) = draw_programs(1, SEED, [kind])
        assert p.kind == kind and p.choices["kind"] == kind


def test_grammar_programs_are_valid_eager_pytorch():
    for p in draw_programs(45, SEED + 1):
        ns = load(p)
        with torch.no_grad():
            out = ns["make_model"]()(*ns["make_inputs"]())
            if p.rerun:
                ns["make_model"]()(*ns["make_inputs"](*p.rerun))
        assert isinstance(out, (torch.Tensor, tuple)), p.source
        assert (p.near_miss is None) == bool(p.expected), p.label
        if p.near_miss is None:
            assert set(p.expected) == {p.kind}, p.label  # labels by kind
        tr = p.kind == "sigmoid" or p.choices.get("temp") in ("softcap", "q_tau", "selective")
        assert ns["TRANSCENDENTAL"] == tr, p.label  # σ / tanh / softplus: the §5 +1


@pytest.mark.parametrize("kind", KINDS)
def test_shrunk_choices_stay_valid(kind):
    (g,) = grammar.grammars([kind])
    for p in draw_programs(6, SEED + 2, [kind]):
        for key, values in g.simpler.items():
            for v in values:
                c = grammar.normalize({**p.choices, key: v})
                assert grammar.normalize(c) == c  # idempotent
                ns = load(grammar.render(c))
                with torch.no_grad():
                    ns["make_model"]()(*ns["make_inputs"]())


PLANT_KINDS = {"drop-scale": None, "accept-query-softmax": None, "sigmoid-bias": ["sigmoid"]}


@pytest.mark.parametrize("plant", list(PLANT_KINDS))
def test_planted_bug_is_found_and_reproduced(plant, tmp_path, monkeypatch):
    """With the verifier off, a wrong kernel (or a wrong match) is found within 100
    examples, and the minimized repro fails when run with the same plant, and passes
    without it."""
    import attnfx.ops as ops
    from attnfx.fuzz import plant as plant_mod
    from attnfx.passes.recognize import softmax as rec

    # Undo the monkeypatching after the test.
    monkeypatch.setattr(ops, "reference_attention", ops.reference_attention)
    monkeypatch.setattr(rec, "match", rec.match)
    monkeypatch.setattr(plant_mod, "_applied", set())
    s = fuzz(
        100,
        SEED,
        kinds=PLANT_KINDS[plant],
        options={"verify": "off"},
        out=str(tmp_path),
        plant=plant,
        stop_after=1,
        shrink_budget=25,
    )
    failing = s.failures
    assert failing, s.table()
    assert failing[0].index < 100
    cats = {c for c, _ in failing[0].failures}
    assert cats & {"mismatch", "label mismatch", "near-miss differs"}, failing[0].failures
    repro = failing[0].repro
    assert repro and os.path.exists(repro)
    env = dict(os.environ)
    run = subprocess.run(
        [sys.executable, repro], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL [" in run.stdout
    env["ATTNFX_FUZZ_PLANT"] = ""
    clean = subprocess.run(
        [sys.executable, repro], capture_output=True, text=True, env=env, timeout=300
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_cli_fuzz_summary_and_exit_status(capsys):
    from attnfx.cli import main

    rc = main(["fuzz", "--examples", "3", "--seed", str(SEED), "--quiet"])
    out = capsys.readouterr().out
    assert (
        "programs generated" in out and "mismatches" in out and "near-misses correctly kept" in out
    )
    assert rc == 0, out
