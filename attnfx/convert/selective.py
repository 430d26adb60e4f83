"""``--to selective``: Selective Attention's temperatures (Zhang et al., NeurIPS 2024,
arXiv 2411.12892) added to every chosen layer.

Each layer gains a per-head query temperature ``τ = 1 + tanh(w_h·q) + λ_h·log(1 + i)``
(``w``: (H, D), ``λ``: (H,)), both zero: ``τ ≡ 1`` exactly, so the converted model
computes what the source computed until ``w`` and ``λ`` are trained.  The sites are
reported as ``temperature``.
"""

from __future__ import annotations

import torch

from attnfx.convert.base import Plan, Source, head_dim, num_heads


def plan(src: Source) -> Plan:
    h, d = num_heads(src.config), head_dim(src.config)
    p = Plan(kind="selective", site_kind="temperature", layers=src.layers, exact=True)
    for i in src.layers:
        p.added[f"layers.{i}.tau_w"] = torch.zeros(h, d)
        p.added[f"layers.{i}.tau_pos"] = torch.zeros(h)
    p.attnfx = {"layers": {str(i): {} for i in src.layers}}
    p.notes.append("temperatures start at 1 (outputs equal the source); train w and λ")
    return p
