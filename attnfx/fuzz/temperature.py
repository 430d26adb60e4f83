"""The temperature-scaled softmax site grammar (issue 5): scores rescaled per query, per
head or by position, and soft-capping, with its near-misses.

It reuses the softmax grammar's program frame (``frame.Frame``) with its own score body
and state.  A softmax site whose only multiplier is a constant scale is kind ``softmax``;
every program here carries a per-row multiplier, a ``tanh``, or ``q`` times a tensor, so
its sites are kind ``temperature``.  Choices (values simplest first, as the shrinker
tries them):

    temp        row_mul (scores times a per-row input t (B, H, NQ, 1): s*t | t*s | s/t)
                | logn_head (``s * (self.s * math.log(n))``, ``self.s`` (H, 1, 1))
                | qwen (a ``logn`` buffer sliced by position, multiplied into q; on the
                  (B, N, H, D) inputs when the program has them)
                | softcap (``cap * tanh(s / cap)``; alone, or after a per-query t)
                | q_tau (``q * tau``, tau from ``nn.Linear(C, H)`` of the hidden state:
                  tanh | softplus | one_plus_tanh)
                | selective (``attnfx.nn.selective.SelectiveAttention``, causal or not,
                  with or without a value temperature)
    near_miss   none | key_temp (times a (1, 1, 1, N) buffer: varies along keys)
                | score_temp (``s * s.amax(-1, keepdim=True).sigmoid()``: from the scores)
    mask        none | causal_arange | causal_tril | fill_neginf | padding_neginf | additive
    softmax     F | method | torch | f32_to | float_type_as
    scale, gqa, dropout, proj, cross, heads, kt, mm, pv, merge, out_proj, layers, dynamic,
    grads, shapes and values as in the softmax grammar.

Programs with a ``tanh`` (soft-capping, ``q_tau`` with tanh, selective) or softplus are
compared under the transcendental rule (the equivalence rule: +1).
"""

from __future__ import annotations

from hypothesis import strategies as st

from attnfx.fuzz import softmax as sm
from attnfx.fuzz.frame import Frame, Program, SiteGrammar

KIND = "temperature"

TEMPS = ("row_mul", "logn_head", "qwen", "softcap", "q_tau", "selective")
NEAR_MISSES = ("key_temp", "score_temp")
MASKS = ("none", "causal_arange", "causal_tril", "fill_neginf", "padding_neginf", "additive")
MASK_INPUTS = {k: v for k, v in sm.MASK_INPUTS.items() if k in MASKS}
SOFTMAXES = ("F", "method", "torch", "f32_to", "float_type_as")
TAU_ACTS = ("one_plus_tanh", "tanh", "softplus")
CAPS = (5.0, 1.5, 50.0)

SIMPLER = {
    "near_miss": ("none",),
    "temp": ("row_mul", "logn_head"),
    **sm.SIMPLER_FRAME,
    "mask": ("none",),
    "softmax": ("F",),
    "row_spell": ("s_t",),
    "tau_act": ("one_plus_tanh",),
    "tau_spell": ("index",),
    "cap": (5.0,),
    "cap_spell": ("mul_tanh",),
    "cap_temp": (False,),
    "sel_causal": (True,),
    "sel_value": (False,),
}

# Programs attnfx is known not to rewrite yet (an open bug): (choices predicate, reason).
KNOWN_GAPS = sm.KNOWN_GAPS


def choices(draw, device: str) -> dict:
    c = sm.draw_frame(draw, device)
    # About a quarter of programs are near-misses.
    near = draw(st.sampled_from(("none",) * 3 * len(NEAR_MISSES) + NEAR_MISSES))
    c.update(
        {
            "near_miss": near,
            "temp": draw(st.sampled_from(TEMPS)),
            "mask": draw(st.sampled_from(MASKS)),
            "softmax": draw(st.sampled_from(SOFTMAXES)),
            "row_spell": draw(st.sampled_from(("s_t", "t_s", "s_div_t"))),
            "tau_act": draw(st.sampled_from(TAU_ACTS)),
            "tau_spell": draw(st.sampled_from(("index", "unsqueeze"))),
            "cap": draw(st.sampled_from(CAPS)),
            "cap_spell": draw(st.sampled_from(("mul_tanh", "method"))),
            "cap_temp": draw(st.booleans()),
            "sel_causal": draw(st.booleans()),
            "sel_value": draw(st.booleans()),
        }
    )
    return c


DEFAULTS = {
    **sm.DEFAULTS,
    "temp": "row_mul",
    "row_spell": "s_t",
    "tau_act": "one_plus_tanh",
    "tau_spell": "index",
    "cap": 5.0,
    "cap_spell": "mul_tanh",
    "cap_temp": False,
    "sel_causal": True,
    "sel_value": False,
}

# The selective module brings its own projections, head split and merge.
SELECTIVE_FRAME = {
    "proj": "packed_index",
    "cross": False,
    "gqa": "none",
    "heads": "permute",
    "kt": "transpose",
    "mm": "at",
    "pv": "at",
    "scale": "none",
    "mask": "none",
    "softmax": "method",
    "dropout": "none",
    "merge": "transpose_reshape",
    "out_proj": True,
}


def normalize(c: dict) -> dict:
    c = {**DEFAULTS, **c}
    c["kind"] = KIND
    c["form"] = "eager"
    if c["near_miss"] not in ("none",) + NEAR_MISSES:
        c["near_miss"] = "none"
    if c["temp"] not in TEMPS:
        c["temp"] = "row_mul"
    if c["scale"] not in sm.SCALES_EAGER:
        c["scale"] = "div_sqrt"
    if c["mask"] not in MASKS:
        c["mask"] = "none"
    if c["gqa"] not in sm.GQAS_EAGER:
        c["gqa"] = "expand"
    # Choices that do not apply to the drawn form take their default (shrinker-friendly).
    if c["temp"] != "row_mul":
        c["row_spell"] = "s_t"
    if c["temp"] != "q_tau":
        c["tau_act"], c["tau_spell"] = "one_plus_tanh", "index"
    if c["temp"] != "softcap":
        c["cap"], c["cap_spell"], c["cap_temp"] = 5.0, "mul_tanh", False
    if c["temp"] != "selective":
        c["sel_causal"], c["sel_value"] = True, False
    if c["temp"] == "q_tau" and c["proj"] == "none":
        c["proj"] = "separate"  # tau is a projection of the hidden state
    if c["temp"] == "selective":
        c.update(SELECTIVE_FRAME)
        c["near_miss"] = "none"
        c["inplace"] = "none"  # the module's own forward: nothing to put around the site
        if c["lane"] == "masked_later":
            c["lane"] = "finite"  # it takes no mask input
        if c["merge"] == "none":
            c["layers"] = 1
    c = sm.normalize_frame(c, MASK_INPUTS)
    if c["near_miss"] == "key_temp" and c["NKV"] < 2:
        c["NKV"] = 2  # a (1,1,1,1) "varying" temperature is a constant
        if not (c["cross"] or c["proj"] == "none"):
            c["NQ"] = 2
    return c


def _row_input(c) -> bool:
    return c["temp"] == "row_mul" or (c["temp"] == "softcap" and c["cap_temp"])


def _qwen_on_inputs(c) -> bool:
    return c["proj"] == "none" and c["heads"] != "bhnd"


def body(c) -> list[str]:
    L = sm.scores_lines(c)
    t = c["temp"]
    if t == "row_mul":
        L.append({"s_t": "s = s * t", "t_s": "s = t * s", "s_div_t": "s = s / t"}[c["row_spell"]])
    elif t == "logn_head":
        L.append("s = s * (self.s * math.log(nkv))")
    elif t == "softcap":
        if c["cap_temp"]:
            L.append("s = s * t  # a per-query temperature before the cap")
        if c["cap_spell"] == "mul_tanh":
            L.append("s = CAP * torch.tanh(s / CAP)")
        else:
            L.append("s = (s / CAP).tanh() * CAP")
    if c["near_miss"] == "key_temp":
        L.append("s = s * self.temp[..., :nkv]  # near-miss: varies along the keys")
    elif c["near_miss"] == "score_temp":
        L.append("s = s * s.amax(-1, keepdim=True).sigmoid()  # near-miss: from the scores")
    L += sm.MASK_LINES[c["mask"]]
    L.append(sm.softmax_line(c))
    return L + sm.dropout_pv_lines(c)


def init(c) -> list[str]:
    t = c["temp"]
    L = []
    if t == "q_tau":
        L.append(f"self.tau = nn.Linear(C, {c['H']})  # a per-token, per-head temperature")
    elif t == "logn_head":
        L.append(f"self.s = nn.Parameter(torch.linspace(0.3, 0.6, {c['H']}).view(-1, 1, 1))")
    elif t == "qwen":
        L.append(
            'self.register_buffer("logn", torch.tensor([math.log(i, 6) if i > 6 else 1.0 '
            "for i in range(1, MAXN + 1)]), persistent=False)"
        )
    if c["near_miss"] == "key_temp":
        L.append('self.register_buffer("temp", torch.linspace(0.5, 2.0, MAXN).view(1, 1, 1, MAXN))')
    return L


def pre_heads(c) -> list[str]:
    if c["temp"] == "qwen" and _qwen_on_inputs(c):  # q is (B, N, H, D)
        return ["q = q * self.logn[: q.shape[1]][None, :, None, None]  # Qwen logn"]
    return []


def post_heads(c) -> list[str]:
    t = c["temp"]
    if t == "qwen" and not _qwen_on_inputs(c):
        return ["q = q * self.logn[:nq][None, None, :, None]  # logn by query position"]
    if t == "q_tau":
        act = {
            "tanh": "torch.tanh(self.tau(x))",
            "softplus": "F.softplus(self.tau(x))",
            "one_plus_tanh": "1 + torch.tanh(self.tau(x))",
        }[c["tau_act"]]
        use = {"index": "tau[..., None]", "unsqueeze": "tau.unsqueeze(-1)"}[c["tau_spell"]]
        return [f"tau = ({act}).transpose(1, 2)  # (B, H, N)", f"q = q * {use}"]
    return []


def attn_class(c) -> list[str] | None:
    if c["temp"] != "selective":
        return None
    return [
        "class Attn(SelectiveAttention):",
        "    def __init__(self):",
        f"        super().__init__(C, H, causal={c['sel_causal']!r}, "
        f"value_temperature={c['sel_value']!r})",
        "        with torch.no_grad():  # away from tau == 1, its initialization",
        "            self.tau_q.weight.normal_(0.0, 0.2)",
        "            self.pos_q.uniform_(-0.5, 0.5)",
        "            if self.tau_v is not None:",
        "                self.tau_v.weight.normal_(0.0, 0.2)",
    ]


def header(c) -> list[str]:
    L = []
    if c["temp"] == "softcap":
        L.append(f"CAP = {c['cap']!r}  # soft-capping")
    if c["temp"] == "selective":
        L.append("from attnfx.nn.selective import SelectiveAttention  # noqa: E402")
    return L


def transcendental(c) -> bool:
    return c["temp"] in ("softcap", "q_tau", "selective")


FRAME = Frame(
    KIND,
    body=body,
    mask_inputs=MASK_INPUTS,
    init=init,
    pre_heads=pre_heads,
    post_heads=post_heads,
    extra_inputs=lambda c: [("t", "row_temp")] if _row_input(c) else [],
    header=header,
    transcendental=transcendental,
    attn_class=attn_class,
    known_gaps=KNOWN_GAPS,
)


def render(c: dict) -> Program:
    return sm.render(c, FRAME)


GRAMMAR = SiteGrammar(KIND, choices, normalize, render, SIMPLER)

__all__ = ["KIND", "NEAR_MISSES", "TEMPS", "choices", "normalize", "render"]
