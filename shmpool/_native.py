"""The one loader of the C extension, ``shmpool._speedups``.

Every module that has a C twin of its hot path asks here, so the extension
is imported once and ``SHMPOOL_NO_SPEEDUPS`` is read once. With the
variable set (to anything but ``""`` or ``"0"``), or without a built
extension, ``speedups`` is ``None`` and the pure-Python code runs instead.
What that mode does not do (lending slots by their ticket words, for one)
is in the guide, "Without the C extension".
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["DISABLE_VAR", "speedups"]

#: The environment variable that turns the C extension off.
DISABLE_VAR = "SHMPOOL_NO_SPEEDUPS"


def _load() -> ModuleType | None:
    if os.environ.get(DISABLE_VAR, "0") not in ("", "0"):
        return None
    try:
        return importlib.import_module("shmpool._speedups")
    except ImportError:
        return None


#: The extension module, or None in the pure-Python mode.
speedups: ModuleType | None = _load()
