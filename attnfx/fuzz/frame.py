"""What every site grammar shares: the labelled ``Program``, the ``SiteGrammar`` record a
grammar module exports (``GRAMMAR``), the edge-biased shapes and values, the input helpers
rendered into every program, and the ``Frame`` a grammar plugs into the softmax grammar's
program frame.  The grammar modules import this one, never ``grammar`` (which loads them
through the variant registry).
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


@dataclasses.dataclass(frozen=True)
class Frame:
    """What a site grammar plugs into the shared program frame (projections, head split,
    GQA, merge, stacked layers, inputs and lanes) that ``softmax.render`` renders.  The
    softmax grammar is the frame with its defaults; ``sigmoid.py`` and ``temperature.py``
    supply their own score bodies, inputs and extra state."""

    kind: str
    body: Callable[[dict], list[str]]  # q, k, v (B, H, N, D) -> ``o`` (and ``p``)
    mask_inputs: dict  # c["mask"] -> input kind (additive | masked_out | keep | padding)
    init: Callable[[dict], list[str]] = lambda c: []  # extra ``__init__`` lines
    pre_heads: Callable[[dict], list[str]] = lambda c: []  # q, k, v inputs as (B, N, H, D)
    post_heads: Callable[[dict], list[str]] = lambda c: []  # after q, k, v are (B, H, N, D)
    extra_inputs: Callable[[dict], list[tuple[str, str]]] = lambda c: []  # (name, input kind)
    header: Callable[[dict], list[str]] = lambda c: []  # extra module-level constants
    expected: Callable[[dict], dict] | None = None  # labels (default {kind: layers})
    transcendental: Callable[[dict], bool] = lambda c: False  # equivalence rule: +1
    attn_class: Callable[[dict], list[str] | None] = lambda c: None  # replaces class Attn
    known_gaps: tuple = ()


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
