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
                | bucket  (1-D) local attention written on buckets of w tokens: k and v
                         joined with ``nb_back`` buckets before and ``nb_ahead`` after
                         (``pad`` + ``cat`` of shifted slices, or ``pad`` + ``unfold``:
                         ``nb_look``), a mask from the padded positions, causal by
                         position (``nb_causal``), ``nb_exact``: no key more than
                         ``nb_back·w`` before its query; read back over the tokens
                         (``attnfx.passes.recognize.bucketed``)
                | halo    (2-D) blocked local attention on an image (HaloNet): q, k, v
                         put in an image of the grid, channels ``nb_chan`` first or
                         last; q cut into ``nb_block``² blocks, k and v into windows
                         with ``nb_halo`` pixels around each block (``F.pad`` +
                         ``Tensor.unfold``, or ``F.unfold``: ``nb_look``), a ones image
                         cut the same way masking the padding; read back over the
                         image's tokens
    nb_fill     masked_fill | where
    grid        the token grid: (n,), (a, b) or (a, b, c), small
    nb_kernel   kernel size per axis (may exceed the axis: clamped)
    nb_dil      dilation (natten only), nb_causal: causal per axis (natten only)
    nb_rpb      none | heads | shared | swin: a learnable relative position bias added
                to the scores, read from a small table at an index built from the
                positions (NAT's per-axis ``relative_index`` for natten, a clamped
                ``k − q`` otherwise): an (H, T) table indexed ``[:, idx]``, a (T,) one
                shared by the heads, or Swin's (T, H) one ``[idx].permute(2, 0, 1)``;
                read back as ``add_table_aux`` (not for bucket)

Every window is drawn narrower than its axis on at least one axis, so the mask is never
all-true nor plain causal: each program is labelled ``neighborhood``.
"""

from __future__ import annotations

import math

from hypothesis import strategies as st

from attnfx.fuzz import softmax as sm
from attnfx.fuzz.frame import BIG_HEAD_DIM, Frame, Program, SiteGrammar

KIND = "neighborhood"

FORMS = ("natten", "grid2d", "sliding", "band", "chunk", "bucket", "halo")
GRIDS = {1: ((5,), (7,), (12,), (17,), (24,)), 2: ((2, 3), (3, 3), (3, 5), (4, 4), (4, 6), (5, 5)),
         3: ((2, 2, 3), (2, 3, 3))}  # fmt: skip
BUCKET_GRIDS = ((8,), (12,), (16,), (24,))  # lengths with divisors for the bucket size
# images of 2x2 blocks or more (block 2: 4x4..6x6; block 3: 6x6)
HALO_GRIDS = ((4, 4), (4, 6), (6, 4), (6, 6))

SIMPLER = {
    **sm.SIMPLER_FRAME,
    "softmax": ("F",),
    "nb_form": ("natten",),
    "nb_fill": ("masked_fill",),
    "nb_dil": (1,),
    "nb_causal": (False,),
    "nb_look": ("cat",),
    "nb_back": (1,),
    "nb_ahead": (0,),
    "nb_exact": (False,),
    "nb_rpb": ("none",),
    "nb_block": (2,),
    "nb_halo": (1,),
    "nb_chan": ("first",),
}
RPB_FORMS = ("none", "heads", "shared", "swin")


def choices(draw, device: str) -> dict:
    c = sm.draw_frame(draw, device)
    form = draw(st.sampled_from(FORMS))
    dims = 2 if form == "grid2d" else 1 if form != "natten" else draw(st.sampled_from((1, 2, 3)))
    grids = {"bucket": BUCKET_GRIDS, "halo": HALO_GRIDS}.get(form, GRIDS[dims])
    grid = draw(st.sampled_from(grids))
    c.update(
        {
            "near_miss": "none",
            "nb_form": form,
            "nb_fill": draw(st.sampled_from(("masked_fill", "where"))),
            "softmax": draw(st.sampled_from(sm.SOFTMAXES)),
            "grid": grid,
            "nb_kernel": tuple(draw(st.integers(1, n + 1)) for n in grid),
            "nb_dil": draw(st.sampled_from((1, 1, 2))),
            "nb_causal": draw(st.booleans()) if form in ("natten", "bucket") else False,
            "nb_look": draw(
                st.sampled_from(("unfold", "im2col") if form == "halo" else ("cat", "unfold"))
            ),
            "nb_back": draw(st.sampled_from((1, 1, 2))),
            "nb_ahead": draw(st.sampled_from((0, 1))),
            "nb_exact": draw(st.booleans()),
            "nb_rpb": draw(st.sampled_from(RPB_FORMS)),
            "nb_block": draw(st.sampled_from((2, 3))),
            "nb_halo": draw(st.sampled_from((1, 2))),
            "nb_chan": draw(st.sampled_from(("first", "last"))),
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
    "nb_look": "cat",
    "nb_back": 1,
    "nb_ahead": 0,
    "nb_exact": False,
    "nb_rpb": "none",
    "nb_block": 2,
    "nb_halo": 1,
    "nb_chan": "first",
}


def normalize(c: dict) -> dict:
    c = {**DEFAULTS, **c}
    c["kind"], c["form"], c["near_miss"] = KIND, "eager", "none"
    if c["nb_form"] not in FORMS:
        c["nb_form"] = "natten"
    grid = tuple(c["grid"])
    if c["nb_form"] == "grid2d" and len(grid) != 2:
        grid = (3, 3)
    if c["nb_form"] == "halo":
        # blocks that tile the image, at least two per axis; a halo that leaves some
        # key out of every window (never all pairs)
        grid = grid if grid in HALO_GRIDS else (4, 4)
        b = int(c["nb_block"]) if int(c["nb_block"]) in (2, 3) else 2
        if any(n % b or n // b < 2 for n in grid):
            b = 2
        c["nb_block"] = b
        c["nb_halo"] = max(1, min(int(c["nb_halo"]), (min(grid) - b) // 2))
        c["nb_chan"] = c["nb_chan"] if c["nb_chan"] in ("first", "last") else "first"
        c["nb_look"] = c["nb_look"] if c["nb_look"] in ("unfold", "im2col") else "unfold"
        c["nb_causal"], c["nb_dil"], c["nb_rpb"] = False, 1, "none"
        c["gqa"] = "none"  # (the image holds the heads' channels of q, k and v alike)
    if c["nb_form"] in ("sliding", "band", "chunk") and len(grid) != 1:
        grid = (math.prod(grid),)
    ks = tuple(c["nb_kernel"])[: len(grid)]
    ks = tuple(max(1, k) for k in ks + (3,) * (len(grid) - len(ks)))
    if c["nb_form"] != "natten":
        c["nb_dil"] = 1
    if c["nb_form"] not in ("natten", "bucket"):
        c["nb_causal"] = False
    if c["nb_form"] == "halo":
        ks = (c["nb_block"] + 2 * c["nb_halo"],) * 2  # (the window, for the report)
    elif c["nb_form"] == "bucket":
        # w divides the length, and the window never spans every bucket: each query's
        # keys stop short of some bucket (never all pairs, nor, causal, the whole past)
        grid = grid if grid in BUCKET_GRIDS else (12,)
        n = grid[0]
        ws = [w for w in range(1, n // 3 + 1) if n % w == 0]
        ks = (max([w for w in ws if w <= max(1, ks[0])] or [1]),)
        c["nb_back"] = max(1, min(int(c["nb_back"]), n // ks[0] - 2))
        c["nb_ahead"] = 1 if c["nb_ahead"] else 0
        if c["nb_look"] not in ("cat", "unfold"):
            c["nb_look"] = "cat"
        c["nb_exact"] = bool(c["nb_exact"])
        c["gqa"] = "none"  # (the buckets reshape B·H heads of one count)
    elif c["nb_form"] in ("sliding", "band", "chunk"):
        # a window (or chunk) narrower than the sequence, at least 2 wide
        ks = (min(max(2, ks[0]), grid[0] - 1),)
    elif all(k * c["nb_dil"] >= n for k, n in zip(ks, grid, strict=True)):
        # a window covering every axis keeps every pair (or, causal, the whole past)
        ks = (max(1, min(ks[0], grid[0] // c["nb_dil"]) - 1),) + ks[1:]
        if ks[0] * c["nb_dil"] >= grid[0]:
            ks, c["nb_dil"] = (1,) + ks[1:], 1
    if c["nb_rpb"] not in RPB_FORMS or c["nb_form"] in ("bucket", "halo"):
        c["nb_rpb"] = "none"
    c["grid"], c["nb_kernel"] = grid, ks
    if c["nb_form"] in ("natten", "grid2d") and all(k == 1 for k in ks):
        # every row keeps its own key alone: as the frame's one-key rows
        # (``softmax.single_key``), q's and k's gradients are exactly 0 in eager and
        # rounding noise in the kernels (delta from the output): no gradients checked
        c["grads"] = False
    c["NQ"] = c["NKV"] = math.prod(grid)
    c["cross"], c["dynamic"] = False, False
    if c["proj"] == "none":
        c["proj"] = "separate"  # q, k, v from one input of the grid's length
    if c["lane"] in ("nan", "posinf", "neginf", "fully_masked"):
        # The frame plants the value in token 0's input, whose key and value a window
        # hides from the far queries.  Eager's 0·NaN spreads it to every row; the kernels
        # do not read a tile of keys a row masks out whole (docs/architecture.md,
        # "Semantics decided"), so which rows see it depends on the tiling.  No key is
        # kept by every query here: the exceptional lanes stay with the other grammars,
        # whose masks all keep key 0.
        c["lane"] = "finite"
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


def _look_lines(c, name: str, x: str, pad: str) -> list[str]:
    """``name`` = buckets ``x`` (bh, nb, w, ...) joined with their neighbours."""
    back, ahead = c["nb_back"], c["nb_ahead"]
    if c["nb_look"] == "unfold":  # a window sliding by w over the padded bucket axis
        return [
            f"{name} = F.pad({x}.flatten(1, 2).transpose(1, -1), ({back} * w, {ahead} * w), value={pad})",
            f"{name} = {name}.unfold(-1, {back + ahead + 1} * w, w).movedim(1, -1)",
        ]
    return [
        f"{name} = F.pad({x}, [0, 0] * ({x}.dim() - 2) + [{back}, {ahead}], value={pad})",
        f"{name} = torch.cat([{name}[:, i : i + nb] for i in range({back + ahead + 1})], dim=2)",
    ]


def bucket_lines(c) -> list[str]:
    """Local attention on buckets of w tokens (``o`` back in (B, H, N, D))."""
    w = c["nb_kernel"][0]
    L = [
        "bh, n_, d_ = q.shape[0] * q.shape[1], q.shape[-2], q.shape[-1]",
        f"w, nb = {w}, q.shape[-2] // {w}",
        "bq, bk, bv = (t.reshape(bh, nb, w, d_) for t in (q, k, v))",
        "pos = torch.arange(n_, device=q.device).reshape(1, nb, w, 1)",
    ]
    L += _look_lines(c, "bk", "bk", "0.0") + _look_lines(c, "bv", "bv", "0.0")
    L += _look_lines(c, "kpos", "pos", "-1")
    L += ["kpos, qpos = kpos[..., 0][:, :, None, :], pos[..., 0][:, :, :, None]"]
    L.append("drop = kpos < 0")
    if c["nb_causal"]:
        L.append("drop = drop | (kpos > qpos)")
    if c["nb_exact"]:
        L.append(f"drop = drop | (qpos - kpos > {c['nb_back']} * w)")
    L += _blocked_attention_lines(c, "drop")
    return L + ["o = o.reshape(q.shape[0], q.shape[1], n_, d_)"]


def _blocked_attention_lines(c, drop: str) -> list[str]:
    """Softmax attention of the blocked ``bq`` over ``bk``/``bv``, the slots ``drop``
    filled with -inf: ``o`` (blocks, rows, D)."""
    if c["mm"] == "einsum":
        L = [f's = torch.einsum("bnid,bnjd->bnij", bq, bk) * {c["D"]} ** -0.5']
    else:
        L = [f"s = (bq @ bk.transpose(-1, -2)) / math.sqrt({c['D']})"]
    if c["nb_fill"] == "where":
        L.append(f's = torch.where({drop}, float("-inf"), s)')
    else:
        L.append(f's = s.masked_fill({drop}, float("-inf"))')
    L.append(sm.softmax_line(c))
    pv = 'torch.einsum("bnij,bnjd->bnid", p, bv)' if c["pv"] == "einsum" else "p @ bv"
    return L + [f"o = {pv}"]


def halo_lines(c) -> list[str]:
    """Blocked local attention on an image of the grid (``o`` back in (B, H, N, D))."""
    (hh, ww), b, halo = c["grid"], c["nb_block"], c["nb_halo"]
    win, nh, nw = b + 2 * halo, hh // b, ww // b
    L = [
        "b_, h_, n_, d_ = q.shape",
        f"hh, ww, blk, win, nbl = {hh}, {ww}, {b}, {win}, {nh * nw}",
    ]
    if c["nb_chan"] == "last":  # (B, H, W, C), C = heads·D
        L += [
            "qi, ki, vi = (t.transpose(1, 2).reshape(b_, hh, ww, h_ * d_) for t in (q, k, v))",
            f"bq = qi.reshape(b_, {nh}, blk, {nw}, blk, h_, d_).permute(0, 5, 1, 3, 2, 4, 6)",
            "ki, vi = ki.permute(0, 3, 1, 2), vi.permute(0, 3, 1, 2)  # windows: channels first",
        ]
    else:  # (B, C, H, W)
        L += [
            "qi, ki, vi = (t.transpose(-1, -2).reshape(b_, h_ * d_, hh, ww) for t in (q, k, v))",
            f"bq = qi.reshape(b_, h_, d_, {nh}, blk, {nw}, blk).permute(0, 1, 3, 5, 4, 6, 2)",
        ]
    L.append("bq = bq.reshape(b_ * h_, nbl, blk * blk, d_)")
    if c["nb_look"] == "im2col":
        cut = f"F.unfold({{x}}, kernel_size=win, stride=blk, padding={halo})"
        L += [
            f"bk, bv = ({cut.format(x='t')}.reshape(b_ * h_, d_, win * win, nbl)"
            ".permute(0, 3, 2, 1) for t in (ki, vi))",
            f"ones = {cut.format(x='torch.ones(1, 1, hh, ww, device=q.device)')}",
            "pad = (ones == 0).transpose(1, 2)[:, :, None, :]  # (1, blocks, 1, win²)",
        ]
    else:
        cut = f"F.pad({{x}}, ({halo},) * 4).unfold(2, win, blk).unfold(3, win, blk)"
        L += [
            f"bk, bv = ({cut.format(x='t')}.reshape(b_ * h_, d_, nbl, win * win)"
            ".permute(0, 2, 3, 1) for t in (ki, vi))",
            f"ones = {cut.format(x='torch.ones(1, 1, hh, ww, device=q.device)')}",
            "pad = (ones == 0).reshape(1, nbl, 1, win * win)",
        ]
    L += _blocked_attention_lines(c, "pad")
    if c["nb_chan"] == "last":
        back = [
            f"o = o.reshape(b_, h_, {nh}, {nw}, blk, blk, d_)",
            "o = o.permute(0, 2, 4, 3, 5, 1, 6).reshape(b_, hh, ww, h_ * d_)",
            "o = o.reshape(b_, n_, h_, d_).transpose(1, 2)",
        ]
    else:
        back = [
            f"o = o.reshape(b_, h_, {nh}, {nw}, blk, blk, d_)",
            "o = o.permute(0, 1, 6, 2, 4, 3, 5).reshape(b_, h_ * d_, hh, ww)",
            "o = o.reshape(b_, h_, d_, n_).transpose(-1, -2)",
        ]
    return L + back


def _rpb_size(c) -> int:
    """Entries of the bias table: NAT's (2k−1)^n, else offsets −R..R."""
    if c["nb_form"] == "natten":
        return math.prod(2 * k - 1 for k in c["nb_kernel"])
    return 2 * _rpb_reach(c) + 1


def _rpb_reach(c) -> int:
    return max(c["nb_kernel"]) // 2 + 1


def rpb_lines(c) -> list[str]:
    """``s`` plus the relative position bias read from ``self.rpb``."""
    form = c["nb_rpb"]
    if form == "none":
        return []
    if c["nb_form"] == "natten":
        grid, ks = c["grid"], c["nb_kernel"]
        L = [f"idx = relative_index({grid!r}, {ks!r}, {c['nb_dil']}).to(s.device)"]
    else:
        r = _rpb_reach(c)
        L = [
            "pos = torch.arange(nq, device=s.device)",
            f"idx = (pos[None, :] - pos[:, None]).clamp({-r}, {r}) + {r}",
        ]
    read = {"heads": "self.rpb[:, idx]", "shared": "self.rpb[idx]",
            "swin": "self.rpb[idx].permute(2, 0, 1)"}[form]  # fmt: skip
    return L + [f"s = s + {read}"]


def rpb_init(c) -> list[str]:
    form = c["nb_rpb"]
    if form == "none":
        return []
    t, h = _rpb_size(c), c["H"]
    shape = {"heads": f"({h}, {t})", "shared": f"({t},)", "swin": f"({t}, {h})"}[form]
    return [f"self.rpb = nn.Parameter(0.5 * torch.randn{shape})"]


def body(c) -> list[str]:
    if c["nb_form"] == "bucket":
        return bucket_lines(c)
    if c["nb_form"] == "halo":
        return halo_lines(c)
    L = sm.scores_lines(c) + rpb_lines(c) + mask_lines(c)
    if c["nb_fill"] == "where":
        L.append('s = torch.where(keep, s, float("-inf"))')
    else:
        L.append('s = s.masked_fill(~keep, float("-inf"))')
    L.append(sm.softmax_line(c))
    return L + sm.dropout_pv_lines(c)


def header(c) -> list[str]:
    if c["nb_form"] == "natten":
        return ["from attnfx.nn.neighborhood import neighborhood_mask, relative_index"]
    return []


FRAME = Frame(
    KIND, body=body, mask_inputs={}, header=header, init=rpb_init, known_gaps=sm.KNOWN_GAPS
)


def render(c: dict) -> Program:
    return sm.render(c, FRAME)


GRAMMAR = SiteGrammar(KIND, choices, normalize, render, SIMPLER)

__all__ = ["KIND", "choices", "normalize", "render"]
