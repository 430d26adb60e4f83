"""Environment fixes for the CPU torch wheel beside PyPI's torchvision.

PyPI's torchvision wheels are CUDA builds: next to the CPU torch wheel their C extension
cannot load, and ``import torchvision`` then fails while registering fake kernels for
``torchvision::nms`` / ``qnms``, ops the extension would have defined.  transformers and
timm import torchvision when it is installed, so both break.  Their pure-Python parts
(all that building a model needs) import fine once those two op schemas exist; the ops
themselves stay unusable, as they already were.
"""

from __future__ import annotations

import importlib.util


def ensure_torchvision_importable() -> None:
    if importlib.util.find_spec("torchvision") is None:
        return
    import torch

    if hasattr(torch.ops, "torchvision") and _has_op("nms"):
        return
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError:
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        if not _has_op(name):
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _keep.append(lib)
    import sys

    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    import torchvision  # noqa: F401,F811


def _has_op(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


_keep: list = []
