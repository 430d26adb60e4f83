"""The program grammar: hypothesis strategies for small attention programs, with labels.

A *program* is the Python source of a standalone module (``Model``, ``make_model()``,
``make_inputs(nq, nkv, seed)``) plus its ground truth: how many attention sites of each
kind must be rewritten, or which deliberate *near-miss* it is (then nothing may be
rewritten).  Programs are generated from a dict of *choices* (plain strings and ints);
``render(choices)`` turns the choices into source, so a failure is reproduced by its
choices alone, and the shrinker (``attnfx.fuzz.shrink``) works on them.

One *site grammar* per attention kind: the module the kind's record in the variant
registry names (``attnfx.variants``: ``attnfx/fuzz/softmax.py``, ``sigmoid.py``,
``temperature.py``; the latter two reuse the softmax module's program frame) exports it as
``GRAMMAR``, and ``SITE_GRAMMARS`` holds them (``register`` adds others);
``attnfx fuzz --kind softmax,sigmoid`` draws from the grammars named (default: all).
What grammars share lives in ``attnfx/fuzz/frame.py``.  A site grammar provides

* ``choices(draw, device)``: draw a valid choice dict (hypothesis ``draw``);
* ``normalize(choices)``: coerce any choice dict to a valid one (used by the shrinker);
* ``render(choices) -> Program``;
* ``SIMPLER``: for each choice, its values from simplest to most complex (shrinking).

Shapes, dtypes and values are drawn by the shared strategies here, biased to the edges
(``research/style_reliability.md`` Part 2): lengths 1, 2, block ± 1, primes; head dims
16..256 with non-powers of two; non-contiguous and offset views; fp32/fp16 on CPU (bf16
only on CUDA); a finite lane and exceptional lanes (NaN, ±inf, fully masked rows,
fp16-overflowing magnitudes, fully ``-inf`` rows of an additive mask that appear only in a
later call's inputs: ``masked_later``).

The *interpreter lane* (``interp``, about one CPU program in ``INTERP_EVERY``) runs the
rewritten sites through the generated Triton kernels under Triton's interpreter
(``ATTNFX_INTERPRET=1``) instead of the op's PyTorch implementation; its shapes are kept
small (``bound_interp``: the interpreter runs a Python loop per block) and its dtypes
fp32/fp16 (the interpreter computes bf16 ``tl.dot`` wrongly).
"""

from __future__ import annotations

from hypothesis import strategies as st

from attnfx.fuzz.frame import Program, SiteGrammar
from attnfx.variants import VARIANTS

SITE_GRAMMARS: dict[str, SiteGrammar] = {}


def register(g: SiteGrammar) -> SiteGrammar:
    SITE_GRAMMARS[g.kind] = g
    return g


def _load_builtin() -> None:
    # The registry's grammars; a kind registered already keeps its grammar.
    for v in VARIANTS:
        if v.grammar is not None and v.kind not in SITE_GRAMMARS:
            register(v.load("grammar").GRAMMAR)


def grammars(kinds: list[str] | None = None) -> list[SiteGrammar]:
    _load_builtin()
    names = list(kinds) if kinds else sorted(SITE_GRAMMARS)
    unknown = [k for k in names if k not in SITE_GRAMMARS]
    if unknown:
        raise ValueError(f"no fuzz grammar for kind(s) {unknown}; known: {sorted(SITE_GRAMMARS)}")
    return [SITE_GRAMMARS[k] for k in names]


@st.composite
def choice_dicts(draw, kinds: list[str] | None = None, device: str = "cpu") -> dict:
    """A choice dict of one of ``kinds``' grammars (``choices["kind"]`` names it)."""
    gs = grammars(kinds)
    g = draw(st.sampled_from(gs))
    c = g.choices(draw, device)
    c["kind"] = g.kind
    return g.normalize(c)


def programs(kinds: list[str] | None = None, device: str = "cpu") -> st.SearchStrategy[Program]:
    """The strategy of labelled programs."""
    return choice_dicts(kinds, device).map(render)


def render(choices: dict) -> Program:
    _load_builtin()
    g = SITE_GRAMMARS[choices["kind"]]
    return g.render(g.normalize(dict(choices)))


def normalize(choices: dict) -> dict:
    _load_builtin()
    return SITE_GRAMMARS[choices["kind"]].normalize(dict(choices))
