"""The neighborhood-attention site grammar: a softmax whose mask keeps, per axis of a token
grid, a window of keys around each query (NATTEN's neighborhoods, sliding windows, chunks),
written the ways model code writes it.

It reuses the softmax grammar's program frame (projections, head split, GQA, merge,
stacked layers, inputs and lanes) with its own mask.  The token count is the grid's
(``NQ = NKV = prod(grid)``, self-attention, no dynamic rerun: a grid is a constant of the
model).  Choices (values simplest first, as the shrinker tries them):

    nb_form     natten   ``attnfx.nn.neighborhood.neighborhood_mask`` (1-D/2-D/3-D; kernel,
                         dilation, causal per axis; windows shifted inward at borders)
                | grid2d  a 2-D window written by hand: coordinates by ``//`` and ``%``,
                         the window start clamped into the axis
                | sliding (1-D) ``(ki <= qi) & (qi - ki < w)``: a causal sliding window
                | band    (1-D) ``(qi - ki).abs() <= w``: truncated at the borders
                | chunk   (1-D) ``qi // c == ki // c``: blocks of c tokens
    nb_fill     masked_fill | where
    grid        the token grid: (n,), (a, b) or (a, b, c), small
    nb_kernel   kernel size per axis (may exceed the axis: clamped)
    nb_dil      dilation (natten only), nb_causal: causal per axis (natten only)

Every window is drawn narrower than its axis on at least one axis, so the mask is never
all-true nor plain causal: each program is labelled ``neighborhood``.
"""

from __future__ import annotations

import math

from hypothesis import strategies as st

from attnfx.fuzz import softmax as sm
from attnfx.fuzz.frame import BIG_HEAD_DIM, Frame, Program, SiteGrammar

KIND = "neighborhood"

FORMS = ("natten", "grid2d", "sliding", "band", "chunk")
GRIDS = {1: ((5,), (7,), (12,), (17,), (24,)), 2: ((2, 3), (3, 3), (3, 5), (4, 4), (4, 6), (5, 5)),
         3: ((2, 2, 3), (2, 3, 3))}  # fmt: skip

SIMPLER = {
    **sm.SIMPLER_FRAME,
    "softmax": ("F",),
    "nb_form": ("natten",),
    "nb_fill": ("masked_fill",),
    "nb_dil": (1,),
    "nb_causal": (False,),
}


def choices(draw, device: str) -> dict:
    c = sm.draw_frame(draw, device)
    form = draw(st.sampled_from(FORMS))
    dims = 2 if form == "grid2d" else 1 if form != "natten" else draw(st.sampled_from((1, 2, 3)))
    grid = draw(st.sampled_from(GRIDS[dims]))
    c.update(
        {
            "near_miss": "none",
            "nb_form": form,
            "nb_fill": draw(st.sampled_from(("masked_fill", "where"))),
            "softmax": draw(st.sampled_from(sm.SOFTMAXES)),
            "grid": grid,
            "nb_kernel": tuple(draw(st.integers(1, n + 1)) for n in grid),
            "nb_dil": draw(st.sampled_from((1, 1, 2))),
            "nb_causal": draw(st.booleans()) if form == "natten" else False,
        }
    )
    return c


DEFAULTS = {
    **{k: v for k, v in sm.DEFAULTS.items() if k != "softmax"},
    "softmax": "F",
    "nb_form": "natten",
    "nb_fill": "masked_fill",
    "grid": (3, 3),
    "nb_kernel": (3, 3),
    "nb_dil": 1,
    "nb_causal": False,
}


def normalize(c: dict) -> dict:
    c = {**DEFAULTS, **c}
    c["kind"], c["form"], c["near_miss"] = KIND, "eager", "none"
    if c["nb_form"] not in FORMS:
        c["nb_form"] = "natten"
    grid = tuple(c["grid"])
    if c["nb_form"] == "grid2d" and len(grid) != 2:
        grid = (3, 3)
    if c["nb_form"] in ("sliding", "band", "chunk") and len(grid) != 1:
        grid = (math.prod(grid),)
    ks = tuple(c["nb_kernel"])[: len(grid)]
    ks = tuple(max(1, k) for k in ks + (3,) * (len(grid) - len(ks)))
    if c["nb_form"] != "natten":
        c["nb_dil"], c["nb_causal"] = 1, False
    if c["nb_form"] in ("sliding", "band", "chunk"):
        # a window (or chunk) narrower than the sequence, at least 2 wide
        ks = (min(max(2, ks[0]), grid[0] - 1),)
    elif all(k * c["nb_dil"] >= n for k, n in zip(ks, grid, strict=True)):
        # a window covering every axis keeps every pair (or, causal, the whole past)
        ks = (max(1, min(ks[0], grid[0] // c["nb_dil"]) - 1),) + ks[1:]
        if ks[0] * c["nb_dil"] >= grid[0]:
            ks, c["nb_dil"] = (1,) + ks[1:], 1
    c["grid"], c["nb_kernel"] = grid, ks
    c["NQ"] = c["NKV"] = math.prod(grid)
    c["cross"], c["dynamic"] = False, False
    if c["proj"] == "none":
        c["proj"] = "separate"  # q, k, v from one input of the grid's length
    if c["NQ"] > 17:
        # the frame cuts a big head dim's sequences to 17 tokens: the grid's would not fit
        c["D"] = min(c["D"], BIG_HEAD_DIM)
    out = sm.normalize_frame(c, {})
    assert out["NQ"] == out["NKV"] == math.prod(grid), (out["NQ"], grid)
    return out


def mask_lines(c) -> list[str]:
    """``keep`` (NQ, NKV) bool, from index arithmetic."""
    grid, ks, form = c["grid"], c["nb_kernel"], c["nb_form"]
    ar = ["qi = torch.arange(nq, device=s.device)[:, None]",
          "ki = torch.arange(nkv, device=s.device)[None, :]"]  # fmt: skip
    if form == "natten":
        causal = tuple([c["nb_causal"]] * len(grid))
        return [
            f"keep = neighborhood_mask({grid!r}, {ks!r}, {c['nb_dil']}, 1, {causal!r}, s.device)"
        ]
    if form == "sliding":
        return ar + [f"keep = (ki <= qi) & (qi - ki < {ks[0]})"]
    if form == "band":
        return ar + [f"keep = (qi - ki).abs() <= {ks[0] // 2}"]
    if form == "chunk":
        return ar + [f"keep = (qi // {ks[0]}) == (ki // {ks[0]})"]
    # grid2d: NATTEN's non-causal window per axis, written out
    (h, w), (kh, kw) = grid, ks
    return [
        "idx = torch.arange(nq, device=s.device)",
        f"row, col = idx // {w}, idx % {w}",
        f"r0 = (row - {kh // 2}).clamp(min=0, max={max(h - kh, 0)})",
        f"c0 = (col - {kw // 2}).clamp(min=0, max={max(w - kw, 0)})",
        f"in_r = (row[None, :] >= r0[:, None]) & (row[None, :] < r0[:, None] + {min(kh, h)})",
        f"in_c = (col[None, :] >= c0[:, None]) & (col[None, :] < c0[:, None] + {min(kw, w)})",
        "keep = in_r & in_c",
    ]


def body(c) -> list[str]:
    L = sm.scores_lines(c) + mask_lines(c)
    if c["nb_fill"] == "where":
        L.append('s = torch.where(keep, s, float("-inf"))')
    else:
        L.append('s = s.masked_fill(~keep, float("-inf"))')
    L.append(sm.softmax_line(c))
    return L + sm.dropout_pv_lines(c)


def header(c) -> list[str]:
    if c["nb_form"] == "natten":
        return ["from attnfx.nn.neighborhood import neighborhood_mask"]
    return []


FRAME = Frame(KIND, body=body, mask_inputs={}, header=header, known_gaps=sm.KNOWN_GAPS)


def render(c: dict) -> Program:
    return sm.render(c, FRAME)


GRAMMAR = SiteGrammar(KIND, choices, normalize, render, SIMPLER)

__all__ = ["KIND", "choices", "normalize", "render"]
