"""Let ``import torchvision`` succeed when its compiled ops cannot load (patch 4 of :mod:`.patches`).

PyPI's Linux torchvision is a CUDA build. Next to a CPU-only torch its ``_C`` extension cannot
load (it links ``libtorch_cuda``), and ``torchvision/_meta_registrations.py`` then fails on
``register_fake("torchvision::nms")`` for an op that was never defined. Since transformers
imports torchvision whenever it is installed, every ``from transformers import LlamaConfig``
fails with it. EasyEdit needs torchvision (``import easyeditor`` imports timm), so the project
venv has it once ``make easyedit`` ran.

:func:`declare_ops_if_unloadable` declares the two op schemas before torchvision is imported, so
its pure-python parts import; text models never call those ops. :func:`install` does that lazily
for a whole interpreter: where ``import torchvision`` fails, ``scripts/install_easyedit.sh`` links
this file into the venv's site-packages as ``_surgery_torchvision_guard`` (a top-level module, so
importing it does not import ``surgery_plugin``) and adds a ``.pth`` line that imports it and calls
:func:`install`. Nothing here runs when torchvision's ops load (a CPU build from the PyTorch
index, or a CUDA torch).

Standalone on purpose: only the standard library at import time, and torch once torchvision is
imported. Both copies (the linked one and ``surgery_plugin.easyedit.torchvision_guard``) may run in
one process: whichever comes second sees the ops declared and does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# keeps the op declarations alive (a torch.library.Library drops them when it is collected)
_library: Any = None
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def declare_ops_if_unloadable() -> bool:
    """Declare ``torchvision::nms``/``qnms`` when torchvision's compiled ops cannot load; True when it did."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    folder = Path(spec.origin).parent
    compiled = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    if not compiled:
        return False
    import torch

    if _declared(torch):  # the other copy of this module did it
        return False
    try:
        torch.ops.load_library(str(compiled[0]))  # what torchvision itself does first; fine when it loads
        return False
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        library.define(schema)
    _library = library  # a module global: the declarations live as long as this module (in sys.modules)
    logger.debug(
        "torchvision's compiled ops do not load with torch %s; declared nms/qnms so it imports", torch.__version__
    )
    return True


def _declared(torch) -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 (raises when the op is not defined)
    except (AttributeError, RuntimeError):
        return False
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`declare_ops_if_unloadable` once, just before the first ``import torchvision``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            uninstall()  # first: declare_ops_if_unloadable looks torchvision up itself
            declare_ops_if_unloadable()
        return None  # the ordinary finders import it


def install() -> None:
    """Declare the ops lazily, at the first ``import torchvision`` of this interpreter."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _BeforeTorchvision)]
