"""Run a function right after a module is first imported (a post-import hook), without importing it ourselves.

Note: the start-up hook runs in every Python process before the engine is imported, and the engine must be patched in
the processes it spawns too (vLLM spawns its engine core and workers). A finder on sys.meta_path wraps the loader of
each watched module so that its patch runs once the module's code has executed, whoever imports it and whenever.
An exception raised by a patch propagates out of the import: the engine fails to start, loudly, never runs unpatched.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Callable

_hooks: dict[str, list[Callable[[ModuleType], None]]] = {}
_lock = threading.Lock()


def when_imported(name: str, hook: Callable[[ModuleType], None]) -> None:
    """Call hook(module) after `name` is imported; at once if it already is."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _hooks.setdefault(name, []).append(hook)
            _install_finder()
            return
    hook(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _hooks:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, fullname)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            hooks = _hooks.pop(self._name, [])
        for hook in hooks:
            hook(module)

    def __getattr__(self, name):  # get_source, is_package, ... for tools that ask the loader
        return getattr(self._loader, name)


_finder = _Finder()


def _install_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
