"""The ``tiles`` schedule's host side: which (query tile, key tile) pairs a mask keeps.

For a mask predicate (sympy, over Q, K, NQ, NK) and concrete lengths and tile sizes, each
tile is *empty* (no pair kept: never visited), *full* (every pair kept: visited without
evaluating the predicate) or *partial* (visited with the predicate).  The states are
exact, not sampled: interval arithmetic over each tile's index ranges decides most tiles
at once (a linear or floor-divided bound over a rectangle), and every tile it cannot
decide is evaluated pair by pair, with the same semantics as the reference
(``MaskPredicate.evaluate``).  Only pairs inside the lengths count.

The kernels read the states as lists (``TileLists``): per row tile, its partial column
tiles then its full ones, ascending.  Forward and dQ walk query tiles (rows) over key
tiles; dK/dV walk the transposed lists.  Everything is cached per (predicate, lengths,
tile sizes), and the lists per device.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import sympy
import torch

from attnfx.predicate import NK, NQ, K, MaskPredicate, Q

EMPTY, PARTIAL, FULL = 0, 1, 2
# Tiles evaluated pair by pair per batch (bounded host memory: pairs per batch).
_PAIRS_PER_BATCH = 1 << 22
# Row tiles per chunk of the interval pass (bounded host memory).
_TILES_PER_CHUNK = 1 << 20


class _Undecided(Exception):
    """An expression interval arithmetic does not bound: its tiles go pair by pair."""


def _interval(e, env) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) int64 bounds of an integer expression over each tile."""
    if e in env:
        return env[e]
    if isinstance(e, sympy.Integer):
        v = torch.tensor(int(e), dtype=torch.int64)
        return v, v
    if isinstance(e, sympy.Add):
        los, his = zip(*(_interval(a, env) for a in e.args), strict=True)
        return sum(los[1:], los[0]), sum(his[1:], his[0])
    if isinstance(e, sympy.Mul):
        lo, hi = _interval(e.args[0], env)
        for a in e.args[1:]:
            blo, bhi = _interval(a, env)
            c = (lo * blo, lo * bhi, hi * blo, hi * bhi)
            lo = torch.minimum(torch.minimum(c[0], c[1]), torch.minimum(c[2], c[3]))
            hi = torch.maximum(torch.maximum(c[0], c[1]), torch.maximum(c[2], c[3]))
        return lo, hi
    if isinstance(e, sympy.floor):
        # floor(num / den) with a positive constant den is monotone in num
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if not (isinstance(den, sympy.Integer) and den > 0):
            raise _Undecided
        lo, hi = _interval(num, env)
        d = int(den)
        return torch.div(lo, d, rounding_mode="floor"), torch.div(hi, d, rounding_mode="floor")
    if isinstance(e, sympy.Mod) and isinstance(e.args[1], sympy.Integer) and e.args[1] > 0:
        lo, hi = _interval(e.args[0], env)
        m = int(e.args[1])
        same = torch.div(lo, m, rounding_mode="floor") == torch.div(hi, m, rounding_mode="floor")
        return torch.where(same, lo % m, 0), torch.where(same, hi % m, m - 1)
    if isinstance(e, (sympy.Min, sympy.Max)):
        f = torch.minimum if isinstance(e, sympy.Min) else torch.maximum
        bounds = [_interval(a, env) for a in e.args]
        return functools.reduce(f, [b[0] for b in bounds]), functools.reduce(
            f, [b[1] for b in bounds]
        )
    if isinstance(e, sympy.Abs):
        lo, hi = _interval(e.args[0], env)
        return torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, 0)), torch.maximum(-lo, hi)
    raise _Undecided  # rationals outside a floor, unknown functions


def _decide(e, env) -> tuple[torch.Tensor, torch.Tensor]:
    """(all kept, none kept) per tile; both False: undecided."""
    if e is sympy.true or e is sympy.false:
        t = torch.tensor(e is sympy.true)
        return t, ~t
    if isinstance(e, sympy.And):
        parts = [_decide(a, env) for a in e.args]
        return functools.reduce(torch.logical_and, [p[0] for p in parts]), functools.reduce(
            torch.logical_or, [p[1] for p in parts]
        )
    if isinstance(e, sympy.Or):
        parts = [_decide(a, env) for a in e.args]
        return functools.reduce(torch.logical_or, [p[0] for p in parts]), functools.reduce(
            torch.logical_and, [p[1] for p in parts]
        )
    if isinstance(e, sympy.Not):
        yes, no = _decide(e.args[0], env)
        return no, yes
    if isinstance(e, sympy.Rel):
        try:
            llo, lhi = _interval(e.lhs, env)
            rlo, rhi = _interval(e.rhs, env)
        except _Undecided:
            f = torch.tensor(False)
            return f, f
        lo, hi = llo - rhi, lhi - rlo  # bounds of lhs - rhs
        op = e.rel_op
        if op == "<":
            return hi < 0, lo >= 0
        if op == "<=":
            return hi <= 0, lo > 0
        if op == ">":
            return lo > 0, hi <= 0
        if op == ">=":
            return lo >= 0, hi < 0
        eq, ne = (lo == 0) & (hi == 0), (lo > 0) | (hi < 0)
        return (eq, ne) if op == "==" else (ne, eq)
    f = torch.tensor(False)
    return f, f


def _pairwise(pred: MaskPredicate, rows, cols, nq, nk, bm, bn):
    """(any kept, all kept) of the tiles (rows[i], cols[i]), pair by pair.  Indices past
    the lengths are clamped onto the tile's last real row / column: a repeat of a real
    pair changes neither any nor all."""
    q = torch.clamp(rows.view(-1, 1, 1) * bm + torch.arange(bm).view(1, bm, 1), max=nq - 1)
    k = torch.clamp(cols.view(-1, 1, 1) * bn + torch.arange(bn).view(1, 1, bn), max=nk - 1)
    kept = torch.as_tensor(pred.evaluate(q, k, nq, nk)).to(torch.bool)
    kept = kept.expand(len(rows), bm, bn)
    return kept.flatten(1).any(1), kept.flatten(1).all(1)


@functools.lru_cache(maxsize=64)
def tile_states(pred_key: str, nq: int, nk: int, bm: int, bn: int) -> torch.Tensor:
    """(ceil(nq / bm), ceil(nk / bn)) int8: EMPTY, PARTIAL or FULL per (query tile, key
    tile), over the pairs inside the lengths."""
    pred = MaskPredicate.from_key(pred_key)
    n_rows, n_cols = -(-nq // bm), -(-nk // bn)
    states = torch.empty((n_rows, n_cols), dtype=torch.int8)
    if n_rows * n_cols == 0:
        return states
    cols = torch.arange(n_cols, dtype=torch.int64).view(1, -1)
    k_span = (cols * bn, torch.clamp(cols * bn + bn, max=nk) - 1)
    step = max(1, _TILES_PER_CHUNK // n_cols)
    for r0 in range(0, n_rows, step):
        rows = torch.arange(r0, min(r0 + step, n_rows), dtype=torch.int64).view(-1, 1)
        q_span = (rows * bm, torch.clamp(rows * bm + bm, max=nq) - 1)
        n = torch.tensor(nq, dtype=torch.int64), torch.tensor(nk, dtype=torch.int64)
        env = {Q: q_span, K: k_span, NQ: (n[0], n[0]), NK: (n[1], n[1])}
        all_kept, none_kept = _decide(pred.expr, env)
        shape = (len(rows), n_cols)
        all_kept, none_kept = all_kept.expand(shape), none_kept.expand(shape)
        chunk = torch.where(all_kept, FULL, torch.where(none_kept, EMPTY, PARTIAL)).to(torch.int8)
        # undecided tiles (and an undecided "partial"): pair by pair
        ri, ci = torch.nonzero(~all_kept & ~none_kept, as_tuple=True)
        per = max(1, _PAIRS_PER_BATCH // (bm * bn))
        for i in range(0, len(ri), per):
            r, c = ri[i : i + per], ci[i : i + per]
            anyk, allk = _pairwise(pred, r + r0, c, nq, nk, bm, bn)
            chunk[r, c] = torch.where(allk, FULL, torch.where(anyk, PARTIAL, EMPTY)).to(torch.int8)
        states[r0 : r0 + len(rows)] = chunk
    return states


@dataclasses.dataclass(frozen=True)
class TileLists:
    """Per row tile ``r``: partial column tiles ``idx[off[2r]:off[2r+1]]``, then full
    ones ``idx[off[2r+1]:off[2r+2]]`` (int32, ascending)."""

    off: torch.Tensor
    idx: torch.Tensor

    @property
    def visited(self) -> int:
        return int(self.off[-1])


@functools.lru_cache(maxsize=64)
def tile_lists(
    pred_key: str, nq: int, nk: int, bm: int, bn: int, transposed: bool = False
) -> TileLists:
    """The lists the kernels walk.  Rows are query tiles of ``bm`` queries (forward, dQ),
    or with ``transposed`` key tiles of ``bn`` keys (dK/dV).  A full tile whose columns
    run past the length is listed as partial: the kernel's full tiles load without a tail
    mask."""
    st = tile_states(pred_key, nq, nk, bm, bn)
    n_cols_len, b_cols = (nk, bn) if not transposed else (nq, bm)
    if transposed:
        st = st.t()
    full = st == FULL
    if n_cols_len % b_cols and full.shape[1]:
        full[:, -1] = False
    partial = (st != EMPTY) & ~full
    kinds = torch.stack([partial, full], 1)  # (rows, 2, cols): partial before full
    counts = kinds.sum(2).flatten()
    off = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(counts, 0)
    idx = torch.nonzero(kinds)[:, 2]  # row-major: per row, partial then full, ascending
    if idx.numel() == 0:  # nothing kept: one unread entry (no kernel gets an empty buffer)
        idx = torch.zeros(1, dtype=torch.int64)
    return TileLists(off.to(torch.int32), idx.to(torch.int32).contiguous())


_device_lock = threading.Lock()
_on_device: dict = {}


def device_lists(
    pred_key: str, nq: int, nk: int, bm: int, bn: int, transposed: bool, device
) -> TileLists:
    """``tile_lists`` on ``device`` (copied once per device and key)."""
    host = tile_lists(pred_key, nq, nk, bm, bn, transposed)
    if torch.device(device).type == "cpu":
        return host
    key = (pred_key, nq, nk, bm, bn, transposed, str(device))
    with _device_lock:
        got = _on_device.get(key)
        if got is None:
            if len(_on_device) >= 256:
                _on_device.clear()
            got = TileLists(host.off.to(device), host.idx.to(device))
            _on_device[key] = got
        return got


def count_nonempty(pred_key: str, nq: int, nk: int, bm: int, bn: int) -> int:
    """Non-empty (query tile, key tile) pairs: the tiles the schedule visits."""
    return int((tile_states(pred_key, nq, nk, bm, bn) != EMPTY).sum())


# ---------------------------------------------------------------------------------------
# How much of the score matrix a kernel visits
# ---------------------------------------------------------------------------------------


def visited(spec, nq: int, nk: int, bm: int, bn: int) -> tuple[int, int]:
    """(visited, all) (query tile, key tile) pairs of the forward kernel of ``spec`` at
    lengths (nq, nk) with tiles of bm queries and bn keys (dQ visits the same; dK/dV the
    same pairs transposed)."""
    from attnfx.codegen.plan import ScheduleKind, make_plan, skip_bounds

    plan = make_plan(spec)
    n_rows, n_cols = -(-nq // bm), -(-nk // bn)
    if plan.schedule.kind is ScheduleKind.TILES:
        pred = spec.score_ops[plan.schedule.skip_op].pred
        return count_nonempty(pred, nq, nk, bm, bn), n_rows * n_cols
    # the band: _block_range's [lo, hi) per query tile, plus a kept prefix's tiles
    vlo, vhi, _, _, prefix = skip_bounds(spec, plan, nq, nk)
    start = torch.arange(n_rows, dtype=torch.int64) * bm
    first = torch.clamp(start + vlo, min=0)
    last = torch.clamp(start + bm + vhi, max=nk)
    lo = first // bn * bn
    hi = torch.where(last > first, (last + bn - 1) // bn * bn, lo)
    pre_hi = torch.minimum(torch.full_like(lo, (prefix + bn - 1) // bn * bn), lo)
    return int(((hi - lo) // bn + pre_hi // bn).sum()), n_rows * n_cols


def density(spec, nq: int, nk: int, bm: int | None = None, bn: int | None = None) -> float:
    """The fraction of (query tile, key tile) pairs the forward kernel visits at lengths
    (nq, nk): ~0.5 for causal, ~C/N for chunks of C keys.  Tiles: the default GPU launch
    config's unless given."""
    if bm is None or bn is None:
        from attnfx.codegen.plan import configs

        cfg = configs(spec)["fwd"][0]
        bm, bn = cfg.BLOCK_M, cfg.BLOCK_N
    seen, total = visited(spec, nq, nk, bm, bn)
    return seen / total if total else 0.0
