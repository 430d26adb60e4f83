"""``--to sigmoid``: sigmoid attention, FlashSigmoid's recipe (Ramapuram et al., "Theory,
Analysis, and Best Practices for Sigmoid Self-Attention", arXiv 2409.04431).

Each chosen layer computes ``σ(q·kᵀ·scale − log n)·v`` (``n``: the number of keys), the
bias that keeps a row's attention mass near softmax's at the start.  Optional, from the
same paper's stabilizers: ``qk_norm`` (an RMS norm of q and k per head, weights 1) and
``layerscale`` (a per-channel scale of the attention output before the output projection,
initialized to the given value).  The weights were trained for softmax: fine-tuning is
needed.
"""

from __future__ import annotations

import torch

from attnfx.convert.base import Plan, Source, head_dim, num_heads


def plan(src: Source) -> Plan:
    h, d = num_heads(src.config), head_dim(src.config)
    qk_norm = bool(src.options.get("qk_norm"))
    layerscale = src.options.get("layerscale")
    p = Plan(kind="sigmoid", site_kind="sigmoid", layers=src.layers, needs_finetuning=True)
    for i in src.layers:
        if qk_norm:
            p.added[f"layers.{i}.q_norm"] = torch.ones(d)
            p.added[f"layers.{i}.k_norm"] = torch.ones(d)
        if layerscale is not None:
            p.added[f"layers.{i}.layerscale"] = torch.full((h * d,), float(layerscale))
    p.attnfx = {
        "layers": {str(i): {} for i in src.layers},
        "bias": "-log(n)",
        "qk_norm": qk_norm,
        "layerscale": layerscale,
    }
    p.notes.append("softmax weights under a sigmoid: fine-tune before use")
    return p
