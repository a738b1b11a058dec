"""The paradigm registry: every training/serving paradigm of the library, by name.

    from ugd import paradigms
    paradigms.names()                      # ['d2llm', 'shared-ttm', 'stm', 'ttm', 'ugd-stm', 'ugd-ttm', ...]
    p = paradigms.get("ugd-ttm")           # the Paradigm object (see ugd.paradigms.base for the interface)
    p.parts, p.mask, p.terms, p.serves(config)
    paradigms.register(MyParadigm())       # a new one (its module imported before use)

The built-in paradigms live one family per module (``BUILTIN_MODULES``), imported when this package
is first imported. ``ugd.paradigms.base`` documents what a paradigm module implements.
"""

from __future__ import annotations

import importlib

from .base import CAPABILITIES, MODE_NEEDS, Paradigm
from .registry import all_paradigms, get, names, register, unregister

#: The modules under ugd/paradigms/ that register the built-in paradigms (one family each).
BUILTIN_MODULES = ("ugd_paradigms", "d2llm", "ullme", "flipped_kd")

for _module in BUILTIN_MODULES:
    importlib.import_module(f"{__name__}.{_module}")


__all__ = ["BUILTIN_MODULES", "CAPABILITIES", "MODE_NEEDS", "Paradigm", "all_paradigms", "get", "names", "register",
           "unregister"]
