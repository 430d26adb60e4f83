"""Converted checkpoints in transformers: the attention implementation and the loader.

One attention function, registered as ``"attnfx"`` through transformers' attention
interface (``AttentionInterface``; its mask function through ``AttentionMaskInterface``:
transformers' boolean SDPA masks), computes each layer's attention in plain PyTorch from
the settings ``attach`` puts on the layer's attention module (``attnfx_kind`` and the
kind's parameters).  It is written the way a researcher would write the variant, so the
attnfx backend recognizes each layer as the new kind; a layer a conversion left alone
runs a plain eager softmax (a ``softmax`` site).

``from_pretrained(path)`` loads a converted directory: transformers' ``from_pretrained``
with ``attn_implementation="attnfx"``, then the layer settings from ``config.json``'s
``attnfx`` section and the added tensors from ``attnfx.safetensors``.  A directory
without that section (a GQA conversion: native in transformers) loads as transformers
loads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from attnfx.convert.base import ADDED_FILE, ARCHS, CONFIG_KEY, ConvertError, arch_of
from attnfx.convert.io import SafetensorsFile, read_json
from attnfx.nn.neighborhood import neighborhood_mask
from attnfx.nn.routed import cluster_members, routed_attention

IMPLEMENTATION = "attnfx"
_PARAM_PREFIX = "attnfx_"


def _keep_mask(module, attention_mask, nq: int, nk: int, device) -> torch.Tensor | None:
    """The boolean keep mask (True: attend) before the variant's own masking: the one
    transformers gave, else causal by index when the layer is causal and has no mask."""
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            return attention_mask[..., :nk]
        return attention_mask[..., :nk] > torch.finfo(attention_mask.dtype).min / 2
    if getattr(module, "is_causal", False) and nq > 1:
        qi = torch.arange(nq, device=device)[:, None] + (nk - nq)
        ki = torch.arange(nk, device=device)[None, :]
        return ki <= qi
    return None


def _window_keep(module, nq: int, nk: int, device) -> torch.Tensor:
    """(NQ, NK) bool of a window / neighborhood layer."""
    qi = torch.arange(nq, device=device)[:, None] + (nk - nq)
    ki = torch.arange(nk, device=device)[None, :]
    size = module.attnfx_window
    if getattr(module, "is_causal", False):
        return (ki <= qi) & (qi - ki < size)
    grid = getattr(module, "attnfx_grid", None)
    if module.attnfx_kind == "window" or grid is None:
        if module.attnfx_kind == "neighborhood":
            return neighborhood_mask((nk,), size, device=device)
        return (ki - qi).abs() <= size // 2
    return _grid_keep(qi, ki, tuple(grid), size)


def _grid_keep(qi: torch.Tensor, ki: torch.Tensor, grid: tuple[int, int], size: int):
    """ViT: token 0 is CLS (global), tokens 1.. an (h, w) patch grid, row-major; a patch
    sees the ``size × size`` patches around it (NATTEN's rule: shifted inward at the
    borders)."""
    h, w = grid
    pq, pk = (qi - 1).clamp(min=0), (ki - 1).clamp(min=0)
    keep = (qi == 0) | (ki == 0)
    inside = None
    for length, cq, ck in ((h, pq // w, pk // w), (w, pq % w, pk % w)):
        start = (cq - size // 2).clamp(min=0).clamp(max=length - size)
        axis = (ck >= start) & (ck < start + size)
        inside = axis if inside is None else inside & axis
    return keep | inside


def _expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _routed(module, q, k, v, keep, causal: bool, scaling: float) -> torch.Tensor:
    """Routing attention as the Routing Transformer writes it (``attnfx.nn.RoutedAttention``):
    each head's C centroids take their ceil(N / C) most similar tokens, attention runs
    within each cluster (causal on positions), outputs are scattered back and averaged
    over the clusters that chose a token (0 for a token none chose).  A causal layer routes
    keys with its queries' clusters, so that each cluster's first member sees itself."""
    n = q.shape[-2]
    if k.shape[-2] != n:
        raise NotImplementedError(
            "routed layers attend over whole sequences: no cached (incremental) decoding"
        )
    if keep is not None and not causal:
        raise NotImplementedError("routed layers take unpadded batches (no attention mask)")
    cents = F.normalize(module.attnfx_centroids.detach(), dim=-1)  # (H, C, D)
    w = min(n, -(-n // cents.shape[1]))
    qi = cluster_members(q, cents, w)
    ki = qi if causal else cluster_members(k, cents, w)
    return routed_attention(q, k, v, qi, ki, scaling, causal=causal)


def attnfx_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """(B, H, N, D) q, k, v -> ((B, N, H, D) output, None)."""
    kind = getattr(module, "attnfx_kind", "softmax")
    nq, nk = query.shape[-2], key.shape[-2]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    key, value = _expand_kv(query, key), _expand_kv(query, value)
    if kind == "routed":
        causal = bool(getattr(module, "is_causal", False))
        keep = attention_mask if not causal else None
        out = _routed(module, query, key, value, keep, causal, scaling)
        return out.transpose(1, 2).contiguous(), None
    keep = _keep_mask(module, attention_mask, nq, nk, query.device)

    if kind == "sigmoid":
        if getattr(module, "attnfx_qk_norm", None) is not None:
            query = F.rms_norm(query, (query.shape[-1],), module.attnfx_qk_norm[0])
            key = F.rms_norm(key, (key.shape[-1],), module.attnfx_qk_norm[1])
        scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
        scores = scores - torch.log(torch.tensor(nk, dtype=torch.float32))
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.sigmoid(scores)
    else:
        if kind == "selective":
            # τ = 1 + tanh(w_h · q) + λ_h · log(1 + i): per query and head
            w = module.attnfx_tau_w  # (H, D)
            lam = module.attnfx_tau_pos  # (H,)
            i = torch.arange(nq, device=query.device, dtype=torch.float32) + (nk - nq)
            token = torch.tanh((query * w[:, None, :]).sum(-1, keepdim=True))
            tau = 1 + token + lam[:, None, None] * torch.log1p(i)[:, None]
            query = query * tau.to(query.dtype)
        scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
        if kind in ("window", "neighborhood"):
            win = _window_keep(module, nq, nk, query.device)
            if getattr(module, "is_causal", False) and keep is not None:
                # one predicate with the causal mask: the recognizer reads one window
                keep = keep & win
            else:
                # its own fill: the window stays an index predicate beside a padding tensor
                scores = scores.masked_fill(~win, float("-inf"))
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)
    if getattr(module, "attnfx_layerscale", None) is not None:
        out = out * module.attnfx_layerscale.view(1, out.shape[1], 1, out.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"attnfx"`` with transformers (idempotent)."""
    from attnfx._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attnfx_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _check_loadable(kind: str) -> None:
    """Every kind ``attnfx_attention`` computes loads (a hook for kinds still landing)."""


def attach(model: nn.Module, config: dict, added: dict[str, torch.Tensor]) -> int:
    """Put each converted layer's settings and added tensors on its attention module;
    returns the number of attention modules found."""
    section = config[CONFIG_KEY]
    arch = arch_of(config)
    pattern = arch.attention_pattern()
    layers = {int(i): s for i, s in section["layers"].items()}
    found = 0
    for name, mod in model.named_modules():
        m = pattern.search(name)
        if not m:
            continue
        found += 1
        i = int(m.group(1))
        mod.attnfx_kind = "softmax"
        if i not in layers:
            continue
        settings = layers[i]
        mod.attnfx_kind = section["kind"]
        if "window" in settings:
            mod.attnfx_window = int(settings["window"])
        if settings.get("grid") is not None:
            mod.attnfx_grid = tuple(settings["grid"])
        ref = next(mod.parameters(), None)
        prefix = f"layers.{i}."
        params = {k[len(prefix) :]: t for k, t in added.items() if k.startswith(prefix)}
        for pname, t in sorted(params.items()):
            if ref is not None:
                t = t.to(device=ref.device, dtype=ref.dtype)
            mod.register_parameter(_PARAM_PREFIX + pname, nn.Parameter(t.clone()))
        if "q_norm" in params:
            mod.attnfx_qk_norm = (mod.attnfx_q_norm, mod.attnfx_k_norm)
    if found == 0:
        raise ConvertError(f"no attention modules found in the loaded {arch.model_type} model")
    return found


def model_class(config: dict):
    from attnfx._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import transformers

    for name in config.get("architectures") or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def from_pretrained(path, *args, **kwargs) -> nn.Module:
    """Load a converted model directory (see the module docstring)."""
    path = Path(path)
    config = read_json(path / "config.json", "config.json")
    cls = kwargs.pop("model_class", None) or model_class(config)
    section = config.get(CONFIG_KEY)
    if section is None or section.get("native"):
        return cls.from_pretrained(path, *args, **kwargs)
    if section.get("version", 0) > 1:
        raise ConvertError(f"{path}: written by a newer attnfx (format {section['version']})")
    _check_loadable(section["kind"])
    register()
    kwargs["attn_implementation"] = IMPLEMENTATION
    model = cls.from_pretrained(path, *args, **kwargs)
    added = {}
    if (path / ADDED_FILE).exists():
        f = SafetensorsFile(path / ADDED_FILE)
        added = {n: f.tensor(n) for n in f.entries}
    attach(model, config, added)
    return model


def supported() -> str:
    return ", ".join(ARCHS)
