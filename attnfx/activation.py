"""The activations: what turns a row of final scores into probabilities.

One object per ``AttentionSpec.activation``, holding everything that differs between
them: the torch reference (probabilities and log-sum-exp, dS from dP), the fill values
block skipping may treat as never kept, and the kernels' pieces — the running row state
of the forward and its initial value, the per-key-block update, the epilogue, the
backward's row statistic and its probabilities, and dS.  Adding an activation adds an
object here and its tests.

The Triton pieces are lists of lines over the kernels' names: ``s`` (a tile of final
scores), ``acc`` (the output accumulator), ``v`` (a value block), ``m_i`` / ``l_i`` (the
running row state), ``m_row`` / ``lg_row`` / ``delta`` (the backward's row statistics).
``log2``: the scores are carried in log2 units (exp2 with log2(e) folded into the score
program).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG2E = "1.4426950408889634"


def _zero_empty_rows(p: Tensor, full: Tensor) -> Tensor:
    """A row whose scores are all -inf yields 0 (SDPA's semantics for ``fully_masked=
    "zero"``), decided on the final scores."""
    alive = (full != float("-inf")).any(-1, keepdim=True)
    return torch.where(alive, p, torch.zeros_like(p))


class Activation:
    name: str
    # rows share a normalizer (a log-sum-exp): a sink can join it, a row can be left
    # with nothing to normalize, and the backward needs rowsum(dO ⊙ O)
    normalized: bool
    # the reference's elementwise function is transcendental beyond exp (verification's
    # tolerance)
    transcendental: bool
    # PyTorch's scaled_dot_product_attention computes it (the CPU fast path)
    sdpa: bool = False
    helpers: tuple[str, ...] = ()  # Triton helpers its lines call
    state: tuple[str, ...] = ()  # the forward's running row state besides ``acc``
    # the backward's row statistic for a row past the end of the queries
    m_other: str = "0.0"

    # -- torch -------------------------------------------------------------------------
    def probabilities(self, s: Tensor, sink: Tensor | None, zero: bool) -> tuple[Tensor, Tensor]:
        """(p, lse) of final scores ``s``; ``sink``: a (…, 1) logit joining the normalizer
        (None: none); ``zero``: rows whose scores are all -inf yield 0."""
        raise NotImplementedError

    def ds(self, p: Tensor, dp: Tensor) -> Tensor:
        """dL/d(scores) from the probabilities and dL/dp."""
        raise NotImplementedError

    def ds_(self, p: Tensor, dp: Tensor) -> Tensor:
        """``ds`` computed in the storage of ``dp`` (``p`` may be overwritten too)."""
        raise NotImplementedError

    def skip_fill(self, value: float) -> tuple[bool, bool]:
        """Whether pairs filled with ``value`` contribute exactly nothing, so that block
        skipping may leave them out; and whether that holds only while every row keeps a
        key."""
        raise NotImplementedError

    # -- Triton ------------------------------------------------------------------------
    def init_lines(self, m: str, lsum: str, sink: str | None, log2: bool) -> list[str]:
        """The running state's initial value (``sink``: the load of the sink's logits)."""
        return []

    def update_lines(
        self, log2: bool, prec: str, tail: str, scale: float | None = None
    ) -> list[str]:
        """One key block: probabilities ``p`` of the tile ``s`` and the state's update
        (``tail``: the keys that exist, for tiles past the end; ``scale``: a positive
        multiplier the scores still lack, ``Plan.scale_in_exp``)."""
        raise NotImplementedError

    def epilogue_lines(self, log2: bool, zero: bool, lse64: bool = False) -> list[str]:
        """``out`` and ``lse`` from the final state (``lse64``: lse summed in float64,
        stored as a float32 pair: ``Plan.lse64``)."""
        raise NotImplementedError

    def preprocess_lines(self, o: str, do: str, log2: bool, lse64: bool = False) -> list[str]:
        """The backward's row statistics ``delta`` and ``m_row`` (``o`` / ``do``: loads
        of the output and of its gradient); with ``lse64`` also ``lg_row``, the rest of
        the (value, remainder) lse pair past ``m_row``."""
        raise NotImplementedError

    def zero_rows_lines(self) -> list[str]:
        """Preprocess, ``fully_masked="zero"``: rows whose output was 0 get p = 0."""
        return []

    def p_lines(self, p: str, s: str, bc: str, log2: bool, row_norm: bool) -> list[str]:
        """The backward's probabilities ``p`` of the tile ``s`` (``bc``: how a row vector
        broadcasts over the tile)."""
        raise NotImplementedError

    def ds_expr(self, p: str, dp: str, f: str, bc: str) -> str:
        """dS of a tile from ``p``, ``dp`` and the score program's derivative ``f``."""
        raise NotImplementedError


class Softmax(Activation):
    name, normalized, transcendental, sdpa = "softmax", True, False, True
    state = ("l_i", "m_i")
    m_other = 'float("inf")'

    def probabilities(self, s, sink, zero):
        full = s if sink is None else torch.cat([s, sink], dim=-1)
        p = torch.softmax(full, dim=-1)
        if zero:
            p = _zero_empty_rows(p, full)
        return p[..., : s.shape[-1]], torch.logsumexp(full, dim=-1)

    def ds(self, p, dp):
        return p * (dp - (p * dp).sum(-1, keepdim=True))

    def ds_(self, p, dp):  # p ⊙ (dp − rowsum(p ⊙ dp))
        return dp.sub_((p * dp).sum(-1, keepdim=True)).mul_(p)

    # A finite fill value at or below this makes exp(fill - max) underflow to exactly 0
    # in float32 as long as the row keeps one key (scores are far above it).
    SKIP_FINITE_FILL = -1e20

    def skip_fill(self, value):
        if value == -math.inf:
            return True, False
        return math.isfinite(value) and value <= self.SKIP_FINITE_FILL, True

    def init_lines(self, m, lsum, sink, log2):
        # (-inf, 0), or with a sink its logit and exp(sink - sink) = 1: one more term of
        # the normalizer (a sink of -inf is no term: sum 0)
        if sink is None:
            return [
                f'{m} = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max',
                f"{lsum} = tl.full([BLOCK_M], 0, dtype=tl.float32)  # running row sum",
            ]
        unit = f" * {_LOG2E}" if log2 else ""
        return [
            "# -- the sink's logit starts the online softmax (one extra term per row)",
            f"{m} = {sink}.to(tl.float32){unit}",
            f'{lsum} = tl.where({m} == float("-inf"), 0.0, 1.0)',
        ]

    def update_lines(self, log2, prec, tail, scale=None):
        step = (
            f"m_ij, p, alpha = _online_softmax(m_i, s, {log2})"
            if scale is None
            else f"m_ij, p, alpha = _online_softmax_scaled(m_i, s, {scale!r})  # the scale, here"
        )
        return [
            "if APPLY_MASK:  # keys past the end do not exist",
            f'    s = tl.where({tail}, s, float("-inf"))',
            "# -- online softmax: the new row max, this block's probabilities and alpha, the",
            "#    factor that rescales the running sum and accumulator to the new max",
            step,
            "l_i = l_i * alpha + _row_sum(p)",
            "acc = acc * alpha[:, None]",
            f"acc = tl.dot(p.to(v.dtype), v, acc{prec})",
            "m_i = m_ij",
        ]

    def epilogue_lines(self, log2, zero, lse64=False):
        lse = (
            "lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log"
            if log2
            else "lse = m_i + tl.log(l_i)"
        )
        if lse64:  # summed in float64, stored as a float32 pair (layout.split_lse)
            lse = (
                "lse = (m_i.to(tl.float64) + tl.log2(l_i).to(tl.float64)) * 0.6931471805599453"
                "  # float64, natural log"
                if log2
                else "lse = m_i.to(tl.float64) + tl.log(l_i).to(tl.float64)  # float64"
            )
        lines = [
            "# -- epilogue: normalize; a row whose scores are all -inf gives 0 / 0 = NaN,",
            "#    as eager softmax does (fully_masked='preserve')",
            "out = acc / l_i[:, None]",
            lse,
        ]
        if zero:
            # SDPA's semantics: a row whose scores are all -inf (every key filled or
            # biased to -inf) gives 0; its running max is still -inf and its sum exactly
            # 0 here.  A row of NaN scores has m_i = -inf too (the row max ignores NaN:
            # max.f32 on the GPU, nanmax in the interpreter) but a NaN sum: it stays NaN,
            # as SDPA's is
            lines.append(
                'out = tl.where((m_i[:, None] == float("-inf")) & (l_i[:, None] == 0.0), 0.0, out)'
                "  # all -inf rows -> 0"
            )
        return lines

    def preprocess_lines(self, o, do, log2, lse64=False):
        lines = [
            "# -- delta = rowsum(dO * O) (float32)",
            f"o = {o}",
            f"do = {do}",
            "delta = _row_sum(o.to(tl.float32) * do.to(tl.float32))",
        ]
        if not lse64:
            return lines + [
                "lse = tl.load(Lse + row_off + offs_m, mask=offs_m < N_Q, other=0.0)",
                f"m_row = lse * {_LOG2E}  # log2 units, like the forward scores"
                if log2
                else "m_row = lse",
            ]
        return lines + [
            "# -- lse as a (value, remainder) pair (layout.split_lse), summed in float64 and",
            "#    split again into a float32 statistic and a small rest: s - m_row is exact",
            "#    near the row max (p = exp(s - m_row - lg_row))",
            "lse = tl.load(Lse + (row_off + offs_m) * 2, mask=offs_m < N_Q, other=0.0)",
            "lse_lo = tl.load(Lse + (row_off + offs_m) * 2 + 1, mask=offs_m < N_Q, other=0.0)",
            "m64 = lse.to(tl.float64) + lse_lo.to(tl.float64)",
            f"m64 = m64 * {_LOG2E}  # log2 units, like the forward scores" if log2 else "m64 = m64",
            "m_row = m64.to(tl.float32)",
            'finite = (m_row == m_row) & (tl.abs(m_row) < float("inf"))',
            "lg_row = tl.where(finite, (m64 - m_row.to(tl.float64)).to(tl.float32), 0.0)",
        ]

    def zero_rows_lines(self):
        return [
            "# -- fully_masked='zero': a row whose scores are all -inf (lse = -inf) gets",
            "#    m_row = +inf, so that p = exp2(s - inf) = 0 in the backward, as its output was 0",
            'm_row = tl.where(m_row == float("-inf"), float("inf"), m_row)',
        ]

    def p_lines(self, p, s, bc, log2, row_norm):
        # p = exp(s - lse), from the row statistic m_row (lse, in the scores' units) and,
        # with ``row_norm``, lg_row (0, or log l of a row whose huge lse lost it)
        arg = f"{s} - m_row{bc}"
        if row_norm:
            arg = f"({arg}) - lg_row{bc}"
        if not log2:
            arg = f"({arg}) * {_LOG2E}"
        return [f"{p} = tl.exp2({arg})"]

    def ds_expr(self, p, dp, f, bc):
        return f"{p} * ({dp} - delta{bc}) * {f}"


class Sigmoid(Activation):
    name, normalized, transcendental = "sigmoid", False, True
    helpers = ("_tanh", "_sigmoid")  # sigmoid through one tanh

    def probabilities(self, s, sink, zero):
        p = torch.sigmoid(s)
        if zero:
            p = _zero_empty_rows(p, s)
        return p, torch.zeros(s.shape[:-1], dtype=s.dtype, device=s.device)

    def ds(self, p, dp):
        return p * (1 - p) * dp

    def ds_(self, p, dp):  # p ⊙ (1 − p) ⊙ dp
        return dp.mul_(p).mul_(p.neg_().add_(1))

    # sigmoid(x) is exactly 0.0 in float32 (reference and tanh form) at or below this
    SKIP_FILL = -1e4

    def skip_fill(self, value):
        return value <= self.SKIP_FILL, False

    def update_lines(self, log2, prec, tail, scale=None):
        return [
            "# -- sigmoid: no row max, no normalizer, no rescale",
            "p = _sigmoid(s, TANH_IMPL)",
            "if APPLY_MASK:  # keys past the end do not exist",
            f"    p = tl.where({tail}, p, 0.0)",
            f"acc = tl.dot(p.to(v.dtype), v, acc{prec})",
        ]

    def epilogue_lines(self, log2, zero, lse64=False):
        # (a row of -inf scores gives sigmoid 0 anyway)
        return [
            "out = acc",
            "lse = tl.full([BLOCK_M], 0, dtype=tl.float32)  # sigmoid: no normalizer",
        ]

    def preprocess_lines(self, o, do, log2, lse64=False):
        return [
            "delta = tl.full([BLOCK_M], 0, dtype=tl.float32)  # sigmoid: no delta",
            "m_row = tl.full([BLOCK_M], 0, dtype=tl.float32)  # sigmoid: 0 marks a live row",
        ]

    def p_lines(self, p, s, bc, log2, row_norm):
        return [f"{p} = _sigmoid({s}, TANH_IMPL)"]

    def ds_expr(self, p, dp, f, bc):
        return f"{p} * (1.0 - {p}) * {dp} * {f}"


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (Softmax(), Sigmoid())}
