"""The program grammar: hypothesis strategies for small attention programs, with labels.

A *program* is the Python source of a standalone module (``Model``, ``make_model()``,
``make_inputs(nq, nkv, seed)``) plus its ground truth: how many attention sites of each
kind must be rewritten, or which deliberate *near-miss* it is (then nothing may be
rewritten).  Programs are generated from a dict of *choices* (plain strings and ints);
``render(choices)`` turns the choices into source, so a failure is reproduced by its
choices alone, and the shrinker (``attnfx.fuzz.shrink``) works on them.

One *site grammar* per attention kind registers itself in ``SITE_GRAMMARS``
(``attnfx/fuzz/softmax.py``, ``sigmoid.py``, ``temperature.py``; the latter two reuse the
softmax module's program frame); ``attnfx fuzz --kind softmax,sigmoid`` draws from the
registered grammars named (default: all).  A site grammar provides

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

import dataclasses
from collections.abc import Callable

from hypothesis import strategies as st

# Edge-biased sizes.  Lengths: 1, 2, block (16) ± 1, primes, a few ordinary ones.
LENGTHS = (1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33)
HEAD_DIMS = (16, 17, 24, 32, 40, 59, 64, 80, 96, 111, 128, 160, 256)
BIG_HEAD_DIM = 96  # above this, lengths are kept to <= 17 (CPU time)
MAXN = 256  # size of the causal / temperature buffers a program slices (>= every length)
VIEWS = ("contig", "offset", "transposed", "padded")
LANES = ("finite", "nan", "posinf", "neginf", "fully_masked", "overflow", "masked_later")
# One CPU program in INTERP_EVERY runs its rewritten sites through the generated kernels.
INTERP_EVERY = 10
INTERP_MAX_D = 64  # interpreter lane: head dim, heads and batch kept small (CPU time)


@dataclasses.dataclass
class Program:
    """One generated program: its choices, source and labels."""

    kind: str
    choices: dict
    source: str
    expected: dict[str, int]  # kind -> number of sites that must be rewritten
    near_miss: str | None  # the near-miss it is (then ``expected`` is empty)
    rerun: tuple[int, int] | None  # (nq, nkv) of a dynamic-shape rerun
    grads: bool  # check input gradients too
    lane: str
    known_gap: str | None = None  # an open attnfx bug makes a missed rewrite expected
    interp: bool = False  # rewritten sites run the generated kernels (Triton interpreter)

    @property
    def label(self) -> str:
        if self.near_miss:
            return f"near-miss:{self.near_miss}"
        return ",".join(f"{k} x{n}" for k, n in sorted(self.expected.items())) or "none"


@dataclasses.dataclass(frozen=True)
class SiteGrammar:
    kind: str
    choices: Callable  # (draw, device) -> dict
    normalize: Callable  # dict -> dict
    render: Callable  # dict -> Program
    simpler: dict  # choice name -> values, simplest first


SITE_GRAMMARS: dict[str, SiteGrammar] = {}


def register(g: SiteGrammar) -> SiteGrammar:
    SITE_GRAMMARS[g.kind] = g
    return g


def _load_builtin() -> None:
    # Importing a grammar module registers it.
    from attnfx.fuzz import sigmoid, softmax, temperature  # noqa: F401


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


# ---------------------------------------------------------------------------------------
# Shared strategies: shapes, dtypes, values
# ---------------------------------------------------------------------------------------


def draw_shapes(draw, *, cross_ok: bool, gqa: bool) -> dict:
    """B, H, HK (kv heads), D, NQ, NKV, biased to the edges; tiny B and H."""
    b = draw(st.sampled_from((1, 2)))
    if gqa:
        h, hk = draw(st.sampled_from(((2, 1), (4, 1), (4, 2))))
    else:
        h = draw(st.sampled_from((1, 2, 3)))
        hk = h
    d = draw(st.sampled_from(HEAD_DIMS))
    lengths = LENGTHS if d <= BIG_HEAD_DIM else tuple(n for n in LENGTHS if n <= 17)
    nq = draw(st.sampled_from(lengths))
    nkv = draw(st.sampled_from(lengths)) if cross_ok and draw(st.booleans()) else nq
    return {"B": b, "H": h, "HK": hk, "D": d, "NQ": nq, "NKV": nkv}


def second_length(n: int) -> int:
    """The length of a dynamic-shape rerun: a different edge length."""
    return {1: 2, 2: 3, 16: 17, 17: 15, 32: 33, 33: 31}.get(n, n + 1 if n < 32 else n - 1)


def draw_values(draw, device: str) -> dict:
    dtypes = ["float32", "float16"] + (["bfloat16"] if device == "cuda" else [])
    return {
        "dtype": draw(st.sampled_from(dtypes)),
        "view": draw(st.sampled_from(VIEWS)),
        "lane": draw(st.sampled_from(LANES)) if draw(st.booleans()) else "finite",
        "std": draw(st.sampled_from((0.5, 1.0, 3.0))),
        "seed": draw(st.integers(0, 2**16)),
        # On CUDA the kernels always run: the interpreter lane is a CPU lane.
        "interp": device == "cpu" and draw(st.integers(0, INTERP_EVERY - 1)) == INTERP_EVERY // 2,
    }


def bound_interp(c: dict) -> dict:
    """Keep an interpreter-lane program cheap and in the dtypes the interpreter computes
    right: batch 1, at most 2 query heads, head dim <= INTERP_MAX_D, no bf16; lengths >= 2
    (one key makes the softmax gradients exactly 0 in eager and gold, and the kernels'
    rounding noise there fails a rule whose rounding floor is then 0)."""
    if not c.get("interp"):
        return c
    c["B"] = 1
    c["NQ"], c["NKV"] = max(c["NQ"], 2), max(c["NKV"], 2)
    if c["gqa"] == "none":
        c["H"] = c["HK"] = min(c["H"], 2)
    else:
        c["H"], c["HK"] = 2, 1
    c["D"] = min(c["D"], INTERP_MAX_D)
    if c["dtype"] == "bfloat16":
        c["dtype"] = "float16"
    return c


# The input helpers every program carries (rendered into its source).
INPUT_HELPERS = '''
def rand(g, shape, std=STD):
    """A random DTYPE tensor of ``shape``, laid out as VIEW says (a view into a larger buffer)."""
    shape = tuple(shape)
    n = math.prod(shape)
    if VIEW == "offset":  # storage offset 3
        return (torch.randn(n + 3, generator=g) * std).to(DTYPE)[3:].view(shape)
    if VIEW == "transposed" and len(shape) >= 2:  # last-dim stride != 1
        swapped = shape[:-2] + (shape[-1], shape[-2])
        return (torch.randn(swapped, generator=g) * std).to(DTYPE).transpose(-2, -1)
    if VIEW == "padded":  # [..., :n] of a wider buffer
        return (torch.randn(shape[:-1] + (shape[-1] + 5,), generator=g) * std).to(DTYPE)[..., : shape[-1]]
    return (torch.randn(shape, generator=g) * std).to(DTYPE)
'''
