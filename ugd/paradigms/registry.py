"""The registry itself: paradigm name -> ``Paradigm`` object (``ugd.paradigms`` re-exports these).

Paradigm modules import ``register`` from here (not from the package, whose ``__init__`` imports them).
"""

from __future__ import annotations

from .base import CAPABILITIES, Paradigm

_REGISTRY: dict[str, Paradigm] = {}

def register(paradigm: Paradigm, *, replace: bool = False) -> Paradigm:
    """Adds ``paradigm`` under ``paradigm.name``; returns it. A name already taken raises unless ``replace``."""
    if not isinstance(paradigm, Paradigm):
        raise TypeError(f"register() takes a Paradigm instance, got {type(paradigm).__name__}")
    name = paradigm.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"a paradigm needs a non-empty name, got {name!r}")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not paradigm:
        raise ValueError(f"paradigm {name!r} is already registered (by {type(_REGISTRY[name]).__module__}); "
                         "pass replace=True to override it")
    unknown = sorted(set(paradigm.capabilities) - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"paradigm {name!r}: unknown capabilities {unknown}; expected a subset of {CAPABILITIES}")
    missing = [t for t in paradigm.terms if t not in paradigm.term_weights]
    if missing:
        raise ValueError(f"paradigm {name!r}: loss terms {missing} have no entry in term_weights")
    _REGISTRY[name] = paradigm
    return paradigm


def unregister(name: str) -> None:
    """Removes a paradigm (for tests of third-party registration)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Paradigm:
    """The paradigm called ``name``; a ValueError naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown paradigm {name!r}; expected one of {names()}") from None


def names(*, family: str | None = None, capability: str | None = None) -> list[str]:
    """The registered paradigm names, sorted; optionally only one ``family`` or those whose default
    capabilities include ``capability``."""
    out = []
    for n, p in _REGISTRY.items():
        if family is not None and p.family != family:
            continue
        if capability is not None and capability not in p.capabilities:
            continue
        out.append(n)
    return sorted(out)


def all_paradigms() -> list[Paradigm]:
    return [_REGISTRY[n] for n in names()]


__all__ = ["all_paradigms", "get", "names", "register", "unregister"]
