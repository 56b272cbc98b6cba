"""The one way ``patches/`` replaces a vLLM attribute: ``wrap_once``.

Every wrap in ``patches/`` goes through it, so that each is idempotent (installing twice, as
vLLM's plugin loader may in one process, wraps once), marked (``_vllm_sink``), and keeps
the original reachable (``__wrapped__``, as ``functools.wraps`` does) and its docstring.
Binds to nothing in vLLM itself.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

MARK = "_vllm_sink"


def is_wrapped(fn: Any) -> bool:
    return bool(getattr(fn, MARK, False))


def wrap_once(owner: Any, name: str, make: Callable[[Callable], Callable]) -> bool:
    """Replace ``owner.name`` (a class's method, static method, class method or property
    getter, or a module's function) by ``make(original)``, unless it is already ours.

    ``make`` receives the plain function (the getter of a property, the function under a
    ``staticmethod``/``classmethod``) and returns its replacement, which is put back under
    the same kind of descriptor. Returns whether it wrapped."""
    raw = inspect.getattr_static(owner, name) if inspect.isclass(owner) else getattr(owner, name)
    if isinstance(raw, property):
        orig = raw.fget
    elif isinstance(raw, (staticmethod, classmethod)):
        orig = raw.__func__
    else:
        orig = raw
    if is_wrapped(orig):
        return False
    new = make(orig)
    setattr(new, MARK, True)
    new.__wrapped__ = orig
    if new.__doc__ is None:
        new.__doc__ = orig.__doc__
    if isinstance(raw, property):
        setattr(owner, name, property(new, raw.fset, raw.fdel, raw.__doc__))
    elif isinstance(raw, (staticmethod, classmethod)):
        setattr(owner, name, type(raw)(new))
    else:
        setattr(owner, name, new)
    return True
