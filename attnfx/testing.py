"""The numerical-equivalence rule, one implementation for the tests, the
fuzzer and the runtime verify pass.

For the same inputs in the working dtype: **gold** is the original computation in
float64, **base** the original computation in the working dtype (the error the user
already lives with), **cand** the rewrite.  ``cand`` passes when

1. shape, dtype and device equal base's, and its stride order too;
2. where gold is NaN / ±inf, cand is of the same class (or exactly base's value); where
   gold is finite, cand is finite unless base overflowed there too;
3. ``max|cand − gold| ≤ R·max|base − gold| + a`` with R = 2 (outputs) or 3 (gradients),
   +1 for transcendental score transforms, and ``a`` the rounding floor of the dtype at
   the magnitude of gold;
4. ``mean|cand − gold| ≤ 1.2·mean|base − gold| + 1e-7 + u/n`` over the n coordinates
   compared, ``u = eps(dtype)·max|gold|`` (skipped when base's error is below 1e-4 of
   mean |gold|).  ``u/n`` is one coordinate rounded the other way: the rule is after a
   systematic drift, and on a tensor of a few elements (a per-row temperature's gradient
   on 2 query rows) one such flip moves the mean by more than 20 % of eager's.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class CloseResult:
    ok: bool
    max_err: float = 0.0
    max_bound: float = 0.0
    mean_err: float = 0.0
    mean_bound: float = 0.0
    max_rel_err: float = 0.0
    message: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _stride_order(t: torch.Tensor) -> list[int]:
    # Dims of size 1 have no meaningful stride; order the others by stride.
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    return sorted(dims, key=lambda d: -t.stride(d))


def _kind_differs(cand: torch.Tensor, base: torch.Tensor) -> str:
    """Why ``cand`` is not the same kind of tensor as ``base`` (shape, dtype, device)."""
    if cand.shape != base.shape:
        return f"shape {tuple(cand.shape)} != {tuple(base.shape)}"
    if cand.dtype != base.dtype:
        return f"dtype {cand.dtype} != {base.dtype}"
    if cand.device != base.device:
        return f"device {cand.device} != {base.device}"
    return ""


def rounding_floor(gold: torch.Tensor, dtype: torch.dtype) -> float:
    """``a = 2·max|((gold + 0.3) − 0.3) − gold|`` evaluated in ``dtype``."""
    g = gold[torch.isfinite(gold)]
    if g.numel() == 0:
        return 0.0
    gd = g.to(dtype)
    return 2.0 * ((gd + 0.3) - 0.3 - gd).abs().max().double().item()


def compare(
    cand: torch.Tensor,
    base: torch.Tensor,
    gold: torch.Tensor,
    *,
    grad: bool = False,
    transcendental: bool = False,
    check_strides: bool = True,
    context: str = "",
) -> CloseResult:
    """Apply the rule; return a CloseResult instead of raising."""

    def fail(msg, **kw):
        return CloseResult(False, message=f"{context}{': ' if context else ''}{msg}", **kw)

    why = _kind_differs(cand, base)
    if why:
        return fail(why)
    if check_strides and _stride_order(cand) != _stride_order(base):
        return fail(f"stride order {cand.stride()} != {base.stride()}")

    c, b, g = cand.double(), base.double().to(cand.device), gold.double().to(cand.device)
    gfin = torch.isfinite(g)
    # Rule 2: non-finite classes.  A coordinate where cand is exactly base is eager's own
    # value: gold's class does not count against it (gold can be NaN where the program
    # reads its dtype, e.g. a ``finfo(dtype).min`` fill that overflows in float64).  A NaN
    # where eager has NaN is eager's value too (NaN != NaN).
    differs = (c != b) & ~(torch.isnan(c) & torch.isnan(b))
    checks = (
        (torch.isnan(g) & ~torch.isnan(c) & differs, "gold is NaN, cand is not"),
        (torch.isinf(g) & (c != g) & differs, "gold is infinite, cand differs"),
        (
            gfin & ~torch.isfinite(c) & torch.isfinite(b),
            "cand is not finite where gold and base are",
        ),
    )
    for bad, what in checks:
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            return fail(
                f"{what} at {idx}: cand={c[idx].item()} base={b[idx].item()} gold={g[idx].item()}"
            )

    # Rules 3 and 4 on the coordinates where all three are finite.
    both = gfin & torch.isfinite(c) & torch.isfinite(b)
    if not bool(both.any()):
        return CloseResult(True)
    ce = (c - g)[both].abs()
    be = (b - g)[both].abs()
    r = (3.0 if grad else 2.0) + (1.0 if transcendental else 0.0)
    a = rounding_floor(g[both], cand.dtype)
    max_err, max_bound = ce.max().item(), r * be.max().item() + a
    gmax = g[both].abs().max().item()
    rel = max_err / gmax if gmax > 0 else max_err
    mean_err, mean_base = ce.mean().item(), be.mean().item()
    flip = torch.finfo(cand.dtype).eps * gmax  # one ulp (at most) at gold's magnitude
    mean_bound = 1.2 * mean_base + 1e-7 + flip / int(both.sum())
    res = CloseResult(True, max_err, max_bound, mean_err, mean_bound, rel)
    if max_err > max_bound:
        flat = (c - g).abs().masked_fill(~both, -1).argmax()
        idx = tuple(int(i) for i in torch.unravel_index(flat, c.shape))
        res.ok = False
        res.message = (
            f"{context}{': ' if context else ''}max rule: |cand-gold| {max_err:.3g} > {r:g}·|base-gold| "
            f"{be.max().item():.3g} + a {a:.3g} (= {max_bound:.3g}); worst at {idx}: cand={c[idx].item():.6g} "
            f"base={b[idx].item():.6g} gold={g[idx].item():.6g}; shape={tuple(c.shape)} strides={cand.stride()}"
        )
        return res
    skip_mean = mean_base < 1e-4 * g[both].abs().mean().item()
    if not skip_mean and mean_err > mean_bound:
        res.ok = False
        res.message = f"{context}{': ' if context else ''}mean rule: mean|cand-gold| {mean_err:.3g} > 1.2·{mean_base:.3g} + 1e-7 + u/n (= {mean_bound:.3g})"
    return res


# Whole-graph bounds (normwise relative, max relative to max|base|) per dtype.  The rule
# above holds each site; downstream of it the model only carries that rounding on, so a
# graph output moves by a few ulps of its dtype.  A changed node outside the sites (a
# dropped in-place op, a perturbed constant) moves it by percents: far outside these.
GRAPH_BOUNDS = {
    torch.float64: (1e-8, 1e-6),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 5e-2),
    torch.bfloat16: (4e-2, 2e-1),
}


def graph_outputs_close(cand, base) -> CloseResult:
    """One output of a rewritten graph against the original graph's, both in the working
    dtype (no gold): integer and bool tensors and Python values exactly; floating tensors
    class for class where non-finite, and within ``GRAPH_BOUNDS`` where finite."""

    def fail(msg):
        return CloseResult(False, message=msg)

    if not isinstance(base, torch.Tensor) or not isinstance(cand, torch.Tensor):
        if isinstance(base, torch.Tensor) or isinstance(cand, torch.Tensor):
            return fail(f"{type(cand).__name__} where the original gives {type(base).__name__}")
        if isinstance(base, float) and isinstance(cand, float):
            same = cand == base or (cand != cand and base != base)
            return CloseResult(True) if same else fail(f"{cand} != {base}")
        return CloseResult(True) if cand == base else fail(f"{cand!r} != {base!r}")
    why = _kind_differs(cand, base)
    if why:
        return fail(why)
    if base.is_complex():
        cand, base = torch.view_as_real(cand), torch.view_as_real(base)
    if not base.is_floating_point():
        if torch.equal(cand, base):
            return CloseResult(True)
        bad = (cand != base).nonzero()[0].tolist()
        return fail(
            f"discrete values differ (first at {bad}): {cand[tuple(bad)]} != {base[tuple(bad)]}"
        )
    c, b = cand.double(), base.double()
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        if not torch.equal(test(c), test(b)):
            bad = (test(c) != test(b)).nonzero()[0].tolist()
            return fail(
                f"{name} pattern differs at {bad}: {c[tuple(bad)].item()} vs {b[tuple(bad)].item()}"
            )
    fin = torch.isfinite(b)
    if not fin.any():
        return CloseResult(True)
    d, bf = (c - b)[fin].abs(), b[fin].abs()
    norm_tol, max_tol = GRAPH_BOUNDS.get(base.dtype, GRAPH_BOUNDS[torch.float32])
    scale = bf.max().item()
    rel_norm = (d.norm() / bf.norm().clamp_min(1e-300)).item()
    rel_max = d.max().item() / max(scale, 1e-300)
    res = CloseResult(True, max_err=d.max().item(), max_rel_err=rel_max)
    if scale == 0.0:
        return (
            res
            if d.max().item() == 0.0
            else fail(f"max |diff| {d.max().item():.3g} where the original is 0")
        )
    if rel_norm > norm_tol or rel_max > max_tol:
        return fail(
            f"relative difference {rel_norm:.3g} (normwise, bound {norm_tol:g}), "
            f"{rel_max:.3g} (max, bound {max_tol:g}) in {base.dtype}"
        )
    return res


def assert_attention_close(
    cand: torch.Tensor,
    base: torch.Tensor,
    gold: torch.Tensor,
    *,
    grad: bool = False,
    transcendental: bool = False,
    check_strides: bool = True,
    context: str = "",
) -> CloseResult:
    """Raise AssertionError (with both errors, R, a, the worst coordinate, shapes and
    strides) unless ``cand`` passes the equivalence rule against ``base`` and ``gold``."""
    res = compare(
        cand,
        base,
        gold,
        grad=grad,
        transcendental=transcendental,
        check_strides=check_strides,
        context=context,
    )
    if not res.ok:
        raise AssertionError(res.message)
    return res


def _prep_inputs(inputs, grad_idx, f64: bool = False) -> list:
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            x = x.detach().double() if f64 and x.is_floating_point() else x.detach().clone()
            if i in grad_idx:
                x.requires_grad_(True)
        out.append(x)
    return out


def assert_rewrites_match_eager(
    model: torch.nn.Module,
    inputs,
    *,
    kind: str = "softmax",
    sites: int = 1,
    grad: bool = False,
    grad_idx=(0, 1, 2),
    params: bool = False,
    transcendental: bool = False,
    options: dict | None = None,
) -> torch.Tensor:
    """Compile ``model`` with attnfx and check that ``sites`` sites of ``kind`` were
    rewritten, none kept, and that the output (and, with ``grad``, the gradients of the
    inputs ``grad_idx`` and — with ``params`` — of every parameter) pass the rule against
    eager: base = ``model`` in its dtype, gold = a float64 copy.  Returns the output.

    Reads ``attnfx.counters``: reset them (``attnfx.reset_counters()``) and Dynamo
    (``torch._dynamo.reset()``) before calling.
    """
    import copy

    from attnfx.report import counters as attnfx_counters

    model = model.eval()
    gold_m = copy.deepcopy(model).double()
    base_m = copy.deepcopy(model)
    gidx = set(grad_idx) if grad else set()
    cm = torch.compile(model, backend="attnfx", options=options)
    c_in, b_in, g_in = (
        _prep_inputs(inputs, gidx),
        _prep_inputs(inputs, gidx),
        _prep_inputs(inputs, gidx, True),
    )
    cand = cm(*c_in)
    counters = dict(attnfx_counters)
    assert attnfx_counters[f"rewritten.{kind}"] == sites, counters
    assert not [k for k in counters if k.startswith("kept.")], counters
    base, gold = base_m(*b_in), gold_m(*g_in)
    kw = {"transcendental": transcendental}
    assert_attention_close(cand, base, gold, context="output", **kw)
    if grad:
        cot = torch.randn(cand.shape, generator=torch.Generator().manual_seed(7))
        cot = cot.to(device=cand.device, dtype=cand.dtype)
        cand.backward(cot)
        base.backward(cot)
        gold.backward(cot.double())
        for i in sorted(gidx):
            assert c_in[i].grad is not None, f"no gradient for input {i}"
            assert_attention_close(
                c_in[i].grad, b_in[i].grad, g_in[i].grad, grad=True, context=f"grad {i}", **kw
            )
        if params:
            named = zip(
                model.named_parameters(), base_m.parameters(), gold_m.parameters(), strict=True
            )
            for (name, pc), pb, pg in named:
                assert pc.grad is not None, f"no gradient for parameter {name}"
                assert_attention_close(
                    pc.grad, pb.grad, pg.grad, grad=True, context=f"grad {name}", **kw
                )
    return cand
