"""``--to window`` and ``--to neighborhood``: local attention per layer, training-free
for some models (the report measures how far the outputs move).

* ``window W``: decoders keep the ``W`` most recent keys (the query's included; Mistral's
  sliding window); encoders keep the keys within ``W // 2`` of the query.
* ``neighborhood K``: NATTEN's neighborhoods (``attnfx.nn.neighborhood``: a window of
  ``K`` keys around the query, shifted inward at the borders, so every query sees ``K``
  keys).  Decoders: the causal neighborhood, the same as a window of ``K``.  ViT: a 2-D
  ``K × K`` neighborhood on the patch grid; the CLS token sees and is seen by every patch.

``W`` / ``K``: one size for every chosen layer, or ``{layer: size}``.
"""

from __future__ import annotations

from attnfx.convert.base import ConvertError, Plan, Source


def _sizes(src: Source, option: str) -> dict[int, int]:
    given = src.options.get(option)
    if given is None:
        raise ConvertError(f"--to {src.options['to']} needs --{option.replace('_', '-')}")
    if isinstance(given, int):
        given = {i: given for i in src.layers}
    sizes = {}
    for i in src.layers:
        if i not in given:
            raise ConvertError(f"--{option.replace('_', '-')}: no size for layer {i}")
        if int(given[i]) < 1:
            raise ConvertError(f"--{option.replace('_', '-')}: size {given[i]} for layer {i}")
        sizes[i] = int(given[i])
    extra = set(given) - set(src.layers)
    if extra:
        raise ConvertError(
            f"--{option.replace('_', '-')}: layer {min(extra)} is not converted (--layers)"
        )
    return sizes


def grid_of(config: dict) -> tuple[int, int]:
    size, patch = config.get("image_size"), config.get("patch_size")
    size = size if isinstance(size, (list, tuple)) else (size, size)
    patch = patch if isinstance(patch, (list, tuple)) else (patch, patch)
    if not all(isinstance(x, int) for x in (*size, *patch)):
        raise ConvertError("config.json has no image_size / patch_size for the patch grid")
    return size[0] // patch[0], size[1] // patch[1]


def plan(src: Source) -> Plan:
    kind = src.options["to"]
    option = "window" if kind == "window" else "kernel_size"
    sizes = _sizes(src, option)
    grid = grid_of(src.config) if kind == "neighborhood" and src.arch.grid else None
    # ViT's CLS token is global: the sites are softmax sites with a predicate mask
    site_kind = "softmax" if grid is not None else "neighborhood"
    p = Plan(kind=kind, site_kind=site_kind, layers=src.layers)
    layers = {}
    for i, s in sizes.items():
        layers[str(i)] = {"window": s}
        if grid is not None:
            if s > min(grid):
                raise ConvertError(f"--kernel-size {s} is larger than the {grid} patch grid")
            layers[str(i)]["grid"] = list(grid)
    p.attnfx = {"layers": layers}
    if grid is not None:
        p.notes.append("CLS token global: attnfx reports these sites as softmax (predicate mask)")
    return p
