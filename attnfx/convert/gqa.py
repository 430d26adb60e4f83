"""``--to gqa``: grouped-query attention by mean-pooling K/V heads (Ainslie et al., "GQA:
Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", EMNLP
2023, arXiv 2305.13245).

The K and V projections' heads are split into ``kv_heads`` groups of consecutive heads and
each group's projection rows (and biases) are averaged: the pooled head serves the group's
queries, which is how transformers' ``repeat_kv`` pairs query heads with K/V heads.  Only
``num_key_value_heads`` changes in the config, so the result is a plain transformers
checkpoint (architectures with native GQA only).  One group per head (``kv_heads`` equal
to the current count) changes nothing; fewer heads need uptraining (the paper's 5%).
"""

from __future__ import annotations

import torch

from attnfx.convert.base import (
    ARCHS,
    Change,
    ConvertError,
    Plan,
    Source,
    TensorInfo,
    head_dim,
    num_heads,
    num_layers,
)


def _pool(t: torch.Tensor, kv_new: int, d: int) -> torch.Tensor:
    rows = t.shape[0]
    group = rows // (kv_new * d)
    pooled = t.float().reshape(kv_new, group, d, *t.shape[1:]).mean(dim=1)
    return pooled.reshape(kv_new * d, *t.shape[1:]).to(t.dtype)


def plan(src: Source) -> Plan:
    arch, cfg = src.arch, src.config
    if not arch.native_gqa:
        native = ", ".join(a for a, r in ARCHS.items() if r.native_gqa)
        raise ConvertError(
            f"--to gqa needs an architecture with native grouped-query attention ({native}); "
            f"{arch.model_type} has none"
        )
    if len(src.layers) != num_layers(cfg):
        raise ConvertError("--to gqa converts every layer (num_key_value_heads is per model)")
    h, d = num_heads(cfg), head_dim(cfg)
    kv = cfg.get("num_key_value_heads") or h
    kv_new = src.options.get("kv_heads")
    if kv_new is None:
        raise ConvertError("--to gqa needs --kv-heads N")
    if kv_new < 1 or kv % kv_new:
        raise ConvertError(f"--kv-heads {kv_new} must divide the current {kv} K/V heads")
    group = kv // kv_new
    p = Plan(kind="gqa", site_kind="softmax", layers=src.layers, exact=group == 1)
    for name, info in src.tensors.items():
        layer = arch.layer_of(name)
        leaf = name.rsplit(".", 2)
        if layer is None or len(leaf) < 3 or leaf[-2] not in (arch.k_proj, arch.v_proj):
            continue
        if info.shape[0] != kv * d:
            raise ConvertError(f"{name} has {info.shape[0]} rows, expected {kv}×{d}")
        shape = (kv_new * d, *info.shape[1:])
        p.changed[name] = Change(
            fn=lambda t, kv_new=kv_new: _pool(t, kv_new, d),
            info=TensorInfo(info.dtype, shape),
            why=f"mean of {group} K/V heads per group",
        )
    if not p.changed:
        raise ConvertError("found no K/V projection tensors to pool")
    p.config_updates["num_key_value_heads"] = kv_new
    p.attnfx = {"native": True, "kv_heads": kv_new, "group": h // kv_new}
    p.needs_finetuning = group > 1
    if group > 1:
        p.notes.append(
            f"{kv} K/V heads pooled to {kv_new}: uptrain (the paper uses 5% of pretraining)"
        )
    return p
