"""Scalars built from constants and sequence lengths, read back as sympy in NQ / NK."""

import math

import sympy
import torch

from attnfx.passes.scalars import as_float, scalar_expr
from attnfx.predicate import NK, NQ


def _graph(fn, *inputs, dynamic=False):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=dynamic)(*inputs)
    return graphs[0]


def _bias_node(gm):
    """The second operand of the final subtraction/addition."""
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    node = out.args[0][0]
    return node, node.args[1]


def _scores_shape(node):
    return tuple(node.meta["example_value"].shape)


def test_log_of_the_key_length_stays_symbolic():
    def fn(q, k):
        s = q @ k.transpose(-2, -1)
        return s - torch.log(torch.tensor(k.shape[-2], dtype=torch.float32))

    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 10, 8)
    gm = _graph(fn, q, k, dynamic=True)
    node, other = _bias_node(gm)
    shp = _scores_shape(node)
    e = scalar_expr(other, shp[-2], shp[-1])
    assert e is not None and e.free_symbols <= {NQ, NK}
    assert sympy.simplify(e - sympy.log(NK)) == 0


def test_static_length_folds_to_a_number():
    def fn(q, k):
        return q @ k.transpose(-2, -1) - math.log(k.shape[-2])

    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 10, 8)
    gm = _graph(fn, q, k)
    node, other = _bias_node(gm)
    shp = _scores_shape(node)
    assert as_float(scalar_expr(other, shp[-2], shp[-1])) == math.log(10)


def test_low_precision_constant_holds_its_rounded_value():
    def fn(q, k):
        return q @ k.transpose(-2, -1) + torch.full([], 0.1, dtype=torch.float16)

    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    gm = _graph(fn, q, k)
    node, other = _bias_node(gm)
    shp = _scores_shape(node)
    assert (
        as_float(scalar_expr(other, shp[-2], shp[-1]))
        == torch.tensor(0.1, dtype=torch.float16).item()
    )


def test_tensor_contents_are_not_a_scalar_expression():
    def fn(q, k, t):
        return q @ k.transpose(-2, -1) + t.sum()

    q, k, t = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(3)
    gm = _graph(fn, q, k, t)
    node, other = _bias_node(gm)
    shp = _scores_shape(node)
    assert scalar_expr(other, shp[-2], shp[-1]) is None
