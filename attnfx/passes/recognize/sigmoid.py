"""Sigmoid attention (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for
Sigmoid Self-Attention"; the FlashSigmoid kernel): ``σ(s·q·kᵀ + b) · v``, with the
bias ``b = −log n`` the paper recommends.

Spellings of σ: ``torch.sigmoid``, ``F.sigmoid``, ``Tensor.sigmoid``,
``torch.special.expit``, ``F.logsigmoid(x).exp()``, ``1 / (1 + torch.exp(-x))``.

Edge semantics: there is no normalization, so a fully masked row (every score ``-inf``)
yields exactly 0, and a row masked with a finite ``finfo.min`` yields
``σ(finfo.min) ≈ 0``; a bias computed from the sequence length (``-math.log(n)``,
``-torch.log(torch.tensor(n))``) stays symbolic in n in the spec, so dynamic shapes
keep the right bias at every length.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from attnfx.passes import graph as G
from attnfx.passes.match import NoMatch, walk_probs, walk_scores
from attnfx.passes.recognize.softmax import build_site

KIND = "sigmoid"


def _is(node, fns=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in fns:
        return True
    return node.op == "call_method" and node.target in methods


def _single_use(node) -> bool:
    return isinstance(node, fx.Node) and len(G.live_users(node)) == 1


def sigmoid_input(node: fx.Node) -> fx.Node | None:
    """The argument x when ``node`` computes σ(x) in one of the spellings, else None."""
    if _is(node, (torch.sigmoid, F.sigmoid, torch.special.expit), ("sigmoid",)):
        return node.args[0]
    # logsigmoid(x).exp()
    if _is(node, (torch.exp,), ("exp",)):
        inner = node.args[0]
        if _is(inner, (F.logsigmoid, torch._C._nn.log_sigmoid)) and _single_use(inner):
            return inner.args[0]
        return None
    # 1 / (1 + exp(-x))  or  reciprocal(1 + exp(-x))
    den = None
    if _is(node, (operator.truediv,)) and G.constant_value(node.args[0]) == 1.0:
        den = node.args[1]
    elif _is(node, (torch.reciprocal,), ("reciprocal",)):
        den = node.args[0]
    if den is None or not _is(den, (operator.add,)) or not _single_use(den):
        return None
    a, b = den.args
    e = b if G.constant_value(a) == 1.0 else a if G.constant_value(b) == 1.0 else None
    if not _is(e, (torch.exp,), ("exp",)) or not _single_use(e):
        return None
    neg = e.args[0]
    if _is(neg, (operator.neg, torch.neg), ("neg",)) and _single_use(neg):
        return neg.args[0]
    return None


def is_anchor(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and sigmoid_input(node) is not None


def anchors(node: fx.Node) -> list:
    """The match functions for ``node`` (see ``attnfx.passes.recognize``)."""
    return [match] if is_anchor(node) else []


def match(node: fx.Node):
    x = sigmoid_input(node)
    shp = G.shape(x)
    if shp is None or len(shp) not in (3, 4):
        raise NoMatch("scores are not 3-D or 4-D")
    chain = walk_scores(x, shp)
    pv, _ = walk_probs(node)
    return build_site(node, pv, chain, kind=KIND, activation="sigmoid")
