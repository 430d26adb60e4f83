"""The routed-attention site grammar (Routing Transformer's clusters, issue 15), with its
near-misses.

It reuses the softmax grammar's program frame (projections, head split, merge, stacked
layers, inputs) with its own body: members of C clusters of w slots chosen by integer
arithmetic on the positions (the float k-means routing would pick other members in the
float64 gold than in the working dtype: the membership is what a site receives, not what
it computes), rows gathered, per-cluster softmax attention with fills on the members'
positions, outputs scattered back and averaged.  Choices (values simplest first):

    near_miss   none | second_user (the probabilities also returned)
                | count_other (the count taken over other indices: not a mean)
    members     chunks (consecutive tokens) | stride (a prime step, wrapping: duplicates)
                | heads (a per-head offset)
    order       sorted | reversed (members in descending position: no causal tile skipped)
    clusters    1 | 2 | 3          window  1 | 2 | 4 | 8 | 17
    fills       none | causal_self (pos_q < pos_k → -inf, then pos_q == pos_k → -5e4, shared
                members) | self | causal (separate key members: a row may see no key → NaN)
    fill_form   masked_fill | where
    rank        bhnd (4-D gathers) | flat ((B·H, N, D) operands)
    denominator clamp | eps
    scale       none | div_sqrt | mul_pow | prescale_q
    proj, heads, mm, merge, out_proj, layers, dynamic, grads, shapes and values as in the
    softmax grammar (self-attention, no GQA, no mask input, finite lane).
"""

from __future__ import annotations

from hypothesis import strategies as st

from attnfx.fuzz import softmax as sm
from attnfx.fuzz.frame import Frame, Program, SiteGrammar

KIND = "routed"

NEAR_MISSES = ("second_user", "count_other")
MEMBERS = ("chunks", "stride", "heads")
ORDERS = ("sorted", "reversed")
FILLS = ("none", "causal_self", "self", "causal")
FILL_FORMS = ("masked_fill", "where")
RANKS = ("bhnd", "flat")
DENOMINATORS = ("clamp", "eps")
SCALES = ("none", "div_sqrt", "mul_pow", "prescale_q")

SIMPLER = {
    "near_miss": ("none",),
    **sm.SIMPLER_FRAME,
    "members": MEMBERS,
    "order": ORDERS,
    "clusters": (1, 2, 3),
    "window": (1, 2, 4, 8, 17),
    "fills": FILLS,
    "fill_form": FILL_FORMS,
    "rank": RANKS,
    "denominator": DENOMINATORS,
}


def choices(draw, device: str) -> dict:
    c = sm.draw_frame(draw, device)
    near = draw(st.sampled_from(("none",) * 4 * len(NEAR_MISSES) + NEAR_MISSES))
    c.update(
        {
            "near_miss": near,
            "members": draw(st.sampled_from(MEMBERS)),
            "order": draw(st.sampled_from(ORDERS)),
            "clusters": draw(st.sampled_from((1, 2, 3))),
            "window": draw(st.sampled_from((1, 2, 4, 8, 17))),
            "fills": draw(st.sampled_from(FILLS)),
            "fill_form": draw(st.sampled_from(FILL_FORMS)),
            "rank": draw(st.sampled_from(RANKS)),
            "denominator": draw(st.sampled_from(DENOMINATORS)),
        }
    )
    return c


DEFAULTS = {
    **{k: v for k, v in sm.DEFAULTS.items() if k != "softmax"},
    "members": "chunks",
    "order": "sorted",
    "clusters": 2,
    "window": 4,
    "fills": "none",
    "fill_form": "masked_fill",
    "rank": "bhnd",
    "denominator": "clamp",
}


def normalize(c: dict) -> dict:
    c = {**DEFAULTS, **c}
    c["kind"] = KIND
    c["form"] = "eager"
    for key, allowed in (
        ("near_miss", ("none",) + NEAR_MISSES),
        ("members", MEMBERS),
        ("order", ORDERS),
        ("fills", FILLS),
        ("fill_form", FILL_FORMS),
        ("rank", RANKS),
        ("denominator", DENOMINATORS),
        ("scale", SCALES),
    ):
        if c[key] not in allowed:
            c[key] = allowed[0] if key != "scale" else "div_sqrt"
    if c["clusters"] not in (1, 2, 3):
        c["clusters"] = 2
    if c["window"] not in (1, 2, 4, 8, 17):
        c["window"] = 4
    # self-attention over one sequence, every head its own keys, no mask input; dropout
    # and in-place ops are other grammars' business
    c["gqa"], c["cross"], c["mask"] = "none", False, "none"
    c["dropout"], c["inplace"] = "none", "none"
    c["lane"] = "finite"
    if c["near_miss"] == "second_user":
        c["grads"] = False
    c = sm.normalize_frame(c, {})
    c["NKV"] = c["NQ"]
    if sm.single_key(c):  # (judged by the frame on the length before NKV followed NQ)
        c["grads"] = False
    return c


def _members_lines(c) -> list[str]:
    """``qi`` (and ``ki``) (b, H, C, W): slot -> token, by integer arithmetic on n."""
    step = {"chunks": 1, "stride": 7, "heads": 1}[c["members"]]
    L = [
        "slots = torch.arange(CR * WR, device=q.device)",
        f"pos = (slots * {step}).view(1, 1, CR, WR).expand(b, H, CR, WR)",
    ]
    if c["members"] == "heads":
        L.append("pos = pos + torch.arange(H, device=q.device).view(1, H, 1, 1) * 3")
    L.append("qi = pos % nq")
    if c["order"] == "sorted":
        L.append("qi = qi.sort(dim=-1).values")
    else:
        L.append("qi = qi.sort(dim=-1, descending=True).values")
    if c["fills"] == "causal":  # separate key members: every other token, shifted by one
        L.append("ki = (qi * 2 + 1) % nkv")
    else:
        L.append("ki = qi")
    return L


def _fill(c, cond: str, value: str) -> str:
    if c["fill_form"] == "where":
        return f"s = torch.where({cond}, {value}, s)"
    return f"s = s.masked_fill({cond}, {value})"


def body(c) -> list[str]:
    L = [f"CR, WR = {c['clusters']}, {c['window']}  # clusters, members per cluster"]
    L += _members_lines(c)
    flat = c["rank"] == "flat"
    if c["scale"] == "prescale_q":
        L.append("q = q * self.scale")
    if flat:
        L += [
            "q3, k3, v3 = (t.reshape(b * H, t.shape[-2], D) for t in (q, k, v))",
            "qf, kf = qi.reshape(b * H, CR * WR), ki.reshape(b * H, CR * WR)",
            "qx = qf[:, :, None].expand(-1, -1, D)",
            "kx = kf[:, :, None].expand(-1, -1, D)",
            "qg = q3.gather(1, qx).reshape(b * H, CR, WR, D)",
            "kg = k3.gather(1, kx).reshape(b * H, CR, WR, D)",
            "vg = v3.gather(1, kx).reshape(b * H, CR, WR, D)",
            "qp, kp = qi.reshape(b * H, CR, WR), ki.reshape(b * H, CR, WR)",
        ]
    else:
        L += [
            "qx = qi.reshape(b, H, CR * WR, 1).expand(b, H, CR * WR, D)",
            "kx = ki.reshape(b, H, CR * WR, 1).expand(b, H, CR * WR, D)",
            "qg = q.gather(2, qx).reshape(b, H, CR, WR, D)",
            "kg = k.gather(2, kx).reshape(b, H, CR, WR, D)",
            "vg = v.gather(2, kx).reshape(b, H, CR, WR, D)",
            "qp, kp = qi, ki",
        ]
    prod = {
        "at": "qg @ kg.transpose(-1, -2)",
        "matmul": "torch.matmul(qg, kg.transpose(-2, -1))",
        "einsum": 'torch.einsum("...id,...jd->...ij", qg, kg)',
    }[c["mm"] if c["mm"] in ("at", "matmul", "einsum") else "at"]
    scale = {
        "none": "",
        "div_sqrt": " / math.sqrt(D)",
        "mul_pow": " * D**-0.5",
        "prescale_q": "",
    }[c["scale"]]
    L.append(f"s = {prod}{scale}")
    if c["fills"] in ("causal_self", "causal"):
        L.append(_fill(c, "qp[..., :, None] < kp[..., None, :]", 'float("-inf")'))
    if c["fills"] in ("causal_self", "self"):
        L.append(_fill(c, "qp[..., :, None] == kp[..., None, :]", "-5e4"))
    if flat:  # (B·H, N, D) outputs and counts, scattered along dim 1
        L += [
            "p = s.softmax(dim=-1)",
            "og = (p @ vg).reshape(b * H, CR * WR, D)",
            "sf = qi.reshape(b * H, CR * WR)",
            "num = torch.zeros(b * H, nq, D, dtype=v.dtype, device=v.device)",
            "num = num.scatter_add(1, sf[:, :, None].expand(-1, -1, D), og)",
            "cnt = torch.zeros(b * H, nq, dtype=v.dtype, device=v.device)",
        ]
        dim = 1
    else:
        L += [
            "p = F.softmax(s, dim=-1)",
            "og = torch.matmul(p, vg).reshape(b, H, CR * WR, D)",
            "sf = qi.reshape(b, H, CR * WR)",
            "num = torch.zeros_like(v).scatter_add(2, sf.unsqueeze(-1).expand(b, H, CR * WR, D), og)",
            "cnt = torch.zeros(b, H, nq, dtype=v.dtype, device=v.device)",
        ]
        dim = 2
    if c["near_miss"] == "count_other":
        L.append("cf = (sf.flip(-1) + 1) % nq  # near-miss: counts of other tokens")
    else:
        L.append("cf = sf")
    L.append(f"cnt = cnt.scatter_add({dim}, cf, torch.ones_like(cf, dtype=v.dtype))")
    den = "cnt.clamp(min=1)" if c["denominator"] == "clamp" else "(cnt + 1e-5)"
    L.append(f"o = num / {den}[..., None]")
    if flat:
        L.append("o = o.view(b, H, nq, D)")
    return L


FRAME = Frame(KIND, body=body, mask_inputs={})


def render(c: dict) -> Program:
    return sm.render(c, FRAME)


GRAMMAR = SiteGrammar(KIND, choices, normalize, render, SIMPLER)

__all__ = ["KIND", "NEAR_MISSES", "choices", "normalize", "render"]
