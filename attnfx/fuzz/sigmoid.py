"""The sigmoid-attention site grammar (``σ(s·q·kᵀ + b)·v``, issue 3), with its near-misses.

It reuses the softmax grammar's program frame (projections, head split, GQA, merge,
stacked layers, inputs and lanes: ``softmax.Frame``) with its own score body.  Choices
(values simplest first, as the shrinker tries them):

    near_miss   none | after_pv (σ applied to ``s @ v``, not to the scores)
                | second_user (σ(s) also returned) | tanh (``torch.tanh`` instead of σ:
                not attention, nothing may be rewritten)
    sigmoid     torch | F | method | logsigmoid_exp | recip_exp   (``1 / (1 + torch.exp(-x))``)
    bias        none | float | buffer0d | neg_math_log (``-math.log(n)``)
                | neg_torch_log (``-torch.log(torch.tensor(n, dtype=torch.float32))``)
    scale       none | div_sqrt | mul_pow | prescale_q | qk_quarter
    mask        none | fill_not_neginf (``masked_fill(~mask, -inf)``) | causal_arange
                | causal_tril | alibi (an additive ALiBi-style bias input)
    gqa         none | expand (repeat_kv) | interleave
    dropout     none | module | functional          (the model runs in eval)
    proj, cross, heads, kt, mm, pv, merge, out_proj, layers, dynamic, grads, shapes and
    values as in the softmax grammar.

Every sigmoid program is compared under the transcendental rule (the equivalence rule: +1).
"""

from __future__ import annotations

from hypothesis import strategies as st

from attnfx.fuzz import softmax as sm
from attnfx.fuzz.frame import Frame, Program, SiteGrammar

KIND = "sigmoid"

NEAR_MISSES = ("after_pv", "second_user", "tanh")
SIGMOIDS = ("torch", "F", "method", "logsigmoid_exp", "recip_exp")
BIASES = ("none", "float", "buffer0d", "neg_math_log", "neg_torch_log")
MASKS = ("none", "fill_not_neginf", "causal_arange", "causal_tril", "alibi")
MASK_INPUTS = {"fill_not_neginf": "keep", "alibi": "alibi"}
MASK_LINES = {
    **sm.MASK_LINES,
    "fill_not_neginf": ['s = s.masked_fill(~mask, float("-inf"))'],
    "alibi": ["s = s + mask"],
}

SIMPLER = {
    "near_miss": ("none",),
    **sm.SIMPLER_FRAME,
    "mask": ("none",),
    "bias": ("none", "float"),
    "sigmoid": ("torch",),
}

# Programs attnfx does not rewrite (an open bug, or a decision): a missed rewrite there is
# reported as a known gap, not a failure.  (choices predicate, reason)
KNOWN_GAPS = sm.KNOWN_GAPS + (
    (
        lambda c: (
            c["sigmoid"] == "recip_exp"
            and c["lane"] in ("overflow", "fully_masked", "posinf", "neginf")
            and c["near_miss"] == "none"
        ),
        "1/(1+exp(-s)) where exp(-s) overflows (infinite or huge scores): eager's backward is "
        "NaN (0*inf), attnfx's is the exact σ' (finite); the verifier keeps the site when "
        "gradients are checked (a decision, not a wrong result)",
    ),
)


def choices(draw, device: str) -> dict:
    c = sm.draw_frame(draw, device)
    # About a quarter of programs are near-misses.
    near = draw(st.sampled_from(("none",) * 3 * len(NEAR_MISSES) + NEAR_MISSES))
    c.update(
        {
            "near_miss": near,
            "sigmoid": draw(st.sampled_from(SIGMOIDS)),
            "bias": draw(st.sampled_from(BIASES)),
            "mask": draw(st.sampled_from(MASKS)),
        }
    )
    return c


DEFAULTS = {
    **{k: v for k, v in sm.DEFAULTS.items() if k != "softmax"},
    "sigmoid": "torch",
    "bias": "neg_math_log",
}


def normalize(c: dict) -> dict:
    c = {**DEFAULTS, **c}
    c["kind"] = KIND
    c["form"] = "eager"
    if c["near_miss"] not in ("none",) + NEAR_MISSES:
        c["near_miss"] = "none"
    if c["scale"] not in sm.SCALES_EAGER:
        c["scale"] = "div_sqrt"
    if c["mask"] not in MASKS:
        c["mask"] = "none"
    if c["gqa"] not in sm.GQAS_EAGER:
        c["gqa"] = "expand"
    if c["near_miss"] == "after_pv":
        # σ(s @ v): a -inf mask would only feed NaN/inf into the product; keep it finite.
        c["mask"], c["dropout"] = "none", "none"
    c = sm.normalize_frame(c, MASK_INPUTS)
    if c["sigmoid"] == "recip_exp" and c["lane"] == "masked_later":
        # -inf rows make exp(-s) overflow: eager's backward is NaN there and attnfx's the
        # exact σ' by decision (KNOWN_GAPS); the later call checks outputs only
        c["grads"] = False
    return c


def _act(c, x: str) -> str:
    if c["near_miss"] == "tanh":
        return f"torch.tanh({x})"
    return {
        "torch": f"torch.sigmoid({x})",
        "F": f"F.sigmoid({x})",
        "method": f"{x}.sigmoid()",
        "logsigmoid_exp": f"F.logsigmoid({x}).exp()",
        "recip_exp": f"1 / (1 + torch.exp(-{x}))",
    }[c["sigmoid"]]


def body(c) -> list[str]:
    L = sm.scores_lines(c)
    L += {
        "none": [],
        "float": ["s = s - 2.0"],
        "buffer0d": ["s = s + self.b0"],
        "neg_math_log": ["s = s - math.log(nkv)"],
        "neg_torch_log": ["s = s - torch.log(torch.tensor(nkv, dtype=torch.float32))"],
    }[c["bias"]]
    L += MASK_LINES[c["mask"]]
    if c["near_miss"] == "after_pv":
        pv = {"at": "s @ v", "matmul": "torch.matmul(s, v)"}.get(
            c["pv"], 'torch.einsum("bhqk,bhkd->bhqd", s, v)'
        )
        return L + [f"o = {_act(c, pv)}  # near-miss: σ after the PV product"]
    L.append(f"p = {_act(c, 's')}")
    return L + sm.dropout_pv_lines(c)


def init(c) -> list[str]:
    if c["bias"] == "buffer0d":
        return ['self.register_buffer("b0", torch.tensor(-2.5))']
    return []


FRAME = Frame(
    KIND,
    body=body,
    mask_inputs=MASK_INPUTS,
    init=init,
    transcendental=lambda c: True,
    known_gaps=KNOWN_GAPS,
)


def render(c: dict) -> Program:
    return sm.render(c, FRAME)


GRAMMAR = SiteGrammar(KIND, choices, normalize, render, SIMPLER)

__all__ = ["KIND", "NEAR_MISSES", "choices", "normalize", "render"]
