"""``attnfx convert``: turn a trained checkpoint into one with another attention.

    report = attnfx.convert("gpt2-dir", to="sigmoid", out="gpt2-sigmoid")
    model = attnfx.from_pretrained("gpt2-sigmoid")
    model = torch.compile(model, backend="attnfx")     # every converted site: the new kind

Modules: ``core`` (the driver), ``io`` (streaming safetensors / ``.pt`` reading and
writing, the atomic output directory), ``hf`` (the transformers attention implementation
and the loader), ``report`` (``convert_report.json`` and the table), and one module per
conversion: ``selective``, ``gqa``, ``sigmoid``, ``neighborhood`` (``window`` too),
``routed``.  ``attnfx.convert`` is callable: ``attnfx.convert(...)`` is
``attnfx.convert.convert(...)``.
"""

from __future__ import annotations

import sys
import types

from attnfx._compat import ensure_torchvision_importable as _ensure_torchvision_importable

_ensure_torchvision_importable()

from attnfx.convert.base import KINDS, ConvertError  # noqa: E402
from attnfx.convert.core import convert  # noqa: E402
from attnfx.convert.hf import from_pretrained  # noqa: E402
from attnfx.convert.report import ConvertReport  # noqa: E402


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["KINDS", "ConvertError", "ConvertReport", "convert", "from_pretrained"]
