"""Routed sparse attention's generated source (``spec.routing``): the routed templates
(``templates.ROUTED_FWD``, ``ROUTED_DQ``, ``ROUTED_DKDV``) filled with the score program and
the fills on the members' positions, and the causal tile skip when it is valid.  The
launcher is ``attnfx.codegen.routed``; ``emit.source`` hands routed specs here.
"""

from __future__ import annotations

import math

from attnfx.codegen import templates
from attnfx.spec import AttentionSpec

_COMMON = [
    "Q, K, V, QI, KI,",
    "stride_qb, stride_qh, stride_qn, stride_qd,",
    "stride_kb, stride_kh, stride_kn, stride_kd,",
    "stride_vb, stride_vh, stride_vn, stride_vd,",
    "stride_qib, stride_qih, stride_qis,",
    "stride_kib, stride_kih, stride_kis,",
    "H, C, N_K, SLOTS, KSLOTS,",
    "W: tl.constexpr, WK: tl.constexpr,",
    "HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,",
    "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,",
    "BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,",
]
_PARAMS = {
    "fwd": ["SlotO, SlotLse,"] + _COMMON,
    "dq": ["DOs, Delta, Mrow, InvL, DQs,"] + _COMMON + ["DSCALE: tl.constexpr,"],
    "dkdv": ["SlotLse, DOs, Delta, Mrow, InvL, DKs, DVs,"] + _COMMON + ["DSCALE: tl.constexpr,"],
}
_OPS = {"lt": "<", "le": "<=", "eq": "==", "ne": "!=", "ge": ">=", "gt": ">"}
# relations that can hold when pos_q < pos_k: a later fill of one of them may undo -inf
_MAY_HOLD_BEFORE = {"lt", "le", "ne"}


def _num(x: float) -> str:
    if math.isinf(x):
        return 'float("-inf")' if x < 0 else 'float("inf")'
    return repr(float(x))


def _prec(spec: AttentionSpec) -> str:
    return ', input_precision="ieee"' if spec.dtype == "float32" else ""


def _score_program(spec: AttentionSpec) -> list[str]:
    lines = []
    for op in spec.score_ops:
        if op.op == "mul":
            lines.append(f"s = s * {_num(op.value)}")
        elif op.op == "add":
            lines.append(f"s = s + {_num(op.value)}")
        else:
            raise ValueError(f"routed kernels: score op {op.op} not supported")
    return lines


def _fills(spec: AttentionSpec, bwd: bool) -> list[str]:
    lines = []
    for rel, value in spec.routing.fills:
        cond = f"tq[:, None] {_OPS[rel]} tk[None, :]"
        if bwd:
            lines += [
                f"hit = {cond}",
                f"s = tl.where(hit, {_num(value)}, s)",
                "filled = filled | hit",
            ]
        else:
            lines.append(f"s = tl.where({cond}, {_num(value)}, s)")
    return lines


def causal_skip(spec: AttentionSpec) -> bool:
    """Whether a tile with every key after every query is empty: a ``lt`` -inf fill that
    no later fill can undo there."""
    fills = spec.routing.fills
    for i, (rel, value) in enumerate(fills):
        if rel == "lt" and value == -math.inf:
            return not any(r in _MAY_HOLD_BEFORE for r, _ in fills[i + 1 :])
    return False


_Q_LAST = "q_last = tl.reduce(tl.where(m_valid, tq, -1), 0, _max_combine)"
_K_FIRST = "k_first = -tl.reduce(tl.where(n_valid, -tk, -N_K), 0, _max_combine)"


def source(spec: AttentionSpec, part: str) -> str:
    """The generated module: ``part`` "fwd" (forward) or "bwd" (dQ and dK/dV)."""
    skip = causal_skip(spec)
    rows = {
        "row_bound": [_Q_LAST] if skip else [],
        "visit": f"if {_K_FIRST.split(' = ', 1)[1]} <= q_last:" if skip else "if True:",
    }
    common = {"prec": _prec(spec), "score_program": _score_program(spec)}
    head = templates.HEADER.format(
        describe=spec.describe(),
        key=spec.kernel_key,
        schedule="gather (routed clusters)" + (", causal tiles skipped" if skip else ""),
        helpers="#   _max_combine, _sum_combine, _online_softmax",
    )
    if part == "fwd":
        body = templates.fill(
            templates.ROUTED_FWD,
            params=["    " + p for p in _PARAMS["fwd"]],
            fills=_fills(spec, False),
            **rows,
            **common,
        )
        return head + "\n\n" + body
    if part != "bwd":
        raise ValueError(part)
    dq = templates.fill(
        templates.ROUTED_DQ,
        params=["    " + p for p in _PARAMS["dq"]],
        fills_bwd=_fills(spec, True),
        **rows,
        **common,
    )
    cols = {
        "col_bound": [_K_FIRST] if skip else [],
        "visit": f"if {_Q_LAST.split(' = ', 1)[1]} >= k_first:" if skip else "if True:",
    }
    dkdv = templates.fill(
        templates.ROUTED_DKDV,
        params=["    " + p for p in _PARAMS["dkdv"]],
        fills_bwd=_fills(spec, True),
        **cols,
        **common,
    )
    return head + "\n\n" + dq + "\n\n" + dkdv
