"""Let PyPI's torchvision (a CUDA build) import beside a CPU-only torch. Image-only shim.

The CPU images pair the local ``torch 2.13.0+cpu`` wheel with PyPI's ``torchvision 0.28.0``,
whose compiled ops link CUDA libraries the CPU torch lacks, so ``import torchvision`` (and
hence ``import timm``) dies with ``operator torchvision::nms does not exist``. Installed as
``stamp_torchvision_shim.py`` plus a one-line ``.pth``, this module only adds an import hook
(torch is not imported at start-up). When torchvision is first imported and its ops fail to
load, the operator schemas are declared (without kernels: ``nms`` & co. stay unusable, the
pipeline never calls them) and torchvision is imported again. Where the ops load, nothing changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


class _RetryLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self.inner.exec_module(module)
        except RuntimeError as e:
            if "torchvision::" not in str(e):
                raise
            for k in [k for k in sys.modules if k.startswith("torchvision.")]:
                del sys.modules[k]
            import torch

            lib = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                lib.define(schema)
            self.inner.exec_module(module)
            module._stamp_cpu_shim = lib  # keep the schema library alive


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 - importlib protocol
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RetryLoader(spec.loader)
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
