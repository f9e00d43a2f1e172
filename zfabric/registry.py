"""Which functions a worker may run (layer 3: imports errors only).

The rule it keeps: a name resolves only to a callable DEFINED in one of the
modules the worker was started with (``--app``) or registered explicitly.
A name imported into an app module from elsewhere (``from os import system``)
does not resolve, and nothing is ever imported because a task asked for it.

An ``--app`` ending in ``.py`` is the script that started a local fabric:
it is imported as ``__mp_main__`` (its ``if __name__ == "__main__":`` block
does not run, as with multiprocessing's spawn) and answers to the caller's
name for it, ``__main__``. It is imported when a task first names it, so a
script that never submits its own functions runs as it always did, guard
or not.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from typing import Any, Callable, Iterable

from .errors import ConfigError

MAIN_ALIAS = "__mp_main__"
"""The module name a caller's script is loaded under in a worker (the caller knows it as ``__main__``)."""
LOADING_MAIN = "ZFABRIC_LOADING_MAIN"
"""Set while a worker imports a caller's script: a fabric started at its top level would start fabrics for ever."""

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z][A-Za-z0-9_]*$")


class NotAllowed(LookupError):
    """The function is not one this worker runs."""


def function_name(fn: Any, main_allowed: bool = False) -> str:
    """The ``module:name`` reference of a function object, or a clear error. A function of the script that
    started a local fabric (``__main__``) is allowed where its workers load that script (``main_allowed``)."""
    if isinstance(fn, str):
        if not _NAME.match(fn):
            raise ConfigError(f"bad function reference {fn!r}: expected 'package.module:function'")
        return fn
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or not module or not qualname:
        raise ConfigError(f"{fn!r} is not a function; pass a function or a 'module:function' string")
    if (module == "__main__" and not main_allowed) or "<" in qualname or "." in qualname:
        raise ConfigError(
            f"{qualname} (module {module}) cannot be found by a worker: define it at the top level of an "
            "importable module and start workers with --app that module (functions of the script that "
            "starts zfabric.local or zfabric.Executor(workers=...) work too)")
    return f"{module}:{qualname}"


def main_script() -> str | None:
    """The path of the script this process runs (``python script.py``), which local workers load so that its
    functions can be submitted; None when there is none (``python -m``, a console script, a REPL)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or getattr(main, "__spec__", None) is not None or not path or not path.endswith(".py"):
        return None
    return os.path.abspath(path)


class Registry:
    """Functions a worker may call, by ``module:name``."""

    def __init__(self, modules: Iterable[str] = ()) -> None:
        self._modules: dict[str, Any] = {}
        self._script: str | None = None  # the caller's script, until it is imported
        self._script_error: str | None = None
        self.sources: list[str] = []  # the --app arguments as given (a child process loads the same)
        self._functions: dict[str, Callable[..., Any]] = {}
        self._async: dict[Callable[..., Any], bool] = {}
        for name in modules:
            self.add_module(name)

    @property
    def modules(self) -> list[str]:
        return list(self._modules)

    def add_module(self, name: str) -> None:
        self.sources.append(name)
        if name.endswith(".py"):
            self._script = name  # imported when a task names __main__ (see `_main_module`)
            return
        try:
            self._modules[name] = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"cannot import app module {name!r}: {exc}. Is it on PYTHONPATH?") from exc

    @staticmethod
    def _load_script(path: str) -> Any:
        spec = importlib.util.spec_from_file_location(MAIN_ALIAS, path)
        if spec is None or spec.loader is None or not os.path.isfile(path):
            raise ConfigError(f"cannot load the script {path!r}: no such file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[MAIN_ALIAS] = module
        sys.path.insert(0, os.path.dirname(path))  # its own imports resolve as they did for the caller
        os.environ[LOADING_MAIN] = "1"
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"loading the script {path!r} failed: {type(exc).__name__}: {exc}. Workers import "
                              "the script to find its functions: keep the code that starts the fabric (and "
                              "any other work) under `if __name__ == \"__main__\":`") from exc
        finally:
            del os.environ[LOADING_MAIN]
        return module

    def module(self, name: str) -> Any:
        """The app module a task or value names (``__main__``: the caller's script), or None."""
        if name == "__main__":
            try:
                return self._main_module()
            except NotAllowed:
                return None
        return self._modules.get(name)

    def _main_module(self) -> Any:
        """The caller's script, imported on first use (None if there is none); NotAllowed if that failed."""
        if self._script is not None:
            script, self._script = self._script, None
            try:
                self._modules["__main__"] = self._load_script(script)
            except ConfigError as exc:
                self._script_error = str(exc)
        if self._script_error is not None:
            raise NotAllowed(self._script_error)
        return self._modules.get("__main__")

    def resolve(self, name: str) -> Callable[..., Any]:
        fn = self._functions.get(name)
        if fn is not None:
            return fn
        if type(name) is not str or not _NAME.match(name):
            raise NotAllowed(f"bad function reference {name!r}")
        module_name, attr = name.split(":")
        module = self._modules.get(module_name)
        if module is None and module_name == "__main__":
            module = self._main_module()
        if module is None:
            raise NotAllowed(
                f"{name} is not allowed: module {module_name!r} is not one this worker was started with "
                f"(--app {' --app '.join(self._modules) or 'none'})")
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn) or getattr(fn, "__module__", None) != module.__name__:
            raise NotAllowed(f"{name} is not a function defined in {module_name}")
        self._functions[name] = fn
        return fn

    def is_async(self, fn: Callable[..., Any]) -> bool:
        answer = self._async.get(fn)
        if answer is None:
            answer = self._async[fn] = inspect.iscoroutinefunction(fn)
        return answer
