"""Temperature-scaled attention: scores rescaled per query, per head or by position before
the softmax.

* Selective Attention (Zhang et al., NeurIPS 2024, "Selective Attention: Enhancing
  Transformer through Principled Context Control"): a query temperature τ(x), from a
  token term (a small projection of the hidden state) plus a position term, written as
  ``q * tau[..., None]`` or as the scores times a per-row tensor;
* scalable softmax (Nakanishi 2025, "Scalable-Softmax Is Superior for Attention"):
  ``s · log n`` times the scores, ``s`` learnable per head; Qwen's ``logn`` query scaling
  and Llama 4's ``log(floor((pos + 1) / floor_scale) + 1) · attn_scale + 1``;
* soft-capping ``c · tanh(s / c)`` (Gemma 2).

These share the softmax anchor: the softmax recognizer builds the site, and this module
(a) can move per-row multipliers onto q — legal when only multiplications precede them
in the score program, since ``(q·kᵀ)·t = (q·t)·kᵀ`` for t constant along keys — so that a
learnable τ gets its gradient from autograd outside the kernel; no dtype does today
(``MOVE_ONTO_Q``: the rounding of q·τ missed the equivalence rule in float32 and in
float16), so τ multiplies the float32 scores; (b) labels the site ``"temperature"``.

Edge semantics: a temperature that varies along the key axis, or that is computed from
the scores themselves, is refused with its reason; τ ≤ 0 is computed as written (a
negative temperature flips the ranking, as in eager); soft-capping commutes with
nothing, so masks after it stay after it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from attnfx.passes import graph as G
from attnfx.passes.match import AuxOperand
from attnfx.spec import ScoreOp

KIND = "temperature"


def _is(op: ScoreOp, form: str, operand: str | None = None) -> bool:
    return op.entry.form == form and operand in (None, op.entry.operand)


# The working dtypes whose sites get their per-row multipliers moved onto q: none.  The
# rounding of q·τ in the working dtype costs more than eager's own: float32 outputs up
# to 4x eager's error (|s| ~ 40, D = 160), float16 gradients of q and k 1.8x eager's mean
# error (D = 111) — both outside the equivalence rule.  On the scores τ multiplies the
# float32 scores (no rounding of its own); its gradient comes from the aux backward.
# Moving it back needs the kernels to take τ per row and return dτ = rowsum(q ⊙ dq̃).
MOVE_ONTO_Q: frozenset = frozenset()


def move_row_multipliers(
    ops: list[ScoreOp], aux: list[AuxOperand], anchor: fx.Node, *, dtype=None
) -> tuple[list[ScoreOp], list[AuxOperand], list[AuxOperand]]:
    """Move each per-row ``mul_aux`` that only multiplications precede onto q, for sites
    of a dtype in ``MOVE_ONTO_Q``; others keep them on the scores, in eager's order."""
    q_mul: list[AuxOperand] = []
    if dtype not in MOVE_ONTO_Q:
        return ops, aux, q_mul
    moved: set[int] = set()
    prefix_is_mul = True
    for op in ops:
        if _is(op, "mul", "aux") and prefix_is_mul:
            moved.add(op.aux)
            q_mul.append(aux[op.aux])
        elif not _is(op, "mul"):
            prefix_is_mul = False
    # A learnable multiplier after a bias, mask or tanh stays in the score program: its
    # gradient comes from the op's backward (ops.attention_aux_backward_op).
    if not moved:
        return ops, aux, q_mul
    remap, kept_aux = {}, []
    for i, a in enumerate(aux):
        if i not in moved:
            remap[i] = len(kept_aux)
            kept_aux.append(a)
    new_ops = []
    for op in ops:
        if _is(op, "mul", "aux") and op.aux in moved:
            continue
        if op.aux is not None:
            op = dataclasses.replace(op, aux=remap[op.aux])
        new_ops.append(op)
    return new_ops, kept_aux, q_mul


_VIEWS = {"transpose", "permute", "view", "reshape", "contiguous", "to"}


def query_temperature(q: fx.Node, depth: int = 4) -> bool:
    """Whether q was multiplied by a tensor constant along the head dim (``q * τ``)."""
    import operator

    n = q
    for _ in range(depth):
        if not isinstance(n, fx.Node):
            return False
        if n.op == "call_function" and n.target is operator.mul and len(n.args) == 2:
            for x in n.args:
                shp = G.shape(x) if isinstance(x, fx.Node) else None
                if shp is not None and len(shp) >= 1 and shp[-1] == 1 and G.shape(n) != shp:
                    return True
            # ``(q · τ) · c``: a constant scale (kept on q by the recognizer) hides nothing
            const = [G.constant_value(x) is not None for x in n.args]
            if const.count(True) == 1 and isinstance(n.args[const.index(False)], fx.Node):
                n = n.args[const.index(False)]
                continue
            return False
        if (n.op == "call_method" and n.target in _VIEWS) or (
            n.op == "call_function" and n.target in (torch.transpose, torch.permute)
        ):
            n = n.args[0]
            continue
        return False
    return False


def has_temperature(ops: list[ScoreOp], q_mul: list[AuxOperand], q: fx.Node) -> bool:
    return (
        bool(q_mul)
        or any(_temperature_op(op) and not _head_dim_scale(op) for op in ops)
        or query_temperature(q)
    )


def _temperature_op(op: ScoreOp) -> bool:
    """A multiplier that varies (per row, with the lengths) or a map such as tanh."""
    return _is(op, "mul", "aux") or _is(op, "mul", "sym") or _is(op, "map")


def _head_dim_scale(op: ScoreOp) -> bool:
    """A ``mul_sym`` over the head dim only (``D ** -0.5`` under dynamic=True) is the
    ordinary scale, not a temperature."""
    from attnfx.spec import HEAD_DIM

    return _is(op, "mul", "sym") and op.sym.free_symbols == {HEAD_DIM}
