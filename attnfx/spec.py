"""``AttentionSpec``: the one IR between the passes and codegen.

A spec says *what* an attention site computes, never how.  The computation it
describes, for query ``q`` (B, Hq, NQ, D), key ``k`` (B, Hk, NK, D) and value ``v``
(B, Hk, NK, Dv) with ``Hq = group * Hk``::

    s   = q @ kᵀ                         (float32)
    s   = op_n(... op_1(s))              the score program, ``score_ops`` in order
    p   = activation(s)                  softmax over keys, or sigmoid
                                         (with a sink: softmax(cat(s, sink))[..., :NK])
    out = (p @ v).to(out_dtype)

Each score op reads, at most, one *aux* tensor: an extra operand of the custom op,
already broadcast (by stride-0 views, never copies) to (B, Hq, NQ, NK) — a sink's to
(B, Hq, NQ, 1), a table's (``add_table_aux``) to (B, Hq, 1, T).  Sizes are not
part of the spec: one spec, and one compiled kernel, serves every sequence length.

The spec is frozen and hashable, and serializes to a plain string (``key``) that is
passed to the custom op, so the op needs no side registry to find its kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import sympy

from attnfx.activation import ACTIVATIONS, Activation
from attnfx.predicate import MaskClass, MaskPredicate
from attnfx.score_ops import TABLE, ScoreOpKind

SCORE_OPS = tuple(TABLE)  # the score-op table's entries, by name (attnfx.score_ops)
DTYPES = ("float16", "bfloat16", "float32", "float64")
AUX_DTYPES = DTYPES + ("bool", "int32", "int64", "uint8")
AUX_BROADCASTS = ("full", "row", "col", "one")  # AttentionSpec.aux_bcast


# The head dim as a symbol.  Under ``torch.compile(dynamic=True)`` the head dim is a
# symbol like the lengths: the spec says ``head_dim=None`` and writes a scale computed from
# it (``D ** -0.5``, SDPA's default) as a ``mul_sym`` over ``HEAD_DIM``; the op resolves
# both from q and v when it runs (``AttentionSpec.resolved``), so kernels stay per head dim.
HEAD_DIM = sympy.Symbol("D", integer=True, positive=True)


@functools.cache
def _parse_expr(key: str):
    import sympy

    from attnfx.predicate import _rebind

    return _rebind(sympy.sympify(key))


@dataclasses.dataclass(frozen=True)
class ScoreOp:
    """One elementwise step of the score program, applied to the float32 scores ``s``.

    ============  ==========================================================
    ``mul``       ``s * value``            (a constant: the softmax scale)
    ``add``       ``s + value``
    ``mul_aux``   ``s * aux[i]``           (a tensor constant along keys, e.g. a per-query scale)
    ``add_aux``   ``s + aux[i]``           (additive bias or float mask)
    ``fill_aux``  ``where(aux[i] == fill_where, value, s)``   (``masked_fill`` / ``where``)
    ``fill_pred`` ``where(pred(q_idx, kv_idx), s, value)``    (an index predicate; True keeps)
    ``tanh``      ``tanh(s)``              (soft-capping is ``mul 1/c, tanh, mul c``)
    ``add_sym``   ``s + expr(NQ, NK)``     (a scalar that depends on the lengths: ``-log(NK)``)
    ``mul_sym``   ``s * expr(NQ, NK)``     (e.g. a ``log(NK)`` scaling)
    ``add_pos_aux`` ``s + aux[i] * expr(Q, K, NQ, NK)``  (a position bias: ALiBi's
                  per-head slope times ``K − Q``; no N×N tensor)
    ``add_table_aux`` ``s + aux[i][expr(Q, K, NQ, NK)]``  (a bias table read at an index
                  expression: NAT's relative position bias; no N×N tensor)
    ============  ==========================================================
    """

    op: str
    value: float | None = None
    aux: int | None = None
    pred: str | None = None  # MaskPredicate key (sympy srepr), for fill_pred
    fill_where: bool = True
    expr: str | None = None  # sympy srepr over NQ, NK, for add_sym / mul_sym

    def __post_init__(self):
        if self.op not in TABLE:
            raise ValueError(f"unknown score op {self.op!r}")
        for name in self.entry.needs:
            if getattr(self, name) is None:
                raise ValueError(f"{self.op} needs {_OPERAND_NAMES[name]}")

    @property
    def entry(self) -> ScoreOpKind:
        """The op's entry in the score-op table."""
        return TABLE[self.op]

    @property
    def sym(self):
        """The sympy expression of an ``add_sym`` / ``mul_sym`` op."""
        return _parse_expr(self.expr) if self.expr is not None else None

    def value_at(self, nq: int, nk: int) -> float:
        from attnfx.predicate import NK, NQ

        return float(self.sym.subs({NQ: nq, NK: nk}))

    @property
    def predicate(self) -> MaskPredicate | None:
        return MaskPredicate.from_key(self.pred) if self.pred is not None else None

    def describe(self) -> str:
        return self.entry.describe(self)


_OPERAND_NAMES = {"aux": "an aux index", "pred": "a predicate", "expr": "an expression"}

# Position relations a routed fill compares: ``pos_q REL pos_k`` (True: filled).
ROUTED_RELATIONS = ("lt", "le", "eq", "ne", "ge", "gt")


@dataclasses.dataclass(frozen=True)
class Routing:
    """Routed sparse attention (Routing Transformer; ``attnfx.nn.RoutedAttention``).

    The op's aux tensors 0 and 1 are int64 token indices of q's and k's (and v's) rows,
    ``qi`` (B, Hq, S) and ``ki`` (B, Hk, Sk) — each may carry a trailing stride-0 dim, as
    a ``gather`` index does — in slot order: cluster ``c``'s query slot ``i`` is
    ``qi[..., c·window + i]``, its key slot ``j`` is ``ki[..., c·key_window + j]``, so
    C = S / window clusters.  Per cluster::

        s = (q[qi_c] @ k[ki_c]ᵀ)  then the score program (``score_ops``: the scale)
        s = where(qi_c[:, None] REL ki_c[None, :], value, s)   for each fill, in order
        o_c = softmax(s) @ v[ki_c]                              (rows as eager: -inf rows NaN)
        out[t] = Σ_{slots of t} o_c / den(count_t)              out of an unchosen token: 0

    with ``den = count + eps``, or ``max(count, 1)`` when ``eps`` is None; ``out`` is
    (B, Hq, N, Dv) with N = q's length.  ``window`` and ``key_window`` are the program's
    top-w constants (sizes of the clusters, not of the sequence).
    """

    window: int
    key_window: int
    fills: tuple[tuple[str, float], ...] = ()  # (relation, value), applied in order
    eps: float | None = None

    def __post_init__(self):
        if self.window < 1 or self.key_window < 1:
            raise ValueError("cluster windows must be >= 1")
        for rel, _ in self.fills:
            if rel not in ROUTED_RELATIONS:
                raise ValueError(f"unknown routed relation {rel!r}")

    def describe(self) -> str:
        fills = ",".join(f"q{r}k:{v:g}" for r, v in self.fills)
        den = "max(n,1)" if self.eps is None else f"n+{self.eps:g}"
        return f"routed(w={self.window}/{self.key_window} fills=[{fills}] mean/{den})"


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    kind: str = (
        "softmax"  # the report's kind: softmax | sigmoid | neighborhood | routed | temperature
    )
    activation: str = "softmax"  # softmax | sigmoid
    score_ops: tuple[ScoreOp, ...] = ()
    aux_dtypes: tuple[str, ...] = ()  # dtype of each aux tensor, by index
    head_dim: int | None = 64  # D of q and k; None: symbolic, read from q when the op runs
    head_dim_v: int | None = 64  # D of v and of the output; None: symbolic
    gqa_group: int = 1  # Hq // Hk: query heads per key/value head
    dtype: str = "float16"  # dtype of q, k and v
    out_dtype: str = "float16"
    # What a query row with no kept key yields: "preserve" computes what the eager
    # score program computes (NaN after a -inf fill, a uniform average after a finite
    # one); "zero": a row whose final scores are all -inf (filled, or biased to -inf by an
    # additive mask) returns zeros, as SDPA does (its math path's safe softmax) — decided
    # on the scores, so it holds for every mask the op is given.
    fully_masked: str = "preserve"
    # Memory order of the output: "bhnd" (contiguous, as ``p @ v`` returns it) or "bnhd"
    # (heads inside tokens, as SDPA returns it on most backends, so that the usual
    # ``.transpose(1, 2).reshape(B, N, H·Dv)`` stays a view).
    out_layout: str = "bhnd"
    # A learned attention sink (gpt-oss; Xiao et al. 2023, "Efficient Streaming Language
    # Models with Attention Sinks"): the index of an aux tensor, broadcast to
    # (B, Hq, NQ, 1), holding one extra logit per query row (in the final scores' units)
    # that joins the softmax normalizer and is then dropped:
    # ``p = softmax(cat(s, sink))[..., :NK]``.  None: no sink.
    sink: int | None = None
    # How each aux tensor varies over the score tile, by index; empty: every one "full".
    # "full": (B, H, NQ, NK); "row": constant along keys (a per-query temperature);
    # "col": constant along queries (a key-padding mask); "one": one value per (batch,
    # head).  The launcher sets it from the tensors' strides when the kernels run
    # (``attnfx.codegen.launch.with_aux_broadcast``): a "row" operand is then read once
    # per query row, not once per score.  The passes and the CPU path leave it empty.
    aux_bcast: tuple[str, ...] = ()
    # Routed sparse attention (``Routing``): attention inside clusters of rows gathered
    # through index tensors (aux 0 and 1), outputs averaged back onto the tokens; the
    # kind ``routed``.  None: dense attention over all keys.
    routing: Routing | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")
        for d in (self.dtype, self.out_dtype):
            if d not in DTYPES:
                raise ValueError(f"unsupported dtype {d!r}")
        for d in self.aux_dtypes:
            if d not in AUX_DTYPES:
                raise ValueError(f"unsupported aux dtype {d!r}")
        for op in self.score_ops:
            if op.aux is not None and not 0 <= op.aux < len(self.aux_dtypes):
                raise ValueError(f"score op {op} reads a missing aux tensor")
        if self.fully_masked not in ("preserve", "zero"):
            raise ValueError(
                f"fully_masked must be 'preserve' or 'zero', not {self.fully_masked!r}"
            )
        if self.out_layout not in ("bhnd", "bnhd"):
            raise ValueError(f"out_layout must be 'bhnd' or 'bnhd', not {self.out_layout!r}")
        if self.aux_bcast and len(self.aux_bcast) != len(self.aux_dtypes):
            raise ValueError("aux_bcast names one pattern per aux tensor, or none")
        for b in self.aux_bcast:
            if b not in AUX_BROADCASTS:
                raise ValueError(f"unknown aux broadcast {b!r}; known: {AUX_BROADCASTS}")
        if self.gqa_group < 1:
            raise ValueError("gqa_group must be >= 1")
        if self.sink is not None:
            if not self.act.normalized:
                raise ValueError("an attention sink joins a softmax normalizer: softmax only")
            if not 0 <= self.sink < len(self.aux_dtypes):
                raise ValueError(f"sink reads a missing aux tensor {self.sink}")
            if any(op.aux == self.sink for op in self.score_ops):
                raise ValueError("the sink's aux tensor is not a score operand")
        for i in self.table_aux:
            if any(op.aux == i and op.entry.operand != "table" for op in self.score_ops):
                raise ValueError(f"aux tensor {i} is a table: only table ops read it")
            if self.aux_dtypes[i] not in DTYPES:
                raise ValueError(f"the table aux{i} must be floating point")
        if self.routing is not None:
            if isinstance(self.routing, dict):  # from ``from_key``
                r = dict(self.routing)
                r["fills"] = tuple((rel, float(v)) for rel, v in r["fills"])
                object.__setattr__(self, "routing", Routing(**r))
            if self.activation != "softmax" or self.sink is not None:
                raise ValueError("routed attention is a softmax without a sink")
            if self.aux_dtypes[:2] != ("int64", "int64"):
                raise ValueError("routed attention reads its indices from aux tensors 0 and 1")
            if any(op.aux is not None for op in self.score_ops):
                raise ValueError("routed attention takes no aux score operand")

    @functools.cached_property
    def table_aux(self) -> frozenset[int]:
        """The aux tensors read as tables (``add_table_aux``): (B, Hq, 1, T), never sliced
        by query rows or keys."""
        return frozenset(op.aux for op in self.score_ops if op.entry.operand == "table")

    def aux_broadcast(self, i: int) -> str:
        """How aux tensor ``i`` varies over the score tile (``aux_bcast``)."""
        return self.aux_bcast[i] if self.aux_bcast else "full"

    @property
    def act(self) -> Activation:
        """The activation's object (``attnfx.activation``)."""
        return ACTIVATIONS[self.activation]

    # -- serialization -----------------------------------------------------------------
    @functools.cached_property
    def key(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @functools.cached_property
    def kernel_key(self) -> str:
        """``key`` without the report's ``kind``: what the computation is.  Kernels (their
        source, loaded modules and tuned configs) are keyed by it, so that sites of two
        kinds with the same math share one compiled and tuned kernel."""
        d = dataclasses.asdict(self)
        del d["kind"]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def from_key(key: str) -> AttentionSpec:
        d = json.loads(key)
        d["score_ops"] = tuple(ScoreOp(**o) for o in d["score_ops"])
        d["aux_dtypes"] = tuple(d["aux_dtypes"])
        d["aux_bcast"] = tuple(d.get("aux_bcast", ()))
        return AttentionSpec(**d)

    # -- a symbolic head dim ------------------------------------------------------------
    @functools.cached_property
    def symbolic_head_dim(self) -> bool:
        """Whether the head dims or a score scalar are left to be read from the operands."""
        return (
            self.head_dim is None
            or self.head_dim_v is None
            or any(op.expr is not None and HEAD_DIM in op.sym.free_symbols for op in self.score_ops)
        )

    def resolved(self, head_dim: int, head_dim_v: int) -> AttentionSpec:
        """This spec at q's and v's head dims: the dims filled in and ``HEAD_DIM``
        substituted in the score program; a scalar left free of symbols becomes a constant
        ``mul`` / ``add``, so kernels and the CPU fast path see a plain scale.  A concrete
        spec is returned as it is."""
        if not self.symbolic_head_dim:
            return self
        return _resolve(self.key, int(head_dim), int(head_dim_v))

    # -- summaries for the report and for codegen --------------------------------------
    @property
    def scale(self) -> float:
        """Product of the constant multipliers of the score program."""
        return math.prod(
            op.value
            for op in self.score_ops
            if op.entry.form == "mul" and op.entry.operand == "const"
        )

    @property
    def predicates(self) -> tuple[MaskPredicate, ...]:
        return tuple(op.predicate for op in self.score_ops if op.entry.operand == "pred")

    @property
    def mask_class(self) -> MaskClass:
        """The mask as the report shows it: none, causal, window, predicate or tensor."""
        if self.routing is not None:  # fills on the members' positions, inside clusters
            causal = ("lt", -math.inf) in self.routing.fills
            return MaskClass("routed causal" if causal else "routed")
        has_tensor = any(op.entry.tensor_mask for op in self.score_ops)
        preds = self.predicates
        if len(preds) == 1 and not has_tensor:
            return preds[0].mask_class
        if not preds and not has_tensor:
            return MaskClass("none")
        if not preds:
            return MaskClass("tensor")
        return MaskClass("predicate+tensor" if has_tensor else "predicate")

    def describe(self) -> str:
        ops = " ".join(op.describe() for op in self.score_ops) or "-"
        gqa = f" gqa={self.gqa_group}" if self.gqa_group > 1 else ""
        gqa += f" sink=aux{self.sink}" if self.sink is not None else ""
        gqa += f" {self.routing.describe()}" if self.routing is not None else ""
        return (
            f"{self.activation} D={self.head_dim if self.head_dim is not None else 'sym'}"
            + (f"/{self.head_dim_v}" if self.head_dim_v != self.head_dim else "")
            + f" {self.dtype}{gqa} mask={self.mask_class.describe()} scores: {ops}"
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scale"] = self.scale
        d["mask"] = self.mask_class.describe()
        return d


@functools.lru_cache(maxsize=1024)
def _resolve(key: str, d: int, dv: int) -> AttentionSpec:
    spec = AttentionSpec.from_key(key)
    ops = []
    for op in spec.score_ops:
        if op.expr is not None and HEAD_DIM in op.sym.free_symbols:
            e = op.sym.xreplace({HEAD_DIM: sympy.Integer(d)})
            if op.entry.constant_form is not None and not e.free_symbols:
                op = ScoreOp(op.entry.constant_form, value=float(e))
            else:
                op = dataclasses.replace(op, expr=sympy.srepr(e))
        ops.append(op)
    return dataclasses.replace(
        spec,
        score_ops=tuple(ops),
        head_dim=d if spec.head_dim is None else spec.head_dim,
        head_dim_v=dv if spec.head_dim_v is None else spec.head_dim_v,
    )
