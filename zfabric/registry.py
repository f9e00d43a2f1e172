"""Which functions a worker may run (layer 3: imports errors only).

The rule it keeps: a name resolves only to a callable DEFINED in one of the
modules the worker was started with (``--app``) or registered explicitly.
A name imported into an app module from elsewhere (``from os import system``)
does not resolve, and nothing is ever imported because a task asked for it.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable, Iterable

from .errors import ConfigError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z][A-Za-z0-9_]*$")


class NotAllowed(LookupError):
    """The function is not one this worker runs."""


def function_name(fn: Any) -> str:
    """The ``module:name`` reference of a function object, or a clear error."""
    if isinstance(fn, str):
        if not _NAME.match(fn):
            raise ConfigError(f"bad function reference {fn!r}: expected 'package.module:function'")
        return fn
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or not module or not qualname:
        raise ConfigError(f"{fn!r} is not a function; pass a function or a 'module:function' string")
    if module == "__main__" or "<" in qualname or "." in qualname:
        raise ConfigError(
            f"{qualname} (module {module}) cannot be found by a worker: define it at the top level of an "
            "importable module and start workers with --app that module")
    return f"{module}:{qualname}"


class Registry:
    """Functions a worker may call, by ``module:name``."""

    def __init__(self, modules: Iterable[str] = ()) -> None:
        self._modules: dict[str, Any] = {}
        self._functions: dict[str, Callable[..., Any]] = {}
        self._async: dict[Callable[..., Any], bool] = {}
        for name in modules:
            self.add_module(name)

    @property
    def modules(self) -> list[str]:
        return list(self._modules)

    def add_module(self, name: str) -> None:
        try:
            self._modules[name] = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"cannot import app module {name!r}: {exc}. Is it on PYTHONPATH?") from exc

    def register(self, fn: Callable[..., Any], name: str | None = None) -> str:
        """Allow one function under `name` (default: its own ``module:name``)."""
        key = name or function_name(fn)
        self._functions[key] = fn
        return key

    def resolve(self, name: str) -> Callable[..., Any]:
        fn = self._functions.get(name)
        if fn is not None:
            return fn
        if type(name) is not str or not _NAME.match(name):
            raise NotAllowed(f"bad function reference {name!r}")
        module_name, attr = name.split(":")
        module = self._modules.get(module_name)
        if module is None:
            raise NotAllowed(
                f"{name} is not allowed: module {module_name!r} is not one this worker was started with "
                f"(--app {' --app '.join(self._modules) or 'none'})")
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn) or getattr(fn, "__module__", None) != module_name:
            raise NotAllowed(f"{name} is not a function defined in {module_name}")
        self._functions[name] = fn
        return fn

    def is_async(self, fn: Callable[..., Any]) -> bool:
        answer = self._async.get(fn)
        if answer is None:
            answer = self._async[fn] = inspect.iscoroutinefunction(fn)
        return answer
