"""Test-only stand-in for ``torchvision`` so SGLang imports on CPU torch 2.13.

Why it exists: SGLang imports ``torchvision.io.decode_jpeg`` at module level
(for image inputs), and PyPI's torchvision built for another torch fails at
import with ``operator torchvision::nms does not exist``. miles' integration
tests serve text only, so any ``torchvision.*`` module imports here and every
attribute is an inert class; an image code path that really used it would fail.
``InterpolationMode`` and ``ImageReadMode`` are real enums because SGLang reads
their members at import time. On PYTHONPATH only for ``tests/sglang``.
"""

from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

__version__ = "0.0.0+miles-test-shim"


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


class _Module(types.ModuleType):
    """A submodule whose every attribute is an inert placeholder class."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":
            return InterpolationMode
        if name == "ImageReadMode":
            return ImageReadMode
        placeholder = type(name, (), {"__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


sys.meta_path.insert(0, _Finder())


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return sys.modules.setdefault(f"torchvision.{name}", importlib.import_module(f"torchvision.{name}"))
